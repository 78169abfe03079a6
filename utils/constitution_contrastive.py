"""Contrastive principle pairs for the constitutional stage (RLCD, arXiv 2307.12950).

The critique-and-revision path (``utils/constitution.py``, ``cai.mode: revise``) needs the
base model to judge its own revisions; on a 270M model that A/B judge is at chance and no pair
is kept. RLCD builds each pair from two prompts instead, one that follows a principle and one
that violates it, so the better answer is known by construction and the scores only filter.

For every training instruction (``stage1/constrained.jsonl`` records: id, instruction, type,
optionally instruction_ids/kwargs) and its principle (``sample_principle``, as in revise):

1. **Evaluation guard.** An instruction within Jaccard ``EVAL_LEAK_THRESHOLD`` (char 5-grams,
   ``utils.dedup.leakage_check``) of an evaluation prompt (``build_eval_set()``) is dropped
   (``eval_leak``) before anything is generated.
2. **Answers.** The POLICY (adapter active; base weights for ``policy: base``) answers
   ``context + "\\n\\n" + format_prompt(instruction)`` once with the principle's
   ``follow_context`` and once with its ``violate_context``: one batched ``generate`` call with
   the ``cai`` response decoding (``response_max_new_tokens``, ``response_temperature``,
   ``top_p``, seed ``cai.seed``; the noise of a row is seeded by (seed, prompt), so the two
   sides draw different noise). The pair stores the answers only, under the prompt
   ``format_prompt(instruction)`` the model sees at inference: no context text.
3. **Filters**, per side (follow first): empty, leaked (``utils.constitution_pairs.find_leak``:
   control/EOS strings, chat markup, format headers, role labels such as "Assistant:", this
   stage's headers; or ``CONTEXT_ECHO_WORDS`` consecutive words of either context repeated),
   truncated (``cai.exclude_truncated``); then identical answers (whitespace-normalised).
4. **Likelihood label** (BASE weights, ``base_only``). For an answer r,

       g(r) = [log P(r | S + "\\n\\n" + format_prompt(i)) - log P(r | format_prompt(i))] / n(r)

   with r scored as ``utils.critic_prompts.pmi_completion(r)`` (the answer, then the end-of-response
   marker) by ``utils.scoring.completion_logprobs``, n(r) its tokens, S the principle's
   ``revision_request`` (``cai.contrastive_score_text``; ``follow_context`` is allowed, but
   the follow answer was sampled after it, so it favours that side by construction). Then
   p_llh = sigmoid((g(follow) - g(violate)) / T), T = ``cai.contrastive_temperature``. With the
   default T = 1 (the pmi pair judge's scale, nats per token) and gains of a few hundredths of
   a nat, p_llh stays near 0.5: its SIGN is what decides a drop, T only scales the margin.
5. **Program checkers** for three principles: ``follow_constraints`` (fraction of the record's
   constraints passed, ``evaluate_strict``), ``complete_ending`` (ends with ". ! ?", closing
   quotes/brackets allowed, and not cut by max_new_tokens) and ``concise`` (fewer words). When
   the checker prefers a side, p_check = ``cai.contrastive_checker_p`` (follow) or 1 - it
   (violate) and p = (p_check + p_llh) / 2; when it ties or does not apply (another principle,
   a record without constraints), p = p_llh. With p_check = 0.9 and p_llh near 0.5 a checker
   that disagrees with the construction drops the pair: the program outvotes the likelihood.
6. **Pair.** chosen = follow, rejected = violate, soft_label = p, margin = 2p - 1. Dropped and
   counted: p < 0.5 (``label_contradicts``) and p = 0.5 (``label_tie``).

Files (``records.jsonl`` first, then ``pairs.jsonl``), resume and refusals are the revise
path's (``utils.constitution_pairs.resume_outputs`` with this module's ``pair_record``); the prompt id
(``contrastive_prompt_id``) differs from every revise id, so neither path resumes the other's
records. ``run_cai`` dispatches on ``cai.mode``; ``both`` writes ``revise/`` and
``contrastive/`` sub-directories and their pairs together into ``<out>/pairs.jsonl``.
Everything except ``process_chunk``/``run_contrastive``/``run_cai`` is pure Python.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.constitution import (
    _decoding,
    _generation_record,
    forbidden_strings,
    run_constitution,
)
from utils.constitution_config import CAIConfig
from utils.constitution_pairs import find_leak, resume_outputs
from utils.constitution_prompts import Constitution, Principle, sample_principle
from utils.critic import base_only
from utils.critic_prompts import pmi_completion
from utils.instruction_checkers import count_words
from utils.jsonl_io import JsonlAppender, read_jsonl, write_jsonl_atomic
from utils.preference_math import sigmoid
from utils.provenance import config_hash
from utils.response_format import (
    EXAMPLE_SEPARATOR,
    RESPONSE_STOP_STRINGS,
    format_completion,
    format_prompt,
)
from utils.soft_label_summary import histogram, print_summary_table
from utils.verifiable_checks import evaluate_strict

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel

# Bump when the prompt layout, the score or the label rule below changes.
CONTRASTIVE_PROMPT_VERSION = "rlcd-v1"
SIDES = ("follow", "violate")
CONTEXT_ECHO_WORDS = 6  # an answer repeating this many consecutive context words leaks it
EVAL_LEAK_THRESHOLD = 0.7  # Jaccard of char 5-grams, as the evaluation's leakage check
CHECKED_PRINCIPLES = ("follow_constraints", "complete_ending", "concise")
DROP_REASONS = (
    "eval_leak",
    "follow_empty", "follow_leaked", "follow_truncated",
    "violate_empty", "violate_leaked", "violate_truncated",
    "answers_identical", "label_tie", "label_contradicts",
)  # fmt: skip
_FINAL = (".", "?", "!")
_CLOSERS = "\"')]\u201d\u2019"
_WORD = re.compile(r"[a-z0-9']+")


# --------------------------------------------------------------------------------------------
# Prompts and filters (pure).


def context_prompt(context: str, instruction: str) -> str:
    """What the policy answers: the context, a blank line, then the project's one format."""
    context = context.strip()
    if not context:
        raise ValueError("context is empty")
    return context + EXAMPLE_SEPARATOR + format_prompt(instruction)


