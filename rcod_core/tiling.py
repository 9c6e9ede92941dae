"""Tiles for any size: a tile grid, Gaussian blend weights, and tiled application of any
``fn(tiles, boxes) -> tensor`` — the latent UNet pass and the VAE alike.

Grid (:func:`tile_starts`, :func:`tile_grid`): tiles of ``tile`` pixels (the whole side where it
is shorter), stride ``tile − overlap``, the last tile flush with the end, so every tile has the
same size and the union covers the image exactly. The last stride may be shorter (more overlap).

Blending (:func:`tiled_apply`): every output pixel is ``Σ_k w_k(p) f_k(p) / Σ_k w_k(p)`` with the
Gaussian weights of the bases (:func:`gaussian_weights`). For a pointwise ``fn`` each ``f_k(p)``
is the same number, so tiled == untiled up to float rounding.

The VAE's tiled encode and decode (with whole-image GroupNorm statistics) build on this in
:mod:`rcod_core.vae_tiling`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Iterable, Optional, Sequence

import torch

from .devices import memory_format_of, trim_cpu_heap
from .progress import CancelFn, Progress, ProgressFn

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end exclusive
TileFn = Callable[[torch.Tensor, Sequence[Box]], torch.Tensor]

#: σ of the blend Gaussian as a fraction of the tile side: the bases' var = 0.01 → σ = 0.1
DEFAULT_SIGMA_SCALE = 0.1


# -- grid ------------------------------------------------------------------------------------------
def check_tile_args(tile: int, overlap: int, tile_name: str = "tile", overlap_name: str = "overlap") -> None:
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"{tile_name} must be a positive integer, got {tile!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not (0 <= overlap < tile):
        raise ValueError(f"{overlap_name} must be an integer with 0 <= {overlap_name} < {tile_name} ({tile}), got {overlap!r}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` pixels.

    Stride ``tile − overlap``; the last tile ends exactly at ``length``. One tile at 0 when
    ``length <= tile``. Raises ``ValueError`` unless ``tile > overlap >= 0`` and ``length >= 1``.
    """
    check_tile_args(tile, overlap)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)
    return starts


def tile_grid(h: int, w: int, tile: int, overlap: int) -> list[Box]:
    """Tiles ``(y0, y1, x0, x1)`` covering an ``h × w`` image, row by row; all of one size,
    ``min(tile, h) × min(tile, w)``."""
    th, tw = min(tile, h), min(tile, w)
    return [(y, y + th, x, x + tw) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]


def count_tiles(h: int, w: int, tile: int, overlap: int, batch: int = 1) -> int:
    """How many tiles :func:`tiled_apply` runs (the ``total`` its ``progress`` reports)."""
    return batch * len(tile_grid(h, w, tile, overlap))


def tile_units(h: int, w: int, tile: int, overlap: int, batch: int = 1) -> int:
    """The progress units :func:`tiled_apply` reports: one per tile, or one per image that fits a tile."""
    return batch if h <= tile and w <= tile else count_tiles(h, w, tile, overlap, batch)


