"""Trainable RCOD models built from rcod_core's models, adapters and math (nothing is re-implemented).

* :class:`RCODOGenerator` — OSEDiff-layout LoRA UNet (+ fully trained ``conv_in``), VAE-encoder LoRA
  and the VPIM projection; one UNet pass at the LDG timestep of each sample (Eq. 3-6).
* :class:`RCODSGenerator` — S3Diff's degradation-guided LoRA (DEResNet scores → Fourier embedding →
  per-sample r×r matrices) with VPIM tokens and LDG timesteps.
* :class:`VSDRegulariser` — frozen base UNet (real score, CFG) + a rank-4 LoRA copy (fake score)
  trained with ε-MSE on the generator's latents.
* :class:`MEMTrainer` — the metric estimation module on DEResNet features.

Every random draw is an argument (noise tensors made per sample by the engine), so a sample's
computation does not depend on the batch it is in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rcod_core import adapters
from rcod_core.checkpoints import Checkpoint, load_checkpoint
from rcod_core.degradation import (
    DEResNet, DegradationGuidance, MatrixSlot, UNET_BLOCKS, VAE_BLOCKS, fourier_embedding,
    inject_degradation_lora, s3diff_unet_modules, s3diff_vae_modules, unet_block_index, vae_block_index,
)
from rcod_core.grouping import PaperRule, ThresholdRule, latent_metric, select_timestep
from rcod_core.models import BaseModels, build_models
from rcod_core.pipeline import one_step
from rcod_core.prompting import VisualPromptEncoder, preprocess_for_clip
from rcod_core.schedule import alphas_cumprod, x0_alpha_bar
from rcod_core.spec import ModelSpec

FOURIER_FREQUENCIES = 64


def grouping_rule(cfg: dict):
    """LDG rule from the config: release thresholds, Eq. 5, or edges from a dataset scan."""
    g = cfg["grouping"]
    if g["rule"] == "official":
        return ThresholdRule.official(g["n"])
    if g["rule"] == "paper":
        m_min = g["m_min"] if g["m_min"] is not None else round(g["m_max"] - 0.2 * g["n"], 10)
        return PaperRule(k=g["k"], n=g["n"], m_min=m_min, m_max=g["m_max"])
    edges = tuple(float(q) for q in g["quantiles"])
    n = len(edges) + 1  # the release's timesteps: k·(n − i) − 1, i.e. 749 / 499 / 249 for k = 250, n = 3
    steps = tuple(min(999, max(1, g["k"] * (n - i) - 1)) for i in range(n))
    return ThresholdRule(edges, steps)


class _Generator(nn.Module):
    """Shared parts: VAE encode/decode with explicit noise, VPIM tokens, LDG, one step."""

    spec: ModelSpec

    def _setup(self, unet, vae, prompt_encoder, spec, scheduler_config, rule):
        self.unet, self.vae, self.prompt_encoder = unet, vae, prompt_encoder
        self.spec = spec
        self.rule = rule
        self.register_buffer("alphas", alphas_cumprod(scheduler_config).float(), persistent=False)
        self.scaling = float(vae.config.scaling_factor)

    def encode(self, images01: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """VAE latent × scaling factor: ``mean + std · noise`` (a seeded ``sample()``), or the mode."""
        dist = self.vae.encode(images01 * 2 - 1).latent_dist
        z = dist.mode() if noise is None else dist.mean + dist.std * noise.to(dist.mean)
        return z * self.scaling

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scaling, return_dict=False)[0].clamp(-1, 1)

    def tokens(self, lr_up01: torch.Tensor) -> torch.Tensor:
        """VPIM: frozen CLIP vision (no grad) → trainable projection."""
        pe = self.prompt_encoder
        with torch.no_grad():
            pixels = preprocess_for_clip(lr_up01.float(), pe.preprocess_mode, pe.image_size)
            hidden = pe.vision_model(pixel_values=pixels.to(pe.projection.weight.dtype)).last_hidden_state
        return pe.projection(hidden)

    def timesteps(self, metric: torch.Tensor) -> torch.Tensor:
        return select_timestep(metric.detach().float().cpu(), self.rule).to(metric.device)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return x0_alpha_bar(t.cpu(), self.spec.x0_mode, self.alphas.double().cpu(), self.spec.fixed_alpha_bar)

    def condition(self, lr: Optional[torch.Tensor]) -> None:
        """Per-batch conditioning from the original LR (RCOD_S: degradation matrices)."""

    def forward(self, lr_up: torch.Tensor, hr: Optional[torch.Tensor], noise_lr: Optional[torch.Tensor],
                noise_hr: Optional[torch.Tensor], lr: Optional[torch.Tensor] = None,
                timesteps: Optional[torch.Tensor] = None) -> dict:
        """Images in [0, 1] → prediction in [-1, 1] at each sample's LDG timestep (or given ``timesteps``)."""
        self.condition(lr)
        z_l = self.encode(lr_up, noise_lr)
        metric = None
        if timesteps is None:
            with torch.no_grad():
                z_h = self.encode(hr, noise_hr)
            metric = latent_metric(z_l.detach(), z_h)
            timesteps = self.timesteps(metric)
        tokens = self.tokens(lr_up)
        z_pred = one_step(self.unet, z_l, timesteps.to(z_l.device), tokens, self.alpha_bar(timesteps))
        return {"x_pred": self.decode(z_pred), "z_pred": z_pred, "tokens": tokens, "t": timesteps, "metric": metric}


