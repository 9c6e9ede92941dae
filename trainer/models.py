"""Trainable RCOD models: the generators are rcod_core's model core, built by rcod_core's builders.

* The generator of RCOD_O and RCOD_S is an :class:`~rcod_core.model.RCODModel` (OSEDiff-layout LoRA
  or S3Diff's degradation-guided LoRA, VPIM projection) — the same class, forward and x0 conversion
  the inference pipeline runs; only ``requires_grad`` differs.
* :class:`VSDRegulariser` — frozen base UNet (real score, CFG) + a rank-4 LoRA copy (fake score)
  trained with ε-MSE on the generator's latents (OSEDiff's VSD), on rcod_core's schedule math.
* :func:`grouping_rule` — LDG's rule from the config (and a ``scan-metric`` file), stored in the
  generator's spec and so in every exported checkpoint.

Every random draw is an argument (noise tensors made per sample by the engine), so a sample's
computation does not depend on the batch it is in.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rcod_core import adapters
from rcod_core.build import build_osediff_model, build_s3_model
from rcod_core.checkpoints import Checkpoint, load_checkpoint, merge_checkpoints
from rcod_core.grouping import GroupingRule
from rcod_core.guided_lora import s3diff_unet_modules, s3diff_vae_modules
from rcod_core.model import RCODModel
from rcod_core.models import BaseModels, build_models
from rcod_core.schedule import add_noise, alphas_cumprod, x0_from_eps
from rcod_core.spec import ModelSpec


class RuleError(ValueError):
    """The grouping section of a config cannot make a rule (raised before anything is written)."""


def read_bounds(path: str) -> dict:
    """A ``scan-metric`` summary file (JSON with ``m_min``, ``m_max``, ``quantile_edges``)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise RuleError(f"config grouping.bounds {os.fspath(path)!r}: cannot read the scan-metric file: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), (int, float)) for k in ("m_min", "m_max")):
        raise RuleError(f"config grouping.bounds {os.fspath(path)!r}: not a scan-metric file (no numeric m_min/m_max)")
    return data


def grouping_rule(cfg: dict) -> GroupingRule:
    """LDG rule from the config: the release's thresholds, Eq. 5 with the training data's M_L bounds
    (``m_min``/``m_max``, or the ``bounds`` file that ``rcod-train scan-metric --out`` writes), or
    explicit edges (``quantiles``; default: the bounds file's quantile edges)."""
    g = cfg["grouping"]
    bounds = read_bounds(g["bounds"]) if g["bounds"] else {}
    steps = tuple(g["timesteps"] or ())
    try:
        if g["rule"] == "official":
            return GroupingRule.official(g["n"])
        if g["rule"] == "paper":
            m_min = g["m_min"] if g["m_min"] is not None else bounds.get("m_min")
            m_max = g["m_max"] if g["m_max"] is not None else bounds.get("m_max")
            if m_min is None or m_max is None:
                raise RuleError("config grouping.rule paper (Eq. 5) needs the training data's M_L bounds: set "
                                "grouping.bounds to the file `rcod-train scan-metric --out FILE` writes, or m_min/m_max")
            return GroupingRule(kind="paper", n=g["n"], k=g["k"], m_min=m_min, m_max=m_max, timesteps=steps)
        edges = g["quantiles"] or bounds.get("quantile_edges")
        if not edges:
            raise RuleError("config grouping.rule edges needs grouping.quantiles (ascending M_L edges) or a bounds file")
        return GroupingRule(kind="edges", k=g["k"], edges=tuple(edges), timesteps=steps)
    except RuleError:
        raise
    except ValueError as exc:
        raise RuleError(f"config grouping: {exc}") from None


def trainable_spec(cfg: dict, kind: str, inherited: dict) -> ModelSpec:
    """The generator's spec: the config's overrides over a start checkpoint's layout, with the
    config's grouping rule, and presets in the rule's style (the release's 249/499/749 for
    ``official``, 250/500/750 otherwise) unless the config sets ``spec.preset_style``."""
    rule = grouping_rule(cfg)
    over = {**inherited, **cfg["spec"], "grouping": rule}
    over.setdefault("preset_style", "official" if rule.kind == "official" else "paper")
    return ModelSpec.for_kind(kind, **over)


class VSDRegulariser(nn.Module):
    """Frozen base UNet (real score) + trainable LoRA UNet (fake score), OSEDiff's VSD."""

    def __init__(self, unet_fix: nn.Module, unet_update: nn.Module, scheduler_config: dict):
        super().__init__()
        self.unet_fix = unet_fix.requires_grad_(False).eval()
        self.unet_update = unet_update
        self.alphas = alphas_cumprod(scheduler_config)  # float64, CPU

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet_fix.eval()
        return self

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas[t.cpu()]

    @torch.no_grad()
    def scores(self, z, tokens, negative, t, noise, cfg: float):
        """x̂0 of the fake (LoRA) and the real (frozen, CFG) model at ``t`` (no gradients)."""
        ab = self._alpha_bar(t)
        z_t = add_noise(z.detach(), noise, ab)
        eps_fake = self.unet_update(z_t, t, encoder_hidden_states=tokens.detach(), return_dict=False)[0]
        eps_both = self.unet_fix(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([negative, tokens.detach()]), return_dict=False)[0]
        eps_neg, eps_pos = eps_both.chunk(2)
        eps_real = eps_neg + cfg * (eps_pos - eps_neg)
        return x0_from_eps(z_t, eps_fake.to(z_t), ab), x0_from_eps(z_t, eps_real.to(z_t), ab)

    def forward(self, z, tokens, t, noise):
        """ε-MSE of the LoRA UNet on the generator's (detached) latents — the regulariser's own loss."""
        z_t = add_noise(z.detach(), noise, self._alpha_bar(t))
        eps = self.unet_update(z_t, t, encoder_hidden_states=tokens.detach(), return_dict=False)[0]
        return F.mse_loss(eps.float(), noise.float())


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _mark_trainable(model: RCODModel) -> None:
    """Train the LoRA (+ ``conv_in``) of the UNet, the VAE encoder's LoRA, the VPIM projection and the
    degradation guidance; everything else (base weights, CLIP, DEResNet) stays frozen."""
    model.requires_grad_(False)
    for n, p in model.unet.named_parameters():
        if "lora" in n or n.startswith("conv_in."):
            p.requires_grad_(True)
    for n, p in model.vae.named_parameters():
        if "lora" in n:
            p.requires_grad_(True)
    if model.prompt_encoder is not None:
        model.prompt_encoder.projection.requires_grad_(True)
    if model.conditioning is not None:
        model.conditioning.unet_guidance.requires_grad_(True)
        model.conditioning.vae_guidance.requires_grad_(True)


# -- building ---------------------------------------------------------------------------------------

@dataclass
class BaseBundle:
    base: BaseModels
    clean_unet: nn.Module
    clean_vae: nn.Module
    source: Optional[str]          # path of the base on disk (None for tiny)
    clip_source: Optional[str]


def load_base_models(cfg: dict, with_clip: bool = True, warmup=None) -> BaseBundle:
    """The frozen base (and CLIP vision); tiny bases are random (optionally VAE-warmed up)."""
    b = cfg["base"]
    if b["family"] == "tiny":
        base = build_models("tiny", seed=b["seed"], with_clip=with_clip)
        base.scheduler_config = dict(base.scheduler_config)
        if warmup is not None and b["vae_warmup_steps"] > 0:
            warmup(base.vae)
        source = clip = None
    else:
        from rcod_core.loader import load_base

        base = load_base(b["path"], b["family"], with_clip=with_clip, clip=b["clip"])
        source, clip = b["path"], b["clip"]
    base.unet.requires_grad_(False)
    base.vae.requires_grad_(False)
    if base.clip_vision is not None:
        base.clip_vision.requires_grad_(False)
    return BaseBundle(base, copy.deepcopy(base.unet), copy.deepcopy(base.vae), source, clip)


def _start_checkpoint(cfg: dict, kinds: tuple[str, ...], what: str) -> Optional[Checkpoint]:
    if not cfg["init"]["checkpoint"]:
        return None
    ckpt = load_checkpoint(cfg["init"]["checkpoint"])
    if ckpt.spec.kind not in kinds:
        raise ValueError(f"{ckpt.path}: {what} starts from an {' or '.join(k.upper() for k in kinds)} checkpoint, "
                         f"not {ckpt.spec.kind}")
    return ckpt


def build_rcod_o(cfg: dict, bundle: BaseBundle) -> tuple[RCODModel, VSDRegulariser]:
    """Generator + regulariser for RCOD_O (from scratch, or from an OSEDiff / RCOD_O checkpoint)."""
    base = bundle.base
    ckpt = _start_checkpoint(cfg, ("osediff", "rcod_o"), "RCOD_O")
    inherited = {}
    if ckpt is not None:
        inherited = {k: getattr(ckpt.spec, k) for k in ("rank_unet", "rank_vae", "unet_lora_groups", "vae_lora_groups")}
    spec = trainable_spec(cfg, "rcod_o", inherited)
    # the exported file lists its modules (the release's layout on this base)
    spec.unet_lora_groups = spec.unet_lora_groups or adapters.osediff_unet_groups(base.unet)
    spec.vae_lora_groups = spec.vae_lora_groups or {adapters.VAE_ADAPTER: adapters.osediff_vae_modules(base.vae)}
    groups = ckpt.groups if ckpt is not None else {}
    unet_reg = copy.deepcopy(bundle.clean_unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 11)  # peft's gaussian LoRA init draws from the global RNG
        model = build_osediff_model(base, spec, groups.get("unet"), groups.get("vae"), groups.get("projection"),
                                    merge=False)
        adapters.apply_lora_groups(unet_reg, adapters.osediff_unet_groups(unet_reg), cfg["regulariser"]["rank"],
                                   spec.lora_alpha, "regulariser UNet")
    _mark_trainable(model)
    unet_reg.requires_grad_(False)
    for n, p in unet_reg.named_parameters():
        if "lora" in n:
            p.requires_grad_(True)
    regulariser = VSDRegulariser(copy.deepcopy(bundle.clean_unet), unet_reg, base.scheduler_config)
    return model, regulariser


def build_rcod_s(cfg: dict, bundle: BaseBundle) -> RCODModel:
    """RCOD_S generator (from scratch, or from an S3Diff / RCOD_S checkpoint)."""
    ckpt = _start_checkpoint(cfg, ("s3diff", "rcod_s"), "RCOD_S")
    inherited = {}
    if ckpt is not None:
        inherited = {k: getattr(ckpt.spec, k) for k in ("rank_unet", "rank_vae", "unet_lora_groups", "vae_lora_groups", "extra")}
    spec = trainable_spec(cfg, "rcod_s", inherited)
    spec.unet_lora_groups = spec.unet_lora_groups or {"default": s3diff_unet_modules(bundle.base.unet)}
    spec.vae_lora_groups = spec.vae_lora_groups or {"vae_skip": s3diff_vae_modules(bundle.base.vae)}
    if cfg["init"]["de_net"]:
        de = load_checkpoint(cfg["init"]["de_net"])
        if "de_net" not in de.groups:
            raise ValueError(f"{cfg['init']['de_net']}: not a DEResNet state dict (de_net.pth)")
        ckpt = merge_checkpoints(ckpt, de) if ckpt is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 13)  # LoRA A, guidance MLPs and frequencies draw from the global RNG
        model = build_s3_model(bundle.base, spec, ckpt.groups if ckpt is not None else None,
                               fresh=("projection", "mem"))
    if ckpt is None and cfg["init"]["de_net"]:
        model.conditioning.de_net.load_state_dict(de.groups["de_net"])
    _mark_trainable(model)
    return model


