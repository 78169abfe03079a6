"""Every problem of a whole recipe at once, before any stage runs.

    problems = validate_config(load_config("configs/cpu_default.yaml", ["sft.max_steps=-3"]))
    # ['sft.max_steps: expected -1 (no cap) or an integer >= 1, got -3']
    check_config(cfg)  # the same, raised as one ConfigError listing them all

Each stage parses its own section when it starts (Stage1Config.from_dict, SFTStageConfig /
DPOStageConfig via dataclass_from_dict, VerifiedConfig, PairsConfig, CriticConfig, CAIConfig,
EvalConfig, SentinelConfig, constraints_from_config), so a bad value in the ``eval`` section
used to surface an hour into a run, and only the first one. Here, per section:

1. every key is checked against the section's dataclass: unknown keys, then the type its field
   declares (``--set stage1.n_train=abc`` gives the string ``'abc'``: "expected an integer"),
   then the ranges in ``RANGES`` (several of which those classes do not check: learning rates
   > 0, ``max_steps`` -1 or >= 1, counts >= 1, probabilities in (0, 1]);
2. only when all of a section's keys pass, the stage's own parser builds the section, so its
   enum and cross-field rules (e.g. ``sft.padding_free`` needs FlashAttention) are reported too.

Every message starts with the dotted key (``section.key``) or the section name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from utils.clean_model_loader import ATTN_IMPLEMENTATIONS
from utils.config import ConfigError

Check = tuple[Callable[[Any], bool], str]


def _ge(n: float) -> Check:
    return (lambda v: v >= n), f">= {n:g}"


def _gt(n: float) -> Check:
    return (lambda v: v > n), f"> {n:g}"


PROB: Check = (lambda v: 0 < v <= 1), "in (0, 1]"
UNIT: Check = (lambda v: 0 <= v <= 1), "in [0, 1]"
OPEN_UNIT: Check = (lambda v: 0 < v < 1), "in (0, 1)"
HALF_OPEN_UNIT: Check = (lambda v: 0 <= v < 1), "in [0, 1)"
STEPS: Check = (lambda v: v == -1 or v >= 1), "-1 (no cap) or >= 1"
COUNT, NONNEG, POSITIVE = _ge(1), _ge(0), _gt(0)

_TRAINING: dict[str, Check] = {
    "lora_r": COUNT, "lora_alpha": POSITIVE, "lora_dropout": HALF_OPEN_UNIT,
    "learning_rate": POSITIVE, "warmup_steps": NONNEG, "weight_decay": NONNEG,
    "max_grad_norm": NONNEG, "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT, "gradient_accumulation_steps": COUNT,
    "num_train_epochs": POSITIVE, "max_steps": STEPS, "max_length": _gt(8),
    "dev_fraction": HALF_OPEN_UNIT, "max_dev_examples": NONNEG, "eval_steps": COUNT,
    "logging_steps": COUNT, "save_steps": COUNT, "save_total_limit": COUNT,
    "dataloader_num_workers": NONNEG, "mask_audit_examples": NONNEG,
}  # fmt: skip

RANGES: dict[str, dict[str, Check]] = {
    "stage1": {
        "n_train": COUNT, "n_test": NONNEG, "instruction_overshoot": NONNEG,
        "list_examples": COUNT, "diversity_fraction": UNIT, "prompts_per_round": COUNT,
        "max_rounds": COUNT, "instruction_max_new_tokens": COUNT,
        "instruction_temperature": POSITIVE, "instruction_top_p": PROB,
        "response_examples": NONNEG, "response_max_new_tokens": COUNT,
        "response_temperature": POSITIVE, "response_top_p": PROB, "response_attempts": COUNT,
        "batch_size": COUNT, "dedup_threshold": PROB,
    },
    "verified": {
        "rounds": COUNT, "num_candidates": COUNT, "max_new_tokens": COUNT,
        "temperature": POSITIVE, "top_p": PROB, "batch_size": COUNT, "fewshot_examples": COUNT,
        "instructions_per_chunk": COUNT, "max_instructions": COUNT,
        "near_identical_ratio": PROB, "hindsight": NONNEG,
    },
    "sft": _TRAINING,
    "dpo": {
        **{k: v for k, v in _TRAINING.items() if not k.startswith("lora_")},
        "beta": POSITIVE, "chosen_logp_warn_nats": NONNEG, "chosen_logp_window": COUNT,
    },
    "cai_dpo": {},  # filled below: the dpo section's ranges
    "pairs": {
        "num_candidates": (_ge(2)[0], ">= 2 (a pair needs two candidates)"),
        "fewshot_examples": COUNT, "max_new_tokens": COUNT, "temperature": POSITIVE,
        "top_p": PROB, "top_k": NONNEG, "batch_size": COUNT, "instructions_per_chunk": COUNT,
        "max_instructions": COUNT,
    },
    "critic": {
        "n_shots_pmi": NONNEG, "n_shots_pointwise": NONNEG, "n_shots_pairs": NONNEG,
        "n_shots_instructions": NONNEG, "min_instruction_score": UNIT,
        "pair_confidence_threshold": ((lambda v: 0.5 <= v <= 1), "in [0.5, 1]"),
        "batch_size": COUNT,
    },
    "cai": {
        "max_instructions": COUNT, "instructions_per_chunk": COUNT, "batch_size": COUNT,
        "judge_batch_size": COUNT, "n_shots": NONNEG, "n_shots_judge": NONNEG,
        "response_max_new_tokens": COUNT, "critique_max_new_tokens": COUNT,
        "revision_max_new_tokens": COUNT, "response_temperature": NONNEG,
        "critique_temperature": NONNEG, "revision_temperature": NONNEG, "top_p": PROB,
        "label_margin": ((lambda v: 0 <= v < 0.5), "in [0, 0.5)"),
        "contrastive_temperature": POSITIVE,
        "contrastive_checker_p": ((lambda v: 0.5 < v <= 1), "in (0.5, 1]"),
    },
    "eval": {
        "n_prompts": COUNT, "seed": NONNEG, "icl_k": COUNT, "icl_dev_prompts": COUNT,
        "max_new_tokens": COUNT, "batch_size": COUNT, "bootstrap_resamples": COUNT,
        "bootstrap_seed": NONNEG, "confidence": OPEN_UNIT, "alpha": OPEN_UNIT,
        "power": ((lambda v: 0.5 < v < 1), "in (0.5, 1)"), "leakage_threshold": PROB,
        "n_samples": NONNEG, "rss_interval_s": POSITIVE,
    },
    "sentinels": {
        "max_new_tokens": COUNT, "samples_per_temperature": COUNT, "top_p": PROB,
        "batch_size": COUNT, "torch_threads": COUNT,
    },
}  # fmt: skip
RANGES["cai_dpo"] = RANGES["dpo"]  # the cai stage's overrides of the dpo section

# Values a section's parser converts before its dataclass sees them.
ALSO_ACCEPTED: dict[tuple[str, str], tuple[type, ...]] = {
    ("eval", "arms"): (str,),  # "base, sft"
    ("sentinels", "temperatures"): (int, float),  # one temperature
}
MODEL_FIELDS: dict[str, str] = {
    "name": "str | None", "device": "str | None", "dtype": "str | None",
    "quantization": "str | None", "trust_remote_code": "bool", "allow_instruct_control": "bool",
    "attn_implementation": "str | None",
}  # fmt: skip
MODEL_CHOICES = {
    "dtype": (None, "float32", "float16", "bfloat16", "float64"),
    "quantization": (None, "none", "4bit", "8bit"),
    "attn_implementation": ATTN_IMPLEMENTATIONS,
}
_WORDS = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string",
          "None": "null", "list": "a list", "tuple": "a list", "dict": "a mapping",
          "Mapping": "a mapping", "Sequence": "a list"}  # fmt: skip


def _alternatives(annotation: str) -> list[str]:
    """``"int | None"`` -> ["int", "None"]; ``"dict[str, Any]"`` -> ["dict"]."""
    out, depth, cur = [], 0, ""
    for ch in annotation:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [a.strip().split("[")[0].strip() for a in [*out, cur]]


def _type_ok(value: Any, alt: str) -> bool | None:
    """Whether ``value`` has type ``alt``; None for a type this check does not judge."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {
        "None": value is None,
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number,
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, (list, tuple)),
        "tuple": isinstance(value, (list, tuple)),
        "Sequence": isinstance(value, (list, tuple)),
        "dict": isinstance(value, dict),
        "Mapping": isinstance(value, dict),
    }.get(alt)