class RCODOGenerator(_Generator):
    def __init__(self, unet, vae, prompt_encoder, spec, scheduler_config, rule):
        super().__init__()
        self._setup(unet, vae, prompt_encoder, spec, scheduler_config, rule)


class RCODSGenerator(_Generator):
    def __init__(self, unet, vae, prompt_encoder, spec, scheduler_config, rule, de_net, w, unet_guidance,
                 vae_guidance, unet_slot, vae_slot):
        super().__init__()
        self._setup(unet, vae, prompt_encoder, spec, scheduler_config, rule)
        self.de_net = de_net.requires_grad_(False).eval()
        self.register_buffer("w", w.float().clone())
        self.unet_guidance, self.vae_guidance = unet_guidance, vae_guidance
        self.unet_slot, self.vae_slot = unet_slot, vae_slot

    def train(self, mode: bool = True):
        super().train(mode)
        self.de_net.eval()
        return self

    def condition(self, lr: Optional[torch.Tensor]) -> None:
        if lr is None:
            raise ValueError("RCOD_S needs the original LR image for its degradation estimate")
        with torch.no_grad():
            scores = self.de_net(lr.float())
        embedding = fourier_embedding(scores, self.w)
        self.unet_slot.matrices = self.unet_guidance(embedding)
        self.vae_slot.matrices = self.vae_guidance(embedding)


