"""Quality-control metrics and gates for stage-1 (instruction, response) records. Pure Python.

The system this replaces kept 67% duplicate instructions, leaked "###" into 38% of responses
and dropped failing shards silently; these metrics measure each of those failure modes and
``evaluate_gates`` turns them into a printed pass/fail table, so a failure is always reported.

A record is a dict with at least ``instruction``, ``response`` (cleaned), ``raw_completion``,
``stop_reason`` (one of ``STOP_REASONS``) and ``response_tokens`` (an int counted by the
tokenizer, never derived from characters); ``type`` (the instruction type stage 1 records carry) is optional.

Definitions (per record; a rate is the count over ``n``):

- empty: the cleaned response is empty after ``strip()``.
- limit hit: ``stop_reason == "max_new_tokens"``.
- runaway: limit hit AND no stop string (``RESPONSE_STOP_STRINGS`` plus ``stop_strings``)
  occurs anywhere in ``raw_completion``: the model never ended its answer, so the whole token
  budget became the response. A limit hit whose completion does contain the end marker (the
  answer ended and only the tail after it was cut) is not a runaway.
- truncated: runaway (cut at the limit) OR a non-empty response that ends mid-sentence, i.e.
  whose last character, after trailing closing quotes/brackets/emphasis (``"')]}*_`` and their
  typographic forms) are removed, is not one of ``. ! ? …`` (or the CJK full stops) and which
  does not end with a closing code fence. A list or a number with no final punctuation
  therefore counts as truncated: the rate is an upper bound.
- marker leak: ``response_format.marker_leaked(response)`` or any leak string ("###" always,
  plus ``leak_strings``) occurs in the response.
- near-duplicate: the record's instruction is a near-duplicate of an earlier kept instruction
  (``utils.dedup.deduplicate``, first occurrence kept), or the caller's ``duplicate_flags``.
- median / p90 response tokens: ``numpy.percentile`` with linear interpolation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from utils import dedup
from utils.minhash_lsh import DEFAULT_CONFIG, DedupConfig
from utils.response_format import RESPONSE_STOP_STRINGS, marker_leaked

STOP_REASONS = ("marker", "eos", "max_new_tokens", "stop_string")
REQUIRED_FIELDS = ("instruction", "response", "raw_completion", "stop_reason", "response_tokens")
# Always checked: the old system's end marker, which leaked into 38% of its responses.
DEFAULT_LEAK_STRINGS: tuple[str, ...] = ("###",)
UNTYPED = "untyped"
_TERMINAL = frozenset(".!?\u2026\u3002\uff01\uff1f")
_CLOSERS = "\"')]}*_\u201d\u2019\u00bb"
# Record indices kept per flag in the qc dict, enough to go and look at the failures.
MAX_FLAGGED_EXAMPLES = 10


def _check_record(i: int, record: Any) -> None:
    """Raise naming the record and field of anything a metric would silently misread."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record {i}: expected a dict, got {type(record).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in record:
            raise ValueError(f"record {i}: missing field {key!r}")
    for key in ("instruction", "response", "raw_completion"):
        if not isinstance(record[key], str):
            raise ValueError(
                f"record {i}: field {key!r} must be a str, got {type(record[key]).__name__}"
            )
    if record["stop_reason"] not in STOP_REASONS:
        raise ValueError(
            f"record {i}: field 'stop_reason' must be one of {STOP_REASONS}, "
            f"got {record['stop_reason']!r}"
        )
    tokens = record["response_tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(
            f"record {i}: field 'response_tokens' must be a non-negative int (tokenizer count), "
            f"got {tokens!r}"
        )
    kind = record.get("type")
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"record {i}: field 'type' must be a str or absent, got {kind!r}")


def ends_mid_sentence(response: str) -> bool:
    """True when a non-empty response does not end like a finished sentence (see module doc)."""
    text = response.rstrip()
    if not text or text.endswith("```"):
        return False
    text = text.rstrip(_CLOSERS).rstrip()
    return not text or text[-1] not in _TERMINAL


def is_runaway(record: Mapping[str, Any], stop_strings: Sequence[str] = ()) -> bool:
    """Limit hit with no stop string anywhere in the raw completion (the answer never ended)."""
    if record["stop_reason"] != "max_new_tokens":
        return False
    stops = tuple(RESPONSE_STOP_STRINGS) + tuple(stop_strings)
    return not any(s in record["raw_completion"] for s in stops)


