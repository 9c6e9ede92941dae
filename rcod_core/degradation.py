"""RCOD_S / S3Diff: degradation estimation, degradation-guided LoRA, and MEM (paper Sec. 3.4).

* :class:`DEResNet` — S3Diff's degradation estimator: two independent ResNet branches on the LR
  image (blur and noise), each → pooled 128-d feature → MLP → sigmoid score. Key layout of
  ``de_net.pth`` (``conv_first.{d}``, ``body.{d}.{i}``, ``fc_degree.{d}``).
* :func:`fourier_embedding` — scores (B, 2) → (B, 256): ``[sin 2πs₀w, cos 2πs₀w, sin 2πs₁w, cos 2πs₁w]``.
* :class:`DegradationGuidance` — de / block / fuse MLPs and block embeddings → one r×r matrix per
  sample and per block (``fuse([de_mlp(E), block_mlp(e_k)])``).
* :class:`DegradationLoraLinear` / :class:`DegradationLoraConv2d` — ``y = W x + s · B(A(x) · M_b)``
  with the sample's matrix ``M_b`` between LoRA A and B (batched: each image its own matrix). Their
  parameter names are peft's (``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``), so the
  release's state dicts load as they are.
* :class:`MetricEstimator` — MEM: ``ReLU(Linear(256, 1))`` on the DEResNet pooled features predicts
  the latent metric M_L of the LR image; adaptive realism picks t from it (Eq. 5 / thresholds).
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .models import BaseModels
from .pipeline import RCODPipeline
from .spec import ModelSpec

FOURIER_FREQUENCIES = 64
BLOCK_EMBEDDING_DIM = 64
UNET_BLOCKS = 10  # down 0-3, mid 4, up 5-8, conv_out 9
VAE_BLOCKS = 6  # down 0-3, mid 4, conv_in/conv_out 5


# -- DEResNet -------------------------------------------------------------------------------------

class ResidualBlockNoBN(nn.Module):
    """``x + conv2(relu(conv1(x)))`` (basicsr's block, res_scale 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class DEResNet(nn.Module):
    """Degradation estimator; ``forward`` → scores (B, num_degradation) in [0, 1]."""

    def __init__(self, num_degradation: int = 2, num_feats=(64, 64, 64, 128), num_blocks=(2, 2, 2, 2),
                 downscales=(1, 1, 2, 1), in_channels: int = 3):
        super().__init__()
        self.num_degradation = num_degradation
        self.conv_first = nn.ModuleList(nn.Conv2d(in_channels, num_feats[0], 3, 1, 1) for _ in range(num_degradation))
        self.body = nn.ModuleList(self._make_body(num_feats, num_blocks, downscales) for _ in range(num_degradation))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(num_feats[-1], 512), nn.ReLU(inplace=True), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(num_degradation)
        )
        self.feature_dim = num_feats[-1] * num_degradation

    @staticmethod
    def _make_body(num_feats, num_blocks, downscales) -> nn.Sequential:
        layers: list[nn.Module] = []
        stages = len(num_feats)
        for stage in range(stages):
            layers.extend(ResidualBlockNoBN(num_feats[stage]) for _ in range(num_blocks[stage]))
            nxt = num_feats[min(stage + 1, stages - 1)]
            if downscales[stage] == 2:
                layers.append(nn.Conv2d(num_feats[stage], nxt, 3, 2, 1))
            elif stage < stages - 1 and num_feats[stage] != nxt:
                layers.append(nn.Conv2d(num_feats[stage], nxt, 3, 1, 1))
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, D), pooled features (B, D · C)) — branch-major: [branch0 | branch1]."""
        scores, feats = [], []
        for conv, body, fc in zip(self.conv_first, self.body, self.fc_degree):
            feat = F.adaptive_avg_pool2d(body(conv(x)), 1).flatten(1)
            feats.append(feat)
            scores.append(fc(feat).squeeze(-1))
        return torch.stack(scores, dim=1), torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


class MetricEstimator(nn.Module):
    """MEM (release): ``ReLU(Linear(256, 1))`` on the DEResNet pooled features → predicted M_L."""

    def __init__(self, in_features: int = 256):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(features)).squeeze(-1)

    def load_release_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Our canonical keys ``weight``/``bias`` (the release's ``0.weight``/``0.bias``)."""
        self.linear.load_state_dict({"weight": state["weight"], "bias": state["bias"]})


