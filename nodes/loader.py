"""RCOD Model Loader: checkpoint + base + CLIP vision → RCOD_MODEL (rcod_core.loader.load_pipeline)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
import weakref
from typing import Optional

import torch

from .common import CATEGORY, MODEL, folders, model_dirs, model_files, model_management, node_errors, resolve_model
from .managed import manage

AUTO = "auto (from checkpoint)"
NONE = "none"
#: the small RCOD_O that ships inside the package (rcod_core.demo), offered without copying files
DEMO = "demo (built-in)"
#: loaded models by their files, dtype and device — held weakly: ComfyUI's own output cache keeps a
#: model alive while a workflow uses it, and when ComfyUI drops it (POST /free, cache eviction) the
#: memory is released instead of being pinned here
_cache: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
log = logging.getLogger("rcod")


def offload_device(load_device: torch.device) -> torch.device:
    """Where ComfyUI keeps a model's weights while it is not in use (its ``unet_offload_device``:
    CPU, or the GPU itself with ``--highvram`` / ``--gpu-only``); the load device itself when it is the CPU."""
    if load_device.type == "cpu" or not hasattr(model_management, "unet_offload_device"):
        return load_device
    return torch.device(model_management.unet_offload_device())


def base_choices() -> list[str]:
    return [AUTO, *(f"checkpoints/{n}" for n in model_files("checkpoints")),
            *(f"diffusers/{n}" for n in model_dirs("diffusers", "model_index.json"))]


def clip_choices() -> list[str]:
    """Each CLIP model once: a folder (transformers layout), or a file not inside such a folder."""
    folders_ = model_dirs("clip_vision", "config.json")
    files = [n for n in model_files("clip_vision") if not any(n.startswith(d + "/") for d in folders_)]
    return [AUTO, *(f"clip_vision/{n}" for n in files), *(f"clip_vision/{n}" for n in folders_)]


def _roles() -> dict[str, str]:
    from rcod_core.checkpoints import probe_role

    out = {}
    for name in model_files("rcod"):
        try:
            out[name] = probe_role(resolve_model("rcod", name, "checkpoint"))
        except (ValueError, FileNotFoundError):
            out[name] = "unknown"
    return out


def checkpoint_choices() -> list[str]:
    """Loadable checkpoints only (parts — de_net.pth, MEM files — load beside a model, not alone),
    after the built-in demo model."""
    from rcod_core.demo import DEMO_CHECKPOINT

    demo = [DEMO] if DEMO_CHECKPOINT.is_file() else []
    return [*demo, *(n for n, role in _roles().items() if role not in ("de_net", "rcod_s_mem"))]


def mem_choices() -> list[str]:
    return [NONE, *(n for n, role in _roles().items() if role in ("rcod_s_mem", "unknown"))]


def _path(choice: str, what: str):
    if choice == AUTO:
        return None
    kind, _, name = choice.partition("/")
    if kind not in ("checkpoints", "diffusers", "clip_vision") or not name:
        raise ValueError(f"{what} {choice!r} must start with checkpoints/, diffusers/ or clip_vision/")
    return resolve_model(kind, name, what)


def _named_in_file(model_path: str, key: str) -> Optional[str]:
    """The base/CLIP path an rcod .safetensors stores (its metadata), without loading its tensors."""
    from rcod_core.checkpoints import read_metadata

    return read_metadata(model_path).get(key) or None


def find_by_name(stored: str, kinds: tuple[str, ...], markers: dict[str, str]) -> Optional[str]:
    """``auto``: the model a file names, looked up by its file/folder name in ComfyUI's model folders
    (the stored path itself usually points into the training machine's folders)."""
    name = Path(stored.replace("\\", "/")).name
    for kind in kinds:
        candidates = (model_dirs(kind, markers[kind]) if kind in markers else []) + model_files(kind)
        for c in candidates:
            if Path(c).name == name:
                return resolve_model(kind, c, f"{kind} model")
    return None


def _auto(model_path: str, key: str, kinds: tuple[str, ...], markers: dict[str, str]) -> Optional[str]:
    stored = _named_in_file(model_path, key)
    return find_by_name(stored, kinds, markers) if stored else None



def _stamp(path) -> tuple:
    """A cache key part that changes when the file, or any file in the folder, changes."""
    if not path:
        return (None, None)
    if os.path.isdir(path):
        stats = [os.stat(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
        return (path, max((st.st_mtime_ns for st in stats), default=0), sum(st.st_size for st in stats), len(stats))
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


def comfy_dtypes(device: torch.device, choice: str) -> tuple[torch.dtype, Optional[torch.dtype]]:
    """UNet/CLIP and VAE precision. ``auto`` follows ComfyUI's flags and device checks (its
    ``unet_dtype`` / ``vae_dtype``: --fp32-unet, --bf16-vae, --force-fp16, ...); a chosen dtype is used
    for the UNet and CLIP while the VAE still follows ComfyUI's VAE flags."""
    from rcod_core.devices import resolve_dtype

    usable = (torch.float32, torch.float16, torch.bfloat16)
    unet = None
    if choice == "auto" and hasattr(model_management, "unet_dtype"):
        unet = model_management.unet_dtype(device, model_params=900_000_000,
                                           supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    if unet not in usable:  # a chosen dtype, an fp8 choice (not for RCOD), or an old ComfyUI
        unet = resolve_dtype(choice, device)
    vae = None
    if hasattr(model_management, "vae_dtype"):
        vae = model_management.vae_dtype(device, allowed_dtypes=[torch.bfloat16, torch.float32])
    return unet, vae if vae in usable else None


class RCODModelLoader:
    DESCRIPTION = ("Loads an RCOD_O / RCOD_S / OSEDiff / S3Diff checkpoint from models/rcod with its base model "
                   "(SD 2.1-base or SD-Turbo: a single file in models/checkpoints or a diffusers folder in "
                   "models/diffusers) and CLIP ViT-L/14 vision (models/clip_vision). Cached between runs.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("rcod_model",)
    OUTPUT_TOOLTIPS = ("The loaded one-step SR model, for the other RCOD nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (checkpoint_choices(), {"tooltip":
                               "RCOD / OSEDiff / S3Diff checkpoint in models/rcod (official .pkl or rcod .safetensors), or "
                               "'demo (built-in)', the small RCOD_O that ships with this extension. "
                               "A de_net.pth beside an RCOD_S/S3Diff pickle is picked up automatically."}),
                "base": (base_choices(), {"default": AUTO, "tooltip":
                         "SD 2.1-base (RCOD_O, OSEDiff) or SD-Turbo (RCOD_S, S3Diff). 'auto' uses the path stored "
                         "in an rcod .safetensors."}),
                "clip_vision": (clip_choices(), {"default": AUTO, "tooltip":
                                "CLIP ViT-L/14 vision model for VPIM (RCOD_O, RCOD_S); not used by OSEDiff/S3Diff."}),
                "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                          "UNet/CLIP precision. auto: as ComfyUI chooses for its own models (its flags such as "
                          "--force-fp16 / --fp32-unet and the device). The VAE follows ComfyUI's VAE flags "
                          "(--bf16-vae, --fp32-vae, ...)."}),
                "device": (["auto", "cpu"], {"default": "auto", "tooltip":
                           "auto: ComfyUI's torch device (model_management.get_torch_device())."}),
            },
            "optional": {
                "mem": (mem_choices(), {"default": NONE, "tooltip":
                        "RCOD_S MEM file (metric estimation module) for Adaptive realism, when the checkpoint "
                        "does not contain it (an rcod .safetensors may)."}),
            },
        }

    def load(self, checkpoint, base=AUTO, clip_vision=AUTO, dtype="auto", device="auto", mem=NONE):
        from rcod_core.loader import load_pipeline

        with node_errors("RCOD Model Loader"):
            roots = [r for kind in ("rcod", "diffusers", "checkpoints", "clip_vision") for r in folders(kind)]
            extras = [resolve_model("rcod", mem, "MEM file")] if mem not in (None, "", NONE) else []
            base_path, clip_path = _path(base, "base model"), _path(clip_vision, "CLIP vision model")
            if checkpoint == DEMO:  # its base and CLIP lie beside it, inside the package
                from rcod_core.demo import DEMO_DIR, demo_checkpoint

                model_path = os.fspath(demo_checkpoint())
                roots.append(os.fspath(DEMO_DIR))
            else:
                model_path = resolve_model("rcod", checkpoint, "checkpoint")
                if base == AUTO:
                    base_path = _auto(model_path, "base", ("diffusers", "checkpoints"), {"diffusers": "model_index.json"})
                if clip_vision == AUTO:
                    clip_path = _auto(model_path, "clip", ("clip_vision",), {"clip_vision": "config.json"})
            torch_device = model_management.get_torch_device() if device == "auto" else torch.device(device)
            torch_dtype, vae_dtype = comfy_dtypes(torch_device, dtype)
            beside = os.path.join(os.path.dirname(model_path), "de_net.pth")  # picked up by load_pipeline
            key = (_stamp(model_path), *(_stamp(p) for p in extras), _stamp(base_path), _stamp(clip_path),
                   _stamp(beside if os.path.isfile(beside) else None), str(torch_device), str(torch_dtype),
                   str(vae_dtype))
            cached = _cache.get(key)
            if cached is not None:
                return (cached,)
            # as ComfyUI's loaders do: weights on the offload device; the ModelPatcher moves them to
            # the load device when a node runs the model (managed.use) and back when ComfyUI needs room
            offload = offload_device(torch_device)
            pipe = load_pipeline(model_path, base=base_path, clip=clip_path, extras=extras, device=offload,
                                 dtype=torch_dtype, vae_dtype=vae_dtype, metadata_roots=roots)
            manage(pipe, torch_device, offload)
        _cache[key] = pipe
        log.info("RCOD: loaded %s (%s) on %s, %s", checkpoint, pipe.spec.kind, torch_device, torch_dtype)
        return (pipe,)
