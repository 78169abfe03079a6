"""How good a judge is the base-model critic: its accuracy on the verifiable check set
(``utils.critic_checkset``), measured offline by ``scripts/evaluate_critic.py``.

The metrics the evaluation reports: pairwise accuracy, both-orders consistency (pairwise judge
only), accuracy at a confidence threshold with its coverage, the distribution of soft labels
and the dev-chosen confidence threshold, instruction-judge accuracy and ROC AUC (pure). Then
running the critic on the check set (the model is handed in), choosing a variant and
thresholds on DEV only, reporting on TEST.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from utils.critic_checkset import split_cases
from utils.stats import wilson_interval

# --------------------------------------------------------------------------------------------
# Metrics (pure).


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counted one half (the Mann-Whitney U statistic divided by n_pos * n_neg)."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        raise ValueError(f"AUC needs both classes: {len(pos)} positive, {len(neg)} negative")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _rate(successes: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"n": 0, "successes": 0, "rate": None, "ci_low": None, "ci_high": None}
    lo, hi = wilson_interval(successes, n)
    return {"n": n, "successes": successes, "rate": successes / n, "ci_low": lo, "ci_high": hi}


def pair_metrics(
    p_good: Sequence[float],
    consistent: Sequence[bool | None],
    thresholds: Sequence[float] = (0.6, 0.7, 0.8, 0.9),
) -> dict[str, Any]:
    """Metrics for pair cases whose correct answer is the good response.

    ``p_good`` is the critic's soft preference for the good response; a case is correct when
    p_good > 0.5 (a tie is wrong: the judge did not choose). At threshold t a case is covered
    when max(p_good, 1 - p_good) >= t, and the covered cases' accuracy is what a pair filter
    at t would keep. ``consistent`` is None where it does not apply (the pointwise judge shows
    no order); consistency rates count only the cases where it applies (n=0: rate None)."""
    if len(p_good) != len(consistent):
        raise ValueError(f"{len(p_good)} preferences for {len(consistent)} consistency flags")
    if not p_good:
        raise ValueError("no pair results to score")
    n = len(p_good)
    correct = [p > 0.5 for p in p_good]
    applies = [(c, k) for c, k in zip(consistent, correct, strict=True) if c is not None]
    out: dict[str, Any] = {
        "accuracy": _rate(sum(correct), n),
        "position_consistency": _rate(sum(bool(c) for c, _ in applies), len(applies)),
        "consistent_and_correct": _rate(sum(bool(c) and k for c, k in applies), len(applies)),
        "mean_p_good": sum(p_good) / n,
        "at_threshold": {},
    }
    for t in thresholds:
        covered = [k for p, k in zip(p_good, correct, strict=True) if max(p, 1 - p) >= t]
        out["at_threshold"][f"{t:g}"] = {
            "coverage": len(covered) / n,
            "accuracy": _rate(sum(covered), len(covered)),
        }
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default): position q * (n - 1) in sorted order."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def soft_label_distribution(p_good: Sequence[float]) -> dict[str, Any]:
    """How confident the pair judge is: the soft label a pair would get, max(p, 1 - p) in
    [0.5, 1], summarised by quantiles and a 0.05-wide histogram. This is what a
    ``pair_confidence_threshold`` cuts."""
    from utils.soft_label_summary import histogram

    if not p_good:
        raise ValueError("no soft labels to summarise")
    conf = [max(p, 1.0 - p) for p in p_good]
    return {
        "n": len(conf),
        "mean": sum(conf) / len(conf),
        "quantiles": {
            name: quantile(conf, q)
            for name, q in (
                ("min", 0.0),
                ("p10", 0.1),
                ("p25", 0.25),
                ("p50", 0.5),
                ("p75", 0.75),
                ("p90", 0.9),
                ("max", 1.0),
            )
        },  # fmt: skip
        "histogram": histogram(conf),
    }


def choose_confidence_threshold(
    p_good: Sequence[float],
    grid: Sequence[float],
    min_accuracy: float = 0.75,
    min_covered: int = 5,
) -> dict[str, Any]:
    """The smallest threshold in ``grid`` whose covered cases (soft label >= t) are right at
    least ``min_accuracy`` of the time, with at least ``min_covered`` such cases, so that the
    kept pairs' labels are mostly right while keeping as many pairs as possible. Meant for
    DEV verdicts only. ``threshold`` is None when no grid value qualifies."""
    if not 0.5 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy must be in [0.5, 1], got {min_accuracy}")
    if not p_good:
        raise ValueError("no soft labels to choose a threshold from")
    table = []
    chosen = None
    for t in sorted(grid):
        if not 0.5 <= t <= 1.0:
            raise ValueError(f"threshold {t} outside [0.5, 1]")
        covered = [p > 0.5 for p in p_good if max(p, 1.0 - p) >= t and p != 0.5]
        acc = sum(covered) / len(covered) if covered else None
        ok = len(covered) >= min_covered and acc is not None and acc >= min_accuracy
        table.append({"threshold": t, "covered": len(covered), "accuracy": acc, "qualifies": ok})
        if ok and chosen is None:
            chosen = t
    return {
        "threshold": chosen,
        "rule": f"smallest t with accuracy >= {min_accuracy} on >= {min_covered} covered cases",
        "table": table,
    }


def best_threshold(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The threshold (predict positive when score >= t) with the best accuracy on these cases;
    among ties, the one closest to 0.5. Candidates: 0.5 and midpoints between sorted scores."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(
            f"need equally many scores and labels, got {len(scores)} and {len(labels)}"
        )
    s = sorted(set(scores))
    candidates = {0.5, s[0] - 1e-9, s[-1] + 1e-9}
    candidates.update((a + b) / 2 for a, b in zip(s, s[1:], strict=False))

    def acc(t: float) -> int:
        return sum((x >= t) == bool(y) for x, y in zip(scores, labels, strict=True))

    return max(sorted(candidates), key=lambda t: (acc(t), -abs(t - 0.5)))


def instruction_metrics(
    scores: Sequence[float], labels: Sequence[bool], threshold: float
) -> dict[str, Any]:
    """Accuracy (Wilson CI) at ``threshold``, per-class recall and AUC of the instruction judge."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(
            f"need equally many scores and labels, got {len(scores)} and {len(labels)}"
        )
    pred = [s >= threshold for s in scores]
    correct = [p == bool(y) for p, y in zip(pred, labels, strict=True)]
    pos = [c for c, y in zip(correct, labels, strict=True) if y]
    neg = [c for c, y in zip(correct, labels, strict=True) if not y]
    out = {
        "threshold": threshold,
        "accuracy": _rate(sum(correct), len(correct)),
        "recall_good": _rate(sum(pos), len(pos)),
        "recall_bad": _rate(sum(neg), len(neg)),
        "auc": roc_auc(scores, labels) if pos and neg else None,
    }
    return out


