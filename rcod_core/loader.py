"""Load base models, CLIP vision, text encoders and whole pipelines from local files — offline.

* Base (SD 2.1-base or SD-Turbo): a diffusers folder (``unet/``, ``vae/``, ``scheduler/``) or a
  single-file checkpoint (``.safetensors`` / ``.ckpt``, the original LDM key layout that ComfyUI
  keeps in ``models/checkpoints``), converted by diffusers with our shipped configs.
* CLIP ViT-L/14 vision: a transformers folder, or one ``.safetensors`` / ``.bin`` with or without
  the ``vision_model.`` prefix, vision-only or a full CLIPModel.
* Pipelines: :func:`load_pipeline` reads any supported checkpoint and builds the matching model.

Nothing here reaches a hub. :func:`download` exists for real machines and must be asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .checkpoints import Checkpoint, CheckpointError, load_checkpoint, merge_checkpoints, read_file
from .models import CONFIG_ROOT, BaseModels, build_clip_vision, family_dir, load_config

PathLike = Union[str, os.PathLike]
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")


# -- names given by users ------------------------------------------------------------------------

@torch.no_grad()
def own_storage_(module: nn.Module) -> nn.Module:
    """Give every parameter and buffer of ``module`` its own freshly allocated copy, in place.

    ``from_single_file`` on a ``.safetensors`` file leaves parameters as views into the memory-mapped
    file, at offsets only 8-byte aligned. CPU kernels pick other code paths for such tensors, so a
    model loaded that way gives outputs that differ in the last bits (~1e-6 measured on the tiny
    UNet) from the same weights in ordinary (64-byte aligned) allocations. After this call the
    outputs are bitwise those of the original model, and the file is no longer held open.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                p.data = p.data.clone()
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.clone()
    return module


def safe_model_path(folder: PathLike, name: str) -> Path:
    """Resolve a user-given model *name* inside ``folder``; refuse absolute paths and ``..``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":" and (len(name) == 2 or name[2] in "/\\")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or drive:  # "a:b.pkl" is a POSIX name, not a drive
        raise ValueError(f"model name {name!r} must be relative to the models folder, not an absolute path")
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise ValueError(f"model name {name!r} must not contain '..'")
    # containment is checked on the path as written (.. and absolute names are refused above), so a
    # model that is a symlink into another disk — common in ComfyUI setups — is allowed
    root = Path(os.path.abspath(folder))
    path = Path(os.path.normpath(root / name))
    if root != path and root not in path.parents:
        raise ValueError(f"model name {name!r} resolves outside {root}")
    if not path.exists():
        raise FileNotFoundError(f"model {name!r} not found in {root}")
    return path


# -- base models ---------------------------------------------------------------------------------

def detect_folder_family(folder: Path) -> Optional[str]:
    """'sd_turbo' / 'sd21_base' from a diffusers folder's scheduler config, None if unknown."""
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return None
    config = json.loads(sched.read_text(encoding="utf-8"))
    cls = config.get("_class_name")
    if cls == "EulerDiscreteScheduler" and config.get("timestep_spacing") == "trailing":
        return "sd_turbo"
    if cls in ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"):
        return "sd21_base"
    return None


def _unwrap_state_dict(obj: dict) -> dict:
    while isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def _architecture_for(state: dict, family: str, path: Path) -> str:
    """Which shipped config fits a single file's UNet: the real family's or the tiny one."""
    key = LDM_UNET_PREFIX + "input_blocks.0.0.weight"
    if key not in state:
        raise CheckpointError(f"{path}: not a Stable Diffusion single-file checkpoint (no {key!r})")
    channels = state[key].shape[0]
    for candidate in (family, "tiny"):
        if load_config(candidate, "unet")["block_out_channels"][0] == channels:
            return candidate
    raise CheckpointError(f"{path}: UNet with {channels} input channels fits no shipped config; use a diffusers folder")