def score_text(principle: Principle, cfg: CAIConfig) -> str:
    """The principle text S of the likelihood gain (``cai.contrastive_score_text``)."""
    return getattr(principle, cfg.contrastive_score_text)


def gain_rows(items: Sequence[tuple[str, str, Sequence[str]]]) -> tuple[list[str], list[str]]:
    """(prefixes, completions) for (principle text, instruction, answers) items: each answer
    after the principle text, then after the bare prompt (g in the module doc)."""
    prefixes, completions = [], []
    for principle_text, instruction, answers in items:
        null = format_prompt(instruction)
        for text in answers:
            prefixes += [principle_text + EXAMPLE_SEPARATOR + null, null]
            completions += [pmi_completion(text)] * 2
    return prefixes, completions


def context_echo(text: str, contexts: Sequence[str], n: int = CONTEXT_ECHO_WORDS) -> str | None:
    """The first run of ``n`` consecutive words (case and punctuation ignored) of one of
    ``contexts`` that ``text`` repeats, or None. A context shorter than ``n`` words counts only
    when repeated whole."""
    words = " " + " ".join(_WORD.findall(text.lower())) + " "
    for context in contexts:
        cw = _WORD.findall(context.lower())
        for k in range(max(1, len(cw) - n + 1)):
            run = " ".join(cw[k : k + n])
            if run and f" {run} " in words:
                return run
    return None


