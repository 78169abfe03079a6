"""Stage 1: instruction-following SFT data from the BASE model alone, by few-shot completion.

    python scripts/generate_stage1_sft_data.py --out runs/default/stage1
    python scripts/generate_stage1_sft_data.py --config configs/quick.yaml --out runs/quick/stage1
    python scripts/generate_stage1_sft_data.py --set stage1.n_train=50 --set stage1.use_critic=false

Writes train.jsonl, test_instructions.jsonl, instructions.jsonl, rejected_*.jsonl, qc.json and
manifest.json into --out. Rerunning after a kill resumes. Exit 0 ok, 1 a QC gate failed, 2 bad
input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.config import ConfigError, add_config_args, section  # noqa: E402
from utils.constraint_library import constraints_from_config  # noqa: E402
from utils.critic import CriticConfig  # noqa: E402
from utils.jsonl_io import (  # noqa: E402
    JsonlError,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from utils.run_context import StageRun  # noqa: E402
from utils.stage1 import Stage1Config, run_stage1  # noqa: E402
from utils.verified_sampling import constrain_tasks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument(
        "--out", default="runs/default/stage1", help="output directory (default: %(default)s)"
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        run = StageRun.start("stage1", args.config, args.overrides, args.out)
        cfg = Stage1Config.from_dict(section(run.cfg, "stage1"))
        critic_cfg = CriticConfig.from_dict(run.cfg.get("critic"))
        split, mix, cseed = constraints_from_config(run.cfg.get("constraints"))
        lm = run.load_model()
        summary = run_stage1(
            lm, cfg, run.out_dir, progress=not args.no_progress, critic_cfg=critic_cfg
        )
    except (ConfigError, JsonlError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(run.out_dir / "qc.json", {"qc": summary["qc"], "gates": summary["gates"]})
    # Constraint augmentation (TRAIN types only): the instructions the verified stage samples.
    constrained, dropped = constrain_tasks(
        read_jsonl(run.out_dir / "train.jsonl"), split, mix, cseed
    )
    write_jsonl_atomic(run.out_dir / "constrained.jsonl", constrained)
    summary["constraints"] = {
        "split": split.to_dict(),
        "mix": list(mix),
        "constrained_instructions": len(constrained),
        "dropped": dropped,
        "n_constraints": dict(Counter(len(r["instruction_ids"]) for r in constrained)),
    }
    run.finish(**{k: v for k, v in summary.items() if k != "config"})

    c, qc = summary["counts"], summary["qc"]
    print("\nstage 1 summary")
    rows = [
        (
            "instructions accepted / rejected",
            f"{c['instructions_accepted']} / {c['instructions_rejected']}",
        ),
        ("train records", c["train_records"]),
        ("held-out test instructions", c["test_instructions"]),
        ("constrained instructions", summary["constraints"]["constrained_instructions"]),
        ("wall time (s)", summary["timings_s"].get("total_s")),
    ]
    if "near_duplicate_rate" in qc:  # response QC (stage1.responses: true)
        rows += [
            ("near-duplicate rate", f"{qc['near_duplicate_rate']:.3f}"),
            ("marker leakage rate", f"{qc['marker_leakage_rate']:.3f}"),
            ("limit-hit rate (unfiltered)", f"{qc['unfiltered_responses']['limit_hit_rate']:.3f}"),
            ("median response tokens", qc["median_response_tokens"]),
        ]
    for k, v in rows:
        print(f"  {k:<34} {v}")
    print("  instruction rejections:", json.dumps(c["instruction_rejections"]))
    print(summary["gate_report_text"])
    print(f"\nwrote {run.out_dir}")
    return 0 if summary["gates_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
