"""Sequential, memory-safe evaluation of every arm on the held-out verifiable-instruction set.

An "arm" is one way of asking the model: ``base`` (zero-shot in the shared format),
``base_icl`` (the same base model with K hand-written in-context demonstrations, URIAL-style:
the zero-training baseline every trained arm must beat), ``sft`` and ``dpo`` (LoRA adapters of
a run), and any adapter given by path. Every arm answers the SAME prompts with the SAME greedy
decoding and stop policy, so arms are compared paired, prompt by prompt (utils/stats.py).

Memory: one base model is resident at a time and adapters are swapped onto that one load
(attach_adapter, then peft set_adapter / delete_adapter / disable_adapter), with gc between
arms; the peak RSS of every arm is measured by a sampling thread plus ``ru_maxrss``.

Caching: each arm's generations are appended (flushed per batch) to
``<run>/eval/cache/<key>.jsonl``, key = hash(weights, adapter, prompt set, decoding, prompt
format, load options). A rerun of a finished arm loads its file without loading a model; a
killed run resumes at the first missing prompt (``jsonl_io.resume`` drops a torn last line).
Scores are recomputed from the cached text on every run, so a fixed checker never meets stale
scores.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from utils.clean_model_loader import adapter_hash
from utils.eval_arms import (
    ArmSpec,
    adapter_unchanged,
    arm_prompt,
    prompt_format_id,
    resolve_arms,
)
from utils.eval_cache import (
    cache_key,
    cache_key_fields,
    generate_into_cache,
    read_arm_cache,
    record_generation_session,
)
from utils.eval_config import EvalConfig, EvalInputError, ModelSpec
from utils.eval_leakage import check_leakage, load_train_instructions
from utils.eval_prompts import build_eval_set, icl_examples, prompt_set_hash, type_counts
from utils.eval_sentinels import run_sentinels, sentinel_suite_version, sentinels_unavailable
from utils.eval_session import ModelSession, check_adapters
from utils.eval_statistics import arm_summary, compute_statistics, score_arm, split_statistics
from utils.generation import DecodingConfig, generate
from utils.icl_selection import candidate_prompt_parts, select_icl
from utils.jsonl_io import write_json_atomic
from utils.process_memory import PeakRSSMonitor, release_memory
from utils.provenance import config_hash


def round_sampling_stats(run_dir: Path) -> list[dict[str, Any]]:
    """The verified rounds' sampling statistics (``<run>/verified_r<k>/stats.json``), in order:
    what the checkers found in each round's samples, next to the arms trained on them."""
    out = []
    k = 1
    while (Path(run_dir) / f"verified_r{k}" / "stats.json").exists():
        st = json.loads((Path(run_dir) / f"verified_r{k}" / "stats.json").read_text())
        out.append({"round": k, **st})
        k += 1
    return out


def _stop_reasons(gens: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(g["stop_reason"] for g in gens).items()))


@dataclass
class _ArmContext:
    """What every arm of one evaluation shares."""

    config: EvalConfig
    model: ModelSpec
    session: ModelSession
    records: list[dict]
    demos: list[tuple[str, str]]
    decoding: DecodingConfig
    base_sha: str
    pset_sha: str
    cache_dir: Path
    log: Callable[[str], None]
    preamble: str = ""


