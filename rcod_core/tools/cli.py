"""The ``rcod`` command line: ``rcod upscale``, ``rcod convert``, ``rcod make-tiny``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch


from ..devices import DTYPES, resolve_device, resolve_dtype


def _parse_realism(value: str):
    return int(value) if value.lstrip("+-").isdigit() else value


def _parse_size(value: str) -> tuple[int, int]:
    from ..imageops import MAX_OUTPUT_PIXELS

    try:
        w, h = value.lower().split("x")
        h, w = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like WIDTHxHEIGHT, e.g. 1024x768, got {value!r}")
    if h < 1 or w < 1 or h * w > MAX_OUTPUT_PIXELS:
        raise argparse.ArgumentTypeError(f"--size {value}: must be positive and at most {MAX_OUTPUT_PIXELS:,} px in all")
    return h, w


def _parse_tile(value: str):
    if value in ("auto", "none"):
        return value
    if value.isdigit() and int(value) >= 16:
        return int(value)
    raise argparse.ArgumentTypeError(f"--tile must be auto, none or a latent tile size >= 16, got {value!r}")


#: the shape bucket ``--shape-bucket auto`` gives a compiled pipeline: one graph per 128 px of size
COMPILED_SHAPE_BUCKET = 128


def _parse_bucket(value: str):
    if value == "auto":
        return value
    if value.isdigit() and int(value) % 8 == 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"--shape-bucket must be auto, 0 or a multiple of the model's padding unit (64 px for SD), got {value!r}")


def _parse_bytes(value: str) -> int:
    units = {"": 1, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "m": 2 ** 20, "mb": 2 ** 20, "g": 2 ** 30, "gb": 2 ** 30}
    v = value.strip().lower()
    number = v.rstrip("kmgb")
    try:
        amount = float(number) * units[v[len(number):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"--max-memory must look like 6GB or 512MB, got {value!r}")
    if not math.isfinite(amount) or amount < 2 ** 20:
        raise argparse.ArgumentTypeError(f"--max-memory must be a finite budget of at least 1MB, got {value!r}")
    return int(amount)


def _parse_seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {value!r}")
    if not 0 <= seed < 2 ** 64:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, 2^64), got {value}")
    return seed


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if args.tiny_smoke:
        from ..testing.tiny import tiny_pipeline

        print("SMOKE RUN: tiny random-weight model (no pretrained weights); the output shows the "
              "pipeline works, not what RCOD looks like.", file=sys.stderr)
        return tiny_pipeline(kind="rcod_o", seed=args.seed, device=device, dtype=dtype)
    if not args.model:
        raise ValueError("--model is required (or --tiny-smoke for an offline smoke run)")
    from ..loader import load_pipeline

    return load_pipeline(args.model, base=args.base, clip=args.clip, extras=args.extra or (), device=device,
                         dtype=dtype, prompt=args.prompt, merge=not args.no_merge)


def check_upscale_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be wrong, before a model is loaded (one line each)."""
    from ..grouping import resolve_realism
    from ..imageops import output_size

    resolve_device(args.device)
    if not args.size:
        try:
            output_size(1, 1, args.scale)  # the pipeline's own range check, before anything loads
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None
    realism = _parse_realism(args.realism)
    if not (isinstance(realism, str) and realism.strip().lower() in ("adaptive", "auto-map")):
        resolve_realism(realism)
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"-o {args.output}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"-o {args.output}: the output folder is not writable")


