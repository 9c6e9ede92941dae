"""``rcod-train`` / ``python -m trainer.cli``: train RCOD_O / RCOD_S / MEM, scan a dataset's M_L.

    python -m trainer.cli train --config trainer/examples/cpu_mini.yaml [--resume DIR] [--output DIR] [--max-steps N]
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


def _load_config(args) -> dict:
    overrides: dict = {}
    if getattr(args, "output", None):
        overrides["output_dir"] = os.path.abspath(args.output)
    if getattr(args, "max_steps", None) is not None:
        overrides["train"] = {"max_steps": int(args.max_steps)}
    return config_mod.load(args.config, overrides or None)


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
    config_mod.check_paths({**cfg, "lpips": {**cfg["lpips"], "mode": "off"}, "loss": {**cfg["loss"], "gan": 0.0}})
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rcod-train", description="RCOD distillation training (accelerate)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train RCOD_O, RCOD_S or MEM from a YAML/JSON config")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", help="a checkpoint folder, or a run folder (uses its latest.json)")
    p.add_argument("--output", help="run folder (overrides output_dir)")
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--quiet", action="store_true", help="log to log.jsonl only")
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