def load_base(
    path: PathLike,
    family: str,
    with_clip: bool = False,
    clip: Optional[PathLike] = None,
) -> BaseModels:
    """UNet + VAE (+ CLIP vision) from a diffusers folder or a single file, in float32 on CPU.

    ``family`` ('sd21_base' or 'sd_turbo') is what the caller's checkpoint needs; a diffusers folder
    that declares the other family is refused (see :func:`rcod_core.build.check_base_family`).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"base model {os.fspath(path)!r} does not exist")
    if p.is_dir():
        if not (p / "unet").is_dir() or not (p / "vae").is_dir():
            raise CheckpointError(f"{p}: a diffusers base folder needs unet/ and vae/ subfolders")
        try:
            unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", local_files_only=True)
            vae = AutoencoderKL.from_pretrained(p, subfolder="vae", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p}: cannot load the diffusers base: {str(exc).splitlines()[0]}") from exc
        sched_file = p / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(sched_file.read_text(encoding="utf-8")) if sched_file.is_file() else load_config(family, "scheduler")
        detected = detect_folder_family(p)
    else:
        obj, _ = read_file(p)
        state = _unwrap_state_dict(obj)
        arch = _architecture_for(state, family, p)
        config_dir = str(family_dir(arch))
        try:
            unet = UNet2DConditionModel.from_single_file(state, config=config_dir, subfolder="unet", local_files_only=True)
            vae = AutoencoderKL.from_single_file(state, config=config_dir, subfolder="vae", local_files_only=True)
            missing = [n for n, t in [*unet.named_parameters(), *vae.named_parameters()] if t.is_meta]
            if missing:
                raise CheckpointError(f"{p}: the single file lacks weights, e.g. {missing[:3]}")
            # views into the file's buffer are only 8-byte aligned; own copies make outputs identical
            # to the same weights loaded from a diffusers folder (and release the file)
            own_storage_(unet)
            own_storage_(vae)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{p}: cannot convert the single-file base: {str(exc).splitlines()[0]}") from exc
        scheduler = load_config(family, "scheduler")
        detected = None  # a single file does not say whether it is SD 2.1-base or SD-Turbo
    clip_model = load_clip_vision(clip) if with_clip and clip is not None else None
    return BaseModels(unet.float().eval(), vae.float().eval(), clip_model, scheduler, detected)


# -- CLIP vision ---------------------------------------------------------------------------------

def _clip_config_from_weights(state: dict, path: Path) -> dict:
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: not a CLIP vision model (missing {exc.args[0]!r})") from exc
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
    hidden, _, patch_size, _ = patch.shape
    image_size = int(round((positions - 1) ** 0.5)) * patch_size
    for candidate in (CONFIG_ROOT / "clip_vit_l14", CONFIG_ROOT / "tiny" / "clip_vision"):
        config = json.loads((candidate / "config.json").read_text(encoding="utf-8"))
        if (config["hidden_size"], config["num_hidden_layers"], config["patch_size"], config["intermediate_size"],
                config["image_size"]) == (hidden, layers, patch_size, fc1.shape[0], image_size):
            return config
    beside = [path.with_suffix(".json"), path.parent / "config.json"]
    for file in beside:
        if file.is_file():
            config = json.loads(file.read_text(encoding="utf-8"))
            return config.get("vision_config", config)
    raise CheckpointError(
        f"{path}: a CLIP vision model with hidden size {hidden} and {layers} layers is not ViT-L/14; "
        f"put its config.json beside the file"
    )


def clip_vision_state(obj: dict, path: Path) -> dict:
    """Normalise a single-file CLIP state dict to CLIPVisionModel keys (``vision_model.*``)."""
    state = _unwrap_state_dict(obj)
    if any(k.startswith("vision_model.") for k in state):
        out = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    elif any(k.startswith(("embeddings.patch_embedding", "encoder.layers.")) for k in state):
        out = {f"vision_model.{k}": v for k, v in state.items()
               if k.split(".")[0] in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")}
    else:
        raise CheckpointError(f"{path}: no CLIP vision weights (expected keys starting with 'vision_model.')")
    return {k: v for k, v in out.items() if not k.endswith("position_ids")}


def load_clip_vision(path: PathLike) -> nn.Module:
    """CLIP vision tower from a transformers folder or one weights file (float32, eval)."""
    from transformers import CLIPVisionModel

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"CLIP vision model {os.fspath(path)!r} does not exist")
    if p.is_dir():
        try:
            return CLIPVisionModel.from_pretrained(p, local_files_only=True).float().eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: cannot load the CLIP vision folder: {str(exc).splitlines()[0]}") from exc
    obj, _ = read_file(p)
    state = clip_vision_state(obj, p)
    model = build_clip_vision(_clip_config_from_weights(state, p))
    if not any(k.startswith("vision_model.") for k in model.state_dict()):
        # some transformers versions name the tower's parameters without the file prefix
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    own = model.state_dict()
    own_keys = {k for k in own if not k.endswith("position_ids")}
    missing, unexpected = sorted(own_keys - set(state)), sorted(set(state) - own_keys)
    if missing or unexpected:
        raise CheckpointError(f"{p}: CLIP vision weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{p}: CLIP tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model.float().eval()


# -- text conditioning for the bases -------------------------------------------------------------

@torch.no_grad()
def encode_prompt(base_folder: PathLike, prompt: str = "") -> torch.Tensor:
    """(1, 77, D) text embeddings (last hidden state) from a diffusers base folder's text encoder.

    OSEDiff conditions on text (RAM tags + prompt; the tagger is not part of this package).
    """
    from transformers import AutoTokenizer, CLIPTextModel

    folder = Path(base_folder)
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise CheckpointError(
            f"{folder}: the base method is conditioned on text, which needs the base's text_encoder/ and "
            f"tokenizer/ (a diffusers folder); a single-file base or a folder without them cannot condition it"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0].float()


# -- whole pipelines -----------------------------------------------------------------------------

def load_pipeline(
    model: PathLike,
    base: Optional[PathLike] = None,
    clip: Optional[PathLike] = None,
    extras: Sequence[PathLike] = (),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    merge: bool = True,
    prompt: str = "",
    metadata_roots: Optional[Sequence[PathLike]] = None,
):
    """Any supported checkpoint → a ready :class:`~rcod_core.pipeline.RCODPipeline`.

    ``model`` is a file or ``"demo"``, the built-in model (:mod:`rcod_core.demo`).
    ``base`` / ``clip`` may be omitted when the checkpoint's metadata names them; with
    ``metadata_roots`` (e.g. a server's model folders) such a stored path must lie inside one of
    them, the same containment rule as a user-given model name. ``extras`` are
    the release's separate MEM / DEResNet files (a ``de_net.pth`` beside an S3Diff/RCOD_S pickle is
    picked up automatically). Everything is validated before any model is built.
    """
    from .demo import resolve_model

    model = resolve_model(model)
    ckpt = load_checkpoint(model)
    if ckpt.source_format in ("rcod_s_mem", "de_net"):
        raise CheckpointError(f"{model}: a {ckpt.source_format} file is a part of RCOD_S; load the generator and pass this as an extra")
    parts = [load_checkpoint(e) for e in extras]
    if ckpt.spec.kind in ("rcod_s", "s3diff") and "de_net" not in ckpt.groups and not any("de_net" in p.groups for p in parts):
        beside = Path(model).parent / "de_net.pth"
        if beside.is_file():
            parts.append(load_checkpoint(beside))
    if parts:
        ckpt = merge_checkpoints(ckpt, *parts)
    base = base or metadata_path(ckpt, "base", metadata_roots)
    if not base:
        raise ValueError(f"a base model is needed for {model} ({ckpt.spec.base}): pass base=/--base")
    clip = clip or metadata_path(ckpt, "clip", metadata_roots)
    if ckpt.spec.uses_vpim and not clip:
        raise ValueError(f"a CLIP ViT-L/14 vision model is needed for {model}: pass clip=/--clip")
    return pipeline_from_checkpoint(ckpt, base, clip, device=device, dtype=dtype, vae_dtype=vae_dtype, merge=merge, prompt=prompt)


def metadata_path(ckpt: Checkpoint, key: str, roots: Optional[Sequence[PathLike]] = None) -> Optional[Path]:
    """A base/CLIP path named in our file's metadata, relative to the checkpoint's folder; with
    ``roots``, refused unless it lies inside one of them (written as stored, ``..`` resolved)."""
    value = ckpt.metadata.get(key)
    if not value:
        return None
    path = Path(value)
    path = path if path.is_absolute() or ckpt.path is None else Path(ckpt.path).parent / path
    if roots is not None:
        where = Path(os.path.normpath(os.path.abspath(path)))
        inside = [r for r in (Path(os.path.abspath(r)) for r in roots) if where == r or r in where.parents]
        if not inside:
            raise ValueError(f"{ckpt.path}: its metadata names the {key} model {value!r}, which is outside the "
                             f"model folders; choose the {key} model in the loader instead")
    return path


def pipeline_from_checkpoint(
    ckpt: Checkpoint,
    base: PathLike,
    clip: Optional[PathLike] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    merge: bool = True,
    prompt: str = "",
):
    from .build import assemble, assemble_s3, check_base_family

    spec = ckpt.spec
    base_models = load_base(base, spec.base, with_clip=spec.uses_vpim, clip=clip)
    check_base_family(base_models, spec)
    prompt_embeds = None if spec.uses_vpim else encode_prompt(base, prompt)
    groups = ckpt.groups
    if spec.kind in ("rcod_o", "osediff"):
        return assemble(base_models, spec, groups["unet"], groups["vae"], groups.get("projection"), merge=merge,
                        device=device, dtype=dtype, vae_dtype=vae_dtype, prompt_embeds=prompt_embeds)
    return assemble_s3(base_models, spec, groups, device=device, dtype=dtype, vae_dtype=vae_dtype,
                       prompt_embeds=prompt_embeds)


#: names ``rcod download`` knows: hub repository and the files a local copy needs
HUB_MODELS = {
    "sd21-base": ("stabilityai/stable-diffusion-2-1-base",
                  ["model_index.json", "unet/*", "vae/*", "scheduler/*", "text_encoder/*", "tokenizer/*"]),
    "sd-turbo": ("stabilityai/sd-turbo",
                 ["model_index.json", "unet/*", "vae/*", "scheduler/*", "text_encoder/*", "tokenizer/*"]),
    "clip-vit-l14": ("openai/clip-vit-large-patch14", ["config.json", "preprocessor_config.json", "model.safetensors"]),
}


def download(name_or_repo: str, local_dir: PathLike | None = None, local_files_only: bool = False,
             allow_patterns: Sequence[str] | None = None) -> Path:
    """Explicit, opt-in hub download (huggingface_hub's cache and progress bar); never called
    implicitly. ``name_or_repo`` is a :data:`HUB_MODELS` name or a hub repository id. With
    ``local_files_only`` it only resolves what the cache already holds (offline machines)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, patterns = HUB_MODELS.get(name_or_repo, (name_or_repo, None))
    patterns = list(allow_patterns) if allow_patterns else patterns
    try:
        return Path(snapshot_download(repo_id, local_dir=local_dir, local_files_only=local_files_only,
                                      allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache"
            + (" (local_files_only: nothing is downloaded)" if local_files_only else f": {str(exc).splitlines()[0]}")
        ) from exc