class VSDRegulariser(nn.Module):
    """Frozen base UNet (real score) + trainable LoRA UNet (fake score), OSEDiff's VSD."""

    def __init__(self, unet_fix: nn.Module, unet_update: nn.Module, scheduler_config: dict):
        super().__init__()
        self.unet_fix = unet_fix.requires_grad_(False).eval()
        self.unet_update = unet_update
        self.register_buffer("alphas", alphas_cumprod(scheduler_config).float(), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet_fix.eval()
        return self

    def add_noise(self, z, noise, t):
        ab = self.alphas[t.to(self.alphas.device)].to(z).view(-1, 1, 1, 1)
        return ab.sqrt() * z + (1 - ab).sqrt() * noise, ab

    @torch.no_grad()
    def scores(self, z, tokens, negative, t, noise, cfg: float):
        """x̂0 of the fake (LoRA) and the real (frozen, CFG) model at ``t`` (no gradients)."""
        z_t, ab = self.add_noise(z.detach(), noise, t)
        eps_fake = self.unet_update(z_t, t, encoder_hidden_states=tokens.detach(), return_dict=False)[0]
        eps_both = self.unet_fix(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([negative, tokens.detach()]), return_dict=False)[0]
        eps_neg, eps_pos = eps_both.chunk(2)
        eps_real = eps_neg + cfg * (eps_pos - eps_neg)
        x0 = lambda eps: (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return x0(eps_fake), x0(eps_real)

    def forward(self, z, tokens, t, noise):
        """ε-MSE of the LoRA UNet on the generator's (detached) latents — the regulariser's own loss."""
        z_t, _ = self.add_noise(z.detach(), noise, t)
        eps = self.unet_update(z_t, t, encoder_hidden_states=tokens.detach(), return_dict=False)[0]
        return F.mse_loss(eps.float(), noise.float())


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


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


def _kaiming_small(module: nn.Module, scale: float = 1e-5) -> None:
    """basicsr's ``default_init_weights(scale=1e-5)`` as S3Diff initialises its guidance MLPs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(scale)
            nn.init.zeros_(m.bias)


def build_rcod_o(cfg: dict, bundle: BaseBundle):
    """Generator + regulariser for RCOD_O (from scratch, or from an OSEDiff / RCOD_O checkpoint)."""
    from rcod_core.build import assemble

    base = bundle.base
    spec_over = dict(cfg["spec"])
    ckpt = load_checkpoint(cfg["init"]["checkpoint"]) if cfg["init"]["checkpoint"] else None
    unet_state = vae_state = proj_state = None
    if ckpt is not None:
        if ckpt.spec.kind not in ("osediff", "rcod_o"):
            raise ValueError(f"{ckpt.path}: RCOD_O starts from an OSEDiff or RCOD_O checkpoint, not {ckpt.spec.kind}")
        spec_over.setdefault("rank_unet", ckpt.spec.rank_unet)
        spec_over.setdefault("rank_vae", ckpt.spec.rank_vae)
        spec_over.setdefault("unet_lora_groups", ckpt.spec.unet_lora_groups)
        spec_over.setdefault("vae_lora_groups", ckpt.spec.vae_lora_groups)
        unet_state, vae_state = ckpt.groups["unet"], ckpt.groups["vae"]
        proj_state = ckpt.groups.get("projection")
    spec = ModelSpec.for_kind("rcod_o", **spec_over)
    if not spec.unet_lora_groups:
        spec.unet_lora_groups = adapters.osediff_unet_groups(base.unet)
    if not spec.vae_lora_groups:
        spec.vae_lora_groups = {adapters.VAE_ADAPTER: adapters.osediff_vae_modules(base.vae)}
    unet_reg = copy.deepcopy(bundle.clean_unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 11)  # peft's gaussian LoRA init draws from the global RNG
        pipe = assemble(base, spec, unet_state, vae_state, proj_state, merge=False)
        adapters.apply_lora_groups(unet_reg, adapters.osediff_unet_groups(unet_reg), cfg["regulariser"]["rank"],
                                   spec.lora_alpha, "regulariser UNet")
    unet, vae, pe = pipe.unet, pipe.vae, pipe.prompt_encoder
    for module in (unet, vae, pe):
        module.requires_grad_(False)
    for n, p in unet.named_parameters():
        if "lora" in n or "conv_in" in n:
            p.requires_grad_(True)
    for n, p in vae.named_parameters():
        if "lora" in n:
            p.requires_grad_(True)
    pe.projection.requires_grad_(True)
    generator = RCODOGenerator(unet, vae, pe, spec, base.scheduler_config, grouping_rule(cfg))
    unet_reg.requires_grad_(False)
    for n, p in unet_reg.named_parameters():
        if "lora" in n:
            p.requires_grad_(True)
    regulariser = VSDRegulariser(copy.deepcopy(bundle.clean_unet), unet_reg, base.scheduler_config)
    return generator, regulariser


def build_rcod_s(cfg: dict, bundle: BaseBundle) -> RCODSGenerator:
    """RCOD_S generator (from scratch, or from an S3Diff / RCOD_S checkpoint)."""
    base = bundle.base
    spec_over = dict(cfg["spec"])
    ckpt = load_checkpoint(cfg["init"]["checkpoint"]) if cfg["init"]["checkpoint"] else None
    if ckpt is not None and ckpt.spec.kind not in ("s3diff", "rcod_s"):
        raise ValueError(f"{ckpt.path}: RCOD_S starts from an S3Diff or RCOD_S checkpoint, not {ckpt.spec.kind}")
    if ckpt is not None:
        for key in ("rank_unet", "rank_vae", "unet_lora_groups", "vae_lora_groups", "extra"):
            spec_over.setdefault(key, getattr(ckpt.spec, key))
    spec = ModelSpec.for_kind("rcod_s", **spec_over)
    if not spec.unet_lora_groups:
        spec.unet_lora_groups = {"default": s3diff_unet_modules(base.unet)}
    if not spec.vae_lora_groups:
        spec.vae_lora_groups = {"vae_skip": s3diff_vae_modules(base.vae)}
    unet, vae = base.unet.float(), base.vae.float()
    unet_slot, vae_slot = MatrixSlot(), MatrixSlot()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 13)
        for adapter, modules in spec.unet_lora_groups.items():
            inject_degradation_lora(unet, modules, adapter, spec.rank_unet, spec.lora_alpha, unet_slot, unet_block_index, UNET_BLOCKS)
        for adapter, modules in spec.vae_lora_groups.items():
            inject_degradation_lora(vae, modules, adapter, spec.rank_vae, spec.lora_alpha, vae_slot, vae_block_index, VAE_BLOCKS)
        unet_guidance, vae_guidance = DegradationGuidance(spec.rank_unet, UNET_BLOCKS), DegradationGuidance(spec.rank_vae, VAE_BLOCKS)
        _kaiming_small(unet_guidance)
        _kaiming_small(vae_guidance)
        w = torch.randn(FOURIER_FREQUENCIES)
        de_net = DEResNet()
        pe = VisualPromptEncoder(base.clip_vision.float(), unet.config.cross_attention_dim, spec.vpim_preprocess)
    if cfg["init"]["de_net"]:
        de = load_checkpoint(cfg["init"]["de_net"])
        if "de_net" not in de.groups:
            raise ValueError(f"{cfg['init']['de_net']}: not a DEResNet state dict (de_net.pth)")
        de_net.load_state_dict(de.groups["de_net"])
    elif ckpt is not None and "de_net" in ckpt.groups:
        de_net.load_state_dict(ckpt.groups["de_net"])
    if ckpt is not None:
        from rcod_core.build import load_partial_state

        load_partial_state(unet, ckpt.groups["unet"], "state_dict_unet", ("lora", "conv_in"))
        load_partial_state(vae, ckpt.groups["vae"], "state_dict_vae", ("lora",))
        for name, g in (("unet", unet_guidance), ("vae", vae_guidance)):
            g.de_mlp.load_state_dict(ckpt.groups[f"{name}_de_mlp"])
            g.block_mlp.load_state_dict(ckpt.groups[f"{name}_block_mlp"])
            g.fuse_mlp.load_state_dict(ckpt.groups[f"{name}_fuse_mlp"])
            g.block_embeddings.load_state_dict(ckpt.groups[f"{name}_block_embeddings"])
        w = ckpt.groups["fourier"]["w"].float()
        if "projection" in ckpt.groups:
            pe.projection.load_state_dict(ckpt.groups["projection"])
    for module in (unet, vae, pe):
        module.requires_grad_(False)
    for n, p in unet.named_parameters():
        if "lora" in n or n.startswith("conv_in."):
            p.requires_grad_(True)
    for n, p in vae.named_parameters():
        if "lora" in n:
            p.requires_grad_(True)
    pe.projection.requires_grad_(True)
    unet_guidance.requires_grad_(True)
    vae_guidance.requires_grad_(True)
    return RCODSGenerator(unet, vae, pe, spec, base.scheduler_config, grouping_rule(cfg), de_net, w,
                          unet_guidance, vae_guidance, unet_slot, vae_slot)


# -- export in our checkpoint format ------------------------------------------------------------------

def _cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def export_checkpoint(generator: _Generator, source: str = "rcod-trainer") -> Checkpoint:
    """The trainable weights in rcod_core's canonical groups (the release's key names)."""
    spec = generator.spec
    unet_sd = generator.unet.state_dict()
    groups = {
        "unet": _cpu({k: v for k, v in unet_sd.items() if "lora" in k or k.startswith("conv_in.")}),
        "vae": _cpu({k: v for k, v in generator.vae.state_dict().items() if "lora" in k}),
        "projection": _cpu(generator.prompt_encoder.projection.state_dict()),
    }
    if isinstance(generator, RCODSGenerator):
        for name, g in (("unet", generator.unet_guidance), ("vae", generator.vae_guidance)):
            groups[f"{name}_de_mlp"] = _cpu(g.de_mlp.state_dict())
            groups[f"{name}_block_mlp"] = _cpu(g.block_mlp.state_dict())
            groups[f"{name}_fuse_mlp"] = _cpu(g.fuse_mlp.state_dict())
            groups[f"{name}_block_embeddings"] = _cpu(g.block_embeddings.state_dict())
        groups["fourier"] = {"w": generator.w.detach().cpu().clone()}
        groups["de_net"] = _cpu(generator.de_net.state_dict())
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

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
