"""RCOD models under ComfyUI's memory manager.

The loader hands each loaded pipeline to a ``comfy.model_patcher.ModelPatcher`` (load device: the
node's device; offload device: ComfyUI's ``unet_offload_device()``), and every node that runs the
model first calls :func:`use`, i.e. ``comfy.model_management.load_models_gpu`` — as ComfyUI's own
VAE and CLIP wrappers do. ComfyUI can then offload our weights when another model needs the memory,
unloads them on ``POST /free``, and applies its ``--lowvram`` / ``--novram`` / ``--highvram`` /
``--cpu`` policies to them. The weights are diffusers / transformers modules, not ``comfy.ops``
layers that stream weights per call, so they are always loaded whole (``force_full_load``).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from .common import model_management

#: bytes of activations per output pixel that one run needs besides the weights (the tile planner's
#: VAE-decoder cost in fp16, the largest stage; ComfyUI frees other models to make this room)
ACTIVATION_BYTES_PER_PX = 5_250 * 2


class ManagedRCOD(nn.Module):
    """What the ModelPatcher manages: the RCOD model as one submodule, and the plain attributes the
    patcher writes (``device``, its load bookkeeping) that the model itself does not have."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.rcod = model
        self.device = device

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype()
        return self.rcod.dtype


def manage(pipe, load_device: torch.device, offload_device: torch.device):
    """Give ``pipe``'s modules to a ModelPatcher; returns it (also kept as ``pipe.comfy_patcher``).

    ``None`` (and nothing changes) where ComfyUI has no ModelPatcher (very old versions)."""
    try:
        from comfy.model_patcher import ModelPatcher
    except ImportError:
        return None
    from rcod_core.devices import prefer_channels_last

    pipe.set_channels_last(prefer_channels_last(torch.device(load_device), pipe.dtype))  # the layout of where it runs
    holder = ManagedRCOD(pipe.model, pipe.device)
    patcher = ModelPatcher(holder, load_device=torch.device(load_device), offload_device=torch.device(offload_device))
    pipe.comfy_patcher = patcher
    return patcher


def _supports(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def image_pixels(image: torch.Tensor, scale: float = 1.0) -> int:
    """Output pixels of a BHWC IMAGE upscaled by ``scale`` (for :func:`use`)."""
    b, h, w = image.shape[:3]
    return int(b * round(h * scale) * round(w * scale))


def latent_pixels(pipe, samples: torch.Tensor) -> int:
    """Image pixels of a (B, C, h, w) latent of ``pipe``'s VAE."""
    b, _, h, w = samples.shape
    return int(b * h * w * pipe.latent_factor ** 2)


def use(pipe, pixels: int = 0) -> None:
    """Before a node runs ``pipe``: let ComfyUI load its weights onto the load device (offloading
    other models if ``pixels`` of output need the room); a no-op for a pipeline not managed."""
    patcher: Optional[object] = getattr(pipe, "comfy_patcher", None)
    load = getattr(model_management, "load_models_gpu", None)
    if patcher is None or load is None:
        return
    kwargs = {"memory_required": int(pixels) * ACTIVATION_BYTES_PER_PX}
    if _supports(load, "force_full_load"):
        kwargs["force_full_load"] = True
    load([patcher], **kwargs)
