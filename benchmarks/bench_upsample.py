#!/usr/bin/env python
"""Sub-pixel upsampling against diffusers' nearest ×2 + 3×3 convolution: each SD 2.1 decoder
upsampler alone, then the whole VAE decoder with it on and off, alternating (random weights).

    python benchmarks/bench_upsample.py                       # CPU, bf16 and fp32, channels_last
    python benchmarks/bench_upsample.py --device cuda --dtypes bf16,fp16 --latent 64

Prints ms per call (median), the speed-up, and the largest difference from a float64 reference
(per block) or between the two decoders (relative to the output's mean magnitude).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcod_core.upsample import upsample_conv, use_subpixel_upsampling  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px output)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-decoder", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    side = args.latent
    blocks = [(512, side), (512, 2 * side), (256, 4 * side)]  # SD 2.1 decoder: channels, input side
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, latent {side}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for ch, s in blocks:
            x = torch.randn(1, ch, s, s, generator=g).to(device, dtype).contiguous(memory_format=cl)
            w = (torch.randn(ch, ch, 3, 3, generator=g) * 0.02).to(device)
            b = (torch.randn(ch, generator=g) * 0.1).to(device)
            wd, bd = w.to(dtype).contiguous(memory_format=cl), b.to(dtype)
            with torch.no_grad():
                exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), wd.double(), bd.double(),
                                 padding=1)

                def ref():
                    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), wd, bd, padding=1)

                def sub():
                    return upsample_conv(x, wd, bd)

                err_ref = (ref().double() - exact).abs().max().item()
                err_sub = (sub().double() - exact).abs().max().item()
                t_ref, t_sub = timed(ref, device, args.repeats), timed(sub, device, args.repeats)
            print(f"[{name}] upsampler {ch} ch {s}->{2 * s}: diffusers {t_ref:8.1f} ms | sub-pixel {t_sub:8.1f} ms | "
                  f"{t_ref / t_sub:4.2f}x | max |err| vs fp64: diffusers {err_ref:.2e}, sub-pixel {err_sub:.2e}",
                  flush=True)
        if args.skip_decoder:
            continue
        from rcod_core.models import build_models

        vae = build_models("sd21_base", seed=0, with_clip=False).vae.to(device, dtype).to(memory_format=cl).eval()
        z = torch.randn(1, 4, side, side, generator=g).to(device, dtype).contiguous(memory_format=cl)
        runs = {True: [], False: []}
        outs = {}
        with torch.no_grad():
            for i in range(2 * args.repeats + 2):
                on = i % 2 == 0
                use_subpixel_upsampling(vae.decoder, on)
                ms = timed(lambda: outs.__setitem__(on, vae.decode(z).sample), device, 1)
                if i >= 2:  # the first of each: warm-up
                    runs[on].append(ms)
        diff = (outs[True].float() - outs[False].float()).abs()
        t_on, t_off = statistics.median(runs[True]), statistics.median(runs[False])
        print(f"[{name}] VAE decoder {side}² latent: diffusers {t_off:8.0f} ms | sub-pixel {t_on:8.0f} ms | "
              f"{t_off / t_on:4.2f}x | output diff max {diff.max().item():.3g}, mean {diff.mean().item():.3g} "
              f"(|output| mean {outs[False].float().abs().mean().item():.3g})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
