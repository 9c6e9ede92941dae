"""Put the tiny model set (`rcod make-tiny`) where ComfyUI looks for models.

    models/rcod/         rcod_o.pkl rcod_o.safetensors osediff.pkl rcod_s.pkl rcod_s_mem.pkl rcod_s.safetensors
                         s3diff.pkl de_net.pth
    models/diffusers/    base-sd21/ base-sd-turbo/        (diffusers folders)
    models/checkpoints/  base-sd21.safetensors            (single file, LDM keys)
    models/clip_vision/  clip-vision/ clip-vision.safetensors

plus the same tiny files under the names users download the real weights as (USUAL_NAMES), which
the shipped workflows in workflows/ name. Copies by default: rcod_core.loader.safe_model_path refuses names whose symlink resolves outside the folder.
"""

from __future__ import annotations

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

#: (folder, usual file name of the real weights) → the tiny file that stands in for it
USUAL_NAMES = {
    ("checkpoints", "sd_turbo.safetensors"): "base-sd21.safetensors",  # the SD-Turbo single file (same architecture)
    ("checkpoints", "v2-1_512-ema-pruned.safetensors"): "base-sd21.safetensors",
    ("diffusers", "stable-diffusion-2-1-base"): "base-sd21",
    ("clip_vision", "clip-vit-large-patch14.safetensors"): "clip-vision.safetensors",
}


def install_tiny_models(models_dir: Path, tiny_dir: Path, copy: bool = True) -> None:
    """Make the tiny set in ``tiny_dir`` (unless there) and link it into ``models_dir``'s folders."""
    from rcod_core.testing.tiny import make_tiny

    tiny_dir, models_dir = Path(tiny_dir), Path(models_dir)
    if not (tiny_dir / "rcod_s.safetensors").is_file():
        make_tiny(tiny_dir, seed=0, overwrite=True)
    pairs = [(folder, name, name) for folder, names in LAYOUT.items() for name in names]
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
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


if __name__ == "__main__":
    install_tiny_models(Path(sys.argv[1]), Path(sys.argv[2]))
