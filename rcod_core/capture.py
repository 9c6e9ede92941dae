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

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


__all__ = ["HOST_READS", "CaptureHazards", "capture_hazards"]
