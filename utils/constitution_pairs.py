"""From a judged critique-and-revision record to its CAI pair (pure): the two-order soft label,
the label decision, the drop filters (leaks, empty, truncated, identical), the pair record and
the manifest counts; and the resume of an output directory (``records.jsonl``,
``pairs.jsonl``), shared with the contrastive path."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.completion_prompts import find_chat_markup, find_scaffolding
from utils.constitution_config import STEPS, CAIConfig
from utils.constitution_prompts import CAI_MARKERS
from utils.jsonl_io import JsonlError, resume
from utils.pair_selection import exclusion_reasons
from utils.preference_math import soft_preference
from utils.response_format import format_completion, format_prompt
from utils.soft_label_summary import histogram

DROP_REASONS = (
    "original_empty", "original_leaked", "original_truncated",
    "critique_empty", "critique_leaked",
    "revision_empty", "revision_leaked", "revision_truncated", "revision_identical",
    "position_inconsistent", "label_near_half",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Soft labels and filtering (pure).


def ab_soft_label(
    logp_revision_a: Sequence[float], logp_revision_b: Sequence[float]
) -> dict[str, Any]:
    """Order-averaged P(prefer revision) from the raw (log P(" A"), log P(" B")) of both
    orders: ``logp_revision_a`` with the revision shown as A, ``logp_revision_b`` with it shown
    as B. Each order's probability is normalised over the two answer tokens:

        p_revision = 0.5 * (P_revA(A) + P_revB(B)),  P(y) = exp(l_y) / (exp(l_A) + exp(l_B))

    ``position_consistent``: both orders prefer the same response. ``margin_nats``: the
    log-odds of "revision is better", averaged over the orders. Uses
    ``utils.preference_math.soft_preference`` with the revision as its "first" response."""
    if len(logp_revision_a) != 2 or len(logp_revision_b) != 2:
        raise ValueError("each order needs exactly (log P(' A'), log P(' B'))")
    pref = soft_preference(
        (float(logp_revision_a[0]), float(logp_revision_a[1])),
        (float(logp_revision_b[0]), float(logp_revision_b[1])),
    )
    return {
        "p_revision": pref["p_first"],
        "p_revision_when_a": pref["p_first_order_ab"],
        "p_revision_when_b": pref["p_first_order_ba"],
        "position_consistent": pref["position_consistent"],
        "p_a_mean": pref["p_a_mean"],
        "margin_nats": pref["margin_nats"],
        "revision_a": pref["order_ab"],  # raw log-probs, revision shown as A
        "revision_b": pref["order_ba"],  # raw log-probs, revision shown as B
        "answer_mass_revision_a": pref["answer_mass_ab"],
        "answer_mass_revision_b": pref["answer_mass_ba"],
    }


def label_decision(
    p_revision: float, position_consistent: bool | None, cfg: CAIConfig
) -> dict[str, Any]:
    """chosen side, soft_label = P(chosen better) in [0.5, 1], margin = 2 * soft_label - 1 and
    the drop reason (None = kept): ``label_near_half`` when soft_label < 0.5 + label_margin or
    exactly 0.5 (a tie prefers nothing), then ``position_inconsistent`` when required."""
    if not 0.0 <= p_revision <= 1.0 or math.isnan(p_revision):
        raise ValueError(f"p_revision must be a probability, got {p_revision}")
    chosen = "revision" if p_revision >= 0.5 else "original"
    soft = p_revision if chosen == "revision" else 1.0 - p_revision
    if soft <= 0.5 or soft < 0.5 + cfg.label_margin:
        reason = "label_near_half"
    elif cfg.require_position_consistent and position_consistent is False:
        reason = "position_inconsistent"
    else:
        reason = None
    return {
        "chosen": chosen,
        "soft_label": soft,
        "margin": 2.0 * soft - 1.0,
        "drop_reason": reason,
    }


def find_leak(text: str, forbidden: Sequence[str] = ()) -> str | None:
    """What leaked into a response text, or None: one of ``forbidden`` (the tokenizer's
    chat-control and EOS strings), chat markup, format scaffolding ("Instruction:",
    "Response:", role labels) or one of this stage's own headers ("Critique:" ...)."""
    for s in forbidden:
        if s and s in text:
            return s
    found = find_chat_markup(text) or find_scaffolding(text)
    if found:
        return found
    low = text.lower()
    return next((m for m in CAI_MARKERS if m.lower() in low), None)


