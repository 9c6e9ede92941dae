"""Release-compatible processing: the authors' inference scripts around our model core.

``processing="release"`` reproduces what the release's ``inference_rcod_o.py`` (RCOD_O, OSEDiff)
and ``inference_rcod_s.py`` (RCOD_S, S3Diff) do around the network, step for step; the network
itself is :class:`~rcod_core.model.RCODModel`, the same as in our default processing.

RCOD_O / OSEDiff (SD 2.1-base):

1. The LR as an 8-bit image. If a side is below ``512 // scale`` px, PIL BICUBIC to a short side of
   ``512 // scale`` (``int(s · w)``, ``int(s · h)``); then PIL BICUBIC × scale; then PIL LANCZOS
   down to multiples of 8. The model runs at that size, unpadded; VPIM sees the whole image.
2. Output in [-1, 1] clamped, ``· 0.5 + 0.5``, to 8 bits by truncation (``ToPILImage``).
3. Colour fix (AdaIN by default) of that 8-bit image towards the LANCZOS-resized input, truncated.
4. If step 1 enlarged the LR first: PIL BICUBIC back to ``scale ×`` the original size.

RCOD_S / S3Diff (SD-Turbo):

1. The LR tensor; bilinear × scale (``align_corners=False``), in [-1, 1], clamped; reflect-padded
   (bottom/right) to multiples of 64. DEResNet sees the original LR; VPIM sees the padded image.
2. Output clamped, cropped to the upscaled size, truncated to 8 bits.
3. Colour fix (wavelet by default) towards the upscaled LR, itself truncated to 8 bits.

Both: the latent is the VAE posterior's *sample* by default (the release's ``latent_dist.sample()``;
seeded here, or given as ``noise``); ``250 / 500 / 750`` run as 249 / 499 / 749; images are processed
one at a time in the release, batched here (same result per image). No tiling (the release's latent
tiling crashes for RCOD_O and uses an undefined tensor for RCOD_S).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .colour import color_fix as apply_color_fix
from .imageops import pad_to_multiple

Processing = Literal["ours", "release"]
PROCESSINGS: tuple[str, ...] = ("ours", "release")
#: the release's scripts map the paper's timesteps to these (``ts_map``)
RELEASE_TIMESTEPS = {250: 249, 500: 499, 750: 749}
#: RCOD_O's processing size (``--process_size``)
PROCESS_SIZE = 512
#: RCOD_S pads the model input to this multiple
S3_PAD = 64


def release_timestep(t: int) -> int:
    """The release's ``--timestep`` mapping: 250 / 500 / 750 → 249 / 499 / 749, others unchanged."""
    return RELEASE_TIMESTEPS.get(int(t), int(t))


def to_uint8_round(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → uint8 (rounded: lossless for images read from 8-bit files)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_truncate(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ToPILImage`` on float images: ``x · 255`` truncated to uint8."""
    return images.float().mul(255).to(torch.uint8)


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ToTensor``: uint8 → float32 in [0, 1] (``/ 255``)."""
    return images.to(torch.float32).div(255)


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), "RGB")


def _from_pil(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def pil_resize(images: torch.Tensor, size: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """uint8 (B, 3, H, W) → PIL ``Image.resize((W, H), resample)`` of each image → uint8 (B, 3, h, w)."""
    from PIL import Image

    method = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[resample]
    h, w = size
    return torch.stack([_from_pil(_pil(img).resize((w, h), method)) for img in images])


@dataclass
class ReleaseInput:
    """The model's input after the release's size rules (see the module docstring)."""

    lr: torch.Tensor  # the LR as the script reads it (8-bit, as float in [0, 1]): DEResNet's / MEM's input
    model_input: torch.Tensor  # float [0, 1] at the size the network runs at (RCOD_S: padded)
    reference: torch.Tensor  # uint8: the colour fix's source
    crop: tuple[int, int]  # (H, W) of the network's output to keep
    final_size: Optional[tuple[int, int]]  # RCOD_O: PIL BICUBIC to this (H, W) at the end, else None


def release_input(images: torch.Tensor, family: str, scale: int) -> ReleaseInput:
    """Images (B, 3, h, w) in [0, 1] → the release's network input for a base ``family``."""
    lr8 = to_uint8_round(images.cpu())
    lr = uint8_to_float(lr8)
    h, w = lr8.shape[-2:]
    if family == "sd21_base":
        final = None
        low = PROCESS_SIZE // scale
        if w < low or h < low:
            s = low / min(w, h)
            lr8 = pil_resize(lr8, (int(s * h), int(s * w)))
            final = (scale * h, scale * w)
        up = pil_resize(lr8, (lr8.shape[-2] * scale, lr8.shape[-1] * scale))
        hh, ww = up.shape[-2] - up.shape[-2] % 8, up.shape[-1] - up.shape[-1] % 8
        if (hh, ww) != tuple(up.shape[-2:]):
            up = pil_resize(up, (hh, ww), "lanczos")
        return ReleaseInput(lr, uint8_to_float(up), up, (hh, ww), final)
    if family == "sd_turbo":
        up = F.interpolate(lr, size=(h * scale, w * scale), mode="bilinear", align_corners=False)
        padded, _ = pad_to_multiple(up.clamp(0, 1), S3_PAD)
        return ReleaseInput(lr, padded, to_uint8_truncate(up), (h * scale, w * scale), None)
    raise ValueError(f"release processing knows the SD 2.1-base and SD-Turbo scripts, not base {family!r}")


def release_output(decoded: torch.Tensor, rin: ReleaseInput, color_fix: str) -> torch.Tensor:
    """Decoder output in [-1, 1] → the release's final uint8 image (crop, truncate, colour fix, resize)."""
    h, w = rin.crop
    out8 = to_uint8_truncate((decoded.float().clamp(-1, 1)[..., :h, :w] * 0.5 + 0.5).cpu())
    if color_fix != "none":
        fixed = apply_color_fix(uint8_to_float(out8), uint8_to_float(rin.reference), color_fix)
        out8 = to_uint8_truncate(fixed)
    if rin.final_size is not None:
        out8 = pil_resize(out8, rin.final_size)
    return out8
