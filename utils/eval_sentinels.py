"""The contamination sentinel verdict of each evaluated arm (``utils/contamination.py``, which
is optional here: without it the report says "not run")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from utils.clean_model_loader import LoadedModel
from utils.eval_config import EvalConfig


def sentinels_unavailable(config: EvalConfig) -> dict[str, Any] | None:
    """The "not run" record when sentinels cannot run (disabled, module missing), else None.

    Decided before any model is loaded, so a fully cached rerun stays instant."""
    if not config.run_sentinels:
        return {"status": "disabled", "verdict": "not run", "reason": "eval.run_sentinels=false"}
    if config.sentinel.get("mode", "quick") in ("off", False, None):  # YAML reads off as False
        return {"status": "disabled", "verdict": "not run", "reason": "sentinels.mode=off"}
    try:
        from utils import contamination
    except ImportError as e:
        return {"status": "not_run", "verdict": "not run", "reason": f"not importable: {e}"}
    if not callable(getattr(contamination, "run_sentinel_suite", None)):
        reason = "utils.contamination has no run_sentinel_suite"
        return {"status": "not_run", "verdict": "not run", "reason": reason}
    return None


def run_sentinels(lm: LoadedModel, config: EvalConfig, trained_arm: bool = False) -> dict[str, Any]:
    """The contamination sentinel verdict for the model as currently set up (adapter included).
    ``trained_arm``: an adapter arm (the suite then discounts what the training taught).

    utils/contamination.py is optional here: when it is missing the report says "not run"."""
    unavailable = sentinels_unavailable(config)
    if unavailable is not None:
        return unavailable
    from utils import contamination

    suite = contamination.run_sentinel_suite
    sentinel_config: Any = dict(config.sentinel)
    config_cls = getattr(contamination, "SentinelConfig", None)
    if config_cls is not None and hasattr(config_cls, "from_dict"):
        sentinel_config = config_cls.from_dict(sentinel_config)
    try:
        result = suite(lm, sentinel_config, trained_arm=trained_arm)
    except Exception as e:  # a sentinel crash must not discard an hour of generations
        return {"status": "error", "verdict": "error", "reason": f"{type(e).__name__}: {e}"}
    details = _jsonable(result)
    return {"status": "ran", "verdict": _verdict_of(details), "details": details}


def sentinel_suite_version() -> int | None:
    """``utils.contamination.SUITE_VERSION`` (part of the cached verdicts' key), None without it."""
    try:
        from utils import contamination
    except ImportError:
        return None
    return getattr(contamination, "SUITE_VERSION", None)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    elif hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    return json.loads(json.dumps(value, default=str))


def _verdict_of(details: Any) -> str:
    if isinstance(details, Mapping):
        for key in ("verdict", "status"):
            if isinstance(details.get(key), str):
                return details[key]
        for key in ("passed", "clean", "ok"):
            if isinstance(details.get(key), bool):
                return "pass" if details[key] else "FAIL"
    return "see details"
