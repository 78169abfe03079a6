"""Stage-1 SFT: train a LoRA adapter on the base model's own instruction data (TRL SFTTrainer).

    python scripts/train_stage1_sft.py --run-dir runs/demo                 # reads runs/demo/stage1/train.jsonl
    python scripts/train_stage1_sft.py --run-dir runs/demo --set sft.max_steps=20
    torchrun --nproc_per_node 2 scripts/train_stage1_sft.py --run-dir runs/demo   # 2 processes (gloo on CPU)
    accelerate launch --config_file configs/accelerate/fsdp_qwen2.5-32b.yaml scripts/train_stage1_sft.py ...

Trains on prompt = format_prompt(instruction), completion = format_completion(response) + EOS,
loss on the completion and EOS only. Before the first step the mask audit checks the trainer's
tokenised dataset (mask_audit.json / mask_audit.txt). A killed run resumes from the last
checkpoint in <out>/checkpoints when rerun with the same command (--fresh starts over).
Writes <out>/adapter/ (+ adapter_manifest.json with the base weights hash), train_log.jsonl and
manifest.json. Exit codes (utils/errors.py): 0 ok, 2 bad input, 3 the mask audit failed, 1 a
crash (traceback printed, manifest ``failed``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from utils.config import add_config_args, section
from utils.errors import EXIT_OK, as_input_error
from utils.provenance import write_manifest
from utils.run_context import load_stage_config, stage_main
from utils.sft import (
    SFTStageConfig,
    balance_types,
    load_stage1,
    make_sft_args,
    run_sft,
)
from utils.training_common import (
    MODEL_KEYS,
    load_base_model,
    resolve_device,
    split_dev,
)


def print_summary(out: Path, s: dict) -> None:
    t, d = s["training"], s["data"]

    def f(x: object, nd: int = 4) -> str:
        return f"{x:.{nd}g}" if isinstance(x, float) else str(x)

    rows = [
        ("output", str(out)),
        ("records / train / dev", f"{d['n_records']} / {d['n_train']} / {d['n_dev']}"),
        ("dropped (too long)", str(len(d["dropped_too_long"]))),
        ("steps (resumed from)", f"{t['global_step']} ({t['resumed_from_step']})"),
        ("train loss first -> last", f"{f(t['train_loss_first'])} -> {f(t['train_loss_last'])}"),
        ("dev loss: adapter / base model", f"{f(t['eval_loss'])} / {f(t.get('base_eval_loss'))}"),
        (
            "step seconds wall / CPU",
            f"{f(t['step_seconds_mean'])} / {f(t['step_cpu_seconds_mean'])}",
        ),
        ("world size", str(t["world_size"])),
        ("mask audit", "passed" if s["mask_audit"]["passed"] else "FAILED"),
        ("adapter", s["adapter"]["path"]),
    ]
    w = max(len(k) for k, _ in rows)
    print("\nstage-1 SFT")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument(
        "--run-dir", default="runs/default", help="run directory (default: %(default)s)"
    )
    ap.add_argument("--data", help="stage-1 records (default: <run>/stage1/train.jsonl)")
    ap.add_argument("--out", help="output directory (default: <run>/sft)")
    ap.add_argument("--fresh", action="store_true", help="discard checkpoints, do not resume")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dir) / "sft"
    return stage_main("sft", out, lambda: run_stage(args, out))


def run_stage(args: argparse.Namespace, out: Path) -> int:
    run = Path(args.run_dir)
    data = Path(args.data) if args.data else run / "stage1" / "train.jsonl"
    cfg_all = load_stage_config(args.config, args.overrides, ("model", "sft"))
    with as_input_error():  # config values and the data file; training errors are crashes
        cfg = SFTStageConfig.from_dict(section(cfg_all, "sft"))
        model_cfg = {k: v for k, v in (cfg_all.get("model") or {}).items() if k in MODEL_KEYS}
        examples, data_info = load_stage1(data, run / "stage1" / "test_instructions.jsonl")
        train, dev = split_dev(examples, cfg.dev_fraction, cfg.max_dev_examples, cfg.seed)
        train, data_info["type_balance"] = balance_types(train, cfg.min_examples_per_type)
        use_cpu = resolve_device(model_cfg.get("device")).startswith("cpu")
        trl_args = make_sft_args(cfg, out, bool(dev), use_cpu)  # before the model: ZeRO-3 init
    lm = load_base_model(model_cfg)  # a missing or refused model: ProjectInputError
    # A failed mask audit raises MaskAuditError, a GateError: exit 3 (stage_main).
    result = run_sft(lm, train, dev, cfg, trl_args, out, data_info, fresh=args.fresh)
    if result.is_main:
        write_manifest(
            out / "manifest.json",
            stage="sft",
            config={"sft": dataclasses.asdict(cfg), "model": model_cfg},
            config_file=cfg_all.get("_config_path"),
            overrides=args.overrides,
            model=lm.provenance,
            **result.summary,
        )
        print_summary(out, result.summary)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
