"""Scores and statistics of the evaluated arms: per-prompt scores, per-arm summaries with Wilson
CIs, every paired comparison (Holm and BH), the minimum detectable effect, the per-type
breakdown, verdicts against the reference arm, and the seen vs held-out split. Pure: the maths
is in ``utils/stats.py``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from utils import stats
from utils.eval_config import EvalConfig
from utils.eval_prompts import score_response
from utils.response_format import clean_response, marker_leaked


def score_arm(
    records: Sequence[Mapping[str, Any]], generations: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """id -> score_response(...) plus the cleaned response and stop reason."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        gen = generations[rec["id"]]
        response = clean_response(gen["text"])
        out[rec["id"]] = {
            **score_response(rec, response),
            "response": response,
            "stop_reason": gen["stop_reason"],
            "n_new_tokens": gen["n_new_tokens"],
            "marker_leaked": marker_leaked(response),
        }
    return out


def arm_summary(scores: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, strict and loose, each with its Wilson CI.

    Instruction-level CIs treat instructions as independent although two can share a prompt,
    so they are a little narrow; the headline and every test are prompt-level."""
    if not scores:
        raise ValueError("no scored prompts for this arm")
    prompt_strict = [s["prompt_strict"] for s in scores]
    prompt_loose = [s["prompt_loose"] for s in scores]
    instr_strict = [x for s in scores for x in s["instruction_strict"]]
    instr_loose = [x for s in scores for x in s["instruction_loose"]]
    return {
        "n_prompts": len(scores),
        "n_instructions": len(instr_strict),
        "prompt_strict": stats.summarize_arm(prompt_strict, confidence),
        "prompt_loose": stats.summarize_arm(prompt_loose, confidence),
        "instruction_strict": stats.summarize_arm(instr_strict, confidence),
        "instruction_loose": stats.summarize_arm(instr_loose, confidence),
    }


def per_type_breakdown(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    arms: Sequence[str],
    pairs: Sequence[tuple[str, str]],
) -> list[dict[str, Any]]:
    """Per instruction type: strict instruction-level accuracy of every arm on the instances
    of that type, and an exact McNemar test per arm pair, Holm-corrected across types
    separately for each pair (one family per comparison)."""
    items: dict[str, list[tuple[str, int]]] = {}
    for rec in records:
        for j, type_id in enumerate(rec["instruction_ids"]):
            items.setdefault(type_id, []).append((rec["id"], j))
    rows: list[dict[str, Any]] = []
    for type_id in sorted(items):
        its = items[type_id]
        success = {
            arm: [bool(scores[arm][rid]["instruction_strict"][j]) for rid, j in its] for arm in arms
        }
        comparisons = []
        for a, b in pairs:
            test = stats.mcnemar_exact(success[a], success[b])
            comparisons.append(
                {
                    "arm_a": a,
                    "arm_b": b,
                    "n_a_only": test.n_a_only,
                    "n_b_only": test.n_b_only,
                    "p_value": test.p_value_exact,
                }
            )
        rows.append(
            {
                "type": type_id,
                "n": len(its),
                "accuracy": {arm: sum(success[arm]) / len(its) for arm in arms},
                "comparisons": comparisons,
            }
        )
    for k in range(len(pairs)):
        adjusted = stats.holm_correction([row["comparisons"][k]["p_value"] for row in rows])
        for row, p_holm in zip(rows, adjusted, strict=True):
            row["comparisons"][k]["p_value_holm"] = p_holm
    return rows


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def reference_arm(arms: Sequence[str]) -> str:
    """The baseline trained arms must beat: base_icl when evaluated, else the first arm."""
    return "base_icl" if "base_icl" in arms else arms[0]


def compute_statistics(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    arms: Sequence[str],
    config: EvalConfig,
) -> dict[str, Any]:
    """Per-arm summaries, every pairwise comparison (Holm and BH across ALL of them), the
    minimum detectable effect, the per-type breakdown and one verdict per non-reference arm."""
    if not records:
        return {"summaries": {}, "comparisons": [], "mde": None, "per_type": [], "verdicts": []}
    summaries = {
        arm: arm_summary([scores[arm][r["id"]] for r in records], config.confidence) for arm in arms
    }
    success = {arm: [scores[arm][r["id"]]["prompt_strict"] for r in records] for arm in arms}
    comparisons = (
        stats.compare_arms(
            success,
            n_resamples=config.bootstrap_resamples,
            confidence=config.confidence,
            seed=config.bootstrap_seed,
        )
        if len(arms) >= 2
        else []
    )
    n = len(records)
    for row in comparisons:
        psi = (row["n_a_only"] + row["n_b_only"]) / n
        try:
            mde_obs = stats.minimum_detectable_effect(
                n, row["accuracy_a"], config.alpha, config.power, p_discordant=psi
            )
        except ValueError:
            mde_obs = math.inf
        row["mde_at_observed_discordance"] = _finite(mde_obs)
        row["significant_holm"] = row["p_value_holm"] < config.alpha
    ref = reference_arm(arms)
    p_ref = summaries[ref]["prompt_strict"]["accuracy"]
    mde = {
        "n": n,
        "reference_arm": ref,
        "reference_accuracy": p_ref,
        "alpha": config.alpha,
        "power": config.power,
        "mde_independent_errors": _finite(
            stats.minimum_detectable_effect(n, p_ref, config.alpha, config.power)
        ),
    }
    pairs = [(row["arm_a"], row["arm_b"]) for row in comparisons]
    per_type = per_type_breakdown(records, scores, arms, pairs)
    verdicts = []
    for arm in arms:
        if arm == ref:
            continue
        row = next(r for r in comparisons if {r["arm_a"], r["arm_b"]} == {arm, ref})
        gain = row["diff"] if row["arm_b"] == arm else -row["diff"]
        if not row["significant_holm"]:
            verdict = "no significant difference"
        else:
            verdict = "beats" if gain > 0 else "loses to"
        verdicts.append(
            {
                "arm": arm,
                "reference": ref,
                "gain": gain,
                "p_value_holm": row["p_value_holm"],
                "verdict": verdict,
            }
        )
    return {
        "summaries": summaries,
        "comparisons": comparisons,
        "mde": mde,
        "per_type": per_type,
        "verdicts": verdicts,
    }


def prompt_split(record: Mapping[str, Any], held_out: Sequence[str]) -> str:
    """'held_out' when any constraint of the prompt is of a held-out type, else 'seen'."""
    return "held_out" if any(t in held_out for t in record["instruction_ids"]) else "seen"


def split_statistics(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    config: EvalConfig,
    held_out: Sequence[str] | None,
) -> dict[str, Any]:
    """``compute_statistics`` on the seen-type and the held-out-type prompts separately (each
    with its own Holm family), plus the type lists; {} when no split is declared."""
    if held_out is None:
        return {}
    out: dict[str, Any] = {"held_out_types": sorted(held_out)}
    for name in ("seen", "held_out"):
        part = [r for r in records if prompt_split(r, held_out) == name]
        st = compute_statistics(part, scores, list(scores), config) if part else {}
        out[name] = {
            "n_prompts": len(part),
            "summaries": st.get("summaries", {}),
            "comparisons": st.get("comparisons", []),
            "verdicts": st.get("verdicts", []),
        }
    return out
