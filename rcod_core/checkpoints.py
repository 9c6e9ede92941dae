"""Checkpoint formats: read safely, recognise by keys (never by name), canonicalise, write ours.

Official formats (torch pickles, always read with ``torch.load(weights_only=True)``):

=============  =====================================================================================
format         top-level keys (as the releases' ``save_model`` writes them)
=============  =====================================================================================
``osediff``    vae_lora_encoder_modules, unet_lora_{encoder,decoder,others}_modules, rank_unet,
               rank_vae, state_dict_unet, state_dict_vae                                  (8 keys)
``rcod_o``     the OSEDiff keys + state_dict_proj (VPIM Linear)                           (9 keys)
``s3diff``     unet_lora_target_modules, vae_lora_target_modules (regex), rank_unet, rank_vae,
               state_dict_unet, state_dict_vae, state_dict_{vae,unet}_{de,block,fuse}_mlp, w,
               state_embeddings                                                          (14 keys)
``rcod_s``     the S3Diff keys + state_dict_clip_proj (VPIM Linear: ``weight``/``bias``)  (15 keys)
``rcod_s_mem`` state_dict_clip_proj only, the MEM ``Linear(256, 1) + ReLU`` (``0.weight``/``0.bias``)
``de_net``     a plain DEResNet state dict (``conv_first.0.weight``, ``fc_degree.0.0.weight``, ...)
=============  =====================================================================================

Our format (``rcod``): one ``.safetensors`` whose tensors are named ``<group>.<key>`` (groups:
``unet``, ``vae``, ``projection``, ``mem``, ``de_net``, the S3Diff MLPs ...) and whose metadata holds
the :class:`~rcod_core.spec.ModelSpec` as JSON, so one file fully describes a model.
"""

from __future__ import annotations

import dataclasses

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .adapters import dedupe, modules_from_state_dict
from .files import atomic_write
from .grouping import GroupingRule
from .spec import ModelSpec

PathLike = Union[str, os.PathLike]
FORMAT_NAME = "rcod"
FORMAT_VERSION = "1"

OSEDIFF_KEYS = (
    "vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules",
    "unet_lora_others_modules", "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae",
)
S3DIFF_KEYS = (
    "unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
    "state_dict_vae", "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
    "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp", "w", "state_embeddings",
)
#: format → (required top-level keys, what it is)
OFFICIAL_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "rcod_s": (S3DIFF_KEYS + ("state_dict_clip_proj",), "RCOD_S generator (authors' release)"),
    "s3diff": (S3DIFF_KEYS, "S3Diff (s3diff.pkl)"),
    "rcod_o": (OSEDIFF_KEYS + ("state_dict_proj",), "RCOD_O (authors' release)"),
    "osediff": (OSEDIFF_KEYS, "OSEDiff (osediff.pkl)"),
    "rcod_s_mem": (("state_dict_clip_proj",), "RCOD_S metric estimation module (MEM)"),
}
DE_NET_MARKERS = ("conv_first.0.weight", "conv_first.1.weight", "fc_degree.0.0.weight")
S3DIFF_MLP_GROUPS = {
    "state_dict_unet_de_mlp": "unet_de_mlp", "state_dict_vae_de_mlp": "vae_de_mlp",
    "state_dict_unet_block_mlp": "unet_block_mlp", "state_dict_vae_block_mlp": "vae_block_mlp",
    "state_dict_unet_fuse_mlp": "unet_fuse_mlp", "state_dict_vae_fuse_mlp": "vae_fuse_mlp",
}
EMBEDDING_GROUPS = {"state_dict_unet_block": "unet_block_embeddings", "state_dict_vae_block": "vae_block_embeddings"}

TensorDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A model's weights in canonical groups plus its :class:`ModelSpec`."""

    spec: ModelSpec
    groups: dict[str, TensorDict]
    source_format: str
    path: Optional[str] = None
    metadata: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> TensorDict:
        """Flat ``<group>.<key>`` view (our file layout)."""
        return {f"{g}.{k}": v for g, sd in self.groups.items() for k, v in sd.items()}


