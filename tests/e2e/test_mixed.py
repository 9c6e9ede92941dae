"""Graphs that mix RCOD's stages with ComfyUI's own VAE and latent nodes, on one VAE's weights.

The RCOD_O here sits on a base whose VAE has the real SD architecture (random weights), and
core's VAE Loader loads the same VAE from ``models/vae/sd-vae.safetensors``. LATENTs carry raw VAE
latents both ways, so:

- RCOD Encode → RCOD Denoise → core VAE Decode gives RCOD Upscale's image;
- core VAE Encode → RCOD Denoise (with the LR image) → core VAE Decode or RCOD Decode gives what
  rcod_core computes from that same core latent in this process;
- RCOD Encode → SaveLatent → LoadLatent → RCOD Denoise (with the LR image) gives RCOD Upscale's
  image again, and without the image it is an error that says what to connect.
Differences are measured in grey levels of the saved 8-bit PNGs.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ARTIFACTS, SCRATCH

LR_NAME = "rcod_mixed_lr32.png"
CHECKPOINT, BASE, CLIP, VAE = ("rcod_o_sdvae.safetensors", "diffusers/base-sd21-sdvae", "clip_vision/clip-vision",
                               "sd-vae.safetensors")
RCOD = {"rcod_model": ["2", 0]}
T = 500  # the t widget (read with preset Custom only; Neutral picks the model's own t)


def _nodes(**extra) -> dict:
    base = {
        "1": {"class_type": "LoadImage", "inputs": {"image": LR_NAME}},
        "2": {"class_type": "RCODModelLoader", "inputs": {"checkpoint": CHECKPOINT, "base": BASE, "clip_vision": CLIP,
                                                          "dtype": "fp32", "device": "auto", "mem": "none"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
    }
    return {**base, **extra}


def _save(prefix: str, images: list) -> dict:
    return {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": images}}


def _denoise(latent: list, **inputs) -> dict:
    return {"class_type": "RCODDenoise", "inputs": {**RCOD, "latent": latent, "preset": "Neutral", "t": T,
                                                    "x0_mode": "model default", "mask_t0": 250, **inputs}}


def _upscale(image: list) -> dict:
    """RCOD Upscale with the settings of the stage chains (untiled, Neutral), as their reference."""
    return {"class_type": "RCODUpscale", "inputs": {**RCOD, "image": image, "scale": 4.0, "preset": "Neutral", "t": T,
                                                    "x0_mode": "model default", "tiling": "none", "tile_size": 64,
                                                    "tile_overlap": 16, "color_fix": "none"}}


def _images(server, prompt: dict, hist: dict) -> dict[str, np.ndarray]:
    """SaveImage prefix → the saved image as uint8 (H, W, 3)."""
    out = {}
    for nid, node in prompt.items():
        if node["class_type"] == "SaveImage":
            (im,) = hist["outputs"][nid]["images"]
            with Image.open(server.output / im.get("subfolder", "") / im["filename"]) as img:
                out[node["inputs"]["filename_prefix"]] = np.asarray(img.convert("RGB"))
    return out


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Mean and max absolute difference in grey levels."""
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


MEASURED: dict[str, dict] = {}


def _record(name: str, a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    mean, worst = _levels(a, b)
    MEASURED[name] = {"mean_levels": round(mean, 4), "max_levels": worst}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "mixed_graphs.json").write_text(json.dumps(MEASURED, indent=1))
    return mean, worst


@pytest.fixture(scope="module")
def lr_image(server) -> np.ndarray:
    """A 32×32 crop of the example image, in ComfyUI's input folder."""
    from rcod_core.demo import EXAMPLE_LR

    with Image.open(EXAMPLE_LR) as img:
        crop = img.convert("RGB").crop((40, 8, 72, 40))
    crop.save(SCRATCH / "input" / LR_NAME)
    return np.asarray(crop)


def _run(server, prompt: dict) -> tuple[dict, dict]:
    hist = server.run(prompt)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"]["messages"])[:3000]
    return hist, _images(server, prompt, hist)