def answer_problem(
    side: str, text: str, stop_reason: str, forbidden: Sequence[str], contexts: Sequence[str],
    exclude_truncated: bool,
) -> tuple[str | None, str | None]:  # fmt: skip
    """(drop reason, leaked string) for one side's answer; (None, None) = usable."""
    if not text.strip():
        return f"{side}_empty", None
    leak = find_leak(text, forbidden) or context_echo(text, contexts)
    if leak:
        return f"{side}_leaked", leak
    if exclude_truncated and stop_reason == "max_new_tokens":
        return f"{side}_truncated", None
    return None, None


def ends_complete(text: str, stop_reason: str) -> bool:
    """Sentence-final punctuation (closing quotes/brackets may follow) and not cut off."""
    return stop_reason != "max_new_tokens" and text.rstrip().rstrip(_CLOSERS).endswith(_FINAL)


def checker_verdict(
    principle_id: str, record: Mapping[str, Any], follow: Mapping[str, Any],
    violate: Mapping[str, Any],
) -> dict[str, Any] | None:  # fmt: skip
    """The program checker's scores for the two sides (``follow``/``violate``: generation
    records with ``text`` and ``stop_reason``) and the side it prefers (None on a tie), or None
    when no checker applies (another principle, or a record without constraints)."""
    if principle_id == "follow_constraints":
        ids, kwargs = record.get("instruction_ids") or [], record.get("kwargs") or []
        if not ids:
            return None
        scores = [sum(r) / len(r) for r in (evaluate_strict(ids, kwargs, s["text"])
                                            for s in (follow, violate))]  # fmt: skip
        higher_is_better = True
    elif principle_id == "complete_ending":
        scores = [float(ends_complete(s["text"], s["stop_reason"])) for s in (follow, violate)]
        higher_is_better = True
    elif principle_id == "concise":
        scores = [float(count_words(s["text"])) for s in (follow, violate)]
        higher_is_better = False
    else:
        return None
    f, v = scores
    better = f > v if higher_is_better else f < v
    worse = f < v if higher_is_better else f > v
    prefers = "follow" if better else "violate" if worse else None
    return {"name": principle_id, "follow": f, "violate": v, "prefers": prefers}


def contrastive_label(
    g_follow: float, g_violate: float, prefers: str | None, cfg: CAIConfig
) -> dict[str, Any]:
    """p = P(follow answer better) from the likelihood gains and the checker's preferred side
    (None: no checker or a tie), with the drop reason (None = kept). See the module doc."""
    p_llh = sigmoid((g_follow - g_violate) / cfg.contrastive_temperature)
    if prefers not in (None, *SIDES):
        raise ValueError(f"prefers must be None or one of {SIDES}, got {prefers!r}")
    p_check = None
    if prefers is not None:
        q = cfg.contrastive_checker_p
        p_check = q if prefers == "follow" else 1.0 - q
    p = p_llh if p_check is None else 0.5 * (p_check + p_llh)
    reason = "label_contradicts" if p < 0.5 else "label_tie" if p == 0.5 else None
    return {
        "p_llh": p_llh,
        "p_check": p_check,
        "soft_label": p,
        "margin": 2.0 * p - 1.0,
        "chosen": "follow",
        "drop_reason": reason,
    }


def contrastive_prompt_id(constitution: Constitution, cfg: CAIConfig) -> dict[str, Any]:
    """Which documents and label rule made a record (constitution content, score text,
    temperature, checker vote, layout). A resume with another id is refused; the
    ``cai_prompt_id`` never equals a revise-path id (another layout version)."""
    settings = {
        "score_text": cfg.contrastive_score_text,
        "temperature": cfg.contrastive_temperature,
        "checker_p": cfg.contrastive_checker_p,
    }
    sha = config_hash(
        {
            "layout": CONTRASTIVE_PROMPT_VERSION,
            "constitution": constitution.content(),
            **settings,
            "stops": list(RESPONSE_STOP_STRINGS),
            "echo_words": CONTEXT_ECHO_WORDS,
            "checked": list(CHECKED_PRINCIPLES),
        }
    )
    return {
        "prompt_version": CONTRASTIVE_PROMPT_VERSION,
        "constitution_version": constitution.version,
        "constitution_sha256": constitution.sha256,
        **settings,
        "prompt_sha256": sha,
        "cai_prompt_id": (
            f"{CONTRASTIVE_PROMPT_VERSION}/{constitution.version}/{cfg.contrastive_score_text}/"
            f"{sha[:12]}"
        ),
    }