# --------------------------------------------------------------------------------------------
# Running the critic on the check set, choosing on dev, reporting on test.

REPORT_THRESHOLDS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)
THRESHOLD_GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def score_pair_cases(lm: Any, cases: Sequence[Mapping[str, Any]], cfg: Any) -> list[dict[str, Any]]:
    """The pair judge's verdict on each case, in the configured ``pair_mode``.

    Passed as (instruction, good, bad), so ``p_first`` is the preference for the good
    response: the pairwise judge asks both orders, the pointwise judge shows no order."""
    from utils.critic import compare_pairs

    res = compare_pairs(lm, [(c["instruction"], c["good"], c["bad"]) for c in cases], cfg)
    return [
        {"id": c["id"], "kind": c["kind"], "split": c["split"], **r}
        for c, r in zip(cases, res, strict=True)
    ]


def score_instruction_cases(
    lm: Any, cases: Sequence[Mapping[str, Any]], cfg: Any
) -> list[dict[str, Any]]:
    """The instruction judge's verdict on each case."""
    from utils.critic import judge_instructions

    res = judge_instructions(lm, [c["instruction"] for c in cases], cfg)
    return [
        {"id": c["id"], "kind": c["kind"], "split": c["split"], "label": c["label"], **r}
        for c, r in zip(cases, res, strict=True)
    ]


def pair_split_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pair metrics of one split's verdicts plus the soft-label distribution; ``mean_p_a``
    (0.5 = no position bias) for the pairwise judge, None for the pointwise one."""
    m = pair_metrics(
        [r["p_first"] for r in rows],
        [r["position_consistent"] for r in rows],
        REPORT_THRESHOLDS,
    )
    with_a = [r["p_a_mean"] for r in rows if "p_a_mean" in r]
    m["mean_p_a"] = sum(with_a) / len(with_a) if with_a else None
    m["soft_labels"] = soft_label_distribution([r["p_first"] for r in rows])
    return m


def instruction_judge_metrics(
    dev_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Dev (and, when given, test) metrics of the instruction judge with the threshold chosen
    on DEV only; ``test`` is None without test rows."""
    threshold = best_threshold([r["score"] for r in dev_rows], [r["label"] for r in dev_rows])
    out: dict[str, Any] = {"test": None}
    for split, rows in (("dev", dev_rows), ("test", test_rows)):
        if rows is not None:
            out[split] = instruction_metrics(
                [r["score"] for r in rows], [r["label"] for r in rows], threshold
            )
    return out


def choose_variant(dev_metrics: Mapping[Any, Mapping[str, Any]], judge: str) -> Any:
    """The variant to report, chosen on DEV metrics only. ``dev_metrics`` maps a variant key to
    its dev metrics (``pair_split_metrics`` for "pairs", ``instruction_metrics`` for
    "instructions"), listed cheapest first. Pairs: accuracy, then both-orders consistency
    (pairwise only), then mean P(good); instructions: AUC. Ties go to the first listed."""
    if judge == "pairs":

        def key(v: Any) -> tuple:
            m = dev_metrics[v]
            cons = m["position_consistency"]["rate"]
            return (m["accuracy"]["rate"], cons if cons is not None else 0.0,
                    m.get("mean_p_good", 0.0))  # fmt: skip

    elif judge == "instructions":

        def key(v: Any) -> tuple:
            return (dev_metrics[v]["auc"],)

    else:
        raise ValueError(f"judge must be 'pairs' or 'instructions', got {judge!r}")
    if not dev_metrics:
        raise ValueError("no variants to choose from")
    best = None
    for v in dev_metrics:  # strict > keeps the first (cheapest) among ties
        if best is None or key(v) > key(best):
            best = v
    return best


def per_kind_accuracy(rows: Sequence[Mapping[str, Any]], split: str) -> dict[str, dict]:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r in split_cases(rows, split):
        by_kind[r["kind"]].append(r["p_first"] > 0.5)
    return {k: _rate(sum(v), len(v)) for k, v in sorted(by_kind.items())}