def test_rcod_latents_decode_with_core_vae_decode(server, lr_image):
    prompt = _nodes(**{
        "10": {"class_type": "RCODEncode", "inputs": {**RCOD, "image": ["1", 0], "scale": 4.0, "resampler": "bicubic"}},
        "11": _denoise(["10", 0]),
        "12": _save("mix_core_decode", ["13", 0]),
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "14": {"class_type": "RCODDecode", "inputs": {**RCOD, "latent": ["11", 0]}},
        "15": _save("mix_rcod_decode", ["14", 0]),
        "16": _upscale(["1", 0]),
        "17": _save("mix_upscale", ["16", 0]),
        # z_L itself (RCOD Encode's raw latent) through both decoders
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "19": _save("mix_core_decode_zl", ["18", 0]),
        "20": {"class_type": "RCODDecode", "inputs": {**RCOD, "latent": ["10", 0]}},
        "21": _save("mix_rcod_decode_zl", ["20", 0]),
        "22": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "mix_zl"}},
    })
    hist, im = _run(server, prompt)
    assert im["mix_upscale"].shape == (128, 128, 3)
    # the same latent through core's VAE Decode and RCOD Decode: the same decoder weights
    for core, ours in (("mix_core_decode", "mix_rcod_decode"), ("mix_core_decode_zl", "mix_rcod_decode_zl")):
        mean, worst = _record(f"{core} vs {ours}", im[core], im[ours])
        assert worst <= 1 and mean < 0.05, (core, mean, worst)
    # the stages chained with core's decoder are the whole pipeline
    mean, worst = _record("RCOD Encode → Denoise → core VAE Decode vs RCOD Upscale", im["mix_core_decode"],
                          im["mix_upscale"])
    assert worst <= 1 and mean < 0.05, (mean, worst)
    # z_L and z_H differ: the denoise did something (and the comparisons above are not trivially equal)
    assert _levels(im["mix_rcod_decode_zl"], im["mix_rcod_decode"])[0] > 2.0
    (saved,) = hist["outputs"]["22"]["latents"]
    shutil.copy(server.output / saved.get("subfolder", "") / saved["filename"], SCRATCH / "input" / "mix_zl.latent")


def test_saved_and_loaded_rcod_latent_denoises_with_the_lr_image(server, lr_image):
    if not (SCRATCH / "input" / "mix_zl.latent").is_file():
        pytest.skip("needs the latent that the previous test saves")
    prompt = _nodes(**{
        "10": {"class_type": "LoadLatent", "inputs": {"latent": "mix_zl.latent"}},
        "11": _denoise(["10", 0], image=["1", 0]),
        "12": {"class_type": "RCODDecode", "inputs": {**RCOD, "latent": ["11", 0]}},
        "13": _save("mix_loadlatent", ["12", 0]),
        "16": _upscale(["1", 0]),
        "17": _save("mix_upscale", ["16", 0]),
    })
    _, im = _run(server, prompt)
    mean, worst = _record("RCOD Encode → SaveLatent → LoadLatent → Denoise(image) → Decode vs RCOD Upscale",
                          im["mix_loadlatent"], im["mix_upscale"])
    assert worst <= 1 and mean < 0.05, (mean, worst)
    # without the LR image the loaded latent has nothing to condition on: one clear error naming the node
    bare = copy.deepcopy(prompt)
    bare["11"]["inputs"].pop("image")
    hist = server.run(bare)
    assert hist["status"]["status_str"] == "error"
    text = json.dumps(hist["status"]["messages"])
    assert "RCOD One-Step Denoise" in text and "connect the LR image" in text, text[:2000]


def test_core_vae_encode_feeds_rcod_denoise(server, lr_image):
    prompt = _nodes(**{
        "10": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bicubic", "scale_by": 4.0}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "mix_core_zl"}},
        "13": _denoise(["11", 0], image=["1", 0]),
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["3", 0]}},
        "15": _save("mix_core_rcod_core", ["14", 0]),
        "16": {"class_type": "RCODDecode", "inputs": {**RCOD, "latent": ["13", 0]}},
        "17": _save("mix_core_rcod_rcod", ["16", 0]),
    })
    hist, im = _run(server, prompt)
    mean, worst = _record("core Encode → RCOD Denoise → core VAE Decode vs → RCOD Decode", im["mix_core_rcod_core"],
                          im["mix_core_rcod_rcod"])
    assert worst <= 1 and mean < 0.05, (mean, worst)

    # the reference: rcod_core in this process, from the very latent core's VAE Encode made
    from safetensors.torch import load_file

    from rcod_core.imageops import resize
    from rcod_core.loader import load_pipeline
    from rcod_core.model import scale_latent

    (saved,) = hist["outputs"]["12"]["latents"]
    raw = load_file(str(server.output / saved.get("subfolder", "") / saved["filename"]))["latent_tensor"].float()
    assert raw.shape == (1, 4, 16, 16)
    models = SCRATCH / "models"
    pipe = load_pipeline(models / "rcod" / CHECKPOINT, base=models / BASE, clip=models / CLIP)
    lr = torch.from_numpy(lr_image.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        tokens = pipe.prompt(resize(lr, (128, 128)))
        t = pipe.resolve_timesteps("neutral", 1)
        assert int(t[0]) == hist["outputs"]["13"]["rcod_t"][0]  # the t the node reported using
        ref = pipe.decode(pipe.denoise(scale_latent(pipe.vae, raw), tokens, t))
    ref8 = np.clip(255.0 * ref[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)  # as SaveImage truncates
    mean, worst = _record("core Encode → RCOD Denoise → RCOD Decode vs rcod_core on the same latent",
                          im["mix_core_rcod_rcod"], ref8)
    assert worst <= 1 and mean < 0.05, (mean, worst)
    # core's latent is not RCOD's z_L (RCOD_O's encoder has its own LoRA): the path really is core's
    ours = SCRATCH / "input" / "mix_zl.latent"
    if ours.is_file():
        assert (load_file(str(ours))["latent_tensor"].float() - raw).abs().mean() > 1e-3
