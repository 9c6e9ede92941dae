"""Noise-schedule math for one-step super-resolution (paper Eq. 3/4).

The schedule is the Stable Diffusion scaled-linear DDPM schedule. It is read from the
diffusers scheduler config that ships with each base model (``configs/*/scheduler_config.json``)
and computed by diffusers itself, so no beta value is retyped here.

Notation (paper Sec. 3): ``alpha_bar`` is the cumulative product ``ᾱ_t``; the forward process is
``z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε`` and the one-step estimate of the clean latent is

    z_H = (z_L - sqrt(1 - ᾱ) · ε_θ(z_L; t, c)) / sqrt(ᾱ)            (Eq. 3/4)

Which ``ᾱ`` enters the conversion is the *x0 mode*:

* ``"paper"``    — ``ᾱ = ᾱ_t`` for the chosen timestep ``t``.
* ``"official"`` — the authors' release keeps ``ᾱ`` fixed (0.7537 = ᾱ_200 for RCOD_O,
  0.6754 = ᾱ_249 for RCOD_S) and passes ``t`` only through the UNet's timestep embedding.
  Released weights need this mode.
* ``"base"``     — OSEDiff / S3Diff: ``t = 999`` and a one-step DDPM step, whose ``prev_sample``
  equals the x0 prediction at ``ᾱ_999`` (the DDPM posterior mean for ``t_prev = -1`` is x0).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal, Mapping, Sequence, Union

import torch

X0Mode = Literal["paper", "official", "base"]
X0_MODES: tuple[str, ...] = ("paper", "official", "base")

#: Fixed ᾱ of the authors' release, per model kind (their x0 conversion ignores the chosen t).
OFFICIAL_ALPHA_BAR: dict[str, float] = {"rcod_o": 0.7537, "rcod_s": 0.6754}

#: Timestep the one-step base methods (OSEDiff, S3Diff) run at.
BASE_TIMESTEP = 999

NUM_TRAIN_TIMESTEPS = 1000

_CONFIG_DIR = Path(__file__).parent / "configs"

TimestepLike = Union[int, Sequence[int], torch.Tensor]


def load_scheduler_config(path: Union[str, Path, None] = None) -> dict:
    """Read a diffusers scheduler config; default: the shipped SD 2.1-base one."""
    path = Path(path) if path is not None else _CONFIG_DIR / "sd21_base" / "scheduler" / "scheduler_config.json"
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=8)
def _alphas_cumprod_cached(config_json: str) -> torch.Tensor:
    from diffusers import DDPMScheduler

    config = json.loads(config_json)
    scheduler = DDPMScheduler.from_config(config)
    return scheduler.alphas_cumprod.to(torch.float64).clone()


def alphas_cumprod(config: Union[Mapping, str, Path, None] = None) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 as float64, computed by diffusers' DDPMScheduler from a config.

    ``config`` is a scheduler config dict, a path to a ``scheduler_config.json`` or ``None`` for the
    shipped SD 2.1-base config (SD-Turbo uses the same betas). The result is a fresh tensor.
    """
    if config is None or isinstance(config, (str, Path)):
        config = load_scheduler_config(config)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    subset = {k: config[k] for k in keys if k in config and config[k] is not None}
    return _alphas_cumprod_cached(json.dumps(subset, sort_keys=True)).clone()


def check_timestep(t: TimestepLike, name: str = "t", high: int = NUM_TRAIN_TIMESTEPS - 1) -> torch.Tensor:
    """Return ``t`` as a 1-D int64 tensor, raising ``ValueError`` unless every value is in [1, high]."""
    if isinstance(t, bool):
        raise ValueError(f"{name} must be an integer timestep in [1, {high}], got {t!r}")
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integer timesteps, got {t.tolist()}")
        tt = t.detach().to("cpu", torch.int64).reshape(-1)
    else:
        values = [t] if isinstance(t, (int, float)) else list(t)
        for v in values:
            if isinstance(v, bool) or not float(v).is_integer():
                raise ValueError(f"{name} must be an integer timestep in [1, {high}], got {v!r}")
        tt = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if tt.numel() == 0:
        raise ValueError(f"{name} is empty; expected at least one timestep in [1, {high}]")
    bad = tt[(tt < 1) | (tt > high)]
    if bad.numel():
        raise ValueError(f"{name} must be in [1, {high}], got {bad.tolist()}")
    return tt