def cmd_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .batch import expand_inputs, plan_outputs, shard, upscale_files

    check_upscale_args(args)
    untiled = args.dump or args.processing == "release"
    if args.tile is None:
        args.tile = "none" if untiled else "auto"
    if args.dump and args.tile != "none":
        raise ValueError("--dump records one untiled pass per image: use it with --tile none")
    if args.processing == "release" and (args.size or args.tile != "none" or args.scale != int(args.scale)):
        raise ValueError("--processing release runs the release's scripts: an integer --scale, no --size, --tile none")
    if args.cuda_graphs and args.compile != "none":
        raise ValueError("--cuda-graphs replays eager kernels; with --compile use --compile reduce-overhead for CUDA graphs")
    if args.shape_bucket == "auto":
        fixed_graphs = args.compile != "none" or args.cuda_graphs
        args.shape_bucket = COMPILED_SHAPE_BUCKET if fixed_graphs and args.processing != "release" else 0
    elif args.shape_bucket and args.processing == "release":
        raise ValueError("--processing release pads as the release's scripts do: use it without --shape-bucket")
    state = _process_state()
    device = resolve_device(args.device) if state is None or args.device != "auto" else state.device
    dtype = resolve_dtype(args.dtype, device)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device; the run is on {device}")
    files = expand_inputs(args.inputs)
    if not files:
        print("no input images found", file=sys.stderr)
        return 1
    index, count = (state.process_index, state.num_processes) if state is not None else (0, 1)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"-o {args.output}: exists and is not a folder")
    planned = list(zip(files, plan_outputs(files, out_dir, args.format)))  # over all files: no two shards collide
    mine_planned = shard(planned, index, count)
    mine = [f for f, _ in mine_planned]
    pipe = build_pipeline(args, device, dtype)
    try:
        pipe.set_shape_bucket(args.shape_bucket)
    except ValueError as exc:
        raise ValueError(f"--shape-bucket: {exc}") from None
    if args.compile != "none":
        pipe.compile(mode=None if args.compile == "default" else args.compile)
    if args.cuda_graphs:
        pipe.use_cuda_graphs()
    color = args.color_fix or pipe.spec.default_color_fix
    bar = tqdm(total=len(mine), desc=f"rcod upscale [{index + 1}/{count}]" if count > 1 else "rcod upscale",
               unit="img", disable=args.quiet or None, position=index)

    who = f"[{index + 1}/{count}] " if count > 1 else ""

    def report(res) -> None:
        bar.update(1)
        if res.status == "written":
            extra = f", M_L={res.metric:.3f}" if res.metric is not None else ""
            tqdm.write(f"{who}{res.source} -> {res.output} (t={res.timesteps}{extra})")
        elif res.status == "skipped":
            tqdm.write(f"{who}skip {res.source}: {res.message}")
        else:
            tqdm.write(f"{who}FAILED {res.source}: {res.message}", file=sys.stderr)

    if args.max_memory is not None and pipe.device.type == "cpu":
        from rcod_core.devices import bound_cpu_heap

        bound_cpu_heap()  # the budget holds for the process's memory, not only for live tensors
    results = upscale_files(
        pipe, mine, out_dir, fmt=args.format, outputs=[o for _, o in mine_planned], overwrite=args.overwrite, seed=args.seed, on_result=report,
        realism=_parse_realism(args.realism), scale=None if args.size else args.scale, size=args.size,
        x0_mode=args.x0_mode, tile=args.tile, tile_overlap=args.tile_overlap, max_memory=args.max_memory,
        color_fix=color, resampler=args.resampler, latent=args.latent, processing=args.processing,
        dump_dir=Path(args.dump) if args.dump else None,
    )
    bar.close()
    counts = {k: sum(r.status == k for r in results) for k in ("written", "skipped", "failed")}
    if state is not None and count > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([counts])
        counts = {k: sum(c[k] for c in gathered) for k in counts}
        if not state.is_main_process:
            return min(counts["failed"], 125)
    print(f"rcod upscale: {counts['written']} written, {counts['skipped']} skipped, {counts['failed']} failed "
          f"(of {len(files)})", file=sys.stderr)
    return min(counts["failed"], 125)


