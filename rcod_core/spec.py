"""ModelSpec: the settings that, beside the weights, fully describe an RCOD-family model.

A spec is plain data (JSON round-trip), stored in our checkpoints' metadata and shown to users.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .grouping import GroupingRule, PresetStyle
from .prompting import PREPROCESS_MODES, PreprocessMode
from .schedule import BASE_TIMESTEP, OFFICIAL_ALPHA_BAR, X0_MODES, X0Mode

ModelKind = Literal["rcod_o", "rcod_s", "osediff", "s3diff"]
MODEL_KINDS: tuple[str, ...] = ("rcod_o", "rcod_s", "osediff", "s3diff")
#: Base model family each kind was trained on.
KIND_BASE = {"rcod_o": "sd21_base", "osediff": "sd21_base", "rcod_s": "sd_turbo", "s3diff": "sd_turbo"}
#: Kinds conditioned by VPIM tokens (the bases use text embeddings).
VPIM_KINDS = ("rcod_o", "rcod_s")

SPEC_VERSION = 2  # 2: the grouping rule is a GroupingRule (1: the strings grouping_rule / grouping_n)


@dataclass
class ModelSpec:
    """How to run a model. Defaults reproduce the release for the kind (see :meth:`for_kind`)."""

    kind: ModelKind = "rcod_o"
    base: str = "sd21_base"
    x0_mode: X0Mode = "official"
    fixed_alpha_bar: Optional[float] = OFFICIAL_ALPHA_BAR["rcod_o"]
    preset_style: PresetStyle = "official"
    #: LDG: how M_L picks t (adaptive inference, realism maps, training); the release's thresholds by default
    grouping: GroupingRule = field(default_factory=GroupingRule.official)
    vpim_preprocess: PreprocessMode = "official"
    rank_unet: int = 4
    rank_vae: int = 4
    lora_alpha: float = 8.0
    #: LoRA adapters as {adapter name: [module names]}; empty = the kind's default layout.
    unet_lora_groups: dict[str, list[str]] = field(default_factory=dict)
    vae_lora_groups: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("rank_unet", "rank_vae", "version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelSpec.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or not self.lora_alpha > 0:
            raise ValueError(f"ModelSpec.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.fixed_alpha_bar is not None and (not isinstance(self.fixed_alpha_bar, (int, float))
                                                 or isinstance(self.fixed_alpha_bar, bool)):
            raise ValueError(f"ModelSpec.fixed_alpha_bar must be a number or null, got {self.fixed_alpha_bar!r}")
        for name in ("unet_lora_groups", "vae_lora_groups"):
            groups = getattr(self, name)
            if not isinstance(groups, dict) or not all(
                    isinstance(k, str) and isinstance(v, list) and all(isinstance(m, str) for m in v) for k, v in groups.items()):
                raise ValueError(f"ModelSpec.{name} must map adapter names to lists of module names, "
                                 f"got {type(groups).__name__}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ModelSpec.extra must be a mapping, got {type(self.extra).__name__}")
        if isinstance(self.grouping, dict):
            self.grouping = GroupingRule.from_dict(self.grouping)
        if not isinstance(self.grouping, GroupingRule):
            raise ValueError(f"ModelSpec.grouping must be a GroupingRule, got {type(self.grouping).__name__}")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"ModelSpec.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.x0_mode not in X0_MODES:
            raise ValueError(f"ModelSpec.x0_mode must be one of {X0_MODES}, got {self.x0_mode!r}")
        if self.x0_mode == "official" and self.fixed_alpha_bar is None:
            raise ValueError("ModelSpec.x0_mode 'official' needs fixed_alpha_bar")
        if self.vpim_preprocess not in PREPROCESS_MODES:
            raise ValueError(f"ModelSpec.vpim_preprocess must be one of {PREPROCESS_MODES}, got {self.vpim_preprocess!r}")
        if self.base not in ("sd21_base", "sd_turbo"):
            raise ValueError(f"ModelSpec.base must be 'sd21_base' or 'sd_turbo', got {self.base!r}")
        if self.preset_style not in ("paper", "official"):
            raise ValueError(f"ModelSpec.preset_style must be 'paper' or 'official', got {self.preset_style!r}")

    @classmethod
    def for_kind(cls, kind: ModelKind, **overrides: Any) -> "ModelSpec":
        """The release's settings for a model kind, with optional overrides."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
        defaults: dict[str, Any] = {"kind": kind, "base": KIND_BASE[kind]}
        if kind in ("rcod_o", "rcod_s"):
            defaults.update(x0_mode="official", fixed_alpha_bar=OFFICIAL_ALPHA_BAR[kind])
        else:
            defaults.update(x0_mode="base", fixed_alpha_bar=None)
        if kind in ("rcod_s", "s3diff"):
            defaults.update(rank_unet=32, rank_vae=16)
        defaults.update(overrides)
        return cls(**defaults)

    @property
    def uses_vpim(self) -> bool:
        return self.kind in VPIM_KINDS

    @property
    def default_color_fix(self) -> str:
        """The bases' default: AdaIN for the SD 2.1 family (OSEDiff, RCOD_O), wavelet for SD-Turbo."""
        return "adain" if self.base == "sd21_base" else "wavelet"

    @property
    def fixed_timestep(self) -> Optional[int]:
        """The bases run at one timestep only."""
        return BASE_TIMESTEP if self.kind in ("osediff", "s3diff") else None

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["grouping"] = self.grouping.to_dict()
        return json.loads(json.dumps(data))  # deep copy, plain JSON types

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = dict(data)
        if "grouping_rule" in data or "grouping_n" in data:  # version 1: a rule name and n
            data["grouping"] = legacy_grouping(data.pop("grouping_rule", "official"), data.pop("grouping_n", 3))
            data["version"] = SPEC_VERSION
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json.loads(text))


def legacy_grouping(name: Any, n: Any) -> GroupingRule:
    """The rule a version-1 spec meant: ``official`` thresholds, or ``paper`` with the bounds version 1
    used (M_min = 0.9 − 0.2 n, M_max = 0.9: edges at the release's thresholds)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"ModelSpec grouping_n must be an integer, got {n!r}")
    if name == "official":
        return GroupingRule.official(n)
    if name == "paper":
        return GroupingRule.paper(m_min=round(0.9 - 0.2 * n, 10), m_max=0.9, n=n)
    raise ValueError(f"ModelSpec grouping_rule must be 'official' or 'paper', got {name!r}")
