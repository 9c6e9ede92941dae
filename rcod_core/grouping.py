"""Latent domain grouping (LDG, paper Eq. 4-6), inference presets and DAS (Eq. 7).

* :func:`latent_metric` — ``M_L = cos(z_L, z_H)``, the cosine similarity of the flattened VAE
  latents of the LR and HR image, one value per sample (Eq. 4).
* :class:`GroupingRule` — the rule as data (kind ``paper`` | ``official`` | ``edges``, n, k, the M_L
  bounds or edges, the timesteps), stored in a model's :class:`~rcod_core.spec.ModelSpec` and so
  in its ``.safetensors`` metadata; training, adaptive inference and the nodes read it from there.
* :func:`select_timestep` — the timestep of a sample's group from its ``M_L``:

  - ``paper`` (Eq. 5): ``t = k · (n − ⌊n (M_L − M_min) / (M_max − M_min)⌋)``, the floor clamped to
    ``[0, n−1]`` so that ``M_L ≥ M_max`` lands in the last group and ``M_L < M_min`` in the first.
    M_min / M_max are the minimum and maximum of M_L over the training data (measured by
    ``rcod-train scan-metric`` with the frozen base VAE). ``k · n`` may exceed the last trained
    timestep (``n = 4`` → 1000); it is clamped to 999.
  - ``official`` (the release, Eq. 6): ``M_L < 0.5 → 749``, ``< 0.7 → 499``, else ``249``;
    ``n = 4`` adds ``M_L < 0.3 → 999``. Files without a rule (the release's pickles) use it.
  - ``edges``: explicit M_L edges (e.g. a scan's quantiles) with their timesteps.

* :func:`resolve_realism` — presets Fidelity / Neutral / Realism = t 250 / 500 / 750 (the release
  runs 249 / 499 / 749) or any integer t in [1, 999]. Realism grows with t (paper Table 2).
* :func:`sample_regulariser_timestep` — degradation-aware sampling of the VSD regulariser's
  timestep (DAS, Eq. 7) in the paper's and the release's form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, Union

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


#: The release's thresholds and timesteps per group count (lowest M_L first).
OFFICIAL_THRESHOLDS: dict[int, tuple[tuple[float, ...], tuple[int, ...]]] = {
    3: ((0.5, 0.7), (749, 499, 249)),
    4: ((0.3, 0.5, 0.7), (999, 749, 499, 249)),
}


RuleKind = Literal["paper", "official", "edges"]
RULE_KINDS: tuple[str, ...] = ("paper", "official", "edges")


def _edge_timesteps(k: int, n: int) -> tuple[int, ...]:
    """Eq. 5's timestep of each group, lowest M_L first: ``k · (n − g)`` for g = 0 … n−1 (≤ 999)."""
    return tuple(min(k * (n - g), MAX_TIMESTEP) for g in range(n))