@functools.cache
def _eval_prompts() -> tuple[str, ...]:
    from utils.eval_prompts import build_eval_set

    return tuple(r["prompt"] for r in build_eval_set())


def eval_leaks(
    instructions: Sequence[str], threshold: float = EVAL_LEAK_THRESHOLD
) -> dict[int, tuple[str, float]]:
    """index -> (evaluation prompt, Jaccard) for each instruction near-duplicating a prompt of
    ``utils.eval_prompts.build_eval_set()`` (the default evaluation set)."""
    from utils.dedup import leakage_check

    if not instructions:
        return {}
    rep = leakage_check(
        list(_eval_prompts()), list(instructions), threshold, max_examples=len(instructions)
    )
    best = {text: (match, sim) for text, match, sim in rep.examples}
    return {k: best[instructions[k]] for k in rep.leaked_test_indices}


def pair_id(record_id: Any) -> str:
    return f"{record_id}:rlcd"


def pair_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The kept pair of one record in ``utils.dpo.load_pairs`` form (the revise path's fields:
    prompt = format_prompt(instruction), chosen = the follow answer, rejected = the violate
    answer, soft_label, margin ...), or None when the record was dropped. Pure."""
    if not record["kept"]:
        return None
    label, scores = record["label"], record["scores"]
    return {
        "id": pair_id(record["id"]),
        "instruction_id": record["id"],
        "instruction": record["instruction"],
        "type": record.get("type"),
        "prompt": format_prompt(record["instruction"]),
        "chosen": format_completion(record["follow"]["text"]),
        "rejected": format_completion(record["violate"]["text"]),
        "soft_label": label["soft_label"],
        "margin": label["margin"],
        "chosen_side": "follow",
        "principle_id": record["principle"]["id"],
        "method": "contrastive",
        "policy": record["policy"],
        "judge": {
            "p_llh": label["p_llh"],
            "p_check": label["p_check"],
            "g_follow": scores["follow"]["pmi_nats_per_token"],
            "g_violate": scores["violate"]["pmi_nats_per_token"],
            "checker": scores["checker"],
            **record["prompt_id"],
        },
    }


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for the manifest: instructions, scored, kept, dropped by reason (every reason
    listed), principles drawn/kept, stop reasons per side, checker agreement with the
    construction, the share of scored pairs whose likelihood gain favours the follow answer,
    and the label histograms (kept: [0.5, 1]; scored: [0, 1])."""
    dropped: Counter[str] = Counter()
    drawn: Counter[str] = Counter()
    kept_by: Counter[str] = Counter()
    stops: dict[str, Counter[str]] = {s: Counter() for s in SIDES}
    checker: dict[str, Counter[str]] = {}
    kept, scored, n_llh_follow = [], [], 0
    for r in records:
        drawn[r["principle"]["id"]] += 1
        for side in SIDES:
            if r.get(side):
                stops[side][r[side]["stop_reason"]] += 1
        if r.get("label"):
            scored.append(r["label"]["soft_label"])
            n_llh_follow += r["label"]["p_llh"] > 0.5
            c = r["scores"]["checker"]
            if c is not None:
                verdict = {"follow": "agrees", "violate": "disagrees", None: "ties"}[c["prefers"]]
                checker.setdefault(c["name"], Counter())[verdict] += 1
        if r["kept"]:
            kept.append(r["label"]["soft_label"])
            kept_by[r["principle"]["id"]] += 1
        else:
            dropped[r["drop_reason"]] += 1
    return {
        "instructions": len(records),
        "scored": len(scored),
        "pairs_kept": len(kept),
        "pairs_dropped": {k: dropped.get(k, 0) for k in DROP_REASONS},
        "llh_prefers_follow_rate": n_llh_follow / len(scored) if scored else None,
        "checker": {k: dict(v) for k, v in sorted(checker.items())},
        "principles_drawn": dict(sorted(drawn.items())),
        "principles_kept": dict(sorted(kept_by.items())),
        "stop_reasons": {s: dict(c) for s, c in stops.items()},
        "soft_label_histogram_kept": histogram(kept),
        "soft_label_histogram_scored": histogram(scored, lo=0.0, hi=1.0),
    }


