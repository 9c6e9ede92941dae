"""Tiled VAE encode and decode that keep whole-image GroupNorm statistics.

VAE (:func:`tiled_encode`, :func:`tiled_decode`): the encoder and decoder of an ``AutoencoderKL``
are convolutions plus GroupNorm plus one mid-block self-attention. Convolutions are local, so
tiles with overlap reproduce them away from the tile borders. GroupNorm is not: its mean and
variance run over the whole image, and a tile computing its own statistics shifts its colours and
contrast (the visible seams of naive tiling). Here every GroupNorm runs with statistics *frozen*
for the whole image (``norm_stats="estimate"``): the VAE first runs once on the whole input
downscaled to fit one tile (area/antialiased resize), recording each GroupNorm's per-group mean
and variance (:func:`record_groupnorm_stats`); the tiles then run with those statistics
(:func:`frozen_groupnorm`). The estimate costs one tile-sized pass; its error comes from the
resize (variances of the deeper layers are ~5-15 % low on a random-weight VAE). Exact statistics
would need either one tiled pass per GroupNorm layer (each layer's statistics depend on all earlier
ones: accumulating all layers in one tiled pass with estimated earlier statistics was tried and is
no better than the estimate) or all tiles' activations held at once (the unbounded memory tiling is
meant to avoid); neither is done. ``norm_stats="tile"`` is naive per-tile GroupNorm (for
comparison, and what diffusers' ``enable_tiling`` does); ``norm_stats="exact"`` accumulates the
statistics tile by tile, one pass per GroupNorm (:func:`exact_groupnorm_stats`: bounded memory,
about L/2 tiled passes for L GroupNorms; near-untiled results).
Recording uses forward hooks; freezing swaps the ``forward`` of the VAE's ``nn.GroupNorm`` modules
for an instance attribute. Both are undone in ``finally``: the shared model is never left
modified, even on error or :class:`Cancelled`. (A ``torch.compile``-d VAE recompiles for them.)

With ``global_mid`` (default) only the full-resolution part runs in tiles: the decoder's
``conv_in`` + mid block (with its self-attention) run once on the whole latent, and the encoder's
mid block + ``conv_out`` once on the blended latent-resolution features, so the attention stays
global and its GroupNorms exact. This costs memory at latent resolution only (for SD, 512 channels
× h × w, ≈ 0.27 GB in fp16 per tensor at a 512² latent = 4096² px).

The mid-block self-attention of the VAE is global in the untiled model; with ``global_mid=False``
it only sees its tile (on the random tiny VAE that alone dominates the tiled-vs-untiled error).
What remains otherwise is the GroupNorm estimate and the zero padding of the convolutions at tile
borders; overlapping tiles blended with Gaussian weights (latent space for encode, pixel space for
decode) hide the tile borders, where it is largest.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models import vae_factor
from .progress import CancelFn, Progress, ProgressFn
from .tiling import (DEFAULT_SIGMA_SCALE, Box, blend_tiles, check_tile_args, owned_boxes, stack_samples, tile_grid,
                     tile_units)

NormStats = Literal["estimate", "exact", "tile"]
NORM_STATS: tuple[str, ...] = ("estimate", "exact", "tile")


# -- GroupNorm with whole-image statistics ---------------------------------------------------------
GroupNormStats = dict[nn.GroupNorm, list[tuple[torch.Tensor, torch.Tensor]]]


def _groupnorms(module: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm)]


def _group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.float().reshape(x.shape[0], groups, -1)


@contextlib.contextmanager
def record_groupnorm_stats(module: nn.Module) -> Iterator[GroupNormStats]:
    """Within the block, every ``nn.GroupNorm`` in ``module`` records the per-group (mean, biased
    variance), each (N, G) float32, of each input it sees, in call order. Hooks removed on exit."""
    stats: GroupNormStats = {}

    def hook(m: nn.GroupNorm, args, output):
        var, mean = torch.var_mean(_group_view(args[0], m.num_groups), dim=-1, unbiased=False)
        stats.setdefault(m, []).append((mean, var))

    handles = [m.register_forward_hook(hook) for m in _groupnorms(module)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _normalise(m: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` with given per-group (1, G) statistics, as one ``x · a + b`` per channel."""
    channels, per_group = x.shape[1], x.shape[1] // m.num_groups
    a = torch.rsqrt(var.float() + m.eps).repeat_interleave(per_group, dim=1)  # (1, C)
    b = -mean.float().repeat_interleave(per_group, dim=1) * a
    if m.affine:
        a, b = a * m.weight.float(), b * m.weight.float() + m.bias.float()
    shape = (1, channels) + (1,) * (x.ndim - 2)
    if x.dtype == torch.float32:
        return torch.addcmul(b.view(shape), x, a.view(shape))
    return torch.addcmul(b.view(shape), x.float(), a.view(shape)).to(x.dtype)