@dataclass(frozen=True)
class GroupingRule:
    """How LDG maps a sample's latent metric M_L to its timestep — data that travels with a model.

    * ``kind="paper"`` (Eq. 5): ``t = k · (n − ⌊n (M_L − M_min) / (M_max − M_min)⌋)``, the floor
      clamped to ``[0, n−1]``. ``m_min`` / ``m_max`` are the minimum and maximum of M_L over the
      training data (``rcod-train scan-metric`` measures them); there are no default bounds.
    * ``kind="official"``: the release's fixed thresholds for ``n = 3`` (0.5 / 0.7 → 749 / 499 / 249)
      or ``n = 4`` (adds 0.3 → 999).
    * ``kind="edges"``: explicit ascending M_L ``edges`` (e.g. quantiles of a scan):
      ``M_L < edges[i] → timesteps[i]``, else ``timesteps[-1]``; ``timesteps`` default to Eq. 5's
      ``k · (n − g)`` with ``n = len(edges) + 1``.

    ``timesteps`` always ends up filled in: the t of each group, lowest M_L (most degraded) first.
    An M_L exactly on an edge belongs to the upper group (the release's ``>=``).
    """

    kind: RuleKind = "official"
    n: int = 3
    k: int = 250
    m_min: Optional[float] = None
    m_max: Optional[float] = None
    edges: tuple[float, ...] = ()
    timesteps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if self.kind not in RULE_KINDS:
            raise ValueError(f"grouping rule kind must be one of {RULE_KINDS}, got {self.kind!r}")
        set_("edges", tuple(float(e) for e in self.edges))
        set_("timesteps", tuple(int(t) for t in self.timesteps))
        if self.k < 1 or self.k > MAX_TIMESTEP:
            raise ValueError(f"grouping rule k must be in [1, {MAX_TIMESTEP}], got {self.k}")
        if self.kind == "official":
            if self.n not in OFFICIAL_THRESHOLDS:
                raise ValueError(f"the release defines thresholds for n = 3 and n = 4 only, got n={self.n}")
            edges, steps = OFFICIAL_THRESHOLDS[self.n]
            if self.edges and self.edges != edges or self.timesteps and self.timesteps != steps:
                raise ValueError(f"the official rule for n={self.n} has edges {edges} and timesteps {steps}; "
                                 f"use kind 'edges' for others")
            set_("edges", edges)
            set_("timesteps", steps)
        elif self.kind == "paper":
            if not 1 <= self.n <= 4:
                raise ValueError(f"grouping rule n must be in [1, 4] (paper: n <= 4), got {self.n}")
            if self.m_min is None or self.m_max is None:
                raise ValueError("the paper rule (Eq. 5) needs m_min and m_max, the minimum and maximum of M_L over "
                                 "the training data: measure them with `rcod-train scan-metric`")
            if not (math.isfinite(self.m_min) and math.isfinite(self.m_max)) or not self.m_max > self.m_min:
                raise ValueError(f"the paper rule needs finite m_max > m_min, got m_min={self.m_min}, m_max={self.m_max}")
            set_("m_min", float(self.m_min))
            set_("m_max", float(self.m_max))
            if self.edges:
                raise ValueError("the paper rule takes m_min/m_max, not edges (use kind 'edges')")
            steps = _edge_timesteps(self.k, self.n)
            if self.timesteps and self.timesteps != steps:
                raise ValueError(f"Eq. 5 with k={self.k}, n={self.n} gives timesteps {steps}, not {self.timesteps}")
            set_("timesteps", steps)
        else:
            if not self.edges:
                raise ValueError("the edges rule needs at least one M_L edge")
            if list(self.edges) != sorted(self.edges) or len(set(self.edges)) != len(self.edges):
                raise ValueError(f"grouping rule edges must be strictly ascending, got {self.edges}")
            if not all(math.isfinite(e) for e in self.edges):
                raise ValueError(f"grouping rule edges must be finite, got {self.edges}")
            set_("n", len(self.edges) + 1)
            if not self.timesteps:
                set_("timesteps", _edge_timesteps(self.k, self.n))
            if len(self.timesteps) != len(self.edges) + 1:
                raise ValueError(f"the edges rule needs one more timestep than edges, got {len(self.edges)} edges "
                                 f"and {len(self.timesteps)} timesteps")
        check_timestep(list(self.timesteps), name="grouping rule timesteps")

    @classmethod
    def official(cls, n: int = 3) -> "GroupingRule":
        """The release's thresholds for ``n = 3`` or ``n = 4`` groups."""
        return cls(kind="official", n=n)

    @classmethod
    def paper(cls, m_min: float, m_max: float, n: int = 3, k: int = 250) -> "GroupingRule":
        """Eq. 5 with the training data's M_L bounds."""
        return cls(kind="paper", n=n, k=k, m_min=m_min, m_max=m_max)

    @classmethod
    def from_edges(cls, edges: Sequence[float], timesteps: Sequence[int] = (), k: int = 250) -> "GroupingRule":
        return cls(kind="edges", k=k, edges=tuple(edges), timesteps=tuple(timesteps))

    @property
    def levels(self) -> list[int]:
        """The distinct timesteps this rule can choose, ascending (the levels of a realism map)."""
        return sorted(set(self.timesteps))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "k": self.k, "m_min": self.m_min, "m_max": self.m_max,
                "edges": list(self.edges), "timesteps": list(self.timesteps)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "GroupingRule":
        if not isinstance(data, Mapping):
            raise ValueError(f"a grouping rule must be a mapping, got {type(data).__name__}")
        known = {"kind", "n", "k", "m_min", "m_max", "edges", "timesteps"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown grouping rule field(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("edges", "timesteps"):
            if key in values and not isinstance(values[key], (list, tuple)):
                raise ValueError(f"grouping rule {key} must be a list, got {type(values[key]).__name__}")
            values[key] = tuple(values.get(key) or ())
        if values.get("kind") == "official":  # only n identifies the release's rule
            values = {"kind": "official", "n": values.get("n", 3)}
        return cls(**values)

    def describe(self) -> str:
        """One line for humans (``rcod info``, node tooltips)."""
        steps = "/".join(str(t) for t in self.timesteps)
        if self.kind == "paper":
            return f"paper Eq. 5: n={self.n}, k={self.k}, M_L in [{self.m_min:.4g}, {self.m_max:.4g}] -> t {steps}"
        edges = "/".join(f"{e:.4g}" for e in self.edges)
        name = "official release thresholds" if self.kind == "official" else "edges"
        return f"{name}: M_L edges {edges} -> t {steps}"


def as_rule(rule: Union[str, GroupingRule]) -> GroupingRule:
    """A rule object, or ``"official"`` (the release's n = 3 thresholds, the default of files without a rule)."""
    if isinstance(rule, GroupingRule):
        return rule
    if rule == "official":
        return GroupingRule.official(3)
    raise ValueError(f"grouping rule must be a GroupingRule or 'official', got {rule!r} "
                     f"(the paper rule needs the training data's M_L bounds: GroupingRule.paper(m_min, m_max))")


def select_timestep(m_l: Union[float, Sequence[float], torch.Tensor],
                    rule: Union[str, GroupingRule] = "official") -> torch.Tensor:
    """t per sample from its latent metric (Eq. 5, or thresholds as in the release, Eq. 6).

    Returns an int64 tensor of shape ``(B,)`` on the device of ``m_l`` (CPU for Python numbers).
    """
    rule = as_rule(rule)
    m = torch.as_tensor(m_l)
    if not m.is_floating_point():
        m = m.to(torch.float64)
    if m.ndim == 0:
        m = m.reshape(1)
    if not torch.isfinite(m).all():
        raise ValueError(f"m_l must be finite, got {m.tolist()}")
    steps = torch.tensor(rule.timesteps, dtype=torch.int64, device=m.device)
    if rule.kind == "paper":
        # +1e-6 (in group units): an M_L on a group edge (also as float32) belongs to the upper group,
        # as with the release's ">=" thresholds, despite rounding.
        m64 = m.to(torch.float64)
        group = torch.floor(rule.n * (m64 - rule.m_min) / (rule.m_max - rule.m_min) + 1e-6)
        return steps[group.clamp(0, rule.n - 1).to(torch.int64)]
    # thresholds in the metric's own precision: float32(0.7) >= float32(0.7)
    edges = torch.tensor(rule.edges, dtype=m.dtype, device=m.device)
    return steps[torch.bucketize(m, edges, right=True)]  # number of edges <= m


def preset_timesteps(style: PresetStyle = "paper") -> dict[str, int]:
    """The preset names and their t for a model's preset style (what the nodes and the web UI show)."""
    return dict(PRESETS if style == "paper" else OFFICIAL_PRESETS)


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


def metric_summary(m_l: torch.Tensor, groups: int = 3) -> dict:
    """What a scan of a training set's M_L reports: Eq. 5's bounds (``m_min``, ``m_max``), moments,
    percentiles and the ``groups``-quantile edges — the file that a training config's
    ``grouping.bounds`` names."""
    m = torch.as_tensor(m_l).double().reshape(-1)
    if m.numel() == 0 or not torch.isfinite(m).all():
        raise ValueError("a metric summary needs at least one finite M_L value")
    if groups < 2:
        raise ValueError(f"groups must be at least 2, got {groups}")
    return {
        "samples": int(m.numel()),
        "m_min": float(m.min()), "m_max": float(m.max()),
        "mean": float(m.mean()), "std": float(m.std()) if m.numel() > 1 else 0.0,
        "percentiles": {str(p): float(torch.quantile(m, p / 100)) for p in (5, 10, 25, 50, 75, 90, 95)},
        "quantile_edges": [float(torch.quantile(m, i / groups)) for i in range(1, groups)],
    }


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
