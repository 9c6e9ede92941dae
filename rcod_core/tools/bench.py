#!/usr/bin/env python
"""Engine benchmark: the RCOD pipeline vs a plain-diffusers unmerged-LoRA baseline.

Random-weight SD 2.1-base UNet + VAE + CLIP ViT-L/14 (shipped configs, nothing downloaded) with the
OSEDiff-layout LoRA (random non-zero weights), LR ``size/4`` -> ``size`` output (x4).

* **ours**: ``rcod_core.build.assemble(merge=True)`` -> ``RCODPipeline`` (LoRA merged into the base
  weights, SDPA attention, optional channels_last, optional ``torch.compile`` modes).
* **baseline**: the same weights with the peft LoRA left UNMERGED, run stage by stage with plain
  torch / diffusers / transformers calls (no ``RCODPipeline`` code): bicubic upscale, CLIP
  ``last_hidden_state`` -> projection, ``vae.encode(...).latent_dist.mode() * sf``,
  ``unet(z, t, encoder_hidden_states=...).sample``, x0 formula, ``vae.decode``. Eager, default layout.

Each stage is timed on the same inputs (median of ``--repeats`` after ``--warmup``), and the end to
end time is a separate full call (``pipe.run`` / the full baseline function). Memory: on CUDA
``torch.cuda.max_memory_allocated`` (reset before every stage / e2e measurement, weights included);
on CPU the process's peak RSS (process-wide: weights, allocator caches and everything else), taken
from ``VmHWM`` reset through ``/proc/self/clear_refs`` before each measurement where the kernel allows
it, else the all-time ``ru_maxrss``.

Examples::

    rcod bench --family tiny --repeats 2 --warmup 1          # seconds, CPU
    rcod bench --family sd21_base --device cpu --threads 2 --repeats 3 --warmup 1
    rcod bench --device cuda --batch 1,8 --json bench_cuda.json  # GPU targets
    (benchmarks/bench_engine.py is the same program)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..build import assemble
from ..devices import prefer_channels_last, resolve_dtype
from ..models import build_models
from ..imageops import resize
from ..spec import ModelSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = (*DTYPES, "auto")
COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs", "cuda-graph")
#: not a torch.compile mode: eager kernels, the one-step denoise replayed as a CUDA graph per shape
CUDA_GRAPH = "cuda-graph"
STAGES = ("clip", "vae_enc", "unet", "vae_dec")
SCALE = 4
REALISM = 499  # timestep given to the UNet's embedding (RCOD_O: x0 uses the fixed alpha-bar)

# The GPU targets this benchmark reports against.
TARGET_MS_BATCH1 = 15.0
TARGET_MS_BATCHED = 10.0
TARGET_SPEEDUP = 5.0


# ------------------------------------------------------------------------------------------------
# timing / memory helpers
# ------------------------------------------------------------------------------------------------
class Meter:
    """Median wall time over ``repeats`` calls after ``warmup``, and peak memory of the window."""

    def __init__(self, device: torch.device, repeats: int, warmup: int, cudagraph_steps: bool):
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self.cuda = device.type == "cuda"
        self.mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None) if cudagraph_steps else None
        self._hwm_reset_ok: Optional[bool] = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- memory --
    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            self._hwm_reset_ok = _reset_hwm()

    def peak_bytes(self) -> tuple[int, str]:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        if self._hwm_reset_ok:
            hwm = _read_hwm()
            if hwm is not None:
                return hwm, "rss_peak_window"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss_process"

    # -- time --
    def _timed(self, fn: Callable[[], object]) -> float:
        """One synchronised call of ``fn`` in ms (a CUDA-graph step begins before it)."""
        if self.mark_step is not None:
            self.mark_step()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        elapsed = (time.perf_counter() - t0) * 1e3
        del out
        return elapsed

    def measure(self, fn: Callable[[], object], warmup: Optional[int] = None) -> dict:
        warmup = self.warmup if warmup is None else warmup
        self.reset_peak()
        warm = [self._timed(fn) for _ in range(warmup)]
        first_ms = warm[0] if warm else None
        times = [self._timed(fn) for _ in range(self.repeats)]
        peak, kind = self.peak_bytes()
        return {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "times_ms": times,
            "first_call_ms": first_ms,
            "peak_bytes": peak,
            "peak_kind": kind,
        }


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (torch's FlopCounterMode: matmuls and convolutions, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_rates(device: torch.device, dtype: torch.dtype, meter: "Meter") -> dict:
    """The machine's measured rate (GFLOP/s) for a large matmul and a UNet-like 3x3 convolution."""
    gen = torch.Generator().manual_seed(0)
    n = 2048
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    x = torch.randn(1, 128, 128, 128, generator=gen).to(device, dtype)
    w = torch.randn(128, 128, 3, 3, generator=gen).to(device, dtype)
    rates = {}
    with torch.no_grad():
        mm = meter.measure(lambda: a @ b)
        rates["matmul_gflops"] = 2 * n ** 3 / (mm["min_ms"] * 1e6)
        conv_flops = 2 * 128 * 128 * 9 * 128 * 128
        for name, layout in (("conv_gflops", torch.contiguous_format), ("conv_cl_gflops", torch.channels_last)):
            xl, wl = x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)
            res = meter.measure(lambda: F.conv2d(xl, wl, padding=1))
            rates[name] = conv_flops / (res["min_ms"] * 1e6)
    return rates


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# model building
# ------------------------------------------------------------------------------------------------
def build_pipeline(family: str, merge: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """A fresh random-weight OSEDiff-layout RCOD_O model; identical weights for both impls."""
    spec = ModelSpec.for_kind("rcod_o")  # SD 2.1-base family; "tiny" only changes the configs
    base = build_models(family, seed=seed, device="cpu", with_clip=True)
    pipe = assemble(
        base, spec, merge=merge, device=device, dtype=dtype, vae_dtype=dtype,
        lora_generator=torch.Generator().manual_seed(seed + 1),
    )
    return pipe


class PlainBaseline:
    """Unmerged-LoRA models driven by plain torch / diffusers / transformers calls only.

    It takes the modules out of an ``assemble(merge=False)`` result (peft-wrapped diffusers UNet and
    VAE, a transformers ``CLIPVisionModel`` and the VPIM ``nn.Linear``) and never calls the
    pipeline's methods.
    """

    def __init__(self, pipe, dtype: torch.dtype, device: torch.device):
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.clip = pipe.prompt_encoder.vision_model
        self.proj = pipe.prompt_encoder.projection
        self.clip_size = int(self.clip.config.image_size)
        self.sf = float(self.vae.config.scaling_factor)
        ab = float(pipe.spec.fixed_alpha_bar)  # RCOD_O "official" x0: fixed alpha-bar
        self.sqrt_ab, self.sqrt_1m_ab = math.sqrt(ab), math.sqrt(1.0 - ab)
        self.dtype = dtype
        self.device = device

    def upscale(self, lr: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(lr, size=out_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)

    @torch.no_grad()
    def clip_stage(self, x: torch.Tensor) -> torch.Tensor:
        # release ("official") VPIM preprocessing: [-1, 1], bilinear 224 px, no CLIP mean/std
        pv = F.interpolate(x * 2.0 - 1.0, size=(self.clip_size, self.clip_size), mode="bilinear", align_corners=False, antialias=True)
        hidden = self.clip(pixel_values=pv.to(self.dtype)).last_hidden_state
        return self.proj(hidden)

    @torch.no_grad()
    def encode_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode((x * 2.0 - 1.0).to(self.dtype)).latent_dist.mode() * self.sf

    @torch.no_grad()
    def unet_stage(self, z: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.unet(z.to(self.dtype), t, encoder_hidden_states=tokens.to(self.dtype)).sample
        return (z.float() - self.sqrt_1m_ab * eps.float()) / self.sqrt_ab

    @torch.no_grad()
    def decode_stage(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z / self.sf).to(self.dtype)).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        out_hw = (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE)
        x = self.upscale(lr.to(self.device, torch.float32), out_hw)
        t = torch.full((x.shape[0],), REALISM, dtype=torch.int64, device=self.device)
        tokens = self.clip_stage(x)
        z = self.encode_stage(x)
        return self.decode_stage(self.unet_stage(z, tokens, t))


# ------------------------------------------------------------------------------------------------
# one measured configuration
# ------------------------------------------------------------------------------------------------
def bench_baseline(base: PlainBaseline, lr: torch.Tensor, meter: Meter) -> tuple[dict, torch.Tensor]:
    out_hw = (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE)
    x = base.upscale(lr, out_hw)
    t = torch.full((lr.shape[0],), REALISM, dtype=torch.int64, device=lr.device)
    with torch.no_grad():
        tokens = base.clip_stage(x).clone()
        z = base.encode_stage(x).clone()
        zh = base.unet_stage(z, tokens, t).clone()
    stages = {
        "clip": meter.measure(lambda: base.clip_stage(x)),
        "vae_enc": meter.measure(lambda: base.encode_stage(x)),
        "unet": meter.measure(lambda: base.unet_stage(z, tokens, t)),
        "vae_dec": meter.measure(lambda: base.decode_stage(zh)),
    }
    e2e = meter.measure(lambda: base(lr))
    out = base(lr).float().cpu()
    return {"stages": stages, "e2e": e2e}, out


def bench_ours(pipe, lr: torch.Tensor, meter: Meter, warmup: int, count: bool = False) -> tuple[dict, torch.Tensor]:
    out_hw = (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE)
    x = resize(lr, out_hw, "bicubic")
    timesteps = pipe.resolve_timesteps(REALISM, lr.shape[0])
    # e2e first: its first call includes compilation (reported as first_call_ms)
    e2e = meter.measure(lambda: pipe.run(lr, realism=REALISM, scale=SCALE).images, warmup=warmup)
    with torch.no_grad():
        if meter.mark_step is not None:
            meter.mark_step()
        tokens = pipe.prompt(x).clone()
        z = pipe.encode(x).clone()
        zh = pipe.denoise(z, tokens, timesteps).clone()
    stages = {
        "clip": meter.measure(lambda: pipe.prompt(x), warmup=warmup),
        "vae_enc": meter.measure(lambda: pipe.encode(x), warmup=warmup),
        "unet": meter.measure(lambda: pipe.denoise(z, tokens, timesteps), warmup=warmup),
        "vae_dec": meter.measure(lambda: pipe.decode(zh), warmup=warmup),
    }
    if count:
        fns = {"clip": lambda: pipe.prompt(x), "vae_enc": lambda: pipe.encode(x),
               "unet": lambda: pipe.denoise(z, tokens, timesteps), "vae_dec": lambda: pipe.decode(zh)}
        for name, fn in fns.items():
            stages[name]["flops"] = count_flops(fn)
    if meter.mark_step is not None:
        meter.mark_step()
    out = pipe.run(lr, realism=REALISM, scale=SCALE).images.float().cpu()
    return {"stages": stages, "e2e": e2e}, out


class Originals:
    """The uncompiled modules of a pipeline, to undo ``pipe.compile`` between modes."""

    def __init__(self, pipe):
        self.unet = pipe.unet
        self.encoder = pipe.vae.encoder
        self.decoder = pipe.vae.decoder
        self.vision = pipe.prompt_encoder.vision_model if pipe.prompt_encoder is not None else None

    def restore(self, pipe) -> None:
        pipe.unet = self.unet
        pipe.vae.encoder = self.encoder
        pipe.vae.decoder = self.decoder
        if self.vision is not None:
            pipe.prompt_encoder.vision_model = self.vision


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _fmt_mem(b: Optional[int], kind: str) -> str:
    if b is None:
        return "-"
    star = "" if kind == "cuda_max_allocated" else "*"
    return f"{b / 2**30:.2f} GiB{star}"


HEADER = ("impl", "dtype", "compile", "batch", "CLIP", "VAE enc", "UNet", "VAE dec", "e2e ms", "ms/image", "peak mem")


def row_of(r: dict) -> list[str]:
    cfg = [r["impl"], r["dtype"], r["compile"] + ("+cl" if r.get("channels_last") else ""), str(r["batch"])]
    if r.get("error"):
        return cfg + ["FAILED: " + r["error"]]
    st = r["stages"]
    e2e = r["e2e"]
    return cfg + [_fmt_ms(st[s]["median_ms"]) for s in STAGES] + [
        _fmt_ms(e2e["median_ms"]), _fmt_ms(e2e["median_ms"] / r["batch"]), _fmt_mem(e2e["peak_bytes"], e2e["peak_kind"]),
    ]


def print_table(results: list[dict]) -> None:
    rows = [row_of(r) for r in results]
    widths = [len(h) for h in HEADER]
    for row in rows:
        if len(row) == len(HEADER):
            widths = [max(w, len(c)) for w, c in zip(widths, row)]
    def fmt(cells):
        if len(cells) < len(HEADER):  # failed row: config + message
            return " | ".join(c.ljust(w) for c, w in zip(cells[:4], widths)) + " | " + cells[4]
        return " | ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(list(HEADER)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))


def _plain(label: str) -> str:
    """``auto:bf16`` -> ``bf16``: the precision a label stands for."""
    return label.split(":", 1)[-1]


def ratios(results: list[dict], baseline_dtype: Optional[str] = None) -> list[dict]:
    """Each configuration of ours against the baseline of the same batch and of ``baseline_dtype``
    (default: ours' own precision; ``"fp32"``: what a user had before)."""
    out = []
    ok = [r for r in results if not r.get("error")]
    for r in ok:
        if r["impl"] != "ours":
            continue
        want = baseline_dtype or _plain(r["dtype"])
        base = [b for b in ok if b["impl"] == "baseline" and _plain(b["dtype"]) == want and b["batch"] == r["batch"]]
        if not base:
            continue
        out.append({
            "dtype": r["dtype"], "batch": r["batch"], "compile": r["compile"], "channels_last": r.get("channels_last"),
            "baseline_dtype": want, "baseline_e2e_ms": base[0]["e2e"]["median_ms"], "ours_e2e_ms": r["e2e"]["median_ms"],
            "speedup": base[0]["e2e"]["median_ms"] / r["e2e"]["median_ms"],
        })
    return out


def dtype_label(name: str, device: torch.device) -> tuple[str, torch.dtype]:
    """``auto`` resolved as the pipeline resolves it, labelled ``auto:bf16`` etc.; other names as given."""
    if name == "auto":
        dtype = resolve_dtype("auto", device)
        return f"auto:{next(k for k, v in DTYPES.items() if v == dtype)}", dtype
    return name, DTYPES[name]


def flop_report(results: list[dict], rates: dict[str, dict]) -> list[dict]:
    """Per stage of ours: GFLOP, GFLOP/s and the fraction of the machine's matmul and conv rates."""
    out = []
    for r in results:
        if r.get("error") or r["impl"] != "ours" or r["dtype"] not in rates:
            continue
        rate = rates[r["dtype"]]
        best_conv = max(rate["conv_gflops"], rate["conv_cl_gflops"])
        for stage in (*STAGES, "e2e"):
            if stage == "e2e":
                flops = sum(r["stages"][s].get("flops", 0) for s in STAGES)
                ms = r["e2e"]["median_ms"]
            else:
                flops, ms = r["stages"][stage].get("flops"), r["stages"][stage]["median_ms"]
            if not flops:
                continue
            gflops = flops / (ms * 1e6)
            out.append({"dtype": r["dtype"], "batch": r["batch"], "channels_last": r.get("channels_last"), "stage": stage,
                        "gflop": flops / 1e9, "ms": ms, "gflops": gflops, "of_matmul": gflops / rate["matmul_gflops"],
                        "of_conv": gflops / best_conv})
    return out


def targets(results: list[dict], speedups: list[dict], on_cuda: bool) -> list[dict]:
    ours = [r for r in results if r["impl"] == "ours" and not r.get("error")]
    b1 = [r["e2e"]["median_ms"] / r["batch"] for r in ours if r["batch"] == 1]
    bn = [(r["e2e"]["median_ms"] / r["batch"], r["batch"]) for r in ours if r["batch"] > 1]
    best_speed = max((s["speedup"] for s in speedups), default=None)

    def verdict(value, ok):
        if not on_cuda:
            return "n/a (targets are for CUDA)"
        if value is None:
            return "not measured"
        return "PASS" if ok else "FAIL"

    best_b1 = min(b1) if b1 else None
    best_bn = min(bn) if bn else None
    return [
        {"target": f"<= {TARGET_MS_BATCH1:g} ms/image at batch 1", "best": None if best_b1 is None else f"{best_b1:.2f} ms/image",
         "verdict": verdict(best_b1, best_b1 is not None and best_b1 <= TARGET_MS_BATCH1)},
        {"target": f"<= {TARGET_MS_BATCHED:g} ms/image batched (batch > 1)",
         "best": None if best_bn is None else f"{best_bn[0]:.2f} ms/image at batch {best_bn[1]}",
         "verdict": verdict(best_bn, best_bn is not None and best_bn[0] <= TARGET_MS_BATCHED)},
        {"target": f">= {TARGET_SPEEDUP:g}x faster than the unmerged-LoRA eager baseline (same dtype, batch)",
         "best": None if best_speed is None else f"{best_speed:.2f}x",
         "verdict": verdict(best_speed, best_speed is not None and best_speed >= TARGET_SPEEDUP)},
    ]


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown value(s) {bad}; choose from {', '.join(allowed)}")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="sd21_base", choices=("sd21_base", "tiny"), help="model configs (tiny: quick smoke test)")
    p.add_argument("--size", type=int, default=512, help="output side in px (LR side = size / 4)")
    p.add_argument("--batch", default="1", help="batch size, or a comma list (e.g. 1,8) to check both GPU targets")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32,fp16,bf16,auto (auto: what the pipeline picks on this machine; "
                        "default: fp32,auto on CPU, fp16,bf16 on CUDA)")
    p.add_argument("--compile", default=None,
                   help=f"comma list of torch.compile modes for ours, or {CUDA_GRAPH} (eager kernels, the denoise "
                        f"replayed as a CUDA graph): {', '.join(COMPILE_MODES)} "
                        "(default: none on CPU; none,max-autotune on CUDA)")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off", "both"),
                   help="ours only; auto: what the pipeline picks for the device and dtype; both: measure off and on")
    p.add_argument("--flops", action="store_true",
                   help="count each stage's FLOPs and measure the machine's matmul/conv rate, to report the fraction reached")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-warmup", type=int, default=3, help="minimum warmup calls for compiled configs (cudagraph recording)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true", help="only measure ours")
    p.add_argument("--json", default=None, help="save all results here")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """``rcod bench``: the subcommand of the rcod CLI."""
    p = subparsers.add_parser("bench", help="time and peak memory per stage: ours vs plain diffusers (unmerged LoRA)",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
    on_cuda = device.type == "cuda"
    if args.size % (8 * SCALE):
        raise SystemExit(f"--size must be a multiple of {8 * SCALE} (LR side a multiple of the 8x latent factor)")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise SystemExit("--batch must list positive integers")
    dtypes = parse_list(args.dtypes or ("fp16,bf16" if on_cuda else "fp32,auto"), DTYPE_CHOICES, "dtypes")
    modes = parse_list(args.compile or ("none,max-autotune" if on_cuda else "none"), COMPILE_MODES, "compile")
    if args.threads and not on_cuda:
        torch.set_num_threads(args.threads)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    lr_side = args.size // SCALE
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(Exception):
        import diffusers, peft, transformers  # noqa: E401
        env.update(diffusers=diffusers.__version__, peft=peft.__version__, transformers=transformers.__version__)
    print(f"# bench_engine: family={args.family} LR {lr_side}x{lr_side} -> {args.size}x{args.size} (x{SCALE}), "
          f"batches={batches}, dtypes={dtypes}, compile={modes}, channels_last(ours)={args.channels_last}, "
          f"repeats={args.repeats}, warmup={args.warmup}")
    print("# env: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    lr_cpu = {b: torch.rand(b, 3, lr_side, lr_side, generator=gen) for b in batches}
    results: list[dict] = []
    notes: list[str] = []

    def record(r: dict) -> None:
        results.append(r)
        line = " | ".join(row_of(r))
        print(f"  -> {line}", flush=True)

    layouts_of = {"on": (True,), "off": (False,), "both": (False, True)}
    rates: dict[str, dict] = {}
    seen_baseline: set = set()
    ref_out: dict[tuple, torch.Tensor] = {}  # baseline output per (dtype, batch)
    for dname_arg in dtypes:
        dname, dtype = dtype_label(dname_arg, device)
        layouts = layouts_of.get(args.channels_last) or (prefer_channels_last(device, dtype),)
        if args.flops and dname not in rates:
            rates[dname] = machine_rates(device, dtype, Meter(device, max(args.repeats, 3), 1, cudagraph_steps=False))
            print(f"[{dname}] machine: " + ", ".join(f"{k} {v:.0f}" for k, v in rates[dname].items()), flush=True)
        # ---- baseline: unmerged peft LoRA, plain calls, eager ----
        if not args.skip_baseline and dtype not in seen_baseline:
            seen_baseline.add(dtype)
            print(f"[{dname}] building baseline (unmerged LoRA) ...", flush=True)
            t0 = time.perf_counter()
            try:
                bpipe = build_pipeline(args.family, merge=False, device=device, dtype=dtype, seed=args.seed)
                baseline = PlainBaseline(bpipe, dtype, device)
                del bpipe
                build_s = time.perf_counter() - t0
                print(f"[{dname}] baseline built in {build_s:.1f} s", flush=True)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                for b in batches:
                    record({"impl": "baseline", "dtype": dname, "compile": "none", "batch": b, "error": _first_line(exc)})
                baseline = None
            if baseline is not None:
                meter = Meter(device, args.repeats, args.warmup, cudagraph_steps=False)
                for b in batches:
                    lr = lr_cpu[b].to(device)
                    try:
                        res, out = bench_baseline(baseline, lr, meter)
                        ref_out[dtype, b] = out
                        record({"impl": "baseline", "dtype": dname, "compile": "none", "channels_last": False,
                                "batch": b, "build_s": build_s, **res})
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        record({"impl": "baseline", "dtype": dname, "compile": "none", "batch": b, "error": _first_line(exc)})
                del baseline
            _free(device)

        # ---- ours: merged LoRA, RCODPipeline ----
        print(f"[{dname}] building ours (merged LoRA) ...", flush=True)
        t0 = time.perf_counter()
        try:
            pipe = build_pipeline(args.family, merge=True, device=device, dtype=dtype, seed=args.seed)
            build_s = time.perf_counter() - t0
            print(f"[{dname}] ours built in {build_s:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            for mode in modes:
                for b in batches:
                    record({"impl": "ours", "dtype": dname, "compile": mode, "batch": b, "error": _first_line(exc)})
            continue
        for channels_last in layouts:
            pipe.set_channels_last(channels_last)
            originals = Originals(pipe)
            for mode in modes:
                compiled = mode not in ("none", CUDA_GRAPH)
                for b in batches:
                    lr = lr_cpu[b].to(device)
                    cfg = {"impl": "ours", "dtype": dname, "compile": mode, "channels_last": channels_last, "batch": b}
                    try:
                        originals.restore(pipe)
                        if compiled:
                            torch._dynamo.reset()
                            pipe.compile(mode=mode, dynamic=False)
                        elif mode == CUDA_GRAPH:
                            pipe.use_cuda_graphs()
                        meter = Meter(device, args.repeats, args.warmup, cudagraph_steps=compiled)
                        warm = max(args.warmup, args.compile_warmup) if compiled else args.warmup
                        res, out = bench_ours(pipe, lr, meter, warm, count=args.flops)
                        if (dtype, b) in ref_out:
                            diff = (out - ref_out[dtype, b]).abs()
                            res["max_abs_diff_vs_baseline"] = float(diff.max())
                            res["mean_abs_diff_vs_baseline"] = float(diff.mean())
                        res["build_s"] = build_s
                        record({**cfg, **res})
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        record({**cfg, "error": _first_line(exc)})
                    finally:
                        originals.restore(pipe)
                        pipe.use_cuda_graphs(False)
                        if compiled:
                            torch._dynamo.reset()
                        _free(device)
            del originals
        del pipe
        _free(device)

    # ---- report ----
    print()
    print(f"== RCOD engine benchmark: {args.family}, {args.size}x{args.size} output (LR {lr_side}x{lr_side}, x{SCALE}), "
          f"{env['device_name']} ({device}), median of {args.repeats} after {args.warmup} warmup; stage columns in ms ==")
    print_table(results)
    if not on_cuda:
        kinds = {r["e2e"]["peak_kind"] for r in results if not r.get("error")}
        if "rss_peak_window" in kinds:
            print("* peak mem on CPU = process peak RSS (VmHWM) during the e2e measurement, reset before it; "
                  "process-wide (weights of the current model + everything else alive)")
        else:
            print("* peak mem on CPU = process all-time peak RSS (ru_maxrss), process-wide: includes earlier configs")
    else:
        print("peak mem = torch.cuda.max_memory_allocated during the e2e measurement (weights included)")
    for r in results:
        if "max_abs_diff_vs_baseline" in r:
            first = r["e2e"].get("first_call_ms")
            notes.append(f"ours {r['dtype']} {r['compile']}{'+cl' if r.get('channels_last') else ''} b{r['batch']}: "
                         f"output max|diff| vs baseline = "
                         f"{r['max_abs_diff_vs_baseline']:.3g} (mean {r['mean_abs_diff_vs_baseline']:.3g})"
                         + (f"; first e2e call {first:.0f} ms" if first is not None else ""))
    for n in notes:
        print("  " + n)

    speedups = ratios(results)
    print("\nspeed-up = baseline e2e / ours e2e (same dtype, batch):")
    if not speedups:
        print("  (no baseline/ours pair measured)")
    for s in speedups:
        print(f"  {s['dtype']} b{s['batch']} {s['compile']}{'+cl' if s['channels_last'] else ''}: "
              f"{s['baseline_e2e_ms']:.1f} / {s['ours_e2e_ms']:.1f} ms = {s['speedup']:.2f}x")

    vs_fp32 = ratios(results, baseline_dtype="fp32")
    if vs_fp32:
        print("\nspeed-up vs the plain-diffusers fp32 baseline (same batch):")
        for s in vs_fp32:
            print(f"  ours {s['dtype']} b{s['batch']} {s['compile']}{'+cl' if s['channels_last'] else ''}: "
                  f"{s['baseline_e2e_ms']:.1f} / {s['ours_e2e_ms']:.1f} ms = {s['speedup']:.2f}x")

    utilisation = flop_report(results, rates)
    if utilisation:
        print("\nFLOPs per stage (ours) and the fraction of the machine's measured rate "
              "(matmul / best 3x3 conv of the same dtype):")
        for u in utilisation:
            print(f"  {u['dtype']} b{u['batch']}{'+cl' if u['channels_last'] else ''} {u['stage']}: {u['gflop']:.1f} GFLOP "
                  f"in {u['ms']:.1f} ms = {u['gflops']:.0f} GFLOP/s ({100 * u['of_matmul']:.0f} % of matmul, "
                  f"{100 * u['of_conv']:.0f} % of conv)")

    tgt = targets(results, speedups, on_cuda)
    print("\nGPU targets: <= 15 ms/image at batch 1, <= 10 ms/image batched, >= 5x vs unmerged-LoRA eager baseline")
    for t in tgt:
        print(f"  {t['target']}: best {t['best'] or '-'} -> {t['verdict']}")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": vars(args), "env": env, "results": results, "speedups": speedups,
                   "speedups_vs_fp32_baseline": vs_fp32, "machine_rates": rates, "flops": utilisation, "targets": tgt}
        path.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nsaved {path}")
    return 0 if not any(r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
