"""``rcod-train`` / ``python -m trainer.cli``: train RCOD_O / RCOD_S / MEM, scan a dataset's M_L.

    python -m trainer.cli train --config trainer/examples/cpu_mini.yaml [--resume DIR] [--output DIR] [--max-steps N]
    python -m trainer.cli pretrain --config trainer/examples/demo_vae.yaml   (then demo_prior.yaml)
    python -m trainer.cli scan-metric --config CONFIG [--samples 256] [--groups 3] [--out metric_scan.json]

Multi-GPU: ``accelerate launch [--num_processes N] -m trainer.cli train --config ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import config as config_mod


def _overrides(args) -> Optional[dict]:
    """``--output`` / ``--max-steps`` as config overrides (train and pretrain)."""
    overrides: dict = {}
    if getattr(args, "output", None):
        overrides["output_dir"] = os.path.abspath(args.output)
    if getattr(args, "max_steps", None) is not None:
        overrides["train"] = {"max_steps": int(args.max_steps)}
    return overrides or None


def _load_config(args) -> dict:
    return config_mod.load(args.config, _overrides(args))


@torch.no_grad()
def scan_metric(cfg: dict, samples: int = 256, groups: int = 3, batch: int = 4) -> dict:
    """M_L = cos(VAE(LR↑), VAE(HR)) over ``samples`` training crops, LR made and latents drawn exactly
    as in training, with the frozen base VAE (the one training's LDG uses) → :func:`metric_summary`
    plus a config hint for the paper rule (Eq. 5's bounds)."""
    from rcod_core.grouping import metric_summary
    from rcod_core.model import measure_metric

    from .data import generator
    from .engine import SALT_DEGRADE, build_train_dataset, latent_shape, sample_draws, upscale, vae_warmup
    from .realesrgan import DegradationConfig, RealESRGANDegradation
    from .models import load_base_models

    if samples < 1:
        raise config_mod.ConfigError(f"--samples must be at least 1, got {samples}")
    # the scan writes the bounds file the config names: it need not exist yet
    config_mod.check_paths({**cfg, "lpips": {**cfg["lpips"], "mode": "off"}, "loss": {**cfg["loss"], "gan": 0.0},
                            "grouping": {**cfg["grouping"], "bounds": None}})
    if cfg["train"]["threads"]:
        torch.set_num_threads(int(cfg["train"]["threads"]))
    dataset = build_train_dataset(cfg)
    degrade = RealESRGANDegradation(DegradationConfig.from_dict({"scale": cfg["data"]["scale"], **cfg["data"]["degradation"]}))
    warm = vae_warmup(cfg, dataset, lambda r: print(json.dumps(r), file=sys.stderr)) if cfg["base"]["family"] == "tiny" else None
    bundle = load_base_models({**cfg}, with_clip=False, warmup=warm)
    vae = bundle.clean_vae.eval()
    values = []
    for start in range(0, samples, batch):
        items = [dataset[k] for k in range(start, min(samples, start + batch))]
        hr = torch.stack([it["hr"] for it in items])
        idx = [int(it["index"]) for it in items]
        lr = torch.stack([it["lr"] for it in items]) if "lr" in items[0] else degrade(
            hr, [generator(cfg["seed"], k, SALT_DEGRADE) for k in idx])
        lr_up = upscale(lr, hr.shape[-2:], cfg["data"]["lr_upscale"])
        draws = sample_draws(cfg["seed"], idx, latent_shape(vae, hr), cfg["grouping"]["latent"])
        values.append(measure_metric(vae, lr_up, hr, draws["noise_lr"], draws["noise_hr"]))
    summary = metric_summary(torch.cat(values), groups)
    summary["config_hint"] = {"grouping": {"rule": "paper", "n": groups, "bounds": "<this file>"}}
    return summary


def degrade_folder(hr: str, out: str, severity: str, scale: int = 4, crop: int = 256, per_image: int = 2,
                   seed: int = 0) -> dict:
    """Write ``out/hr/*.png`` (fixed crops) and ``out/lr/*.png`` (each degraded with its own seeded
    generator); returns counts and the settings."""
    from PIL import Image

    from rcod_core.tools.metrics import to_uint8_hwc

    from .data import generator
    from .pretrain import validation_crops
    from .realesrgan import RealESRGANDegradation, severity_config

    if crop % scale:
        raise config_mod.ConfigError(f"--crop {crop} must be a multiple of --scale {scale}")
    degrade = RealESRGANDegradation(severity_config(severity, scale))
    crops = validation_crops(hr, crop, per_image)
    folders = {k: Path(out) / k for k in ("hr", "lr")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(crops):
        lr = degrade(img[None], [generator(seed, i, 97)])[0]
        for key, x in (("hr", img), ("lr", lr)):
            Image.fromarray(to_uint8_hwc(x)).save(folders[key] / f"{i:03d}.png")
    return {"pairs": len(crops), "severity": severity, "scale": scale, "crop": crop}


def package_model(checkpoint: str, out: str, sources: Optional[str] = None, overwrite: bool = False) -> dict:
    """A self-contained model folder: ``out/model.safetensors`` (the trained file, with ``base`` and
    ``clip`` metadata pointing inside the folder) beside a copy of its base (``out/base``, with the
    CLIP vision model as ``out/base/clip_vision`` when it lay there, else ``out/clip``). Returns the
    files' sizes in bytes. ``sources`` (a ``SOURCES.json`` of the training photos) is copied along."""
    import shutil

    from rcod_core.checkpoints import load_checkpoint, save_checkpoint
    from rcod_core.loader import metadata_path

    ckpt = load_checkpoint(checkpoint)
    base, clip = metadata_path(ckpt, "base"), metadata_path(ckpt, "clip")
    if base is None or not Path(base).is_dir():
        raise config_mod.ConfigError(f"{checkpoint}: its metadata names no base folder to package (base={base})")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise config_mod.ConfigError(f"{out} is not empty (use --overwrite)")
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, target / "base")
    clip_rel = ""
    if clip is not None:
        clip, base_abs = Path(clip).resolve(), Path(base).resolve()
        if base_abs in clip.parents:
            clip_rel = os.fspath(Path("base") / clip.relative_to(base_abs))
        else:
            shutil.copytree(clip, target / "clip")
            clip_rel = "clip"
    keep = {k: v for k, v in ckpt.metadata.items() if k.startswith("trainer_")}
    save_checkpoint(ckpt, target / "model.safetensors", {**keep, "base": "base", "clip": clip_rel})
    if sources:
        shutil.copy(sources, target / "SOURCES.json")
    sizes = {os.fspath(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    return {"files": sizes, "total_bytes": sum(sizes.values())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rcod-train", description="RCOD distillation training (accelerate)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train RCOD_O, RCOD_S or MEM from a YAML/JSON config")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", help="a checkpoint folder, or a run folder (uses its latest.json)")
    p.add_argument("--output", help="run folder (overrides output_dir)")
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--quiet", action="store_true", help="log to log.jsonl only")
    pre = sub.add_parser("pretrain", help="train a small base model: its VAE, then its latent diffusion prior")
    pre.add_argument("--config", required=True)
    pre.add_argument("--output", help="output folder (overrides output_dir)")
    pre.add_argument("--max-steps", type=int, dest="max_steps")
    d = sub.add_parser("degrade", help="an LR/HR evaluation set: fixed crops of held-out photos, degraded by the "
                                       "training's Real-ESRGAN pipeline (seeded)")
    d.add_argument("--hr", required=True, help="folder of held-out photos")
    d.add_argument("--out", required=True, help="writes OUT/hr and OUT/lr")
    d.add_argument("--severity", choices=["mild", "severe"], default="severe")
    d.add_argument("--scale", type=int, default=4)
    d.add_argument("--crop", type=int, default=256, help="HR crop size (a multiple of --scale)")
    d.add_argument("--per-image", type=int, default=2, dest="per_image", help="crops per photo")
    d.add_argument("--seed", type=int, default=0)
    pk = sub.add_parser("package", help="a self-contained model folder: the trained file beside its base and CLIP")
    pk.add_argument("--checkpoint", required=True, help="a run's model.safetensors")
    pk.add_argument("--out", required=True)
    pk.add_argument("--sources", help="SOURCES.json of the training photos, copied along")
    pk.add_argument("--overwrite", action="store_true")
    s = sub.add_parser("scan-metric", help="print the M_L distribution (and LDG group edges) of a dataset")
    s.add_argument("--config", required=True)
    s.add_argument("--samples", type=int, default=256)
    s.add_argument("--groups", type=int, default=3)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--out", help="also write the summary here (JSON): a training config's grouping.bounds names it")
    args = parser.parse_args(argv)
    from .data import DataError
    from .engine import TrainError
    from .losses import WeightsError
    from .models import RuleError
    from rcod_core.checkpoints import CheckpointError

    try:
        if args.command == "package":
            print(json.dumps(package_model(args.checkpoint, args.out, args.sources, args.overwrite), indent=1))
            return 0
        if args.command == "degrade":
            print(json.dumps(degrade_folder(args.hr, args.out, args.severity, args.scale, args.crop, args.per_image, args.seed)))
            return 0
        if args.command == "pretrain":
            from . import pretrain

            summary = pretrain.run(pretrain.load_config(args.config, _overrides(args)))
            print(json.dumps({"done": {k: v for k, v in summary.items() if k != "curve"}}))
            return 0
        cfg = _load_config(args)
        if args.command == "train":
            from .engine import train

            summary = train(cfg, resume=args.resume, log_stdout=not args.quiet)
            print(json.dumps({"done": summary}))
        else:
            summary = scan_metric(cfg, args.samples, args.groups, args.batch)
            text = json.dumps(summary, indent=2)
            if args.out:
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.tmp")
                tmp.write_text(text + "\n", encoding="utf-8")
                os.replace(tmp, out)
            print(text)
    except (config_mod.ConfigError, DataError, TrainError, WeightsError, CheckpointError, RuleError, FileNotFoundError, OSError) as exc:
        print(f"rcod-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
