"""Self-judged preference pairs: the policy proposes, the BASE model judges.

For every stage-1 training instruction:

1. k candidates are sampled, each from a configured source: ``sft`` (the SFT adapter on the
   plain ``format_prompt(instruction)``, stopping on ``RESPONSE_STOP_STRINGS`` and EOS) or
   ``base_fewshot`` (the base weights, adapter disabled, on a few-shot prompt built from the
   project's demonstration pool, or the stage-1 record's own prompt). Seeds are recorded.
2. Candidates that cannot be compared fairly are excluded, with the reason kept: empty,
   duplicate of an earlier candidate, cut by ``max_new_tokens`` (optional), format scaffolding
   leaked, or chat-control text.
3. The base model's critic judges the remaining candidates, by ``critic.pair_mode``:

   - ``pmi`` (default): each candidate is scored ONCE, alone (``score_responses``): its score
     is the mean log-likelihood gain per token that the instruction gives it under the base
     weights, and every pair's soft preference is sigmoid(s_i - s_j) (``strength_preference``),
     with no position bias by construction (``position_consistent`` is None). The only judge
     above chance on the check set for gemma-3-270m.
   - ``pointwise``: the same, with P(Yes) to "does it follow the instruction?" as the score
     (its log-odds as strength).
   - ``pairwise``: ``compare_pairs`` asks every pair of candidates in both A/B orders; a
     candidate's score is its mean soft win rate.
4. Pairs are emitted for all compared pairs or only best-vs-worst; each carries a soft label
   (P(chosen better), in [0.5, 1]) and margin (2 * soft_label - 1). Pairs below the
   confidence threshold, position-inconsistent pairs (pairwise, when required) and exact ties
   are dropped and counted. No canned or templated negative is ever made up: both sides of every
   pair are the model's own samples.

Files (in the output directory):

* ``judgements.jsonl``: one record per instruction, written FIRST: every candidate with its
  exact prompt (and, pmi/pointwise, its own verdict), every comparison's raw numbers, every pair
  with kept/dropped reason, the ``pair_mode`` and the judge prompt id.
* ``pairs.jsonl``: the kept pairs (id, instruction, type, prompt, chosen, rejected, soft_label,
  margin, candidates, judge), derived from the judgement record alone.

Both are append-and-flush. On a rerun, ``resume`` repairs a torn last line in each; finished
instructions are skipped and any of their pairs missing from ``pairs.jsonl`` (a kill between the
two writes) is rebuilt from the judgement record, so nothing is duplicated or lost. A directory
whose judgements were made by another judge (mode or prompt) is refused, never mixed.

The pure pieces (exclusion, comparisons from verdicts, pair selection, pair records, counts) are
in ``utils.pair_selection``; this module generates, judges and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.critic import (
    CriticConfig,
    base_only,
    compare_pairs,
    judge_prompt_id,
    score_responses,
)
from utils.jsonl_io import (
    NULL,
    RECORD_ID,
    JsonlAppender,
    JsonlError,
    read_jsonl,
    read_jsonl_numbered,
    resume,
)
from utils.pair_selection import (
    candidate_scores,
    exclusion_reasons,
    pair_records,
    pointwise_candidate_scores,
    pointwise_comparisons,
    select_pairs,
    summarize_judgements,
)
from utils.response_format import (
    RESPONSE_STOP_STRINGS,
    clean_response,
    format_prompt,
)

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel

CANDIDATE_SOURCES = ("sft", "base_fewshot")
PAIR_SELECTIONS = ("auto", "all_pairs", "best_vs_worst")
FEWSHOT_PROMPTS = ("pool", "stage1_record")

# "auto" compares every pair and keeps them all while k is small enough for that to stay cheap.
AUTO_ALL_PAIRS_MAX_K = 4


@dataclass(frozen=True)
class PairsConfig:
    num_candidates: int = 4  # k samples per instruction, spread round-robin over the sources
    candidate_sources: tuple[str, ...] = ("sft",)
    fewshot_prompts: str = "pool"  # base_fewshot prompts: "pool" demos or "stage1_record" prompt
    fewshot_examples: int = 3  # demonstrations per pool prompt
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 16  # generation batch
    seed: int = 0
    pair_selection: str = "auto"  # auto | all_pairs | best_vs_worst
    exclude_truncated: bool = True  # a response cut by max_new_tokens never ends: not comparable
    instructions_per_chunk: int = 8  # instructions generated and judged together
    max_instructions: int | None = None  # None = every stage-1 training instruction

    def __post_init__(self) -> None:
        if self.num_candidates < 2:
            raise ValueError(
                f"num_candidates must be >= 2 to form a pair, got {self.num_candidates}"
            )
        if not self.candidate_sources:
            raise ValueError("candidate_sources is empty")
        bad = [s for s in self.candidate_sources if s not in CANDIDATE_SOURCES]
        if bad:
            raise ValueError(f"unknown candidate_sources {bad}; known: {list(CANDIDATE_SOURCES)}")
        if self.fewshot_prompts not in FEWSHOT_PROMPTS:
            raise ValueError(
                f"fewshot_prompts must be one of {FEWSHOT_PROMPTS}, got {self.fewshot_prompts!r}"
            )
        if self.pair_selection not in PAIR_SELECTIONS:
            raise ValueError(
                f"pair_selection must be one of {PAIR_SELECTIONS}, got {self.pair_selection!r}"
            )
        if self.fewshot_examples < 1:
            raise ValueError(f"fewshot_examples must be >= 1, got {self.fewshot_examples}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.instructions_per_chunk < 1:
            raise ValueError("max_new_tokens, batch_size and instructions_per_chunk must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"sampling needs temperature > 0, top_p in (0, 1], top_k >= 0; got "
                f"{self.temperature}, {self.top_p}, {self.top_k}"
            )
        if self.max_instructions is not None and self.max_instructions < 1:
            raise ValueError(f"max_instructions must be >= 1 or null, got {self.max_instructions}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PairsConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pairs keys {sorted(unknown)}; known: {sorted(known)}")
        if "candidate_sources" in d:
            if isinstance(d["candidate_sources"], str):
                raise ValueError("candidate_sources must be a list, e.g. [sft, base_fewshot]")
            d["candidate_sources"] = tuple(d["candidate_sources"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "candidate_sources": list(self.candidate_sources)}

    def selection_for(self, k: int) -> str:
        if self.pair_selection != "auto":
            return self.pair_selection
        return "all_pairs" if k <= AUTO_ALL_PAIRS_MAX_K else "best_vs_worst"


def candidate_plan(cfg: PairsConfig) -> list[tuple[str, int]]:
    """(source, seed) of each of the k candidates: sources round-robin, seed = cfg.seed + i.

    The generator mixes the prompt into every row's seed, so the same seed on another
    instruction is an independent draw."""
    srcs = cfg.candidate_sources
    return [(srcs[i % len(srcs)], cfg.seed + i) for i in range(cfg.num_candidates)]


# --------------------------------------------------------------------------------------------
# Model side.


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fewshot_prompt(
    record: Mapping[str, Any],
    cfg: PairsConfig,
    pool: Sequence[Mapping[str, Any]] | None,
    seed: int,
) -> tuple[str, list[str]]:
    """The base model's few-shot prompt for one candidate and the demonstration ids it used."""
    if cfg.fewshot_prompts == "stage1_record":
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"stage-1 record {record.get('id')!r} has no 'prompt' to reuse for base_fewshot"
            )
        return prompt, []
    from utils import completion_prompts as cp

    if pool is None:
        raise ValueError("fewshot_prompts=pool needs the demonstration pool")
    rng = random.Random(f"{seed}:{record['id']}")  # per candidate: different demos, reproducible
    itype = record.get("type") if record.get("type") in cp.TYPE_DESCRIPTIONS else None
    return cp.response_prompt(
        record["instruction"], pool, rng, k=cfg.fewshot_examples, instruction_type=itype
    )


