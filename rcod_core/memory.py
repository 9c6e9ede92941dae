"""How big the tiles may be: a per-pixel activation cost model and a memory budget → a :class:`TilePlan`.

Cost model (activation memory only; weights are already resident). Numbers are *elements* per
pixel, multiplied by the bytes of the dtype; estimated for Stable Diffusion 2.1 in fp16 from
commonly reported peaks, rounded up, not measured here:

* VAE decode peaks at about 2.5–3 GB at 512² output: 2.75e9 B / 512² px / 2 B ≈ 5,250 elements
  per *output* pixel (several 128–256-channel full-resolution tensors alive at once plus the
  convolution workspace). It is the largest cost per pixel and the usual cause of OOM.
* VAE encode: the encoder has 2 rather than 3 ResNets per level; taken as ~3,800 elements per
  *input* pixel (≈ 2 GB at 512²).
* UNet: about 0.5 GB at a 64² latent in fp16 with PyTorch SDPA (memory linear in tokens):
  0.5e9 B / 64² / 2 B ≈ 61,000 elements per *latent* pixel.

The budget is the free memory (``torch.cuda.mem_get_info`` on CUDA; available RAM from
``os.sysconf`` on CPU), times :data:`SAFETY`. Tiles are multiples of :data:`LATENT_QUANTUM` latent
pixels so the UNet's downsamplings stay exact. Too small a budget still gets the smallest tiles
(:data:`MIN_LATENT_TILE`); they may then not fit.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .colour import in_place_fix_bytes

if TYPE_CHECKING:
    from .memprobe import StageCosts

#: activation elements per latent pixel for one UNet pass (SD 2.1, SDPA attention)
UNET_ELEMENTS_PER_LATENT_PX = 61_000
#: activation elements per output pixel for the VAE decoder (SD 2.1 VAE)
VAE_DECODE_ELEMENTS_PER_PX = 5_250
#: activation elements per input pixel for the VAE encoder (SD 2.1 VAE)
VAE_ENCODE_ELEMENTS_PER_PX = 3_800
#: fraction of the free memory a plan may use (allocator fragmentation, CLIP, the images)
SAFETY = 0.8
#: tile sides are multiples of this many latent pixels (the UNet downsamples 8×)
LATENT_QUANTUM = 8
MIN_LATENT_TILE = 32
#: overlap as a fraction of the tile (the bases: 32 of 96 latent, i.e. 1/3)
OVERLAP_FRACTION = 1 / 3
#: CPU budget when the free RAM cannot be read
CPU_FALLBACK_BUDGET = 16 * 2**30
#: full-size float32 buffers alive beside the tiles, bytes per output pixel (the pipeline's own):
#: encode — the upscaled LR (3 channels; the VAE's input is made tile by tile from it); decode —
#: the output accumulator (3; its weight sums are one vector per side), plus the upscaled LR (3)
#: while decoding when a colour fix needs it
ENCODE_BUFFER_BYTES_PER_PX = 12
DECODE_BUFFER_BYTES_PER_PX = 12
REFERENCE_BYTES_PER_PX = 12
#: UNet tiles run together in one batch (the pipeline's tiled UNet pass)
UNET_BATCH_TILES = 4
#: the UNet's whole-latent buffers beside its tiles (z_L, the blended z_H, weights), per latent pixel
UNET_BUFFER_BYTES_PER_LATENT_PX = 64
#: share of the budget a plan from measured costs may use (allocator overhead, operator workspaces
#: that live inside one operator and are not seen by the measurement)
MEASURED_MARGIN = 0.85


@dataclass(frozen=True)
class TilePlan:
    """Tile sizes per stage; ``None`` = untiled. Sizes in the units of the stage's tiling call."""

    latent_tile: Optional[int] = None  # UNet, latent pixels (tiled_apply tile)
    latent_overlap: int = 0
    vae_encode_tile_px: Optional[int] = None  # tiled_encode tile_px, image pixels
    vae_encode_overlap_px: int = 0
    vae_decode_tile_latent: Optional[int] = None  # tiled_decode tile_latent, latent pixels
    vae_decode_overlap_latent: int = 0
    #: the VAE's mid block (self-attention) once on the whole latent (True), or inside each tile
    #: (False: bounded memory for any size, attention local to the tile)
    vae_global_mid: bool = True

    @property
    def tiled(self) -> bool:
        return any(t is not None for t in (self.latent_tile, self.vae_encode_tile_px, self.vae_decode_tile_latent))


