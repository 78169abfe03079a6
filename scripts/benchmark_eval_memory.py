"""Peak memory of evaluating 3 arms sequentially (one base load, adapters swapped) versus all
three resident at once (three model copies), measured in ONE run.

    python scripts/benchmark_eval_memory.py                 # embedded base model, 4 prompts
    python scripts/benchmark_eval_memory.py --model /path/to/model --n-prompts 8

Each mode runs in its own fresh subprocess, which reports its ru_maxrss (exact high-water mark)
and a sampled peak: "one_arm" (the reference: load + base arm), "sequential" (base + 2 random
LoRA adapters swapped onto one load) and "all_at_once" (3 copies). Prints the ratios and writes
JSON. Exit 0 when sequential <= --target x one_arm, 1 when not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.jsonl_io import write_json_atomic

MODES = ("one_arm", "sequential", "all_at_once")
RESULT_PREFIX = "BENCH_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="base model (default: %(default)s)")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--target", type=float, default=1.3, help="max sequential/one_arm ratio")
    p.add_argument("--out", default="runs/benchmarks/eval_memory.json")
    p.add_argument("--child", choices=(*MODES, "make_adapters"), help=argparse.SUPPRESS)
    p.add_argument("--adapters", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("n_prompts", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def child(args: argparse.Namespace) -> int:
    """Runs inside a subprocess: one mode, one JSON line on stdout."""
    from utils.eval_memory_benchmark import memory_benchmark_child

    adapter_dirs = [a for a in args.adapters.split(",") if a]
    if args.child == "make_adapters":
        from utils.clean_model_loader import CleanModelLoader
        from utils.eval_memory_benchmark import make_random_adapter

        lm = CleanModelLoader().load(args.model)
        for i, d in enumerate(adapter_dirs):
            make_random_adapter(lm, Path(d), seed=100 + i)
        result: dict = {"mode": "make_adapters", "adapters": adapter_dirs}
    else:
        result = memory_benchmark_child(
            args.child, args.model, adapter_dirs, args.n_prompts, args.max_new_tokens,
            args.batch_size,
        )  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_child(mode: str, args: argparse.Namespace, adapters: list[str]) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", args.model,
        "--n-prompts", str(args.n_prompts), "--max-new-tokens", str(args.max_new_tokens),
        "--batch-size", str(args.batch_size), "--adapters", ",".join(adapters),
    ]  # fmt: skip
    print(f"[{mode}] running in a fresh subprocess ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{mode} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eval-mem-bench-") as tmp:
        adapters = [str(Path(tmp) / f"adapter{i}") for i in range(2)]
        try:
            run_child("make_adapters", args, adapters)
            runs = {mode: run_child(mode, args, adapters) for mode in MODES}
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    ref = runs["one_arm"]["ru_maxrss_mib"]
    seq_ratio = runs["sequential"]["ru_maxrss_mib"] / ref
    all_ratio = runs["all_at_once"]["ru_maxrss_mib"] / ref
    same_outputs = runs["sequential"]["outputs"] == runs["all_at_once"]["outputs"] and (
        runs["sequential"]["outputs"]["base"] == runs["one_arm"]["outputs"]["base"]
    )
    summary = {
        "model": args.model,
        "n_prompts": args.n_prompts,
        "max_new_tokens": args.max_new_tokens,
        "modes": {m: {k: v for k, v in r.items() if k != "outputs"} for m, r in runs.items()},
        "sequential_over_one_arm": seq_ratio,
        "all_at_once_over_one_arm": all_ratio,
        "sequential_saving_vs_all_at_once": 1
        - runs["sequential"]["ru_maxrss_mib"] / runs["all_at_once"]["ru_maxrss_mib"],
        "target_ratio": args.target,
        "target_met": seq_ratio <= args.target,
        "outputs_identical_across_modes": same_outputs,
        "total_s": time.perf_counter() - t0,
    }
    write_json_atomic(args.out, summary)
    print(
        f"\n{'mode':<12} {'arms':>4} {'peak RSS MiB (ru_maxrss)':>25} {'sampled':>8} {'wall s':>7}"
    )
    for mode, r in runs.items():
        print(
            f"{mode:<12} {len(r['arms']):>4} {r['ru_maxrss_mib']:>25.0f} "
            f"{r['peak_rss_sampled_mib']:>8.0f} {r['wall_s']:>7.1f}"
        )
    print(
        f"\nsequential 3 arms / one arm = {seq_ratio:.2f}x (target <= {args.target}x: "
        f"{'met' if summary['target_met'] else 'NOT met'}); all at once / one arm = "
        f"{all_ratio:.2f}x; outputs identical across modes: {same_outputs}\nJSON: {args.out}"
    )
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
