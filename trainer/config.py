"""Training configuration: YAML/JSON files merged over defaults, validated before anything runs.

Every key is known: a misspelt key is an error naming the key and the keys allowed at that place.
Paths are checked (weights, data folders) by :func:`validate` before a single file is written.
Relative paths in a config file are resolved against the file's folder.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

MODELS = ("rcod_o", "rcod_s", "mem")

#: The complete schema with its defaults (the paper / release values; see configs/*.yaml).
DEFAULTS: dict[str, Any] = {
    "model": "rcod_o",
    "seed": 123,
    "output_dir": "runs/rcod",
    "base": {
        "family": "sd21_base",        # sd21_base | sd_turbo | tiny (random weights from rcod_core's tiny configs)
        "path": None,                 # diffusers folder or single-file SD checkpoint (not for tiny)
        "clip": None,                 # CLIP ViT-L/14 vision folder or file (not for tiny)
        "seed": 0,                    # tiny only: random-init seed
        "vae_warmup_steps": 0,        # tiny only: train the tiny VAE as an autoencoder first (CPU proof)
        "vae_warmup_lr": 1.0e-3,
        "vae_warmup_batch": 4,
    },
    "init": {
        "checkpoint": None,           # start from OSEDiff / RCOD_O (rcod_o) or S3Diff / RCOD_S (rcod_s, mem)
        "de_net": None,               # S3Diff DEResNet weights (rcod_s, mem); random-init when null and allowed
        "allow_random_de_net": False,
    },
    "spec": {},                       # rcod_core ModelSpec overrides (x0_mode, rank_unet, lora_alpha, ...)
    "data": {
        "train": [],                  # [{type: hr, path: DIR} | {type: paired, lr: DIR, hr: DIR}]
        "val": None,                  # {type: hr, path: DIR} or {type: paired, lr: DIR, hr: DIR}
        "val_count": 4,
        "crop": 512,
        "val_crop": None,             # default: crop
        "scale": 4,
        "flip": True,
        "cache_images": True,
        "num_workers": 0,
        "lr_upscale": "bicubic",
        "degradation": {},            # Real-ESRGAN settings (trainer.realesrgan.DegradationConfig)
    },
    "grouping": {
        "rule": "official",           # official (the release's thresholds) | paper (Eq. 5) | edges (alias: quantiles)
        "n": 3,
        "k": 250,
        "bounds": None,               # the file `rcod-train scan-metric --out FILE` writes (M_L min/max, quantiles)
        "m_min": None,                # paper rule: Eq. 5's M_L bounds (default: from the bounds file)
        "m_max": None,
        "quantiles": None,            # edges rule: ascending M_L edges (default: the bounds file's quantile edges)
        "timesteps": None,            # edges rule: t per group, lowest M_L first (default: k * (n - g))
        "latent": "sample",           # VAE latent for M_L and training: sample (release) | mode
    },
    "das": {"mode": "official", "k": 250, "low": 20, "high": 980},
    "loss": {
        "l2": None, "lpips": None, "vsd": None, "vsd_lora": None, "gan": None, "cfg": 7.5,
        "l2_weighting": "none",       # none (paper) | alpha_bar: L2 per sample x sqrt(alpha-bar_t) of its LDG t
    },
    "lpips": {
        "mode": "pretrained",         # pretrained | random-init (tests) | vae (LPIPS-style, base VAE features) | off
        "vgg_weights": None,          # torchvision vgg16 state dict (features.*)
        "lin_weights": None,          # LPIPS v0.1 linear layers (lpips package: weights/v0.1/vgg.pth)
    },
    "regulariser": {"rank": 4, "condition": "vpim"},  # vpim (the release) | null (an unconditional prior)
    "gan": {
        "backbone": "dino_vitb16",    # dino_vitb16 (vision-aided-gan 'dino') | tiny
        "weights": None,              # DINO ViT weights (transformers folder or state-dict file)
        "random_init": False,         # explicit: allow a random backbone (tests only)
        "image_size": 224,
    },
    "mem": {"generator": None},       # RCOD_S checkpoint whose frozen VAE gives the M_L targets
    "optim": {
        "lr": None, "lr_reg": None, "lr_disc": None, "betas": [0.9, 0.999], "weight_decay": 1.0e-2,
        "eps": 1.0e-8, "max_grad_norm": 1.0, "scheduler": "constant", "warmup_steps": 0,
    },
    "train": {
        "batch_size": 2,              # per process
        "grad_accum": 1,
        "max_steps": 100000,
        "mixed_precision": "no",      # no | fp16 | bf16
        "ema": {"enabled": False, "decay": 0.999},
        "threads": None,              # torch.set_num_threads on CPU
    },
    "log": {"every": 10, "tensorboard": "auto"},   # auto | on | off (a JSONL log is always written)
    "checkpoint": {"every": 1000},
    "validation": {"every": 1000, "timesteps": ["fidelity", "neutral", "realism"], "save_images": True},  # presets or t
}

#: Loss weights and learning rates of each model in the releases.
MODEL_DEFAULTS = {
    "rcod_o": {"loss": {"l2": 1.0, "lpips": 2.0, "vsd": 1.0, "vsd_lora": 1.0, "gan": 0.0},
               "optim": {"lr": 5e-5, "lr_reg": 5e-5, "lr_disc": 5e-5}},
    "rcod_s": {"loss": {"l2": 2.0, "lpips": 5.0, "vsd": 0.0, "vsd_lora": 0.0, "gan": 0.5},
               "optim": {"lr": 2e-5, "lr_reg": 2e-5, "lr_disc": 2e-5}},
    "mem": {"loss": {"l2": 0.0, "lpips": 0.0, "vsd": 0.0, "vsd_lora": 0.0, "gan": 0.0},
            "optim": {"lr": 1e-4, "lr_reg": 1e-4, "lr_disc": 1e-4}},
}

#: keys whose value is a free-form mapping validated elsewhere
FREE_FORM = {("spec",), ("data", "degradation")}
PATH_KEYS = {("grouping", "bounds"), ("base", "path"), ("base", "clip"), ("init", "checkpoint"), ("init", "de_net"), ("lpips", "vgg_weights"),
             ("lpips", "lin_weights"), ("gan", "weights"), ("mem", "generator"), ("output_dir",)}


class ConfigError(ValueError):
    """The configuration is invalid; raised before training writes anything."""


def _merge(base: dict, override: dict, where: tuple) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        here = (*where, key)
        if key not in base:
            place = ".".join(where) or "top level"
            raise ConfigError(f"unknown config key {'.'.join(here)!r}; allowed at {place}: {sorted(base)}")
        if here in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {'.'.join(here)!r} must be a mapping, got {type(value).__name__}")
            out[key] = copy.deepcopy(value)
        elif isinstance(base[key], dict) and base[key] is not None and not (key == "val" and where == ("data",)):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {'.'.join(here)!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml / json syntax
        raise ConfigError(f"{p}: cannot parse: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config must be a mapping at the top level")
    return data


def _resolve_paths(cfg: dict, root: Path) -> None:
    def fix(v):
        if v is None or not isinstance(v, str) or v == "":
            return v
        return v if os.path.isabs(v) else os.fspath((root / v).resolve())

    for keys in PATH_KEYS:
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = fix(node[keys[-1]])
    for entry in ([*cfg["data"]["train"], cfg["data"]["val"]] if cfg["data"]["val"] else cfg["data"]["train"]):
        if isinstance(entry, dict):
            for k in ("path", "lr", "hr"):
                if k in entry:
                    entry[k] = fix(entry[k])


def build(data: dict, root: Optional[Path] = None) -> dict:
    """Defaults ← the model's release values ← ``data``; raises :class:`ConfigError` on unknown keys."""
    model = data.get("model", DEFAULTS["model"])
    if model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {model!r}")
    cfg = _merge(DEFAULTS, {"loss": {}, "optim": {}}, ())
    for section, values in MODEL_DEFAULTS[model].items():
        cfg[section].update(values)
    cfg = _merge(cfg, data, ())
    if root is not None:
        _resolve_paths(cfg, root)
    check_values(cfg)
    return cfg


