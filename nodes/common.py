"""What every RCOD node shares: ComfyUI adapters (model folders, progress, interrupts, devices),
BHWC <-> BCHW, and turning rcod_core's ValueErrors into node errors. No RCOD logic lives here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

import torch

try:  # pip-installed (pip install -e .) or already importable
    import rcod_core  # noqa: F401
except ImportError:  # git clone into custom_nodes/ + `pip install -r requirements.txt`: use this folder's copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rcod_core  # noqa: F401

import folder_paths  # ComfyUI's (or the test's stand-in)
import comfy.model_management as model_management
import comfy.utils

CATEGORY = "RCOD"
MODEL = "RCOD_MODEL"
PROMPT = "RCOD_PROMPT"
#: the LATENT key where RCOD Encode keeps what Denoise/Decode need (ComfyUI's latent nodes copy extra keys)
LATENT_KEY = "rcod"

from rcod_core.grouping import preset_timesteps  # noqa: E402  (after the path fix above)

#: what the t widget shows for a preset: the paper's t (a model may run the release's 249/499/749; the node reports it)
PRESET_T = {name.capitalize(): t for name, t in preset_timesteps("paper").items()}
PRESETS = (*PRESET_T, "Adaptive", "Custom")
X0_MODES = ("model default", "official", "paper", "base")
CHECKPOINT_EXTENSIONS = {".safetensors", ".pkl", ".pth", ".pt", ".ckpt", ".bin", ".sft"}


# -- model folders ------------------------------------------------------------------------------------

def register_rcod_folder() -> None:
    """Register ``models/rcod`` beside any paths already configured (extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, "rcod")
    entry = folder_paths.folder_names_and_paths.get("rcod")
    paths = list(entry[0]) if entry else []
    if default not in paths:
        paths.append(default)
    extensions = set(entry[1]) if entry and entry[1] else set()
    folder_paths.folder_names_and_paths["rcod"] = (paths, extensions | CHECKPOINT_EXTENSIONS)


def folders(kind: str) -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(kind))
    except KeyError:
        return []


def model_files(kind: str) -> list[str]:
    try:
        return sorted(folder_paths.get_filename_list(kind))
    except KeyError:
        return []


def model_dirs(kind: str, marker: str) -> list[str]:
    """Sub-folders (any depth ≤ 2) of the ``kind`` folders that contain ``marker`` (a model folder)."""
    found = set()
    for root in folders(kind):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if marker in filenames and dirpath != root:
                found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []
            elif depth >= 1:
                dirnames[:] = []
    return sorted(found)


def resolve_model(kind: str, name: str, what: str) -> str:
    """A combo value → a path inside one of the ``kind`` folders (``rcod_core.loader.safe_model_path``)."""
    from rcod_core.loader import safe_model_path

    roots = folders(kind)
    for root in roots:
        try:
            return str(safe_model_path(root, name))
        except FileNotFoundError:
            continue
    raise ValueError(f"{what} {name!r} not found in the '{kind}' model folders {roots}")


#: the example LR image the shipped workflows load (copied from rcod_core/assets into ComfyUI's input folder)
EXAMPLE_IMAGE = "rcod_astronaut_lr96.png"


def install_example_image() -> Optional[str]:
    """Put the shipped workflows' input image where LoadImage finds it: ComfyUI's input folder.

    Copied once, only when no file of that name is there (a user's file is never replaced); a
    read-only input folder is logged and skipped. Returns the path, or None when not installed."""
    import logging
    import shutil

    from rcod_core.demo import EXAMPLE_LR

    log = logging.getLogger("rcod")
    try:
        target = os.path.join(folder_paths.get_input_directory(), EXAMPLE_IMAGE)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(EXAMPLE_LR, target)
            log.info("RCOD: example image %s copied into ComfyUI's input folder", EXAMPLE_IMAGE)
        return target
    except (OSError, AttributeError) as exc:
        log.warning("RCOD: example image not installed in the input folder: %s", exc)
        return None


# -- images ---------------------------------------------------------------------------------------

def to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) → (B, 3, H, W) float32; rcod_core validates the values."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"IMAGE must be a (B, H, W, C) tensor, got {getattr(image, 'shape', type(image).__name__)}")
    return image[..., :3].permute(0, 3, 1, 2).float()


def to_bhwc(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 2, 3, 1).contiguous().float().cpu()