def _float_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as text: it needs a dot, ``1.0e-3``."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (YAML reads {value!r} as text; write it with a dot, e.g. 1.0e-3)"
    return ""


def field_problems(sec: str, values: Mapping[str, Any], types: Mapping[str, str]) -> list[str]:
    """Unknown keys, wrong types and out-of-range values of one section, each named."""
    problems = []
    for key, value in values.items():
        where = f"{sec}.{key}"
        if key not in types:
            problems.append(f"{where}: unknown key; known keys: {sorted(types)}")
            continue
        alts = _alternatives(types[key])
        verdicts = [_type_ok(value, a) for a in alts]
        also = ALSO_ACCEPTED.get((sec, key), ())
        also_ok = isinstance(value, also) and not isinstance(value, bool)
        if not also_ok and None not in verdicts and not any(verdicts):
            want = " or ".join(dict.fromkeys(_WORDS.get(a, a) for a in alts))
            problems.append(f"{where}: expected {want}, got {value!r}{_float_hint(value)}")
            continue
        check = RANGES.get(sec, {}).get(key)
        if check is not None and value is not None and not isinstance(value, (bool, str)):
            ok, rule = check
            if isinstance(value, (int, float)) and not ok(value):
                problems.append(f"{where}: must be {rule}, got {value!r}")
    return problems