def free_memory(device: torch.device | str | None = None) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM on CPU."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return CPU_FALLBACK_BUDGET


def _largest_tile(h: int, w: int, max_area: float, quantum: int, minimum: int) -> Optional[int]:
    """None if the whole h × w fits in ``max_area``; else the largest tile (multiple of ``quantum``,
    at least ``minimum``) whose tiles, ``min(t, h) × min(t, w)``, fit."""
    return _fit_tile(h, w, h * w, lambda t: min(t, h) * min(t, w), max_area, quantum, minimum)


def _overlap(tile: Optional[int], quantum: int) -> int:
    if tile is None:
        return 0
    return min(tile - quantum, max(quantum, quantum * round(tile * OVERLAP_FRACTION / quantum)))


def _plan(unet: Optional[int], encode: Optional[int], decode: Optional[int], latent_factor: int,
          global_mid: bool = True) -> TilePlan:
    """A :class:`TilePlan` from each stage's latent tile side (None: untiled), with the overlaps."""
    q, f = LATENT_QUANTUM, latent_factor
    return TilePlan(
        latent_tile=unet,
        latent_overlap=_overlap(unet, q),
        vae_encode_tile_px=None if encode is None else encode * f,
        vae_encode_overlap_px=_overlap(encode, q) * f,
        vae_decode_tile_latent=decode,
        vae_decode_overlap_latent=_overlap(decode, q),
        vae_global_mid=global_mid,
    )


def choose_tile(
    out_h: int,
    out_w: int,
    budget: Optional[int] = None,
    dtype_bytes: int = 2,
    device: torch.device | str | None = None,
    latent_factor: int = 8,
    unet_elements: float = UNET_ELEMENTS_PER_LATENT_PX,
    vae_decode_elements: float = VAE_DECODE_ELEMENTS_PER_PX,
    vae_encode_elements: float = VAE_ENCODE_ELEMENTS_PER_PX,
    vae_dtype_bytes: Optional[int] = None,
) -> TilePlan:
    """Plan tiles for an ``out_h × out_w`` output so each stage's activations fit ``budget`` bytes.

    ``budget=None`` reads :func:`free_memory` of ``device`` (× :data:`SAFETY`). Each stage is
    checked on its own (they run one after another): untiled when the whole image fits, else the
    largest tile that fits, never larger than the image. Smaller budget → tiles no larger.
    ``dtype_bytes`` prices the UNet, ``vae_dtype_bytes`` (default: the same) the VAE, which an fp16
    pipeline of SD 2.1 / SD-Turbo runs in bf16 or, where the device lacks bf16, fp32 (``force_upcast``).
    """
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got ({out_h}, {out_w})")
    vae_dtype_bytes = dtype_bytes if vae_dtype_bytes is None else vae_dtype_bytes
    for name, value in (("dtype_bytes", dtype_bytes), ("vae_dtype_bytes", vae_dtype_bytes)):
        if value not in (1, 2, 4, 8):
            raise ValueError(f"{name} must be 1, 2, 4 or 8, got {value!r}")
    if budget is None:
        budget = int(free_memory(device) * SAFETY)
    if budget <= 0:
        raise ValueError(f"budget must be positive bytes, got {budget!r}")
    f = latent_factor
    lh, lw = math.ceil(out_h / f), math.ceil(out_w / f)
    q = LATENT_QUANTUM
    unet = _largest_tile(lh, lw, budget / (unet_elements * dtype_bytes), q, MIN_LATENT_TILE)
    # VAE decode: the cost is per output pixel = latent pixel × f²
    dec = _largest_tile(lh, lw, budget / (vae_decode_elements * vae_dtype_bytes * f * f), q, MIN_LATENT_TILE)
    enc_lat = _largest_tile(lh, lw, budget / (vae_encode_elements * vae_dtype_bytes * f * f), q, MIN_LATENT_TILE)
    return _plan(unet, enc_lat, dec, f)


