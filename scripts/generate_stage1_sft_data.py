"""Stage 1: instruction-following SFT data from the BASE model alone, by few-shot completion.

    python scripts/generate_stage1_sft_data.py --out runs/default/stage1
    python scripts/generate_stage1_sft_data.py --config configs/quick.yaml --out runs/quick/stage1
    python scripts/generate_stage1_sft_data.py --set stage1.n_train=50 --set stage1.use_critic=false

Writes train.jsonl, test_instructions.jsonl, instructions.jsonl, rejected_*.jsonl, qc.json and
manifest.json into --out. Rerunning after a kill resumes. Exit codes (utils/errors.py): 0 ok,
2 bad input, 3 a QC gate failed (manifest ``failed``), 1 a crash.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from utils.config import add_config_args, section
from utils.constraint_library import constrain_tasks, constraints_from_config
from utils.critic import CriticConfig
from utils.errors import EXIT_OK, as_input_error
from utils.jsonl_io import read_jsonl, write_json_atomic, write_jsonl_atomic
from utils.run_context import StageRun, stage_main
from utils.stage1 import Stage1Config, run_stage1


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
    return stage_main("stage1", args.out, lambda: run_stage(args))


def run_stage(args: argparse.Namespace) -> int:
    run = StageRun.start(
        "stage1", args.config, args.overrides, args.out, ("stage1", "critic", "constraints")
    )
    with as_input_error():
        cfg = Stage1Config.from_dict(section(run.cfg, "stage1"))
        critic_cfg = CriticConfig.from_dict(run.cfg.get("critic"))
        split, mix, cseed = constraints_from_config(run.cfg.get("constraints"))
    lm = run.load_model()
    summary = run_stage1(lm, cfg, run.out_dir, progress=not args.no_progress, critic_cfg=critic_cfg)
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
    print_summary(summary, run.out_dir)
    fields = {k: v for k, v in summary.items() if k != "config"}
    if summary["gates_passed"]:
        run.finish(**fields)
        return EXIT_OK
    verdict = summary["gate_report_text"].strip().splitlines()[-1]
    return run.fail_gate(f"stage-1 quality gate failed: {verdict}", **fields)


def print_summary(summary: dict, out_dir: Path) -> None:
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
    print(f"\nwrote {out_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
