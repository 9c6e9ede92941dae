"""Write Stable Diffusion "single-file" checkpoints (original LDM / CompVis key layout).

This is the layout ComfyUI users keep in ``models/checkpoints`` (e.g.
``v2-1_512-ema-pruned.safetensors``): the UNet under ``model.diffusion_model.*`` (``time_embed``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``) and the VAE under
``first_stage_model.*`` (``encoder.down.N.block.M``, ``encoder.mid.block_1/attn_1/block_2``,
``decoder.up.N`` in reversed order, ``quant_conv``, ``post_quant_conv``).

The mapping is the inverse of diffusers' ``convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint`` (``diffusers.loaders.single_file_utils``), so a file written here
loads back through ``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file``
with bitwise-identical weights. The key mapping only looks at key names, shapes and the config,
never at tensor values: it works on ``device="meta"`` state dicts for shape checks of real configs.

Loading such a file offline with diffusers (checked against diffusers 0.42.1)::

    UNet2DConditionModel.from_single_file(path, config=str(family_dir("tiny")), subfolder="unet",
                                          local_files_only=True)
    AutoencoderKL.from_single_file(path, config=str(family_dir("tiny")), subfolder="vae",
                                   local_files_only=True)

``config`` must be a ``str`` (a ``pathlib.Path`` is rejected by diffusers). With ``config`` given,
the model-level loaders do no model-type detection, so no text-encoder (``cond_stage_model.*``)
keys or SD2-detection keys are needed in the file. Without ``config`` diffusers would infer the
model type from keys (SD2 is recognised by
``model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight`` having 1024
input features) and fetch that model's config from the Hub, which fails offline. The
pipeline-level ``StableDiffusionPipeline.from_single_file`` additionally needs text-encoder keys;
pass them through ``extra`` of :func:`write_single_file` if you need that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# diffusers ResnetBlock2D (UNet) sub-module -> LDM ResBlock sub-module
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# top-level UNet modules
_UNET_TOP_NAMES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # class / addition embeddings (upscaler, SDXL-style); not used by SD 1.x/2.x base models
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",
}
# diffusers VAE attention (Attention with Linear projections) -> LDM AttnBlock (1x1 convs)
_VAE_ATTN_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# top-level VAE modules
_VAE_TOP_NAMES = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

_RE_UNET_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_RE_UNET_DOWNSAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_RE_UNET_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_RE_UNET_UPSAMPLE = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$")
_RE_UNET_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")

_RE_VAE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_VAE_DOWNSAMPLE = re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_RE_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_VAE_UPSAMPLE = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$")
_RE_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")

ConfigLike = Union[Mapping[str, Any], Any]


def _cfg(config: ConfigLike, name: str) -> Any:
    """Read ``name`` from a config dict, a diffusers ``FrozenDict``, or a model with ``.config``."""
    if isinstance(config, nn.Module) and hasattr(config, "config"):
        config = config.config
    if isinstance(config, Mapping):
        if name not in config:
            raise KeyError(f"config has no {name!r}")
        return config[name]
    return getattr(config, name)


def _rename_prefix(rest: str, table: Mapping[str, str]) -> Optional[str]:
    """Rename the leading dotted module path of ``rest`` by ``table`` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return None


def _unet_resnet(rest: str, key: str) -> str:
    new = _rename_prefix(rest, _UNET_RESNET_NAMES)
    if new is None:
        raise KeyError(f"unexpected UNet resnet parameter {key!r}")
    return new