def print_contrastive_summary(summary: Mapping[str, Any], out_dir: str | Path) -> None:
    c, t = summary["counts"], summary["timings"]
    rate = c["llh_prefers_follow_rate"]
    rows = [
        ("instructions", c["instructions"]),
        ("  scored (both answers usable)", c["scored"]),
        ("pairs kept", c["pairs_kept"]),
        *((f"  dropped: {k}", v) for k, v in c["pairs_dropped"].items()),
        ("likelihood gain favours follow", "n/a" if rate is None else f"{rate:.3f}"),
        *((f"checker {k}", ", ".join(f"{v} {n}" for v, n in sorted(d.items())))
          for k, d in c["checker"].items()),
        ("resumed / new instructions",
         f"{summary['resume']['instructions_already_done']} / "
         f"{summary['resume']['instructions_new']}"),
        ("answer / score s", f"{t['answer_s']} / {t['score_s']}"),
    ]  # fmt: skip
    print_summary_table("CAI contrastive pairs summary", rows, c["soft_label_histogram_kept"])
    print(f"\nwrote {Path(out_dir) / 'pairs.jsonl'}")


# --------------------------------------------------------------------------------------------
# Model side.


def process_chunk(
    lm: LoadedModel,
    chunk: Sequence[Mapping[str, Any]],
    cfg: CAIConfig,
    constitution: Constitution,
    policy: Mapping[str, Any],
    prompt_id: Mapping[str, Any],
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One record per instruction: the eval guard, both answers (policy), the filters, then
    the likelihood gains (base weights) and the label for the pairs still usable."""
    from utils.generation import generate
    from utils.scoring import completion_logprobs

    timings = timings if timings is not None else {}
    forbidden = forbidden_strings(lm)
    leaks = eval_leaks([r["instruction"] for r in chunk])
    records: list[dict[str, Any]] = []
    for k, rec in enumerate(chunk):
        p = sample_principle(constitution, cfg.seed, rec["id"])
        r = {
            "id": rec["id"], "instruction": rec["instruction"], "type": rec.get("type"),
            "instruction_ids": list(rec.get("instruction_ids") or []),
            "kwargs": list(rec.get("kwargs") or []),
            "principle": {"id": p.id, "seed": cfg.seed}, "policy": dict(policy),
            "prompt_id": dict(prompt_id), "method": "contrastive",
            "follow": None, "violate": None, "scores": None, "label": None,
            "kept": False, "drop_reason": None, "leak": None,
        }  # fmt: skip
        if k in leaks:
            r["drop_reason"], r["leak"] = "eval_leak", leaks[k][0]
        records.append(r)

    def principle_of(r: Mapping[str, Any]) -> Principle:
        return constitution.principle(r["principle"]["id"])

    alive = [r for r in records if r["drop_reason"] is None]
    if policy["name"] == "base":
        policy_ctx: Any = base_only(lm)
    else:
        if not lm.adapters:
            raise ValueError(f"policy {policy['name']!r} needs its adapter attached")
        policy_ctx = contextlib.nullcontext()
    prompts = [
        context_prompt(getattr(principle_of(r), f"{side}_context"), r["instruction"])
        for r in alive
        for side in SIDES
    ]
    t0 = time.perf_counter()
    with policy_ctx:
        gens = generate(
            lm, prompts, _decoding(cfg, "response", RESPONSE_STOP_STRINGS), seed=cfg.seed,
            progress=progress, desc="cai:contrastive",
        )  # fmt: skip
    timings["answer_s"] = timings.get("answer_s", 0.0) + time.perf_counter() - t0
    for j, r in enumerate(alive):
        p = principle_of(r)
        contexts = (p.follow_context, p.violate_context)
        for s, side in enumerate(SIDES):
            g = gens[2 * j + s]
            r[side] = _generation_record(prompts[2 * j + s], g, RESPONSE_STOP_STRINGS)
            if r["drop_reason"] is None:
                r["drop_reason"], r["leak"] = answer_problem(
                    side, r[side]["text"], g.stop_reason, forbidden, contexts,
                    cfg.exclude_truncated,
                )  # fmt: skip
        if r["drop_reason"] is None and (
            " ".join(r["follow"]["text"].split()) == " ".join(r["violate"]["text"].split())
        ):
            r["drop_reason"] = "answers_identical"
    # The likelihood gains: four scorings per pair, one batched call on the base weights.
    alive = [r for r in records if r["drop_reason"] is None]
    if not alive:
        return records
    prefixes, completions = gain_rows([(score_text(principle_of(r), cfg), r["instruction"],
                                        [r[side]["text"] for side in SIDES]) for r in alive])  # fmt: skip
    t0 = time.perf_counter()
    with base_only(lm):
        scored = completion_logprobs(lm, prefixes, completions, batch_size=cfg.judge_batch_size)
    timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t0
    for j, r in enumerate(alive):
        sides = {}
        for s, side in enumerate(SIDES):
            (lp_c, n_tok), (lp_n, _) = scored[4 * j + 2 * s], scored[4 * j + 2 * s + 1]
            sides[side] = {
                "pmi_nats_per_token": (lp_c - lp_n) / n_tok,
                "logp_conditional": lp_c,
                "logp_null": lp_n,
                "n_tokens": n_tok,
            }
        check = checker_verdict(r["principle"]["id"], r, r["follow"], r["violate"])
        r["scores"] = {
            "score_text": cfg.contrastive_score_text,
            "score_prefix": prefixes[4 * j],
            "null_prefix": prefixes[4 * j + 1],
            **sides,
            "checker": check,
        }
        r["label"] = contrastive_label(
            sides["follow"]["pmi_nats_per_token"], sides["violate"]["pmi_nats_per_token"],
            None if check is None else check["prefers"], cfg,
        )  # fmt: skip
        r["drop_reason"] = r["label"]["drop_reason"]
        r["kept"] = r["drop_reason"] is None
    return records


def _policy(policy: Mapping[str, Any] | None) -> dict[str, Any]:
    policy = dict(policy or {"name": "base"})
    if policy.get("name") not in ("base", "sft", "dpo"):
        raise ValueError(f"policy name must be base, sft or dpo, got {policy.get('name')!r}")
    adapter = policy.get("adapter")
    return {
        "name": policy["name"],
        "adapter": None if adapter is None else str(adapter),
        "adapter_sha256": policy.get("adapter_sha256"),
    }


def run_contrastive(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: CAIConfig,
    constitution: Constitution,
    out_dir: str | Path,
    policy: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Contrastive pairs for ``records`` into ``out_dir`` ({records,pairs}.jsonl), resuming what
    it holds (a torn line repaired, a pair lost between the two writes rebuilt, finished
    instructions skipped, another prompt id or policy refused). ``policy`` as in
    ``run_constitution``. Returns counts over the whole output, prompt id, resume, timings."""
    policy = _policy(policy)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.max_instructions is not None:
        records = list(records)[: cfg.max_instructions]
    prompt_id = contrastive_prompt_id(constitution, cfg)
    state = resume_outputs(out_dir, prompt_id, policy, make_pair=pair_record)
    done_ids = {r["id"] for r in state["records"]}
    timings = {"answer_s": 0.0, "score_s": 0.0}
    pending = [r for r in records if r["id"] not in done_ids]
    r_path, p_path = out_dir / "records.jsonl", out_dir / "pairs.jsonl"
    with JsonlAppender(r_path) as rw, JsonlAppender(p_path) as pw:
        pw.write_many(state["missing_pairs"])
        step = cfg.instructions_per_chunk
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            for rec in process_chunk(
                lm, chunk, cfg, constitution, policy, prompt_id, progress, timings
            ):
                rw.write(rec)  # the record first: it is what resume trusts
                pair = pair_record(rec)
                if pair is not None:
                    pw.write(pair)
    return {
        "counts": summarize_records(read_jsonl(r_path)),
        "prompt_id": prompt_id,
        "resume": {
            "instructions_already_done": len(done_ids),
            "instructions_new": len(pending),
            "torn_lines_repaired": state["torn_lines_repaired"],
            "pairs_rebuilt_from_records": len(state["missing_pairs"]),
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def run_cai(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: CAIConfig,
    constitution: Constitution,
    out_dir: str | Path,
    policy: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The CAI pairs stage for ``cai.mode``: ``revise`` (``run_constitution``) or
    ``contrastive`` into ``out_dir``; ``both`` into ``out_dir/revise`` and
    ``out_dir/contrastive``, then every pair of both into ``out_dir/pairs.jsonl`` (rewritten
    whole; pair ids end in ":cai" / ":rlcd"). A directory laid out for another mode is
    refused. The summary has ``mode`` and ``counts`` (pairs_kept, pairs_dropped) either way."""
    out_dir = Path(out_dir)
    subdirs = [d for d in ("revise", "contrastive") if (out_dir / d).exists()]
    if cfg.mode != "both" and subdirs:
        raise ValueError(
            f"{out_dir}: holds {subdirs} from a cai.mode=both run, but cai.mode is "
            f"{cfg.mode!r}: write to a new output directory"
        )
    if cfg.mode == "revise":
        return {"mode": "revise", **run_constitution(
            lm, records, cfg, constitution, out_dir, policy, progress)}  # fmt: skip
    if cfg.mode == "contrastive":
        return {"mode": "contrastive", **run_contrastive(
            lm, records, cfg, constitution, out_dir, policy, progress)}  # fmt: skip
    if (out_dir / "records.jsonl").exists():
        raise ValueError(
            f"{out_dir / 'records.jsonl'}: written by a single-mode run, but cai.mode is "
            "'both': write to a new output directory"
        )
    rev = run_constitution(lm, records, cfg, constitution, out_dir / "revise", policy, progress)
    con = run_contrastive(lm, records, cfg, constitution, out_dir / "contrastive", policy,
                          progress)  # fmt: skip
    pairs = [*read_jsonl(out_dir / "revise" / "pairs.jsonl"),
             *read_jsonl(out_dir / "contrastive" / "pairs.jsonl")]  # fmt: skip
    write_jsonl_atomic(out_dir / "pairs.jsonl", pairs)
    counts = {
        "instructions": con["counts"]["instructions"],
        "pairs_kept": rev["counts"]["pairs_kept"] + con["counts"]["pairs_kept"],
        "pairs_dropped": {
            **{f"revise_{k}": v for k, v in rev["counts"]["pairs_dropped"].items()},
            **{f"contrastive_{k}": v for k, v in con["counts"]["pairs_dropped"].items()},
        },
    }
    return {"mode": "both", "counts": counts, "revise": rev, "contrastive": con}
