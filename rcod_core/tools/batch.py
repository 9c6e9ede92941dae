"""Upscale image files: one image with its alpha/gray/bit depth kept, or a list of files where a
bad file is reported and skipped, outputs are never overwritten unless asked, and writes are atomic.

Used by ``rcod upscale`` (also under ``accelerate launch``: :func:`shard` splits the list by process).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..files import remove_stale_temp_files
from ..imageio import IMAGE_EXTENSIONS, SAVE_FORMATS, LoadedImage, load_image, save_image
from ..imageops import resize
from ..pipeline import RCODPipeline, StageOutput

OUTPUT_FORMATS = ("png", "jpg", "webp", "tif", "same")


@dataclass
class FileResult:
    source: Path
    output: Optional[Path]
    status: str  # "written" | "skipped" | "failed"
    message: str = ""
    timesteps: list[int] = field(default_factory=list)
    metric: Optional[float] = None


def upscale_image(pipe: RCODPipeline, image: LoadedImage, alpha_resampler: str = "bicubic",
                  **run_kwargs) -> tuple[LoadedImage, StageOutput]:
    """Run the model on an image's RGB; the alpha channel is upscaled separately with a classical
    resampler and re-attached; grayscale, bit depth and ICC profile carry over. Refuses NaN/Inf."""
    result = pipe.run(image.rgb, **run_kwargs)
    if not torch.isfinite(result.images).all():
        raise ValueError("the model produced NaN or Inf values (try --dtype fp32 or a float32 VAE)")
    alpha = None
    if image.alpha is not None:
        alpha = resize(image.alpha.to(result.images.device), tuple(result.images.shape[-2:]), alpha_resampler)
    out = LoadedImage(result.images.cpu(), None if alpha is None else alpha.cpu(), image.grayscale,
                      image.bit_depth, image.icc_profile)
    return out, result


#: the latent tile of the one retry after CUDA runs out of memory
OOM_RETRY_TILE = 64


def _upscale_retrying(pipe: RCODPipeline, image: LoadedImage, seed: int, run_kwargs: dict):
    """:func:`upscale_image` with a fresh seeded generator; on CUDA out-of-memory, once more tiled."""
    def attempt(**override):
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        return upscale_image(pipe, image, generator=generator, **{**run_kwargs, **override})

    try:
        return attempt()
    except torch.cuda.OutOfMemoryError:
        if run_kwargs.get("processing") == "release" or run_kwargs.get("tile") not in (None, "none", "auto"):
            raise
        torch.cuda.empty_cache()
        return attempt(tile=OOM_RETRY_TILE, tile_overlap=min(int(run_kwargs.get("tile_overlap", 32)), OOM_RETRY_TILE // 2))


def write_intermediates(folder: Path, stem: str, record: dict) -> list[Path]:
    """Each recorded intermediate as ``<folder>/<stem>_<name>.npy`` (float32); returns the files."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, value in sorted(record.items()):
        path = folder / f"{stem}_{name}.npy"
        np.save(path, value.numpy().astype(np.float32))
        written.append(path)
    return written


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs → a de-duplicated list of files."""
    found: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise ValueError(f"input {item!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():  # hidden files (e.g. temporary files of a killed run) are not inputs
                found.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()
                                    and not q.name.startswith(".")))
            elif p.exists():
                found.append(p)
            else:
                raise ValueError(f"input {item!r} does not exist")
    return list(dict.fromkeys(found))


def output_path(out_dir: Path, source: Path, fmt: str = "png") -> Path:
    """``<out>/<stem>_rcod.<ext>``; ``fmt="same"`` keeps the input's format."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    suffix = source.suffix.lower() if fmt == "same" else f".{fmt}"
    if suffix not in SAVE_FORMATS:
        suffix = ".png"
    return out_dir / f"{source.stem}_rcod{suffix}"


def plan_outputs(files: Sequence[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """One output path per input, never two alike: inputs whose ``<stem>_rcod.<ext>`` would collide
    (``photo.png`` and ``photo.jpg``) get their own extension in the name (``photo_png_rcod.png``)."""
    plain = [output_path(out_dir, Path(f), fmt) for f in files]
    counts: dict[Path, int] = {}
    for dst in plain:
        counts[dst] = counts.get(dst, 0) + 1
    planned = []
    for src, dst in zip(files, plain):
        if counts[dst] > 1:
            src = Path(src)
            tag = src.suffix.lstrip(".").lower() or "noext"
            dst = dst.with_name(f"{src.stem}_{tag}_rcod{dst.suffix}")
        planned.append(dst)
    return planned


def is_earlier_output(src: Path, out_dir: Path) -> bool:
    """An ``*_rcod.*`` file in the output folder itself: what an earlier run wrote, not an input."""
    src = Path(src)
    return src.parent.resolve() == Path(out_dir).resolve() and src.stem.endswith("_rcod")


def shard(files: Sequence[Path], index: int, count: int) -> list[Path]:
    """The files process ``index`` of ``count`` handles (round robin over the sorted list)."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} outside [0, {count})")
    return list(files[index::count])


def upscale_files(
    pipe: RCODPipeline,
    files: Iterable[Path],
    out_dir: Path,
    fmt: str = "png",
    overwrite: bool = False,
    seed: int = 0,
    on_result: Optional[Callable[[FileResult], None]] = None,
    dump_dir: Optional[Path] = None,
    outputs: Optional[Sequence[Path]] = None,
    **run_kwargs,
) -> list[FileResult]:
    """Upscale each file into ``out_dir``. A file that fails is reported and skipped; an existing
    output is skipped unless ``overwrite``; an output that would replace its input is refused.

    Each file gets a fresh ``torch.Generator(pipe.device).manual_seed(seed)`` (the latent draw).
    ``dump_dir``: the model's intermediates per file as ``<output stem>_<name>.npy`` (float32):
    ``clip_hidden`` (B, N, hidden; VPIM models), ``tokens`` (B, N, D), ``z_l``, ``eps``, ``x0``
    (B, C, h, w; scaled latents). ``outputs``: the output path of each file (default:
    :func:`plan_outputs`; a sharded run plans over all files first, so no two processes collide).
    Any per-file failure (unreadable file, out of memory, a model error) is reported and the batch
    goes on; on CUDA out-of-memory the file is retried once tiled."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    files = list(files)
    results = []
    outputs = list(outputs) if outputs is not None else plan_outputs(files, out_dir, fmt)
    if len(outputs) != len(files):
        raise ValueError(f"{len(outputs)} output paths for {len(files)} files")
    for src, dst in zip(files, outputs):
        try:
            if dst.resolve() == Path(src).resolve():
                raise ValueError("the output would overwrite the input")
            if is_earlier_output(src, out_dir):
                res = FileResult(src, None, "skipped", "an output of an earlier run in the output folder")
            elif dst.exists() and not overwrite:
                res = FileResult(src, dst, "skipped", f"{dst} exists (use --overwrite)")
            else:
                loaded = load_image(src)
                if dump_dir is None:
                    image, result = _upscale_retrying(pipe, loaded, seed, run_kwargs)
                else:
                    with pipe.model.recording() as record:
                        image, result = _upscale_retrying(pipe, loaded, seed, run_kwargs)
                    write_intermediates(Path(dump_dir), dst.stem, record)
                save_image(dst, image, overwrite=overwrite)
                metric = result.metric
                res = FileResult(src, dst, "written", "", result.timesteps.tolist(),
                                 float(metric.float().mean()) if metric is not None else None)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            res = FileResult(src, None, "failed", first if isinstance(exc, (ValueError, OSError)) else
                             f"{type(exc).__name__}: {first}")
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results
