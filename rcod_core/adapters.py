"""LoRA layouts of OSEDiff / RCOD_O as data, injected with peft, merged for inference.

OSEDiff-layout UNet LoRA (RCOD_O inherits it, paper Sec. 3.1): every weight whose parameter name
contains one of :data:`UNET_LORA_PATTERNS` (biases and norms excluded) gets a LoRA, split into
three adapters that are all active at once:

* ``default_encoder`` — names containing ``down_blocks`` or ``conv_in``;
* ``default_decoder`` — names containing ``up_blocks`` or ``conv_out``;
* ``default_others``  — the rest (the mid block).

``conv_in`` is LoRA-wrapped *and* fully trained (its ``base_layer`` weights are in the checkpoint).
The VAE encoder gets one adapter ``default_encoder`` on its convolutions and attention projections
plus ``quant_conv``. The release never sets ``lora_alpha``, so peft's default 8 applies
(scale ``8 / r``, 2.0 at r = 4); we keep it as an explicit, configurable number.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

UNET_LORA_PATTERNS: tuple[str, ...] = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
    "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)
VAE_ENCODER_LORA_PATTERNS: tuple[str, ...] = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0",
)
UNET_ADAPTERS: tuple[str, ...] = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"
DEFAULT_LORA_ALPHA = 8.0  # peft's default, in force in the release


def _lora_weight_names(model: nn.Module) -> Iterable[str]:
    for name, _ in model.named_parameters():
        if name.endswith(".weight") and "bias" not in name and "norm" not in name:
            yield name[: -len(".weight")]


def osediff_unet_groups(unet: nn.Module) -> dict[str, list[str]]:
    """Module names of the three OSEDiff UNet adapters, in ``named_parameters`` order."""
    groups: dict[str, list[str]] = {name: [] for name in UNET_ADAPTERS}
    for module in _lora_weight_names(unet):
        if not any(p in module for p in UNET_LORA_PATTERNS):
            continue
        if "down_blocks" in module or "conv_in" in module:
            groups["default_encoder"].append(module)
        elif "up_blocks" in module or "conv_out" in module:
            groups["default_decoder"].append(module)
        else:
            groups["default_others"].append(module)
    return groups


def osediff_vae_modules(vae: nn.Module) -> list[str]:
    """VAE encoder LoRA targets: encoder convs / attention projections and ``quant_conv``."""
    modules = []
    for module in _lora_weight_names(vae):
        is_encoder = module.startswith("encoder.") and any(p in module for p in VAE_ENCODER_LORA_PATTERNS)
        if is_encoder or module == "quant_conv":
            modules.append(module)
    return modules


def dedupe(names: Sequence[str]) -> list[str]:
    """Order-preserving de-duplication (the release saves its VAE module list with repeats)."""
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class LoraLayout:
    """Everything needed to rebuild the adapters before loading trained LoRA weights."""

    unet_groups: dict[str, list[str]]
    vae_groups: dict[str, list[str]]
    rank_unet: int = 4
    rank_vae: int = 4
    lora_alpha: float = DEFAULT_LORA_ALPHA

    def __post_init__(self) -> None:
        for name, value in (("rank_unet", self.rank_unet), ("rank_vae", self.rank_vae)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _lora_config(rank: int, alpha: float, modules: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian", target_modules=list(modules))


def _check_modules_exist(model: nn.Module, modules: Sequence[str], what: str) -> None:
    present = dict(model.named_modules())
    missing = [m for m in modules if m not in present]
    if missing:
        raise ValueError(
            f"{what}: {len(missing)} LoRA target module(s) do not exist in this model, e.g. {missing[:3]} "
            f"(is the checkpoint for another base model?)"
        )


def apply_lora_groups(model: nn.Module, groups: dict[str, Sequence[str]], rank: int,
                      alpha: float = DEFAULT_LORA_ALPHA, what: str = "model") -> None:
    """Inject one peft adapter per group (exact module names) and activate all of them together."""
    active = []
    for adapter, modules in groups.items():
        modules = dedupe(modules)
        if not modules:
            continue
        _check_modules_exist(model, modules, f"{what} adapter {adapter!r}")
        with warnings.catch_warnings():  # several adapters on one model is the layout, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(_lora_config(rank, alpha, modules), adapter_name=adapter)
        active.append(adapter)
    if active:
        # add_adapter activates only the adapter it adds; the release activates all (set_adapter)
        model.set_adapter(active if len(active) > 1 else active[0])


def apply_layout(unet: nn.Module, vae: nn.Module, layout: LoraLayout) -> None:
    apply_lora_groups(unet, layout.unet_groups, layout.rank_unet, layout.lora_alpha, "UNet")
    apply_lora_groups(vae, layout.vae_groups, layout.rank_vae, layout.lora_alpha, "VAE")


def modules_from_state_dict(state: dict, adapter: str | None = None) -> dict[str, list[str]]:
    """{adapter: [module names]} read off LoRA keys ``<module>.lora_A.<adapter>.weight``."""
    groups: dict[str, list[str]] = {}
    for key in state:
        if ".lora_A." in key:
            module, _, rest = key.partition(".lora_A.")
            name = rest.rsplit(".", 1)[0]
            if adapter is None or name == adapter:
                groups.setdefault(name, []).append(module)
    return groups


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fuse every active LoRA into its base weight and replace the peft wrapper by the base layer.

    Returns the number of merged layers. After this the model is a plain diffusers model again
    (no per-call LoRA matmuls), which is the fast inference path. Merge in fp32 before casting.
    """
    layers = lora_layers(model)
    for name, layer in layers:
        layer.merge(adapter_names=list(layer.active_adapters))
        base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    if layers:
        for attr in ("peft_config",):
            if hasattr(model, attr):
                delattr(model, attr)
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False
    return len(layers)


def lora_state_dict(model: nn.Module, include: Sequence[str] = ("lora",)) -> dict[str, torch.Tensor]:
    """Entries of ``model.state_dict()`` whose key contains any of ``include`` (release convention)."""
    return {k: v for k, v in model.state_dict().items() if any(s in k for s in include)}
