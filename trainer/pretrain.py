"""Pretraining of a small base model, for an RCOD that can be trained and run on CPUs.

Two stages, each from a YAML/JSON config (unknown keys are errors, paths relative to the file):

* ``stage: vae`` — a diffusers ``AutoencoderKL`` of the SD architecture (down blocks set the factor:
  3 levels ×4, 4 levels ×8) trained to reconstruct photo crops: L1 + L2 + a small KL term, AdamW
  with warm-up and cosine decay, bf16 autocast on CPUs that compute it. The latent scale
  (``scaling_factor`` = 1 / std of the latents, as SD's 0.18215) is measured on the training data.
  Writes a diffusers ``vae/`` folder and ``log.jsonl`` (held-out PSNR curve).
* ``stage: prior`` — a diffusers ``UNet2DConditionModel`` trained as an ε-prediction latent
  diffusion model (the SD scaled-linear schedule, uniform t) on the VAE's latents of the same
  photos. Cross-attention gets *null tokens* (one all-zero token): there is no pretrained CLIP here,
  so a prior conditioned on a random CLIP's tokens would learn nothing from them, while an
  unconditional prior is exactly what VSD needs as the real score (CFG then has no effect).
  The training crops are encoded once into a bank of latents. EMA weights (diffusers ``EMAModel``) are saved. Writes a diffusers base folder — ``unet/``,
  ``vae/``, ``scheduler/``, a small frozen ``clip_vision/`` for VPIM — that ``rcod-train train``
  takes as ``base.path``, plus ``prior_loss_per_t.json`` and ``prior_grid.png``.

    rcod-train pretrain --config trainer/examples/demo_vae.yaml
    rcod-train pretrain --config trainer/examples/demo_prior.yaml
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, _merge, read_file
from .data import HRCropDataset, centre_crop, generator, list_images, load_image, to_tensor

STAGES = ("vae", "prior")
#: t at which the prior's held-out denoising loss is reported
REPORT_T = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
GRID_T = (100, 250, 500, 750, 900)

COMMON: dict[str, Any] = {
    "stage": "vae",
    "seed": 0,
    "output_dir": "runs/pretrain",
    "data": {"train": None, "val": None, "crop": 96, "val_crop": 128, "val_crops_per_image": 2},
    "optim": {"lr": 2.0e-3, "min_lr": 2.0e-5, "warmup_steps": 100, "weight_decay": 0.0, "betas": [0.9, 0.99],
              "max_grad_norm": 1.0},
    "train": {"batch_size": 8, "max_steps": 2000, "threads": None, "bf16": "auto"},
    "log": {"every": 50},
    "validation": {"every": 250},
}
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {
        "vae": {"block_out_channels": [32, 64, 128], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16,
                "logvar_init": -6.0, "zero_residual": False},
        "loss": {"l1": 1.0, "l2": 1.0, "kl": 1.0e-6},
    },
    "prior": {
        "vae": None,                    # the vae stage's output folder
        "unet": {"block_out_channels": [64, 128, 128], "layers_per_block": 1, "cross_attention_dim": 64,
                 "attention_head_dim": 8, "norm_num_groups": 16,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
        "clip": {"family": "tiny", "seed": 0},   # the frozen CLIP vision model stored beside the base (VPIM)
        "ema": {"decay": 0.999},
        "bank_size": 6000,              # random training crops encoded once (the prior's data)
        "save_dtype": "float16",        # float16 | float32: the base's stored weights
    },
}
PATH_KEYS = (("output_dir",), ("data", "train"), ("data", "val"), ("vae",))


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None) -> dict:
    """A pretraining config: defaults of its stage ← the file ← ``overrides``; checked."""
    data = read_file(path)
    stage = data.get("stage", "vae")
    if stage not in STAGES:
        raise ConfigError(f"config stage must be one of {list(STAGES)}, got {stage!r}")
    cfg = _merge({**copy.deepcopy(COMMON), **copy.deepcopy(STAGE_DEFAULTS[stage])}, data, ())
    if overrides:
        cfg = _merge(cfg, overrides, ())
    root = Path(path).resolve().parent
    for keys in PATH_KEYS:
        node = cfg
        for k in keys[:-1]:
            node = node.get(k, {})
        if keys[-1] in node and isinstance(node[keys[-1]], str) and not os.path.isabs(node[keys[-1]]):
            node[keys[-1]] = os.fspath((root / node[keys[-1]]).resolve())
    check(cfg)
    return cfg


def check(cfg: dict) -> None:
    for key in ("train", "val"):
        if not cfg["data"][key]:
            raise ConfigError(f"config data.{key} must name an image folder")
        if not os.path.isdir(cfg["data"][key]):
            raise ConfigError(f"config data.{key}: {cfg['data'][key]!r} is not a folder")
    for section, key in (("train", "batch_size"), ("train", "max_steps"), ("data", "crop"), ("data", "val_crop")):
        v = cfg[section][key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"config {section}.{key} must be a positive integer, got {v!r}")
    if cfg["train"]["bf16"] not in ("auto", True, False):
        raise ConfigError(f"config train.bf16 must be auto, true or false, got {cfg['train']['bf16']!r}")
    if cfg["stage"] == "prior":
        if not cfg["vae"] or not os.path.isfile(os.path.join(cfg["vae"], "config.json")):
            raise ConfigError(f"config vae must be the vae stage's output folder (with config.json), got {cfg['vae']!r}")
        if cfg["save_dtype"] not in ("float16", "float32"):
            raise ConfigError(f"config save_dtype must be float16 or float32, got {cfg['save_dtype']!r}")


def use_bf16(setting) -> bool:
    """bf16 autocast: on when asked, or on ``auto`` where the CPU computes bf16 natively."""
    if setting != "auto":
        return bool(setting)
    from rcod_core.devices import cpu_has_native_bf16

    return cpu_has_native_bf16()


class _Log:
    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "log.jsonl", "w", encoding="utf-8")
        self.t0 = time.time()

    def __call__(self, record: dict) -> None:
        record = {**record, "elapsed_s": round(time.time() - self.t0, 1)}
        line = json.dumps(record)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _schedule(opt: torch.optim.Optimizer, cfg: dict):
    """Linear warm-up, then cosine decay to ``min_lr`` (diffusers' cosine schedule has no floor)."""
    o, steps = cfg["optim"], cfg["train"]["max_steps"]
    floor = o["min_lr"] / o["lr"]

    def factor(step: int) -> float:
        if step < o["warmup_steps"]:
            return (step + 1) / max(1, o["warmup_steps"])
        p = (step - o["warmup_steps"]) / max(1, steps - o["warmup_steps"])
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    o = cfg["optim"]
    return torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])


