"""Program-verified self-training data: rejection sampling with the constraint checkers.

A judge the model cannot fool (AutoIF arXiv 2406.13542, Tulu 3 RLVR arXiv 2411.15124, IFBench
arXiv 2507.02833): for every constrained training instruction (``utils.constraint_library``),

1. k candidates are SAMPLED: in round 1 from the base weights on a few-shot prompt (project
   demonstrations of TRAIN types only, one of the instruction's own type placed last), in later
   rounds from the previous round's policy adapter on the plain ``format_prompt``;
2. every candidate is CHECKED by the program checkers of its constraints (IFEval strict) and
   scored for RELEVANCE by the base model: the pmi gain, the mean log-likelihood gain per token
   that the bare task (constraint sentences removed) gives the response
   (``utils.critic.pmi_scores``). "ok." passes "reply in lowercase" but explains nothing about
   "Describe a lighthouse.", so it stays below the threshold;
3. KEPT, per instruction: the passing, relevant candidate with the highest relevance (ties:
   the earlier candidate). Instructions without constraints keep their most relevant candidate;
4. PAIRS: chosen = the kept candidate, rejected = the most relevant candidate that FAILS a
   checker (a hard negative: on topic, wrong on the rule); soft label 1.0 because a checker
   decided it. Without constraints the pmi judge pairs the most and least relevant candidates
   (soft label sigmoid of the gain difference, kept above ``critic.pair_confidence_threshold``).
   Near-identical pairs are dropped and counted.

No instruct model, no chat template and no written response is involved: the checkers only
SAY which of the model's own samples satisfy a rule stated in the instruction.

Files: ``samples.jsonl`` (one record per instruction: every candidate with its exact prompt,
seed, checks and relevance; append-and-flush, the resume point), then ``train.jsonl`` (kept
SFT records of this round), ``sft_data.jsonl`` (what the next SFT trains on: this round's, or
accumulated over rounds), ``pairs.jsonl`` and ``stats.json``, all rebuilt from
``samples.jsonl`` alone, so a kill -9 at any point loses nothing and duplicates nothing.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.constraint_library import LIBRARY, TypeSplit, eval_phrasing_match
from utils.jsonl_io import (
    RECORD_ID,
    JsonlAppender,
    JsonlError,
    read_jsonl,
    read_jsonl_numbered,
    resume,
    write_jsonl_atomic,
)
from utils.response_format import (
    RESPONSE_STOP_STRINGS,
    clean_response,
    format_completion,
    format_few_shot_prompt,
    format_prompt,
)
from utils.verifiable_checks import evaluate_strict

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel

POLICY_BASE = "base_fewshot"
PAIRS_FROM = ("final_policy", "last_round")


@dataclass(frozen=True)
class VerifiedConfig:
    """Config section ``verified`` (defaults live in configs/*.yaml; these only mirror them)."""

    rounds: int = 2
    accumulate: bool = True  # round r's SFT data: kept records of rounds 1..r (latest wins)
    num_candidates: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 64
    fewshot_examples: int = 3
    instructions_per_chunk: int = 64
    max_instructions: int | None = None
    relevance_threshold: float = 0.0  # pmi nats/token of the bare task; check-set dev split
    near_identical_ratio: float = 0.95  # difflib ratio at or above which a pair is dropped
    exclude_truncated: bool = True
    # DPO pairs: "final_policy" = one more sampling pass with the final SFT adapter (on-policy);
    # "last_round" = the pairs of the last round's samples (one pass cheaper, one round stale)
    pairs_from: str = "final_policy"
    # Hindsight records per instruction (0 = off): a relevant sample that did not become the
    # kept answer is stored again under the bare task + a TRAIN-type rule it already follows
    # (utils.constraint_library.hindsight_kwargs), checked by the same checker.
    hindsight: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rounds", "num_candidates", "max_new_tokens", "batch_size",
                     "fewshot_examples", "instructions_per_chunk"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"verified.{name} must be an integer >= 1, got {v!r}")
        if self.max_instructions is not None and (
            isinstance(self.max_instructions, bool)
            or not isinstance(self.max_instructions, int)
            or self.max_instructions < 1
        ):
            raise ValueError(
                f"verified.max_instructions must be >= 1 or null, got {self.max_instructions!r}"
            )
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"verified.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"verified.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.relevance_threshold, (int, float)):
            raise ValueError(
                f"verified.relevance_threshold must be a number, got {self.relevance_threshold!r}"
            )
        if self.pairs_from not in PAIRS_FROM:
            raise ValueError(
                f"verified.pairs_from must be one of {PAIRS_FROM}, got {self.pairs_from!r}"
            )
        if not 0 < self.near_identical_ratio <= 1:
            raise ValueError(
                f"verified.near_identical_ratio must be in (0, 1], got {self.near_identical_ratio!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> VerifiedConfig:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown verified keys {sorted(unknown)}; known: {sorted(f.name for f in fields(cls))}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Few-shot demonstrations for round 1: the project's pool, TRAIN types only.


def allowed_demos(pool: Sequence[Mapping[str, Any]], split: TypeSplit) -> list[Mapping[str, Any]]:
    """Pool demonstrations whose checked types are all TRAIN types and whose instruction uses
    no evaluation phrasing (held-out types are never demonstrated)."""
    out = []
    for e in pool:
        ids = [c["id"] for c in e.get("checks") or []]
        if any(t not in split.train for t in ids):
            continue
        if eval_phrasing_match(e["instruction"]):
            continue
        out.append(e)
    return out


def fewshot_demos(
    record: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], k: int, rng: random.Random
) -> list[Mapping[str, Any]]:
    """k demonstrations, as many as the pool has of ``record``'s own constraint types (taken in
    turn over its types, placed last, nearest the target: a 270M model copies the format it
    has just seen), the rest drawn at random from the others."""
    pools = [
        [e for e in demos if t in [c["id"] for c in e.get("checks") or []]]
        for t in record["instruction_ids"]
    ]
    for pool in pools:
        rng.shuffle(pool)
    typed: list[Mapping[str, Any]] = []
    while len(typed) < k and any(pools):
        for pool in pools:
            while pool and pool[-1] in typed:
                pool.pop()
            if pool and len(typed) < k:
                typed.append(pool.pop())
    rest = [e for e in demos if e not in typed and e["instruction"] != record["instruction"]]
    others = rng.sample(rest, min(k - len(typed), len(rest)))
    return [*others, *typed[::-1]]


# --------------------------------------------------------------------------------------------
# Pure pieces: exclusion, verdicts, choice, pairs, stats.


def _normalise(text: str) -> str:
    return " ".join(text.split())


def near_identical(a: str, b: str, ratio: float) -> bool:
    return difflib.SequenceMatcher(None, _normalise(a), _normalise(b)).ratio() >= ratio


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def decide(record: dict[str, Any], cfg: VerifiedConfig, pmi_confidence: float) -> dict[str, Any]:
    """Fill ``kept_index`` and ``pairs`` of a judged sample record (candidates carry ``usable``,
    ``checks`` and ``relevance``). Pure: resume rebuilds every output from it."""
    cands = record["candidates"]
    constrained = bool(record["instruction_ids"])
    for c in cands:
        c["passes"] = bool(c["usable"] and all(c["checks"]))
        c["relevant"] = bool(c["usable"] and c["relevance"] is not None
                             and c["relevance"] >= cfg.relevance_threshold)  # fmt: skip
        c["verified"] = c["passes"] and c["relevant"]
    verified = [c for c in cands if c["verified"]]
    kept = max(verified, key=lambda c: (c["relevance"], -c["index"])) if verified else None
    record["kept_index"] = kept["index"] if kept else None
    pairs, dropped = [], Counter()
    if kept is not None and constrained:
        failing = sorted(
            (c for c in cands if c["usable"] and not c["passes"]),
            key=lambda c: (-c["relevance"], c["index"]),
        )
        for rej in failing:
            if near_identical(kept["text"], rej["text"], cfg.near_identical_ratio):
                dropped["near_identical"] += 1
                continue
            pairs.append({"chosen_index": kept["index"], "rejected_index": rej["index"],
                          "soft_label": 1.0, "judge": "checker"})  # fmt: skip
            break
        if not failing:
            dropped["no_failing_candidate"] += 1
    elif kept is not None:  # no constraint: the pmi judge, best vs worst relevance
        usable = [c for c in cands if c["usable"] and c["index"] != kept["index"]]
        if usable:
            worst = min(usable, key=lambda c: (c["relevance"], c["index"]))
            p = _sigmoid(kept["relevance"] - worst["relevance"])
            if near_identical(kept["text"], worst["text"], cfg.near_identical_ratio):
                dropped["near_identical"] += 1
            elif p < pmi_confidence:
                dropped["below_confidence"] += 1
            else:
                pairs.append({"chosen_index": kept["index"], "rejected_index": worst["index"],
                              "soft_label": round(p, 6), "judge": "pmi"})  # fmt: skip
        else:
            dropped["no_second_candidate"] += 1
    else:
        dropped["nothing_kept"] += 1
    record["pairs"] = pairs
    record["pairs_dropped"] = dict(dropped)
    return record


def sft_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    if record.get("kept_index") is None:
        return None
    c = record["candidates"][record["kept_index"]]
    return {
        "id": record["id"],
        "instruction": record["instruction"],
        "response": c["text"],
        "type": record.get("type"),
        "task": record["task"],
        "instruction_ids": record["instruction_ids"],
        "kwargs": record["kwargs"],
        "round": record["round"],
        "relevance": c["relevance"],
        "source": c["source"],
        "generation_prompt": c["prompt"],
    }


def hindsight_records(
    record: Mapping[str, Any], split: TypeSplit, n: int, seed: int
) -> list[dict[str, Any]]:
    """Up to ``n`` SFT records from the relevant, usable samples that were not kept: each gets
    the bare task plus one TRAIN-type constraint it already satisfies, in a training phrasing
    (instruction back-translation, verified by the checker). Pure and seeded by the record."""
    from utils.constraint_library import hindsight_kwargs, render

    if n <= 0:
        return []
    rng = random.Random(f"{seed}:hindsight:{record['id']}")
    pool = [c for c in record["candidates"]
            if c.get("relevant") and c["index"] != record.get("kept_index")]  # fmt: skip
    out: list[dict[str, Any]] = []
    for c in pool:
        if len(out) >= n:
            break
        types = list(split.train)
        rng.shuffle(types)
        for t in types:
            kw = hindsight_kwargs(t, c["text"], record["task"], rng)
            if kw is None:
                continue
            phrasing = rng.randrange(len(LIBRARY[t].train_phrasings))
            instruction = f"{record['task']} {render(LIBRARY[t].train_phrasings[phrasing], kw)}"
            if eval_phrasing_match(instruction):
                continue
            out.append({
                "id": f"{record['id']}:h{c['index']}", "instruction": instruction,
                "response": c["text"], "type": record.get("type"), "task": record["task"],
                "instruction_ids": [t], "kwargs": [kw], "round": record["round"],
                "relevance": c["relevance"], "source": "hindsight", "generation_prompt": c["prompt"],
            })  # fmt: skip
            break
    return out


def pair_records(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in record.get("pairs") or []:
        ch, rj = record["candidates"][p["chosen_index"]], record["candidates"][p["rejected_index"]]
        out.append({
            "id": f"{record['id']}:c{p['chosen_index']}-c{p['rejected_index']}",
            "instruction_id": record["id"],
            "instruction": record["instruction"],
            "instruction_ids": record["instruction_ids"],
            "kwargs": record["kwargs"],
            "type": record.get("type"),
            "prompt": format_prompt(record["instruction"]),
            "chosen": format_completion(ch["text"]),
            "rejected": format_completion(rj["text"]),
            "soft_label": p["soft_label"],
            "margin": round(2 * p["soft_label"] - 1, 6),
            "judge": p["judge"],
            "chosen_checks": ch["checks"],
            "rejected_checks": rj["checks"],
            "round": record["round"],
        })  # fmt: skip
    return out


def sampling_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-type pass@1 (share of candidates passing that type's checker) and pass@k (share of
    instructions with at least one passing candidate), prompt level overall, relevance and
    exclusion counts, kept and pair counts."""
    per_type: dict[str, list[int]] = defaultdict(
        lambda: [0, 0, 0, 0]
    )  # cand pass, cands, inst pass, insts
    excluded: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    n_inst = n_cand = prompt_pass = inst_any = kept = relevant_fail = 0
    n_constrained = kept_constrained = 0
    pair_judges: Counter[str] = Counter()
    for r in records:
        cands = r["candidates"]
        n_inst += 1
        n_cand += len(cands)
        excluded.update(c["excluded"] for c in cands if c["excluded"])
        dropped.update(r.get("pairs_dropped") or {})
        pair_judges.update(p["judge"] for p in r.get("pairs") or [])
        kept += r.get("kept_index") is not None
        if r["instruction_ids"]:
            n_constrained += 1
            kept_constrained += r.get("kept_index") is not None
            prompt_pass += sum(c["passes"] for c in cands)
            inst_any += any(c["passes"] for c in cands)
            relevant_fail += sum(c["passes"] and not c["relevant"] for c in cands)
            for j, t in enumerate(r["instruction_ids"]):
                row = per_type[t]
                hits = [bool(c["usable"] and c["checks"][j]) for c in cands]
                row[0] += sum(hits)
                row[1] += len(hits)
                row[2] += any(hits)
                row[3] += 1
    n_constrained_cands = sum(len(r["candidates"]) for r in records if r["instruction_ids"])
    return {
        "instructions": n_inst,
        "constrained_instructions": n_constrained,
        "candidates": n_cand,
        "candidates_excluded": dict(excluded),
        "prompt_pass_at_1": round(prompt_pass / n_constrained_cands, 4)
        if n_constrained_cands
        else None,
        "prompt_pass_at_k": round(inst_any / n_constrained, 4) if n_constrained else None,
        "passing_but_irrelevant_candidates": relevant_fail,
        "kept": kept,
        "kept_constrained": kept_constrained,
        "pairs": sum(pair_judges.values()),
        "pairs_by_judge": dict(pair_judges),
        "pairs_dropped": dict(dropped),
        "per_type": {
            t: {"pass_at_1": round(a / b, 4), "pass_at_k": round(c / d, 4), "instructions": d}
            for t, (a, b, c, d) in sorted(per_type.items())
        },
    }


# --------------------------------------------------------------------------------------------
# Model side.


def _candidate_seed(cfg: VerifiedConfig, round_index: int, c: int) -> int:
    return cfg.seed + 1000 * round_index + c


def sample_candidates(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: VerifiedConfig,
    policy: str,
    round_index: int,
    demos: Sequence[Mapping[str, Any]],
    progress: bool = True,
) -> list[list[dict[str, Any]]]:
    """k sampled candidates per record, each with its exact prompt and seed."""
    from utils.critic import base_only
    from utils.generation import DecodingConfig, generate

    decoding = DecodingConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, stop_strings=RESPONSE_STOP_STRINGS,
    )  # fmt: skip
    prompts, seeds = [], []
    for rec in records:
        if policy == POLICY_BASE:
            # One prompt for the k samples of an instruction: the engine prefills it once.
            rng = random.Random(f"{cfg.seed}:{round_index}:{rec['id']}")
            shots = fewshot_demos(rec, demos, cfg.fewshot_examples, rng)
            prompt = format_few_shot_prompt(
                [(e["instruction"], e["response"]) for e in shots], rec["instruction"]
            )
        else:
            prompt = format_prompt(rec["instruction"])
        for c in range(cfg.num_candidates):
            prompts.append(prompt)
            seeds.append(_candidate_seed(cfg, round_index, c))
    ctx = base_only(lm) if policy == POLICY_BASE else contextlib.nullcontext()
    with ctx:
        gens = generate(
            lm, prompts, decoding, seed=seeds, progress=progress, desc=f"sample r{round_index}"
        )
    out: list[list[dict[str, Any]]] = []
    for i, _rec in enumerate(records):
        row = []
        for c in range(cfg.num_candidates):
            g = gens[i * cfg.num_candidates + c]
            row.append({
                "index": c, "text": clean_response(g.text), "source": policy,
                "seed": seeds[i * cfg.num_candidates + c], "stop_reason": g.stop_reason,
                "n_new_tokens": g.n_new_tokens, "prompt": g.prompt,
            })  # fmt: skip
        out.append(row)
    return out


def judge_samples(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    candidates: Sequence[list[dict[str, Any]]],
    cfg: VerifiedConfig,
    critic: Any,
    round_index: int,
) -> list[dict[str, Any]]:
    """Checks, relevance (base weights) and the keep/pair decision for each record."""
    from utils.critic import pmi_scores
    from utils.pair_selection import exclusion_reasons

    control = lm.policy.control_token_strings
    todo: list[tuple[int, int]] = []
    for r_idx, (rec, cands) in enumerate(zip(records, candidates, strict=True)):
        reasons = exclusion_reasons([c["text"] for c in cands], [c["stop_reason"] for c in cands],
                                    control, cfg.exclude_truncated)  # fmt: skip
        for c, reason in zip(cands, reasons, strict=True):
            c["excluded"] = reason
            c["usable"] = c["excluded"] is None
            c["checks"] = (
                evaluate_strict(rec["instruction_ids"], rec["kwargs"], c["text"])
                if c["usable"] else [False] * len(rec["instruction_ids"])
            )  # fmt: skip
            c["relevance"] = None
            if c["usable"]:
                todo.append((r_idx, c["index"]))
    scores = pmi_scores(
        lm, [(records[r]["task"], candidates[r][i]["text"]) for r, i in todo], critic
    )
    for (r, i), s in zip(todo, scores, strict=True):
        candidates[r][i]["relevance"] = round(s["pmi_nats_per_token"], 6)
    out = []
    for rec, cands in zip(records, candidates, strict=True):
        record = {
            "id": rec["id"], "task": rec["task"], "instruction": rec["instruction"],
            "instruction_ids": rec["instruction_ids"], "kwargs": rec["kwargs"],
            "type": rec.get("type"), "round": round_index, "candidates": cands,
        }  # fmt: skip
        out.append(decide(record, cfg, critic.pair_confidence_threshold))
    return out


def load_constrained(path: str | Path, split: TypeSplit) -> list[dict[str, Any]]:
    """Constrained training instructions (stage 1's ``constrained.jsonl``), validated: known
    TRAIN types only, kwargs beside each id, no evaluation phrasing."""
    fields = {"id": RECORD_ID, "task": str, "instruction": str, "instruction_ids": list,
              "kwargs": list}  # fmt: skip
    numbered = read_jsonl_numbered(path, fields)
    seen: set[str] = set()
    for n, r in numbered:
        if r["id"] in seen:
            raise JsonlError(path, n, f"duplicate id {r['id']!r}", "id")
        seen.add(r["id"])
        if not r["instruction"].strip():
            raise JsonlError(path, n, "must be a non-empty string", "instruction")
        ids, kws = r["instruction_ids"], r["kwargs"]
        if len(ids) != len(kws):
            raise JsonlError(
                path, n, "instruction_ids and kwargs must be lists of equal length", "kwargs"
            )
        for t in ids:
            if not isinstance(t, str) or t not in LIBRARY:
                raise JsonlError(path, n, f"unknown constraint type {t!r}", "instruction_ids")
            if t in split.held_out:
                raise JsonlError(
                    path, n, f"held-out type {t!r} in training data", "instruction_ids"
                )
        hit = eval_phrasing_match(r["instruction"])
        if hit:
            raise JsonlError(path, n, f"uses an evaluation phrasing of {hit}", "instruction")
    return [r for _, r in numbered]


def accumulate(
    previous: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> list[dict]:
    """Kept records of earlier rounds, replaced by this round's where both kept the instruction."""
    by_id = {r["id"]: dict(r) for r in previous}
    by_id.update({r["id"]: dict(r) for r in current})
    return list(by_id.values())


def run_verified_sampling(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: VerifiedConfig,
    critic: Any,
    out_dir: str | Path,
    policy: str,
    round_index: int,
    demos: Sequence[Mapping[str, Any]],
    previous_sft_data: Sequence[Mapping[str, Any]] = (),
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    split: TypeSplit | None = None,
) -> dict[str, Any]:
    """Sample, check and keep for ``records``, resuming whatever ``out_dir/samples.jsonl``
    holds; then rebuild train/sft_data/pairs/stats from it. Returns stats, resume facts and
    timings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s_path = out_dir / "samples.jsonl"
    if cfg.max_instructions is not None:
        records = list(records)[: cfg.max_instructions]
    done, torn = resume(s_path, key="id")
    done_ids = {r["id"] for r in done}
    wanted = {r["id"] for r in records}
    stray = sorted(done_ids - wanted)
    if stray:
        raise JsonlError(s_path, 0, f"samples for instructions not in the input: {stray[:5]}; "
                         "the output directory belongs to another input")  # fmt: skip
    timings = {"sample_s": 0.0, "judge_s": 0.0}
    pending = [r for r in records if r["id"] not in done_ids]
    with JsonlAppender(s_path) as w:
        step = cfg.instructions_per_chunk
        for start in range(0, len(pending), step):
            chunk = pending[start : start + step]
            t0 = time.perf_counter()
            cands = sample_candidates(lm, chunk, cfg, policy, round_index, demos, progress)
            t1 = time.perf_counter()
            judged = judge_samples(lm, chunk, cands, cfg, critic, round_index)
            timings["sample_s"] += t1 - t0
            timings["judge_s"] += time.perf_counter() - t1
            w.write_many(judged)
            if on_chunk is not None:
                on_chunk(start + len(chunk), len(pending))
    samples = read_jsonl(s_path)
    order = {r["id"]: k for k, r in enumerate(records)}
    samples.sort(key=lambda r: order[r["id"]])
    kept = [s for s in (sft_record(r) for r in samples) if s is not None]
    if cfg.hindsight and split is not None:
        kept += [h for r in samples for h in hindsight_records(r, split, cfg.hindsight, cfg.seed)]
    write_jsonl_atomic(out_dir / "train.jsonl", kept)
    sft_data = accumulate(previous_sft_data, kept) if cfg.accumulate else kept
    write_jsonl_atomic(out_dir / "sft_data.jsonl", sft_data)
    write_jsonl_atomic(out_dir / "pairs.jsonl", [p for r in samples for p in pair_records(r)])
    stats = sampling_stats(samples)
    stats["sft_data_records"] = len(sft_data)
    stats["hindsight_records"] = sum(r.get("source") == "hindsight" for r in kept)
    return {
        "stats": stats,
        "resume": {
            "instructions_already_done": len(done_ids),
            "instructions_new": len(pending),
            "torn_lines_repaired": torn,
        },  # fmt: skip
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
