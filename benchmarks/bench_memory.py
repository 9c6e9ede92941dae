#!/usr/bin/env python
"""Peak memory and time vs output size with bounded-memory tiling.

Each size runs in a fresh process (so the peak RSS / CUDA peak belongs to that size alone):
LR = size / 4, x4, ``tile`` latent tiles for every stage (default 64 = 512 px). The goal: peak
memory flat beyond one tile — a 16 MP output within the peak of a 1 MP one plus one full-size
buffer, the output (12 bytes/px in float32; the upscaled LR that the encoder's tiles are cut from
is as large and is freed before the decode), and the features of the VAE's whole-latent mid block.

    python benchmarks/bench_memory.py --family tiny --sizes 512,1024,2048,4096
    python benchmarks/bench_memory.py --family tiny --tile auto --max-memory 300MB --bound-heap
    python benchmarks/bench_memory.py --family sd21_base --sizes 512,1024        # full size, slow on CPU
    python benchmarks/bench_memory.py --family sd21_base --device cuda --dtype bf16 --sizes 1024,2048 --tile auto --max-memory 2GB

On CUDA each row also gives the peak of ``torch.cuda.max_memory_allocated`` above the loaded weights.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time, torch
sys.path.insert(0, {root!r})
from rcod_core.build import assemble
from rcod_core.devices import bound_cpu_heap
from rcod_core.testing.tiny import tiny_pipeline
from rcod_core.models import build_models
from rcod_core.spec import ModelSpec
torch.set_num_threads({threads})
dev = torch.device({device!r})
dtype = getattr(torch, {dtype!r})
if {family!r} == "tiny":
    pipe = tiny_pipeline("rcod_o", seed=0, device=dev, dtype=dtype)
else:
    pipe = assemble(build_models({family!r}), ModelSpec.for_kind("rcod_o"), device=dev, dtype=dtype,
                    lora_generator=torch.Generator().manual_seed(1))
lr = torch.rand(1, 3, {size} // 4, {size} // 4, generator=torch.Generator().manual_seed(0))
tile, budget = {tile!r}, {budget!r}
if tile == "auto":
    pipe.stage_costs()  # measured once per model, before the run (not part of its peak)
bounded = bound_cpu_heap() if {bound!r} else False


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024


exact = os.path.exists("/proc/self/clear_refs")
if exact:  # Linux: reset the peak RSS to the current RSS, so the peak is this run's alone
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base_rss = status("VmRSS:")
else:
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cuda_base = None
if dev.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cuda_base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
plan = pipe.plan_tiles({size}, {size}, tile, {overlap}, budget) if tile != "none" else None
t0 = time.perf_counter()
out = pipe(lr, realism=499, tile=tile, tile_overlap={overlap}, max_memory=budget)
if dev.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = status("VmHWM:") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"size": {size}, "seconds": seconds, "peak_rss": peak, "rss_after_load": base_rss,
                  "cuda_peak": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
                  "cuda_after_load": cuda_base,
                  "shape": list(out.shape), "plan": None if plan is None else str(plan), "bounded_heap": bounded}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="tiny", choices=["tiny", "sd21_base"])
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--tile", default="64", help="latent tile (int), 'none' or 'auto'")
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--max-memory", default=None, help="budget for --tile auto, e.g. 300MB (default: free memory)")
    parser.add_argument("--bound-heap", action="store_true",
                        help="rcod_core.devices.bound_cpu_heap() first (what rcod upscale --max-memory does on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="UNet/CLIP precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tile = int(args.tile) if args.tile.isdigit() else args.tile
    budget = None
    if args.max_memory:
        from rcod_core.tools.cli import _parse_bytes

        budget = _parse_bytes(args.max_memory)
    root = str(Path(__file__).resolve().parents[1])
    rows = []
    print(f"# {args.family}, tile {tile} (overlap {args.overlap}), budget {args.max_memory or 'free memory'}, "
          f"{'bounded heap, ' if args.bound_heap else ''}{args.device}, one process per size")
    print(f"{'output':>11} | {'MP':>5} | {'time s':>7} | {'peak RSS':>9} | {'after load':>10} | {'run delta':>9} | {'out buffer':>10}")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    for size in (int(s) for s in args.sizes.split(",")):
        code = CHILD.format(root=root, threads=args.threads, device=args.device, dtype=dtype, family=args.family, size=size,
                            tile=tile, overlap=args.overlap, budget=budget, bound=args.bound_heap)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{size}x{size}: FAILED {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gib = 2 ** 30
        delta = r["peak_rss"] - r["rss_after_load"]
        print(f"{size:>5}x{size:<5} | {size * size / 1e6:5.1f} | {r['seconds']:7.1f} | {r['peak_rss'] / gib:7.2f} G | "
              f"{r['rss_after_load'] / gib:8.2f} G | {delta / gib:7.2f} G | {size * size * 12 / gib:8.2f} G"
              + (f" | CUDA peak above weights {(r['cuda_peak'] - r['cuda_after_load']) / gib:.2f} G"
                 + (f" (budget {budget / gib:.2f} G)" if budget else "") if r["cuda_peak"] is not None else "")
              + (f" | {r['plan']}" if r["plan"] else ""), flush=True)
        rows.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