# -- reading ----------------------------------------------------------------------------------------

def sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch ≥ 1.6), 'pickle' (legacy torch) or 'unknown', from the bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


#: byte strings whose presence in a torch file's pickle (or our metadata) marks a part, not a model
_PART_MARKS = {"de_net": (b"conv_first", b"fc_degree"), "rcod_s_mem": (b"state_dict_clip_proj",)}


def read_metadata(path: PathLike) -> dict[str, str]:
    """A ``.safetensors`` file's metadata without reading its tensors; ``{}`` for anything else or an
    unreadable file (the full load reports that properly)."""
    try:
        if sniff(Path(path)) != "safetensors":
            return {}
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # OSError, or safetensors' own error type on a damaged header
        return {}


def probe_role(path: PathLike) -> str:
    """``"model"``, ``"de_net"``, ``"rcod_s_mem"`` or ``"unknown"`` — cheaply, for menus: from our
    metadata, or by looking for key names in a torch zip's pickle bytes (nothing is unpickled)."""
    p = Path(path)
    try:
        kind = sniff(p)
        if kind == "safetensors":
            return "model" if read_metadata(p).get("format") == FORMAT_NAME else "unknown"
        if kind == "zip":
            with zipfile.ZipFile(p) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None or z.getinfo(name).file_size > 64 * 2**20:
                    return "unknown"
                data = z.read(name)
            if b"state_dict_unet" in data:
                return "model"
            for role, marks in _PART_MARKS.items():
                if all(m in data for m in marks):
                    return role
    except (OSError, ValueError, zipfile.BadZipFile, struct.error):
        return "unknown"
    except Exception:  # safetensors' own error type on a damaged header
        return "unknown"
    return "unknown"