def load(path: str | os.PathLike, overrides: Optional[dict] = None) -> dict:
    data = read_file(path)
    cfg = build(data, Path(path).resolve().parent)
    if overrides:
        cfg = _merge(cfg, overrides, ())
        check_values(cfg)
    return cfg


def _choice(cfg: dict, keys: tuple, allowed) -> None:
    node = cfg
    for k in keys:
        node = node[k]
    if node not in allowed:
        raise ConfigError(f"config {'.'.join(keys)} must be one of {list(allowed)}, got {node!r}")


def check_values(cfg: dict) -> None:
    """Values that can be checked without touching files."""
    _choice(cfg, ("model",), MODELS)
    _choice(cfg, ("base", "family"), ("sd21_base", "sd_turbo", "tiny"))
    _choice(cfg, ("grouping", "rule"), ("official", "paper", "edges", "quantiles"))
    _choice(cfg, ("grouping", "latent"), ("sample", "mode"))
    _choice(cfg, ("das", "mode"), ("official", "paper"))
    _choice(cfg, ("lpips", "mode"), ("pretrained", "random-init", "vae", "off"))
    _choice(cfg, ("loss", "l2_weighting"), ("none", "alpha_bar"))
    _choice(cfg, ("regulariser", "condition"), ("vpim", "null"))
    _choice(cfg, ("gan", "backbone"), ("dino_vitb16", "tiny"))
    _choice(cfg, ("train", "mixed_precision"), ("no", "fp16", "bf16"))
    _choice(cfg, ("log", "tensorboard"), ("auto", "on", "off"))
    _choice(cfg, ("data", "lr_upscale"), ("bicubic", "bilinear"))
    _choice(cfg, ("optim", "scheduler"), ("constant", "constant_with_warmup", "linear", "cosine"))
    for key in ("l2", "lpips", "vsd", "vsd_lora", "gan", "cfg"):
        v = cfg["loss"][key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"config loss.{key} must be a number >= 0, got {v!r}")
    for key in ("batch_size", "grad_accum", "max_steps"):
        v = cfg["train"][key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"config train.{key} must be a positive integer, got {v!r}")
    for key in ("every",):
        for section in ("log", "checkpoint", "validation"):
            v = cfg[section][key]
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"config {section}.{key} must be an integer >= 0 (0 = never), got {v!r}")
    d = cfg["data"]
    if not isinstance(d["crop"], int) or d["crop"] < 8 or d["crop"] % d["scale"]:
        raise ConfigError(f"config data.crop must be an integer multiple of data.scale ({d['scale']}), got {d['crop']!r}")
    if not isinstance(d["train"], list):
        raise ConfigError("config data.train must be a list of sources ({type: hr, path: DIR} or {type: paired, lr: DIR, hr: DIR})")
    for i, src in enumerate(d["train"] + ([d["val"]] if d["val"] else [])):
        where = f"data.train[{i}]" if i < len(d["train"]) else "data.val"
        check_source(src, where)
    kinds = {s.get("type") for s in d["train"]}
    if len(kinds) > 1:
        raise ConfigError(f"config data.train mixes source types {sorted(kinds)}; use one type per run")
    g = cfg["grouping"]
    if g["quantiles"] is not None:
        q = g["quantiles"]
        if not isinstance(q, list) or not q or q != sorted(q):
            raise ConfigError("config grouping.quantiles must be an ascending list of M_L edges (see `rcod-train scan-metric`)")
    if g["rule"] in ("edges", "quantiles") and g["quantiles"] is None and g["bounds"] is None:
        raise ConfigError(f"config grouping.rule {g['rule']} needs grouping.quantiles or grouping.bounds "
                          f"(the file `rcod-train scan-metric --out FILE` writes)")
    if g["rule"] == "paper" and g["bounds"] is None and (g["m_min"] is None or g["m_max"] is None):
        raise ConfigError("config grouping.rule paper (Eq. 5) needs the training data's M_L bounds: set grouping.bounds "
                          "to the file `rcod-train scan-metric --out FILE` writes, or grouping.m_min and m_max")
    for key in ("m_min", "m_max"):
        if g[key] is not None and (not isinstance(g[key], (int, float)) or isinstance(g[key], bool)):
            raise ConfigError(f"config grouping.{key} must be a number, got {g[key]!r}")
    if g["timesteps"] is not None and (not isinstance(g["timesteps"], list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in g["timesteps"])):
        raise ConfigError(f"config grouping.timesteps must be a list of integer timesteps, got {g['timesteps']!r}")
    for t in cfg["validation"]["timesteps"]:
        try:
            from rcod_core.grouping import resolve_realism

            resolve_realism(t)
        except ValueError as exc:
            raise ConfigError(f"config validation.timesteps: {exc}") from None
    if cfg["base"]["family"] != "tiny" and cfg["base"]["path"] is None:
        raise ConfigError(f"config base.path is required for base.family {cfg['base']['family']!r} "
                          f"(a diffusers folder or single-file checkpoint); use family 'tiny' for random tiny models")
    if cfg["base"]["family"] != "tiny" and cfg["base"]["vae_warmup_steps"]:
        raise ConfigError("config base.vae_warmup_steps is for tiny random bases only")
    ema = cfg["train"]["ema"]
    if not 0.0 < float(ema["decay"]) < 1.0:
        raise ConfigError(f"config train.ema.decay must be in (0, 1), got {ema['decay']!r}")


