"""Put the tiny model set (`rcod make-tiny`) where ComfyUI looks for models.

    models/rcod/         rcod_o.pkl rcod_o.safetensors osediff.pkl rcod_s.pkl rcod_s_mem.pkl rcod_s.safetensors
                         s3diff.pkl de_net.pth
    models/diffusers/    base-sd21/ base-sd-turbo/        (diffusers folders)
    models/checkpoints/  base-sd21.safetensors            (single file, LDM keys)
    models/clip_vision/  clip-vision/ clip-vision.safetensors
    models/rcod/         rcod_o_sdvae.safetensors              (an RCOD_O on the next base)
    models/diffusers/    base-sd21-sdvae/                      (tiny UNet, the real SD VAE architecture)
    models/vae/          sd-vae.safetensors                    (that VAE, for core's VAE Loader)

plus the same tiny files under the names users download the real weights as (USUAL_NAMES), which
the shipped workflows in workflows/ name. Hard links (copies across file systems) by default: rcod_core.loader.safe_model_path refuses names
whose symlink resolves outside the folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

LAYOUT = {
    "rcod": ["rcod_o.pkl", "rcod_o.safetensors", "osediff.pkl", "rcod_s.pkl", "rcod_s_mem.pkl", "rcod_s.safetensors",
             "s3diff.pkl", "de_net.pth"],
    "diffusers": ["base-sd21", "base-sd-turbo"],
    "checkpoints": ["base-sd21.safetensors"],
    "clip_vision": ["clip-vision", "clip-vision.safetensors"],
}
#: the set with the SD-architecture VAE (rcod_core.testing.tiny.make_sd_vae_set), for graphs that mix
#: core VAE Encode/Decode with RCOD's stages
SD_VAE_LAYOUT = {
    "rcod": ["rcod_o_sdvae.safetensors"],
    "diffusers": ["base-sd21-sdvae"],
    "vae": ["sd-vae.safetensors"],
}

#: (folder, usual file name of the real weights) → the tiny file that stands in for it
USUAL_NAMES = {
    ("checkpoints", "sd_turbo.safetensors"): "base-sd21.safetensors",  # the SD-Turbo single file (same architecture)
    ("checkpoints", "v2-1_512-ema-pruned.safetensors"): "base-sd21.safetensors",
    ("diffusers", "stable-diffusion-2-1-base"): "base-sd21",
    ("clip_vision", "clip-vit-large-patch14.safetensors"): "clip-vision.safetensors",
}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def install_tiny_models(models_dir: Path, tiny_dir: Path, copy: bool = True, sd_vae: bool = True) -> None:
    """Make the tiny sets in ``tiny_dir`` (unless there) and put them into ``models_dir``'s folders
    (``sd_vae=False``: without the SD-VAE set, 340 MB that only the mixed graphs need)."""
    from rcod_core.testing.tiny import make_sd_vae_set, make_tiny

    tiny_dir, models_dir = Path(tiny_dir), Path(models_dir)
    if not (tiny_dir / "rcod_s.safetensors").is_file():
        make_tiny(tiny_dir, seed=0, overwrite=True)
    if sd_vae and not (tiny_dir / "rcod_o_sdvae.safetensors").is_file():
        make_sd_vae_set(tiny_dir, seed=0)
    layouts = (LAYOUT, SD_VAE_LAYOUT) if sd_vae else (LAYOUT,)
    pairs = [(folder, name, name) for layout in layouts for folder, names in layout.items() for name in names]
    pairs += [(folder, usual, tiny) for (folder, usual), tiny in USUAL_NAMES.items()]
    for folder, name, tiny in pairs:
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        dst, src = models_dir / folder / name, (tiny_dir / tiny).resolve()
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        if not copy:
            dst.symlink_to(src, target_is_directory=src.is_dir())
        elif src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


if __name__ == "__main__":
    install_tiny_models(Path(sys.argv[1]), Path(sys.argv[2]))
