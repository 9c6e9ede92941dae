"""Measured activation memory of each pipeline stage, for the tile planner (:mod:`rcod_core.memory`).

:class:`LiveTensorBytes` is a ``TorchDispatchMode`` that adds up the storage of every tensor an
operator creates inside it and subtracts it once that storage is freed, so its ``peak`` is the
largest amount of activation memory alive at once — on any device, independent of the allocator
(the weights and inputs, made outside, are not counted). :func:`measure_stage_costs` runs the
encoder, one UNet pass and the decoder of a pipeline at two small sizes under it and fits
``bytes = fixed + per_px × pixels`` per stage, in the pipeline's own precisions and attention
kernels. The plan then follows from the model actually loaded instead of SD 2.1 estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: latent sides of the two probes (output sides × the VAE factor): small enough to run in
#: seconds on a CPU with SD 2.1, large enough that per-pixel costs dominate
PROBE_LATENT_SIDES = (16, 32)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    for leaf in tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(st.device), st.data_ptr())


class LiveTensorBytes(TorchDispatchMode):
    """Storage bytes created inside the mode and still alive (``current``) and their maximum (``peak``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[str, int], tuple[StorageWeakRef, int]] = {}
        self.external: set[tuple[str, int]] = set()
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            if t.device.type != "meta":
                key = _key(t)
                if key not in self.live:
                    self.external.add(key)  # made outside (weights, inputs): views of it are not new memory
        out = func(*args, **kwargs)
        self._sweep()
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            key = _key(t)
            if key in self.live or key in self.external:
                continue  # in place, or a view
            st = t.untyped_storage()
            self.live[key] = (StorageWeakRef(st), st.nbytes())
            self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The peak of activation memory alive at once while ``fn()`` runs (its result is dropped)."""
    with torch.no_grad(), LiveTensorBytes() as mode:
        result = fn()
        del result
    return mode.peak


@dataclass(frozen=True)
class LinearCost:
    """``fixed + per_px × pixels`` bytes."""

    fixed: float
    per_px: float

    def __call__(self, pixels: float) -> float:
        return self.fixed + self.per_px * pixels

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> "LinearCost":
        """Through two (pixels, bytes) points; never negative."""
        (p1, b1), (p2, b2) = points
        per_px = max(0.0, (b2 - b1) / (p2 - p1))
        return cls(max(0.0, b1 - per_px * p1), per_px)


@dataclass(frozen=True)
class StageCosts:
    """Measured activation bytes of each stage of one pipeline (see :func:`measure_stage_costs`).

    ``unet``: one UNet pass, per latent pixel. ``encode`` / ``decode``: the whole VAE encoder /
    decoder, per image pixel (their full-resolution part is what runs in tiles). ``encode_global`` /
    ``decode_global``: the part that tiled VAE calls run once on the whole latent (the mid block with
    its self-attention, and the convolutions around it), per latent pixel. The encoder's includes
    the blended features that part starts from: their float32 accumulator while the tiles run, then
    its copy in the VAE's dtype (alive through the mid block).
    """

    unet: LinearCost
    encode: LinearCost
    decode: LinearCost
    encode_global: LinearCost
    decode_global: LinearCost


def measure_stage_costs(pipe, sides: tuple[int, int] = PROBE_LATENT_SIDES) -> StageCosts:
    """Run each stage of ``pipe`` (an :class:`~rcod_core.pipeline.RCODPipeline`) at two latent sizes
    under :class:`LiveTensorBytes` and fit its cost; a few seconds on a CPU at SD 2.1 size.

    An RCOD_S model is conditioned on a grey probe image: callers select their batch's state again
    before they run it (``prepare`` plans before it conditions; ``denoise_prepared`` selects)."""
    model, vae = pipe.model, pipe.vae
    f = pipe.latent_factor
    if model.conditioning is not None:  # RCOD_S: its LoRA matrices come from an LR image's degradation
        pipe.select_sample(pipe.condition(torch.full((1, 3, 64, 64), 0.5, device=pipe.device)), None)
    channels = int(vae.config.latent_channels)
    device, vae_dtype = pipe.device, pipe.vae_dtype
    tokens = pipe.prompt(torch.full((1, 3, 224, 224), 0.5, device=device))
    t = torch.full((1,), 500, dtype=torch.int64)
    enc, dec = vae.encoder, vae.decoder
    post_quant = getattr(vae, "post_quant_conv", None) or torch.nn.Identity()
    enc_channels = enc.mid_block.resnets[0].in_channels
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in ("unet", "encode", "decode", "eg", "dg")}
    for side in sides:
        lat = side * side
        px = lat * f * f
        image = torch.full((1, 3, side * f, side * f), 0.5, device=device)
        z = torch.zeros(1, channels, side, side, device=device)
        feats = torch.zeros(1, enc_channels, side, side, device=device, dtype=vae_dtype)
        z_vae = z.to(vae_dtype)
        points["encode"].append((px, peak_bytes(lambda: model.encode(image))))
        points["unet"].append((lat, peak_bytes(lambda: model.denoise(z, tokens, t))))
        points["decode"].append((px, peak_bytes(lambda: model.decode(z))))
        tail = peak_bytes(lambda: enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(feats)))))
        blended = feats.numel() * 4  # the float32 accumulator, alive until its copy in feats' dtype is made
        points["eg"].append((lat, feats.numel() * feats.element_size() + max(blended, tail)))
        points["dg"].append((lat, peak_bytes(lambda: dec.mid_block(dec.conv_in(post_quant(z_vae)), None))))
    fit = {k: LinearCost.fit(v) for k, v in points.items()}
    return StageCosts(fit["unet"], fit["encode"], fit["decode"], fit["eg"], fit["dg"])
