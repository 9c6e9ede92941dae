"""RCOD_S / S3Diff's degradation-guided LoRA: DEResNet scores steer the LoRA of every layer.

* :func:`fourier_embedding` — scores (B, 2) → (B, 256): ``[sin 2πs₀w, cos 2πs₀w, sin 2πs₁w, cos 2πs₁w]``.
* :class:`DegradationGuidance` — de / block / fuse MLPs and block embeddings → one r×r matrix per
  sample and per block (``fuse([de_mlp(E), block_mlp(e_k)])``).
* :class:`DegradationLoraLinear` / :class:`DegradationLoraConv2d` — ``y = W x + s · B(A(x) · M_b)``
  with the sample's matrix ``M_b`` between LoRA A and B (batched: each image its own matrix). Their
  parameter names are peft's (``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``), so the
  release's state dicts load as they are.
* :class:`DegradationConditioning` — DEResNet + frequencies + both guidances + the matrix slots of
  the UNet and VAE layers: ``condition(lr)`` sets every layer's matrices for a batch.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import nn

from .deresnet import DEResNet

FOURIER_FREQUENCIES = 64
#: the parts of a DegradationGuidance that a checkpoint stores, one group each per model (unet / vae)
GUIDANCE_PARTS = ("de_mlp", "block_mlp", "fuse_mlp", "block_embeddings")
BLOCK_EMBEDDING_DIM = 64
UNET_BLOCKS = 10  # down 0-3, mid 4, up 5-8, conv_out 9
VAE_BLOCKS = 6  # down 0-3, mid 4, conv_in/conv_out 5


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


def init_guidance(module: nn.Module, scale: float = 1e-5) -> None:
    """S3Diff's initialisation of the guidance MLPs (basicsr's ``default_init_weights(scale=1e-5)``)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(scale)
            nn.init.zeros_(m.bias)


class DegradationConditioning(nn.Module):
    """Everything RCOD_S computes from the original LR before the stages run (paper Sec. 3.4 / S3Diff).

    ``forward(lr)`` → state ``{"scores", "features", "unet_matrices", "vae_matrices"}``: DEResNet
    (frozen, no gradients) → Fourier embedding → per-sample r×r matrices (with gradients into the
    guidance MLPs while training). :meth:`select` points the LoRA layers at a state's matrices.
    """

    def __init__(self, de_net: DEResNet, w: torch.Tensor, unet_guidance: DegradationGuidance,
                 vae_guidance: DegradationGuidance, unet_slot: MatrixSlot, vae_slot: MatrixSlot):
        super().__init__()
        self.de_net = de_net.requires_grad_(False).eval()
        self.register_buffer("w", w.detach().float().clone())
        self.unet_guidance, self.vae_guidance = unet_guidance, vae_guidance
        self.unet_slot, self.vae_slot = unet_slot, vae_slot

    @classmethod
    def inject(cls, unet: nn.Module, vae: nn.Module, unet_groups: dict[str, list[str]],
               vae_groups: dict[str, list[str]], rank_unet: int, rank_vae: int, lora_alpha: float,
               unet_blocks: int = UNET_BLOCKS, vae_blocks: int = VAE_BLOCKS) -> "DegradationConditioning":
        """Wrap the UNet's and VAE's target layers in guided LoRA (in place) and make freshly
        initialised guidance modules (S3Diff's init; the caller loads trained weights over them)."""
        unet_slot, vae_slot = MatrixSlot(), MatrixSlot()
        for adapter, modules in unet_groups.items():
            inject_degradation_lora(unet, modules, adapter, rank_unet, lora_alpha, unet_slot, unet_block_index, unet_blocks)
        for adapter, modules in vae_groups.items():
            inject_degradation_lora(vae, modules, adapter, rank_vae, lora_alpha, vae_slot, vae_block_index, vae_blocks)
        unet_guidance, vae_guidance = DegradationGuidance(rank_unet, unet_blocks), DegradationGuidance(rank_vae, vae_blocks)
        init_guidance(unet_guidance)
        init_guidance(vae_guidance)
        return cls(DEResNet(), torch.randn(FOURIER_FREQUENCIES), unet_guidance, vae_guidance, unet_slot, vae_slot)

    @property
    def feature_dim(self) -> int:
        return self.de_net.feature_dim

    def parts(self) -> dict[str, nn.Module]:
        """The modules behind the canonical weight groups (``unet_de_mlp``, ``vae_fuse_mlp``, …,
        ``de_net``); ``fourier`` (the frequencies ``w``) is a buffer, see :meth:`weight_groups`."""
        out: dict[str, nn.Module] = {}
        for model, g in (("unet", self.unet_guidance), ("vae", self.vae_guidance)):
            for part in GUIDANCE_PARTS:
                out[f"{model}_{part}"] = getattr(g, part)
        out["de_net"] = self.de_net
        return out

    def weight_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every weight as canonical checkpoint groups (CPU float32 copies), ``fourier`` included."""
        groups = {name: {k: v.detach().to("cpu", torch.float32).clone() for k, v in m.state_dict().items()}
                  for name, m in self.parts().items()}
        groups["fourier"] = {"w": self.w.detach().cpu().clone()}
        return groups

    def train(self, mode: bool = True) -> "DegradationConditioning":
        super().train(mode)
        self.de_net.eval()  # frozen
        return self

    def degradation(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DEResNet on the original LR: (scores (B, 2), pooled features (B, 256)), no gradients."""
        with torch.no_grad():
            return self.de_net.forward_features(lr.to(self.w.device, torch.float32))

    def forward(self, lr: torch.Tensor) -> dict:
        scores, features = self.degradation(lr)
        embedding = fourier_embedding(scores, self.w)
        return {"scores": scores, "features": features,
                "unet_matrices": self.unet_guidance(embedding), "vae_matrices": self.vae_guidance(embedding)}

    def select(self, state: dict, index: Optional[int] = None) -> None:
        """Point the LoRA layers at one image's matrices (tiled stages) or the whole batch's (``None``)."""
        pick = slice(None) if index is None else slice(index, index + 1)
        self.unet_slot.matrices = state["unet_matrices"][pick]
        self.vae_slot.matrices = state["vae_matrices"][pick]
