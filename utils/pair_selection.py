"""The pure bookkeeping of self-judged preference pairs: which sampled candidates can be
compared (``exclusion_reasons``, shared by every stage that pairs the model's own samples),
comparisons from per-candidate verdicts, which pairs are kept and why the others are dropped
(``select_pairs``), the pairs.jsonl records a judgement leaves (``pair_records``) and the
manifest counts (``summarize_judgements``). No model: ``utils.preference_pairs`` generates and
judges.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from utils.preference_math import strength_preference
from utils.response_format import format_completion, format_prompt, marker_leaked
from utils.soft_label_summary import histogram

if TYPE_CHECKING:
    from utils.critic import CriticConfig

DROP_REASONS = ("below_confidence", "position_inconsistent", "tie")
EXCLUDE_REASONS = ("empty", "duplicate", "truncated", "marker_leaked", "control_token")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exclusion_reasons(
    texts: Sequence[str],
    stop_reasons: Sequence[str],
    control_strings: Sequence[str],
    exclude_truncated: bool,
) -> list[str | None]:
    """Why each candidate cannot be paired (None = usable). Duplicates keep the first copy."""
    seen: set[str] = set()
    out: list[str | None] = []
    for text, stop in zip(texts, stop_reasons, strict=True):
        norm = _normalise(text)
        if not norm:
            reason = "empty"
        elif any(s in text for s in control_strings):
            reason = "control_token"
        elif marker_leaked(text):
            reason = "marker_leaked"
        elif exclude_truncated and stop == "max_new_tokens":
            reason = "truncated"
        elif norm in seen:
            reason = "duplicate"
        else:
            reason = None
            seen.add(norm)
        out.append(reason)
    return out


def candidate_scores(n: int, comparisons: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Mean soft win rate of each candidate over its comparisons (None when never compared)."""
    wins = [0.0] * n
    counts = [0] * n
    for c in comparisons:
        i, j, p = c["i"], c["j"], c["p_first"]
        wins[i] += p
        wins[j] += 1.0 - p
        counts[i] += 1
        counts[j] += 1
    return [w / k if k else None for w, k in zip(wins, counts, strict=True)]


def pointwise_comparisons(
    verdicts: Sequence[Mapping[str, Any] | None],
    pairs: Sequence[tuple[int, int]],
    pair_mode: str = "pointwise",
) -> list[dict[str, Any]]:
    """Comparisons derived from per-candidate verdicts (pmi or pointwise), no model call: for
    (i, j), ``strength_preference`` of candidate i over j (p_first, margin_nats, both
    verdicts)."""
    out = []
    for i, j in pairs:
        vi, vj = verdicts[i], verdicts[j]
        if vi is None or vj is None:
            raise ValueError(f"candidate {i if vi is None else j} has no {pair_mode} verdict")
        out.append({"i": i, "j": j, **strength_preference(vi, vj, pair_mode)})
    return out


def pointwise_candidate_scores(verdicts: Sequence[Mapping[str, Any] | None]) -> list[float | None]:
    """A candidate's score is its own verdict's score (pointwise: P(Yes) over Yes/No; pmi: gain
    per token), None when it was not judged."""
    return [None if v is None else v["score"] for v in verdicts]


def select_pairs(
    comparisons: Sequence[Mapping[str, Any]],
    scores: Sequence[float | None],
    selection: str,
    critic: CriticConfig,
) -> list[dict[str, Any]]:
    """Oriented candidate pairs with soft label, margin and kept/drop_reason.

    all_pairs: every comparison, chosen = the side the judge prefers. best_vs_worst: the
    highest against the lowest mean soft win rate, labelled by their direct comparison (so a
    best that loses its direct duel gets a soft label below 0.5 and is dropped)."""
    if selection == "all_pairs":
        chosen_sets = []
        for c in comparisons:
            first_wins = c["p_first"] >= 0.5
            chosen_sets.append(
                (c, c["i"] if first_wins else c["j"], c["j"] if first_wins else c["i"])
            )
    elif selection == "best_vs_worst":
        valid = [k for k, s in enumerate(scores) if s is not None]
        if len(valid) < 2:
            return []
        best = max(valid, key=lambda k: (scores[k], -k))
        worst = min(valid, key=lambda k: (scores[k], -k))
        if best == worst:
            worst = next(k for k in valid if k != best)
        direct = next(c for c in comparisons if {c["i"], c["j"]} == {best, worst})
        chosen_sets = [(direct, best, worst)]
    else:
        raise ValueError(f"unknown selection {selection!r}")
    out = []
    for c, chosen, rejected in chosen_sets:
        soft = c["p_first"] if chosen == c["i"] else 1.0 - c["p_first"]
        if soft == 0.5:
            reason = "tie"
        elif critic.require_position_consistent and c["position_consistent"] is False:
            # None (pointwise: no order was shown) is never a position inconsistency.
            reason = "position_inconsistent"
        elif soft < critic.pair_confidence_threshold:
            reason = "below_confidence"
        else:
            reason = None
        lo, hi = sorted((c["i"], c["j"]))
        out.append(
            {
                "pair_key": f"c{lo}-c{hi}",
                "chosen_index": chosen,
                "rejected_index": rejected,
                "soft_label": soft,
                "margin": 2.0 * soft - 1.0,
                "kept": reason is None,
                "drop_reason": reason,
            }
        )
    return out


