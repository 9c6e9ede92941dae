"""Synthetic checkpoints in every official key layout, from the tiny configs (``rcod make-tiny``).

Each writer builds the tiny models, applies the release's own target-selection rules, gives every
LoRA A and B seeded random non-zero values (and perturbs the fully trained ``conv_in``), and saves
the dict exactly as the release's ``save_model`` does. The set lets anyone smoke-test the loader,
the CLI, the ComfyUI nodes and the workflows offline. The weights are random: outputs are noise-like.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import adapters
from ..build import S3_KINDS, assemble, assemble_s3
from ..checkpoints import canonicalize, load_checkpoint, merge_checkpoints, save_checkpoint
from ..deresnet import DEResNet
from ..guided_lora import (
    DegradationGuidance, MatrixSlot, S3DIFF_UNET_TARGETS, S3DIFF_VAE_TARGET_REGEX, UNET_BLOCKS, VAE_BLOCKS,
    inject_degradation_lora, s3diff_unet_modules, s3diff_vae_modules, unet_block_index, vae_block_index,
)
from ..model import quiet_dtype_cast
from ..pipeline import RCODPipeline
from ..spec import ModelSpec
from ..models import CONFIG_ROOT, build_models, load_config, randomize_lora, randomize_parameters

#: ranks of the tiny RCOD_S / S3Diff files (the release uses 32 / 16 on the full-size model)
TINY_S3_RANKS = (8, 4)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _perturb(tensors, generator: torch.Generator, std: float = 0.01) -> None:
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=generator) * std)


def _random_projection(unet: nn.Module, generator: torch.Generator, family: str = "tiny") -> nn.Linear:
    """A VPIM projection (the family's CLIP hidden size → the UNet's cross-attention width), random."""
    proj = nn.Linear(load_config(family, "clip_vision")["hidden_size"], unet.config.cross_attention_dim)
    return randomize_parameters(proj, generator)


def release_vae_module_list(vae: nn.Module) -> list[str]:
    """OSEDiff's VAE target list as its loop builds it: no ``break``, so names repeat."""
    names = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in adapters.VAE_ENCODER_LORA_PATTERNS:
            if pattern in n and "encoder" in n:
                names.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                names.append(n.replace(".weight", ""))
    return names


def osediff_like_dict(kind: str = "rcod_o", seed: int = 0, rank: int = 4, family: str = "tiny",
                      vae_family: Optional[str] = None) -> dict:
    """The release's dict for an OSEDiff (8 keys) or RCOD_O (9 keys) checkpoint, random weights on
    the ``family`` configs (``"sd21_base"`` gives a full-size file, for load-time benchmarks);
    ``vae_family`` as in :func:`~rcod_core.models.build_models`."""
    base = build_models(family, seed=seed, with_clip=False, vae_family=vae_family)
    unet, vae = base.unet, base.vae
    groups = adapters.osediff_unet_groups(unet)
    vae_list = release_vae_module_list(vae)
    adapters.apply_layout(unet, vae, adapters.LoraLayout(groups, {"default_encoder": vae_list}, rank, rank))
    g = _generator(seed + 100)
    randomize_lora(unet, g)
    randomize_lora(vae, g)
    _perturb([unet.conv_in.base_layer.weight, unet.conv_in.base_layer.bias], g)
    obj = {
        "vae_lora_encoder_modules": vae_list,
        "unet_lora_encoder_modules": groups["default_encoder"],
        "unet_lora_decoder_modules": groups["default_decoder"],
        "unet_lora_others_modules": groups["default_others"],
        "rank_unet": rank,
        "rank_vae": rank,
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k},
    }
    if kind == "rcod_o":
        obj["state_dict_proj"] = _random_projection(unet, g, family).state_dict()
    elif kind != "osediff":
        raise ValueError(f"kind must be 'osediff' or 'rcod_o', got {kind!r}")
    return obj