def values_unreadable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values must not be read back to the host here: inside a traced graph
    (``torch.compile``), while a CUDA graph is being captured, or on the ``meta`` device (shapes only)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def x0_alpha_bar(
    t: TimestepLike,
    mode: X0Mode,
    alphas: torch.Tensor,
    fixed_alpha_bar: float | None = None,
) -> torch.Tensor:
    """The ᾱ used by the x0 conversion for timestep(s) ``t`` under ``mode`` (Eq. 3/4).

    Returns a float64 tensor with one value per entry of ``t``.
    ``fixed_alpha_bar`` is required for ``mode="official"`` (see :data:`OFFICIAL_ALPHA_BAR`).
    """
    if isinstance(t, torch.Tensor) and values_unreadable(t):
        # no host round trip here (the checks read values back); timesteps are validated where
        # they enter (the pipeline's resolve_timesteps, the trainer's sampling)
        tt = t.reshape(-1).to(torch.int64)
    else:
        tt = check_timestep(t)
    if mode == "paper":
        return alphas.to(torch.float64)[tt.to(alphas.device)]
    if mode == "official":
        if fixed_alpha_bar is None or not (0.0 < float(fixed_alpha_bar) <= 1.0):
            raise ValueError(
                f"fixed_alpha_bar must be in (0, 1] for x0 mode 'official', got {fixed_alpha_bar!r} "
                f"(release values: {OFFICIAL_ALPHA_BAR})"
            )
        return torch.full((tt.numel(),), float(fixed_alpha_bar), dtype=torch.float64, device=alphas.device)
    if mode == "base":
        return alphas.to(torch.float64)[torch.full_like(tt, BASE_TIMESTEP, device=alphas.device)]
    raise ValueError(f"x0 mode must be one of {X0_MODES}, got {mode!r}")


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: Union[float, torch.Tensor]) -> torch.Tensor:
    """Eq. 3/4: ``(z_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)``, with ᾱ a scalar or one value per sample.

    The arithmetic runs in the dtype of ``z_t``; ``alpha_bar`` is broadcast over C, H, W.
    """
    if z_t.shape != eps.shape:
        raise ValueError(f"eps must have the shape of z_t {tuple(z_t.shape)}, got {tuple(eps.shape)}")
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if ab.ndim == 0:
        ab = ab.reshape(1)
    if ab.numel() not in (1, z_t.shape[0]):
        raise ValueError(f"alpha_bar must be a scalar or have one value per sample ({z_t.shape[0]}), got {ab.numel()}")
    sqrt_ab = ab.sqrt().to(device=z_t.device, dtype=z_t.dtype).view(-1, *([1] * (z_t.ndim - 1)))
    sqrt_1m = (1.0 - ab).sqrt().to(device=z_t.device, dtype=z_t.dtype).view(-1, *([1] * (z_t.ndim - 1)))
    return (z_t - sqrt_1m * eps) / sqrt_ab


def add_noise(z_0: torch.Tensor, noise: torch.Tensor, alpha_bar: Union[float, torch.Tensor]) -> torch.Tensor:
    """Forward process ``z_t = sqrt(ᾱ) z_0 + sqrt(1 - ᾱ) ε`` (the inverse of :func:`x0_from_eps`)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1)
    shape = (-1, *([1] * (z_0.ndim - 1)))
    sqrt_ab = ab.sqrt().to(device=z_0.device, dtype=z_0.dtype).view(shape)
    sqrt_1m = (1.0 - ab).sqrt().to(device=z_0.device, dtype=z_0.dtype).view(shape)
    return sqrt_ab * z_0 + sqrt_1m * noise