def _fit_tile(h: int, w: int, whole: float, tile: Callable[[int], float], budget: float,
              quantum: int = LATENT_QUANTUM, minimum: int = MIN_LATENT_TILE) -> Optional[int]:
    """None if the whole h × w latent (costing ``whole``) fits ``budget``; else the largest square
    tile side t (multiple of ``quantum``, at least ``minimum``) with ``tile(t)`` within it."""
    if whole <= budget:
        return None
    t = quantum * math.ceil(max(h, w) / quantum)
    while t > minimum:
        if tile(t) <= budget:
            return t
        t -= quantum
    return minimum


def plan_from_costs(out_h: int, out_w: int, costs: "StageCosts", budget: int, latent_factor: int = 8,
                    reference: bool = False) -> TilePlan:
    """A :class:`TilePlan` from a pipeline's measured :class:`~rcod_core.memprobe.StageCosts`: each
    stage untiled when its whole-image cost fits ``budget`` × :data:`MEASURED_MARGIN`, else the
    largest tiles whose cost — the tiles run at once (:data:`UNET_BATCH_TILES` for the UNet), what
    the tiled call runs once on the whole latent, and the full-size buffers beside them — fits.
    Where even the smallest tiles do not fit beside the whole-latent VAE mid block, the mid block
    runs inside the tiles (``vae_global_mid=False``): memory then stays bounded for any size.
    ``reference``: the upscaled LR stays alive for a colour fix, which then runs in place on the
    output in strips (:func:`~rcod_core.colour.in_place_fix_bytes`). A budget below what the smallest
    tiles and the full-size buffers need gets those smallest tiles and a ``RuntimeWarning``."""
    from .tiling import tile_grid

    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got ({out_h}, {out_w})")
    if budget <= 0:
        raise ValueError(f"budget must be positive bytes, got {budget!r}")
    f, q = latent_factor, LATENT_QUANTUM
    lh, lw = math.ceil(out_h / f), math.ceil(out_w / f)
    lat, px = lh * lw, lh * lw * f * f
    b = budget * MEASURED_MARGIN

    def area(t: int) -> int:
        return min(t, lh) * min(t, lw)

    def unet_tile(t: int) -> float:
        at_once = min(UNET_BATCH_TILES, len(tile_grid(lh, lw, t, _overlap(t, q))))
        return at_once * costs.unet(area(t)) + UNET_BUFFER_BYTES_PER_LATENT_PX * lat

    unet = _fit_tile(lh, lw, costs.unet(lat), unet_tile, b)
    dec_buffers = (DECODE_BUFFER_BYTES_PER_PX + (REFERENCE_BYTES_PER_PX if reference else 0)) * px
    enc_buffers = ENCODE_BUFFER_BYTES_PER_PX * px

    def dec_tile(t: int, whole_latent_part: float) -> float:
        return costs.decode(area(t) * f * f) + whole_latent_part + dec_buffers

    def enc_tile(t: int, whole_latent_part: float) -> float:
        return costs.encode(area(t) * f * f) + whole_latent_part + enc_buffers

    # the whole-latent mid block when it fits beside the smallest tiles (global attention), else in the tiles
    m = MIN_LATENT_TILE
    global_mid = max(dec_tile(m, costs.decode_global(lat)), enc_tile(m, costs.encode_global(lat))) <= b
    g_dec, g_enc = (costs.decode_global(lat), costs.encode_global(lat)) if global_mid else (0.0, 0.0)
    upscaled_lr = REFERENCE_BYTES_PER_PX * px  # alive while encoding; while decoding only for a colour fix
    dec = _fit_tile(lh, lw, costs.decode(px) + (upscaled_lr if reference else 0), lambda t: dec_tile(t, g_dec), b)
    enc = _fit_tile(lh, lw, costs.encode(px) + upscaled_lr, lambda t: enc_tile(t, g_enc), b)
    least = max(dec_tile(m, g_dec), enc_tile(m, g_enc), unet_tile(m))
    if reference:  # the colour fix, after the decode: output, upscaled LR and its strips
        least = max(least, dec_buffers + in_place_fix_bytes(out_w))
    if least > b:
        warnings.warn(f"a memory budget of {budget / 2**20:.0f} MB cannot hold a {out_w}x{out_h} output: the "
                      f"smallest tiles and the full-size buffers need about {least / MEASURED_MARGIN / 2**20:.0f} MB; "
                      f"running with the smallest tiles", RuntimeWarning, stacklevel=3)
    return _plan(unet, enc, dec, f, global_mid or (dec is None and enc is None))
