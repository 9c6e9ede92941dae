"""Model families as shipped JSON configs, and random-weight model sets built from them.

``configs/<family>/`` holds the real architecture configs (``sd21_base``: Stable Diffusion
2.1-base; ``sd_turbo``: SD-Turbo; ``clip_vit_l14``: CLIP ViT-L/14 vision tower) and ``tiny``, a
small model of the same families (same block types, 8x VAE, 257 CLIP tokens) for tests and demos.
Nothing here downloads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

CONFIG_ROOT = Path(__file__).parent / "configs"
BaseFamily = Literal["sd21_base", "sd_turbo", "tiny"]
BASE_FAMILIES: tuple[str, ...] = ("sd21_base", "sd_turbo", "tiny")
CLIP_CONFIG_DIRS = {"sd21_base": "clip_vit_l14", "sd_turbo": "clip_vit_l14", "tiny": "tiny/clip_vision"}
COMPONENT_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def family_dir(family: str) -> Path:
    """The family's config folder, in diffusers layout (``unet/``, ``vae/``, ``scheduler/``).

    It is what ``from_single_file(config=...)`` needs to read a single-file checkpoint offline.
    """
    if family not in BASE_FAMILIES:
        raise ValueError(f"base family must be one of {BASE_FAMILIES}, got {family!r}")
    return CONFIG_ROOT / family


def config_path(family: str, component: str) -> Path:
    """Path of a shipped config: component in {unet, vae, scheduler, clip_vision}."""
    root = family_dir(family)
    if component == "clip_vision":
        return CONFIG_ROOT / CLIP_CONFIG_DIRS[family] / "config.json"
    if component not in COMPONENT_FILES:
        raise ValueError(f"component must be one of {sorted(COMPONENT_FILES) + ['clip_vision']}, got {component!r}")
    return root / COMPONENT_FILES[component]


def load_config(family: str, component: str) -> dict:
    with open(config_path(family, component), "r", encoding="utf-8") as f:
        return json.load(f)


def vae_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel of an ``AutoencoderKL`` (8 for SD): 2 per down block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class BaseModels:
    """The frozen parts RCOD builds on: UNet, VAE, CLIP vision tower, scheduler config."""

    unet: nn.Module
    vae: nn.Module
    clip_vision: Optional[nn.Module]
    scheduler_config: dict
    #: the training family ("sd21_base" / "sd_turbo") when known; None for tiny/custom models
    family: Optional[str] = None

    @property
    def latent_factor(self) -> int:
        return vae_factor(self.vae)


def build_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def build_vae(config: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def build_clip_vision(config: dict) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type", "transformers_version", "torch_dtype")}
    return CLIPVisionModel(CLIPVisionConfig(**cfg))


def build_models(
    family: BaseFamily = "tiny",
    seed: int = 0,
    device: torch.device | str = "cpu",
    with_clip: bool = True,
    vae_family: Optional[BaseFamily] = None,
) -> BaseModels:
    """Random-weight models from a family's shipped configs, seeded and independent of global RNG.

    ``device="meta"`` builds the structure without allocating (shape checks on the real configs).
    Each component gets its own seed derived from ``seed`` so that adding one never changes another.
    ``vae_family`` takes the VAE from another family's config (e.g. the real SD VAE architecture
    beside the tiny UNet, a VAE that other SD tools load too); default: ``family``'s own.
    """
    modules = {}
    builders = {"unet": build_unet, "vae": build_vae}
    if with_clip:
        builders["clip_vision"] = build_clip_vision
    for i, (name, builder) in enumerate(builders.items()):
        config_family = vae_family if name == "vae" and vae_family is not None else family
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + i)
            with torch.device(device):
                modules[name] = builder(load_config(config_family, name)).eval()
    return BaseModels(
        unet=modules["unet"],
        vae=modules["vae"],
        clip_vision=modules.get("clip_vision"),
        scheduler_config=load_config(family, "scheduler"),
        family=family if family != "tiny" else None,
    )


@torch.no_grad()
def randomize_lora(model: nn.Module, generator: torch.Generator, std: float = 0.02) -> int:
    """Give every LoRA A and B matrix seeded random non-zero values (peft initialises B to zero).

    For tests and demos: it makes an untrained LoRA change the output. Returns the count of tensors.
    """
    count = 0
    for name, param in sorted(model.named_parameters()):
        if ".lora_A." in name or ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=generator) * std)
            count += 1
    return count


@torch.no_grad()
def randomize_parameters(module: nn.Module, generator: torch.Generator, std: float = 0.05) -> nn.Module:
    """Seeded normal values for every parameter of ``module`` (random projections in tests/demos)."""
    for _, param in sorted(module.named_parameters()):
        param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
