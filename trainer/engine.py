"""The training loop on Hugging Face accelerate: RCOD_O (L2 + LPIPS + VSD), RCOD_S (L2 + LPIPS + GAN), MEM.

Order of work: config and paths checked → datasets checked → models built → only then the output
folder is written. A step is one optimiser update (``grad_accum`` micro-batches). Checkpoints hold:

* ``model.safetensors`` — the generator in rcod_core's format (``rcod_core.loader.load_pipeline`` and
  the ``rcod`` CLI read it; its metadata names the base and CLIP folders relative to the file);
* accelerate's state (optimisers, schedulers, RNG, trainable weights only, EMA) for exact resume;
* ``trainer_state.json`` — the step, the micro-batches consumed, the config.

A checkpoint folder is written under a temporary name and renamed when complete; ``latest.json`` in
the run folder names the newest one. Resume reads the step from the JSON, never from a folder name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rcod_core.grouping import resolve_realism, select_timestep
from rcod_core.model import measure_metric
from rcod_core.models import vae_factor

from . import config as config_mod
from .data import (DataError, HRCropDataset, PairedCropDataset, StreamSampler, ValidationSet, centre_crop, generator,
                   image_size, list_images, load_image, pair_files, to_tensor)
from .realesrgan import DegradationConfig, RealESRGANDegradation
from .losses import build_discriminator, build_lpips, gan_loss, vsd_loss

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
# stream salts: one independent random stream per purpose and sample
SALT_DEGRADE, SALT_LATENT, SALT_VSD, SALT_REG, SALT_VAL = 3, 4, 5, 6, 7


class TrainError(RuntimeError):
    pass


# -- data ---------------------------------------------------------------------------------------------

def build_train_dataset(cfg: dict):
    d = cfg["data"]
    sources = d["train"]
    if sources[0]["type"] == "hr":
        files = [f for s in sources for f in list_images(s["path"])]
        return HRCropDataset(files, d["crop"], cfg["seed"], d["flip"], d["cache_images"])
    pairs = [p for s in sources for p in pair_files(s["lr"], s["hr"])]
    return PairedCropDataset(pairs, d["crop"], d["scale"], cfg["seed"], d["flip"], d["cache_images"])


def build_validation(cfg: dict, degrade: RealESRGANDegradation) -> Optional[ValidationSet]:
    d = cfg["data"]
    src = d["val"]
    if not src:
        return None
    size = d["val_crop"] or d["crop"]
    hrs, lrs, names = [], [], []
    if src["type"] == "hr":
        files = list_images(src["path"])[: d["val_count"]]
        for i, f in enumerate(files):
            w, h = image_size(f)
            if w < size or h < size:
                raise DataError(f"validation image {os.fspath(f)!r} is {w}x{h}, smaller than the {size}px crop")
            hr = to_tensor(centre_crop(load_image(f), size))
            lr, _ = degrade.degrade_one(hr, generator(cfg["seed"], i, SALT_VAL))
            hrs.append(hr), lrs.append(lr), names.append(f.stem)
    else:
        s = d["scale"]
        for lr_path, hr_path in pair_files(src["lr"], src["hr"])[: d["val_count"]]:
            hr_arr = load_image(hr_path)
            if min(hr_arr.shape[:2]) < size:
                raise DataError(f"validation image {os.fspath(hr_path)!r} is smaller than the {size}px crop")
            h, w = hr_arr.shape[:2]
            y, x = ((h - size) // 2) // s * s, ((w - size) // 2) // s * s
            hrs.append(to_tensor(hr_arr[y:y + size, x:x + size]))
            lr_arr = load_image(lr_path)
            lrs.append(to_tensor(lr_arr[y // s:(y + size) // s, x // s:(x + size) // s]))
            names.append(hr_path.stem)
    return ValidationSet(torch.stack(hrs), torch.stack(lrs), names)


def upscale(lr: torch.Tensor, size, mode: str) -> torch.Tensor:
    from rcod_core.imageops import resize

    return resize(lr, tuple(size), mode)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1] (RGB, all pixels)."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def sample_draws(seed: int, indices: list[int], latent_shape, latent: str, device=None) -> dict:
    """Every random draw of a training step, per sample from its own seeded streams: the latent
    draws of LR and HR (``None`` when ``latent`` is ``mode``), the VSD and regulariser noise and the
    regulariser's timestep. Training, ``scan-metric`` and MEM targets use the same draws."""
    n_lr, n_hr, n_vsd, n_reg, t_reg = [], [], [], [], []
    for k in indices:
        g = generator(seed, k, SALT_LATENT)
        n_lr.append(torch.randn(latent_shape, generator=g))
        n_hr.append(torch.randn(latent_shape, generator=g))
        g = generator(seed, k, SALT_VSD)
        n_vsd.append(torch.randn(latent_shape, generator=g))
        g = generator(seed, k, SALT_REG)
        n_reg.append(torch.randn(latent_shape, generator=g))
        t_reg.append(int(torch.randint(0, 1000, (), generator=g)))
    stack = lambda xs: torch.stack(xs).to(device)  # noqa: E731
    sampled = latent == "sample"
    return {"noise_lr": stack(n_lr) if sampled else None, "noise_hr": stack(n_hr) if sampled else None,
            "noise_vsd": stack(n_vsd), "noise_reg": stack(n_reg), "t_reg": torch.tensor(t_reg, device=device)}


