"""The ``cai`` section of the run config (``CAIConfig``) and the choices it names: policy,
mode, contrastive score text, and the generation steps of the critique-and-revision path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

POLICIES = ("auto", "base", "sft", "dpo")
# cai.mode: critique-and-revision (this module), contrastive principle pairs
# (utils/constitution_contrastive.py), or both into one pairs.jsonl.
CAI_MODES = ("revise", "contrastive", "both")
# The principle text the contrastive label conditions on (utils/constitution_contrastive.py).
CONTRASTIVE_SCORE_TEXTS = ("revision_request", "follow_context")
STEPS = ("response", "critique", "revision")


@dataclass(frozen=True)
class CAIConfig:
    """The ``cai`` section of the run config. Defaults fit the 2-core CPU recipe."""

    policy: str = "auto"  # auto (dpo adapter if trained, else sft) | base | sft | dpo
    max_instructions: int | None = None  # None = every stage-1 training instruction
    instructions_per_chunk: int = 8  # instructions generated, judged and written together
    seed: int = 0  # principle draws and generation seeds (response seed, +1 critique, +2 revision)
    batch_size: int = 16  # generation batch
    judge_batch_size: int = 8  # A/B scoring batch
    n_shots: int = 2  # constitution demonstrations in the critique/revision document
    n_shots_judge: int = 2  # A/B demonstrations in the judge document
    response_max_new_tokens: int = 64
    response_temperature: float = 0.7  # 0 = greedy
    critique_max_new_tokens: int = 48
    critique_temperature: float = 0.7
    revision_max_new_tokens: int = 64
    revision_temperature: float = 0.7
    top_p: float = 0.95
    exclude_truncated: bool = True  # an original/revision cut by max_new_tokens never ends
    label_margin: float = 0.1  # drop pairs with |P(prefer revision) - 0.5| below this
    require_position_consistent: bool = False  # drop pairs whose two orders disagree
    # Contrastive principle pairs (utils/constitution_contrastive.py).
    mode: str = "contrastive"  # revise | contrastive | both
    contrastive_score_text: str = "revision_request"  # principle text of the likelihood gain
    contrastive_temperature: float = 1.0  # p_llh = sigmoid((g_follow - g_violate) / T)
    contrastive_checker_p: float = 0.9  # a program checker's vote for the side it prefers

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"cai.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_instructions is not None and self.max_instructions < 1:
            raise ValueError(
                f"cai.max_instructions must be >= 1 or null, got {self.max_instructions}"
            )
        for name in (
            "instructions_per_chunk", "batch_size", "judge_batch_size",
            "response_max_new_tokens", "critique_max_new_tokens", "revision_max_new_tokens",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"cai.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_shots", "n_shots_judge"):
            if getattr(self, name) < 0:
                raise ValueError(f"cai.{name} must be >= 0, got {getattr(self, name)}")
        for step in STEPS:
            t = getattr(self, f"{step}_temperature")
            if t < 0:
                raise ValueError(f"cai.{step}_temperature must be >= 0 (0 = greedy), got {t}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"cai.top_p must be in (0, 1], got {self.top_p}")
        if self.mode not in CAI_MODES:
            raise ValueError(f"cai.mode must be one of {CAI_MODES}, got {self.mode!r}")
        if self.contrastive_score_text not in CONTRASTIVE_SCORE_TEXTS:
            raise ValueError(
                f"cai.contrastive_score_text must be one of {CONTRASTIVE_SCORE_TEXTS}, "
                f"got {self.contrastive_score_text!r}"
            )
        if not self.contrastive_temperature > 0:
            raise ValueError(
                f"cai.contrastive_temperature must be > 0, got {self.contrastive_temperature}"
            )
        if not 0.5 < self.contrastive_checker_p <= 1:
            raise ValueError(
                f"cai.contrastive_checker_p must be in (0.5, 1], got {self.contrastive_checker_p}"
            )
        if not 0 <= self.label_margin < 0.5:
            raise ValueError(
                f"cai.label_margin is a distance from 0.5 and must be in [0, 0.5), "
                f"got {self.label_margin}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> CAIConfig:
        """Build from the YAML section; unknown keys and wrongly typed values are errors that
        name the key (a typo must not silently run the default)."""
        d = dict(d or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown cai keys {unknown}; known: {sorted(known)}")
        for k, v in d.items():
            want = str(known[k].type).replace(" ", "")
            ok = {
                "str": isinstance(v, str),
                "bool": isinstance(v, bool),
                "int": isinstance(v, int) and not isinstance(v, bool),
                "int|None": v is None or (isinstance(v, int) and not isinstance(v, bool)),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
            }[want]
            if not ok:
                raise ValueError(f"cai.{k}: expected {want.replace('|', ' or ')}, got {v!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