def _evaluate_arm(spec: ArmSpec, ctx: _ArmContext) -> tuple[dict[str, Any], dict[str, dict]]:
    """(arm info, id -> generation) for one arm: cache first, the model only for what is
    missing (generations, sentinel verdict), peak RSS measured over the arm."""
    config, records = ctx.config, ctx.records
    prompts = {r["id"]: arm_prompt(spec, r["prompt"], ctx.demos, ctx.preamble) for r in records}
    key_fields = cache_key_fields(
        weights_sha256=ctx.base_sha,
        adapter_sha256=adapter_hash(spec.adapter_dir) if spec.adapter_dir else None,
        prompt_set_sha256=ctx.pset_sha,
        decoding=ctx.decoding,
        prompt_format=prompt_format_id(spec, ctx.demos, ctx.preamble),
        load_options=ctx.model.load_options(),
    )
    key = cache_key(key_fields)
    cache_path = ctx.cache_dir / f"{key}.jsonl"
    sessions_path = ctx.cache_dir / f"{key}.sessions.json"
    write_json_atomic(ctx.cache_dir / f"{key}.meta.json", {"arm": spec.name, **key_fields})
    cached, torn = read_arm_cache(cache_path, prompts)
    if torn:
        ctx.log(f"arm {spec.name}: dropped {torn} torn line(s) from {cache_path} (resuming)")
    done = {g["id"] for g in cached}
    pending = [(r["id"], prompts[r["id"]]) for r in records if r["id"] not in done]
    # Sentinels judge the model state (base + adapter), so base and base_icl share one.
    sentinel_key = config_hash(
        {**key_fields, "prompt_set_sha256": None, "decoding_sha256": None,
         "prompt_format": None, "sentinel": config.sentinel,
         "suite_version": sentinel_suite_version()}
    )[:32]  # fmt: skip
    sentinel_path = ctx.cache_dir / f"sentinel-{sentinel_key}.json"
    sentinel = sentinels_unavailable(config)
    if sentinel is None and sentinel_path.exists():
        sentinel = json.loads(sentinel_path.read_text())
    info: dict[str, Any] = {
        "name": spec.name,
        "status": "evaluated",
        "prompt_format": spec.prompt_format,
        "adapter_dir": str(spec.adapter_dir) if spec.adapter_dir else None,
        "adapter_sha256": key_fields["adapter_sha256"],
        # training that changed nothing (flagged by the stage): the report says so
        "adapter_unchanged": (
            adapter_unchanged(spec.adapter_dir, key_fields["adapter_sha256"])
            if spec.adapter_dir
            else None
        ),
        "cache_key": key,
        "cache_path": str(cache_path),
        "n_cached": len(cached),
        "n_generated": len(pending),
        "new_tokens_generated": 0,
        "generation_s": 0.0,
        "memory": None,
    }
    ctx.log(f"arm {spec.name}: {len(cached)} cached, {len(pending)} to generate")
    if pending or sentinel is None:
        with PeakRSSMonitor(config.rss_interval_s) as mon:
            t_arm = time.perf_counter()
            with ctx.session.arm(spec) as lm:
                if pending:
                    n_tok, secs = generate_into_cache(
                        lm, spec.name, pending, ctx.decoding, cache_path, config.progress
                    )
                    info["new_tokens_generated"], info["generation_s"] = n_tok, secs
                if sentinel is None:
                    sentinel = run_sentinels(lm, config, trained_arm=spec.adapter_dir is not None)
                    if sentinel["status"] == "ran":  # only real results are worth caching
                        write_json_atomic(sentinel_path, sentinel)
            info["arm_s"] = time.perf_counter() - t_arm
            release_memory()
        info["memory"] = mon.to_dict()
        cached, _ = read_arm_cache(cache_path, prompts)
        if pending:
            record_generation_session(sessions_path, info)
    # Timings and memory of every run that generated into this cache: a cached rerun still
    # reports how long generation took and how much memory it needed.
    info["generation_sessions"] = (
        json.loads(sessions_path.read_text()) if sessions_path.exists() else []
    )
    info["sentinel"] = sentinel
    info["tokens_per_s"] = (
        info["new_tokens_generated"] / info["generation_s"] if info["generation_s"] else None
    )
    by_id = {g["id"]: g for g in cached}
    if set(by_id) != set(prompts):
        raise RuntimeError(f"arm {spec.name}: cache {cache_path} is incomplete after generation")
    info["stop_reasons"] = _stop_reasons(list(by_id.values()))
    info["mean_new_tokens"] = sum(g["n_new_tokens"] for g in by_id.values()) / len(by_id)
    info["example_prompt"] = prompts[records[0]["id"]]
    return info, by_id