def generate_candidates(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: PairsConfig,
    pool: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = False,
) -> list[list[dict[str, Any]]]:
    """k candidates per record (see ``candidate_plan``), each with its exact prompt and seed."""
    from utils.generation import DecodingConfig, generate

    decoding = DecodingConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        batch_size=cfg.batch_size,
        stop_strings=RESPONSE_STOP_STRINGS,
    )
    plan = candidate_plan(cfg)
    requests: dict[str, list[tuple[int, int, str, int, list[str]]]] = {
        s: [] for s in CANDIDATE_SOURCES
    }
    for r_idx, rec in enumerate(records):
        for c_idx, (source, seed) in enumerate(plan):
            if source == "sft":
                prompt, demo_ids = format_prompt(rec["instruction"]), []
            else:
                prompt, demo_ids = fewshot_prompt(rec, cfg, pool, seed)
            requests[source].append((r_idx, c_idx, prompt, seed, demo_ids))
    out: list[list[dict[str, Any] | None]] = [[None] * len(plan) for _ in records]
    for source, reqs in requests.items():
        if not reqs:
            continue
        if source == "sft" and not lm.adapters:
            raise ValueError("candidate source 'sft' needs the SFT adapter attached")
        ctx = base_only(lm) if source == "base_fewshot" else contextlib.nullcontext()
        with ctx:
            gens = generate(
                lm, [q[2] for q in reqs], decoding, seed=[q[3] for q in reqs],
                progress=progress, desc=f"candidates:{source}",
            )  # fmt: skip
        for (r_idx, c_idx, prompt, seed, demo_ids), g in zip(reqs, gens, strict=True):
            out[r_idx][c_idx] = {
                "index": c_idx,
                "text": clean_response(g.text),
                "source": source,
                "seed": seed,
                "stop_reason": g.stop_reason,
                "n_new_tokens": g.n_new_tokens,
                "raw_completion": g.raw_completion,
                "prompt": prompt,
                "prompt_sha256": _sha(prompt),
                "fewshot_example_ids": demo_ids,
            }
    return [[c for c in row if c is not None] for row in out]


