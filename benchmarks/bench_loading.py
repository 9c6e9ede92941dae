#!/usr/bin/env python
"""Load times of full-size checkpoints (random weights in the releases' exact key layouts), CPU.

Writes an RCOD_O pickle (SD 2.1-base, LoRA r=4) and an RCOD_S pickle (SD-Turbo, r=32/16) in the
official layout, converts both to our .safetensors, then times: reading + recognising + validating
each file (``load_checkpoint``), and assembling the model on random base weights (inject LoRA,
load, merge for RCOD_O). Prints a table.

    python benchmarks/bench_loading.py --out rcod-load
"""

import argparse
import os
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcod_core.build import assemble  # noqa: E402
from rcod_core.checkpoints import convert, load_checkpoint, merge_checkpoints  # noqa: E402
from rcod_core.build import assemble_s3  # noqa: E402
from rcod_core.models import build_models  # noqa: E402
from rcod_core.testing.tiny import de_net_state, osediff_like_dict, s3diff_like_dict  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "rcod-load"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    files = {
        "rcod_o.pkl": lambda: osediff_like_dict("rcod_o", family="sd21_base"),
        "rcod_s.pkl": lambda: s3diff_like_dict("rcod_s", ranks=(32, 16), family="sd_turbo"),
    }
    for name, make in files.items():
        path = out / name
        if not path.exists():
            torch.save(make(), path)
    torch.save(de_net_state(), out / "de_net.pth")
    convert(out / "rcod_o.pkl", out / "rcod_o.safetensors")
    convert(out / "rcod_s.pkl", out / "rcod_s.safetensors", (out / "de_net.pth",))
    for name in ("rcod_o.pkl", "rcod_o.safetensors", "rcod_s.pkl", "rcod_s.safetensors"):
        ckpt, seconds = timed(lambda: load_checkpoint(out / name))
        if name == "rcod_s.pkl":
            ckpt = merge_checkpoints(ckpt, load_checkpoint(out / "de_net.pth"))
        family = "sd21_base" if ckpt.spec.kind == "rcod_o" else "sd_turbo"
        base, base_s = timed(lambda: build_models(family, seed=0))
        if ckpt.spec.kind == "rcod_o":
            _, build_s = timed(lambda: assemble(base, ckpt.spec, ckpt.groups["unet"], ckpt.groups["vae"],
                                                ckpt.groups["projection"], merge=True))
        else:
            _, build_s = timed(lambda: assemble_s3(base, ckpt.spec, ckpt.groups))
        size = (out / name).stat().st_size / 2 ** 20
        rows.append((name, size, seconds, build_s, base_s))
        print(f"{name:20s} {size:8.1f} MiB  read+detect+validate {seconds:6.2f} s  assemble {build_s:6.2f} s  "
              f"(random base init {base_s:5.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
