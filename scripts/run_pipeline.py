"""The whole bootstrap in one command, on the embedded base model by default:

    python scripts/run_pipeline.py                  # CPU default (configs/cpu_default.yaml)
    python scripts/run_pipeline.py --quick          # small preset (configs/quick.yaml), minutes
    python scripts/run_pipeline.py --config configs/qwen2.5-32b_h100.yaml --run runs/qwen32b

Runs preflight, then stage-1 data -> SFT -> preference pairs -> DPO -> evaluation into one run
directory. Finished stages whose config and inputs are unchanged are skipped; a killed run
resumes. Ends with the evaluation summary table and the path of the report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config  # noqa: E402
from utils.pipeline import STAGES, build_stages, run_pipeline  # noqa: E402

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
        cfg = load_config(config_path, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.skip_preflight:
        pre = [sys.executable, str(REPO_ROOT / "scripts" / "preflight.py"), "--config", config_path]
        for o in args.overrides:
            pre += ["--set", o]
        if subprocess.run(pre).returncode != 0:
            print(
                "preflight failed; see the table above (or pass --skip-preflight)", file=sys.stderr
            )
            return 1
    try:
        stages = build_stages(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only or ()) - {s.name for s in stages})
    if unknown:
        print(
            f"error: --only {unknown}: this recipe's stages are {[s.name for s in stages]}",
            file=sys.stderr,
        )
        return 2
    rows = run_pipeline(run_dir, cfg, config_path, args.overrides, stages=stages, only=args.only)
    total = time.perf_counter() - t0

    print(f"\n{'stage':<8} {'status':<8} {'seconds':>8}  exit")
    for r in rows:
        print(f"{r['stage']:<8} {r['status']:<8} {r['seconds']:>8.1f}  {r['exit_code']}")
    print(f"{'total':<8} {'':<8} {total:>8.1f}")
    failed = [r for r in rows if r["failed"]]
    summary = run_dir / "eval" / "summary.txt"
    if summary.exists():
        print("\n" + summary.read_text())
    report = run_dir / "eval" / "report.md"
    if report.exists():
        print(f"report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
