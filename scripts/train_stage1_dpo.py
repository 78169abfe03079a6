"""Stage-1 DPO: continue the SFT LoRA adapter on self-judged preference pairs (TRL DPOTrainer).

    python scripts/train_stage1_dpo.py --run-dir runs/demo        # pairs: runs/demo/pairs/pairs.jsonl
                                                              # adapter: runs/demo/sft/adapter
    python scripts/train_stage1_dpo.py --run-dir runs/demo --set dpo.beta=0.2 --set dpo.max_steps=20
    torchrun --nproc_per_node 2 scripts/train_stage1_dpo.py --run-dir runs/demo

The base model comes from CleanModelLoader, the SFT adapter is attached (its base-weights hash
is checked) and trained further; TRL keeps a frozen copy of it as the reference, so the
reference policy is the SFT policy. Logs rewards, margins and the chosen log-prob change per
logging step to <out>/dpo_log.jsonl and warns when the chosen log-probs fall (trl #800).
Writes <out>/adapter/, mask_audit.json/.txt and manifest.json. Exit codes (utils/errors.py): 0
ok (a falling chosen log-prob is a warning, recorded in the manifest; an empty pairs file is a
recorded skip, manifest ``skipped``), 2 bad input, 3 the mask audit failed, 1 a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from utils.config import add_config_args, section
from utils.dpo import DPOStageConfig, load_pairs, make_dpo_args, run_dpo
from utils.errors import EXIT_OK, STATUS_SKIPPED, InputMissingError, as_input_error
from utils.provenance import write_manifest
from utils.run_context import load_stage_config, stage_main
from utils.training_common import (
    MODEL_KEYS,
    load_base_model,
    resolve_device,
    split_dev,
)


def print_summary(out: Path, s: dict) -> None:
    t, d, trend = s["training"], s["data"], s["chosen_logprob_trend"]

    def f(x: object, nd: int = 4) -> str:
        return f"{x:.{nd}g}" if isinstance(x, float) else str(x)

    rows = [
        ("output", str(out)),
        ("pairs / train / dev", f"{d['n_records']} / {d['n_train']} / {d['n_dev']}"),
        ("dropped (too long / margin)", f"{len(d['dropped_too_long'])} / {d['n_below_min_margin']}"),
        ("steps (resumed from)", f"{t['global_step']} ({t['resumed_from_step']})"),
        ("loss (mean)", f(t["train_loss_mean"])),
        ("rewards chosen / rejected", f"{f(t['rewards_chosen_last'])} / {f(t['rewards_rejected_last'])}"),
        ("margin / accuracy (last log)", f"{f(t['rewards_margin_last'])} / {f(t['rewards_accuracy_last'])}"),
        ("chosen log-prob trend", ("WARNING: " if trend["falling"] else "") + trend["message"]),
        ("step seconds wall / CPU", f"{f(t['step_seconds_mean'])} / {f(t['step_cpu_seconds_mean'])}"),
        ("world size", str(t["world_size"])),
        ("adapter", s["adapter"]["path"]),
    ]  # fmt: skip
    w = max(len(k) for k, _ in rows)
    print("\nstage-1 DPO")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def _why_no_pairs(pairs_dir: Path) -> str:
    """The drop counts the stage that wrote the pairs recorded (preference pairs or CAI pairs:
    both manifests carry ``counts.pairs_dropped``), as ": its stage dropped all: reason n, ..."."""
    try:
        dropped = json.loads((pairs_dir / "manifest.json").read_text())["counts"]["pairs_dropped"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    parts = [f"{k} {n}" for k, n in dropped.items() if n]
    return f": its stage dropped every candidate pair ({', '.join(parts)})" if parts else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument(
        "--run-dir", default="runs/default", help="run directory (default: %(default)s)"
    )
    ap.add_argument("--pairs", help="preference pairs (default: <run>/pairs/pairs.jsonl)")
    ap.add_argument("--sft-adapter", help="SFT adapter to continue (default: <run>/sft/adapter)")
    ap.add_argument("--out", help="output directory (default: <run>/dpo)")
    ap.add_argument("--fresh", action="store_true", help="discard checkpoints, do not resume")
    ap.add_argument(
        "--overrides-section",
        help="a config section whose keys replace the dpo section's (the cai stage: cai_dpo)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dir) / "dpo"
    return stage_main("dpo", out, lambda: run_stage(args, out))


def run_stage(args: argparse.Namespace, out: Path) -> int:
    run = Path(args.run_dir)
    pairs_path = Path(args.pairs) if args.pairs else run / "pairs" / "pairs.jsonl"
    sft_adapter = Path(args.sft_adapter) if args.sft_adapter else run / "sft" / "adapter"
    if pairs_path.exists() and not pairs_path.read_text().strip():
        # The pairs stage kept no pair (its critic could not separate candidates): nothing to
        # train on. Say so in the manifest; evaluation reports the dpo arm as skipped.
        out.mkdir(parents=True, exist_ok=True)
        reason = f"{pairs_path} holds no preference pair" + _why_no_pairs(pairs_path.parent)
        write_manifest(
            out / "manifest.json", stage="dpo", config={}, status=STATUS_SKIPPED, reason=reason
        )
        print(f"stage-1 DPO skipped: {reason} (see {pairs_path.parent / 'manifest.json'})")
        return EXIT_OK
    sections = ("model", "dpo", *([args.overrides_section] if args.overrides_section else []))
    cfg_all = load_stage_config(args.config, args.overrides, sections)
    with as_input_error():  # config values and the pairs file; training errors are crashes
        dpo_values = dict(section(cfg_all, "dpo"))
        if args.overrides_section:  # the cai stage trains with cai_dpo's keys over dpo's
            dpo_values.update(section(cfg_all, args.overrides_section))
        cfg = DPOStageConfig.from_dict(dpo_values)
        model_cfg = {k: v for k, v in (cfg_all.get("model") or {}).items() if k in MODEL_KEYS}
        if not (sft_adapter / "adapter_config.json").exists():
            raise InputMissingError(
                f"{sft_adapter}: no SFT adapter (run train_stage1_sft.py first)"
            )
        pairs, data_info = load_pairs(pairs_path, min_margin=cfg.min_margin)
        use_cpu = resolve_device(model_cfg.get("device")).startswith("cpu")
        train, dev = split_dev(pairs, cfg.dev_fraction, cfg.max_dev_examples, cfg.seed)
        trl_args = make_dpo_args(cfg, out, bool(dev), use_cpu)  # before the model: ZeRO-3 init
    lm = load_base_model(model_cfg)  # a missing or refused model: ProjectInputError
    # A failed mask audit raises MaskAuditError, a GateError: exit 3 (stage_main).
    result = run_dpo(lm, train, dev, cfg, trl_args, out, data_info, sft_adapter, args.fresh)
    if result.is_main:
        write_manifest(
            out / "manifest.json",
            stage="dpo",
            config={
                "dpo": dataclasses.asdict(cfg),
                "overrides_section": args.overrides_section,
                "model": model_cfg,
            },
            config_file=cfg_all.get("_config_path"),
            overrides=args.overrides,
            model=lm.provenance,
            **result.summary,
        )
        print_summary(out, result.summary)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