def has_marker_leak(response: str, leak_strings: Sequence[str] = ()) -> bool:
    """Format scaffolding or a configured leak string ("###" always) left in a response."""
    leaks = DEFAULT_LEAK_STRINGS + tuple(leak_strings)
    return marker_leaked(response) or any(s in response for s in leaks)


def _acceptance(step_counts: Mapping[str, Sequence[int]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for step, counts in step_counts.items():
        if not isinstance(counts, (tuple, list)) or len(counts) != 2:
            raise ValueError(f"step_counts[{step!r}] must be (accepted, attempted), got {counts!r}")
        accepted, attempted = counts
        for name, value in (("accepted", accepted), ("attempted", attempted)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"step_counts[{step!r}]: {name} must be a non-negative int, got {value!r}"
                )
        if accepted > attempted:
            raise ValueError(f"step_counts[{step!r}]: accepted {accepted} > attempted {attempted}")
        # A step that attempted nothing has no rate, not a rate of 0 or 1.
        rate = accepted / attempted if attempted else None
        out[step] = {"accepted": accepted, "attempted": attempted, "rate": rate}
    return out


def compute_qc(
    records: Sequence[Mapping[str, Any]],
    *,
    duplicate_flags: Sequence[bool] | None = None,
    dedup_threshold: float | None = None,
    dedup_config: DedupConfig | None = None,
    step_counts: Mapping[str, Sequence[int]] | None = None,
    leak_strings: Sequence[str] = (),
    stop_strings: Sequence[str] = (),
) -> dict[str, Any]:
    """QC metrics of stage-1 records (definitions in the module docstring); JSON-serialisable.

    ``duplicate_flags`` (one bool per record) replaces the instruction dedup computed here with
    ``dedup_threshold``/``dedup_config``. ``step_counts`` maps a pipeline step to
    (accepted, attempted). With no records every rate and percentile is None, which every
    gate then reports as a failure.
    """
    records = list(records)
    for i, record in enumerate(records):
        _check_record(i, record)
    n = len(records)

    if duplicate_flags is not None:
        flags = list(duplicate_flags)
        if len(flags) != n:
            raise ValueError(f"duplicate_flags has {len(flags)} entries for {n} records")
        for i, flag in enumerate(flags):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"duplicate_flags[{i}] must be a bool, got {flag!r}")
        near_dup = [bool(f) for f in flags]
        near_dup_threshold = None
    else:
        config = DEFAULT_CONFIG if dedup_config is None else dedup_config
        near_dup_threshold = config.threshold if dedup_threshold is None else dedup_threshold
        _, removed = dedup.deduplicate(
            [r["instruction"] for r in records], threshold=near_dup_threshold, config=config
        )
        removed_at = {r.index for r in removed}
        near_dup = [i in removed_at for i in range(n)]

    per_flag = {
        "empty": [not r["response"].strip() for r in records],
        "limit_hit": [r["stop_reason"] == "max_new_tokens" for r in records],
        "runaway": [is_runaway(r, stop_strings) for r in records],
        "marker_leak": [has_marker_leak(r["response"], leak_strings) for r in records],
        "near_duplicate": near_dup,
    }
    per_flag["truncated"] = [
        run or (not empty and ends_mid_sentence(r["response"]))
        for r, run, empty in zip(records, per_flag["runaway"], per_flag["empty"], strict=True)
    ]
    rate_names = {
        "empty": "empty_rate",
        "limit_hit": "limit_hit_rate",
        "runaway": "runaway_rate",
        "truncated": "truncation_rate",
        "marker_leak": "marker_leakage_rate",
        "near_duplicate": "near_duplicate_rate",
    }
    tokens = np.array([r["response_tokens"] for r in records], dtype=float)
    qc: dict[str, Any] = {"n": n}
    for flag, rate_name in rate_names.items():
        count = sum(per_flag[flag])
        qc[f"n_{flag}"] = count
        qc[rate_name] = count / n if n else None
    qc["near_duplicate_threshold"] = near_dup_threshold
    qc["median_response_tokens"] = float(np.median(tokens)) if n else None
    qc["p90_response_tokens"] = float(np.percentile(tokens, 90)) if n else None
    qc["max_response_tokens"] = int(tokens.max()) if n else None
    qc["stop_reason_counts"] = {
        s: sum(r["stop_reason"] == s for r in records) for s in STOP_REASONS
    }
    qc["type_counts"] = dict(sorted(Counter(r.get("type") or UNTYPED for r in records).items()))
    qc["acceptance"] = _acceptance(step_counts or {})
    qc["flagged_examples"] = {
        flag: [i for i, f in enumerate(values) if f][:MAX_FLAGGED_EXAMPLES]
        for flag, values in per_flag.items()
    }
    return qc


# ----------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class QCGates:
    """Thresholds a stage's output must meet; None disables a gate (shown as "off")."""

    min_records: int | None = 50
    max_near_duplicate_rate: float | None = 0.05
    max_marker_leakage_rate: float | None = 0.0
    max_limit_hit_rate: float | None = 0.10
    max_runaway_rate: float | None = 0.05
    max_empty_rate: float | None = 0.0
    # Off by default: the mid-sentence heuristic also flags lists without final punctuation.
    max_truncation_rate: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "min_records":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"min_records must be a non-negative int, got {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value <= 1.0
            ):
                raise ValueError(f"{f.name} must be a rate in [0, 1] or null, got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QCGates:
        """Build from a config mapping; an unknown key raises (a typo must not disable a gate)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown QC gate key(s) {unknown}; valid keys: {known}")
        return cls(**dict(values))


def _gate_metric(gate: str) -> tuple[str, str]:
    """(qc metric, "max"|"min") a gate field constrains."""
    if gate == "min_records":
        return "n", "min"
    prefix, _, metric = gate.partition("_")
    return metric, prefix


@dataclass(frozen=True)
class GateCheck:
    gate: str
    metric: str
    value: float | int | None  # None: the metric is undefined (no records)
    threshold: float | int | None  # None: gate disabled
    kind: str  # "max" or "min"
    passed: bool

    @property
    def message(self) -> str:
        value = "n/a" if self.value is None else _fmt(self.value)
        op = "<=" if self.kind == "max" else ">="
        if self.threshold is None:
            return f"{self.metric} = {value} (gate {self.gate} off)"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.metric} = {value}, required {op} {_fmt(self.threshold)}: {verdict}"


@dataclass(frozen=True)
class GateReport:
    passed: bool
    failures: list[str]  # one message per failed gate: metric, value, threshold
    checks: list[GateCheck]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def evaluate_gates(qc: Mapping[str, Any], gates: QCGates) -> GateReport:
    """Check every enabled gate; an undefined metric (None) fails its gate."""
    checks = []
    for f in fields(gates):
        threshold = getattr(gates, f.name)
        metric, kind = _gate_metric(f.name)
        if metric not in qc:
            raise ValueError(f"qc has no metric {metric!r}, needed by gate {f.name!r}")
        value = qc[metric]
        if threshold is None:
            passed = True
        elif value is None:
            passed = False
        else:
            passed = value <= threshold if kind == "max" else value >= threshold
        checks.append(GateCheck(f.name, metric, value, threshold, kind, passed))
    failures = [c.message for c in checks if not c.passed]
    return GateReport(passed=not failures, failures=failures, checks=checks)


def format_gate_report(report: GateReport) -> str:
    """A small fixed-width table, one row per gate, and a one-line verdict."""
    header = ("metric", "value", "required", "status")
    rows = []
    for c in report.checks:
        value = "n/a" if c.value is None else _fmt(c.value)
        if c.threshold is None:
            required, status = "-", "off"
        else:
            op = "<=" if c.kind == "max" else ">="
            required, status = f"{op} {_fmt(c.threshold)}", "pass" if c.passed else "FAIL"
        rows.append((c.metric, value, required, status))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    active = [c for c in report.checks if c.threshold is not None]
    failed = sum(not c.passed for c in active)
    verdict = "PASSED" if report.passed else "FAILED"
    lines.append(f"QC gates {verdict}: {failed} of {len(active)} enabled gates failed")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_LEAK_STRINGS",
    "REQUIRED_FIELDS",
    "STOP_REASONS",
    "GateCheck",
    "GateReport",
    "QCGates",
    "compute_qc",
    "ends_mid_sentence",
    "evaluate_gates",
    "format_gate_report",
    "has_marker_leak",
    "is_runaway",
]
