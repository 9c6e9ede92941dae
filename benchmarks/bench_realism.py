#!/usr/bin/env python
"""Realism-control costs on full-size random weights (RCOD_S on SD-Turbo, LoRA r=32/16), CPU or GPU.

1. A realism sweep of 3 timesteps (one VAE encode + CLIP, then UNet + decode per t) against three
   independent calls (encode + CLIP + UNet + decode each).
2. RCOD_S's single UNet pass (VPIM tokens) against an S3Diff-style two-pass text CFG step
   (``neg + 1.07 (pos - neg)``: the UNet runs twice per image), same model otherwise.

    python benchmarks/bench_realism.py --size 512 --repeats 2
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcod_core.checkpoints import canonicalize, merge_checkpoints  # noqa: E402
from rcod_core.build import assemble_s3  # noqa: E402
from rcod_core.models import build_models  # noqa: E402
from rcod_core.testing.tiny import de_net_state, mem_dict, s3diff_like_dict  # noqa: E402


class TwoPassCFG(nn.Module):
    """S3Diff's text CFG around a UNet: two passes (positive, negative), ``neg + s (pos - neg)``."""

    def __init__(self, unet: nn.Module, negative: torch.Tensor, scale: float = 1.07):
        super().__init__()
        self.unet, self.negative, self.scale = unet, negative, scale
        self.config = unet.config

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        pos = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        neg = self.unet(sample, timestep, encoder_hidden_states=self.negative.expand_as(encoder_hidden_states),
                        return_dict=False)[0]
        return (neg + self.scale * (pos - neg),)


def median_time(fn, repeats: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="output side (LR = size / 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ckpt = canonicalize(s3diff_like_dict("rcod_s", ranks=(32, 16), family="sd_turbo"), "rcod_s")
    ckpt = merge_checkpoints(ckpt, canonicalize(de_net_state(), "de_net"), canonicalize(mem_dict(), "rcod_s_mem"))
    pipe = assemble_s3(build_models("sd_turbo", seed=0), ckpt.spec, ckpt.groups, device=device, dtype=dtype)
    lr = torch.rand(1, 3, args.size // 4, args.size // 4, generator=torch.Generator().manual_seed(0))
    ts = [249, 499, 749]
    print(f"# RCOD_S full size, {args.size}x{args.size} output, {device} {dtype}, median of {args.repeats}", flush=True)
    sweep = median_time(lambda: pipe.sweep(lr, ts), args.repeats, args.warmup, sync)
    singles = median_time(lambda: [pipe.run(lr, realism=t) for t in ts], args.repeats, args.warmup, sync)
    print(f"sweep of 3 t: {sweep:.2f} s | 3 independent calls: {singles:.2f} s | ratio {sweep / singles:.2f}", flush=True)
    one = median_time(lambda: pipe.run(lr, realism=499), args.repeats, args.warmup, sync)
    unet = pipe.unet
    pipe.unet = TwoPassCFG(unet, torch.zeros(1, 1, 1, device=device, dtype=dtype).expand(1, 257, unet.config.cross_attention_dim))
    two = median_time(lambda: pipe.run(lr, realism=499), args.repeats, args.warmup, sync)
    pipe.unet = unet
    print(f"RCOD_S one UNet pass: {one:.2f} s | S3Diff-style two-pass CFG: {two:.2f} s | ratio {two / one:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
