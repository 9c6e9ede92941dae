"""Colour correction of an SR output towards its LR input: AdaIN and wavelet, as in the bases.

Both come from StableSR's colorfix (used unchanged by OSEDiff and S3Diff, ``wavelet_color_fix.py``):

* AdaIN — per image and channel, ``(target − μ_t) / σ_t · σ_s + μ_s``; σ from the unbiased
  variance plus 1e-5 (their ``calc_mean_std``).
* wavelet — ``levels`` passes of a 3×3 blur ``[[1,2,1],[2,4,2],[1,2,1]]/16`` with dilation ``2^i``
  and replicate padding ``2^i`` (à trous); high = Σ (image − blur), low = the last blur; the result
  is the target's high frequencies plus the source's low frequencies.

Images are (B, 3, H, W) in [0, 1]; the source (the LR, or its upscaled version) is resized to the
target's size with bicubic interpolation when the sizes differ. Outputs are clamped to [0, 1]
(the bases clamp in ``ToPILImage``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ColorFix = Literal["none", "adain", "wavelet"]
COLOR_FIXES: tuple[str, ...] = ("none", "adain", "wavelet")
_EPS = 1e-5


def _check(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Validate shapes; return ``source`` at the target's size, in its dtype."""
    for name, t in (("target", target), ("source", source)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (B, C, H, W), got {getattr(t, 'shape', type(t))}")
    if source.shape[:2] != target.shape[:2]:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in batch or channels")
    source = source.to(target.device, target.dtype)
    if source.shape[-2:] != target.shape[-2:]:
        source = F.interpolate(source, size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return source


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    std = (flat.var(dim=-1) + _EPS).sqrt()  # unbiased var + eps, as calc_mean_std
    return flat.mean(dim=-1)[..., None, None], std[..., None, None]


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give ``target`` the per-channel mean and std of ``source`` (AdaIN), clamped to [0, 1]."""
    source = _check(target, source)
    t_mean, t_std = _mean_std(target)
    s_mean, s_std = _mean_std(source)
    return ((target - t_mean) / t_std * s_std + s_mean).clamp(0.0, 1.0)


def wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """3×3 binomial blur with ``dilation`` and replicate padding of ``dilation`` (same size out)."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device) / 16
    channels = image.shape[1]
    kernel = kernel[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): ``low`` after ``levels`` blurs with dilations 1, 2, …, 2^(levels−1); image = high + low."""
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    high = torch.zeros_like(image)
    low = image
    for i in range(levels):
        blurred = wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Target's high frequencies + source's low frequencies (wavelet reconstruction), clamped."""
    source = _check(target, source)
    high, _ = wavelet_decomposition(target, levels)
    _, low = wavelet_decomposition(source, levels)
    return (high + low).clamp(0.0, 1.0)


def color_fix(target: torch.Tensor, source: torch.Tensor, mode: ColorFix = "adain") -> torch.Tensor:
    """Colour-correct ``target`` towards ``source``: ``"none"`` (identity), ``"adain"`` or ``"wavelet"``."""
    if mode not in COLOR_FIXES:
        raise ValueError(f"color fix mode must be one of {COLOR_FIXES}, got {mode!r}")
    if mode == "none":
        return target
    if mode == "adain":
        return adain_color_fix(target, source)
    return wavelet_color_fix(target, source)
