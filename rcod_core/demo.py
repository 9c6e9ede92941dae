"""The built-in demo model: a small RCOD_O trained on CPUs, shipped as package data.

``assets/demo/`` holds ``model.safetensors`` (our checkpoint format: the RCOD LoRA, ``conv_in``, the
VPIM projection, the spec with its grouping rule) beside the small base it was distilled from
(``base/``: SD-architecture UNet, ×4 VAE and scheduler in diffusers layout; ``base/clip_vision/``).
The checkpoint's metadata names both by relative path, so it loads like any of our files. The
model name :data:`DEMO_NAME` selects it wherever a checkpoint path is accepted (``rcod upscale
--model demo``, ``rcod eval --model demo``, ``load_pipeline("demo")``).

It reproduces from ``trainer/examples/demo_*.yaml`` (see the trainer's README); it is small (about
5 M parameters for the UNet) and trained on a few dozen photos, so it shows what the realism dial
does, not what a full-size RCOD reaches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).parent / "assets" / "demo"
DEMO_CHECKPOINT = DEMO_DIR / "model.safetensors"
#: a 96 px LR photo (scikit-image's astronaut, public domain, downscaled) for examples and workflows
EXAMPLE_LR = Path(__file__).parent / "assets" / "astronaut_lr96.png"


def is_demo(model: Union[str, os.PathLike, None]) -> bool:
    """Whether ``model`` names the built-in model (the bare name, not a file called so)."""
    return isinstance(model, str) and model == DEMO_NAME and not os.path.exists(model)


def demo_checkpoint() -> Path:
    """Path of the built-in model's checkpoint; ``FileNotFoundError`` naming the folder if absent."""
    if not DEMO_CHECKPOINT.is_file():
        raise FileNotFoundError(f"the built-in demo model is missing from this installation ({DEMO_DIR})")
    return DEMO_CHECKPOINT


def resolve_model(model: Union[str, os.PathLike]) -> Union[str, os.PathLike]:
    """``"demo"`` → the built-in checkpoint's path; anything else unchanged."""
    return demo_checkpoint() if is_demo(model) else model
