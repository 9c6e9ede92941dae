"""The ``rcod`` command line: ``rcod upscale``, ``rcod convert``, ``rcod make-tiny``."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .imageio import IMAGE_EXTENSIONS, LoadedImage, load_image, save_image

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs → a de-duplicated list of files."""
    found: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise ValueError(f"input {item!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()))
            elif p.exists():
                found.append(p)
            else:
                raise ValueError(f"input {item!r} does not exist")
    return list(dict.fromkeys(found))


def output_path(out_dir: Path, source: Path, suffix: str = ".png") -> Path:
    return out_dir / f"{source.stem}_rcod{suffix}"


def _parse_realism(value: str):
    return int(value) if value.lstrip("+-").isdigit() else value


def _parse_size(value: str) -> tuple[int, int]:
    try:
        w, h = value.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like WIDTHxHEIGHT, e.g. 1024x768, got {value!r}")


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if args.tiny_smoke:
        from .build import tiny_pipeline

        print("SMOKE RUN: tiny random-weight model (no pretrained weights); the output shows the "
              "pipeline works, not what RCOD looks like.", file=sys.stderr)
        return tiny_pipeline(kind="rcod_o", seed=args.seed, device=device, dtype=dtype)
    if not args.model:
        raise ValueError("--model is required (or --tiny-smoke for an offline smoke run)")
    from .loader import load_pipeline

    return load_pipeline(args.model, base=args.base, clip=args.clip, extras=args.extra or (), device=device,
                         dtype=dtype, prompt=args.prompt)


def cmd_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files = expand_inputs(args.inputs)
    if not files:
        print("no input images found", file=sys.stderr)
        return 1
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(args, device, dtype)
    realism = _parse_realism(args.realism)
    failures = 0
    for src in tqdm(files, desc="rcod upscale", unit="img", disable=args.quiet):
        dst = output_path(out_dir, src)
        try:
            if dst.resolve() == src.resolve():
                raise ValueError("output would overwrite the input")
            if dst.exists() and not args.overwrite:
                tqdm.write(f"skip {src}: {dst} exists (use --overwrite)")
                continue
            image = load_image(src)
            generator = torch.Generator(device=device).manual_seed(args.seed)
            result = pipe.run(
                image.rgb, realism=realism, scale=None if args.size else args.scale, size=args.size,
                x0_mode=args.x0_mode, generator=generator,
            )
            alpha = None
            if image.alpha is not None:
                from .pipeline import resize

                alpha = resize(image.alpha, tuple(result.images.shape[-2:]), "bicubic")
            save_image(dst, LoadedImage(result.images.cpu(), alpha, image.grayscale, image.bit_depth, image.icc_profile),
                       overwrite=args.overwrite)
            tqdm.write(f"{src} -> {dst} (t={result.timesteps.tolist()[0]})")
        except (ValueError, OSError) as exc:
            failures += 1
            tqdm.write(f"FAILED {src}: {exc}")
    if failures:
        print(f"{failures} of {len(files)} image(s) failed", file=sys.stderr)
    return min(failures, 125)


def cmd_convert(args: argparse.Namespace) -> int:
    import json

    from .checkpoints import convert, describe

    dst = Path(args.output)
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst} exists; pass --overwrite to replace it")
    if dst.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {dst.name!r}")
    metadata = {k: v for k, v in (("base", args.base), ("clip", args.clip)) if v}
    ckpt = convert(args.input, dst, tuple(args.extra or ()), metadata)
    print(json.dumps({"written": str(dst), **describe(ckpt)}, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from .checkpoints import describe, load_checkpoint

    print(json.dumps(describe(load_checkpoint(args.checkpoint)), indent=2))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import TINY_SET, make_tiny

    out = make_tiny(args.directory, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny random-weight model set (smoke tests only) in {Path(args.directory).resolve()}:")
    for name, path in out.items():
        print(f"  {name:26s} {TINY_SET[name]}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcod", description="RCOD one-step super-resolution with realism control")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale images, folders or globs")
    up.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    up.add_argument("-o", "--output", required=True, help="output folder")
    up.add_argument("--model", help="RCOD / OSEDiff / S3Diff checkpoint (official pickle or our .safetensors)")
    up.add_argument("--base", help="base model: diffusers folder or single .safetensors/.ckpt file")
    up.add_argument("--clip", help="CLIP ViT-L/14 vision model: transformers folder or .safetensors")
    up.add_argument("--extra", action="append", metavar="FILE",
                    help="a separate part of the model: the release's MEM file or de_net.pth (repeatable)")
    up.add_argument("--prompt", default="", help="text prompt for the text-conditioned bases (OSEDiff, S3Diff)")
    up.add_argument("--realism", default="neutral",
                    help="fidelity | neutral | realism | adaptive (MEM) | an integer t in [1, 999]")
    up.add_argument("--x0-mode", choices=["official", "paper", "base"], default=None,
                    help="x0 conversion (default: the model's own, see RCOD-notes)")
    scale = up.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float, default=4.0, help="upscale factor in [1, 8] (default 4)")
    scale.add_argument("--size", type=_parse_size, help="target size WIDTHxHEIGHT instead of --scale")
    up.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    up.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="precision (auto: bf16/fp16 on GPU, fp32 on CPU)")
    up.add_argument("--seed", type=int, default=0)
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
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="recognise a checkpoint and print what it holds")
    info.add_argument("checkpoint")
    info.set_defaults(func=cmd_info)

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
