"""Constitutional (CAI) preference pairs, by ``cai.mode``: ``contrastive`` (the policy answers
after a context that follows a principle and after one that violates it; the BASE model's
principle-conditioned likelihood gain and program checkers filter them;
utils/constitution_contrastive.py), ``revise`` (the BASE model critiques, revises and judges
original vs revision against a principle; utils/constitution.py) or ``both``.

    python scripts/generate_cai_pairs.py --run runs/default
    python scripts/generate_cai_pairs.py --run runs/default --constitution configs/constitution.yaml
    python scripts/train_stage1_dpo.py --run-dir runs/default --pairs runs/default/cai_pairs/pairs.jsonl \\
        --sft-adapter <policy adapter from the manifest> --out runs/default/cai

Reads runs/<run>/stage1/train.jsonl and the policy adapter (``cai.policy``: auto = the DPO
adapter when stage 4 trained one, else runs/<run>/sft/adapter); writes
<out>/{records,pairs}.jsonl and manifest.json (default <out>: runs/<run>/cai_pairs). The run
config's ``cai`` section is optional (CAIConfig defaults when absent). Rerunning after a kill
resumes with no duplicate. Exit codes (utils/errors.py): 0 ok, 3 no pair kept (manifest
``skipped`` with the drop counts: the CAI DPO stage records a skip and the report lists the cai arm
as skipped), 2 bad input (the message names the file, line or principle, and field), 1 a crash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.clean_model_loader import adapter_hash, attach_adapter
from utils.config import add_config_args, section
from utils.constitution_config import CAIConfig
from utils.constitution_contrastive import print_contrastive_summary, run_cai
from utils.constitution_policy import resolve_policy
from utils.constitution_prompts import DEFAULT_CONSTITUTION, load_constitution
from utils.errors import EXIT_OK, ProjectInputError, as_input_error
from utils.preference_pairs import load_training_instructions
from utils.run_context import StageRun, stage_main
from utils.soft_label_summary import print_summary_table


def print_summary(summary: dict, out_dir: Path) -> None:
    c, t = summary["counts"], summary["timings"]
    rate = c["position_consistent_rate"]
    p_rev = c["p_revision_mean"]
    rows = [
        ("instructions", c["instructions"]),
        ("  judged (both orders)", c["judged"]),
        ("pairs kept", c["pairs_kept"]),
        ("  chosen = revision / original",
         f"{c['chosen_side']['revision']} / {c['chosen_side']['original']}"),
        *((f"  dropped: {k}", v) for k, v in c["pairs_dropped"].items()),
        ("position-consistent judgements", "n/a" if rate is None else f"{rate:.3f}"),
        ("mean P(prefer revision)", "n/a" if p_rev is None else f"{p_rev:.3f}"),
        ("resumed / new instructions",
         f"{summary['resume']['instructions_already_done']} / "
         f"{summary['resume']['instructions_new']}"),
        ("response / critique / revision / judge s",
         f"{t['response_s']} / {t['critique_s']} / {t['revision_s']} / {t['judge_s']}"),
    ]  # fmt: skip
    print_summary_table("CAI pairs summary", rows, c["soft_label_histogram_kept"])
    print(f"\nwrote {out_dir / 'pairs.jsonl'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--run", required=True, help="run directory, e.g. runs/default")
    ap.add_argument("--out", default=None, help="output directory (default: <run>/cai_pairs)")
    ap.add_argument(
        "--constitution", default=str(DEFAULT_CONSTITUTION),
        help="constitution YAML (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / "cai_pairs"
    return stage_main("cai_pairs", out, lambda: run_stage(args, out))


def run_stage(args: argparse.Namespace, out: Path) -> int:
    run_dir = Path(args.run)
    # The constrained instructions: format-stating tasks (which could carry a held-out type) are
    # already dropped there; a run made before constraint augmentation falls back to train.jsonl.
    train_path = run_dir / "stage1" / "constrained.jsonl"
    if not train_path.exists():
        train_path = run_dir / "stage1" / "train.jsonl"
    run = StageRun.start("cai_pairs", args.config, args.overrides, out, ("cai",))
    with as_input_error():  # config values, the constitution, the instructions, the policy
        cfg = CAIConfig.from_dict(section(run.cfg, "cai") if "cai" in run.cfg else {})
        constitution = load_constitution(args.constitution)
        records = load_training_instructions(train_path)
        policy_name, adapter_dir = resolve_policy(run_dir, cfg.policy)
    if not records:
        raise ProjectInputError(f"{train_path}: no training instructions")
    policy = {
        "name": policy_name,
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "adapter_sha256": None if adapter_dir is None else adapter_hash(adapter_dir),
    }
    lm = run.load_model()
    if adapter_dir is not None:
        attach_adapter(lm, adapter_dir)
    summary = run_cai(
        lm, records, cfg, constitution, run.out_dir, policy, progress=not args.no_progress
    )
    if summary["mode"] == "revise":
        print_summary(summary, run.out_dir)
    elif summary["mode"] == "contrastive":
        print_contrastive_summary(summary, run.out_dir)
    else:  # both: each path's table, then the merged file
        print_summary(summary["revise"], run.out_dir / "revise")
        print_contrastive_summary(summary["contrastive"], run.out_dir / "contrastive")
        print(f"wrote {run.out_dir / 'pairs.jsonl'} ({summary['counts']['pairs_kept']} pairs)")
    fields = {
        "inputs": {
            "train": str(train_path),
            "constitution": str(args.constitution),
            "constitution_sha256": constitution.sha256,
            "policy": policy_name,
            "policy_adapter": policy["adapter"],
            "policy_adapter_sha256": policy["adapter_sha256"],
        },
        "cai_config": cfg.to_dict(),
        **summary,
    }
    c = summary["counts"]
    if c["pairs_kept"] == 0:
        dropped = ", ".join(f"{k} {n}" for k, n in c["pairs_dropped"].items() if n)
        return run.skip(f"no CAI pair kept ({dropped or 'nothing judged'})", **fields)
    run.finish(**fields)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