def s3diff_like_dict(kind: str = "rcod_s", seed: int = 0, ranks: tuple[int, int] = TINY_S3_RANKS,
                     family: str = "tiny") -> dict:
    """The release's dict for an S3Diff (14 keys) or RCOD_S (15 keys) checkpoint, random weights on
    the ``family`` configs (``"sd_turbo"`` with ranks (32, 16) is the release's full size)."""
    rank_unet, rank_vae = ranks
    base = build_models(family, seed=seed, with_clip=False)
    unet, vae = base.unet, base.vae
    unet_modules, vae_modules = s3diff_unet_modules(unet), s3diff_vae_modules(vae)
    inject_degradation_lora(unet, unet_modules, "default", rank_unet, 8.0, MatrixSlot(), unet_block_index, UNET_BLOCKS)
    inject_degradation_lora(vae, vae_modules, "vae_skip", rank_vae, 8.0, MatrixSlot(), vae_block_index, VAE_BLOCKS)
    g = _generator(seed + 200)
    randomize_lora(unet, g, std=0.05)
    randomize_lora(vae, g, std=0.05)
    _perturb([unet.conv_in.weight, unet.conv_in.bias], g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 300)
        unet_g, vae_g = DegradationGuidance(rank_unet, UNET_BLOCKS), DegradationGuidance(rank_vae, VAE_BLOCKS)
        w = nn.Parameter(torch.randn(64), requires_grad=False)
    obj = {
        "unet_lora_target_modules": list(S3DIFF_UNET_TARGETS),
        "vae_lora_target_modules": S3DIFF_VAE_TARGET_REGEX,
        "rank_unet": rank_unet,
        "rank_vae": rank_vae,
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k or "skip_conv" in k},
        "state_dict_vae_de_mlp": vae_g.de_mlp.state_dict(),
        "state_dict_unet_de_mlp": unet_g.de_mlp.state_dict(),
        "state_dict_vae_block_mlp": vae_g.block_mlp.state_dict(),
        "state_dict_unet_block_mlp": unet_g.block_mlp.state_dict(),
        "state_dict_vae_fuse_mlp": vae_g.fuse_mlp.state_dict(),
        "state_dict_unet_fuse_mlp": unet_g.fuse_mlp.state_dict(),
        "w": w,
        "state_embeddings": {
            "state_dict_vae_block": vae_g.block_embeddings.state_dict(),
            "state_dict_unet_block": unet_g.block_embeddings.state_dict(),
        },
    }
    if kind == "rcod_s":
        obj["state_dict_clip_proj"] = _random_projection(unet, g, family).state_dict()
    elif kind != "s3diff":
        raise ValueError(f"kind must be 's3diff' or 'rcod_s', got {kind!r}")
    return obj


def de_net_state(seed: int = 0) -> dict:
    """A DEResNet state dict in ``de_net.pth`` layout (full size: it is small)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 400)
        return DEResNet().state_dict()


def mem_dict(seed: int = 0) -> dict:
    """The release's MEM file: ``{"state_dict_clip_proj": {"0.weight": (1, 256), "0.bias": (1,)}}``."""
    g = _generator(seed + 500)
    return {"state_dict_clip_proj": {"0.weight": torch.randn(1, 256, generator=g) * 0.05,
                                     "0.bias": torch.tensor([0.6])}}


# -- base models, CLIP, text encoder ------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte → a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_text_encoder(folder: Path, hidden_size: int, seed: int = 0) -> None:
    """A tiny CLIP text encoder + byte-level CLIP tokenizer (no merges) in diffusers folder layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 600)
        CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def write_tiny_base(folder: Path, family: str, seed: int = 0, vae_family: Optional[str] = None,
                    vae_dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers-folder tiny base that declares ``family`` through its scheduler config
    (``vae_family="sd21_base"``: the real SD VAE architecture, random, stored as ``vae_dtype``)."""
    base = build_models("tiny", seed=seed, with_clip=False, vae_family=vae_family)
    folder.mkdir(parents=True, exist_ok=True)
    base.unet.save_pretrained(folder / "unet")
    with quiet_dtype_cast():
        base.vae.to(vae_dtype).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(CONFIG_ROOT / family / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    write_tiny_text_encoder(folder, base.unet.config.cross_attention_dim, seed)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "rcod_note": f"tiny random-weight {family} for tests",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    }, indent=2))
    return folder


