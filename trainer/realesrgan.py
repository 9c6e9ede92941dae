"""Real-ESRGAN second-order degradation (Wang et al. 2021, Sec. 3) on tensors, seeded per sample.

The pipeline follows the release's ``params_realesrgan.yml`` (OSEDiff / RCOD use the Real-ESRGAN
x4plus settings) and the order of Real-ESRGAN's ``feed_data``:

1. blur with kernel 1 → random resize (up / down / keep, area / bilinear / bicubic) → Gaussian or
   Poisson noise (colour or grey) → JPEG;
2. blur with kernel 2 (probability ``second_blur_prob``) → resize relative to the final size → noise
   → in random order either [resize to HR / scale + final sinc filter] then JPEG, or JPEG then
   [resize + sinc];
3. clamp and round to 8 bit.

Kernels (``kernel_range`` 7..21, odd): isotropic / anisotropic Gaussian, generalised Gaussian
(``exp(-½ (xᵀΣ⁻¹x)^β)``), plateau (``1 / (1 + (xᵀΣ⁻¹x)^β)``) and the 2-D sinc (circular low-pass,
``ω_c J₁(ω_c r) / (2π r)``), all padded to 21 x 21.

Every random draw of sample ``i`` comes from that sample's own ``torch.Generator`` (seeded from the
run seed and the sample's stream index), so a sample is degraded identically whatever batch, process
or resume it lands in. Random numbers are drawn on the CPU; the image arithmetic runs on the images'
device. JPEG uses Pillow's libjpeg encoder (4:2:0, integer quality) per image: it moves each image
to the CPU and back, and is not differentiable (nothing upstream needs gradients).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class DegradationConfig:
    """The Real-ESRGAN x4plus settings (``params_realesrgan.yml`` of OSEDiff / RCOD)."""

    scale: int = 4
    # first degradation
    kernel_list: Sequence[str] = KERNEL_TYPES
    kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: Sequence[float] = (0.2, 3.0)
    betag_range: Sequence[float] = (0.5, 4.0)
    betap_range: Sequence[float] = (1.0, 2.0)
    resize_prob: Sequence[float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: Sequence[float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Sequence[float] = (1.0, 30.0)
    poisson_scale_range: Sequence[float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Sequence[float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    kernel_list2: Sequence[str] = KERNEL_TYPES
    kernel_prob2: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: Sequence[float] = (0.2, 1.5)
    betag_range2: Sequence[float] = (0.5, 4.0)
    betap_range2: Sequence[float] = (1.0, 2.0)
    resize_prob2: Sequence[float] = (0.3, 0.4, 0.3)
    resize_range2: Sequence[float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Sequence[float] = (1.0, 25.0)
    poisson_scale_range2: Sequence[float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Sequence[float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8
    kernel_range: Sequence[int] = tuple(range(7, 22, 2))
    pad_to: int = 21

    def __post_init__(self) -> None:
        for name in ("kernel_list", "kernel_list2"):
            bad = [k for k in getattr(self, name) if k not in KERNEL_TYPES]
            if bad:
                raise ValueError(f"degradation.{name}: unknown kernel type(s) {bad}; known: {list(KERNEL_TYPES)}")
        for a, b in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, a)) != len(getattr(self, b)):
                raise ValueError(f"degradation.{b} needs one probability per entry of {a}")
        if any(k % 2 == 0 or k > self.pad_to for k in self.kernel_range):
            raise ValueError(f"degradation.kernel_range must hold odd sizes <= pad_to ({self.pad_to}), got {list(self.kernel_range)}")
        if self.scale < 1:
            raise ValueError(f"degradation.scale must be >= 1, got {self.scale}")

    @classmethod
    def from_dict(cls, data: dict) -> "DegradationConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown degradation key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- random draws --------------------------------------------------------------------------------

def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=g, dtype=torch.float64))


def _choice(g: torch.Generator, options: Sequence, probs: Sequence[float] | None = None):
    if probs is None:
        return options[int(torch.randint(len(options), (), generator=g))]
    p = torch.tensor(list(probs), dtype=torch.float64)
    return options[int(torch.multinomial(p / p.sum(), 1, generator=g))]


# -- kernels (basicsr.data.degradations, re-derived) ---------------------------------------------

def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return xx, yy


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """xᵀ Σ⁻¹ x on the kernel grid, Σ = R diag(σx², σy²) Rᵀ."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = rot @ torch.diag(torch.tensor([sigma_x ** 2, sigma_y ** 2], dtype=torch.float64)) @ rot.T
    inv = torch.linalg.inv(sigma)
    xx, yy = _grid(size)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def bivariate_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, kind: str = "gaussian",
                     beta: float = 1.0) -> torch.Tensor:
    """Gaussian (β = 1), generalised Gaussian or plateau kernel, normalised to sum 1 (float64)."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind == "gaussian":
        k = torch.exp(-0.5 * q)
    elif kind == "generalized":
        k = torch.exp(-0.5 * q.pow(beta))
    elif kind == "plateau":
        k = 1.0 / (1.0 + q.pow(beta))
    else:
        raise ValueError(f"kernel kind must be gaussian, generalized or plateau, got {kind!r}")
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> torch.Tensor:
    """2-D sinc (circular low-pass) ``ω_c J₁(ω_c r) / (2π r)``, centre ``ω_c² / (4π)``, sum 1."""
    xx, yy = _grid(size)
    r = torch.sqrt(xx * xx + yy * yy)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff ** 2 / (4 * math.pi)), k)
    k = k / k.sum()
    return pad_kernel(k, pad_to) if pad_to else k


def pad_kernel(k: torch.Tensor, size: int) -> torch.Tensor:
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p)) if p > 0 else k


def _beta(g: torch.Generator, beta_range: Sequence[float]) -> float:
    # basicsr: half the draws below 1, half above (a sharper or a flatter shape)
    if _uniform(g, 0, 1) < 0.5:
        return _uniform(g, beta_range[0], 1.0)
    return _uniform(g, 1.0, beta_range[1])


@dataclass
class KernelDraw:
    """What one kernel draw chose (for statistics tests and logs)."""

    kind: str
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    cutoff: float = 0.0


def random_kernel(g: torch.Generator, kernel_list, kernel_prob, sigma_range, betag_range, betap_range,
                  sinc_prob: float, kernel_range, pad_to: int = 21) -> tuple[torch.Tensor, KernelDraw]:
    """One blur kernel as Real-ESRGAN draws it (sinc with ``sinc_prob``, else a mixed Gaussian)."""
    size = int(_choice(g, list(kernel_range)))
    if _uniform(g, 0, 1) < sinc_prob:
        cutoff = _uniform(g, math.pi / 3, math.pi) if size < 13 else _uniform(g, math.pi / 5, math.pi)
        return pad_kernel(sinc_kernel(size, cutoff), pad_to), KernelDraw("sinc", size, cutoff=cutoff)
    kind = _choice(g, list(kernel_list), kernel_prob)
    sx = _uniform(g, *sigma_range)
    if kind == "iso" or kind.endswith("_iso"):
        sy, theta = sx, 0.0
    else:
        sy = _uniform(g, *sigma_range)
        theta = _uniform(g, -math.pi, math.pi)
    beta, family = 1.0, "gaussian"
    if kind.startswith("generalized"):
        beta, family = _beta(g, betag_range), "generalized"
    elif kind.startswith("plateau"):
        beta, family = _beta(g, betap_range), "plateau"
    k = bivariate_kernel(size, sx, sy, theta, family, beta)
    return pad_kernel(k, pad_to), KernelDraw(kind, size, sx, sy, theta, beta)


# -- image operations (batched; per-sample parameters) -------------------------------------------

def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample blur: images (B, C, H, W), kernels (B, k, k) or (k, k); reflect padding."""
    b, c, h, w = images.shape
    if kernels.ndim == 2:
        kernels = kernels[None].expand(b, -1, -1)
    k = kernels.shape[-1]
    mode = "reflect" if k // 2 < min(h, w) else "replicate"  # tiny images cannot reflect a wide kernel
    x = F.pad(images, (k // 2,) * 4, mode=mode)
    weight = kernels.to(images.device, images.dtype)[:, None].repeat_interleave(c, dim=0)  # (B*C, 1, k, k)
    out = F.conv2d(x.reshape(1, b * c, *x.shape[-2:]), weight, groups=b * c)
    return out.view(b, c, h, w)


def gaussian_noise(shape, sigma: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    """N(0, (σ/255)²) noise, shared across channels when ``gray``."""
    c = 1 if gray else shape[0]
    noise = torch.randn((c, *shape[1:]), generator=g) * (sigma / 255.0)
    return noise.expand(shape) if gray else noise


def poisson_noise(image: torch.Tensor, scale: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    """Poisson noise of an 8-bit-quantised image (basicsr: 2^ceil(log2(#values)) levels) × scale."""
    img = image.detach().cpu().double()
    if gray:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    img = (img * 255).round().clamp(0, 255) / 255
    vals = 2 ** math.ceil(math.log2(max(len(torch.unique(img)), 1)))
    noise = torch.poisson(img * vals, generator=g) / vals - img
    noise = noise.float() * scale
    return noise.expand_as(image.cpu()) if gray else noise


def jpeg(image: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG round trip of one (3, H, W) image in [0, 1] with Pillow (quality rounded to an integer)."""
    from PIL import Image

    arr = (image.detach().clamp(0, 1) * 255).round().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(round(quality)))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(image.device, image.dtype)


# -- the pipeline --------------------------------------------------------------------------------

@dataclass
class DegradationRecord:
    """Per-sample choices (for tests and statistics)."""

    kernel1: KernelDraw
    kernel2: KernelDraw
    final_sinc: bool
    resize1: tuple[str, float]
    resize2: tuple[str, float]
    noise1: tuple[str, float, bool]
    noise2: tuple[str, float, bool]
    second_blur: bool
    jpeg1: float
    jpeg2: float
    sinc_first: bool


class RealESRGANDegradation:
    """``degrade(hr, generators)`` → LR (B, 3, H/scale, W/scale) in [0, 1], 8-bit rounded."""

    def __init__(self, config: DegradationConfig | dict | None = None):
        if config is None:
            config = DegradationConfig()
        elif isinstance(config, dict):
            config = DegradationConfig.from_dict(config)
        self.config = config

    def draw_kernels(self, g: torch.Generator):
        c = self.config
        k1, d1 = random_kernel(g, c.kernel_list, c.kernel_prob, c.blur_sigma, c.betag_range, c.betap_range,
                               c.sinc_prob, c.kernel_range, c.pad_to)
        k2, d2 = random_kernel(g, c.kernel_list2, c.kernel_prob2, c.blur_sigma2, c.betag_range2, c.betap_range2,
                               c.sinc_prob2, c.kernel_range, c.pad_to)
        final = _uniform(g, 0, 1) < c.final_sinc_prob
        if final:
            size = int(_choice(g, list(c.kernel_range)))
            k3 = sinc_kernel(size, _uniform(g, math.pi / 3, math.pi), pad_to=c.pad_to)
        else:
            k3 = torch.zeros(c.pad_to, c.pad_to, dtype=torch.float64)
            k3[c.pad_to // 2, c.pad_to // 2] = 1.0
        return (k1, d1), (k2, d2), (k3, final)

    def _resize(self, x: torch.Tensor, g: torch.Generator, probs, scale_range) -> tuple[torch.Tensor, tuple[str, float]]:
        kind = _choice(g, ["up", "down", "keep"], probs)
        scale = _uniform(g, 1.0, scale_range[1]) if kind == "up" else _uniform(g, scale_range[0], 1.0) if kind == "down" else 1.0
        mode = _choice(g, list(RESIZE_MODES))
        return x, (mode, scale)

    def _noise(self, x: torch.Tensor, g: torch.Generator, gauss_prob, sigma_range, poisson_range, gray_prob):
        if _uniform(g, 0, 1) < gauss_prob:
            sigma = _uniform(g, *sigma_range)
            gray = _uniform(g, 0, 1) < gray_prob
            noise = gaussian_noise(tuple(x.shape), sigma, gray, g)
            return (x + noise.to(x.device, x.dtype)).clamp(0, 1), ("gaussian", sigma, gray)
        scale = _uniform(g, *poisson_range)
        gray = _uniform(g, 0, 1) < gray_prob
        noise = poisson_noise(x, scale, gray, g)
        return (x + noise.to(x.device, x.dtype)).clamp(0, 1), ("poisson", scale, gray)

    def degrade_one(self, hr: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, DegradationRecord]:
        """One image (3, H, W) in [0, 1]; H and W must be multiples of ``scale``."""
        c = self.config
        h, w = hr.shape[-2:]
        if h % c.scale or w % c.scale:
            raise ValueError(f"HR size {h}x{w} must be a multiple of the scale {c.scale}")
        (k1, d1), (k2, d2), (k3, final) = self.draw_kernels(g)
        x = filter2d(hr[None].float(), k1)
        # first resize
        _, (mode1, s1) = self._resize(x, g, c.resize_prob, c.resize_range)
        x = F.interpolate(x, scale_factor=s1, mode=mode1) if s1 != 1.0 else x
        x, n1 = self._noise(x[0], g, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
        q1 = _uniform(g, *c.jpeg_range)
        x = jpeg(x, q1)[None]
        # second degradation
        second_blur = _uniform(g, 0, 1) < c.second_blur_prob
        if second_blur:
            x = filter2d(x, k2)
        _, (mode2, s2) = self._resize(x, g, c.resize_prob2, c.resize_range2)
        size2 = (max(1, int(h / c.scale * s2)), max(1, int(w / c.scale * s2)))
        x = F.interpolate(x, size=size2, mode=mode2)
        x, n2 = self._noise(x[0], g, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2)
        x = x[None]
        out_size = (h // c.scale, w // c.scale)
        sinc_first = _uniform(g, 0, 1) < 0.5
        q2 = _uniform(g, *c.jpeg_range2)
        mode3 = _choice(g, list(RESIZE_MODES))
        if sinc_first:
            x = filter2d(F.interpolate(x, size=out_size, mode=mode3), k3)
            x = jpeg(x[0].clamp(0, 1), q2)[None]
        else:
            x = jpeg(x[0].clamp(0, 1), q2)[None]
            x = filter2d(F.interpolate(x, size=out_size, mode=mode3), k3)
        lr = ((x[0] * 255).round().clamp(0, 255) / 255).to(hr.dtype)
        record = DegradationRecord(d1, d2, final, (mode1, s1), (mode2, s2), n1, n2, second_blur, q1, q2, sinc_first)
        return lr, record

    def __call__(self, hr: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """HR batch (B, 3, H, W) in [0, 1] → LR batch; one generator per sample."""
        if len(generators) != hr.shape[0]:
            raise ValueError(f"need one generator per sample: {hr.shape[0]} images, {len(generators)} generators")
        return torch.stack([self.degrade_one(img, g)[0] for img, g in zip(hr, generators)])


#: evaluation severities: ``severe`` is the training pipeline itself (Real-ESRGAN x4plus); ``mild``
#: keeps its structure with light blur, noise and compression and no second blur
SEVERITIES: dict[str, dict] = {
    "severe": {},
    "mild": {"blur_sigma": (0.2, 1.2), "resize_range": (0.7, 1.2), "noise_range": (1.0, 5.0),
             "poisson_scale_range": (0.05, 0.5), "jpeg_range": (75.0, 95.0), "second_blur_prob": 0.0,
             "resize_range2": (0.8, 1.2), "noise_range2": (1.0, 3.0), "poisson_scale_range2": (0.05, 0.3),
             "jpeg_range2": (80.0, 95.0), "final_sinc_prob": 0.0},
}


def severity_config(name: str, scale: int = 4) -> DegradationConfig:
    """The Real-ESRGAN settings of an evaluation severity (:data:`SEVERITIES`)."""
    if name not in SEVERITIES:
        raise ValueError(f"severity must be one of {sorted(SEVERITIES)}, got {name!r}")
    return DegradationConfig.from_dict({"scale": scale, **SEVERITIES[name]})
