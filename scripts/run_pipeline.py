"""The whole bootstrap in one command, on the embedded base model by default:

    python scripts/run_pipeline.py                  # CPU default (configs/cpu_default.yaml)
    python scripts/run_pipeline.py --quick          # small preset (configs/quick.yaml), minutes
    python scripts/run_pipeline.py --config configs/qwen2.5-32b_h100.yaml --run runs/qwen32b

Runs preflight, then stage-1 data -> SFT -> preference pairs -> DPO -> evaluation into one run
directory. Finished stages whose config and inputs are unchanged are skipped; a killed run
resumes. A stage counts as done only when its manifest says ok or skipped: a crash stops the
pipeline with the tail of the stage's stderr and the command to rerun it. One pipeline per run
directory at a time. Ends with the stage table (skipped stages with their reason), the
evaluation summary and the path of the report. Exit codes (utils/errors.py): 0 every stage done,
2 bad input (config, run locked by another pipeline, a stage process of a killed run still
running, or a stage that refused its input with exit 2, e.g. an instruct or contaminated
model), 1 a stage failed otherwise or preflight failed, 128 + signal when interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from utils.config import DEFAULT_CONFIG, REPO_ROOT, load_config
from utils.config_validation import check_config
from utils.errors import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_OK,
    ProjectInputError,
    as_input_error,
)
from utils.pipeline import STAGES, build_stages, run_pipeline
from utils.stage_process import PipelineInterrupted

QUICK_CONFIG = REPO_ROOT / "configs" / "quick.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=None, help=f"YAML recipe (default: {DEFAULT_CONFIG.name})")
    ap.add_argument(
        "--quick", action="store_true", help="use configs/quick.yaml (a few minutes on 2 CPU cores)"
    )
    ap.add_argument(
        "--run", default=None, help="run directory (default: runs/default or runs/quick)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--only",
        action="append",
        help=f"run only these stages (default recipe: {[s.name for s in STAGES]})",
    )
    ap.add_argument("--skip-preflight", action="store_true")
    args = ap.parse_args(argv)

    config_path = args.config or str(QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    run_dir = Path(args.run or ("runs/quick" if args.quick else "runs/default"))
    try:
        with as_input_error():  # build_stages checks verified.rounds
            cfg = load_config(config_path, args.overrides)
            check_config(cfg)  # every section, every bad key at once, before any stage runs
            stages = build_stages(cfg)
    except ProjectInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    unknown = sorted(set(args.only or ()) - {s.name for s in stages})
    if unknown:
        print(
            f"error: --only {unknown}: this recipe's stages are {[s.name for s in stages]}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    t0 = time.perf_counter()
    if not args.skip_preflight:
        pre = [sys.executable, str(REPO_ROOT / "scripts" / "preflight.py"), "--config", config_path]
        for o in args.overrides:
            pre += ["--set", o]
        if subprocess.run(pre).returncode != 0:
            print(
                "preflight failed; see the table above (or pass --skip-preflight)", file=sys.stderr
            )
            return EXIT_CRASH
    try:
        rows = run_pipeline(
            run_dir, cfg, config_path, args.overrides, stages=stages, only=args.only
        )
    except ProjectInputError as e:  # the run is locked, or a killed run's stage still runs
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PipelineInterrupted as e:
        print(f"\npipeline {e}; the running stage was ended; rerun to resume", file=sys.stderr)
        return 128 + e.signum
    print_table(rows, time.perf_counter() - t0)
    failed = [r for r in rows if r["failed"]]
    if failed:
        again = shlex.join([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])])
        print(f"\na stage failed (see above); rerun the pipeline with:\n  {again}", file=sys.stderr)
        # A stage's bad-input refusal (its one "error:" line is in the tail above) stays exit 2.
        return EXIT_BAD_INPUT if failed[-1]["exit_code"] == EXIT_BAD_INPUT else EXIT_CRASH
    summary = run_dir / "eval" / "summary.txt"
    if summary.exists():
        print("\n" + summary.read_text())
    report = run_dir / "eval" / "report.md"
    if report.exists():
        print(f"report: {report}")
    return EXIT_OK


def print_table(rows: list[dict], total: float) -> None:
    """One line per stage: how it ran, what its manifest says, seconds, exit code, and the
    reason of a skipped or failed stage."""
    print(f"\n{'stage':<12} {'run':<10} {'status':<8} {'seconds':>8}  exit  reason")
    for r in rows:
        reason = r["reason"] if r["status"] != "ok" and r["reason"] else ""
        print(
            f"{r['stage']:<12} {r['run']:<10} {str(r['status']):<8} {r['seconds']:>8.1f}  "
            f"{r['exit_code']:>4}  {reason}"
        )
    print(f"{'total':<12} {'':<10} {'':<8} {total:>8.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