def write_tiny_single_file(path: Path, seed: int = 0) -> Path:
    """The same tiny UNet + VAE as :func:`write_tiny_base` in the original single-file key layout."""
    from .ldm_export import write_single_file

    base = build_models("tiny", seed=seed, with_clip=False)
    return write_single_file(path, base.unet, base.vae)


def write_tiny_clip(folder: Path, single_file: Optional[Path] = None, seed: int = 0) -> Path:
    """A tiny CLIP vision tower as a transformers folder (and optionally one ``.safetensors``)."""
    base = build_models("tiny", seed=seed)
    base.clip_vision.save_pretrained(folder)
    if single_file is not None:
        from safetensors.torch import save_file

        # the key layout of real single files (ComfyUI clip_vision, hub model.safetensors): vision_model.*
        state = {("" if k.startswith("vision_model.") else "vision_model.") + k: v.contiguous()
                 for k, v in base.clip_vision.state_dict().items() if not k.endswith("position_ids")}
        save_file(state, str(single_file))
    return folder


# -- the whole set ------------------------------------------------------------------------------

TINY_SET = {
    "base-sd21": "tiny SD 2.1-base, diffusers folder (unet, vae, scheduler, text_encoder, tokenizer)",
    "base-sd-turbo": "tiny SD-Turbo, diffusers folder",
    "base-sd21.safetensors": "the same tiny SD 2.1-base UNet + VAE, single-file (original LDM keys)",
    "clip-vision": "tiny CLIP vision tower, transformers folder",
    "clip-vision.safetensors": "the same, one file with the vision_model. prefix",
    "osediff.pkl": "OSEDiff format (8 keys)",
    "rcod_o.pkl": "RCOD_O format (9 keys)",
    "s3diff.pkl": "S3Diff format (14 keys)",
    "rcod_s.pkl": "RCOD_S format (15 keys)",
    "rcod_s_mem.pkl": "RCOD_S MEM file (1 key)",
    "de_net.pth": "DEResNet state dict (S3Diff / RCOD_S degradation estimator)",
    "rcod_o.safetensors": "our format, converted from rcod_o.pkl",
    "rcod_s.safetensors": "our format, converted from rcod_s.pkl + de_net.pth + rcod_s_mem.pkl",
}