def _owned_ranges(starts: Sequence[int], size: int, length: int) -> list[tuple[int, int]]:
    """Split [0, length) among tiles: each owns the part nearer its centre than its neighbours'
    (boundaries at the midpoints of the overlaps), as offsets within the tile."""
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        bounds.append((b + a + size) // 2)  # midpoint of the overlap [b, a + size)
    bounds.append(length)
    return [(lo - s, hi - s) for s, lo, hi in zip(starts, bounds[:-1], bounds[1:])]


def owned_boxes(h: int, w: int, tile: int, overlap: int) -> dict[Box, Box]:
    """For each tile of :func:`tile_grid`, the part of it that it owns, within-tile ``(y0, y1, x0, x1)``;
    the owned parts partition the image (each pixel belongs to exactly one tile)."""
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    ry, rx = _owned_ranges(ys, min(tile, h), h), _owned_ranges(xs, min(tile, w), w)
    return {(y, y + min(tile, h), x, x + min(tile, w)): ry[i] + rx[j] for i, y in enumerate(ys) for j, x in enumerate(xs)}


# -- weights ---------------------------------------------------------------------------------------
def gaussian_axis(n: int, sigma_scale: float = DEFAULT_SIGMA_SCALE) -> torch.Tensor:
    """1-D blend weights (n,), float64: ``exp(−(x − m)² / n² / (2 var)) / sqrt(2π var)`` with
    ``m = (n − 1)/2`` and ``var = sigma_scale²``; :func:`gaussian_weights` is the outer product of two."""
    if n < 1:
        raise ValueError(f"tile size must be positive, got {n}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    var = float(sigma_scale) ** 2
    x = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)


def gaussian_weights(
    th: int,
    tw: int,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """2-D blend weights (th, tw): outer product of 1-D Gaussians centred on the tile.

    As in OSEDiff/S3Diff's ``_gaussian_weights``: ``exp(−(x − m)² / n² / (2 var)) / sqrt(2π var)``
    with ``m = (n − 1)/2`` and ``var = sigma_scale²`` (0.01 there), i.e. σ = ``sigma_scale`` × side.
    Unlike there, both axes use the centred midpoint ``(n − 1)/2`` (OSEDiff's y axis uses ``n/2``).
    Strictly positive everywhere (edge weight ≈ 3.7e-6 at the default), so a normalised blend is
    defined at every covered pixel.
    """
    if th < 1 or tw < 1:
        raise ValueError(f"tile size must be positive, got ({th}, {tw})")
    return torch.outer(gaussian_axis(th, sigma_scale), gaussian_axis(tw, sigma_scale)).to(device=device, dtype=dtype)


# -- blending engine -------------------------------------------------------------------------------
def _scaled(v: int, scale: Fraction, what: str) -> int:
    s = v * scale
    if s.denominator != 1:
        raise ValueError(f"{what} {v} does not map to a whole number at scale {scale}")
    return int(s)


def _axis_sums(spans: Sequence[tuple[int, int]], length: int, axis: torch.Tensor) -> torch.Tensor:
    """Σ of the 1-D weights ``axis`` placed at each span (start, end) of a side of ``length``, float64."""
    total = torch.zeros(length, dtype=torch.float64)
    for a, b in spans:
        total[a:b] += axis
    return total


def blend_tiles(
    fn: TileFn,
    image: torch.Tensor,
    boxes: Sequence[Box],
    scale: Fraction,
    batch_tiles: int,
    ticker: Progress,
    sigma_scale: float,
    out_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Run ``fn`` on the tiles of one image (1, C, H, W) in batches and blend → (1, C', H·s, W·s).

    The only full-size buffer is the float32 accumulator, which becomes the output in place. On a
    grid of tiles (:func:`tile_grid`: every row span meets every column span) the weight sum is the
    product of one sum per row and one per column (the weights are outer products), so it costs two
    vectors instead of a second image. ``out_dtype``: the result's dtype (default: what ``fn``
    returns; float32 returns the accumulator itself, with no copy). ``channels_last``: the
    accumulator in NHWC order, so an (H, W, C) view of the result is contiguous."""
    H, W = image.shape[-2:]
    out_h, out_w = _scaled(H, scale, "height"), _scaled(W, scale, "width")
    acc: Optional[torch.Tensor] = None
    y0, y1, x0, x1 = boxes[0]
    th, tw = _scaled(y1 - y0, scale, "tile height"), _scaled(x1 - x0, scale, "tile width")
    wy, wx = gaussian_axis(th, sigma_scale), gaussian_axis(tw, sigma_scale)
    weights = torch.outer(wy, wx).to(device=image.device, dtype=torch.float32)
    out_boxes = [tuple(_scaled(v, scale, "tile offset") for v in box) for box in boxes]
    rows, cols = sorted({b[:2] for b in out_boxes}), sorted({b[2:] for b in out_boxes})
    separable = len(set(out_boxes)) == len(out_boxes) == len(rows) * len(cols)
    wsum: Optional[torch.Tensor] = None
    if not separable:  # boxes that are not a grid: one weight sum per pixel
        wsum = torch.zeros(out_h, out_w, device=image.device, dtype=torch.float32)
    for i in range(0, len(boxes), batch_tiles):
        ticker.check()
        chunk = boxes[i : i + batch_tiles]
        tiles = torch.cat([image[..., a:b, c:d] for a, b, c, d in chunk])
        result = fn(tiles, chunk)
        if result.ndim != 4 or result.shape[0] != len(chunk) or tuple(result.shape[-2:]) != (th, tw):
            raise ValueError(
                f"fn must return ({len(chunk)}, C', {th}, {tw}) for tiles of shape {tuple(tiles.shape)}, "
                f"got {tuple(result.shape)}"
            )
        if acc is None:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            acc = torch.empty((1, result.shape[1], out_h, out_w), device=image.device, dtype=torch.float32,
                              memory_format=fmt).zero_()
            out_dtype = out_dtype or result.dtype
        for tile_out, (a, b, c, d) in zip(result, out_boxes[i : i + batch_tiles]):
            acc[0, :, a:b, c:d] += tile_out.float() * weights
            if wsum is not None:
                wsum[a:b, c:d] += weights
        del result, tiles
        if image.device.type == "cpu":
            trim_cpu_heap()  # a no-op unless a CPU memory budget bounded the heap
        ticker.advance(len(chunk))
    if wsum is not None:
        acc.div_(wsum)
    else:  # in place, row sums then column sums: no full-size temporary
        acc.div_(_axis_sums(rows, out_h, wy).to(acc.device, torch.float32)[:, None])
        acc.div_(_axis_sums(cols, out_w, wx).to(acc.device, torch.float32))
    return acc.to(out_dtype)


def _tiled(
    fn: TileFn,
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: Fraction,
    batch_tiles: int,
    progress: ProgressFn,
    cancel: CancelFn,
    sigma_scale: float,
) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not isinstance(batch_tiles, int) or batch_tiles < 1:
        raise ValueError(f"batch_tiles must be a positive integer, got {batch_tiles!r}")
    B, _, H, W = x.shape
    boxes = tile_grid(H, W, tile, overlap)
    ticker = Progress(progress, cancel, B * len(boxes))
    return stack_samples((blend_tiles(fn, x[b : b + 1], boxes, scale, batch_tiles, ticker, sigma_scale)
                          for b in range(B)), B)


def stack_samples(results: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """Per-sample results (1, ...) → one (count, ...) tensor, each written into place as it comes
    (``torch.cat`` of a list would hold every result and the output at once); a batch of one is
    returned as it is, with no copy of a full-size output."""
    results = iter(results)
    first = next(results, None)
    if first is None:
        raise ValueError("stack_samples got no results")
    if count == 1:
        return first
    buf = torch.empty((count, *first.shape[1:]), dtype=first.dtype, device=first.device,
                      memory_format=memory_format_of(first))  # the samples' layout
    buf[:1] = first
    del first
    for i, r in enumerate(results, 1):
        buf[i : i + 1] = r
    return buf


def tiled_apply(
    fn: TileFn,
    x: torch.Tensor,
    tile: int,
    overlap: int,
    batch_tiles: int = 4,
    progress: ProgressFn = None,
    cancel: CancelFn = None,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
) -> torch.Tensor:
    """Apply ``fn`` tile by tile to ``x`` (B, C, H, W) and blend with Gaussian weights → (B, C', H, W).

    ``fn(tiles, boxes)`` gets up to ``batch_tiles`` tiles of one image, (n, C, th, tw), with their
    boxes ``(y0, y1, x0, x1)``, and returns (n, C', th, tw). When the image fits in one tile ``fn``
    runs once on the whole ``x`` (boxes: the full image per sample) — exactly the untiled result.
    ``progress(done, total)`` counts tiles (total = :func:`count_tiles`), called after each batch;
    ``cancel()`` is checked before each batch and raises :class:`Cancelled` when True.
    """
    check_tile_args(tile, overlap)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    B, _, H, W = x.shape
    if H <= tile and W <= tile:
        ticker = Progress(progress, cancel, B)
        ticker.check()
        out = fn(x, [(0, H, 0, W)] * B)
        ticker.advance(B)
        return out
    return _tiled(fn, x, tile, overlap, Fraction(1), batch_tiles, progress, cancel, sigma_scale)