def _process_state():
    """accelerate's process state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # without cpu=True accelerate forms no process group on a machine without CUDA
    return PartialState(cpu=not torch.cuda.is_available())


def parse_grouping(value: str):
    """``--grouping``: ``official``, ``official:4``, a GroupingRule as JSON, or a ``rcod-train scan-metric``
    file (→ Eq. 5 with its M_L bounds, n = 3)."""
    import json

    from ..grouping import GroupingRule

    if value in ("official", "official:3", "official:4"):
        return GroupingRule.official(int(value.partition(":")[2] or 3))
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--grouping {value!r}: not 'official', a JSON rule or a readable file ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"--grouping {value!r}: not valid JSON") from None
    if isinstance(data, dict) and "kind" not in data and "m_min" in data and "m_max" in data:  # a scan-metric file
        return GroupingRule.paper(float(data["m_min"]), float(data["m_max"]))
    return GroupingRule.from_dict(data)


def cmd_convert(args: argparse.Namespace) -> int:
    import json

    from ..checkpoints import convert, describe

    dst = Path(args.output)
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst} exists; pass --overwrite to replace it")
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {dst.name!r}")
    metadata = {k: v for k, v in (("base", args.base), ("clip", args.clip)) if v}
    grouping = parse_grouping(args.grouping) if args.grouping else None
    ckpt = convert(args.input, dst, tuple(args.extra or ()), metadata, grouping)
    print(json.dumps({"written": str(dst), **describe(ckpt)}, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from ..checkpoints import describe, load_checkpoint

    print(json.dumps(describe(load_checkpoint(args.checkpoint)), indent=2))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from ..testing.tiny import TINY_SET, make_tiny

    out = make_tiny(args.directory, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny random-weight model set (smoke tests only) in {Path(args.directory).resolve()}:")
    for name, path in out.items():
        print(f"  {name:26s} {TINY_SET[name]}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..loader import download

    path = download(args.name, local_dir=args.local_dir, local_files_only=args.local_files_only)
    print(path)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcod", description="RCOD one-step super-resolution with realism control")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale images, folders or globs")
    up.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    up.add_argument("-o", "--output", required=True, help="output folder")
    up.add_argument("--model", help="RCOD / OSEDiff / S3Diff checkpoint (official pickle or our .safetensors), "
                    "or demo: the built-in small RCOD_O")
    up.add_argument("--base", help="base model: diffusers folder or single .safetensors/.ckpt file")
    up.add_argument("--clip", help="CLIP ViT-L/14 vision model: transformers folder or .safetensors")
    up.add_argument("--extra", action="append", metavar="FILE",
                    help="a separate part of the model: the release's MEM file or de_net.pth (repeatable)")
    up.add_argument("--prompt", default="", help="text prompt for the text-conditioned bases (OSEDiff, S3Diff)")
    up.add_argument("--realism", default="neutral",
                    help="fidelity | neutral | realism | adaptive (MEM) | an integer t in [1, 999]")
    up.add_argument("--x0-mode", choices=["official", "paper", "base"], default=None,
                    help="x0 conversion (default: the model's own; official = the release's fixed alpha-bar, paper = alpha-bar_t, base = t 999)")
    scale = up.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float, default=4.0, help="upscale factor in [1, 8] (default 4)")
    scale.add_argument("--size", type=_parse_size, help="target size WIDTHxHEIGHT instead of --scale")
    up.add_argument("--tile", type=_parse_tile, default=None,
                    help="auto (default; none with --processing release or --dump: fit --max-memory / free memory, untiled when it fits) | none | latent tile size")
    up.add_argument("--tile-overlap", type=int, default=32, help="tile overlap in latent pixels (default 32)")
    up.add_argument("--max-memory", type=_parse_bytes, default=None, help="memory budget for --tile auto, e.g. 6GB")
    up.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None,
                    help="colour correction towards the LR (default: the model family's, adain or wavelet)")
    up.add_argument("--resampler", choices=["bicubic", "bilinear", "nearest", "area"], default="bicubic",
                    help="classical resampler for the LR upscale before encoding (and alpha)")
    up.add_argument("--format", choices=["png", "jpg", "webp", "tif", "same"], default="png",
                    help="output format (16-bit inputs stay 16-bit in png/tif)")
    up.add_argument("--compile", choices=["none", "default", "max-autotune", "reduce-overhead"], default="none",
                    help="torch.compile the UNet, VAE and CLIP (GPU; the first images are slower)")
    up.add_argument("--cuda-graphs", action="store_true",
                    help="replay the one-step UNet pass as a CUDA graph per input shape (eager kernels, no launch cost)")
    up.add_argument("--shape-bucket", type=_parse_bucket, default="auto", metavar="PX",
                    help=f"pad inputs up to multiples of PX output pixels so that images of similar sizes share one "
                         f"compiled graph (auto: {COMPILED_SHAPE_BUCKET} with --compile or --cuda-graphs, else 0 = only "
                         f"what the UNet needs)")
    up.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    up.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="precision (auto: bf16 or fp16 on GPU; on CPU bf16 where it computes bf16 natively (AVX-512 BF16, AMX), else fp32)")
    up.add_argument("--seed", type=_parse_seed, default=0,
                    help="seeds the latent draw of --latent sample, afresh for every file (the only random draw)")
    up.add_argument("--latent", choices=["mode", "sample"], default=None,
                    help="VAE posterior mode (default) or a seeded sample (the release's latent_dist.sample(); "
                         "the default of --processing release)")
    up.add_argument("--processing", "--preprocess", dest="processing", choices=["ours", "release"], default="ours",
                    help="release: the authors' inference scripts' size rules, PIL resamplers, 8-bit truncation, "
                         "colour-fix order and 250/500/750 -> 249/499/749 (see docs/REPRODUCE.md)")
    up.add_argument("--no-merge", action="store_true", help="keep the LoRA unmerged (peft layers), as the release runs")
    up.add_argument("--dump", metavar="DIR", help="write each image's intermediates (CLIP hidden state, tokens, "
                                                  "z_L, eps, x0) to DIR as .npy (with --tile none)")
    up.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    up.add_argument("--tiny-smoke", action="store_true",
                    help="SMOKE RUN: build a tiny random-weight model instead of loading one (offline check)")
    up.set_defaults(func=cmd_upscale)

    conv = sub.add_parser("convert", help="convert an official checkpoint to our single .safetensors")
    conv.add_argument("input", help="official pickle (OSEDiff, S3Diff, RCOD_O, RCOD_S) or our file")
    conv.add_argument("output", help="output .safetensors")
    conv.add_argument("--extra", action="append", metavar="FILE", help="MEM file or de_net.pth to include (repeatable)")
    conv.add_argument("--base", help="record this base model path in the file's metadata")
    conv.add_argument("--clip", help="record this CLIP vision path in the file's metadata")
    conv.add_argument("--grouping", metavar="RULE", help="the LDG rule to store: official, official:4, a JSON rule, or a "
                      "`rcod-train scan-metric --out` file (Eq. 5 with its M_L bounds); default: the file's own")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="recognise a checkpoint and print what it holds")
    info.add_argument("checkpoint")
    info.set_defaults(func=cmd_info)

    from .bench import add_bench_parser
    from .evaluate import add_eval_parser

    add_eval_parser(sub)
    add_bench_parser(sub)

    from ..loader import HUB_MODELS

    dl = sub.add_parser("download", help="explicitly download a base / CLIP model from the Hugging Face hub")
    dl.add_argument("name", help=f"one of {', '.join(HUB_MODELS)} or a hub repository id")
    dl.add_argument("--local-dir", help="copy the files here (default: the hub cache)")
    dl.add_argument("--local-files-only", action="store_true", help="only resolve the cache; never download")
    dl.set_defaults(func=cmd_download)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model set in every format (offline smoke tests)")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rcod: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
