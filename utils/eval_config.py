"""The evaluation's configuration: the YAML ``eval:`` block (``EvalConfig``), the ``model:``
block (``ModelSpec``), the arm names every run knows, and the one error bad evaluation input
raises (``EvalInputError``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from utils.errors import ProjectInputError
from utils.eval_prompts import icl_examples
from utils.generation import DecodingConfig
from utils.response_format import RESPONSE_STOP_STRINGS

BASE_ARMS = ("base", "base_icl")  # arms without an adapter
DEFAULT_ARMS = ("base", "base_icl", "sft", "dpo", "cai")


class EvalInputError(ProjectInputError, ValueError):
    """Bad evaluation input (unknown arm, adapter of another base, corrupt cache...)."""


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of the evaluation; ``from_dict`` reads the YAML ``eval:`` block."""

    n_prompts: int = 320
    seed: int = 1234  # eval-set seed (build_eval_set)
    arms: tuple[str, ...] = DEFAULT_ARMS
    icl_k: int = 3  # in-context demonstrations for base_icl when no candidate is selected
    # base_icl settings tried on a dev split (utils/icl_selection.py); () = icl_k demos as is
    icl_candidates: tuple[str, ...] = ()
    icl_dev_prompts: int = 48
    # harmful handling, over-refusal, principle preference per arm (utils/eval_constitution.py)
    constitution: bool = False
    max_new_tokens: int = 64
    batch_size: int = 32
    bootstrap_resamples: int = 10000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    alpha: float = 0.05
    power: float = 0.8  # for the minimum detectable effect
    leakage_threshold: float = 0.7  # exact Jaccard of char 5-grams (utils.dedup)
    exclude_leaked: bool = True
    run_sentinels: bool = True
    # Options of run_sentinel_suite; the script starts from the top-level `sentinels:` block.
    sentinel: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 3  # sample outputs per arm in the report
    rss_interval_s: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_prompts", "icl_k", "max_new_tokens", "batch_size", "bootstrap_resamples"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "bootstrap_seed", "n_samples"):
            _check_int(name, getattr(self, name), minimum=0)
        n_demos = len(icl_examples())
        if self.icl_k > n_demos:
            raise ValueError(f"icl_k must be <= {n_demos} (demonstrations available)")
        for name in ("confidence", "alpha", "leakage_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 < self.confidence < 1 or not 0 < self.alpha < 1:
            raise ValueError("confidence and alpha must be in (0, 1)")
        if not 0 < self.leakage_threshold <= 1:
            raise ValueError(f"leakage_threshold must be in (0, 1], got {self.leakage_threshold}")
        if not 0.5 < self.power < 1:
            raise ValueError(f"power must be in (0.5, 1), got {self.power!r}")
        if not self.rss_interval_s > 0:
            raise ValueError(f"rss_interval_s must be > 0, got {self.rss_interval_s!r}")
        if isinstance(self.arms, str) or not self.arms:
            raise ValueError(f"arms must be a non-empty list of arm names, got {self.arms!r}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms lists an arm twice: {list(self.arms)}")
        if not isinstance(self.sentinel, dict):
            raise ValueError(f"sentinel must be a mapping, got {self.sentinel!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalConfig:
        """Build from a mapping; unknown keys raise (a typo must not silently run a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown eval config key(s) {unknown}; valid keys: {sorted(known)}")
        values = dict(values)
        if "arms" in values:
            arms = values["arms"]
            values["arms"] = tuple(parse_arm_list(arms) if isinstance(arms, str) else arms)
        if "icl_candidates" in values:
            values["icl_candidates"] = tuple(values["icl_candidates"] or ())
        if values.get("sentinel") is None:
            values.pop("sentinel", None)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "arms": list(self.arms),
            "icl_candidates": list(self.icl_candidates),
        }

    def decoding(self) -> DecodingConfig:
        """The ONE decoding policy of every arm: greedy, stop on the next block or EOS."""
        return DecodingConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            batch_size=self.batch_size,
            stop_strings=RESPONSE_STOP_STRINGS,
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how: the YAML ``model:`` block (same keys as
    ``CleanModelLoader.from_config``)."""

    name: str = "gemma-3-270m"
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    trust_remote_code: bool = False
    allow_instruct_control: bool = False
    attn_implementation: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def load_options(self) -> dict[str, Any]:
        """The load options that can change greedy outputs (part of the cache key); the attention
        kernel only when set, so caches written before the option existed keep their keys."""
        options = {"device": self.device, "dtype": self.dtype, "quantization": self.quantization}
        if self.attn_implementation is not None:
            options["attn_implementation"] = self.attn_implementation
        return options


def parse_arm_list(text: str) -> list[str]:
    """``"base, sft"`` -> ["base", "sft"]; empty names are an error."""
    arms = [a.strip() for a in text.split(",")]
    if not text.strip() or any(not a for a in arms):
        raise EvalInputError(f"--arms must be comma-separated arm names, got {text!r}")
    return arms
