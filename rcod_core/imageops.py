"""Image tensors between the stages: validation, output sizes, resizing, padding, value ranges.

Images are ``(B, C, H, W)`` float tensors in [0, 1]; the VAE sees [-1, 1].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Resampler = Literal["bicubic", "bilinear", "nearest", "area"]
RESAMPLERS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "area")
MAX_SCALE = 8.0
#: the largest output (H · W) the pipeline makes: 2^30 px ≈ 32768², a 12 GB float32 RGB buffer
MAX_OUTPUT_PIXELS = 2**30


def validate_images(images: torch.Tensor, name: str = "images", channels: int = 3) -> None:
    """Raise ``ValueError`` unless ``images`` is a finite float (B, channels, H, W) tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, {channels}, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    lo, hi = torch.aminmax(images.detach().float())
    lo, hi = float(lo), float(hi)  # one sync per call, at the entry
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf")
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{name} values must be in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def output_size(height: int, width: int, scale: float | None = None, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Target (H, W): ``round(scale · side)`` for a scale in [1, 8], or an explicit ``size=(H, W)``."""
    if size is not None:
        if scale is not None:
            raise ValueError("give either scale or size, not both")
        h, w = (int(v) for v in size)
        if h < 1 or w < 1:
            raise ValueError(f"size must be positive (H, W), got {size!r}")
        return _bounded(h, w, "size")
    scale = 4.0 if scale is None else float(scale)
    if not (1.0 <= scale <= MAX_SCALE):
        raise ValueError(f"scale must be in [1, {MAX_SCALE:g}], got {scale!r}")
    return _bounded(max(1, round(height * scale)), max(1, round(width * scale)), "scale")


def _bounded(h: int, w: int, what: str) -> tuple[int, int]:
    if h * w > MAX_OUTPUT_PIXELS:
        raise ValueError(f"{what} gives a {w}x{h} output ({h * w:,} px), more than the {MAX_OUTPUT_PIXELS:,} px limit")
    return h, w


def resize(images: torch.Tensor, size: tuple[int, int], resampler: Resampler = "bicubic") -> torch.Tensor:
    """Resize to ``size`` with a named resampler, clamped to [0, 1] (bicubic overshoots)."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    kwargs = {}
    if resampler in ("bicubic", "bilinear"):
        kwargs = {"align_corners": False, "antialias": True}
    return F.interpolate(images, size=size, mode=resampler, **kwargs).clamp_(0.0, 1.0)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W (bottom/right) up to a multiple; returns the padded tensor and (H, W).

    Falls back to edge replication where a side is too short to reflect.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] decoder output → float32 [0, 1], in place (no extra full-size buffer)."""
    x = x.float()
    return x.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)
