"""SFT throughput on the embedded base model: TRL defaults vs the project's CPU settings, and
random-order vs length-grouped batches, in one run (a few LoRA steps each).

    python scripts/benchmark_training.py                      # gemma-3-270m, 3 steps per setting
    python scripts/benchmark_training.py --steps 2 --skip trl_defaults --out runs/bench.json

Settings (all LoRA all-linear r=16, batch 4, the same synthetic records and seed):
  trl_defaults   TRL 1.16 SFTConfig as it comes: bf16=True, gradient_checkpointing=True, random order
  cpu            the project's CPU settings: bf16=False, gradient_checkpointing=False, random order
  cpu_grouped    the CPU settings with train_sampling_strategy=group_by_length
  cpu_attn_lora  the CPU settings with LoRA on q,k,v,o only (is all-linear worth its cost?)

Throughput counts non-pad tokens (TRL's num_tokens, the attention-mask sum) per second of step
wall time; the first step of each setting is warm-up and excluded when more than one ran. The
records are synthetic but realistic: the project's checked instruction/response demos
(utils/data/response_examples.jsonl), some answers chained into longer responses, so lengths
vary from a few tokens to a few hundred as in generated stage-1 data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from utils.jsonl_io import write_json_atomic
from utils.provenance import git_commit, package_versions
from utils.sft import (
    SFTStageConfig,
    build_sft_trainer,
    sft_args_kwargs,
    sft_examples,
)
from utils.training_common import (
    StepTimer,
    load_base_model,
)

DEMOS = Path(__file__).resolve().parent.parent / "utils" / "data" / "response_examples.jsonl"
SETTINGS = {
    "trl_defaults": {"trl_defaults": True, "train_sampling_strategy": "random"},
    "cpu": {"train_sampling_strategy": "random"},
    "cpu_grouped": {"train_sampling_strategy": "group_by_length"},
    "cpu_attn_lora": {
        "train_sampling_strategy": "random",
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
}


def synthetic_records(n: int, seed: int) -> list[dict]:
    """``n`` stage-1-like records: real demo pairs, a third of them with 2-8 demo answers
    chained into one long response (long-tailed lengths, like sampled completions)."""
    demos = [json.loads(line) for line in DEMOS.read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = rng.choice(demos)
        response = d["response"]
        if rng.random() < 1 / 3:
            response = " ".join(
                [response, *(rng.choice(demos)["response"] for _ in range(rng.randint(2, 8)))]
            )
        out.append({"id": f"b{i:04d}", "instruction": d["instruction"], "response": response})
    return out


def run_setting(
    name: str, spec: dict, model_cfg: dict, examples: list, steps: int, batch: int, tmp: Path
) -> dict:
    from trl import SFTConfig

    spec = dict(spec)
    trl_defaults = spec.pop("trl_defaults", False)
    cfg = SFTStageConfig.from_dict(
        {
            "max_steps": steps, "per_device_train_batch_size": batch, "logging_steps": 1,
            "save_steps": 10_000, "dev_fraction": 0.0, "warmup_steps": 0, **spec,
        }
    )  # fmt: skip
    lm = load_base_model(model_cfg)  # fresh weights: LoRA and checkpointing change the model
    kw = sft_args_kwargs(cfg, tmp / name, has_dev=False, use_cpu=str(lm.device) == "cpu")
    kw["save_strategy"] = "no"
    if trl_defaults:  # leave both to TRL: bf16=True, gradient_checkpointing=True
        kw.pop("bf16")
        kw.pop("gradient_checkpointing")
    args = SFTConfig(**kw)
    timer = StepTimer()
    pad_stats: list[tuple[int, int]] = []
    trainer = build_sft_trainer(lm, examples, [], cfg, args, callbacks=[timer])
    collate = trainer.data_collator

    def counting_collator(features):  # (padded tokens, real tokens) of each batch, in order
        batch_out = collate(features)
        pad_stats.append((batch_out["input_ids"].numel(), int(batch_out["attention_mask"].sum())))
        return batch_out

    trainer.data_collator = counting_collator
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    cum = [0.0] + [float(h["num_tokens"]) for h in hist]
    step_tokens = [cum[i + 1] - cum[i] for i in range(len(hist))]
    secs = timer.step_seconds
    first = 1 if len(secs) > 1 else 0  # the first step is warm-up
    toks, dur = sum(step_tokens[first:]), sum(secs[first : len(step_tokens)])
    padded = sum(p for p, _ in pad_stats[: len(secs)])
    real = sum(r for _, r in pad_stats[: len(secs)])
    return {
        "setting": name,
        "bf16": bool(args.bf16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "sampler": cfg.train_sampling_strategy,
        "lora_target_modules": cfg.lora_target_modules,
        "steps": len(secs),
        "step_seconds": [round(s, 3) for s in secs],
        "step_cpu_seconds": [round(s, 3) for s in timer.step_cpu_seconds],
        "step_seconds_mean_after_first": round(dur / max(1, len(secs) - first), 3),
        "nonpad_tokens_per_step": step_tokens,
        "nonpad_tokens_per_second": round(toks / dur, 2) if dur > 0 else None,
        "padding_fraction": round(1 - real / padded, 4) if padded else None,
        "train_wall_seconds": round(wall, 2),
        "final_loss": hist[-1]["loss"] if hist else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="gemma-3-270m", help="model name or path (default: %(default)s)"
    )
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per setting (default: 3)")
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size (default: 4)")
    ap.add_argument("--records", type=int, default=96, help="synthetic records (default: 96)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", action="append", default=[], choices=sorted(SETTINGS))
    ap.add_argument("--out", default="runs/benchmarks/training_benchmark.json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.records < args.batch:
        print("error: --steps and --batch must be >= 1 and --records >= --batch", file=sys.stderr)
        return 2
    if not DEMOS.exists():
        print(f"error: {DEMOS} is missing", file=sys.stderr)
        return 2
    examples = sft_examples(synthetic_records(args.records, args.seed), where="synthetic")
    tmp = Path(args.out).parent / "benchmark_tmp"
    results = []
    for name, spec in SETTINGS.items():
        if name in args.skip:
            continue
        print(f"-- {name}", flush=True)
        results.append(
            run_setting(name, spec, {"name": args.model}, examples, args.steps, args.batch, tmp)
        )
    base = next((r for r in results if r["setting"] == "cpu"), results[0])
    for r in results:
        r["speedup_vs_cpu"] = (
            round(r["nonpad_tokens_per_second"] / base["nonpad_tokens_per_second"], 3)
            if r["nonpad_tokens_per_second"] and base["nonpad_tokens_per_second"]
            else None
        )
    report = {
        "model": args.model,
        "steps_per_setting": args.steps,
        "per_device_batch": args.batch,
        "n_records": args.records,
        "seed": args.seed,
        "git": git_commit(),
        "package_versions": package_versions(),
        "results": results,
    }
    write_json_atomic(args.out, report)
    head = f"{'setting':<14} {'bf16':>5} {'ckpt':>5} {'sampler':>16} {'s/step':>8} {'tok/s':>8} {'pad %':>6} {'vs cpu':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        print(
            f"{r['setting']:<14} {str(r['bf16']):>5} {str(r['gradient_checkpointing']):>5} "
            f"{r['sampler']:>16} {r['step_seconds_mean_after_first']:>8.2f} "
            f"{r['nonpad_tokens_per_second'] or 0:>8.1f} {100 * (r['padding_fraction'] or 0):>6.1f} "
            f"{r['speedup_vs_cpu'] or 0:>6.2f}x"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