def latent_shape(vae, hr: torch.Tensor) -> tuple[int, int, int]:
    f = vae_factor(vae)
    return (int(vae.config.latent_channels), hr.shape[-2] // f, hr.shape[-1] // f)


# -- the tiny base's VAE warm-up (CPU proof only) -------------------------------------------------------

def vae_warmup(cfg: dict, dataset, log: Callable) -> Callable:
    """A random tiny VAE cannot reconstruct anything; for the CPU proof it is first trained as an
    autoencoder (L1 + small KL) on HR crops, deterministically, and then frozen like SD's VAE."""
    b = cfg["base"]

    def run(vae):
        steps, bs = b["vae_warmup_steps"], b["vae_warmup_batch"]
        params = [p for p in vae.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=b["vae_warmup_lr"])
        vae.train()
        t0 = time.time()
        for step in range(steps):
            items = [dataset[1_000_000_000 + step * bs + j] for j in range(bs)]  # stream indices unused by training
            x = torch.stack([it["hr"] for it in items]) * 2 - 1
            g = generator(cfg["seed"], step, 99)
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
            rec = vae.decode(z, return_dict=False)[0]
            kl = 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()
            loss = (rec - x).abs().mean() + 1e-4 * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log({"vae_warmup_step": step, "vae_warmup_loss": float(loss.detach()), "elapsed_s": round(time.time() - t0, 1)})
        vae.eval()
        for p in params:
            p.requires_grad_(False)

    return run


# -- checkpoints ----------------------------------------------------------------------------------------

def read_json(path: Path, fields: dict) -> dict:
    """A small JSON state file with the given ``{field: type}``; ``TrainError`` naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a JSON object")
    for name, kind in fields.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise TrainError(f"{path}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return data


def resolve_resume(path: str | os.PathLike) -> Path:
    """A checkpoint folder (with trainer_state.json), or a run folder whose latest.json names one."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--resume {os.fspath(path)!r} does not exist")
    if (p / STATE_FILE).is_file():
        return p
    if (p / LATEST_FILE).is_file():
        latest = read_json(p / LATEST_FILE, {"checkpoint": str})
        target = p / latest["checkpoint"]
        if not target.resolve().is_relative_to(p.resolve()):
            raise TrainError(f"{p / LATEST_FILE} names {latest['checkpoint']!r}, outside the run folder")
        if not (target / STATE_FILE).is_file():
            raise TrainError(f"{p / LATEST_FILE} names {target}, which is not a complete checkpoint")
        return target
    raise TrainError(f"--resume {os.fspath(path)!r} is neither a checkpoint folder ({STATE_FILE}) nor a run folder ({LATEST_FILE})")


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def write_base_copy(out: Path, bundle, spec) -> tuple[str, str]:
    """Tiny runs: save the (random or warmed-up) base and CLIP beside the run so checkpoints load."""
    from rcod_core.models import load_config

    base_dir, clip_dir = out / "base", out / "clip"
    bundle.clean_unet.save_pretrained(base_dir / "unet")
    bundle.clean_vae.save_pretrained(base_dir / "vae")
    (base_dir / "scheduler").mkdir(parents=True, exist_ok=True)
    (base_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(load_config(spec.base, "scheduler"), indent=2))
    if bundle.base.clip_vision is not None:
        bundle.base.clip_vision.save_pretrained(clip_dir)
    return os.fspath(base_dir), os.fspath(clip_dir)