@contextlib.contextmanager
def _replaced_forward(modules: Sequence[nn.Module], make: Callable[[nn.Module], Callable]) -> Iterator[None]:
    """Give each module an instance-level ``forward`` = ``make(module)`` (the original does not run),
    and restore whatever was there (class method, or an earlier instance attribute) on exit."""
    saved = []
    try:
        for m in modules:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = make(m)
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                del m.__dict__["forward"]
            else:
                m.forward = previous


@contextlib.contextmanager
def frozen_groupnorm(module: nn.Module, stats: GroupNormStats, sample: int = 0) -> Iterator[None]:
    """Within the block, every ``nn.GroupNorm`` in ``module`` that has recorded statistics
    normalises with those of sample ``sample`` (broadcast over the batch) instead of its input's own.

    A module called k times per forward uses its k recorded entries in turn. The modules' own
    ``forward`` is swapped for the block (instance attribute, so no double computation) and
    restored on exit, also on error.
    """

    def make(m: nn.GroupNorm) -> Callable:
        entries = stats[m]
        calls = [0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            mean, var = entries[calls[0] % len(entries)]
            calls[0] += 1
            return _normalise(m, x, mean[sample : sample + 1].to(x.device), var[sample : sample + 1].to(x.device))

        return forward

    with _replaced_forward([m for m in _groupnorms(module) if stats.get(m)], make):
        yield


class _StopForward(Exception):
    """Ends a forward pass early once the GroupNorm being measured has seen its input."""


def _owned_part(m: nn.GroupNorm, x: torch.Tensor, i: int, box: Box, owned: Box) -> torch.Tensor:
    """Tile ``i``'s owned region of a GroupNorm input, as (G, n) float64. Positions map from the
    tile's input coordinates to the layer's resolution by the ratio of their sizes."""
    th, tw = box[1] - box[0], box[3] - box[2]
    if x.ndim == 4:
        spatial = x[i : i + 1]
    else:  # the attention's GroupNorm sees (N, C, h·w): restore the tile's aspect
        f = math.sqrt(x.shape[-1] / (th * tw))
        spatial = x[i : i + 1].reshape(1, x.shape[1], round(th * f), round(tw * f))
    fh, fw = spatial.shape[-2] / th, spatial.shape[-1] / tw
    y0, y1, x0, x1 = owned
    part = spatial[..., round(y0 * fh) : round(y1 * fh), round(x0 * fw) : round(x1 * fw)]
    return part.double().reshape(m.num_groups, -1)


def exact_groupnorm_stats(
    part: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: int,
    batch_tiles: int = 1,
    tick: Optional[Callable[[int], None]] = None,
) -> GroupNormStats:
    """Whole-image statistics of every GroupNorm in ``part``, accumulated tile by tile, layer by
    layer, in bounded memory: for each GroupNorm in call order, all tiles run (with the layers
    before it normalised by their already accumulated statistics) until that GroupNorm, which sums
    its input over the region the tile owns (:func:`owned_boxes`) and stops the pass.

    Exact up to the tile-border effects of the layers before (zero padding inside the owned margin)
    and float64 rounding; costs about (number of GroupNorms) / 2 tiled passes.
    ``image`` is (1, C, H, W); ``tick(n)`` is called after each batch of n tiles.
    """
    H, W = image.shape[-2:]
    owned = owned_boxes(H, W, tile, overlap)
    boxes = list(owned)
    order: list[nn.GroupNorm] = []
    counts: dict[nn.GroupNorm, int] = {}

    def order_hook(m, args, output):
        counts[m] = counts.get(m, 0) + 1
        if m not in order:
            order.append(m)

    handles = [m.register_forward_hook(order_hook) for m in _groupnorms(part)]
    try:
        y0, y1, x0, x1 = boxes[0]
        run(image[..., y0:y1, x0:x1])
    finally:
        for h in handles:
            h.remove()
    if any(c > 1 for c in counts.values()):
        raise ValueError("exact GroupNorm statistics need every GroupNorm to be called once per forward")

    stats: GroupNormStats = {}
    for target in order:
        total = [0.0, 0.0, 0]
        current: list[Sequence[Box]] = [[]]

        def make(m: nn.GroupNorm) -> Callable:
            if m is target:

                def measure(x: torch.Tensor) -> torch.Tensor:
                    for i, box in enumerate(current[0]):
                        p = _owned_part(m, x, i, box, owned[box])
                        total[0] = total[0] + p.sum(-1)
                        total[1] = total[1] + (p * p).sum(-1)
                        total[2] += p.shape[-1]
                    raise _StopForward

                return measure
            mean, var = stats[m][0]
            return lambda x: _normalise(m, x, mean.to(x.device), var.to(x.device))

        with _replaced_forward(order[: order.index(target) + 1], make):
            for i in range(0, len(boxes), batch_tiles):
                chunk = boxes[i : i + batch_tiles]
                current[0] = chunk
                try:
                    run(torch.cat([image[..., a:b, c:d] for a, b, c, d in chunk]))
                except _StopForward:
                    pass
                if tick is not None:
                    tick(len(chunk))
        mean = total[0] / total[2]
        var = (total[1] / total[2] - mean * mean).clamp_min(0.0)
        stats[target] = [(mean[None].float(), var[None].float())]
    return stats


# -- VAE -------------------------------------------------------------------------------------------
def _fit_size(h: int, w: int, tile: int, multiple: int = 1) -> tuple[int, int]:
    """(h, w) shrunk, aspect kept, so that both sides are <= tile (multiples of ``multiple``)."""
    f = min(1.0, tile / max(h, w))
    hh = max(multiple, int(h * f) // multiple * multiple)
    ww = max(multiple, int(w * f) // multiple * multiple)
    return hh, ww


def _run_vae_tiled(
    part: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: Fraction,
    downscale: Callable[[torch.Tensor], torch.Tensor],
    norm_stats: NormStats,
    batch_tiles: int,
    progress: ProgressFn,
    cancel: CancelFn,
    sigma_scale: float,
    out_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
    B, _, H, W = x.shape
    boxes = tile_grid(H, W, tile, overlap)
    groupnorms = sum(1 for _ in _groupnorms(part)) if norm_stats == "exact" else 0
    ticker = Progress(progress, cancel, vae_tile_units(H, W, tile, overlap, B, norm_stats, groupnorms))

    def tick(n: int) -> None:
        ticker.advance(n)
        ticker.check()

    def one(b: int) -> torch.Tensor:
        image = x[b : b + 1]
        stats: GroupNormStats = {}
        ticker.check()
        if norm_stats == "estimate":
            with record_groupnorm_stats(part) as stats:
                run(downscale(image))
        elif norm_stats == "exact":
            stats = exact_groupnorm_stats(part, run, image, tile, overlap, batch_tiles, tick)
        ctx = frozen_groupnorm(part, stats) if stats else contextlib.nullcontext()
        with ctx:
            return blend_tiles(lambda t, _boxes: run(t), image, boxes, scale, batch_tiles, ticker, sigma_scale,
                               out_dtype, channels_last)

    return stack_samples((one(b) for b in range(B)), B)


def vae_tile_units(h: int, w: int, tile: int, overlap: int, batch: int = 1, norm_stats: NormStats = "estimate",
                   groupnorms: int = 0) -> int:
    """The progress units :func:`tiled_encode` / :func:`tiled_decode` report for ``batch`` inputs of
    ``h × w`` (pixels for encode, latent pixels for decode): one per image that fits a tile, else
    one per tile and pass (``exact`` statistics add a pass per GroupNorm of the tiled part,
    ``groupnorms``)."""
    units = tile_units(h, w, tile, overlap, batch)
    if h <= tile and w <= tile:
        return units
    return units * (1 + (groupnorms if norm_stats == "exact" else 0))


def _check_vae(vae: nn.Module) -> None:
    for path in ("encoder.conv_in", "encoder.down_blocks", "encoder.mid_block", "encoder.conv_norm_out",
                 "decoder.conv_in", "decoder.mid_block", "decoder.up_blocks", "decoder.conv_norm_out", "config"):
        obj = vae
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is None:
            raise ValueError(f"vae must be a diffusers AutoencoderKL (it has no {path}), got {type(vae).__name__}")


@torch.no_grad()
def tiled_encode(
    vae: nn.Module,
    x: torch.Tensor,
    tile_px: int = 1024,
    overlap_px: int = 128,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    norm_stats: NormStats = "estimate",
    batch_tiles: int = 1,
    with_std: bool = False,
    global_mid: bool = True,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode images ``x`` (B, 3, H, W) in [-1, 1] tile by tile → the latent distribution's mean
    (= mode), unscaled (no ``scaling_factor``), (B, C, H/f, W/f).

    ``transform``: applied to each tile (and to the downscaled copy the GroupNorm statistics come
    from) just before the encoder, e.g. float [0, 1] → the VAE's dtype in [-1, 1]; ``x`` is then in
    the range and dtype ``transform`` expects, and the full-size encoder input is never made.

    H, W, ``tile_px`` and ``overlap_px`` must be multiples of the VAE factor f (8 for SD).
    With ``global_mid`` (default) only the full-resolution part (``conv_in`` + down blocks) runs in
    tiles, blended in latent space with Gaussian weights; the mid block (with its self-attention),
    ``conv_out`` and ``quant_conv`` then run once on the blended latent-resolution features, so the
    attention stays global. ``global_mid=False`` tiles the whole encoder (bounded memory for any
    size, local attention). GroupNorm statistics per ``norm_stats`` (module docstring). With
    ``with_std`` returns ``(mean, std)``, std from the log-variance (for ``latent="sample"``).
    An image that fits one tile is encoded once, untiled (exact).
    """
    _check_vae(vae)
    f = vae_factor(vae)
    check_tile_args(tile_px, overlap_px, "tile_px", "overlap_px")
    if tile_px % f or overlap_px % f:
        raise ValueError(f"tile_px and overlap_px must be multiples of the VAE factor {f}, got {tile_px}, {overlap_px}")
    if x.ndim != 4 or x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"x must be (B, C, H, W) with H, W multiples of {f}, got {tuple(x.shape)}")
    enc = vae.encoder
    quant = getattr(vae, "quant_conv", None) or nn.Identity()
    prep = transform or (lambda t: t)

    def head(t: torch.Tensor) -> torch.Tensor:
        t = enc.conv_in(prep(t))
        for block in enc.down_blocks:
            t = block(t)
        return t

    def tail(t: torch.Tensor) -> torch.Tensor:
        return quant(enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(t)))))

    def downscale(t: torch.Tensor) -> torch.Tensor:
        size = _fit_size(t.shape[-2], t.shape[-1], tile_px, f)
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)

    H, W = x.shape[-2:]
    if H <= tile_px and W <= tile_px:
        ticker = Progress(progress, cancel, x.shape[0])
        ticker.check()
        moments = quant(enc(prep(x)))
        ticker.advance(x.shape[0])
    elif global_mid:
        part = nn.ModuleList([enc.conv_in, *enc.down_blocks])
        features = _run_vae_tiled(part, head, x, tile_px, overlap_px, Fraction(1, f), downscale,
                                  norm_stats, batch_tiles, progress, cancel, sigma_scale)
        moments = tail(features)
    else:
        moments = _run_vae_tiled(enc, lambda t: quant(enc(prep(t))), x, tile_px, overlap_px, Fraction(1, f), downscale,
                                 norm_stats, batch_tiles, progress, cancel, sigma_scale)
    mean, logvar = moments.chunk(2, dim=1)
    if with_std:
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean


@torch.no_grad()
def tiled_decode(
    vae: nn.Module,
    z: torch.Tensor,
    tile_latent: int = 224,
    overlap_latent: int = 32,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    norm_stats: NormStats = "estimate",
    batch_tiles: int = 1,
    global_mid: bool = True,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
) -> torch.Tensor:
    """Decode unscaled latents ``z`` (B, C, h, w) tile by tile → images (B, 3, f·h, f·w) in about
    [-1, 1] (not clamped, like ``vae.decode``).

    With ``global_mid`` (default) ``post_quant_conv``, ``conv_in`` and the mid block (with its
    self-attention) run once on the whole latent — cheap, at latent resolution — and only the up
    blocks and ``conv_out`` (where the memory goes) run in tiles of ``tile_latent`` latent pixels
    overlapping by ``overlap_latent``, blended in pixel space with Gaussian weights.
    ``global_mid=False`` tiles the whole decoder. GroupNorm statistics per ``norm_stats`` (module
    docstring). A latent that fits one tile is decoded once, untiled (exact), in the decoder's
    dtype; tiled, the result is the float32 blend itself (no copy in a lower precision), stored in
    NHWC order so that an (H, W, C) view of it is contiguous.
    """
    _check_vae(vae)
    f = vae_factor(vae)
    check_tile_args(tile_latent, overlap_latent, "tile_latent", "overlap_latent")
    if z.ndim != 4:
        raise ValueError(f"z must have shape (B, C, h, w), got {tuple(z.shape)}")
    dec = vae.decoder
    post_quant = getattr(vae, "post_quant_conv", None) or nn.Identity()

    def tail(t: torch.Tensor) -> torch.Tensor:
        for block in dec.up_blocks:
            t = block(t, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(t)))

    def downscale(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=_fit_size(t.shape[-2], t.shape[-1], tile_latent), mode="nearest")

    h, w = z.shape[-2:]
    if h <= tile_latent and w <= tile_latent:
        ticker = Progress(progress, cancel, z.shape[0])
        ticker.check()
        out = dec(post_quant(z))
        ticker.advance(z.shape[0])
        return out
    if global_mid:
        features = dec.mid_block(dec.conv_in(post_quant(z)), None)
        part = nn.ModuleList([*dec.up_blocks, dec.conv_norm_out])
        return _run_vae_tiled(part, tail, features, tile_latent, overlap_latent, Fraction(f), downscale,
                              norm_stats, batch_tiles, progress, cancel, sigma_scale, torch.float32, True)
    return _run_vae_tiled(dec, lambda t: dec(post_quant(t)), z, tile_latent, overlap_latent, Fraction(f), downscale,
                          norm_stats, batch_tiles, progress, cancel, sigma_scale, torch.float32, True)