def make_tiny(directory: Path | str, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the complete tiny random model set (see :data:`TINY_SET`) into ``directory``."""
    root = Path(directory)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace its files")
    root.mkdir(parents=True, exist_ok=True)
    out = {name: root / name for name in TINY_SET}
    for name in ("base-sd21", "base-sd-turbo", "clip-vision"):
        if out[name].exists():
            shutil.rmtree(out[name])
    write_tiny_base(out["base-sd21"], "sd21_base", seed)
    write_tiny_base(out["base-sd-turbo"], "sd_turbo", seed)
    write_tiny_single_file(out["base-sd21.safetensors"], seed)
    write_tiny_clip(out["clip-vision"], out["clip-vision.safetensors"], seed)
    torch.save(osediff_like_dict("osediff", seed), out["osediff.pkl"])
    torch.save(osediff_like_dict("rcod_o", seed), out["rcod_o.pkl"])
    torch.save(s3diff_like_dict("s3diff", seed), out["s3diff.pkl"])
    torch.save(s3diff_like_dict("rcod_s", seed), out["rcod_s.pkl"])
    torch.save(mem_dict(seed), out["rcod_s_mem.pkl"])
    torch.save(de_net_state(seed), out["de_net.pth"])
    rcod_o = load_checkpoint(out["rcod_o.pkl"])
    # metadata paths are relative to the checkpoint's folder, so the set can be moved
    save_checkpoint(rcod_o, out["rcod_o.safetensors"], {"base": "base-sd21", "clip": "clip-vision"})
    rcod_s = merge_checkpoints(load_checkpoint(out["rcod_s.pkl"]), load_checkpoint(out["de_net.pth"]),
                               load_checkpoint(out["rcod_s_mem.pkl"]))
    save_checkpoint(rcod_s, out["rcod_s.safetensors"], {"base": "base-sd-turbo", "clip": "clip-vision"})
    return out


SD_VAE_SET = {
    "base-sd21-sdvae": "tiny SD 2.1-base UNet with the real SD VAE architecture (random, fp16), diffusers folder",
    "sd-vae.safetensors": "that VAE alone in the layout of distributed VAE files (LDM keys, no prefix)",
    "rcod_o_sdvae.safetensors": "an RCOD_O on that base (our format; metadata names the base and CLIP)",
}


def make_sd_vae_set(directory: Path | str, seed: int = 0, clip: str = "clip-vision") -> dict[str, Path]:
    """A tiny RCOD_O whose VAE has the real SD architecture, and that VAE as a standalone file.

    Tools that build the SD VAE from its fixed architecture (ComfyUI's VAE loader, A1111) load
    ``sd-vae.safetensors``; with it a graph can mix their VAE encode/decode with RCOD's stages on
    the same weights. The VAE is random (about 84 M parameters, stored in fp16: 167 MB per copy).
    ``clip``: the CLIP folder the checkpoint's metadata names (the tiny set's, beside it)."""
    from .ldm_export import VAE_PREFIX, vae_to_ldm
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    out = {name: root / name for name in SD_VAE_SET}
    if out["base-sd21-sdvae"].exists():
        shutil.rmtree(out["base-sd21-sdvae"])
    write_tiny_base(out["base-sd21-sdvae"], "sd21_base", seed, vae_family="sd21_base", vae_dtype=torch.float16)
    with quiet_dtype_cast():
        vae = build_models("tiny", seed=seed, with_clip=False, vae_family="sd21_base").vae.to(torch.float16)
    ldm = vae_to_ldm(vae.state_dict(), vae.config)
    save_file({k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in ldm.items()}, str(out["sd-vae.safetensors"]),
              metadata={"format": "pt"})
    ckpt = canonicalize(osediff_like_dict("rcod_o", seed, vae_family="sd21_base"), "rcod_o")
    save_checkpoint(ckpt, out["rcod_o_sdvae.safetensors"], {"base": "base-sd21-sdvae", "clip": clip})
    return out


# -- whole pipelines ------------------------------------------------------------------------------

def tiny_pipeline(
    kind: str = "rcod_o",
    seed: int = 0,
    merge: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **spec_overrides,
) -> RCODPipeline:
    """A complete random-weight pipeline on the tiny configs: for tests, demos and smoke runs.

    RCOD_S / S3Diff get the release's file layout written above (with MEM for RCOD_S), so they run
    through exactly the loading path of real checkpoints.
    """
    if kind in S3_KINDS:
        ckpt = canonicalize(s3diff_like_dict(kind, seed), kind)
        parts = [canonicalize(de_net_state(seed), "de_net")]
        if kind == "rcod_s":
            parts.append(canonicalize(mem_dict(seed), "rcod_s_mem"))
        ckpt = merge_checkpoints(ckpt, *parts)
        spec = dataclasses.replace(ckpt.spec, **spec_overrides) if spec_overrides else ckpt.spec
    else:
        spec = ModelSpec.for_kind(kind, **spec_overrides)
    base = build_models("tiny", seed=seed, with_clip=spec.uses_vpim)
    generator = torch.Generator().manual_seed(seed + 1)
    prompt_embeds = None
    if not spec.uses_vpim:
        prompt_embeds = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=generator)
    if kind in S3_KINDS:
        return assemble_s3(base, spec, ckpt.groups, device=device, dtype=dtype, prompt_embeds=prompt_embeds)
    return assemble(base, spec, merge=merge, device=device, dtype=dtype, lora_generator=generator, prompt_embeds=prompt_embeds)
