"""Latent domain grouping (LDG, paper Eq. 4-6), inference presets and DAS (Eq. 7).

* :func:`latent_metric` — ``M_L = cos(z_L, z_H)``, the cosine similarity of the flattened VAE
  latents of the LR and HR image, one value per sample (Eq. 4).
* :func:`select_timestep` — the timestep of a sample's group from its ``M_L``:

  - :class:`PaperRule` (Eq. 5): ``t = k · (n − ⌊n (M_L − M_min) / (M_max − M_min)⌋)``, the floor
    clamped to ``[0, n−1]`` so that ``M_L ≥ M_max`` lands in the last group and ``M_L < M_min`` in
    the first. The defaults ``M_min = 0.3, M_max = 0.9, n = 3`` put the group edges at 0.5 and 0.7,
    the thresholds of the release; with ``n = 4`` use ``M_min = 0.1`` for edges 0.3 / 0.5 / 0.7.
    ``k · n`` may exceed the last trained timestep (``n = 4`` → 1000); it is clamped to 999.
  - :class:`ThresholdRule` (official release): ``M_L < 0.5 → 749``, ``< 0.7 → 499``, else ``249``;
    ``n = 4`` adds ``M_L < 0.3 → 999``.

* :func:`resolve_realism` — presets Fidelity / Neutral / Realism = t 250 / 500 / 750 (the release
  runs 249 / 499 / 749) or any integer t in [1, 999]. Realism grows with t (paper Table 2).
* :func:`sample_regulariser_timestep` — degradation-aware sampling of the VSD regulariser's
  timestep (DAS, Eq. 7) in the paper's and the release's form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

from .schedule import NUM_TRAIN_TIMESTEPS, check_timestep

#: Paper presets (Sec. 4): larger t → more generated detail.
PRESETS: dict[str, int] = {"fidelity": 250, "neutral": 500, "realism": 750}
#: The release's scripts map 250/500/750 to these timesteps.
OFFICIAL_PRESETS: dict[str, int] = {"fidelity": 249, "neutral": 499, "realism": 749}
PresetStyle = Literal["paper", "official"]
MAX_TIMESTEP = NUM_TRAIN_TIMESTEPS - 1


def latent_metric(z_l: torch.Tensor, z_h: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 4: ``M_L = <z_L, z_H> / (|z_L| |z_H|)`` over the flattened latent of each sample.

    Args:
        z_l, z_h: latents of the LR (upscaled to the HR size) and HR image, shape ``(B, ...)``.
    Returns:
        float32 tensor of shape ``(B,)`` with values in [-1, 1]; computed in float32 or wider.
    """
    if z_l.shape != z_h.shape:
        raise ValueError(f"z_l and z_h must have the same shape, got {tuple(z_l.shape)} and {tuple(z_h.shape)}")
    if z_l.ndim < 2:
        raise ValueError(f"latents must be batched (B, ...), got shape {tuple(z_l.shape)}")
    dtype = torch.promote_types(z_l.dtype, torch.float32)
    a = z_l.reshape(z_l.shape[0], -1).to(dtype)
    b = z_h.reshape(z_h.shape[0], -1).to(dtype)
    num = (a * b).sum(dim=1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return (num / den.clamp_min(eps)).clamp(-1.0, 1.0).to(torch.float32)


@dataclass(frozen=True)
class PaperRule:
    """Eq. 5 with its constants (``k`` group width in timesteps, ``n ≤ 4`` groups)."""

    k: int = 250
    n: int = 3
    m_min: float = 0.3
    m_max: float = 0.9

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 4:
            raise ValueError(f"PaperRule.n must be in [1, 4] (paper: n <= 4), got {self.n}")
        if self.k < 1 or self.k > MAX_TIMESTEP:
            raise ValueError(f"PaperRule.k must be in [1, {MAX_TIMESTEP}], got {self.k}")
        if not self.m_max > self.m_min:
            raise ValueError(f"PaperRule needs m_max > m_min, got m_min={self.m_min}, m_max={self.m_max}")


@dataclass(frozen=True)
class ThresholdRule:
    """Fixed thresholds of the release: ``M_L < thresholds[i] → timesteps[i]``, else ``timesteps[-1]``."""

    thresholds: tuple[float, ...] = (0.5, 0.7)
    timesteps: tuple[int, ...] = (749, 499, 249)

    def __post_init__(self) -> None:
        if len(self.timesteps) != len(self.thresholds) + 1:
            raise ValueError(
                f"ThresholdRule needs one more timestep than thresholds, got {len(self.thresholds)} "
                f"thresholds and {len(self.timesteps)} timesteps"
            )
        if list(self.thresholds) != sorted(self.thresholds):
            raise ValueError(f"ThresholdRule.thresholds must be ascending, got {self.thresholds}")
        check_timestep(list(self.timesteps), name="ThresholdRule.timesteps")

    @classmethod
    def official(cls, n: int = 3) -> "ThresholdRule":
        """The release's thresholds for ``n = 3`` or ``n = 4`` groups."""
        if n == 3:
            return cls((0.5, 0.7), (749, 499, 249))
        if n == 4:
            return cls((0.3, 0.5, 0.7), (999, 749, 499, 249))
        raise ValueError(f"the release defines thresholds for n = 3 and n = 4 only, got n={n}")


GroupingRule = Union[PaperRule, ThresholdRule]


def make_rule(rule: Union[str, GroupingRule], n: int = 3) -> GroupingRule:
    """``"paper"`` → :class:`PaperRule` (edges matching the release), ``"official"`` → thresholds."""
    if isinstance(rule, (PaperRule, ThresholdRule)):
        return rule
    if rule == "paper":
        return PaperRule(n=n, m_min=round(0.9 - 0.2 * n, 10))  # edges at 0.7, 0.5, 0.3, like the release
    if rule == "official":
        return ThresholdRule.official(n)
    raise ValueError(f"grouping rule must be 'paper', 'official' or a rule object, got {rule!r}")


def select_timestep(m_l: Union[float, Sequence[float], torch.Tensor], rule: Union[str, GroupingRule] = "paper") -> torch.Tensor:
    """t per sample from its latent metric (Eq. 5 or the release's thresholds, Eq. 6).

    Returns an int64 tensor of shape ``(B,)`` on the device of ``m_l`` (CPU for Python numbers).
    """
    rule = make_rule(rule)
    m = torch.as_tensor(m_l)
    if not m.is_floating_point():
        m = m.to(torch.float64)
    if m.ndim == 0:
        m = m.reshape(1)
    if not torch.isfinite(m).all():
        raise ValueError(f"m_l must be finite, got {m.tolist()}")
    if isinstance(rule, PaperRule):
        # +1e-6 (in group units): an M_L on a group edge (e.g. 0.5, 0.7 — also as float32) belongs
        # to the upper group, as with the release's ">=" thresholds, despite rounding.
        m64 = m.to(torch.float64)
        group = torch.floor(rule.n * (m64 - rule.m_min) / (rule.m_max - rule.m_min) + 1e-6)
        group = group.clamp(0, rule.n - 1)
        t = (rule.k * (rule.n - group)).clamp(1, MAX_TIMESTEP)
        return t.to(torch.int64)
    # thresholds in the metric's own precision: float32(0.7) >= float32(0.7)
    thresholds = torch.tensor(rule.thresholds, dtype=m.dtype, device=m.device)
    steps = torch.tensor(rule.timesteps, dtype=torch.int64, device=m.device)
    index = torch.bucketize(m, thresholds, right=True)  # number of thresholds <= m
    return steps[index]


def resolve_realism(realism: Union[str, int], style: PresetStyle = "paper") -> int:
    """A preset name (fidelity / neutral / realism, case-insensitive) or an integer t → timestep."""
    if isinstance(realism, str):
        key = realism.strip().lower()
        if key in PRESETS:
            return (PRESETS if style == "paper" else OFFICIAL_PRESETS)[key]
        if key.lstrip("+-").isdigit():
            realism = int(key)
        else:
            raise ValueError(
                f"realism must be one of {sorted(PRESETS)} or an integer timestep in [1, {MAX_TIMESTEP}], got {realism!r}"
            )
    return int(check_timestep(realism, name="realism")[0])


DASMode = Literal["paper", "official"]


def sample_regulariser_timestep(
    t: torch.Tensor,
    mode: DASMode = "paper",
    k: int = 250,
    low: int = 20,
    high: int = 980,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DAS (Eq. 7): the VSD regulariser's timestep ``t_r`` for each generator timestep ``t``.

    * ``paper``:    ``t_r ~ U{max(low, t − k), …, min(high, t + k)}`` (both ends inclusive).
    * ``official``: ``t < 749 → t_r ~ U[20, 980)``; otherwise ``U[200, 980)``.
    """
    t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
    u = torch.rand(t.shape, generator=generator, dtype=torch.float64, device=t.device if generator is None else generator.device)
    u = u.to(t.device)
    if mode == "paper":
        lo = (t - k).clamp(min=low)
        hi = (t + k).clamp(max=high)
        return lo + torch.floor(u * (hi - lo + 1).to(torch.float64)).to(torch.int64)
    if mode == "official":
        lo = torch.where(t < 749, torch.full_like(t, 20), torch.full_like(t, 200))
        return lo + torch.floor(u * (980 - lo).to(torch.float64)).to(torch.int64)
    raise ValueError(f"DAS mode must be 'paper' or 'official', got {mode!r}")