# -- progress, interrupts, errors -----------------------------------------------------------------

class Progress:
    """A ``comfy.utils.ProgressBar`` behind rcod_core's ``progress(done, total)`` / ``cancel()`` hooks."""

    def __init__(self, total: int = 1):
        self.bar = comfy.utils.ProgressBar(total)
        self.last: Optional[tuple[int, int]] = None

    #: bar steps per unit of rcod_core's progress, so that its fractional reports within a long
    #: unit (a UNet pass on a CPU) move the bar too
    STEPS = 100

    def __call__(self, done: float, total: int) -> None:
        value, top = int(round(done * self.STEPS)), int(total) * self.STEPS
        self.last = (value, top)
        self.bar.update_absolute(value, top)

    def finish(self) -> None:
        """Complete the bar at the total rcod_core planned (nothing to do when it got there)."""
        if self.last is None:
            self(1, 1)
        elif self.last[0] < self.last[1]:
            self.bar.update_absolute(self.last[1], self.last[1])
            self.last = (self.last[1], self.last[1])

    @staticmethod
    def cancel() -> bool:
        model_management.throw_exception_if_processing_interrupted()  # raises on interrupt
        return False


@contextlib.contextmanager
def node_errors(node: str) -> Iterator[None]:
    """rcod_core's ValueError / FileNotFoundError → a one-line ValueError naming the node."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        text = str(exc)
        raise ValueError(text if text.startswith(f"{node}:") else f"{node}: {text}") from None


def realism_value(preset: str, t: int):
    """The ``realism`` argument of rcod_core for the preset combo + t widget."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return int(t) if preset == "Custom" else preset.lower()


def x0_value(x0_mode: str) -> Optional[str]:
    return None if x0_mode == "model default" else x0_mode


TILING = ("auto", "none", "custom")


def tiling_inputs(stage: str = "") -> dict:
    """The tiling widgets (``stage``: which part of the pipeline they tile, for the tooltip)."""
    where = f" ({stage})" if stage else ""
    return {
        "tiling": (list(TILING), {"default": "auto", "tooltip":
                   f"auto: tile{where} only when the image is too large for the free memory; none: one pass; "
                   f"custom: tile_size below."}),
        "tile_size": ("INT", {"default": 64, "min": 16, "max": 512, "step": 8,
                              "tooltip": "Latent tile size (x8 pixels) for tiling=custom."}),
        "tile_overlap": ("INT", {"default": 16, "min": 0, "max": 256, "step": 4,
                                 "tooltip": "Latent overlap between tiles (blended with Gaussian weights)."}),
    }


def tile_value(tiling: str, tile_size: int):
    """rcod_core's ``tile`` argument for the tiling combo + tile_size widget."""
    if tiling not in TILING:
        raise ValueError(f"tiling must be one of {TILING}, got {tiling!r}")
    return int(tile_size) if tiling == "custom" else tiling


def realism_inputs(default: str = "Neutral") -> dict:
    return {
        # rcod_preset_t: the web extension keeps the t widget in sync from this (no copy of the presets there)
        "preset": (list(PRESETS), {"default": default, "rcod_preset_t": dict(PRESET_T), "tooltip":
                   "Fidelity / Neutral / Realism = t 250 / 500 / 750 (larger t: more generated detail). "
                   "Adaptive: MEM estimates M_L and picks t per image (needs an RCOD_S model with MEM). "
                   "Custom: use t below."}),
        "t": ("INT", {"default": PRESET_T.get(default, 500), "min": 1, "max": 999, "step": 1, "tooltip":
              "UNet timestep for Custom (1-999). Choosing a preset sets it; editing it switches to Custom."}),
        "x0_mode": (list(X0_MODES), {"default": "model default", "tooltip":
                    "x0 conversion (Eq. 3/4): 'official' fixed alpha-bar (release weights), 'paper' alpha-bar_t, "
                    "'base' t=999 (OSEDiff/S3Diff). 'model default' uses the checkpoint's setting."}),
    }


def ui_values(t: torch.Tensor, metric: Optional[torch.Tensor] = None) -> dict:
    """``{"ui": ...}`` payload shown on the node by web/js/rcod.js."""
    ui = {"rcod_t": [int(v) for v in t.reshape(-1).tolist()]}
    if metric is not None:
        ui["rcod_m_l"] = [round(float(v), 4) for v in metric.reshape(-1).tolist()]
    return ui