def pair_records(judgement: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The kept pairs of one judgement record, as pairs.jsonl records (pure: used on resume)."""
    cands = judgement["candidates"]
    slim = [{k: v for k, v in c.items() if k != "prompt"} for c in cands]
    by_key = {f"c{min(c['i'], c['j'])}-c{max(c['i'], c['j'])}": c for c in judgement["comparisons"]}
    out = []
    for p in judgement["pairs"]:
        if not p["kept"]:
            continue
        ch, rj = cands[p["chosen_index"]], cands[p["rejected_index"]]
        comp = by_key[p["pair_key"]]
        out.append(
            {
                "id": f"{judgement['id']}:{p['pair_key']}",
                "instruction_id": judgement["id"],
                "instruction": judgement["instruction"],
                "type": judgement["type"],
                "prompt": format_prompt(judgement["instruction"]),
                "chosen": format_completion(ch["text"]),
                "rejected": format_completion(rj["text"]),
                "soft_label": p["soft_label"],
                "margin": p["margin"],
                "chosen_index": p["chosen_index"],
                "rejected_index": p["rejected_index"],
                "chosen_source": ch["source"],
                "rejected_source": rj["source"],
                "selection": judgement["selection"],
                "candidates": slim,
                "judge": {**comp, **judgement["judge_prompt"]},
            }
        )
    return out


def summarize_judgements(judgements: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for the manifest: instructions, candidates, exclusions, pairs kept and dropped by
    reason, and the soft-label histograms of kept and of all considered pairs."""
    excluded: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    stop: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    kept_labels, all_labels = [], []
    n_cands = n_comparisons = n_no_pairs = n_consistent = n_ordered = n_prompts = 0
    for j in judgements:
        modes[j.get("pair_mode", "pairwise")] += 1
        n_prompts += j.get("judge_prompts", 2 * len(j["comparisons"]))
        for c in j["candidates"]:
            n_cands += 1
            sources[c["source"]] += 1
            stop[c["stop_reason"]] += 1
            if c["excluded"]:
                excluded[c["excluded"]] += 1
        n_comparisons += len(j["comparisons"])
        flags = [c["position_consistent"] for c in j["comparisons"]]
        n_ordered += sum(f is not None for f in flags)  # pointwise comparisons show no order
        n_consistent += sum(f is True for f in flags)
        if not j["pairs"]:
            n_no_pairs += 1
        for p in j["pairs"]:
            all_labels.append(p["soft_label"])
            if p["kept"]:
                kept_labels.append(p["soft_label"])
            else:
                dropped[p["drop_reason"]] += 1
    # Best-vs-worst pairs whose best lost the direct duel have soft labels < 0.5.
    all_clamped = [max(v, 0.5) for v in all_labels]
    return {
        "instructions": len(judgements),
        "instructions_without_comparable_candidates": n_no_pairs,
        "candidates": n_cands,
        "candidates_by_source": dict(sources),
        "candidates_by_stop_reason": dict(stop),
        "candidates_excluded": {r: excluded.get(r, 0) for r in EXCLUDE_REASONS},
        "pair_modes": dict(modes),
        "judge_prompts": n_prompts,  # model prompts the pair judge read
        "comparisons": n_comparisons,
        "position_consistent_rate": n_consistent / n_ordered if n_ordered else None,
        "pairs_considered": len(all_labels),
        "pairs_kept": len(kept_labels),
        "pairs_dropped": {r: dropped.get(r, 0) for r in DROP_REASONS},
        "soft_label_histogram_kept": histogram(kept_labels),
        "soft_label_histogram_considered": histogram(all_clamped),
    }