# -- the trainer -----------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: dict, resume: Optional[str] = None, log_stdout: bool = True):
        self.cfg = cfg
        self.log_stdout = log_stdout
        self.resume_dir = resolve_resume(resume) if resume else None
        config_mod.check_paths(cfg)
        if cfg["train"]["threads"]:
            torch.set_num_threads(int(cfg["train"]["threads"]))
        self.degrade = RealESRGANDegradation(DegradationConfig.from_dict({"scale": cfg["data"]["scale"], **cfg["data"]["degradation"]}))
        self.dataset = build_train_dataset(cfg)
        self.val = build_validation(cfg, self.degrade)
        self.out = Path(cfg["output_dir"])
        self._pending_logs: list[dict] = []

    # logging
    def log(self, record: dict) -> None:
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return
        record = {"time": round(time.time(), 3), **record}
        if self._log_file is None:
            self._pending_logs.append(record)
        else:
            self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()
        if self.log_stdout:
            print(json.dumps(record), flush=True)
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, record["step"])

    accelerator = None
    _log_file = None
    _tb = None

    def _open_logs(self, resumed_step: Optional[int] = None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "log.jsonl"
        if resumed_step is not None and path.is_file():  # drop what a killed run logged after its checkpoint
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill
                step = record.get("step") if isinstance(record, dict) else None
                if not isinstance(step, int) or step <= resumed_step:
                    kept.append(line)
            tmp = path.with_name(".log.jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, path)
        self._log_file = open(path, "a", encoding="utf-8")
        for record in self._pending_logs:
            self._log_file.write(json.dumps(record) + "\n")
        self._pending_logs.clear()
        mode = self.cfg["log"]["tensorboard"]
        if mode != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.fspath(self.out / "tensorboard"))
            except ImportError:
                if mode == "on":
                    raise TrainError("log.tensorboard: on, but tensorboard is not installed (pip install tensorboard)")

    # building
    def build(self) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from diffusers.optimization import get_scheduler

        from .models import EMA, build_rcod_o, build_rcod_s, load_base_models

        cfg = self.cfg
        kind = cfg["model"]
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg["train"]["mixed_precision"],
            gradient_accumulation_steps=cfg["train"]["grad_accum"],
            # on CPU, accelerate 1.15 forms a gloo group only with cpu=True (launch with torchrun)
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        self.device = acc.device
        self.regulariser = self.discriminator = self.lpips = None
        if kind == "mem":
            self._build_mem()
        else:
            warm = vae_warmup(cfg, self.dataset, self.log) if cfg["base"]["family"] == "tiny" else None
            self.bundle = load_base_models(cfg, with_clip=True, warmup=warm)
            if kind == "rcod_o":
                self.generator, self.regulariser = build_rcod_o(cfg, self.bundle)
            else:
                self.generator = build_rcod_s(cfg, self.bundle)
            self.spec = self.generator.spec
            # LDG's M_L comes from the frozen base VAE (no LoRA), so groups stay put while the VAE LoRA trains
            self.metric_vae = self.bundle.clean_vae.requires_grad_(False).eval().to(self.device)
            self.lpips = build_lpips(cfg, self.metric_vae)
            if kind == "rcod_s" and cfg["loss"]["gan"] > 0:
                self.discriminator = build_discriminator(cfg)
        o = cfg["optim"]
        def make_opt(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=tuple(o["betas"]), weight_decay=o["weight_decay"], eps=o["eps"])
        def make_sched(opt):
            return get_scheduler(o["scheduler"], optimizer=opt, num_warmup_steps=o["warmup_steps"] * acc.num_processes,
                                 num_training_steps=cfg["train"]["max_steps"] * acc.num_processes)
        self.gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.opt = make_opt(self.gen_params, o["lr"])
        self.sched = make_sched(self.opt)
        objs = [self.generator, self.opt, self.sched]
        if self.regulariser is not None:
            self.reg_params = [p for p in self.regulariser.parameters() if p.requires_grad]
            self.opt_reg = make_opt(self.reg_params, o["lr_reg"])
            self.sched_reg = make_sched(self.opt_reg)
            objs += [self.regulariser, self.opt_reg, self.sched_reg]
        if self.discriminator is not None:
            self.disc_params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self.opt_disc = make_opt(self.disc_params, o["lr_disc"])
            self.sched_disc = make_sched(self.opt_disc)
            objs += [self.discriminator, self.opt_disc, self.sched_disc]
        if self.lpips is not None:
            self.lpips.to(self.device)
        prepared = acc.prepare(*objs)
        self.generator, self.opt, self.sched = prepared[:3]
        rest = list(prepared[3:])
        if self.regulariser is not None:
            self.regulariser, self.opt_reg, self.sched_reg = rest[:3]
            rest = rest[3:]
        if self.discriminator is not None:
            self.discriminator, self.opt_disc, self.sched_disc = rest[:3]
        self.ema = None
        if cfg["train"]["ema"]["enabled"]:
            self.ema = EMA(self.gen_params, cfg["train"]["ema"]["decay"])
            # saved and read by our hooks as safetensors (accelerate's custom checkpoints are pickles)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    def _build_mem(self) -> None:
        """MEM learns M_L (frozen base VAE) from DEResNet's features; both frozen, on the training device."""
        from rcod_core.checkpoints import load_checkpoint
        from rcod_core.deresnet import DEResNet
        from rcod_core.loader import load_base
        from rcod_core.mem import MetricEstimator

        path = self.cfg["mem"]["generator"]
        ckpt = load_checkpoint(path)
        if ckpt.spec.kind != "rcod_s" or "de_net" not in ckpt.groups:
            raise TrainError(f"{path}: MEM is trained on an RCOD_S generator with its DEResNet, not {ckpt.spec.kind}")
        base_path = self.cfg["base"]["path"] or ckpt.metadata.get("base")
        if not base_path:
            raise TrainError(f"{path} names no base model and config base.path is not set: MEM's targets need "
                             f"the frozen base VAE")
        if not os.path.isabs(base_path):
            base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base_path)
        self.metric_vae = load_base(base_path, ckpt.spec.base, with_clip=False).vae.requires_grad_(False).eval()
        self.metric_vae.to(self.device)
        self.de_net = DEResNet()
        self.de_net.load_state_dict(ckpt.groups["de_net"])
        self.de_net.requires_grad_(False).eval().to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg["seed"] + 17)
            self.generator = MetricEstimator(self.de_net.feature_dim)
        self.spec = ckpt.spec

    # trainable-only model state inside accelerate's checkpoints
    def _save_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        for i, model in enumerate(models):
            unwrapped = self.accelerator.unwrap_model(model)
            state = {n: p.detach().contiguous().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
            save_file(state, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()
        if self.ema is not None:
            self.ema.save(os.path.join(output_dir, EMA_FILE))

    def _load_hook(self, models, input_dir):
        from .models import read_tensors

        pickles = sorted(p.name for p in Path(input_dir).glob("custom_checkpoint_*.pkl"))
        if pickles:
            raise TrainError(f"{input_dir}: holds {pickles[0]}, a pickle that resuming would have to run; "
                             f"this trainer writes its EMA as {EMA_FILE} and refuses pickled state")
        try:
            for i, model in enumerate(list(models)):
                unwrapped = self.accelerator.unwrap_model(model)
                params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
                state = read_tensors(os.path.join(input_dir, f"trainable_{i}.safetensors"), params, "trainable weights")
                with torch.no_grad():
                    for n, v in state.items():
                        params[n].copy_(v)
            if self.ema is not None:
                self.ema.load(os.path.join(input_dir, EMA_FILE))
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        models.clear()

    # per-sample random draws
    def _draws(self, indices: list[int], latent_shape) -> dict:
        return sample_draws(self.cfg["seed"], indices, latent_shape, self.cfg["grouping"]["latent"], self.device)

    def _das(self, indices: list[int], t: torch.Tensor) -> torch.Tensor:
        from rcod_core.grouping import sample_regulariser_timestep

        d = self.cfg["das"]
        out = [sample_regulariser_timestep(t[i:i + 1].cpu(), d["mode"], d["k"], d["low"], d["high"],
                                           generator=generator(self.cfg["seed"], k, SALT_VSD + 100))
               for i, k in enumerate(indices)]
        return torch.cat(out).to(self.device)

    def _prepare_batch(self, batch: dict):
        hr = batch["hr"].to(self.device)
        indices = [int(k) for k in batch["index"]]
        if "lr" in batch:
            lr = batch["lr"].to(self.device)
        else:
            lr = self.degrade(hr, [generator(self.cfg["seed"], k, SALT_DEGRADE) for k in indices])
        lr_up = upscale(lr, hr.shape[-2:], self.cfg["data"]["lr_upscale"])
        return hr, lr, lr_up, indices

    # one micro-step per model kind
    def _update(self, loss, params, opt, sched) -> None:
        """backward (accumulation-aware), clip, step the optimiser and its schedule, clear grads."""
        acc, max_norm = self.accelerator, self.cfg["optim"]["max_grad_norm"]
        acc.backward(loss)
        if acc.sync_gradients and max_norm:
            acc.clip_grad_norm_(params, max_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def _generate(self, hr, lr, lr_up, indices, logs):
        """LDG picks each sample's t (Eq. 4-6, frozen base VAE), then the generator's forward and its
        reconstruction losses (L2 + LPIPS), shared by both models."""
        w = self.cfg["loss"]
        gen_u = self.accelerator.unwrap_model(self.generator)
        draws = self._draws(indices, latent_shape(self.metric_vae, hr))
        metric = measure_metric(self.metric_vae, lr_up, hr, draws["noise_lr"], draws["noise_hr"])
        t = select_timestep(metric.float().cpu(), self.spec.grouping).to(self.device)
        out = self.generator(lr_up, t, lr=lr, noise=draws["noise_lr"])
        target = hr * 2 - 1
        per_sample = (out.x_pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        loss_l2 = (per_sample * self._l2_weights(gen_u, t)).mean()
        loss = w["l2"] * loss_l2
        logs["loss_l2"] = float(loss_l2.detach())
        if self.lpips is not None:
            loss_lp = self.lpips(out.x_pred.float(), target.float()).mean()
            loss = loss + w["lpips"] * loss_lp
            logs["loss_lpips"] = float(loss_lp.detach())
        return gen_u, draws, out, t, target, loss

    def _l2_weights(self, gen_u, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the L2 term: 1 (the paper, the release), or with ``loss.l2_weighting:
        alpha_bar`` ``sqrt(ᾱ_t)``, the share of the clean signal in the UNet's input at the sample's
        t (Eq. 3), so that a group at larger t trades more fidelity for the perceptual and VSD terms."""
        if self.cfg["loss"]["l2_weighting"] == "none":
            return torch.ones(t.shape[0], device=t.device)
        ab = gen_u.alphas_cumprod.to(t.device)[t.long()]
        return ab.sqrt().float()

    def _regulariser_tokens(self, gen_u, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition, negative) of the VSD scores: the generator's VPIM tokens and those of an
        all-zero image (``regulariser.condition: vpim``, the release), or one all-zero token for both
        (``null``: a prior trained unconditionally, such as ``rcod-train pretrain``'s; CFG is then moot)."""
        if self.cfg["regulariser"]["condition"] == "null":
            null = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[-1])
            return null, null
        return tokens, gen_u.prompt_encoder.negative_tokens(tokens.shape[0]).to(tokens)

    def _step_rcod_o(self, hr, lr, lr_up, indices, logs):
        cfg, acc = self.cfg, self.accelerator
        w = cfg["loss"]
        gen_u, draws, out, t, target, loss = self._generate(hr, lr, lr_up, indices, logs)
        if w["vsd"] > 0:
            reg_u = acc.unwrap_model(self.regulariser)
            t_r = self._das(indices, t)
            tokens, negative = self._regulariser_tokens(gen_u, out.tokens)
            with acc.autocast():  # the unwrapped regulariser runs in the run's mixed precision too
                x0_fake, x0_real = reg_u.scores(out.z_pred, tokens, negative, t_r, draws["noise_vsd"], w["cfg"])
            loss_vsd = vsd_loss(out.z_pred, x0_fake, x0_real)
            loss = loss + w["vsd"] * loss_vsd
            logs["loss_vsd"] = float(loss_vsd.detach())
        self._update(loss, self.gen_params, self.opt, self.sched)
        if self.regulariser is not None and w["vsd_lora"] > 0:
            loss_d = self.regulariser(out.z_pred.detach(), self._regulariser_tokens(gen_u, out.tokens)[0].detach(),
                                      draws["t_reg"], draws["noise_reg"])
            self._update(w["vsd_lora"] * loss_d, self.reg_params, self.opt_reg, self.sched_reg)
            logs["loss_reg"] = float(loss_d.detach())
        logs["loss"] = float(loss.detach())
        return t

    def _step_rcod_s(self, hr, lr, lr_up, indices, logs):
        cfg, acc = self.cfg, self.accelerator
        w = cfg["loss"]
        gen_u, draws, out, t, target, loss = self._generate(hr, lr, lr_up, indices, logs)
        if self.discriminator is not None:
            disc_u = acc.unwrap_model(self.discriminator)
            disc_u.requires_grad_(False)  # the generator's GAN loss must not touch D's gradients
            loss_g = gan_loss(disc_u(out.x_pred), real=True)
            for p in self.disc_params:
                p.requires_grad_(True)
            loss = loss + w["gan"] * loss_g
            logs["loss_gan_g"] = float(loss_g.detach())
        self._update(loss, self.gen_params, self.opt, self.sched)
        if self.discriminator is not None:
            b = hr.shape[0]
            logits = self.discriminator(torch.cat([target, out.x_pred.detach()]))
            loss_d = gan_loss([l[:b] for l in logits], True) + gan_loss([l[b:] for l in logits], False)
            self._update(w["gan"] * loss_d, self.disc_params, self.opt_disc, self.sched_disc)
            logs["loss_gan_d"] = float(loss_d.detach())
        logs["loss"] = float(loss.detach())
        return t

    @torch.no_grad()
    def mem_target(self, hr, lr, lr_up, noise_lr, noise_hr):
        """Per-sample M_L of the frozen base VAE (LR vs HR latents) and DEResNet's pooled features."""
        features = self.de_net.forward_features(lr.float())[1]
        return measure_metric(self.metric_vae, lr_up, hr, noise_lr, noise_hr), features

    def _step_mem(self, hr, lr, lr_up, indices, logs):
        draws = self._draws(indices, latent_shape(self.metric_vae, hr))
        target, features = self.mem_target(hr, lr, lr_up, draws["noise_lr"], draws["noise_hr"])
        pred = self.generator(features)
        loss = F.mse_loss(pred, target)  # every sample (the release used sample 0 only)
        self._update(loss, [p for p in self.generator.parameters() if p.requires_grad], self.opt, self.sched)
        logs["loss"] = float(loss.detach())
        logs["metric_mean"] = float(target.mean())
        return None

    # validation
    @torch.no_grad()
    def validate(self, step: int) -> dict:
        if self.val is None:
            return {}
        cfg = self.cfg
        hr = self.val.hr.to(self.device)
        lr = self.val.lr.to(self.device)
        lr_up = upscale(lr, hr.shape[-2:], cfg["data"]["lr_upscale"])
        result = {"step": step, "val_psnr_bicubic": float(psnr(lr_up, hr).mean())}
        if cfg["model"] == "mem":
            target, features = self.mem_target(hr, lr, lr_up, None, None)
            pred = self.accelerator.unwrap_model(self.generator)(features)
            result["val_metric_mae"] = float((pred - target).abs().mean())
            return result
        gen = self.accelerator.unwrap_model(self.generator)
        swap = self.ema is not None
        if swap:
            self.ema.swap()
        gen.eval()
        rows = [lr_up]
        for realism in cfg["validation"]["timesteps"]:
            t = resolve_realism(realism, self.spec.preset_style)
            out = gen(lr_up, torch.full((hr.shape[0],), t, device=self.device), lr=lr)
            x = (out.x_pred.float() + 1) / 2
            result[f"val_psnr_t{t}"] = float(psnr(x, hr).mean())
            rows.append(x)
        gen.train()
        if swap:
            self.ema.swap()
        if cfg["validation"]["save_images"] and self.accelerator.is_main_process:
            from PIL import Image

            rows.append(hr)
            grid = torch.cat([torch.cat(list(r.clamp(0, 1).cpu()), dim=1) for r in rows], dim=2)  # samples down, kinds across
            folder = self.out / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(arr).save(folder / f"step_{step:07d}.png")
        return result

    # checkpoints
    def export(self) -> tuple:
        from .models import export_checkpoint

        if self.cfg["model"] == "mem":
            from rcod_core.checkpoints import Checkpoint, load_checkpoint

            base = load_checkpoint(self.cfg["mem"]["generator"])
            mem = self.accelerator.unwrap_model(self.generator).linear.state_dict()
            groups = dict(base.groups)
            groups["mem"] = {k: v.detach().cpu().clone() for k, v in mem.items()}
            return Checkpoint(base.spec, groups, "rcod_s", None, dict(base.metadata)), base
        gen = self.accelerator.unwrap_model(self.generator)
        if self.ema is not None:
            self.ema.swap()
        ckpt = export_checkpoint(gen)
        if self.ema is not None:
            self.ema.swap()
        return ckpt, None

    def _model_metadata(self, folder: Path, base_ckpt=None) -> dict:
        if base_ckpt is not None:  # MEM: paths of the generator's file, made relative to ours
            meta = {}
            for key in ("base", "clip"):
                value = base_ckpt.metadata.get(key)
                if value:
                    p = Path(value) if os.path.isabs(value) else Path(base_ckpt.path).parent / value
                    meta[key] = _relative(p.resolve(), folder.resolve())
            return meta
        return {"base": _relative(Path(self.base_path).resolve(), folder.resolve()),
                "clip": _relative(Path(self.clip_path).resolve(), folder.resolve()) if self.clip_path else ""}

    def save(self, step: int, micro: int) -> Path:
        from rcod_core.checkpoints import save_checkpoint

        acc = self.accelerator
        final = self.out / "checkpoints" / f"step_{step:07d}"
        tmp = self.out / "checkpoints" / f".tmp_step_{step:07d}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(os.fspath(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt, base_ckpt = self.export()
            meta = self._model_metadata(final, base_ckpt)
            meta.update({"trainer_step": str(step), "trainer_model": self.cfg["model"]})
            save_checkpoint(ckpt, tmp / MODEL_FILE, meta)
            state = {"step": step, "micro_batches": micro, "samples": micro * self.cfg["train"]["batch_size"] * acc.num_processes,
                     "num_processes": acc.num_processes, "model": self.cfg["model"], "config": self.cfg}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (self.out / f".{LATEST_FILE}.tmp").write_text(json.dumps({"checkpoint": os.path.relpath(final, self.out), "step": step}))
            os.replace(self.out / f".{LATEST_FILE}.tmp", self.out / LATEST_FILE)
        acc.wait_for_everyone()
        pause = float(os.environ.get("RCOD_TRAIN_PAUSE_AFTER_SAVE", "0") or 0)  # test hook: a window to kill the run
        if pause:
            time.sleep(pause)
        return final

    # the loop
    def run(self) -> dict:
        self.build()
        cfg, acc = self.cfg, self.accelerator
        step = micro = 0
        if self.resume_dir is not None:
            state = read_json(self.resume_dir / STATE_FILE, {"model": str, "step": int, "micro_batches": int,
                                                              "num_processes": int, "config": dict})
            if not isinstance(state["config"].get("train", {}).get("batch_size"), int):
                raise TrainError(f"{self.resume_dir / STATE_FILE}: no config.train.batch_size")
            if state["step"] < 0 or state["micro_batches"] < state["step"]:
                raise TrainError(f"{self.resume_dir / STATE_FILE}: step {state['step']} and micro_batches "
                                 f"{state['micro_batches']} do not fit together")
            if state["model"] != cfg["model"]:
                raise TrainError(f"{self.resume_dir}: a {state['model']} checkpoint cannot resume a {cfg['model']} run")
            if state["num_processes"] * state["config"]["train"]["batch_size"] != acc.num_processes * cfg["train"]["batch_size"]:
                raise TrainError(f"{self.resume_dir}: the global batch changed ({state['num_processes']} x "
                                 f"{state['config']['train']['batch_size']} → {acc.num_processes} x {cfg['train']['batch_size']}); "
                                 f"the sample stream would not continue where it stopped")
            acc.load_state(os.fspath(self.resume_dir))
            step, micro = int(state["step"]), int(state["micro_batches"])
        if acc.is_main_process:
            self._open_logs(step if self.resume_dir is not None else None)
            if cfg["model"] != "mem":
                if self.bundle.source is None:
                    self.base_path, self.clip_path = write_base_copy(self.out, self.bundle, self.spec)
                else:
                    self.base_path, self.clip_path = self.bundle.source, self.bundle.clip_source
            (self.out / "config.json").write_text(json.dumps(cfg, indent=2))
        acc.wait_for_everyone()
        if self.resume_dir is None and cfg["validation"]["every"] and acc.is_main_process:
            self.log(self.validate(0))
        sampler = StreamSampler(cfg["train"]["batch_size"], start=micro, rank=acc.process_index, world_size=acc.num_processes)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg["train"]["batch_size"], sampler=sampler,
                                             num_workers=cfg["data"]["num_workers"])
        self.generator.train()
        for m in (self.regulariser, self.discriminator):
            if m is not None:
                m.train()
        max_steps = cfg["train"]["max_steps"]
        summary = {"start_step": step}
        t0, steps_timed = time.time(), 0
        logs: dict = {}
        t_counts: dict = {}
        for batch in loader:
            if step >= max_steps:
                break
            hr, lr, lr_up, indices = self._prepare_batch(batch)
            models = [m for m in (self.generator, self.regulariser, self.discriminator) if m is not None]
            with acc.accumulate(*models):
                fn = {"rcod_o": self._step_rcod_o, "rcod_s": self._step_rcod_s, "mem": self._step_mem}[cfg["model"]]
                t_used = fn(hr, lr, lr_up, indices, logs)
            micro += 1
            if t_used is not None:
                for t in t_used.tolist():
                    t_counts[int(t)] = t_counts.get(int(t), 0) + 1
            if not acc.sync_gradients:
                continue
            step += 1
            steps_timed += 1
            if self.ema is not None:
                self.ema.update()
            if cfg["log"]["every"] and (step % cfg["log"]["every"] == 0 or step == max_steps):
                rate = steps_timed / max(time.time() - t0, 1e-9)
                self.log({"step": step, **logs, "lr": self.sched.get_last_lr()[0], "steps_per_s": round(rate, 4),
                          **{f"t_{k}": v for k, v in sorted(t_counts.items())}})
                t_counts = {}
            if cfg["validation"]["every"] and (step % cfg["validation"]["every"] == 0 or step == max_steps):
                if acc.is_main_process:
                    self.log(self.validate(step))
                acc.wait_for_everyone()
            if cfg["checkpoint"]["every"] and (step % cfg["checkpoint"]["every"] == 0 or step == max_steps):
                self.save(step, micro)
        summary.update({"step": step, "micro_batches": micro, "elapsed_s": round(time.time() - t0, 2),
                        "steps_per_s": round(steps_timed / max(time.time() - t0, 1e-9), 4)})
        if acc.is_main_process:
            self.log({"summary": summary})
            if self._log_file:
                self._log_file.close()
            if self._tb is not None:
                self._tb.close()
        acc.wait_for_everyone()
        return summary


def train(cfg: dict, resume: Optional[str] = None, log_stdout: bool = True) -> dict:
    return Trainer(cfg, resume, log_stdout).run()