def _dataclass_types(cls: type) -> dict[str, str]:
    return {
        f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        for f in dataclasses.fields(cls)
    }


def _parsers() -> dict[str, tuple[type | None, Callable[[dict[str, Any]], Any]]]:
    """section -> (its dataclass, or None, and the stage's own parser). Imported here: the
    stage modules pull in torch and transformers."""
    from utils.constitution_config import CAIConfig
    from utils.constraint_library import constraints_from_config
    from utils.contamination import SentinelConfig
    from utils.critic import CriticConfig
    from utils.dpo import DPOStageConfig
    from utils.eval_config import EvalConfig
    from utils.preference_pairs import PairsConfig
    from utils.qc import QCGates
    from utils.sft import SFTStageConfig
    from utils.stage1 import Stage1Config
    from utils.verified_sampling import VerifiedConfig
    from utils.vllm_engine import BackendConfig

    def stage1(d: dict[str, Any]) -> Any:
        QCGates.from_dict(d.get("gates") or {})
        return Stage1Config.from_dict(d)

    return {
        "model": (None, lambda d: None),
        "sentinels": (SentinelConfig, SentinelConfig.from_dict),
        "critic": (CriticConfig, CriticConfig.from_dict),
        "stage1": (Stage1Config, stage1),
        "constraints": (None, constraints_from_config),
        "verified": (VerifiedConfig, VerifiedConfig.from_dict),
        "sft": (SFTStageConfig, SFTStageConfig.from_dict),
        "pairs": (PairsConfig, PairsConfig.from_dict),
        "dpo": (DPOStageConfig, DPOStageConfig.from_dict),
        "cai_dpo": (DPOStageConfig, DPOStageConfig.from_dict),  # partial: over dpo's keys
        "cai": (CAIConfig, CAIConfig.from_dict),
        "eval": (EvalConfig, EvalConfig.from_dict),
        "generation": (BackendConfig, BackendConfig.from_dict),
    }


def _model_problems(d: Mapping[str, Any]) -> list[str]:
    problems = field_problems("model", d, MODEL_FIELDS)
    for key, choices in MODEL_CHOICES.items():
        if key in d and isinstance(d[key], (str, type(None))) and d[key] not in choices:
            problems.append(f"model.{key}: must be one of {list(choices)}, got {d[key]!r}")
    return problems


def validate_config(cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of the recipe ``cfg`` (as ``load_config`` returns it), each message
    starting with ``section.key`` or ``section``; an empty list when the recipe is valid.
    Sections may be absent (a stage that needs one says so when it starts); an unknown
    top-level section is a problem (a typo must not silently run the defaults)."""
    parsers = _parsers()
    problems: list[str] = []
    for sec, values in cfg.items():
        if sec.startswith("_"):  # _config_path, added by load_config
            continue
        if sec not in parsers:
            problems.append(f"{sec}: unknown section; known sections: {sorted(parsers)}")
            continue
        if values is None:
            values = {}
        if not isinstance(values, dict):
            problems.append(f"{sec}: expected a mapping of keys, got {values!r}")
            continue
        cls, parse = parsers[sec]
        if sec == "model":
            found = _model_problems(values)
        elif cls is not None:
            found = field_problems(sec, values, _dataclass_types(cls))
            if sec == "stage1" and isinstance(values.get("gates"), dict):
                from utils.qc import QCGates

                found += field_problems("stage1.gates", values["gates"], _dataclass_types(QCGates))
        else:
            found = []
        if not found:
            try:
                parse(dict(values))
            except (ValueError, TypeError, KeyError) as e:
                # str(KeyError) is the repr of its message; other messages keep their quotes
                msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                named = msg.startswith((f"{sec}.", f"{sec} ", f"{sec}:"))
                found.append(msg if named else f"{sec}: {msg}")
        problems.extend(found)
    return problems


def check_config(cfg: Mapping[str, Any]) -> None:
    """Raise one ``ConfigError`` listing every problem ``validate_config`` finds."""
    problems = validate_config(cfg)
    if problems:
        where = cfg.get("_config_path", "config")
        raise ConfigError(
            f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )
