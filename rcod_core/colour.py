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

``color_fix(..., in_place=True)`` overwrites the target instead of making new images, so a large
output costs no full-size temporaries: AdaIN applies its per-channel affine map in place, and the
wavelet fix runs in strips of rows with a margin of ``2^levels − 1`` rows on each side (the reach of
its blurs, so each strip's own rows are what the whole image gives), keeping the original rows the
next strip's margin still needs.
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


#: elements of one strip of the in-place wavelet fix (4 MiB in float32), margins excluded
STRIP_ELEMENTS = 1 << 20
#: strip-sized float32 buffers alive at once in the in-place wavelet fix (measured: 9)
STRIP_BUFFERS = 10


def blur_reach(levels: int) -> int:
    """How many pixels away the wavelet decomposition's blurs (dilations 1, 2, …, 2^(levels−1)) see."""
    return 2**levels - 1


def wavelet_strip_rows(width: int, channels: int = 3, levels: int = 5) -> int:
    """Rows per strip of the in-place wavelet fix: :data:`STRIP_ELEMENTS`, and at least twice the
    blurs' reach (so the context is at most as large as the strip)."""
    return max(2 * blur_reach(levels), STRIP_ELEMENTS // max(1, channels * width))


def in_place_fix_bytes(width: int, channels: int = 3, levels: int = 5) -> int:
    """The temporaries of ``color_fix(..., in_place=True)`` on images ``width`` pixels wide, at most:
    :data:`STRIP_BUFFERS` float32 strips with their context rows (AdaIN makes none)."""
    rows = wavelet_strip_rows(width, channels, levels) + 2 * blur_reach(levels)
    return STRIP_BUFFERS * rows * width * channels * 4


def adain_color_fix(target: torch.Tensor, source: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Give ``target`` the per-channel mean and std of ``source`` (AdaIN), clamped to [0, 1]
    (``in_place``: written into ``target``, the same operations in the same order)."""
    source = _check(target, source)
    t_mean, t_std = _mean_std(target)
    s_mean, s_std = _mean_std(source)
    if in_place:
        return target.sub_(t_mean).div_(t_std).mul_(s_std).add_(s_mean).clamp_(0.0, 1.0)
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


def _wavelet_mix(target: torch.Tensor, source: torch.Tensor, levels: int) -> torch.Tensor:
    high, _ = wavelet_decomposition(target, levels)
    _, low = wavelet_decomposition(source, levels)
    return (high + low).clamp_(0.0, 1.0)


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor, levels: int = 5, in_place: bool = False,
                      strip_rows: int | None = None) -> torch.Tensor:
    """Target's high frequencies + source's low frequencies (wavelet reconstruction), clamped.

    ``in_place``: written into ``target`` strip by strip (``strip_rows`` rows at a time, default
    :func:`wavelet_strip_rows`), each strip computed with
    ``2^levels − 1`` rows of context on either side — the rows whose blurs reach it — so the result
    is the whole-image one; only strip-sized temporaries are made."""
    source = _check(target, source)
    if not in_place:
        return _wavelet_mix(target, source, levels)
    if source.untyped_storage().data_ptr() == target.untyped_storage().data_ptr():
        source = source.clone()  # the source must not change under the strips written into the target
    h, w = target.shape[-2:]
    margin = blur_reach(levels)
    step = strip_rows or wavelet_strip_rows(w, target.shape[1], levels)
    if not isinstance(step, int) or step <= margin:
        raise ValueError(f"strip_rows must be an integer above the blur's reach of {margin} rows, got {strip_rows!r}")
    above = target[..., :0, :]  # the original rows just above the current strip (already overwritten in target)
    for y0 in range(0, h, step):
        y1, end = min(h, y0 + step), min(h, y0 + step + margin)
        t_in = torch.cat([above, target[..., y0:end, :]], dim=-2)
        top = y0 - above.shape[-2]
        fixed = _wavelet_mix(t_in, source[..., top:end, :], levels)[..., y0 - top : y1 - top, :]
        above = target[..., max(0, y1 - margin) : y1, :].clone()
        target[..., y0:y1, :] = fixed
    return target


def color_fix(target: torch.Tensor, source: torch.Tensor, mode: ColorFix = "adain",
              in_place: bool = False) -> torch.Tensor:
    """Colour-correct ``target`` towards ``source``: ``"none"`` (identity), ``"adain"`` or ``"wavelet"``;
    ``in_place``: into ``target`` itself, with no full-size temporaries (module docstring)."""
    if mode not in COLOR_FIXES:
        raise ValueError(f"color fix mode must be one of {COLOR_FIXES}, got {mode!r}")
    if mode == "none":
        return target
    if mode == "adain":
        return adain_color_fix(target, source, in_place)
    return wavelet_color_fix(target, source, in_place=in_place)
