#!/usr/bin/env python
"""The GPU checks beside ``rcod bench``, in one process: CUDA graph capture of the one-step denoise,
the pipeline with CUDA graphs against eager, host syncs per call, and the auto-tile peak against its
budget. On a machine without CUDA the CUDA sections say so and the capture-hazard check still runs
(on the meta device, full-size configs).

    python benchmarks/gpu_check.py --out gpu_out                     # CUDA: SD 2.1-base size, bf16
    python benchmarks/gpu_check.py --out gpu_check_cpu --device cpu --family tiny   # what runs without CUDA

Each section's result is printed as it finishes and all of them are written to ``OUT/gpu_check.json``;
a section that fails records its error and the others still run. ``benchmarks/bench_gpu.sh`` runs
this and ``rcod bench`` together.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcod_core.build import assemble  # noqa: E402
from rcod_core.capture import CapturedDenoise, capture_hazards  # noqa: E402
from rcod_core.models import build_models  # noqa: E402
from rcod_core.spec import ModelSpec  # noqa: E402
from rcod_core.testing.tiny import tiny_pipeline  # noqa: E402
from rcod_core.tools.bench import DTYPES, REALISM as T, SCALE, Meter, build_pipeline  # noqa: E402


@functools.lru_cache(maxsize=1)
def rcod_o(family: str, device, dtype):
    """The random-weight RCOD_O that ``rcod bench`` measures (LoRA merged); built once and shared by
    the sections (each leaves it as it found it)."""
    return build_pipeline(family, merge=True, device=device, dtype=dtype, seed=0)


def timed_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median synchronised wall time of ``fn`` in ms, timed as ``rcod bench`` times its stages."""
    return Meter(device, repeats, warmup, cudagraph_steps=False).measure(fn)["median_ms"]


def needs_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise SkipSection(f"needs CUDA (device {device})")


class SkipSection(Exception):
    pass


# -- sections ------------------------------------------------------------------------------------
def hazards(args, device, dtype) -> dict:
    """Host reads / CPU→device copies in every stage, on the meta device (any machine)."""
    out = {}
    for kind in ("rcod_o", "rcod_s"):
        model = tiny_pipeline(kind, seed=0).model.place("meta", torch.float32, torch.float32)
        out[f"tiny_{kind}"] = _stage_hazards(model, 128)
    if args.family != "tiny":
        base = build_models(args.family, device="meta")
        pipe = assemble(base, ModelSpec.for_kind("rcod_o"), device="meta", lora_generator=torch.Generator().manual_seed(1))
        out[f"{args.family}_rcod_o"] = _stage_hazards(pipe.model, args.size)
    return out


