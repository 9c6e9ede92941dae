"""Assemble a runnable :class:`~rcod_core.pipeline.RCODPipeline` from base models, a spec and weights.

Order matters for precision: adapters are injected and loaded in fp32, merged (default), and only
then moved to the device and cast.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from . import adapters
from .models import BaseModels, build_models, randomize_lora, randomize_parameters
from .pipeline import RCODPipeline
from .prompting import VisualPromptEncoder
from .spec import ModelSpec

StateDict = Mapping[str, torch.Tensor]


def load_partial_state(model: nn.Module, state: StateDict, what: str, required_substrings: tuple[str, ...] = ("lora",)) -> None:
    """Load ``state`` into ``model``; every key must exist with the right shape, and every model
    key containing one of ``required_substrings`` must be provided. Raises ``ValueError`` naming keys."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"{what}: {len(unexpected)} key(s) not in the model, e.g. {unexpected[:3]}")
    missing = [k for k in own if any(s in k for s in required_substrings) and k not in state]
    if missing:
        raise ValueError(f"{what}: {len(missing)} expected key(s) missing, e.g. {missing[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{what}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                f"(wrong LoRA rank or another base model?)"
            )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


BASE_NAMES = {"sd21_base": "SD 2.1-base", "sd_turbo": "SD-Turbo"}


def check_base_family(base: BaseModels, spec: ModelSpec) -> None:
    """Refuse a base of the other family (e.g. an RCOD_S checkpoint on SD 2.1-base)."""
    if base.family is not None and base.family != spec.base:
        raise ValueError(
            f"a {spec.kind} model needs a {BASE_NAMES.get(spec.base, spec.base)} base, "
            f"but the given base is {BASE_NAMES.get(base.family, base.family)}"
        )


def layout_from_spec(spec: ModelSpec, base: BaseModels) -> adapters.LoraLayout:
    """The spec's module lists, or the OSEDiff rule applied to this UNet/VAE when the spec has none."""
    groups = spec.unet_lora_groups or adapters.osediff_unet_groups(base.unet)
    vae_groups = spec.vae_lora_groups or {adapters.VAE_ADAPTER: adapters.osediff_vae_modules(base.vae)}
    return adapters.LoraLayout(groups, vae_groups, spec.rank_unet, spec.rank_vae, spec.lora_alpha)


def assemble(
    base: BaseModels,
    spec: ModelSpec,
    unet_state: Optional[StateDict] = None,
    vae_state: Optional[StateDict] = None,
    projection_state: Optional[StateDict] = None,
    merge: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    prompt_embeds: torch.Tensor | None = None,
    lora_generator: torch.Generator | None = None,
) -> RCODPipeline:
    """OSEDiff-layout model (RCOD_O / OSEDiff) from base models and its trained weights.

    ``unet_state`` / ``vae_state`` use the release's key names (peft names, e.g.
    ``conv_in.base_layer.weight``, ``...to_q.lora_A.default_encoder.weight``). With no state and a
    ``lora_generator``, the LoRA gets seeded random weights (tests, demos, benchmarks).
    The base models are modified in place (adapters injected); pass fresh ones.
    """
    if spec.kind not in ("rcod_o", "osediff"):
        raise ValueError(f"assemble() builds OSEDiff-layout models (rcod_o, osediff), got kind {spec.kind!r}")
    check_base_family(base, spec)
    unet, vae = base.unet.float(), base.vae.float()
    layout = layout_from_spec(spec, base)
    adapters.apply_layout(unet, vae, layout)
    if lora_generator is not None:
        randomize_lora(unet, lora_generator)
        randomize_lora(vae, lora_generator)
    if unet_state is not None:
        load_partial_state(unet, unet_state, "state_dict_unet", ("lora", "conv_in"))
    if vae_state is not None:
        load_partial_state(vae, vae_state, "state_dict_vae", ("lora",))
    if merge:
        adapters.merge_lora(unet)
        adapters.merge_lora(vae)

    prompt_encoder = None
    if spec.uses_vpim:
        if base.clip_vision is None:
            raise ValueError(f"a {spec.kind} model needs a CLIP vision model for VPIM")
        prompt_encoder = VisualPromptEncoder(base.clip_vision.float(), unet.config.cross_attention_dim, spec.vpim_preprocess)
        if projection_state is not None:
            load_partial_state(prompt_encoder.projection, projection_state, "state_dict_proj", ("weight", "bias"))
        elif lora_generator is not None:
            randomize_parameters(prompt_encoder.projection, lora_generator)
    return RCODPipeline(
        unet, vae, prompt_encoder, spec, base.scheduler_config,
        device=device, dtype=dtype, vae_dtype=vae_dtype, prompt_embeds=prompt_embeds,
    )


def tiny_pipeline(
    kind: str = "rcod_o",
    seed: int = 0,
    merge: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **spec_overrides,
) -> RCODPipeline:
    """A complete random-weight pipeline on the tiny configs: for tests, demos and smoke runs.

    RCOD_S / S3Diff get the release's file layout written by :mod:`rcod_core.tiny` (with MEM for
    RCOD_S), so they run through exactly the loading path of real checkpoints.
    """
    if kind in ("rcod_s", "s3diff"):
        return _tiny_s3_pipeline(kind, seed, device, dtype, **spec_overrides)
    spec = ModelSpec.for_kind(kind, **spec_overrides)
    base = build_models("tiny", seed=seed, with_clip=spec.uses_vpim)
    generator = torch.Generator().manual_seed(seed + 1)
    prompt_embeds = None
    if not spec.uses_vpim:
        prompt_embeds = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=generator)
    return assemble(base, spec, merge=merge, device=device, dtype=dtype, lora_generator=generator, prompt_embeds=prompt_embeds)


def _tiny_s3_pipeline(kind: str, seed: int, device, dtype, **spec_overrides):
    import dataclasses

    from .checkpoints import canonicalize, merge_checkpoints
    from .degradation import assemble_s3
    from .tiny import de_net_state, mem_dict, s3diff_like_dict

    ckpt = canonicalize(s3diff_like_dict(kind, seed), kind)
    parts = [canonicalize(de_net_state(seed), "de_net")]
    if kind == "rcod_s":
        parts.append(canonicalize(mem_dict(seed), "rcod_s_mem"))
    ckpt = merge_checkpoints(ckpt, *parts)
    spec = dataclasses.replace(ckpt.spec, **spec_overrides) if spec_overrides else ckpt.spec
    base = build_models("tiny", seed=seed, with_clip=spec.uses_vpim)
    prompt_embeds = None
    if not spec.uses_vpim:
        generator = torch.Generator().manual_seed(seed + 1)
        prompt_embeds = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=generator)
    return assemble_s3(base, spec, ckpt.groups, device=device, dtype=dtype, prompt_embeds=prompt_embeds)