def _samples(
    records: Sequence[Mapping[str, Any]],
    headline: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    n_samples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The same few headline prompts, answered by every arm, for the report."""
    rng = random.Random(seed)
    sample_ids = rng.sample([r["id"] for r in headline], min(n_samples, len(headline)))
    by_record = {r["id"]: r for r in records}
    return [
        {
            "id": sid,
            "instruction": by_record[sid]["prompt"],
            "instruction_ids": by_record[sid]["instruction_ids"],
            "arms": {
                arm: {
                    "response": arm_scores[sid]["response"],
                    "prompt_strict": arm_scores[sid]["prompt_strict"],
                    "stop_reason": arm_scores[sid]["stop_reason"],
                }
                for arm, arm_scores in scores.items()
            },
        }
        for sid in sample_ids
    ]


def run_evaluation(
    run_dir: str | Path,
    config: EvalConfig,
    model: ModelSpec,
    adapters: Mapping[str, Path] | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    held_out: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every arm sequentially (cached, resumable) and return the results dict that
    utils/report.py renders. Raises EvalInputError on bad input before any generation.

    ``held_out``: the constraint types never trained on (config ``constraints.held_out``); each
    prompt is then tagged ``seen`` or ``held_out`` (held out when any of its types is) and
    every statistic is also reported on each part."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalInputError(f"run directory {run_dir} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"

    records = build_eval_set(config.n_prompts, config.seed)
    specs, skipped = resolve_arms(run_dir, config.arms, adapters)
    for s in skipped:
        log(f"SKIPPED arm {s['name']}: {s['reason']}")
    leakage = check_leakage(records, load_train_instructions(run_dir), config.leakage_threshold)
    leaked = set(leakage["ids"]) if config.exclude_leaked else set()
    headline = [r for r in records if r["id"] not in leaked]
    session = ModelSession(model, log=log)
    check_adapters(specs, session)  # before any generation (the ICL choice generates too)
    icl_choice = None
    demos, preamble = icl_examples()[: config.icl_k], ""
    if config.icl_candidates and "base_icl" in [s.name for s in specs]:
        icl_choice = choose_icl(session, config, out_dir / "cache", log)
        preamble, demos = candidate_prompt_parts(icl_choice["chosen"])
    ctx = _ArmContext(
        config=config,
        model=model,
        session=session,
        records=records,
        demos=demos,
        preamble=preamble,
        decoding=config.decoding(),
        base_sha=session.weights_sha256(),
        pset_sha=prompt_set_hash(records),
        cache_dir=out_dir / "cache",
        log=log,
    )
    log(
        f"eval set: {len(records)} prompts (sha256 {ctx.pset_sha[:12]}), leakage "
        f"{leakage.get('n_leaked', 'not checked')}, headline n={len(headline)}"
    )
    arm_results: list[dict[str, Any]] = []
    generations: dict[str, dict[str, dict]] = {}
    for spec in specs:
        info, generations[spec.name] = _evaluate_arm(spec, ctx)
        arm_results.append(info)
    constitution = None
    if config.constitution and specs:
        from utils.eval_constitution import run_constitution_eval

        keys = {
            spec.name: {"weights": ctx.base_sha,
                        "adapter": adapter_hash(spec.adapter_dir) if spec.adapter_dir else None}
            for spec in specs
        }  # fmt: skip
        constitution = run_constitution_eval(
            specs, session.arm, keys,
            lambda spec, text: arm_prompt(spec, text, ctx.demos, ctx.preamble),
            config, out_dir / "cache", log,
        )  # fmt: skip
    provenance = session.lm.provenance if session.lm is not None else None
    load_s = session.load_s
    session.close()

    scores = {arm: score_arm(records, gens) for arm, gens in generations.items()}
    statistics = compute_statistics(headline, scores, list(scores), config) if scores else {}
    subsets = split_statistics(headline, scores, config, held_out) if scores else {}
    for info in arm_results:
        arm_scores = scores[info["name"]]
        info["summary"] = statistics.get("summaries", {}).get(info["name"])
        info["summary_all_prompts"] = arm_summary(list(arm_scores.values()), config.confidence)
        info["n_marker_leaked"] = sum(s["marker_leaked"] for s in arm_scores.values())
    return {
        "schema": "eval-results/1",
        "run_dir": str(run_dir),
        "out_dir": str(out_dir),
        "created_unix": round(time.time(), 3),
        "config": config.to_dict(),
        "model": {
            "spec": asdict(model),
            "weights_sha256": ctx.base_sha,
            "provenance": provenance,
            "loaded": provenance is not None,
            "load_s": load_s,
        },
        "decoding": {
            **ctx.decoding.to_dict(),
            "eos": "model EOS / stop_token_ids (always a stop)",
            "icl_k": len(ctx.demos),
            "icl_instructions": [d[0] for d in ctx.demos],
            "icl_preamble": ctx.preamble,
            "icl_selection": icl_choice,
        },
        "prompt_set": {
            "n": len(records),
            "seed": config.seed,
            "sha256": ctx.pset_sha,
            "type_counts": type_counts(records),
        },
        "leakage": leakage,
        "headline": {
            "n_prompts": len(headline),
            "n_excluded_leaked": len(records) - len(headline),
            "exclude_leaked": config.exclude_leaked,
        },
        "arms": arm_results,
        "skipped_arms": skipped,
        "comparisons": statistics.get("comparisons", []),
        "mde": statistics.get("mde"),
        "per_type": statistics.get("per_type", []),
        "verdicts": statistics.get("verdicts", []),
        "splits": subsets,
        "samples": _samples(records, headline, scores, config.n_samples, config.seed),
        "scores": {
            arm: {
                sid: {k: s[k] for k in ("prompt_strict", "prompt_loose", "instruction_strict")}
                for sid, s in arm_scores.items()
            }
            for arm, arm_scores in scores.items()
        },
        "rounds": round_sampling_stats(run_dir),
        "constitution": constitution,
        "timing": {"total_s": time.perf_counter() - t_start, "model_load_s": load_s},
    }


def choose_icl(
    session: ModelSession, config: EvalConfig, cache_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The dev-chosen base_icl setting (utils/icl_selection.py), cached per base weights,
    candidates, dev size and decoding: a rerun does not load the model for it."""
    key = config_hash({"weights": session.weights_sha256(), "candidates": list(config.icl_candidates),
                       "n_dev": config.icl_dev_prompts, "seed": config.seed,
                       "decoding": config.decoding().to_dict(), "schema": 1})[:24]  # fmt: skip
    path = cache_dir / f"icl-selection-{key}.json"
    if path.exists():
        choice = json.loads(path.read_text())
    else:
        lm = session.load()
        decoding = config.decoding()

        def texts(prompts: list[str]) -> list[str]:
            return [g.text for g in generate(lm, prompts, decoding, progress=config.progress,
                                             desc="icl dev")]  # fmt: skip

        t0 = time.perf_counter()
        choice = select_icl(texts, config.icl_candidates, config.icl_dev_prompts, config.seed + 1)
        choice["seconds"] = round(time.perf_counter() - t0, 1)
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, choice)
    log(
        f"base_icl: dev-chosen setting {choice['chosen']} (dev prompt strict {choice['dev_accuracy']})"
    )
    return choice