def _stage_hazards(model, size: int) -> dict:
    images = torch.empty(1, 3, size, size, device="meta")
    found = {}
    if model.conditioning is not None:
        found["condition"] = capture_hazards(model.condition, torch.empty(1, 3, size // SCALE, size // SCALE, device="meta"))[1]
    tokens, found["tokens"] = capture_hazards(model.tokens, images)
    z, found["encode"] = capture_hazards(model.encode, images)
    z_h, found["denoise"] = capture_hazards(model.denoise, z, tokens, torch.full((1,), T, device="meta"))
    found["decode"] = capture_hazards(model.decode, z_h)[1]
    return found


def capture(args, device, dtype) -> dict:
    """The one-step denoise captured as one CUDA graph: replay vs eager (values, time), per batch."""
    needs_cuda(device)
    pipe = rcod_o(args.family, device, dtype)
    side = args.size // pipe.latent_factor
    out = {}
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        z = torch.randn(batch, 4, side, side, generator=g).to(device)
        tokens = pipe.prompt(torch.rand(batch, 3, args.size, args.size, generator=g).to(device))
        t = torch.full((batch,), T, dtype=torch.int64, device=device)
        with torch.no_grad():
            t0 = time.perf_counter()
            graph = CapturedDenoise(pipe.model, z, tokens, t)
            torch.cuda.synchronize(device)
            capture_s = time.perf_counter() - t0
            eager = pipe.model.denoise(z, tokens, t)
            replay = graph(z, tokens, t)
            z2 = torch.randn_like(z)
            replay2, eager2 = graph(z2, tokens, t), pipe.model.denoise(z2, tokens, t)
            out[f"batch{batch}"] = {
                "captured": True, "capture_s": capture_s,
                "max_abs_diff_replay_vs_eager": float((replay - eager).abs().max()),
                "max_abs_diff_new_input": float((replay2 - eager2).abs().max()),
                "eager_ms": timed_ms(lambda: pipe.model.denoise(z, tokens, t), device, args.repeats),
                "replay_ms": timed_ms(lambda: graph(z, tokens, t), device, args.repeats),
            }
        graph = None  # the capture and its memory go before the next batch
    return out


def rcod_s_capture(args, device, dtype) -> dict:
    """RCOD_S (tiny): a graph captured for one sample's degradation matrices, replayed for another."""
    needs_cuda(device)
    pipe = tiny_pipeline("rcod_s", seed=0, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    state = pipe.condition(torch.rand(2, 3, 32, 32, generator=g).to(device))
    z = torch.randn(1, 4, 16, 16, generator=g).to(device)
    tokens = pipe.prompt(torch.rand(1, 3, 128, 128, generator=g).to(device))
    t = torch.tensor([T], device=device)
    with torch.no_grad():
        pipe.select_sample(state, 0)
        graph = CapturedDenoise(pipe.model, z, tokens, t)
        pipe.select_sample(state, 1)
        replay, eager = graph(z, tokens, t), pipe.model.denoise(z, tokens, t)
        pipe.select_sample(state, 0)
        other = pipe.model.denoise(z, tokens, t)
    return {"max_abs_diff_vs_eager": float((replay - eager).abs().max()),
            "samples_differ_by": float((eager - other).abs().max())}


def pipeline(args, device, dtype) -> dict:
    """``pipe.run`` with CUDA graphs vs eager (same images?), and host syncs per call."""
    needs_cuda(device)
    pipe = rcod_o(args.family, device, dtype)
    out = {}
    for batch in args.batches:
        lr = torch.rand(batch, 3, args.size // SCALE, args.size // SCALE, generator=torch.Generator().manual_seed(batch))
        run = lambda: pipe.run(lr, realism=T, scale=SCALE).images  # noqa: E731
        eager = run()
        eager_ms = timed_ms(run, device, args.repeats)
        pipe.use_cuda_graphs()
        graphed = run()
        graphed_ms = timed_ms(run, device, args.repeats)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run()
                torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        pipe.use_cuda_graphs(False)
        out[f"batch{batch}"] = {"eager_ms": eager_ms, "cuda_graphs_ms": graphed_ms,
                                "max_abs_diff": float((graphed - eager).abs().max()),
                                "host_syncs_per_run": len(caught),
                                "sync_sites": sorted({str(w.message).splitlines()[0][:120] for w in caught})[:8]}
    return out


def auto_tile(args, device, dtype) -> dict:
    """``tile="auto"`` with a budget: the CUDA peak above the loaded weights, against the budget."""
    needs_cuda(device)
    pipe = rcod_o(args.family, device, dtype)
    out = {}
    for size, budget_mb in args.tile_cases:
        budget = budget_mb * 2 ** 20
        lr = torch.rand(1, 3, size // SCALE, size // SCALE, generator=torch.Generator().manual_seed(size))
        plan = pipe.plan_tiles(size, size, "auto", 32, budget)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        pipe.run(lr, realism=T, scale=SCALE, tile="auto", max_memory=budget)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        out[f"{size}px_{budget_mb}MB"] = {"plan": None if plan is None else str(plan), "seconds": time.perf_counter() - t0,
                                          "peak_above_weights_MB": peak / 2 ** 20, "budget_MB": budget_mb,
                                          "within_budget": peak <= budget}
    return out


SECTIONS = {"hazards": hazards, "capture": capture, "rcod_s_capture": rcod_s_capture, "pipeline": pipeline,
            "auto_tile": auto_tile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--family", default="sd21_base", choices=("sd21_base", "tiny"))
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--size", type=int, default=512, help="output side (LR side = size / 4)")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tile-cases", default="2048:2048,2048:4096",
                   help="comma list of OUTPUT_SIDE:BUDGET_MB for the auto-tile section")
    p.add_argument("--sections", default=",".join(SECTIONS))
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",")]
    args.tile_cases = [tuple(int(v) for v in case.split(":")) for case in args.tile_cases.split(",")]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"env": {"torch": torch.__version__, "device": str(device),
                      "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "family": args.family, "dtype": args.dtype, "size": args.size}}
    failed = 0
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            result = SECTIONS[name](args, device, dtype)
        except SkipSection as exc:
            result = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001  (one section's failure is reported; the others run)
            traceback.print_exc()
            failed += 1
            result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        result["section_s"] = round(time.perf_counter() - t0, 2)
        report[name] = result
        print(f"== {name}: {json.dumps(result)}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
