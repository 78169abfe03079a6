"""Stage 1: SFT data from the base model alone (instructions, then responses), resumable.

Steps, each writing JSONL as it goes (append + flush, so a kill loses nothing written):

1. instructions: numbered-list continuation prompts (plain and category-steered) sampled from
   the base model; every generated line is parsed, de-duplicated against everything accepted
   so far (MinHash near-duplicates, not exact match) and, if enabled, judged by the base-model
   critic. Accepted -> ``instructions.jsonl``; every rejection with its reason ->
   ``rejected_instructions.jsonl``.
2. split: held-out test instructions (no near-duplicate of any training instruction) ->
   ``test_instructions.jsonl``; the rest are training instructions.
3. responses: a few-shot "Instruction/Response" prompt per training instruction (3-4 random
   demonstrations); cleaned responses that pass the filters -> ``train.jsonl``, the others ->
   ``rejected_responses.jsonl`` with the reason.
4. QC: metrics and gates (utils/qc.py) -> ``qc.json``; the script exits 1 if a gate fails.

Generation is seeded per round/record, so a rerun after a kill regenerates exactly the records
that are missing and skips those written (ids are derived from round and slot).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from utils import completion_prompts as cp
from utils.clean_model_loader import LoadedModel
from utils.dedup import NearDupIndex, split_train_test
from utils.generation import STOP_EOS, STOP_LIMIT, STOP_STRING, DecodingConfig, generate
from utils.jsonl_io import JsonlAppender, read_jsonl, resume, write_jsonl_atomic
from utils.minhash_lsh import DedupConfig
from utils.qc import QCGates, compute_qc, evaluate_gates, format_gate_report
from utils.response_format import END_OF_RESPONSE_MARKER, RESPONSE_STOP_STRINGS, marker_leaked

_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s?(.*)$")


@dataclass
class Stage1Config:
    seed: int = 1234
    n_train: int = 330  # accepted training examples wanted
    n_test: int = 110  # held-out test instructions wanted
    instruction_overshoot: float = 1.0  # fraction of extra instructions generated (rejections)
    list_examples: int = 8
    diversity_fraction: float = 0.5  # share of list prompts steered to a category
    prompts_per_round: int = 32
    max_rounds: int = 60
    instruction_max_new_tokens: int = 96  # several list items per completion
    instruction_temperature: float = 0.9
    instruction_top_p: float = 0.95
    response_examples: int = 3
    response_max_new_tokens: int = 64
    response_temperature: float = 0.7
    response_top_p: float = 0.9
    response_attempts: int = 2  # a rejected response is re-sampled with another seed
    batch_size: int = 32
    dedup_threshold: float = 0.7
    use_critic: bool = True  # thresholds live in the config's `critic` section
    # False: train.jsonl holds the instructions only; the verified stage samples and checks
    # the responses (utils/verified_sampling.py), so few-shot responses here would be unused.
    responses: bool = True
    seeds_path: str | None = None
    examples_path: str | None = None
    gates: dict[str, Any] = field(
        default_factory=lambda: {
            "min_records": 300,
            "max_near_duplicate_rate": 0.05,
            "max_marker_leakage_rate": 0.0,
            "max_limit_hit_rate": 0.10,
        }
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage1Config:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"stage1 config: unknown keys {sorted(unknown)}")
        return cls(**d)


def _sid(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def round_size(prompts_per_round: int, target: int, history: list[dict[str, Any]]) -> int:
    """Prompts for the next instruction round: ``prompts_per_round``, or, once finished rounds
    have measured the yield (accepted instructions per prompt), only as many as the remaining
    shortfall needs with 25% to spare (at least 8), so the last round does not generate and
    judge a full round's surplus. ``history``: the finished rounds' records in order
    (``n_prompts``, ``n_accepted_total``), read back from disk, so a resumed run sizes its
    rounds exactly as the uninterrupted run did."""
    if not history:
        return prompts_per_round
    have = history[-1]["n_accepted_total"]
    prompts = sum(r["n_prompts"] for r in history)
    if have <= 0 or prompts <= 0:
        return prompts_per_round
    need = max(0, target - have)
    size = math.ceil(1.25 * need * prompts / have)  # 1.25 x shortfall / (accepted per prompt)
    return max(min(8, prompts_per_round), min(prompts_per_round, size))


def split_list_items(raw: str, open_number: int, hit_limit: bool) -> list[tuple[str, bool]]:
    """(line text, complete?) for each list item in a continuation that starts at ``open_number``.

    The first line continues the open number; the next lines must carry the following numbers
    ("10.", "11." ...). The last line is incomplete when the token limit cut it."""
    lines = raw.split("\n")
    items: list[tuple[str, bool]] = []
    expected = open_number
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if i == 0:
            text = line
        else:
            m = _ITEM.match(line)
            if not m or int(m.group(1)) != expected:
                break  # the list ended (blank line, prose, wrong number)
            text = m.group(2)
        items.append((text, not (last and hit_limit)))
        expected += 1
    return items


class Stage1Generator:
    def __init__(
        self,
        lm: LoadedModel,
        cfg: Stage1Config,
        out_dir: Path,
        progress: bool = True,
        critic_cfg: Any = None,
    ):
        self.lm, self.cfg, self.out, self.progress = lm, cfg, Path(out_dir), progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.seeds = cp.load_seed_instructions(cfg.seeds_path or cp.DEFAULT_SEEDS_PATH)
        self.examples = cp.load_response_examples(cfg.examples_path or cp.DEFAULT_EXAMPLES_PATH)
        self.types = sorted({s["type"] for s in self.seeds})
        self.dedup_cfg = DedupConfig(threshold=cfg.dedup_threshold)
        self.timings: dict[str, float] = {}
        self.resumed: dict[str, int] = {}
        self.critic_cfg = None
        if cfg.use_critic:
            from utils.critic import CriticConfig

            self.critic_cfg = critic_cfg if critic_cfg is not None else CriticConfig()

    # -- step 1: instructions ----------------------------------------------------------------
    def generate_instructions(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        acc_path, rej_path = (
            self.out / "instructions.jsonl",
            self.out / "rejected_instructions.jsonl",
        )
        accepted, torn_a = resume(acc_path, key="id")
        rejected, torn_r = resume(rej_path, key="id")
        self.resumed["instructions"] = len(accepted)
        self.resumed["torn_lines_repaired"] = torn_a + torn_r
        done_ids = {r["id"] for r in accepted} | {r["id"] for r in rejected}
        index = NearDupIndex(config=self.dedup_cfg)
        for s in self.seeds:  # copying a seed is not a new instruction
            index.add(s["instruction"])
        n_seed = len(index)
        for r in accepted:
            index.add(r["instruction"])
        for r in rejected:  # the critic saw these after they entered the index
            if r["reason"] == "critic_rejected":
                index.add(r["text"])
        rounds_path = self.out / "instruction_rounds.jsonl"
        history = sorted(resume(rounds_path, key="id")[0], key=lambda r: r["id"])
        rounds_done = {r["id"] for r in history}
        target = int((cfg.n_train + cfg.n_test) * (1 + cfg.instruction_overshoot))
        decoding = DecodingConfig(
            max_new_tokens=cfg.instruction_max_new_tokens,
            do_sample=True,
            temperature=cfg.instruction_temperature,
            top_p=cfg.instruction_top_p,
            batch_size=cfg.batch_size,
        )
        t0 = time.perf_counter()
        with (
            JsonlAppender(acc_path) as acc_w,
            JsonlAppender(rej_path) as rej_w,
            JsonlAppender(rounds_path) as rounds_w,
        ):
            for rnd in range(cfg.max_rounds):
                if len(accepted) >= target:
                    break
                rng = random.Random(cfg.seed * 1000 + rnd)
                prompts, infos = [], []
                n_prompts = round_size(
                    cfg.prompts_per_round, target, [r for r in history if r["id"] < rnd]
                )
                for slot in range(n_prompts):
                    if rng.random() < cfg.diversity_fraction:
                        cat = cp.rotate_categories(self.types, rnd * cfg.prompts_per_round + slot)
                        prompt, info = cp.diversity_prompt(
                            accepted, self.seeds, rng, cat, cfg.list_examples
                        )
                        info = {"kind": "diversity", **info}
                    else:
                        prompt, ids = cp.instruction_list_prompt(self.seeds, rng, cfg.list_examples)
                        info = {
                            "kind": "list",
                            "seed_ids": ids,
                            "open_number": cfg.list_examples + 1,
                        }
                    prompts.append(prompt)
                    infos.append(info)
                if rnd in rounds_done:
                    continue  # finished before a kill; its records are already on disk
                seeds = [
                    cfg.seed * 1000 + rnd * cfg.prompts_per_round + s for s in range(len(prompts))
                ]
                gens = generate(
                    self.lm,
                    prompts,
                    decoding,
                    seed=seeds,
                    progress=self.progress,
                    desc=f"instructions r{rnd}",
                )
                candidates = []
                for slot, (g, info) in enumerate(zip(gens, infos, strict=True)):
                    items = split_list_items(
                        g.raw_completion, info["open_number"], g.stop_reason == STOP_LIMIT
                    )
                    for j, (text, complete) in enumerate(items):
                        rid = _sid("ins", rnd, slot, j)
                        if rid in done_ids:
                            continue
                        parsed = cp.parse_instruction_continuation(
                            text, stopped_at_newline=complete
                        )
                        base = {
                            "id": rid,
                            "round": rnd,
                            "slot": slot,
                            "item": j,
                            "seed": seeds[slot],
                            "prompt": g.prompt,
                            "raw_completion": g.raw_completion,
                            "prompt_kind": info["kind"],
                            "category": info.get("category"),
                        }
                        if not parsed.ok:
                            rej_w.write({**base, "text": text, "reason": parsed.reason})
                            done_ids.add(rid)
                            continue
                        dup = index.query(parsed.text)
                        if dup.is_duplicate:
                            src = "seed" if dup.match_index < n_seed else "generated"
                            rej_w.write(
                                {
                                    **base,
                                    "text": parsed.text,
                                    "reason": f"near_duplicate_{src}",
                                    "similarity": round(dup.similarity, 3),
                                }
                            )
                            done_ids.add(rid)
                            continue
                        index.add(parsed.text)
                        itype = (
                            cp.infer_format_type(parsed.text) or info.get("category") or "general"
                        )
                        candidates.append({**base, "instruction": parsed.text, "type": itype})
                scores = self._judge([c["instruction"] for c in candidates])
                for c, s in zip(candidates, scores, strict=True):
                    c["critic"] = s
                    if s is not None and not s["accepted"]:
                        rej_w.write(
                            {**c, "text": c.pop("instruction"), "reason": "critic_rejected"}
                        )
                    else:
                        acc_w.write(c)
                        accepted.append(c)
                    done_ids.add(c["id"])
                done = {"id": rnd, "n_prompts": len(prompts), "n_accepted_total": len(accepted)}
                rounds_w.write(done)
                history.append(done)
        self.timings["instructions_s"] = time.perf_counter() - t0
        return accepted

    def _judge(self, instructions: list[str]) -> list[dict[str, Any] | None]:
        if not instructions or self.critic_cfg is None:
            return [None] * len(instructions)
        from utils.critic import judge_instructions

        out = judge_instructions(self.lm, instructions, self.critic_cfg)
        return [
            {"score": float(o["score"]), **{k: v for k, v in o.items() if k != "score"}}
            for o in out
        ]

    # -- step 2: split ---------------------------------------------------------------------------
    def split(self, instructions: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        split_path = self.out / "split.json"
        test_path = self.out / "test_instructions.jsonl"
        if test_path.exists() and split_path.exists():
            test_ids = {r["id"] for r in read_jsonl(test_path)}
        else:
            _, test = split_train_test(
                instructions,
                n_test=self.cfg.n_test,
                seed=self.cfg.seed,
                key="instruction",
                config=self.dedup_cfg,
            )
            test_ids = {r["id"] for r in test}
            write_jsonl_atomic(
                test_path,
                [
                    {"id": r["id"], "instruction": r["instruction"], "type": r["type"]}
                    for r in instructions
                    if r["id"] in test_ids
                ],
            )
            split_path.write_text(f'{{"n_test": {len(test_ids)}}}\n')
        train = [r for r in instructions if r["id"] not in test_ids][: self.cfg.n_train]
        test = [r for r in instructions if r["id"] in test_ids]
        return train, test

    # -- step 3: responses ----------------------------------------------------------------------
    def generate_responses(self, train_instructions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = self.cfg
        out_path, rej_path = self.out / "train.jsonl", self.out / "rejected_responses.jsonl"
        done, torn_a = resume(out_path, key="id")
        rejected, torn_r = resume(rej_path, key="attempt_id")
        self.resumed["responses"] = len(done)
        self.resumed["torn_lines_repaired"] = (
            self.resumed.get("torn_lines_repaired", 0) + torn_a + torn_r
        )
        done_ids = {r["id"] for r in done}
        rejected_attempts = {r["attempt_id"] for r in rejected}
        decoding = DecodingConfig(
            max_new_tokens=cfg.response_max_new_tokens,
            do_sample=True,
            temperature=cfg.response_temperature,
            top_p=cfg.response_top_p,
            batch_size=cfg.batch_size,
            stop_strings=RESPONSE_STOP_STRINGS,
        )
        t0 = time.perf_counter()
        with JsonlAppender(out_path) as w, JsonlAppender(rej_path) as rw:
            for attempt in range(cfg.response_attempts):
                todo = [
                    r for r in train_instructions
                    if r["id"] not in done_ids and _sid("resp", r["id"], attempt) not in rejected_attempts
                ]  # fmt: skip
                if not todo:
                    continue
                prompts, ex_ids, seeds = [], [], []
                for r in todo:
                    rng = random.Random(f"{cfg.seed}|{r['id']}|{attempt}")
                    p, ids = cp.response_prompt(
                        r["instruction"], self.examples, rng, k=cfg.response_examples
                    )
                    prompts.append(p)
                    ex_ids.append(ids)
                    seeds.append(int(_sid("seed", r["id"], attempt), 16))
                gens = generate(
                    self.lm,
                    prompts,
                    decoding,
                    seed=seeds,
                    progress=self.progress,
                    desc=f"responses a{attempt}",
                )
                for r, g, ids, seed in zip(todo, gens, ex_ids, seeds, strict=True):
                    response = g.text.strip()
                    stop_reason = (
                        "marker" if g.matched_stop == END_OF_RESPONSE_MARKER else g.stop_reason
                    )
                    rec = {
                        "id": r["id"],
                        "instruction": r["instruction"],
                        "type": r["type"],
                        "response": response,
                        "prompt": g.prompt,
                        "raw_completion": g.raw_completion,
                        "stop_reason": stop_reason,
                        "response_tokens": self.lm.count_tokens(response) if response else 0,
                        "generated_tokens": g.n_new_tokens,
                        "example_ids": ids,
                        "seed": seed,
                        "attempt": attempt,
                        "critic": r.get("critic"),
                        "instruction_source": {
                            k: r[k]
                            for k in ("round", "slot", "item", "seed", "prompt_kind", "category")
                        },
                    }
                    reason = self._reject_reason(response, stop_reason)
                    if reason is None:
                        w.write(rec)
                        done_ids.add(r["id"])
                    else:
                        rw.write(
                            {**rec, "attempt_id": _sid("resp", r["id"], attempt), "reason": reason}
                        )
        self.timings["responses_s"] = time.perf_counter() - t0
        order = {r["id"]: i for i, r in enumerate(train_instructions)}
        return sorted(read_jsonl(out_path), key=lambda r: order.get(r["id"], 1 << 30))

    @staticmethod
    def _reject_reason(response: str, stop_reason: str) -> str | None:
        if not response:
            return "empty"
        if stop_reason == STOP_LIMIT:
            return "hit_token_limit"
        if marker_leaked(response) or "###" in response:
            return "marker_leak"
        return None

    # -- step 4: QC ------------------------------------------------------------------------------
    def qc(
        self, records: list[dict[str, Any]], n_instr_attempted: int, n_instr_accepted: int
    ) -> tuple[dict, Any]:
        rejected = (
            read_jsonl(self.out / "rejected_responses.jsonl")
            if (self.out / "rejected_responses.jsonl").exists()
            else []
        )
        qc = compute_qc(
            records,
            dedup_config=self.dedup_cfg,
            step_counts={
                "instructions": (n_instr_accepted, n_instr_attempted),
                "responses": (len(records), len(records) + len(rejected)),
            },
            stop_strings=RESPONSE_STOP_STRINGS,
        )
        # Rates before filtering, so a filter cannot hide what the model does.
        all_resp = records + rejected
        qc["unfiltered_responses"] = {
            "n": len(all_resp),
            "limit_hit_rate": sum(r["stop_reason"] == STOP_LIMIT for r in all_resp)
            / max(len(all_resp), 1),
            "eos_rate": sum(r["stop_reason"] == STOP_EOS for r in all_resp) / max(len(all_resp), 1),
            "marker_rate": sum(r["stop_reason"] == "marker" for r in all_resp)
            / max(len(all_resp), 1),
            "other_stop_string_rate": sum(r["stop_reason"] == STOP_STRING for r in all_resp)
            / max(len(all_resp), 1),
            "rejection_reasons": _count(r["reason"] for r in rejected),
        }
        report = evaluate_gates(qc, QCGates.from_dict(self.cfg.gates))
        return qc, report


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_stage1(
    lm: LoadedModel, cfg: Stage1Config, out_dir: Path, progress: bool = True, critic_cfg: Any = None
) -> dict[str, Any]:
    """All four steps; returns a summary dict (the script writes it into the manifest)."""
    gen = Stage1Generator(lm, cfg, out_dir, progress, critic_cfg)
    t0 = time.perf_counter()
    instructions = gen.generate_instructions()
    rejected_ins = (
        read_jsonl(gen.out / "rejected_instructions.jsonl")
        if (gen.out / "rejected_instructions.jsonl").exists()
        else []
    )
    train_ins, test = gen.split(instructions)
    if cfg.responses:
        records = gen.generate_responses(train_ins)
        qc, report = gen.qc(records, len(instructions) + len(rejected_ins), len(instructions))
        gates, passed, gate_text = report.to_dict(), report.passed, format_gate_report(report)
    else:
        records = [{"id": r["id"], "instruction": r["instruction"], "type": r["type"]}
                   for r in train_ins]  # fmt: skip
        write_jsonl_atomic(gen.out / "train.jsonl", records)
        need = int(cfg.gates.get("min_records", 1))
        passed = len(records) >= need
        qc = {"responses": "not generated (stage1.responses: false)", "n": len(records),
              "type_counts": dict(sorted(_count(r["type"] for r in records).items()))}  # fmt: skip
        gates = {"min_records": {"value": len(records), "required": need, "passed": passed}}
        gate_text = (f"instruction gate {'PASSED' if passed else 'FAILED'}: {len(records)} training "
                     f"instructions (>= {need}); response gates off (stage1.responses: false)")  # fmt: skip
    gen.timings["total_s"] = time.perf_counter() - t0
    return {
        "counts": {
            "instructions_accepted": len(instructions),
            "instructions_rejected": len(rejected_ins),
            "instruction_rejections": _count(r["reason"] for r in rejected_ins),
            "train_instructions": len(train_ins),
            "train_records": len(records),
            "test_instructions": len(test),
        },
        "qc": qc,
        "gates": gates,
        "gates_passed": passed,
        "gate_report_text": gate_text,
        "timings_s": {k: round(v, 1) for k, v in gen.timings.items()},
        "resumed": gen.resumed,
        "config": asdict(cfg),
    }