def response_problem(
    text: str, stop_reason: str, forbidden: Sequence[str], exclude_truncated: bool
) -> tuple[str | None, str | None]:
    """(drop reason, leaked string) for the policy's original response; (None, None) = usable."""
    if not text.strip():
        return "original_empty", None
    leak = find_leak(text, forbidden)
    if leak:
        return "original_leaked", leak
    if exclude_truncated and stop_reason == "max_new_tokens":
        return "original_truncated", None
    return None, None


def critique_problem(text: str, forbidden: Sequence[str]) -> tuple[str | None, str | None]:
    """A critique is never trained on, but it is fed back to the model: it must be non-empty
    and free of control tokens and chat markup."""
    if not text.strip():
        return "critique_empty", None
    leak = next((s for s in forbidden if s and s in text), None) or find_chat_markup(text)
    return ("critique_leaked", leak) if leak else (None, None)


def revision_problem(
    original: str, revision: str, stop_reason: str, forbidden: Sequence[str],
    exclude_truncated: bool,
) -> tuple[str | None, str | None]:  # fmt: skip
    """(drop reason, leaked string) for a revision, checked in this order: empty, leaked
    (``find_leak``), cut by max_new_tokens (when excluded), identical to the original after
    whitespace normalisation. The empty/identical/truncated notions are the pairs stage's
    (``utils.pair_selection.exclusion_reasons``, with the original as the earlier text)."""
    base = exclusion_reasons(
        [original, revision], ["eos", stop_reason], tuple(forbidden), exclude_truncated
    )[1]
    if base == "empty":
        return "revision_empty", None
    leak = find_leak(revision, forbidden)
    if leak:
        return "revision_leaked", leak
    if base == "truncated":
        return "revision_truncated", None
    if base == "duplicate":
        return "revision_identical", None
    return None, None


def pair_id(record_id: Any) -> str:
    return f"{record_id}:cai"


def pair_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The kept pair of one stage record as a pairs.jsonl record (``utils.dpo.load_pairs``
    form), or None when the record was dropped. Pure: used again on resume."""
    if not record["kept"]:
        return None
    original, revision = record["response"]["text"], record["revision"]["text"]
    label, judge = record["label"], record["judge"]
    chosen, rejected = (revision, original) if label["chosen"] == "revision" else (
        original, revision
    )  # fmt: skip
    return {
        "id": pair_id(record["id"]),
        "instruction_id": record["id"],
        "instruction": record["instruction"],
        "type": record.get("type"),
        "prompt": format_prompt(record["instruction"]),
        "chosen": format_completion(chosen),
        "rejected": format_completion(rejected),
        "soft_label": label["soft_label"],
        "margin": label["margin"],
        "chosen_side": label["chosen"],
        "principle_id": record["principle"]["id"],
        "critique": record["critique"]["text"],
        "policy": record["policy"],
        "judge": {
            **{k: v for k, v in judge.items() if not k.startswith("prompt")},
            **record["prompt_id"],
        },
    }


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for the manifest: instructions, kept, dropped by reason (every reason listed),
    chosen side, principles drawn/kept, stop reasons per step, position consistency, mean
    P(prefer revision) and the label histograms of kept and of all judged records."""
    dropped: Counter[str] = Counter()
    chosen: Counter[str] = Counter()
    drawn: Counter[str] = Counter()
    kept_by_principle: Counter[str] = Counter()
    stops: dict[str, Counter[str]] = {s: Counter() for s in STEPS}
    kept_labels, judged_labels, p_revs = [], [], []
    n_consistent = n_judged = 0
    for r in records:
        drawn[r["principle"]["id"]] += 1
        for step in STEPS:
            if r.get(step):
                stops[step][r[step]["stop_reason"]] += 1
        if r.get("judge"):
            n_judged += 1
            n_consistent += r["judge"]["position_consistent"] is True
            p_revs.append(r["judge"]["p_revision"])
            judged_labels.append(r["label"]["soft_label"])
        if r["kept"]:
            kept_labels.append(r["label"]["soft_label"])
            chosen[r["label"]["chosen"]] += 1
            kept_by_principle[r["principle"]["id"]] += 1
        else:
            dropped[r["drop_reason"]] += 1
    return {
        "instructions": len(records),
        "pairs_kept": len(kept_labels),
        "pairs_dropped": {k: dropped.get(k, 0) for k in DROP_REASONS},
        "chosen_side": {k: chosen.get(k, 0) for k in ("revision", "original")},
        "judged": n_judged,
        "judge_prompts": 2 * n_judged,
        "position_consistent_rate": n_consistent / n_judged if n_judged else None,
        "p_revision_mean": sum(p_revs) / len(p_revs) if p_revs else None,
        "principles_drawn": dict(sorted(drawn.items())),
        "principles_kept": dict(sorted(kept_by_principle.items())),
        "stop_reasons": {s: dict(c) for s, c in stops.items()},
        "soft_label_histogram_kept": histogram(kept_labels),
        "soft_label_histogram_judged": histogram(judged_labels),
    }