def judge_candidates(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    candidates: Sequence[list[dict[str, Any]]],
    cfg: PairsConfig,
    critic: CriticConfig,
) -> list[dict[str, Any]]:
    """One judgement record per instruction: exclusions, then the pair judge over the usable
    candidates of all instructions in one batched critic call. Pointwise: each usable candidate
    scored once (its verdict kept on the candidate), comparisons derived from the scores;
    pairwise: every pair asked in both orders, scores = mean soft win rates. Then pairs."""
    control = lm.policy.control_token_strings
    usable_by_record: list[list[int]] = []
    for cands in candidates:
        reasons = exclusion_reasons(
            [c["text"] for c in cands], [c["stop_reason"] for c in cands], control,
            cfg.exclude_truncated,
        )  # fmt: skip
        for c, reason in zip(cands, reasons, strict=True):
            c["excluded"] = reason
        usable_by_record.append([c["index"] for c in cands if c["excluded"] is None])
    per_record: list[list[dict[str, Any]]] = [[] for _ in records]
    scores_by_record: list[list[float | None]] = []
    n_prompts = [0] * len(records)
    if critic.pair_mode in ("pmi", "pointwise"):
        todo = [(r, i) for r, usable in enumerate(usable_by_record) for i in usable]
        verdicts = score_responses(
            lm, [(records[r]["instruction"], candidates[r][i]["text"]) for r, i in todo], critic
        )
        by_record: list[list[dict[str, Any] | None]] = [[None] * len(c) for c in candidates]
        for (r_idx, i), v in zip(todo, verdicts, strict=True):
            by_record[r_idx][i] = v
            n_prompts[r_idx] += 2 if critic.pair_mode == "pmi" else 1  # pmi: with and without
        for r_idx, usable in enumerate(usable_by_record):
            for c, v in zip(candidates[r_idx], by_record[r_idx], strict=True):
                c["judge"] = v  # the candidate's own verdict (None: excluded)
            per_record[r_idx] = pointwise_comparisons(
                by_record[r_idx], list(combinations(usable, 2)), critic.pair_mode
            )
            scores_by_record.append(pointwise_candidate_scores(by_record[r_idx]))
    else:
        todo3 = [(r, i, j) for r, usable in enumerate(usable_by_record)
                 for i, j in combinations(usable, 2)]  # fmt: skip
        results = compare_pairs(
            lm,
            [
                (records[r]["instruction"], candidates[r][i]["text"], candidates[r][j]["text"])
                for r, i, j in todo3
            ],
            critic,
        )
        for (r_idx, i, j), res in zip(todo3, results, strict=True):
            per_record[r_idx].append({"i": i, "j": j, **res})
            n_prompts[r_idx] += 2
        scores_by_record = [
            candidate_scores(len(cands), comps)
            for cands, comps in zip(candidates, per_record, strict=True)
        ]
    prompt_id = judge_prompt_id(critic)
    out = []
    for rec, cands, comps, scores, n_p in zip(
        records, candidates, per_record, scores_by_record, n_prompts, strict=True
    ):
        for c, s in zip(cands, scores, strict=True):
            c["score"] = s
        selection = cfg.selection_for(cfg.num_candidates)
        out.append(
            {
                "id": rec["id"],
                "instruction": rec["instruction"],
                "type": rec.get("type"),
                "selection": selection,
                "pair_mode": critic.pair_mode,
                "judge_prompts": n_p,
                "candidates": cands,
                "comparisons": comps,
                "pairs": select_pairs(comps, scores, selection, critic),
                "judge_prompt": prompt_id,
                "critic_config": critic.to_dict(),
            }
        )
    return out


