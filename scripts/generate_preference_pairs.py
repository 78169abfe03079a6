"""Preference pairs from the model's own samples, judged by the BASE model (critic.pair_mode).

    python scripts/generate_preference_pairs.py --run runs/default
    python scripts/generate_preference_pairs.py --run runs/default --set pairs.num_candidates=6

Reads runs/<run>/stage1/train.jsonl and the SFT adapter runs/<run>/sft/adapter (when the
``sft`` source is configured); writes runs/<run>/pairs/{pairs,judgements}.jsonl and
manifest.json. Rerunning after a kill resumes with no duplicate. Exit codes (utils/errors.py):
0 ok, 3 no pair kept (manifest ``skipped`` with the drop counts), 2 bad input, 1 a crash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.clean_model_loader import adapter_hash, attach_adapter
from utils.config import add_config_args, section
from utils.critic import CriticConfig, judge_prompt_id
from utils.errors import EXIT_OK, InputMissingError, ProjectInputError, as_input_error
from utils.preference_pairs import (
    PairsConfig,
    load_training_instructions,
    run_preference_pairs,
)
from utils.run_context import StageRun, stage_main
from utils.soft_label_summary import print_summary_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--run", required=True, help="run directory, e.g. runs/default")
    ap.add_argument("--out", default=None, help="output directory (default: <run>/pairs)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / "pairs"
    return stage_main("pairs", out, lambda: run_stage(args, out))


def run_stage(args: argparse.Namespace, out: Path) -> int:
    run_dir = Path(args.run)
    train_path = run_dir / "stage1" / "train.jsonl"
    adapter_dir = run_dir / "sft" / "adapter"
    run = StageRun.start("pairs", args.config, args.overrides, out, ("pairs", "critic"))
    with as_input_error():  # config values and the instructions file
        cfg = PairsConfig.from_dict(section(run.cfg, "pairs"))
        critic = CriticConfig.from_dict(section(run.cfg, "critic"))
        records = load_training_instructions(train_path)
    if not records:
        raise ProjectInputError(f"{train_path}: no training instructions")
    use_sft = "sft" in cfg.candidate_sources
    if use_sft and not adapter_dir.is_dir():
        raise InputMissingError(f"{adapter_dir}: no SFT adapter (needed by source 'sft')")
    lm = run.load_model()
    if use_sft:
        attach_adapter(lm, adapter_dir)
    summary = run_preference_pairs(
        lm, records, cfg, critic, run.out_dir, progress=not args.no_progress
    )
    print_summary(summary, run.out_dir)
    fields = {
        "inputs": {
            "train": str(train_path),
            "adapter": str(adapter_dir) if use_sft else None,
            "adapter_sha256": adapter_hash(adapter_dir) if use_sft else None,
        },
        "pairs_config": cfg.to_dict(),
        "critic_config": critic.to_dict(),
        "judge_prompt": judge_prompt_id(critic),
        **summary,
    }
    c = summary["counts"]
    if c["pairs_kept"] == 0:
        dropped = ", ".join(f"{k} {n}" for k, n in c["pairs_dropped"].items() if n)
        return run.skip(
            f"no preference pair kept ({dropped or 'no comparable candidates'})", **fields
        )
    run.finish(**fields)
    return EXIT_OK


def print_summary(summary: dict, out_dir: Path) -> None:
    c = summary["counts"]
    rows = [
        ("instructions", c["instructions"]),
        ("  without two comparable candidates", c["instructions_without_comparable_candidates"]),
        ("candidates", c["candidates"]),
        *((f"  excluded: {k}", v) for k, v in c["candidates_excluded"].items()),
        ("comparisons", c["comparisons"]),
        (
            "position-consistent comparisons",
            f"{c['position_consistent_rate']:.3f}"
            if c["position_consistent_rate"] is not None
            else "n/a",
        ),
        ("pairs considered", c["pairs_considered"]),
        ("pairs kept", c["pairs_kept"]),
        *((f"  dropped: {k}", v) for k, v in c["pairs_dropped"].items()),
        (
            "generate / judge seconds",
            f"{summary['timings']['generate_s']} / {summary['timings']['judge_s']}",
        ),
    ]
    print_summary_table("preference pairs summary", rows, c["soft_label_histogram_kept"])
    print(f"\nwrote {out_dir / 'pairs.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
