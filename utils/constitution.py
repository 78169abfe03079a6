"""The constitutional stage: the BASE model critiques, revises and judges the policy's answers.

For every stage-1 training instruction (``runs/<run>/stage1/train.jsonl``):

1. **Response.** The bootstrapped policy (the DPO adapter when stage 4 trained one, else the
   SFT adapter; ``cai.policy``) answers the plain ``format_prompt(instruction)``, stopping on
   ``RESPONSE_STOP_STRINGS`` and EOS, exactly as in evaluation.
2. **Principle.** One principle of ``configs/constitution.yaml`` is drawn with a generator
   seeded by (``cai.seed``, instruction id), so the draw does not depend on chunking, order or
   resumption.
3. **Critique.** The BASE model (every attached adapter disabled, ``utils.critic.base_only``)
   continues a plain document: the constitution's header, ``cai.n_shots`` demonstrations, then

       Instruction: <instruction>
       Response: <the policy's response>
       Critique request: <principle.critique_request>
       Critique:

   The first two lines are the project's one format (``utils.response_format.format_example``).
   Never a chat template: every prompt goes through the loader's one encode path
   (``lm.encode``), which refuses chat-control tokens.
4. **Revision.** The same document, continued with the critique and
   ``Revision request: <principle.revision_request>\\nRevision:``; the base model writes the
   revised response.
5. **Judge.** The base model answers an A/B question (``principle.judge_question`` + " Answer:")
   about original vs revision after ``cai.n_shots_judge`` A/B demonstrations, in BOTH orders.
   With P_x(y) = P(" y") / (P(" A") + P(" B")) read from the next-token log-probabilities
   (``utils.scoring.next_token_logprobs``), the label is the order-averaged

       P(prefer revision) = 0.5 * (P_revA(A) + P_revB(B))

   (``ab_soft_label``, built on ``utils.preference_math.soft_preference``). A judge that always says
   " A" gives exactly 0.5, so a constant position bias cancels.
6. **Pair.** chosen = the preferred of (original, revision), rejected = the other; soft_label =
   max(p, 1 - p) in [0.5, 1], margin = 2 * soft_label - 1. Dropped, with the reason counted in
   the manifest: an unusable original (empty, leaked scaffolding/markup, cut by
   max_new_tokens), an empty or leaking critique, an empty, leaking, truncated or identical
   (after whitespace normalisation) revision, a label within ``cai.label_margin`` of 0.5 and,
   when required, orders that disagree. Kept pairs are in ``utils.dpo.load_pairs`` form (id,
   prompt = format_prompt(instruction), chosen/rejected = format_completion(text), no EOS), so
   ``scripts/train_stage1_dpo.py --pairs <out>/pairs.jsonl --sft-adapter <policy adapter>``
   trains the CAI adapter.

Files (in the output directory), both append-and-flush through ``utils.jsonl_io``:

* ``records.jsonl``: one record per instruction, written FIRST: the principle and its seed, the
  exact response/critique/revision/judge prompt strings, raw completions, seeds and stop
  reasons, both orders' raw log-probabilities, the label, kept/drop reason, the prompt id and
  the policy.
* ``pairs.jsonl``: the kept pairs, derived from the record alone (``pair_record``).

Resume mirrors ``utils.preference_pairs``: a torn last line in either file is repaired,
finished instructions are skipped, a pair missing after a kill between the two writes is
rebuilt from its record, and a directory written with another constitution/prompt or another
policy is refused, never mixed.

This is ``cai.mode: revise``; ``contrastive`` (the default) and ``both`` are in
``utils/constitution_contrastive.py`` (RLCD pairs from a follow and a violate context of each
principle; ``run_cai`` dispatches on the mode).

This module holds the model side (``process_chunk``, ``run_constitution``); the pure parts
are ``utils/constitution_config.py`` (the ``cai`` section), ``utils/constitution_prompts.py``
(the constitution file and the documents), ``utils/constitution_pairs.py`` (labels, filters,
pairs, counts, resume) and ``utils/constitution_policy.py`` (which adapter answers).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.constitution_config import STEPS, CAIConfig
from utils.constitution_pairs import (
    ab_soft_label,
    critique_problem,
    label_decision,
    pair_record,
    response_problem,
    resume_outputs,
    revision_problem,
    summarize_records,
)
from utils.constitution_prompts import (
    CRITIQUE_STOP_STRINGS,
    REVISION_STOP_STRINGS,
    Constitution,
    Principle,
    cai_prompt_id,
    check_shots,
    critique_prompt,
    judge_prompts,
    revision_prompt,
    sample_principle,
)
from utils.critic import base_only
from utils.critic_prompts import ANSWER_A, ANSWER_B
from utils.jsonl_io import JsonlAppender, read_jsonl
from utils.response_format import RESPONSE_STOP_STRINGS, clean_response, format_prompt

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel


def forbidden_strings(lm: LoadedModel) -> tuple[str, ...]:
    """Texts no response may carry: the tokenizer's chat-control strings and its EOS/BOS
    text (pairs carry no EOS: the DPO trainer appends the model's own, once)."""
    extra = (lm.tokenizer.eos_token, lm.tokenizer.bos_token)
    return tuple(dict.fromkeys([*lm.policy.control_token_strings, *(s for s in extra if s)]))


def _decoding(cfg: CAIConfig, step: str, stop_strings: tuple[str, ...]) -> Any:
    from utils.generation import DecodingConfig

    t = getattr(cfg, f"{step}_temperature")
    return DecodingConfig(
        max_new_tokens=getattr(cfg, f"{step}_max_new_tokens"),
        do_sample=t > 0,
        temperature=t if t > 0 else 1.0,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        stop_strings=stop_strings,
    )


def _generation_record(prompt: str, g: Any, stop_strings: Sequence[str]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "seed": g.seed,
        "raw_completion": g.raw_completion,
        "text": clean_response(g.text, stop_strings),
        "stop_reason": g.stop_reason,
        "matched_stop": g.matched_stop,
        "n_prompt_tokens": g.n_prompt_tokens,
        "n_new_tokens": g.n_new_tokens,
    }


def _drop(record: dict[str, Any], reason: str | None, leak: str | None) -> bool:
    if reason is None:
        return False
    record["drop_reason"], record["leak"] = reason, leak
    return True


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
    """One record per instruction: the policy's response, then (on the base weights) critique,
    revision and the two-order A/B judgement, each step batched over the chunk and run only
    for the instructions still usable after the previous one."""
    from utils.generation import generate, single_token_id
    from utils.scoring import next_token_logprobs

    timings = timings if timings is not None else {}
    forbidden = forbidden_strings(lm)
    records: list[dict[str, Any]] = []
    for rec in chunk:
        p = sample_principle(constitution, cfg.seed, rec["id"])
        records.append(
            {
                "id": rec["id"],
                "instruction": rec["instruction"],
                "type": rec.get("type"),
                "principle": {"id": p.id, "seed": cfg.seed},
                "policy": dict(policy),
                "prompt_id": dict(prompt_id),
                "response": None, "critique": None, "revision": None, "judge": None,
                "label": None, "kept": False, "drop_reason": None, "leak": None,
            }
        )  # fmt: skip

    def run_step(step: str, build: Callable[[dict[str, Any]], str], stops, seed, ctx) -> None:
        alive = [r for r in records if r["drop_reason"] is None]
        if not alive:
            return
        prompts = [build(r) for r in alive]
        t0 = time.perf_counter()
        with ctx:
            gens = generate(
                lm, prompts, _decoding(cfg, step, stops), seed=seed, progress=progress,
                desc=f"cai:{step}",
            )  # fmt: skip
        timings[f"{step}_s"] = timings.get(f"{step}_s", 0.0) + time.perf_counter() - t0
        for r, prompt, g in zip(alive, prompts, gens, strict=True):
            r[step] = _generation_record(prompt, g, stops)

    def principle_of(r: Mapping[str, Any]) -> Principle:
        return constitution.principle(r["principle"]["id"])

    # 1. The policy answers (its adapter live; the base weights when the policy is "base").
    if policy["name"] == "base":
        policy_ctx: Any = base_only(lm)
    else:
        if not lm.adapters:
            raise ValueError(f"policy {policy['name']!r} needs its adapter attached")
        policy_ctx = contextlib.nullcontext()
    run_step(
        "response", lambda r: format_prompt(r["instruction"]), RESPONSE_STOP_STRINGS, cfg.seed,
        policy_ctx,
    )  # fmt: skip
    for r in records:
        _drop(r, *response_problem(r["response"]["text"], r["response"]["stop_reason"],
                                   forbidden, cfg.exclude_truncated))  # fmt: skip
    # 2. Critique, 3. revision: the base model, adapter disabled.
    run_step(
        "critique",
        lambda r: critique_prompt(
            constitution, principle_of(r), r["instruction"], r["response"]["text"], cfg.n_shots
        ),
        CRITIQUE_STOP_STRINGS, cfg.seed + 1, base_only(lm),
    )  # fmt: skip
    for r in records:
        if r["drop_reason"] is None:
            _drop(r, *critique_problem(r["critique"]["text"], forbidden))
    run_step(
        "revision",
        lambda r: revision_prompt(
            constitution, principle_of(r), r["instruction"], r["response"]["text"],
            r["critique"]["text"], cfg.n_shots,
        ),
        REVISION_STOP_STRINGS, cfg.seed + 2, base_only(lm),
    )  # fmt: skip
    for r in records:
        if r["drop_reason"] is None:
            _drop(r, *revision_problem(
                r["response"]["text"], r["revision"]["text"], r["revision"]["stop_reason"],
                forbidden, cfg.exclude_truncated,
            ))  # fmt: skip
    # 4. Judge: both orders in one batched scoring call on the base weights.
    alive = [r for r in records if r["drop_reason"] is None]
    if alive:
        pairs = [
            judge_prompts(
                constitution, principle_of(r), r["instruction"], r["response"]["text"],
                r["revision"]["text"], cfg.n_shots_judge,
            )
            for r in alive
        ]  # fmt: skip
        flat = [p for pair in pairs for p in pair]
        ids = [single_token_id(lm, ANSWER_A), single_token_id(lm, ANSWER_B)]
        t0 = time.perf_counter()
        with base_only(lm):
            rows = next_token_logprobs(lm, flat, ids, batch_size=cfg.judge_batch_size).tolist()
        timings["judge_s"] = timings.get("judge_s", 0.0) + time.perf_counter() - t0
        for k, (r, (p_a, p_b)) in enumerate(zip(alive, pairs, strict=True)):
            r["judge"] = {
                "prompt_revision_a": p_a,
                "prompt_revision_b": p_b,
                "answers": [ANSWER_A, ANSWER_B],
                **ab_soft_label(rows[2 * k], rows[2 * k + 1]),
            }
            r["label"] = label_decision(
                r["judge"]["p_revision"], r["judge"]["position_consistent"], cfg
            )
            if not _drop(r, r["label"]["drop_reason"], None):
                r["kept"] = True
    return records


def run_constitution(
    lm: LoadedModel,
    records: Sequence[Mapping[str, Any]],
    cfg: CAIConfig,
    constitution: Constitution,
    out_dir: str | Path,
    policy: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Critique, revise, judge and write CAI pairs for ``records`` (stage-1 training records:
    id, instruction, type), resuming whatever ``out_dir`` holds.

    ``policy``: {"name": "base" | "sft" | "dpo", "adapter": path or None, "adapter_sha256":
    ...}; the named adapter must already be attached to ``lm`` (default: the base policy).
    Returns the counts over the whole output (resumed part included), resume info and
    timings."""
    policy = dict(policy or {"name": "base"})
    if policy.get("name") not in ("base", "sft", "dpo"):
        raise ValueError(f"policy name must be base, sft or dpo, got {policy.get('name')!r}")
    adapter = policy.get("adapter")
    policy = {
        "name": policy["name"],
        "adapter": None if adapter is None else str(adapter),
        "adapter_sha256": policy.get("adapter_sha256"),
    }
    check_shots(cfg.n_shots, constitution)
    check_shots(cfg.n_shots_judge, constitution)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r_path, p_path = out_dir / "records.jsonl", out_dir / "pairs.jsonl"
    if cfg.max_instructions is not None:
        records = list(records)[: cfg.max_instructions]
    prompt_id = cai_prompt_id(constitution, cfg)
    state = resume_outputs(out_dir, prompt_id, policy)
    done_ids = {r["id"] for r in state["records"]}
    timings: dict[str, float] = {f"{s}_s": 0.0 for s in STEPS} | {"judge_s": 0.0}
    pending = [r for r in records if r["id"] not in done_ids]
    with JsonlAppender(r_path) as rw, JsonlAppender(p_path) as pw:
        pw.write_many(state["missing_pairs"])  # a kill between the two writes
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
            if on_chunk is not None:
                on_chunk(start + len(chunk), len(pending))
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