def _policy_key(policy: Mapping[str, Any]) -> tuple[Any, Any]:
    return policy.get("name"), policy.get("adapter_sha256")


def resume_outputs(
    out_dir: str | Path, prompt_id: Mapping[str, Any], policy: Mapping[str, Any],
    make_pair: Callable[[Mapping[str, Any]], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Read what ``out_dir`` already holds, repairing a torn last line in either file.

    Refuses (``JsonlError``) pairs without a record (another writer), and records made with
    another prompt id (constitution texts, shots, layout) or another policy: labels from two
    set-ups must not be mixed. Returns the records, the written pairs, the pairs missing for
    finished records (a kill between the two writes) and the torn-line counts. ``make_pair``
    builds a record's pair (default ``pair_record``; the contrastive stage passes its own)."""
    out_dir = Path(out_dir)
    r_path, p_path = out_dir / "records.jsonl", out_dir / "pairs.jsonl"
    done, torn_r = resume(r_path, key="id")
    written, torn_p = resume(p_path, key="id")
    done_ids = {r["id"] for r in done}
    stray = sorted({str(p.get("instruction_id")) for p in written} - {str(i) for i in done_ids})
    if stray:
        raise JsonlError(
            p_path, 0, f"pairs for instructions with no record: {stray[:5]}; the output "
            "directory was written by something else",
        )  # fmt: skip
    want = prompt_id["cai_prompt_id"]
    for n, r in enumerate(done, start=1):
        theirs = (r.get("prompt_id") or {}).get("cai_prompt_id")
        if theirs != want:
            raise JsonlError(
                r_path, n, f"record {r['id']!r} was made with prompts {theirs!r}, not the "
                f"configured {want!r} (constitution or shots changed); labels from two "
                "constitutions must not be mixed: write to a new output directory",
                "prompt_id",
            )  # fmt: skip
        if _policy_key(r.get("policy") or {}) != _policy_key(policy):
            raise JsonlError(
                r_path, n, f"record {r['id']!r} has responses from policy "
                f"{_policy_key(r.get('policy') or {})}, not the configured "
                f"{_policy_key(policy)}: write to a new output directory", "policy",
            )  # fmt: skip
    written_ids = {p["id"] for p in written}
    make_pair = make_pair or pair_record
    missing = [p for r in done if (p := make_pair(r)) is not None and p["id"] not in written_ids]
    return {
        "records": done,
        "pairs": written,
        "missing_pairs": missing,
        "torn_lines_repaired": {"records": torn_r, "pairs": torn_p},
    }