# -- export in our checkpoint format ------------------------------------------------------------------

def _cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def export_checkpoint(model: RCODModel) -> Checkpoint:
    """The trainable weights in rcod_core's canonical groups (the release's key names)."""
    spec = model.spec
    groups = {
        "unet": _cpu({k: v for k, v in model.unet.state_dict().items() if "lora" in k or k.startswith("conv_in.")}),
        "vae": _cpu({k: v for k, v in model.vae.state_dict().items() if "lora" in k}),
        "projection": _cpu(model.prompt_encoder.projection.state_dict()),
    }
    if model.conditioning is not None:
        groups.update(model.conditioning.weight_groups())
    return Checkpoint(spec, groups, spec.kind, None)


class EMA:
    """Exponential moving average of a set of parameters (state_dict/load_state_dict for accelerate)."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange model and EMA weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def save(self, path: str | os.PathLike) -> None:
        """The shadow weights as safetensors (``shadow.<i>``), the decay in the metadata: tensors only,
        so resuming never unpickles anything."""
        from safetensors.torch import save_file

        save_file({f"shadow.{i}": s.detach().contiguous().cpu() for i, s in enumerate(self.shadow)}, os.fspath(path),
                  metadata={"decay": repr(self.decay)})

    def load(self, path: str | os.PathLike) -> None:
        """Read :meth:`save`'s file, checking names, shapes and finiteness (``ValueError`` naming the file)."""
        from safetensors import safe_open

        state = read_tensors(path, {f"shadow.{i}": s for i, s in enumerate(self.shadow)}, "EMA weights")
        with safe_open(os.fspath(path), "pt") as f:
            decay = (f.metadata() or {}).get("decay")
        try:
            decay = float(decay)
        except (TypeError, ValueError):
            raise ValueError(f"{os.fspath(path)}: EMA weights without a numeric decay in the metadata") from None
        if not 0.0 < decay < 1.0:
            raise ValueError(f"{os.fspath(path)}: EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(state[f"shadow.{i}"])


def read_tensors(path: str | os.PathLike, expected: dict, what: str) -> dict:
    """A safetensors file that must hold exactly ``expected``'s names, with their shapes, floating
    and finite; ``ValueError`` naming the file and the tensor otherwise (truncated, empty, garbage)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} missing (an incomplete checkpoint folder?)")
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated / garbage files
        raise ValueError(f"{path}: {what} unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: {what} do not fit this run: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, ref in expected.items():
        v = state[name]
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {what} tensor {name!r} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{path}: {what} tensor {name!r} has dtype {v.dtype}, expected floating point")
        if not torch.isfinite(v).all():
            raise ValueError(f"{path}: {what} tensor {name!r} holds NaN or Inf")
    return state