# -- degradation-guided LoRA --------------------------------------------------------------------

def fourier_embedding(scores: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, S) scores, (F,) frequencies → (B, S · 2F): per score ``[sin(2π s w), cos(2π s w)]``."""
    proj = scores[..., None] * w[None, None, :] * (2 * math.pi)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1).flatten(1)


class DegradationGuidance(nn.Module):
    """Scores → per-sample, per-block r×r LoRA matrices for one model (UNet or VAE)."""

    def __init__(self, rank: int, num_blocks: int, embed_dim: int = 4 * FOURIER_FREQUENCIES,
                 block_dim: int = BLOCK_EMBEDDING_DIM):
        super().__init__()
        self.rank = rank
        self.de_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU())
        self.block_mlp = nn.Sequential(nn.Linear(block_dim, block_dim), nn.ReLU())
        self.fuse_mlp = nn.Linear(embed_dim + block_dim, rank * rank)
        self.block_embeddings = nn.Embedding(num_blocks, block_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 256) Fourier embedding → (B, num_blocks, r, r)."""
        de = self.de_mlp(embedding)
        blocks = self.block_mlp(self.block_embeddings.weight)
        n, b = blocks.shape[0], de.shape[0]
        fused = self.fuse_mlp(torch.cat([de[:, None].expand(b, n, -1), blocks[None].expand(b, n, -1)], dim=-1))
        return fused.view(b, n, self.rank, self.rank)


class MatrixSlot:
    """Holds the current (B, num_blocks, r, r) matrices for all LoRA layers of one model.

    Set by the pipeline before each forward of the batch; each layer reads its block's slice.
    """

    def __init__(self) -> None:
        self.matrices: Optional[torch.Tensor] = None

    def get(self, block: int) -> torch.Tensor:
        if self.matrices is None:
            raise RuntimeError("degradation matrices are not set; call the pipeline, not the model directly")
        return self.matrices[:, block]


