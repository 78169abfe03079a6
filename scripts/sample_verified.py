"""Program-verified rejection sampling: k samples per constrained instruction, checked by the
constraint checkers and a base-model relevance filter; keeps one per instruction, and pairs
passing against failing samples (utils/verified_sampling.py).

    python scripts/sample_verified.py --run runs/x --round 1                       # base, few-shot
    python scripts/sample_verified.py --run runs/x --round 2 --policy runs/x/sft_r1/adapter \\
        --previous runs/x/verified_r1/sft_data.jsonl
    python scripts/sample_verified.py --run runs/x --round 3 --policy runs/x/sft/adapter --out runs/x/pairs

Reads <run>/stage1/constrained.jsonl; writes samples.jsonl, train.jsonl, sft_data.jsonl,
pairs.jsonl, stats.json and manifest.json into --out (default <run>/verified_r<round>).
Rerunning after a kill resumes with no duplicate. Exit codes (utils/errors.py): 0 ok, 2 bad
input, 3 nothing kept (manifest failed: the next SFT has no data), 1 a crash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.clean_model_loader import adapter_hash, attach_adapter
from utils.completion_prompts import load_response_examples
from utils.config import add_config_args, section
from utils.constraint_library import constraints_from_config
from utils.critic import CriticConfig
from utils.errors import EXIT_OK, InputMissingError, as_input_error
from utils.jsonl_io import RECORD_ID, read_jsonl, write_json_atomic
from utils.run_context import StageRun, stage_main
from utils.soft_label_summary import histogram, print_summary_table
from utils.verified_sampling import (
    POLICY_BASE,
    VerifiedConfig,
    allowed_demos,
    load_constrained,
    run_verified_sampling,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--run", required=True, help="run directory, e.g. runs/default")
    ap.add_argument("--round", type=int, required=True, help="round index (1 = base few-shot)")
    ap.add_argument("--policy", default=POLICY_BASE,
                    help="base_fewshot, or the adapter directory of the sampling policy")  # fmt: skip
    ap.add_argument("--previous", default=None, help="sft_data.jsonl of the previous round")
    ap.add_argument(
        "--out", default=None, help="output directory (default: <run>/verified_r<round>)"
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / f"verified_r{args.round}"
    return stage_main("verified", out, lambda: run_stage(args, out))


def run_stage(args: argparse.Namespace, out: Path) -> int:
    data_path = Path(args.run) / "stage1" / "constrained.jsonl"
    policy = args.policy
    run = StageRun.start(
        "verified", args.config, args.overrides, out, ("verified", "critic", "constraints")
    )
    with as_input_error():
        if args.round < 1:
            raise ValueError(f"--round must be >= 1, got {args.round}")
        cfg = VerifiedConfig.from_dict(section(run.cfg, "verified"))
        critic = CriticConfig.from_dict(section(run.cfg, "critic"))
        split, _mix, _seed = constraints_from_config(run.cfg.get("constraints"))
        records = load_constrained(data_path, split)
        if not records:
            raise ValueError(f"{data_path}: no constrained instructions")
        # The previous round's SFT data joins this round's: the fields load_stage1 trains on.
        sft_fields = {"id": RECORD_ID, "instruction": str, "response": str}
        previous = read_jsonl(args.previous, sft_fields) if args.previous else []
        demos = allowed_demos(load_response_examples(), split)
    if policy != POLICY_BASE and not Path(policy).is_dir():
        raise InputMissingError(f"{policy}: no policy adapter directory")
    lm = run.load_model()
    if policy != POLICY_BASE:
        attach_adapter(lm, Path(policy))
    summary = run_verified_sampling(
        lm, records, cfg, critic, run.out_dir, policy, args.round, demos,
        previous_sft_data=previous, progress=not args.no_progress, split=split,
    )  # fmt: skip
    stats = summary["stats"]
    write_json_atomic(run.out_dir / "stats.json", stats)
    fields = dict(
        inputs={
            "constrained": str(data_path),
            "previous": args.previous,
            "policy": policy,
            "policy_sha256": adapter_hash(Path(policy)) if policy != POLICY_BASE else None,
        },
        round=args.round,
        verified_config=cfg.to_dict(),
        critic_config=critic.to_dict(),
        constraint_split=split.to_dict(),
        demos=len(demos),
        counts={
            "kept": stats["kept"],
            "pairs_kept": stats["pairs"],
            "pairs_dropped": stats["pairs_dropped"],
        },  # fmt: skip
        **summary,
    )
    print_summary(args.round, policy, summary, run.out_dir)
    if stats["kept"] == 0:  # nothing to train on: the next SFT cannot run, so the run stops
        return run.fail_gate("no sample passed the checkers and the relevance filter", **fields)
    run.finish(**fields)
    return EXIT_OK


def print_summary(round_index: int, policy: str, summary: dict, out_dir: Path) -> None:
    stats = summary["stats"]
    rows = [
        ("round / policy", f"{round_index} / {policy}"),
        (
            "instructions (constrained)",
            f"{stats['instructions']} ({stats['constrained_instructions']})",
        ),
        ("candidates", stats["candidates"]),
        *((f"  excluded: {k}", v) for k, v in stats["candidates_excluded"].items()),
        (
            "prompt-level pass@1 / pass@k",
            f"{stats['prompt_pass_at_1']} / {stats['prompt_pass_at_k']}",
        ),
        ("passing but irrelevant candidates", stats["passing_but_irrelevant_candidates"]),
        ("kept (constrained)", f"{stats['kept']} ({stats['kept_constrained']})"),
        ("hindsight records", stats["hindsight_records"]),
        ("SFT records for the next SFT", stats["sft_data_records"]),
        ("pairs", f"{stats['pairs']} {stats['pairs_by_judge']}"),
        *((f"  pairs dropped: {k}", v) for k, v in stats["pairs_dropped"].items()),
        (
            "sample / judge seconds",
            f"{summary['timings']['sample_s']} / {summary['timings']['judge_s']}",
        ),
    ]
    hist = histogram([p["soft_label"] for p in read_jsonl(out_dir / "pairs.jsonl")])
    print_summary_table("verified sampling summary", rows, hist)
    print("per-type pass@1 / pass@k:")
    for t, v in stats["per_type"].items():
        print(f"  {t:<48} {v['pass_at_1']:.3f} / {v['pass_at_k']:.3f}  (n={v['instructions']})")
    print(f"\nwrote {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