def validation_crops(folder: str, size: int, per_image: int) -> torch.Tensor:
    """Fixed held-out crops: the centre and (for ``per_image`` > 1) evenly spaced crops along the
    longer side, as a (N, 3, size, size) float tensor in 0..1."""
    crops = []
    for path in list_images(folder):
        arr = load_image(path)
        h, w = arr.shape[:2]
        if min(h, w) < size:
            continue
        if per_image <= 1:
            crops.append(centre_crop(arr, size))
            continue
        for i in range(per_image):
            y = (h - size) * i // max(1, per_image - 1) if h > w else (h - size) // 2
            x = (w - size) * i // max(1, per_image - 1) if w >= h else (w - size) // 2
            crops.append(arr[y:y + size, x:x + size])
    if not crops:
        raise ConfigError(f"no held-out image in {folder!r} is at least {size}px")
    return torch.stack([to_tensor(np.ascontiguousarray(c)) for c in crops])


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of 0..1 images after 8-bit quantisation, averaged over the batch."""
    from .engine import psnr as image_psnr

    return float(image_psnr((x.clamp(0, 1) * 255).round() / 255, y).mean())


# -- VAE ------------------------------------------------------------------------------------------------

def build_vae(cfg: dict):
    """The VAE with an init that trains from scratch: He-normal convolutions (PyTorch's default init
    shrinks the signal through the ~30 layers, and training sat at the mean colour, 15 dB, for
    hundreds of steps) and the posterior's log-variance started small (bias ``logvar_init``: at the
    default every latent carries noise of std 1 and the decoder learns from noise first)."""
    from diffusers import AutoencoderKL

    v = cfg["vae"]
    n = len(v["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=tuple(v["block_out_channels"]),
                         layers_per_block=v["layers_per_block"], latent_channels=v["latent_channels"],
                         norm_num_groups=v["norm_num_groups"], sample_size=cfg["data"]["val_crop"])
    c = v["latent_channels"]
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
        if v.get("zero_residual", False):
            for name, module in vae.named_modules():
                if name.endswith("conv2") and isinstance(module, torch.nn.Conv2d):
                    module.weight.zero_()
        vae.quant_conv.weight[c:].mul_(0.1)
        vae.quant_conv.bias[c:].fill_(v["logvar_init"])
    return vae


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Posterior-mode reconstruction in float32, 0..1 in and out."""
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch] * 2 - 1
        out.append((vae.decode(vae.encode(x).latent_dist.mode()).sample.float() + 1) / 2)
    return torch.cat(out)


