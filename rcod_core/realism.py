"""Spatial realism: a different timestep in different regions of one image (beyond the paper).

A *t-map* gives a (continuous) timestep per pixel. The UNet runs once per *level* (a distinct
timestep, e.g. 249 / 499 / 749) on the whole latent, and the one-step results are blended in
latent space with piecewise-linear ("hat") weights of the t-map between adjacent levels:

    z_H(p) = Σ_l w_l(p) · z_H^(l)(p),   w_l(p) = hat_l(t(p)),   Σ_l w_l = 1

Cost: one UNet pass per level (plus one VAE encode/decode for the whole image). A mask in
[0, 1] is the two-level case ``t = t_fid + m (t_real − t_fid)``; masks are feathered (Gaussian) in
latent space so region borders blend instead of cutting. A map from MEM run per tile
(:func:`metric_map`) gives the automatic version: per-region M_L → per-region t.

Mask/map sizes: any size with the output's aspect ratio (±2 %) is resized (bilinear); another
aspect ratio, or more than one channel, is refused with a ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ASPECT_TOLERANCE = 0.02


def prepare_map(values: torch.Tensor, batch: int, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """Validate a mask/map ((H, W), (1|B, H, W) or (1|B, 1, H, W)) → float (B, 1, *size)."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(values).__name__}")
    m = values.detach().float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    elif m.ndim != 4:
        raise ValueError(f"{name} must have shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(values.shape)}")
    if m.shape[1] != 1:
        raise ValueError(f"{name} must have one channel, got {m.shape[1]} (shape {tuple(values.shape)})")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {m.shape[0]} entries for a batch of {batch}")
    if not torch.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or Inf")
    h, w = m.shape[-2:]
    out_h, out_w = size
    if abs((w / h) / (out_w / out_h) - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(
            f"{name} is {w}x{h} (W x H) but the output is {out_w}x{out_h}: the aspect ratios differ; "
            f"give a {name} of the output's (or the input's) shape"
        )
    if (h, w) != (out_h, out_w):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.expand(batch, -1, -1, -1).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: float, padding: str = "replicate") -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), radius ⌈3σ⌉, with ``padding`` (a ``F.pad`` mode:
    replicate, reflect); identity for sigma <= 0."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    if pad_h < radius or pad_w < radius:  # tiny maps: shrink the kernel to what replicate allows
        return gaussian_blur(x, sigma=min(pad_h, pad_w) / 3, padding=padding) if min(pad_h, pad_w) > 0 else x
    x = F.pad(x, (radius, radius, 0, 0), mode=padding)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode=padding)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def level_weights(t_map: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Hat-function weights (L, B, 1, H, W) of a t-map over sorted levels; they sum to one.

    Values below the first level get weight 1 on it, above the last on the last.
    """
    lv = sorted(set(int(v) for v in levels))
    if len(lv) == 1:
        return torch.ones((1, *t_map.shape), dtype=t_map.dtype, device=t_map.device)
    t = t_map.clamp(lv[0], lv[-1])
    weights = []
    for i, level in enumerate(lv):
        w = torch.zeros_like(t)
        if i > 0:
            lo = lv[i - 1]
            w = torch.where((t >= lo) & (t <= level), (t - lo) / (level - lo), w)
        if i < len(lv) - 1:
            hi = lv[i + 1]
            w = torch.where((t >= level) & (t <= hi), (hi - t) / (hi - level), w)
        weights.append(w)
    return torch.stack(weights)


def blend_levels(latents: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_l w_l · z_l with weights resized to the latent grid (bilinear)."""
    size = latents[0].shape[-2:]
    out = torch.zeros_like(latents[0])
    for z, w in zip(latents, weights):
        if w.shape[-2:] != size:
            w = F.interpolate(w, size=size, mode="bilinear", align_corners=False)
        out = out + w.to(z.dtype) * z
    return out


def mask_to_t_map(mask: torch.Tensor, t_low: int, t_high: int) -> torch.Tensor:
    """Mask in [0, 1] → t-map: 0 → ``t_low`` (e.g. fidelity), 1 → ``t_high`` (e.g. realism)."""
    if float(mask.min()) < -1e-6 or float(mask.max()) > 1 + 1e-6:
        raise ValueError(f"mask values must be in [0, 1], got [{float(mask.min()):.3g}, {float(mask.max()):.3g}]")
    return t_low + mask.clamp(0, 1) * (t_high - t_low)


def feathered_mask_t_map(mask: torch.Tensor, t_low: int, t_high: int, sigma: float) -> torch.Tensor:
    """A (B, 1, H, W) mask in [0, 1] → t-map, feathered by a Gaussian of ``sigma`` pixels (about one
    latent pixel) so region borders blend; values within 1e-6 of 0 or 1 snap to the ends."""
    m = mask_to_t_map(mask, 0, 1)  # validates the [0, 1] range before feathering
    m = gaussian_blur(m, sigma=sigma)
    m = torch.where(m < 1e-6, torch.zeros_like(m), torch.where(m > 1 - 1e-6, torch.ones_like(m), m))
    return mask_to_t_map(m, t_low, t_high)


def metric_map(
    estimate: Callable[[torch.Tensor], torch.Tensor],
    lr: torch.Tensor,
    tile: int = 64,
    overlap: int = 32,
    batch_tiles: int = 16,
) -> torch.Tensor:
    """MEM per tile → a smooth (B, 1, H, W) map of the predicted latent metric M_L over the LR image.

    Each tile's prediction is painted over the tile with a separable Gaussian window (σ = tile / 4)
    and the overlapping paints are normalised: a per-region M_L that varies smoothly.
    """
    b, _, h, w = lr.shape
    th, tw = min(tile, h), min(tile, w)
    stride_h, stride_w = max(1, th - min(overlap, th - 1)), max(1, tw - min(overlap, tw - 1))
    ys = sorted(set(list(range(0, h - th + 1, stride_h)) + [h - th]))
    xs = sorted(set(list(range(0, w - tw + 1, stride_w)) + [w - tw]))
    boxes = [(y, x) for y in ys for x in xs]
    window = _window(th, tw, lr.device)
    acc = torch.zeros(b, 1, h, w, device=lr.device)
    norm = torch.zeros(1, 1, h, w, device=lr.device)
    for start in range(0, len(boxes), max(1, batch_tiles)):
        chunk = boxes[start : start + batch_tiles]
        tiles = torch.cat([lr[:, :, y : y + th, x : x + tw] for y, x in chunk])  # (len(chunk) * B, 3, th, tw)
        values = estimate(tiles).float().view(len(chunk), b)
        for (y, x), v in zip(chunk, values):
            acc[:, :, y : y + th, x : x + tw] += v.view(b, 1, 1, 1) * window
            norm[:, :, y : y + th, x : x + tw] += window
    return acc / norm.clamp_min(1e-12)


def _window(h: int, w: int, device) -> torch.Tensor:
    def axis(n: int) -> torch.Tensor:
        c = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-(c ** 2) / (2 * max(n / 4, 1.0) ** 2))

    return (axis(h)[:, None] * axis(w)[None, :])[None, None]