def unet_key_map(keys: Iterable[str], config: ConfigLike) -> dict[str, str]:
    """Map diffusers ``UNet2DConditionModel`` state-dict keys to LDM keys (with ``model.diffusion_model.``).

    Only the names and ``config["layers_per_block"]`` are used. Input block ``i`` of the LDM UNet is
    ``1 + block * (layers_per_block + 1) + layer`` (``.0`` resnet, ``.1`` transformer, ``.0.op`` the
    downsampler after the last layer); output block ``i`` is ``block * (layers_per_block + 1) + layer``
    (``.0`` resnet, ``.1`` transformer, the upsampler at ``.2.conv`` when the up block has
    attentions, else ``.1.conv``). Raises ``KeyError`` for any key it does not know, so nothing is
    dropped silently.
    """
    keys = list(keys)
    lpb = _cfg(config, "layers_per_block")
    if not isinstance(lpb, int):
        raise ValueError(f"LDM export needs an int layers_per_block, got {lpb!r}")
    stride = lpb + 1
    up_with_attn = {int(m.group(1)) for k in keys if (m := _RE_UNET_UP.match(k)) and m.group(2) == "attentions"}

    mapping: dict[str, str] = {}
    for key in keys:
        new: Optional[str]
        if m := _RE_UNET_DOWN.match(key):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = 1 + block * stride + layer
            new = f"input_blocks.{i}.0.{_unet_resnet(rest, key)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif m := _RE_UNET_DOWNSAMPLE.match(key):
            i = 1 + int(m.group(1)) * stride + lpb
            new = f"input_blocks.{i}.0.op.{m.group(2)}"
        elif m := _RE_UNET_MID.match(key):
            kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                new = f"middle_block.{2 * idx}.{_unet_resnet(rest, key)}"
            else:
                new = f"middle_block.{2 * idx + 1}.{rest}"
        elif m := _RE_UNET_UP.match(key):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = block * stride + layer
            new = f"output_blocks.{i}.0.{_unet_resnet(rest, key)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif m := _RE_UNET_UPSAMPLE.match(key):
            block = int(m.group(1))
            i = block * stride + lpb
            slot = 2 if block in up_with_attn else 1
            new = f"output_blocks.{i}.{slot}.conv.{m.group(2)}"
        else:
            new = _rename_prefix(key, _UNET_TOP_NAMES)
            if new is None:
                raise KeyError(f"no LDM equivalent for UNet key {key!r}")
        mapping[key] = UNET_PREFIX + new
    _check_injective(mapping, "UNet")
    return mapping


