"""Choose ``cai.mode`` by measurement: each mode's pair label on the hand-written principle pairs
(``configs/constitution_eval/principles.jsonl``, dev split by default), base weights.

    python scripts/choose_cai_mode.py                      # dev split, writes docs/cai_mode_choice.json
    python scripts/choose_cai_mode.py --split test --out /tmp/test.json   # for the record only

The label that prefers the principle-following response more often is the mode to use
(utils/cai_mode_selection.py). The test split stays for the constitution evaluation; choosing
on it would tune to the measure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.cai_mode_selection import compare_modes, contrastive_margins, revise_margins
from utils.clean_model_loader import CleanModelLoader
from utils.config import add_config_args, load_config
from utils.constitution_config import CAIConfig
from utils.constitution_eval import load_principle_items
from utils.constitution_prompts import load_constitution
from utils.errors import EXIT_OK, as_input_error
from utils.provenance import write_manifest
from utils.run_context import stage_main
from utils.training_common import resolve_device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--out", default="docs/cai_mode_choice.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    return stage_main("choose_cai_mode", None, lambda: run(args, out))


def run(args: argparse.Namespace, out: Path) -> int:
    cfg_all = load_config(args.config, args.overrides)
    with as_input_error():
        cfg = CAIConfig.from_dict(cfg_all.get("cai"))
        constitution = load_constitution()
        items = [it for it in load_principle_items() if it.split == args.split]
    model = cfg_all.get("model") or {}
    lm = CleanModelLoader(
        device=resolve_device(model.get("device")), dtype=model.get("dtype")
    ).load(model.get("name"))
    margins = {
        "contrastive": contrastive_margins(lm, items, constitution, cfg),
        "revise": revise_margins(lm, items, constitution, cfg),
    }
    result = compare_modes(margins)
    print(f"\ncai.mode on the {args.split} split (n = {len(items)}), base weights:")
    for mode, a in result["arms"].items():
        print(f"  {mode:<12} label right {a['successes']:>3}/{a['n']}  "
              f"{100 * a['accuracy']:.1f}% [{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}]")  # fmt: skip
    m = result["mcnemar"]
    print(f"  McNemar: contrastive only {m['n_a_only']}, revise only {m['n_b_only']}, "
          f"p = {m['p_value']:.4f}\n  chosen: {result['chosen']}")  # fmt: skip
    write_manifest(
        out,
        stage="choose_cai_mode",
        config={"cai": cfg.to_dict(), "split": args.split},
        config_file=cfg_all.get("_config_path"),
        overrides=args.overrides,
        model=lm.provenance,
        items=[it.id for it in items],
        margins=margins,
        **result,
    )
    print(f"written: {out}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