def read_file(path: PathLike) -> tuple[dict, dict[str, str]]:
    """Read a checkpoint file without executing code. Returns (object, safetensors metadata)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} {_what_instead(p)}")
    kind = sniff(p)
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        if kind in ("zip", "pickle"):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            if not isinstance(obj, Mapping):
                raise CheckpointError(f"{p}: expected a dict of weights, found a {type(obj).__name__}")
            return dict(obj), {}
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p}: refused to load: the file contains objects that a weights-only load does not allow "
            f"(code could run). Only plain tensors, numbers, strings, lists and dicts are accepted. ({_first_line(exc)})"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, struct.error) as exc:
        raise CheckpointError(f"{p}: cannot read the file (truncated or corrupt?): {_first_line(exc)}") from exc
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"{p}: cannot read the file: {type(exc).__name__}: {_first_line(exc)}") from exc
    hint = "" if p.is_symlink() else f"; first bytes {_hex(p)}"  # never show bytes of a link's target
    raise CheckpointError(f"{p}: not a checkpoint (neither safetensors nor a torch file{hint})")


def _what_instead(p: Path) -> str:
    """Why a path is not a checkpoint file, in words (never the bytes of a link's target)."""
    import stat

    if p.is_symlink() and not p.exists():
        return "is a symbolic link to a missing file"
    if not p.exists():
        return "does not exist"
    if p.is_dir():
        return "is a folder, not a checkpoint file"
    mode = p.stat().st_mode
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a checkpoint file"
    return "is not a regular file (a device or socket?)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _hex(p: Path) -> str:
    with open(p, "rb") as f:
        return f.read(8).hex(" ")


def detect_format(obj: Mapping, metadata: Mapping[str, str] | None = None, path: str = "<memory>") -> str:
    """Name of the format of a checkpoint's top-level object, from its keys (and our metadata)."""
    metadata = metadata or {}
    if metadata.get("format") == FORMAT_NAME:
        return FORMAT_NAME
    keys = set(obj)
    if all(isinstance(v, torch.Tensor) for v in obj.values()) and any(m in keys for m in DE_NET_MARKERS):
        return "de_net"
    for name, (required, _) in OFFICIAL_FORMATS.items():  # most specific first
        if set(required) <= keys:
            if name == "rcod_s_mem" and not _is_mem_projection(obj["state_dict_clip_proj"]):
                continue
            return name
    best, best_overlap = None, 0.0
    for name, (required, _) in OFFICIAL_FORMATS.items():
        overlap = len(set(required) & keys) / len(required)
        if overlap > best_overlap and len(required) > 1:
            best, best_overlap = name, overlap
    if best is not None and best_overlap >= 0.5:
        missing = [k for k in OFFICIAL_FORMATS[best][0] if k not in keys]
        raise CheckpointError(f"{path}: looks like {OFFICIAL_FORMATS[best][1]} but lacks key(s) {missing}")
    shown = sorted(keys)[:8]
    raise CheckpointError(f"{path}: unrecognised checkpoint layout; top-level keys {shown}{' ...' if len(keys) > 8 else ''}")


def _is_mem_projection(sd: Any) -> bool:
    return isinstance(sd, Mapping) and "0.weight" in sd


# -- canonicalisation -------------------------------------------------------------------------------

def _tensor_dict(value: Any, what: str, path: str) -> TensorDict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise CheckpointError(f"{path}: {what} must be a dict of tensors")
    return {k: v.detach().clone() if isinstance(v, torch.nn.Parameter) else v for k, v in value.items()}


def _str_list(value: Any, what: str, path: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{path}: {what} must be a list of module names")
    return list(value)


def _rank(value: Any, what: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: {what} must be a positive integer, got {value!r}")
    return value


def check_lora(state: TensorDict, groups: Mapping[str, list[str]], rank: int, what: str, path: str) -> None:
    """Every listed module has lora_A/lora_B for its adapter, with the declared rank."""
    for adapter, modules in groups.items():
        for module in modules:
            for part in ("lora_A", "lora_B"):
                key = f"{module}.{part}.{adapter}.weight"
                if key not in state:
                    raise CheckpointError(f"{path}: {what} lacks key {key!r} (module listed for adapter {adapter!r})")
            a = state[f"{module}.lora_A.{adapter}.weight"]
            b = state[f"{module}.lora_B.{adapter}.weight"]
            if a.shape[0] != rank or b.shape[1] != rank:
                raise CheckpointError(
                    f"{path}: wrong LoRA rank in {what}: the file declares rank {rank} but {module!r} has "
                    f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}"
                )
    listed = {(a, m) for a, ms in groups.items() for m in ms}
    extra = [(a, m) for a, ms in modules_from_state_dict(state).items() for m in ms if (a, m) not in listed]
    if extra:
        raise CheckpointError(f"{path}: {what} holds LoRA weights for modules not in its module lists, e.g. {extra[:2]}")


#: the weight groups a model of each kind needs (parts such as de_net.pth and MEM come as extras)
_S3_GROUPS = ("unet", "vae", *sorted(set(S3DIFF_MLP_GROUPS.values())), *sorted(set(EMBEDDING_GROUPS.values())), "fourier")
REQUIRED_GROUPS: dict[str, tuple[str, ...]] = {
    "osediff": ("unet", "vae"), "rcod_o": ("unet", "vae", "projection"),
    "s3diff": _S3_GROUPS, "rcod_s": (*_S3_GROUPS, "projection"),
}


def validate_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """Every group the kind needs is there; every tensor is floating point and finite — or a
    :class:`CheckpointError` naming the file and the group or tensor."""
    path = checkpoint.path or "<memory>"
    if checkpoint.source_format not in ("rcod_s_mem", "de_net"):
        missing = [g for g in REQUIRED_GROUPS[checkpoint.spec.kind] if g not in checkpoint.groups]
        if missing:
            raise CheckpointError(f"{path}: a {checkpoint.spec.kind} model needs the weight group(s) {missing}, "
                                  f"which the file lacks (an incomplete or hand-made file?)")
    for group, tensors in checkpoint.groups.items():
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: {group}.{name} is a {type(tensor).__name__}, not a tensor")
            if not tensor.is_floating_point():
                raise CheckpointError(f"{path}: tensor {group}.{name} has dtype {tensor.dtype}; weights must be floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: tensor {group}.{name} holds NaN or Inf values (a damaged or diverged file)")
    return checkpoint


def canonicalize(obj: Mapping, fmt: str, path: str = "<memory>", metadata: Mapping[str, str] | None = None) -> Checkpoint:
    """Official or our layout → :class:`Checkpoint` with validated spec, groups and tensors."""
    return validate_checkpoint(_canonicalize(obj, fmt, path, metadata))


def _canonicalize(obj: Mapping, fmt: str, path: str, metadata: Mapping[str, str] | None) -> Checkpoint:
    if fmt == FORMAT_NAME:
        return _from_ours(obj, metadata or {}, path)
    if fmt in ("osediff", "rcod_o"):
        rank_unet = _rank(obj["rank_unet"], "rank_unet", path)
        rank_vae = _rank(obj["rank_vae"], "rank_vae", path)
        unet_groups = {
            "default_encoder": _str_list(obj["unet_lora_encoder_modules"], "unet_lora_encoder_modules", path),
            "default_decoder": _str_list(obj["unet_lora_decoder_modules"], "unet_lora_decoder_modules", path),
            "default_others": _str_list(obj["unet_lora_others_modules"], "unet_lora_others_modules", path),
        }
        unet_groups = {k: dedupe(v) for k, v in unet_groups.items() if v}
        vae_groups = {"default_encoder": dedupe(_str_list(obj["vae_lora_encoder_modules"], "vae_lora_encoder_modules", path))}
        unet = _tensor_dict(obj["state_dict_unet"], "state_dict_unet", path)
        vae = _tensor_dict(obj["state_dict_vae"], "state_dict_vae", path)
        check_lora(unet, unet_groups, rank_unet, "state_dict_unet", path)
        check_lora(vae, vae_groups, rank_vae, "state_dict_vae", path)
        for key in ("conv_in.base_layer.weight", "conv_in.base_layer.bias"):
            if key not in unet:
                raise CheckpointError(f"{path}: state_dict_unet lacks the trained {key!r}")
        spec = ModelSpec.for_kind(fmt, rank_unet=rank_unet, rank_vae=rank_vae,
                                  unet_lora_groups=unet_groups, vae_lora_groups=vae_groups)
        groups = {"unet": unet, "vae": vae}
        if fmt == "rcod_o":
            proj = _tensor_dict(obj["state_dict_proj"], "state_dict_proj", path)
            _check_linear(proj, "state_dict_proj", path)
            groups["projection"] = proj
        return Checkpoint(spec, groups, fmt, path)
    if fmt in ("s3diff", "rcod_s"):
        rank_unet = _rank(obj["rank_unet"], "rank_unet", path)
        rank_vae = _rank(obj["rank_vae"], "rank_vae", path)
        unet = _tensor_dict(obj["state_dict_unet"], "state_dict_unet", path)
        vae = _tensor_dict(obj["state_dict_vae"], "state_dict_vae", path)
        unet_groups = modules_from_state_dict(unet)
        vae_groups = modules_from_state_dict(vae)
        if not unet_groups or not vae_groups:
            raise CheckpointError(f"{path}: state_dict_unet / state_dict_vae hold no LoRA weights")
        check_lora(unet, unet_groups, rank_unet, "state_dict_unet", path)
        check_lora(vae, vae_groups, rank_vae, "state_dict_vae", path)
        groups = {"unet": unet, "vae": vae}
        for key, group in S3DIFF_MLP_GROUPS.items():
            groups[group] = _tensor_dict(obj[key], key, path)
        embeddings = obj["state_embeddings"]
        if not isinstance(embeddings, Mapping) or set(EMBEDDING_GROUPS) - set(embeddings):
            raise CheckpointError(f"{path}: state_embeddings must hold {sorted(EMBEDDING_GROUPS)}")
        for key, group in EMBEDDING_GROUPS.items():
            groups[group] = _tensor_dict(embeddings[key], f"state_embeddings[{key!r}]", path)
        w = obj["w"]
        if not isinstance(w, torch.Tensor) or w.ndim != 1:
            raise CheckpointError(f"{path}: w must be a 1-D tensor of Fourier frequencies")
        groups["fourier"] = {"w": w.detach().clone()}
        fuse_out = groups["unet_fuse_mlp"].get("weight")
        if fuse_out is None or fuse_out.shape[0] != rank_unet * rank_unet:
            raise CheckpointError(f"{path}: state_dict_unet_fuse_mlp must output rank_unet² = {rank_unet ** 2} values")
        extra = {"unet_lora_target_modules": list(obj["unet_lora_target_modules"]),
                 "vae_lora_target_modules": obj["vae_lora_target_modules"]}
        spec = ModelSpec.for_kind(fmt, rank_unet=rank_unet, rank_vae=rank_vae, unet_lora_groups=unet_groups,
                                  vae_lora_groups=vae_groups, extra=extra)
        if fmt == "rcod_s":
            proj = _tensor_dict(obj["state_dict_clip_proj"], "state_dict_clip_proj", path)
            _check_linear(proj, "state_dict_clip_proj", path)
            groups["projection"] = proj
        return Checkpoint(spec, groups, fmt, path)
    if fmt == "rcod_s_mem":
        mem = _tensor_dict(obj["state_dict_clip_proj"], "state_dict_clip_proj", path)
        return Checkpoint(ModelSpec.for_kind("rcod_s"), {"mem": {k.removeprefix("0."): v for k, v in mem.items()}}, fmt, path)
    if fmt == "de_net":
        return Checkpoint(ModelSpec.for_kind("s3diff"), {"de_net": _tensor_dict(obj, "DEResNet state dict", path)}, fmt, path)
    raise CheckpointError(f"{path}: unknown format {fmt!r}")


def _check_linear(sd: TensorDict, what: str, path: str) -> None:
    w, b = sd.get("weight"), sd.get("bias")
    if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
        raise CheckpointError(f"{path}: {what} must be a Linear layer's {{'weight': (out, in), 'bias': (out,)}}")


def _from_ours(flat: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str) -> Checkpoint:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported rcod format version {metadata.get('format_version')!r} (this is {FORMAT_VERSION})")
    try:
        spec = ModelSpec.from_json(metadata["spec"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the file's spec metadata is missing or invalid: {_first_line(exc)}") from exc
    groups: dict[str, TensorDict] = {}
    for key, tensor in flat.items():
        group, dot, name = key.partition(".")
        if not dot:
            raise CheckpointError(f"{path}: tensor name {key!r} lacks a '<group>.' prefix")
        groups.setdefault(group, {})[name] = tensor
    if "unet" in groups:
        check_lora(groups["unet"], spec.unet_lora_groups, spec.rank_unet, "unet", path)
    if "vae" in groups:
        check_lora(groups["vae"], spec.vae_lora_groups, spec.rank_vae, "vae", path)
    extra_meta = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "spec")}
    return Checkpoint(spec, groups, metadata.get("source_format", FORMAT_NAME), path, extra_meta)


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read, recognise and validate any supported checkpoint file."""
    obj, metadata = read_file(path)
    fmt = detect_format(obj, metadata, os.fspath(path))
    return canonicalize(obj, fmt, os.fspath(path), metadata)


# -- writing ours -----------------------------------------------------------------------------------

def save_checkpoint(checkpoint: Checkpoint, path: PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write our format: ``<group>.<key>`` tensors + the spec as JSON metadata (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "spec": checkpoint.spec.to_json(),
                "source_format": checkpoint.source_format}
    metadata.update({k: str(v) for k, v in (checkpoint.metadata or {}).items() if k not in metadata})
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().contiguous() for k, v in checkpoint.tensors().items()}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None
    except Exception as exc:  # safetensors reports write errors with its own type
        raise CheckpointError(f"{path}: cannot write the checkpoint ({_first_line(exc)})") from None
    return path


def merge_checkpoints(main: Checkpoint, *parts: Checkpoint) -> Checkpoint:
    """Attach MEM / DEResNet weights (separate files in the release) to a generator checkpoint."""
    groups = dict(main.groups)
    for part in parts:
        for group in ("mem", "de_net"):
            if group in part.groups:
                if main.spec.kind not in ("rcod_s", "s3diff"):
                    raise CheckpointError(f"{part.path}: {group} weights belong to RCOD_S/S3Diff, not to a {main.spec.kind} model")
                groups[group] = part.groups[group]
        unknown = set(part.groups) - {"mem", "de_net"}
        if unknown:
            raise CheckpointError(f"{part.path}: is a {part.source_format} model, not a MEM or DEResNet file")
    return Checkpoint(main.spec, groups, main.source_format, main.path, dict(main.metadata))


def convert(src: PathLike, dst: PathLike, extras: tuple[PathLike, ...] = (), metadata: Mapping[str, str] | None = None,
            grouping: Optional[GroupingRule] = None) -> Checkpoint:
    """Any supported checkpoint (+ MEM / DEResNet files) → our single ``.safetensors``; ``grouping``
    replaces the file's LDG rule (e.g. Eq. 5 with the bounds its training data had)."""
    ckpt = load_checkpoint(src)
    if grouping is not None:
        ckpt = dataclasses.replace(ckpt, spec=dataclasses.replace(ckpt.spec, grouping=grouping))
    if ckpt.source_format in ("rcod_s_mem", "de_net"):
        raise CheckpointError(f"{src}: a {ckpt.source_format} file is a part; convert the generator checkpoint and pass this one as an extra")
    if extras:
        ckpt = merge_checkpoints(ckpt, *(load_checkpoint(e) for e in extras))
    save_checkpoint(ckpt, dst, metadata)
    return dataclasses.replace(ckpt, path=str(dst))


def describe(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-able summary (format, kind, ranks, adapters, groups with tensor counts)."""
    groups = {g: len(sd) for g, sd in checkpoint.groups.items()}
    parameters = sum(v.numel() for sd in checkpoint.groups.values() for v in sd.values())
    if checkpoint.source_format in ("rcod_s_mem", "de_net"):  # parts: no model settings of their own
        return {"format": checkpoint.source_format, "groups": groups, "parameters": parameters}
    return {
        "format": checkpoint.source_format,
        "kind": checkpoint.spec.kind,
        "base": checkpoint.spec.base,
        "x0_mode": checkpoint.spec.x0_mode,
        "fixed_alpha_bar": checkpoint.spec.fixed_alpha_bar,
        "rank_unet": checkpoint.spec.rank_unet,
        "rank_vae": checkpoint.spec.rank_vae,
        "unet_adapters": {a: len(m) for a, m in checkpoint.spec.unet_lora_groups.items()},
        "vae_adapters": {a: len(m) for a, m in checkpoint.spec.vae_lora_groups.items()},
        # LDG: the rule stored with the weights; files without one (the release's) use its thresholds
        "grouping": checkpoint.spec.grouping.to_dict(),
        "grouping_rule": checkpoint.spec.grouping.describe() + (
            "" if str(checkpoint.path or "").endswith(".safetensors") else " (this format stores no rule: the release's)"),
        "groups": groups,
        "parameters": parameters,
    }