def load_training_instructions(path: str | Path) -> list[dict[str, Any]]:
    """Stage-1 training records (id, instruction, type required; ids unique)."""
    fields = {"id": RECORD_ID, "instruction": str, "type": (str, NULL)}
    numbered = read_jsonl_numbered(path, fields)
    seen: dict[Any, int] = {}
    for k, r in numbered:
        if not r["instruction"].strip():
            raise JsonlError(path, k, "instruction is empty", "instruction")
        if r["id"] in seen:
            raise JsonlError(
                path, k, f"duplicate id {r['id']!r} (first on line {seen[r['id']]})", "id"
            )
        seen[r["id"]] = k
    return [r for _, r in numbered]


def run_preference_pairs(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: PairsConfig,
    critic: CriticConfig,
    out_dir: str | Path,
    pool: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate, judge and write pairs for ``records``, resuming whatever ``out_dir`` holds.

    Returns the counts (over the whole output, resumed part included), resume info and
    timings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j_path, p_path = out_dir / "judgements.jsonl", out_dir / "pairs.jsonl"
    if cfg.max_instructions is not None:
        records = list(records)[: cfg.max_instructions]
    if "base_fewshot" in cfg.candidate_sources and cfg.fewshot_prompts == "pool" and pool is None:
        from utils.completion_prompts import load_response_examples

        pool = load_response_examples()
    done, torn_j = resume(j_path, key="id")
    written, torn_p = resume(p_path, key="id")
    done_ids = {j["id"] for j in done}
    stray = {p["instruction_id"] for p in written} - done_ids
    if stray:
        raise JsonlError(
            p_path, 0, f"pairs for instructions with no judgement record: {sorted(stray)[:5]}; "
            "the output directory was written by something else",
        )  # fmt: skip
    want = judge_prompt_id(critic)
    other = [j["id"] for j in done if j.get("judge_prompt") != want]
    if other:
        theirs = done[[j["id"] for j in done].index(other[0])].get("judge_prompt") or {}
        raise JsonlError(
            j_path, 0, f"{len(other)} judgements (first {other[0]!r}) were made by another judge "
            f"({theirs.get('pair_judge_id', theirs.get('prompt_version'))}) than the configured "
            f"one ({want['pair_judge_id']}); labels from two judges must not be mixed: write to "
            "a new output directory",
        )  # fmt: skip
    written_ids = {p["id"] for p in written}
    timings = {"generate_s": 0.0, "judge_s": 0.0}
    rebuilt = 0
    with JsonlAppender(j_path) as jw, JsonlAppender(p_path) as pw:
        for j in done:  # a kill between the two writes: finish the pairs of done instructions
            for p in pair_records(j):
                if p["id"] not in written_ids:
                    pw.write(p)
                    rebuilt += 1
        pending = [r for r in records if r["id"] not in done_ids]
        step = cfg.instructions_per_chunk
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            t0 = time.perf_counter()
            cands = generate_candidates(lm, chunk, cfg, pool, progress=progress)
            t1 = time.perf_counter()
            judgements = judge_candidates(lm, chunk, cands, cfg, critic)
            timings["generate_s"] += t1 - t0
            timings["judge_s"] += time.perf_counter() - t1
            for j in judgements:
                jw.write(j)  # the judgement first: it is what resume trusts
                pw.write_many(pair_records(j))
            if on_chunk is not None:
                on_chunk(start + len(chunk), len(pending))
    all_judgements = read_jsonl(j_path)
    return {
        "counts": summarize_judgements(all_judgements),
        "resume": {
            "instructions_already_done": len(done_ids),
            "instructions_new": len([r for r in records if r["id"] not in done_ids]),
            "torn_lines_repaired": {"judgements": torn_j, "pairs": torn_p},
            "pairs_rebuilt_from_judgements": rebuilt,
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