def vae_key_map(keys: Iterable[str], config: ConfigLike) -> dict[str, str]:
    """Map diffusers ``AutoencoderKL`` state-dict keys to LDM keys (with ``first_stage_model.``).

    Encoder blocks keep their index (``encoder.down.N.block.M``, ``encoder.down.N.downsample``);
    decoder up block ``i`` becomes ``decoder.up.{n - 1 - i}`` with ``n = len(config["up_block_types"])``
    (LDM counts decoder levels from the highest resolution). Mid blocks become ``mid.block_1``,
    ``mid.attn_1``, ``mid.block_2``; ``conv_shortcut`` becomes ``nin_shortcut``. Raises ``KeyError``
    for unknown keys.
    """
    n_up = len(_cfg(config, "up_block_types"))
    mapping: dict[str, str] = {}
    for key in keys:
        new: Optional[str]
        if m := _RE_VAE_DOWN.match(key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet(m.group(3))}"
        elif m := _RE_VAE_DOWNSAMPLE.match(key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := _RE_VAE_UP.match(key):
            level = n_up - 1 - int(m.group(1))
            if level < 0:
                raise KeyError(f"VAE key {key!r} beyond the {n_up} up blocks of the config")
            new = f"decoder.up.{level}.block.{m.group(2)}.{_vae_resnet(m.group(3))}"
        elif m := _RE_VAE_UPSAMPLE.match(key):
            level = n_up - 1 - int(m.group(1))
            if level < 0:
                raise KeyError(f"VAE key {key!r} beyond the {n_up} up blocks of the config")
            new = f"decoder.up.{level}.upsample.conv.{m.group(2)}"
        elif m := _RE_VAE_MID.match(key):
            part, kind, idx, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                new = f"{part}.mid.block_{idx + 1}.{_vae_resnet(rest)}"
            else:
                attn = _rename_prefix(rest, _VAE_ATTN_NAMES)
                if attn is None or idx != 0:
                    raise KeyError(f"unexpected VAE attention parameter {key!r}")
                new = f"{part}.mid.attn_1.{attn}"
        else:
            new = _rename_prefix(key, _VAE_TOP_NAMES)
            if new is None:
                raise KeyError(f"no LDM equivalent for VAE key {key!r}")
        mapping[key] = VAE_PREFIX + new
    _check_injective(mapping, "VAE")
    return mapping


def _vae_resnet(rest: str) -> str:
    return "nin_shortcut" + rest[len("conv_shortcut"):] if rest.startswith("conv_shortcut.") else rest


def _check_injective(mapping: Mapping[str, str], what: str) -> None:
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        for k, v in mapping.items():
            if v in seen:
                raise ValueError(f"{what} keys {seen[v]!r} and {k!r} both map to {v!r}")
            seen[v] = k


def _is_vae_attn_matrix(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight"))


def unet_to_ldm(state_dict: Mapping[str, Tensor], config: ConfigLike) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> ``model.diffusion_model.*`` state dict.

    Tensors are passed through unchanged (same objects): SD 1.x/2.x need no reshapes in the UNet
    (``proj_in``/``proj_out`` are 1x1 convs in both layouts when ``use_linear_projection`` is false,
    Linear in both when it is true). Works on meta tensors.
    """
    mapping = unet_key_map(state_dict.keys(), config)
    return {mapping[k]: v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, Tensor], config: ConfigLike) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` state dict.

    The mid-block attention ``q``/``k``/``v``/``proj_out`` weights are 1x1 convs in LDM: diffusers'
    Linear ``(C, C)`` weights become ``(C, C, 1, 1)`` views (no copy). Works on meta tensors.
    """
    mapping = vae_key_map(state_dict.keys(), config)
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        new = mapping[k]
        if _is_vae_attn_matrix(new) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[new] = v
    return out


def ldm_state_dict(
    unet: Optional[nn.Module] = None,
    vae: Optional[nn.Module] = None,
    extra: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, Tensor]:
    """The combined LDM state dict of a diffusers UNet and/or VAE, plus ``extra`` keys.

    ``extra`` is copied in as-is (e.g. ``cond_stage_model.*`` text-encoder weights or the
    ``alphas_cumprod`` buffers of original checkpoints); a key that collides raises ``ValueError``.
    """
    sd: dict[str, Tensor] = {}
    if unet is not None:
        sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    if vae is not None:
        sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    for k, v in (extra or {}).items():
        if k in sd:
            raise ValueError(f"extra key {k!r} collides with an exported model key")
        sd[k] = v
    return sd


def _storage_safe(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, cloning any that share storage with an earlier one."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{k!r} is not a tensor ({type(v).__name__})")
        if v.is_meta:
            raise ValueError(f"{k!r} is a meta tensor: there is no data to write")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = t
    return out


def write_single_file(
    path: Union[str, Path],
    unet: Optional[nn.Module],
    vae: Optional[nn.Module],
    extra: Optional[Mapping[str, Tensor]] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write a single-file SD checkpoint in the LDM layout and return its path.

    ``unet``/``vae`` are diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` (either may be
    ``None``); ``extra`` holds additional tensors copied in under their own keys (see
    :func:`ldm_state_dict`). A ``.safetensors`` path is written with ``safetensors.torch.save_file``
    (``metadata`` as string header metadata, ``"format": "pt"`` by default); a ``.ckpt``/``.pt``/
    ``.pth`` path with ``torch.save({"state_dict": ...})`` (plus ``"metadata"`` when given), which
    diffusers reads with ``weights_only=True``. Tensors keep their dtype and are made contiguous.
    """
    path = Path(path)
    sd = _storage_safe(ldm_state_dict(unet, vae, extra))
    if not sd:
        raise ValueError("nothing to write: give a unet, a vae or extra tensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt"}
        for k, v in (metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must be str -> str, got {k!r}: {type(v).__name__}")
            meta[k] = v
        save_file(sd, str(path), metadata=meta)
    elif suffix in (".ckpt", ".pt", ".pth"):
        payload: dict[str, Any] = {"state_dict": sd}
        if metadata:
            payload["metadata"] = dict(metadata)
        torch.save(payload, path)
    else:
        raise ValueError(f"unsupported checkpoint suffix {path.suffix!r}: use .safetensors or .ckpt")
    return path


__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "unet_key_map",
    "vae_key_map",
    "unet_to_ldm",
    "vae_to_ldm",
    "ldm_state_dict",
    "write_single_file",
]