@torch.no_grad()
def latent_std(vae, dataset, count: int, batch: int = 8) -> float:
    """Standard deviation of the posterior samples over ``count`` training crops (SD's scale rule)."""
    values = [vae.encode(x * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(i * batch)).flatten()
              for i, x in enumerate(stream_batches(dataset, count, batch))]
    return float(torch.cat(values).std())


def train_vae(cfg: dict) -> dict:
    out = Path(cfg["output_dir"])
    log = _Log(out)
    torch.manual_seed(cfg["seed"])
    dataset = HRCropDataset(list_images(cfg["data"]["train"]), cfg["data"]["crop"], cfg["seed"])
    val = validation_crops(cfg["data"]["val"], cfg["data"]["val_crop"], cfg["data"]["val_crops_per_image"])
    vae = build_vae(cfg).train()
    opt = _optimizer(vae.parameters(), cfg)
    sched = _schedule(opt, cfg)
    bf16, w = use_bf16(cfg["train"]["bf16"]), cfg["loss"]
    bs, steps = cfg["train"]["batch_size"], cfg["train"]["max_steps"]
    log({"stage": "vae", "parameters": sum(p.numel() for p in vae.parameters()), "bf16": bf16,
         "factor": 2 ** (len(cfg["vae"]["block_out_channels"]) - 1), "val_crops": int(val.shape[0])})
    curve = []
    for step in range(steps):
        x = torch.stack([dataset[k]["hr"] for k in range(step * bs, (step + 1) * bs)]) * 2 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=generator(cfg["seed"], step, 31))
            y = vae.decode(z).sample.float()
        loss_l1, loss_l2 = (y - x).abs().mean(), (y - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = w["l1"] * loss_l1 + w["l2"] * loss_l2 + w["kl"] * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg["optim"]["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg["log"]["every"] == 0:
            log({"step": step + 1, "l1": round(float(loss_l1.detach()), 5), "l2": round(float(loss_l2.detach()), 6),
                 "kl": round(float(kl.detach()), 4), "lr": sched.get_last_lr()[0]})
        if (step + 1) % cfg["validation"]["every"] == 0 or step + 1 == steps:
            vae.eval()
            value = psnr(reconstruct(vae, val), val)
            vae.train()
            curve.append((step + 1, value))
            log({"step": step + 1, "val_psnr": round(value, 3)})
    vae.eval()
    std = latent_std(vae, dataset, 256)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(out)
    summary = {"val_psnr": curve[-1][1], "curve": curve, "scaling_factor": vae.config.scaling_factor,
               "parameters": sum(p.numel() for p in vae.parameters())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log({"done": True, **{k: v for k, v in summary.items() if k != "curve"}})
    return summary


# -- prior ------------------------------------------------------------------------------------------------

def build_unet(cfg: dict, factor: int, latent_channels: int):
    from diffusers import UNet2DConditionModel

    u = cfg["unet"]
    return UNet2DConditionModel(
        sample_size=cfg["data"]["crop"] // factor, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(u["block_out_channels"]), down_block_types=tuple(u["down_block_types"]),
        up_block_types=tuple(u["up_block_types"]), layers_per_block=u["layers_per_block"],
        cross_attention_dim=u["cross_attention_dim"], attention_head_dim=u["attention_head_dim"],
        norm_num_groups=u["norm_num_groups"], use_linear_projection=True)


def stream_batches(dataset, count: int, batch: int):
    """The first ``count`` crops of a seeded training stream, ``batch`` at a time (0..1 tensors)."""
    for i in range(0, count, batch):
        yield torch.stack([dataset[k]["hr"] for k in range(i, min(count, i + batch))])


@torch.no_grad()
def encode_latents(vae, batches) -> torch.Tensor:
    """Scaled posterior-mode latents of image batches in 0..1 (the VAE is frozen in this stage):
    the prior's data, encoded once, and its held-out crops."""
    return torch.cat([vae.encode(x * 2 - 1).latent_dist.mode() * vae.config.scaling_factor for x in batches])


def null_tokens(batch: int, dim: int) -> torch.Tensor:
    """The prior's only condition: one all-zero cross-attention token per sample."""
    return torch.zeros(batch, 1, dim)


@torch.no_grad()
def loss_per_t(unet, latents: torch.Tensor, alphas: torch.Tensor, ts=REPORT_T, seed: int = 0) -> dict[int, float]:
    """Held-out ε-MSE at fixed t with fixed noise."""
    from rcod_core.schedule import add_noise

    out = {}
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    for t in ts:
        tt = torch.full((latents.shape[0],), t, dtype=torch.long)
        z_t = add_noise(latents, noise, alphas[tt])
        eps = unet(z_t, tt, encoder_hidden_states=null_tokens(latents.shape[0], unet.config.cross_attention_dim)).sample
        out[int(t)] = round(float(F.mse_loss(eps.float(), noise)), 5)
    return out


@torch.no_grad()
def denoise_grid(unet, vae, latents: torch.Tensor, alphas: torch.Tensor, path: Path, ts=GRID_T, seed: int = 0) -> None:
    """A PNG: per held-out crop, the clean decode, then for each t the noisy latent's decode above
    the one-step x0 estimate's decode (Eq. 3), side by side."""
    from PIL import Image

    from rcod_core.schedule import add_noise, x0_from_eps

    sf = vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    dec = lambda z: ((vae.decode(z / sf).sample.float() + 1) / 2).clamp(0, 1)  # noqa: E731
    clean = dec(latents)
    rows_top, rows_bottom = [clean], [clean]
    for t in ts:
        tt = torch.full((latents.shape[0],), t, dtype=torch.long)
        ab = alphas[tt]
        z_t = add_noise(latents, noise, ab)
        eps = unet(z_t, tt, encoder_hidden_states=null_tokens(latents.shape[0], unet.config.cross_attention_dim)).sample
        rows_top.append(dec(z_t))
        rows_bottom.append(dec(x0_from_eps(z_t, eps.float(), ab)))
    blocks = []
    for i in range(latents.shape[0]):
        top = torch.cat([r[i] for r in rows_top], dim=2)
        bottom = torch.cat([r[i] for r in rows_bottom], dim=2)
        blocks.append(torch.cat([top, bottom], dim=1))
    grid = torch.cat(blocks, dim=1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def save_model(model, folder: Path) -> None:
    """``save_pretrained`` without the ``_name_or_path`` diffusers records from ``from_pretrained``
    (the folder this machine loaded it from: it means nothing beside the copy)."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_clip(folder: Path, family: str, seed: int) -> None:
    """The frozen CLIP vision tower VPIM reads (random-init from the family's config: no pretrained
    CLIP can be fetched here; RCOD trains the projection behind it)."""
    from rcod_core.models import build_clip_vision, load_config as family_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = build_clip_vision(family_config(family, "clip_vision"))
    clip.save_pretrained(folder)


def train_prior(cfg: dict) -> dict:
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from rcod_core.models import load_config as family_config, vae_factor
    from rcod_core.schedule import add_noise, alphas_cumprod

    out = Path(cfg["output_dir"])
    log = _Log(out)
    torch.manual_seed(cfg["seed"])
    vae = AutoencoderKL.from_pretrained(cfg["vae"]).eval().requires_grad_(False)
    factor = vae_factor(vae)
    if cfg["data"]["crop"] % factor:
        raise ConfigError(f"config data.crop must be a multiple of the VAE's factor {factor}")
    dataset = HRCropDataset(list_images(cfg["data"]["train"]), cfg["data"]["crop"], cfg["seed"])
    bank = encode_latents(vae, stream_batches(dataset, cfg["bank_size"], 16))
    val_images = validation_crops(cfg["data"]["val"], cfg["data"]["val_crop"], cfg["data"]["val_crops_per_image"])
    val = encode_latents(vae, val_images.split(8))
    scheduler_config = family_config("sd21_base", "scheduler")
    alphas = alphas_cumprod(scheduler_config).float()
    unet = build_unet(cfg, factor, vae.config.latent_channels).train()
    ema = EMAModel(unet.parameters(), decay=cfg["ema"]["decay"])
    opt = _optimizer(unet.parameters(), cfg)
    sched = _schedule(opt, cfg)
    bf16 = use_bf16(cfg["train"]["bf16"])
    bs, steps, dim = cfg["train"]["batch_size"], cfg["train"]["max_steps"], unet.config.cross_attention_dim
    log({"stage": "prior", "parameters": sum(p.numel() for p in unet.parameters()), "bf16": bf16,
         "latent_bank": len(bank), "latent_crop": cfg["data"]["crop"] // factor, "val_crops": int(val.shape[0])})
    for step in range(steps):
        g = generator(cfg["seed"], step, 43)
        z0 = bank[torch.randint(len(bank), (bs,), generator=g)]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, len(alphas), (bs,), generator=g)
        z_t = add_noise(z0, noise, alphas[t])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            eps = unet(z_t, t, encoder_hidden_states=null_tokens(bs, dim)).sample
        loss = F.mse_loss(eps.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg["optim"]["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if (step + 1) % cfg["log"]["every"] == 0:
            log({"step": step + 1, "loss": round(float(loss.detach()), 5), "lr": sched.get_last_lr()[0]})
        if (step + 1) % cfg["validation"]["every"] == 0 or step + 1 == steps:
            unet.eval()
            log({"step": step + 1, "val_loss_per_t": loss_per_t(unet, val[:16], alphas)})
            unet.train()
    ema.copy_to(unet.parameters())
    unet.eval()
    per_t = loss_per_t(unet, val, alphas)
    dtype = getattr(torch, cfg["save_dtype"])
    base = out / "base"
    if base.exists():
        shutil.rmtree(base)
    for name, model in (("unet", unet), ("vae", vae)):
        save_model(model.to(dtype), base / name)
    (base / "scheduler").mkdir(parents=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=1) + "\n", encoding="utf-8")
    write_clip(base / "clip_vision", cfg["clip"]["family"], cfg["clip"]["seed"])
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "rcod_note": "small SD-architecture base trained by rcod-train pretrain",
    }, indent=1) + "\n", encoding="utf-8")
    # the report uses the stored (rounded) weights, as every later stage does
    unet, vae = unet.float(), vae.float()
    per_t_stored = loss_per_t(unet, val, alphas)
    denoise_grid(unet, vae, val[:4], alphas, out / "prior_grid.png")
    summary = {"val_loss_per_t": per_t, "val_loss_per_t_stored": per_t_stored,
               "parameters": sum(p.numel() for p in unet.parameters()), "base": os.fspath(base)}
    (out / "prior_loss_per_t.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log({"done": True, **summary})
    return summary


def run(cfg: dict) -> dict:
    if cfg["train"]["threads"]:
        torch.set_num_threads(int(cfg["train"]["threads"]))
    return train_vae(cfg) if cfg["stage"] == "vae" else train_prior(cfg)
