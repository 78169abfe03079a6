"""Evaluate every arm of a run on the held-out verifiable-instruction set, one model at a time.

    python scripts/evaluate_capability_differentiation.py --run runs/demo
    python scripts/evaluate_capability_differentiation.py --run runs/demo --arms base,base_icl \
        --adapter cai=runs/demo/cai/adapter --set eval.n_prompts=320

Writes <run>/eval/results.json, report.md, accuracy.png, per_type_heatmap.png, manifest.json
and the per-arm generation caches under <run>/eval/cache/ (a rerun of finished arms is instant,
an interrupted one resumes). Exit codes (utils/errors.py): 0 when the evaluation completed,
whatever the result; 2 bad input; 1 a crash (traceback printed, manifest ``failed``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.config import add_config_args, apply_overrides, load_config
from utils.constraint_library import constraints_from_config
from utils.errors import EXIT_OK, as_input_error
from utils.eval_config import (
    BASE_ARMS,
    EvalConfig,
    EvalInputError,
    ModelSpec,
    parse_arm_list,
)
from utils.evaluation import run_evaluation
from utils.provenance import write_manifest
from utils.report import summary_table, write_report
from utils.run_context import check_sections, stage_main

_ARM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory, e.g. runs/demo")
    parser.add_argument("--arms", help="comma-separated arms (default: eval.arms of the config)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH",
        help="evaluate another adapter as arm NAME (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", help="output directory (default: <run>/eval)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_args(parser)
    return parser.parse_args(argv)


def parse_adapter_args(items: Sequence[str]) -> dict[str, Path]:
    """``["name=path", ...]`` (the repeatable --adapter option) -> {name: Path}."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise EvalInputError(f"--adapter must look like NAME=PATH, got {item!r}")
        if not _ARM_NAME.match(name):
            raise EvalInputError(f"--adapter name {name!r}: use letters, digits, '_', '-', '.'")
        if name in BASE_ARMS:
            raise EvalInputError(f"--adapter name {name!r} is reserved for an arm without adapter")
        if name in out:
            raise EvalInputError(f"--adapter {name!r} is given twice")
        out[name] = Path(path)
    return out


def build_configs(args: argparse.Namespace) -> tuple[dict, EvalConfig, ModelSpec]:
    """Config file + eval defaults for keys the file lacks + --set overrides, checked."""
    cfg = load_config(args.config)
    cfg["eval"] = {**EvalConfig().to_dict(), **(cfg.get("eval") or {})}
    cfg["model"] = {"name": ModelSpec().name, **(cfg.get("model") or {})}
    cfg = apply_overrides(cfg, args.overrides)
    check_sections(cfg, ("model", "eval", "sentinels", "constraints"))
    eval_cfg = dict(cfg["eval"])
    if args.arms:
        eval_cfg["arms"] = parse_arm_list(args.arms)
    if args.no_progress:
        eval_cfg["progress"] = False
    # The sentinel options every stage shares, with eval.sentinel keys on top.
    eval_cfg["sentinel"] = {**(cfg.get("sentinels") or {}), **(eval_cfg.get("sentinel") or {})}
    return cfg, EvalConfig.from_dict(eval_cfg), ModelSpec.from_dict(cfg["model"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out) if args.out else Path(args.run) / "eval"
    return stage_main("eval", out_dir, lambda: run_stage(args, out_dir))


def run_stage(args: argparse.Namespace, out_dir: Path) -> int:
    with as_input_error():  # config values, arm and adapter options, the constraint split
        cfg, eval_config, model = build_configs(args)
        adapters = parse_adapter_args(args.adapter)
        split = constraints_from_config(cfg["constraints"])[0] if cfg.get("constraints") else None
    # run_evaluation raises EvalInputError (a ProjectInputError) on bad input before generating.
    results = run_evaluation(
        args.run, eval_config, model, adapters, out_dir=out_dir,
        held_out=split.held_out if split else None,
    )  # fmt: skip
    paths = write_report(results, out_dir)
    write_manifest(
        out_dir / "manifest.json",
        stage="eval",
        config={"eval": eval_config.to_dict(), "model": cfg["model"]},
        model_provenance=results["model"]["provenance"],
        base_weights_sha256=results["model"]["weights_sha256"],
        prompt_set=results["prompt_set"],
        arms={a["name"]: a["cache_key"] for a in results["arms"]},
        skipped_arms=results["skipped_arms"],
        counts={"n_prompts": results["prompt_set"]["n"], **results["headline"]},
        timings=results["timing"],
        outputs={k: str(v) for k, v in paths.items()},
    )
    print()
    print(summary_table(results))
    print(f"\nreport: {paths['report']}\nresults: {paths['results']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