class _DegradationLora(nn.Module):
    def __init__(self, base: nn.Module, lora_a: nn.Module, lora_b: nn.Module, adapter: str, scale: float,
                 slot: MatrixSlot, block: int):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({adapter: lora_a})
        self.lora_B = nn.ModuleDict({adapter: lora_b})
        self.adapter = adapter
        self.scale = scale
        self.block = block
        self._slot = slot

    def _mix(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        m = self._slot.get(self.block).to(x.dtype)
        a = self.lora_A[self.adapter](x)
        if m.shape[0] not in (1, a.shape[0]):
            raise RuntimeError(f"batch of {a.shape[0]} but degradation matrices for {m.shape[0]} samples")
        return result + self.lora_B[self.adapter](self._mix(a, m)) * self.scale


class DegradationLoraLinear(_DegradationLora):
    def _mix(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if a.ndim == 2:
            return torch.einsum("bk,bkr->br", a, m.expand(a.shape[0], -1, -1))
        return torch.einsum("b...k,bkr->b...r", a, m.expand(a.shape[0], -1, -1))


class DegradationLoraConv2d(_DegradationLora):
    def _mix(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkhw,bkr->brhw", a, m.expand(a.shape[0], -1, -1))


def unet_block_index(name: str, num_blocks: int = UNET_BLOCKS) -> int:
    """S3Diff's UNet rule: down_blocks.i → i, mid_block → 4, up_blocks.i → 5 + i, else the last."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return num_blocks - 1


def vae_block_index(name: str, num_blocks: int = VAE_BLOCKS) -> int:
    """S3Diff's VAE rule: encoder.down_blocks.i → i, encoder.mid_block → n − 2, else the last."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "down_blocks":
        return int(parts[2])
    if len(parts) > 1 and parts[1] == "mid_block":
        return num_blocks - 2
    return num_blocks - 1


def inject_degradation_lora(model: nn.Module, modules: list[str], adapter: str, rank: int, alpha: float,
                            slot: MatrixSlot, block_index, num_blocks: int) -> None:
    """Wrap each named Linear/Conv2d in a degradation-guided LoRA layer (A: r×in, B: out×r)."""
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child, None)
        if isinstance(base, nn.Linear):
            a = nn.Linear(base.in_features, rank, bias=False)
            b = nn.Linear(rank, base.out_features, bias=False)
            cls = DegradationLoraLinear
        elif isinstance(base, nn.Conv2d):
            a = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            b = nn.Conv2d(rank, base.out_channels, 1, 1, 0, bias=False)
            cls = DegradationLoraConv2d
        else:
            raise ValueError(f"LoRA target {name!r} is {type(base).__name__}, not a Linear or Conv2d "
                             f"(is the checkpoint for another base model?)")
        nn.init.zeros_(b.weight)
        block = block_index(name, num_blocks)
        if not 0 <= block < num_blocks:
            raise ValueError(f"LoRA target {name!r} maps to block {block}, outside the {num_blocks} block embeddings")
        setattr(parent, child, cls(base, a, b, adapter, alpha / rank, slot, block))


# -- the model ----------------------------------------------------------------------------------

class S3Pipeline(RCODPipeline):
    """RCOD_S / S3Diff: the RCOD pipeline plus degradation guidance (and MEM when present).

    One UNet pass per image: VPIM replaces S3Diff's two-pass text CFG.
    """

    def __init__(self, *args, de_net: DEResNet, w: torch.Tensor, unet_guidance: DegradationGuidance,
                 vae_guidance: DegradationGuidance, unet_slot: MatrixSlot, vae_slot: MatrixSlot,
                 mem: Optional[MetricEstimator] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.de_net = de_net.to(self.device, torch.float32).eval()
        self.w = w.to(self.device, torch.float32)
        self.unet_guidance = unet_guidance.to(self.device, torch.float32).eval()
        self.vae_guidance = vae_guidance.to(self.device, torch.float32).eval()
        self.unet_slot, self.vae_slot = unet_slot, vae_slot
        self.mem = mem.to(self.device, torch.float32).eval() if mem is not None else None

    @torch.no_grad()
    def degradation(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DEResNet on the original LR: (scores (B, 2), pooled features (B, 256))."""
        return self.de_net.forward_features(lr.to(self.device, torch.float32))

    @torch.no_grad()
    def condition(self, lr: torch.Tensor) -> dict:
        scores, features = self.degradation(lr)
        embedding = fourier_embedding(scores, self.w)
        state = {"scores": scores, "features": features,
                 "unet_matrices": self.unet_guidance(embedding).to(self.dtype),
                 "vae_matrices": self.vae_guidance(embedding).to(self.vae_dtype)}
        self.select_sample(state, None)
        return state

    def select_sample(self, state: dict, index: Optional[int]) -> None:
        """Point the LoRA layers at one image's matrices (tiled stages) or the whole batch's."""
        pick = slice(None) if index is None else slice(index, index + 1)
        self.unet_slot.matrices = state["unet_matrices"][pick]
        self.vae_slot.matrices = state["vae_matrices"][pick]

    @property
    def has_mem(self) -> bool:
        return self.mem is not None

    def to(self, device: torch.device | str) -> "S3Pipeline":
        super().to(device)
        for name in ("de_net", "unet_guidance", "vae_guidance", "mem"):
            module = getattr(self, name)
            if module is not None:
                module.to(self.device)
        self.w = self.w.to(self.device)
        return self

    @torch.no_grad()
    def estimate_metric(self, lr: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        if self.mem is None:
            return super().estimate_metric(lr, state)
        features = state["features"] if state is not None else self.degradation(lr)[1]
        return self.mem(features)


def _load(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    from .build import load_partial_state

    load_partial_state(module, state, what, required_substrings=("",))


def assemble_s3(
    base: BaseModels,
    spec: ModelSpec,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    prompt_embeds: torch.Tensor | None = None,
) -> S3Pipeline:
    """RCOD_S / S3Diff from base models (SD-Turbo) and canonical weight groups."""
    from .build import check_base_family, load_partial_state
    from .prompting import VisualPromptEncoder

    check_base_family(base, spec)
    if "de_net" not in groups:
        raise ValueError(f"a {spec.kind} model needs the DEResNet weights (de_net.pth): pass it as an extra file")
    unet, vae = base.unet.float(), base.vae.float()
    n_unet = groups["unet_block_embeddings"]["weight"].shape[0]
    n_vae = groups["vae_block_embeddings"]["weight"].shape[0]
    unet_slot, vae_slot = MatrixSlot(), MatrixSlot()
    for adapter, modules in spec.unet_lora_groups.items():
        inject_degradation_lora(unet, modules, adapter, spec.rank_unet, spec.lora_alpha, unet_slot, unet_block_index, n_unet)
    for adapter, modules in spec.vae_lora_groups.items():
        inject_degradation_lora(vae, modules, adapter, spec.rank_vae, spec.lora_alpha, vae_slot, vae_block_index, n_vae)
    load_partial_state(unet, groups["unet"], "state_dict_unet", ("lora", "conv_in"))
    load_partial_state(vae, groups["vae"], "state_dict_vae", ("lora",))

    guidance = {}
    for name, rank, n in (("unet", spec.rank_unet, n_unet), ("vae", spec.rank_vae, n_vae)):
        g = DegradationGuidance(rank, n)
        _load(g.de_mlp, groups[f"{name}_de_mlp"], f"state_dict_{name}_de_mlp")
        _load(g.block_mlp, groups[f"{name}_block_mlp"], f"state_dict_{name}_block_mlp")
        _load(g.fuse_mlp, groups[f"{name}_fuse_mlp"], f"state_dict_{name}_fuse_mlp")
        _load(g.block_embeddings, groups[f"{name}_block_embeddings"], f"state_embeddings[state_dict_{name}_block]")
        guidance[name] = g
    de_net = DEResNet()
    _load(de_net, groups["de_net"], "de_net.pth")
    mem = None
    if "mem" in groups:
        mem = MetricEstimator(de_net.feature_dim)
        _load(mem.linear, groups["mem"], "MEM state_dict_clip_proj")
    prompt_encoder = None
    if spec.uses_vpim:
        if base.clip_vision is None:
            raise ValueError(f"a {spec.kind} model needs a CLIP vision model for VPIM")
        prompt_encoder = VisualPromptEncoder(base.clip_vision.float(), unet.config.cross_attention_dim, spec.vpim_preprocess)
        _load(prompt_encoder.projection, groups["projection"], "state_dict_clip_proj")
    return S3Pipeline(
        unet, vae, prompt_encoder, spec, base.scheduler_config, device=device, dtype=dtype, vae_dtype=vae_dtype,
        prompt_embeds=prompt_embeds, de_net=de_net, w=groups["fourier"]["w"], unet_guidance=guidance["unet"],
        vae_guidance=guidance["vae"], unet_slot=unet_slot, vae_slot=vae_slot, mem=mem,
    )


S3DIFF_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                       "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")
S3DIFF_VAE_TARGET_REGEX = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"


def s3diff_unet_modules(unet: nn.Module) -> list[str]:
    """S3Diff's UNet targets: peft suffix matching of :data:`S3DIFF_UNET_TARGETS` (no conv_in)."""
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in S3DIFF_UNET_TARGETS)]


def s3diff_vae_modules(vae: nn.Module) -> list[str]:
    """S3Diff's VAE targets: fullmatch of :data:`S3DIFF_VAE_TARGET_REGEX` (encoder only)."""
    pattern = re.compile(S3DIFF_VAE_TARGET_REGEX)
    return [n for n, m in vae.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and pattern.fullmatch(n)]