def check_source(src: Any, where: str) -> None:
    if not isinstance(src, dict) or src.get("type") not in ("hr", "paired"):
        raise ConfigError(f"config {where} must be {{type: hr, path: DIR}} or {{type: paired, lr: DIR, hr: DIR}}, got {src!r}")
    allowed = {"hr": {"type", "path"}, "paired": {"type", "lr", "hr"}}[src["type"]]
    unknown = sorted(set(src) - allowed)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; allowed: {sorted(allowed)}")
    missing = sorted(allowed - set(src))
    if missing:
        raise ConfigError(f"config {where} lacks {missing}")


def check_paths(cfg: dict) -> None:
    """Every file the config names exists (weights, folders); raises :class:`ConfigError`."""
    def need(value, what):
        if value is not None and not os.path.exists(value):
            raise ConfigError(f"{what} {value!r} does not exist")

    need(cfg["base"]["path"], "config base.path: base model")
    need(cfg["base"]["clip"], "config base.clip: CLIP vision model")
    need(cfg["init"]["checkpoint"], "config init.checkpoint: start checkpoint")
    need(cfg["init"]["de_net"], "config init.de_net: DEResNet weights")
    need(cfg["mem"]["generator"], "config mem.generator: RCOD_S checkpoint")
    need(cfg["grouping"]["bounds"], "config grouping.bounds: scan-metric file")
    if cfg["base"]["family"] != "tiny" and cfg["model"] != "mem" and cfg["base"]["clip"] is None:
        raise ConfigError("config base.clip is required: RCOD models condition on CLIP ViT-L/14 vision tokens (VPIM)")
    if cfg["lpips"]["mode"] == "pretrained" and cfg["loss"]["lpips"] > 0:
        for key, what in (("vgg_weights", "torchvision VGG16 weights (vgg16-397923af.pth)"),
                          ("lin_weights", "LPIPS v0.1 linear-layer weights (lpips/weights/v0.1/vgg.pth)")):
            value = cfg["lpips"][key]
            if value is None:
                if key == "lin_weights":
                    from .losses import packaged_lpips_weights

                    if packaged_lpips_weights() is not None:
                        continue
                raise ConfigError(
                    f"LPIPS needs pretrained {what}: set lpips.{key} to the file (these weights cannot be downloaded "
                    f"here), or set lpips.mode: random-init (tests only) or loss.lpips: 0"
                )
            need(value, f"config lpips.{key}")
    if cfg["loss"]["gan"] > 0 and cfg["model"] == "rcod_s":
        if cfg["gan"]["weights"] is None and not cfg["gan"]["random_init"]:
            raise ConfigError(
                "the GAN discriminator's DINO ViT backbone needs pretrained weights: set gan.weights (transformers folder "
                "of facebook/dino-vitb16 or its state dict), or gan.random_init: true (tests only), or loss.gan: 0"
            )
        need(cfg["gan"]["weights"], "config gan.weights")
    if cfg["model"] in ("rcod_s", "mem") and cfg["init"]["de_net"] is None and not cfg["init"]["allow_random_de_net"]:
        if cfg["init"]["checkpoint"] is None and cfg["mem"]["generator"] is None:
            raise ConfigError("RCOD_S needs S3Diff's DEResNet weights: set init.de_net (de_net.pth), or "
                              "init.allow_random_de_net: true (tests only)")
    if cfg["model"] == "mem" and cfg["mem"]["generator"] is None:
        raise ConfigError("MEM training needs the trained RCOD_S generator: set mem.generator")
    if cfg["model"] == "rcod_o" and cfg["base"]["family"] == "sd_turbo":
        raise ConfigError("RCOD_O is trained on SD 2.1-base (base.family sd21_base or tiny)")
    if cfg["model"] in ("rcod_s", "mem") and cfg["base"]["family"] == "sd21_base":
        raise ConfigError("RCOD_S is trained on SD-Turbo (base.family sd_turbo or tiny)")
    if not cfg["data"]["train"]:
        raise ConfigError("config data.train is empty: give at least one image folder")
