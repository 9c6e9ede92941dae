"""What would stop a function from being captured as one CUDA graph, found on any device.

A CUDA graph records the kernels a call launches and replays them without the host. Three kinds
of operation break a capture (CUDA raises, or ``torch.compile``'s CUDA graphs split around them):

* **host reads**: a device value read back to Python (``.item()``, ``bool(t)``, ``.tolist()``,
  ``torch.equal``) or an output whose shape depends on values (``nonzero``, ``masked_select``,
  ``unique``): the host has to wait for the device;
* **host copies**: a tensor made on the CPU and copied to the device inside the call (a Python
  list turned into a tensor, a CPU lookup table) — a pageable copy is not allowed while capturing;
* anything in between that changes with the inputs' values rather than their shapes.

:class:`CaptureHazards` is a ``TorchDispatchMode`` that records the first two, operator by
operator. Run on the ``meta`` device (modules and inputs moved there: shapes only, no data), a
call also fails at any value read the mode does not know, which makes it a CPU-side check of a
forward meant for CUDA graphs (:func:`capture_hazards`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from .model import RCODModel
    from .schedule import X0Mode

_aten = torch.ops.aten

#: operators that read device values back to the host (their results live in Python or their
#: output shape depends on the data)
HOST_READS = frozenset({
    _aten._local_scalar_dense, _aten.equal, _aten.is_nonzero, _aten.nonzero, _aten.nonzero_static,
    _aten.masked_select, _aten._unique2, _aten.unique_consecutive, _aten.unique_dim,
    _aten.repeat_interleave,
})


class CaptureHazards(TorchDispatchMode):
    """Records each host read and each CPU→device copy made while the mode is active.

    ``hazards`` lists ``"<operator>: <why>"`` in call order; ``raise_on_first`` makes the first one
    a ``RuntimeError`` instead (with Python's traceback pointing at the caller)."""

    def __init__(self, raise_on_first: bool = False) -> None:
        super().__init__()
        self.raise_on_first = raise_on_first
        self.hazards: list[str] = []

    def _found(self, func, why: str) -> None:
        text = f"{func}: {why}"
        self.hazards.append(text)
        if self.raise_on_first:
            raise RuntimeError(f"not capturable as a CUDA graph: {text}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in HOST_READS:
            self._found(func, "reads device values back to the host")
        elif packet in (_aten.index, _aten.index_put, _aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
            self._found(func, "indexes with a mask: its size reads device values back to the host")
        elif packet is _aten._to_copy:
            source = args[0].device
            target = kwargs.get("device")
            if target is not None and source.type == "cpu" and torch.device(target).type != "cpu":
                self._found(func, f"copies a CPU tensor of shape {tuple(args[0].shape)} to {target}")
        elif packet is _aten.copy_:
            dst, src = args[0], args[1]
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self._found(func, f"copies a CPU tensor of shape {tuple(src.shape)} into {dst.device}")
        return func(*args, **kwargs)


def capture_hazards(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Call ``fn(*args, **kwargs)`` under :class:`CaptureHazards` (no gradients); returns its result and
    the hazards found. An empty list on ``meta`` inputs and modules means the call launches only
    device work that depends on its inputs' shapes, what one CUDA graph per input shape needs."""
    mode = CaptureHazards()
    with torch.no_grad(), mode:
        out = fn(*args, **kwargs)
    return out, mode.hazards


def _unet_slot(model: "RCODModel"):
    """The guided LoRA's matrix slot the UNet reads (RCOD_S / S3Diff), or None."""
    return model.conditioning.unet_slot if model.conditioning is not None else None


class CapturedDenoise:
    """The one-step denoise (ε_θ and Eq. 3/4) for one input shape, captured once as one CUDA graph
    and replayed: no per-kernel launch cost, no host work between the UNet's kernels.

    The graph reads fixed ("static") buffers: a call copies ``z_l``, ``tokens``, ``timesteps`` and,
    for RCOD_S / S3Diff, the degradation matrices the conditioning selected into them, replays,
    and returns a copy of the output (so that the next replay cannot overwrite it). ``pool``: a
    ``torch.cuda.graph_pool_handle()`` shared by several captures that are replayed one at a time.
    Weights must stay where they are (the graph holds their addresses): capture again after
    moving, casting or patching the UNet.
    """

    def __init__(self, model: "RCODModel", z_l: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor,
                 x0_mode: "X0Mode | None" = None, warmup: int = 2, pool=None) -> None:
        device = model.device
        self._check_device(device)
        if model.recorder is not None:
            raise ValueError("cannot capture while the model records its intermediates (they are copied to the host)")
        self.model, self.x0_mode = model, x0_mode
        self.z = z_l.detach().to(device).clone()
        self.tokens = tokens.detach().to(device).clone()
        self.t = timesteps.detach().to(device, torch.int64).reshape(-1).clone()
        slot = _unet_slot(model)
        if slot is not None and slot.matrices is None:
            raise ValueError(f"a {model.spec.kind} model needs its degradation conditioning before capture (model.condition)")
        self.slot = slot
        self.matrices = None if slot is None else slot.matrices.detach().clone()
        self.key = self.key_of(model, self.z, self.tokens, self.t, x0_mode)
        self.output = self._capture(warmup, pool)

    @staticmethod
    def key_of(model: "RCODModel", z_l: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor,
               x0_mode: "X0Mode | None") -> tuple:
        """What a capture is valid for, as (inputs, weights): the inputs' shapes and dtypes, the x0
        mode and, for the guided LoRA, the selected matrices' shape; the UNet object and where its
        weights are (a move or a cast makes new storage)."""
        slot = _unet_slot(model)
        m = None if slot is None or slot.matrices is None else (tuple(slot.matrices.shape), slot.matrices.dtype)
        weights = next(model.unet.parameters())
        inputs = (tuple(z_l.shape), z_l.dtype, tuple(tokens.shape), tokens.dtype, timesteps.numel(), x0_mode, m)
        return inputs, (id(model.unet), weights.device, weights.dtype, weights.data_ptr())

    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}")

    def _forward(self) -> torch.Tensor:
        slot, previous = self.slot, None
        if slot is not None:
            previous, slot.matrices = slot.matrices, self.matrices  # the graph reads the static copy
        try:
            return self.model.denoise(self.z, self.tokens, self.t, self.x0_mode)
        finally:
            if slot is not None:
                slot.matrices = previous

    def _capture(self, warmup: int, pool) -> torch.Tensor:
        """Warm up on a side stream (lazy initialisation and autotuning stay out of the graph), then
        record one call."""
        stream = torch.cuda.Stream(self.z.device)
        stream.wait_stream(torch.cuda.current_stream(self.z.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream(self.z.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            return self._forward()

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, z_l: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        key = self.key_of(self.model, z_l, tokens, timesteps.reshape(-1), self.x0_mode)
        if key != self.key:
            raise ValueError(f"this capture is for inputs {self.key[0][:5]} on its UNet's weights where they were; "
                             f"called with {key[0][:5]}" + ("" if key[1] == self.key[1] else " on moved weights"))
        self.z.copy_(z_l)
        self.tokens.copy_(tokens)
        self.t.copy_(timesteps.reshape(-1))
        if self.slot is not None:
            self.matrices.copy_(self.slot.matrices)
        self._replay()
        return self.output.clone()


__all__ = ["HOST_READS", "CaptureHazards", "CapturedDenoise", "capture_hazards"]
