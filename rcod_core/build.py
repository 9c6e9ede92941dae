"""Assemble the model core (:class:`~rcod_core.model.RCODModel`) from base models, a spec and weights,
and a runnable :class:`~rcod_core.pipeline.RCODPipeline` around it.

* :func:`build_osediff_model` — RCOD_O / OSEDiff: peft LoRA in the OSEDiff layout, VPIM projection.
* :func:`build_s3_model` — RCOD_S / S3Diff: degradation-guided LoRA, DEResNet, MEM, VPIM projection.
* :func:`build_model` — either, from canonical weight groups (``None``: fresh trainable init).
* :func:`assemble` / :func:`assemble_s3` — the same wrapped in a pipeline on a device.

The trainer builds its generators with these functions too. Order matters for precision: adapters
are injected and loaded in fp32, merged (inference default), and only then moved and cast.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from . import adapters
from .guided_lora import DegradationConditioning
from .mem import MetricEstimator
from .model import RCODModel
from .models import BaseModels, randomize_lora, randomize_parameters
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


OSEDIFF_KINDS = ("rcod_o", "osediff")
S3_KINDS = ("rcod_s", "s3diff")
Groups = Mapping[str, StateDict]


def _prompt_encoder(base: BaseModels, spec: ModelSpec, unet: nn.Module) -> Optional[VisualPromptEncoder]:
    if not spec.uses_vpim:
        return None
    if base.clip_vision is None:
        raise ValueError(f"a {spec.kind} model needs a CLIP vision model for VPIM")
    return VisualPromptEncoder(base.clip_vision.float(), unet.config.cross_attention_dim, spec.vpim_preprocess)


def build_osediff_model(
    base: BaseModels,
    spec: ModelSpec,
    unet_state: Optional[StateDict] = None,
    vae_state: Optional[StateDict] = None,
    projection_state: Optional[StateDict] = None,
    merge: bool = True,
    prompt_embeds: torch.Tensor | None = None,
    lora_generator: torch.Generator | None = None,
) -> RCODModel:
    """OSEDiff-layout model (RCOD_O / OSEDiff) from base models and its trained weights.

    ``unet_state`` / ``vae_state`` use the release's key names (peft names, e.g.
    ``conv_in.base_layer.weight``, ``...to_q.lora_A.default_encoder.weight``). With no state and a
    ``lora_generator``, the LoRA gets seeded random weights (tests, demos, benchmarks); with neither,
    peft's init (training from scratch). The base models are modified in place (adapters injected).
    """
    if spec.kind not in OSEDIFF_KINDS:
        raise ValueError(f"build_osediff_model() builds OSEDiff-layout models {OSEDIFF_KINDS}, got kind {spec.kind!r}")
    check_base_family(base, spec)
    unet, vae = base.unet.float(), base.vae.float()
    adapters.apply_layout(unet, vae, layout_from_spec(spec, base))
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
    prompt_encoder = _prompt_encoder(base, spec, unet)
    if prompt_encoder is not None:
        if projection_state is not None:
            load_partial_state(prompt_encoder.projection, projection_state, "state_dict_proj", ("weight", "bias"))
        elif lora_generator is not None:
            randomize_parameters(prompt_encoder.projection, lora_generator)
    return RCODModel(unet, vae, prompt_encoder, spec, base.scheduler_config, prompt_embeds=prompt_embeds)


def _load_all(module: nn.Module, state: StateDict, what: str) -> None:
    load_partial_state(module, state, what, required_substrings=("",))


def build_s3_model(
    base: BaseModels,
    spec: ModelSpec,
    groups: Optional[Groups] = None,
    prompt_embeds: torch.Tensor | None = None,
    fresh: tuple[str, ...] = (),
) -> RCODModel:
    """RCOD_S / S3Diff from base models (SD-Turbo) and canonical weight groups.

    ``groups=None`` gives a fresh model to train (S3Diff's initialisation; the global RNG draws it);
    otherwise every group a trained model needs must be there (``de_net`` from ``de_net.pth``;
    ``mem`` optional), except those named in ``fresh`` (``"projection"``: start RCOD_S training
    from S3Diff, which has none). Spec module lists default to S3Diff's target rules.
    """
    from .guided_lora import UNET_BLOCKS, VAE_BLOCKS, s3diff_unet_modules, s3diff_vae_modules

    if spec.kind not in S3_KINDS:
        raise ValueError(f"build_s3_model() builds {S3_KINDS}, got kind {spec.kind!r}")
    check_base_family(base, spec)
    if groups is not None and "de_net" not in groups:
        raise ValueError(f"a {spec.kind} model needs the DEResNet weights (de_net.pth): pass it as an extra file")
    unet, vae = base.unet.float(), base.vae.float()
    unet_groups = spec.unet_lora_groups or {"default": s3diff_unet_modules(unet)}
    vae_groups = spec.vae_lora_groups or {"vae_skip": s3diff_vae_modules(vae)}
    n_unet = groups["unet_block_embeddings"]["weight"].shape[0] if groups is not None else UNET_BLOCKS
    n_vae = groups["vae_block_embeddings"]["weight"].shape[0] if groups is not None else VAE_BLOCKS
    conditioning = DegradationConditioning.inject(unet, vae, unet_groups, vae_groups, spec.rank_unet, spec.rank_vae,
                                                  spec.lora_alpha, n_unet, n_vae)
    prompt_encoder = _prompt_encoder(base, spec, unet)
    mem = None
    if groups is not None:
        load_partial_state(unet, groups["unet"], "state_dict_unet", ("lora", "conv_in"))
        load_partial_state(vae, groups["vae"], "state_dict_vae", ("lora",))
        for name, module in conditioning.parts().items():  # the release's names in the messages
            what = ("de_net.pth" if name == "de_net" else f"state_embeddings[state_dict_{name[:-len('_embeddings')]}]"
                    if name.endswith("_block_embeddings") else f"state_dict_{name}")
            _load_all(module, groups[name], what)
        conditioning.w.copy_(groups["fourier"]["w"].float())
        if "mem" in groups:
            mem = MetricEstimator(conditioning.feature_dim)
            _load_all(mem.linear, groups["mem"], "MEM state_dict_clip_proj")
        if prompt_encoder is not None and not ("projection" in fresh and "projection" not in groups):
            if "projection" not in groups:
                raise ValueError(f"a {spec.kind} model needs its VPIM projection (state_dict_clip_proj); the weights have none")
            _load_all(prompt_encoder.projection, groups["projection"], "state_dict_clip_proj")
    return RCODModel(unet, vae, prompt_encoder, spec, base.scheduler_config, prompt_embeds=prompt_embeds,
                     conditioning=conditioning, mem=mem)


def build_model(base: BaseModels, spec: ModelSpec, groups: Optional[Groups] = None, merge: bool = True,
                prompt_embeds: torch.Tensor | None = None) -> RCODModel:
    """Any kind from canonical weight groups (:class:`~rcod_core.checkpoints.Checkpoint` groups)."""
    if spec.kind in S3_KINDS:
        return build_s3_model(base, spec, groups, prompt_embeds)
    groups = groups or {}
    return build_osediff_model(base, spec, groups.get("unet"), groups.get("vae"), groups.get("projection"),
                               merge=merge, prompt_embeds=prompt_embeds)


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
    """:func:`build_osediff_model` in a pipeline on ``device`` in ``dtype``."""
    model = build_osediff_model(base, spec, unet_state, vae_state, projection_state, merge, prompt_embeds, lora_generator)
    return RCODPipeline(model, device=device, dtype=dtype, vae_dtype=vae_dtype)


def assemble_s3(
    base: BaseModels,
    spec: ModelSpec,
    groups: Groups,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    prompt_embeds: torch.Tensor | None = None,
) -> RCODPipeline:
    """:func:`build_s3_model` in a pipeline on ``device`` in ``dtype``."""
    return RCODPipeline(build_s3_model(base, spec, groups, prompt_embeds), device=device, dtype=dtype, vae_dtype=vae_dtype)
