"""How good a judge is the BASE model? Accuracy of utils.critic on the verifiable check set.

    python scripts/evaluate_critic.py --model gemma-3-270m
    python scripts/evaluate_critic.py --shots 2,4,8 --out runs/critic_eval

Every case's label is right by construction (utils/critic_checkset.py). The few-shot count and
the instruction threshold are chosen on the DEV split; the reported numbers are on the TEST
split, with Wilson 95% CIs. Writes results.json (every verdict) and manifest.json into --out.
Exit 0 ok; 1 when the test pairwise accuracy's CI does not clear --gate-min-accuracy (the judge
is not shown to beat chance); 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import critic_checkset as cc  # noqa: E402
from utils.config import ConfigError, add_config_args  # noqa: E402
from utils.critic import CriticConfig, judge_prompt_id  # noqa: E402
from utils.jsonl_io import JsonlError, write_json_atomic  # noqa: E402
from utils.run_context import StageRun  # noqa: E402


def _fmt(rate: dict) -> str:
    if rate["rate"] is None:
        return "n/a (n=0)"
    return f"{rate['rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] (n={rate['n']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--model", default=None, help="model name or path (default: config model.name)")
    ap.add_argument("--out", default="runs/critic_eval", help="output directory")
    ap.add_argument("--seed", type=int, default=cc.DEFAULT_SEED, help="check-set seed")
    ap.add_argument("--dev-fraction", type=float, default=cc.DEFAULT_DEV_FRACTION)
    ap.add_argument("--shots", default="2,4", help="few-shot counts to try on dev, comma-separated")
    ap.add_argument("--gate-min-accuracy", type=float, default=0.5)
    args = ap.parse_args(argv)
    try:
        shots = sorted({int(s) for s in args.shots.split(",") if s.strip()})
        if not shots:
            raise ValueError("--shots is empty")
        run = StageRun.start("critic_eval", args.config, args.overrides, args.out)
        if args.model:
            run.cfg["model"]["name"] = args.model
        base_cfg = CriticConfig.from_dict(run.cfg.get("critic", {}))
        for n in shots:  # validates the counts before the model loads
            replace(base_cfg, n_shots_pairs=n, n_shots_instructions=n)
        checkset = cc.build_checkset(args.seed, args.dev_fraction)
        lm = run.load_model()
    except (ConfigError, JsonlError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    scored, metrics, timing = {}, {}, {}
    for n in shots:
        cfg = replace(base_cfg, n_shots_pairs=n, n_shots_instructions=n)
        t0 = time.perf_counter()
        scored[n] = cc.score_checkset(lm, checkset, cfg)
        timing[n] = round(time.perf_counter() - t0, 1)
        metrics[n] = cc.variant_metrics(scored[n])
        print(f"[critic_eval] shots={n}: {timing[n]} s", file=sys.stderr)
    n_pair = cc.choose_variant(metrics, "pairs")
    n_ins = cc.choose_variant(metrics, "instructions")
    pt, it = metrics[n_pair]["pairs_test"], metrics[n_ins]["instructions_test"]
    chosen_cfg = replace(base_cfg, n_shots_pairs=n_pair, n_shots_instructions=n_ins)
    report = {
        "model": lm.provenance["model_id"],
        "checkset": {
            "seed": checkset["seed"],
            "dev_fraction": checkset["dev_fraction"],
            "sha256": checkset["sha256"],
            "pairs": {s: sum(c["split"] == s for c in checkset["pairs"]) for s in ("dev", "test")},
            "instructions": {
                s: sum(c["split"] == s for c in checkset["instructions"]) for s in ("dev", "test")
            },
        },
        "chosen_on_dev": {
            "n_shots_pairs": n_pair,
            "n_shots_instructions": n_ins,
            "instruction_threshold": it["threshold"],
        },
        "judge_prompt": judge_prompt_id(chosen_cfg),
        "test": {
            "pairs": pt,
            "pairs_per_kind": cc.per_kind_accuracy(scored[n_pair]["pairs"], "test"),
            "instructions": it,
        },
        "variants": {str(n): metrics[n] for n in shots},
        "seconds_per_variant": {str(n): timing[n] for n in shots},
        "verdicts": {str(n): scored[n] for n in shots},
    }
    gate_ok = pt["accuracy"]["ci_low"] > args.gate_min_accuracy
    report["gate"] = {
        "test_pair_accuracy_ci_low": pt["accuracy"]["ci_low"],
        "min": args.gate_min_accuracy,
        "passed": gate_ok,
    }
    write_json_atomic(run.out_dir / "results.json", report)
    run.finish(
        critic_config=base_cfg.to_dict(),
        shots_grid=shots,
        chosen_on_dev=report["chosen_on_dev"],
        test=report["test"],
        gate=report["gate"],
        checkset=report["checkset"],
    )

    print(f"\ncritic check set, model {report['model']} (TEST split; choices made on DEV)")
    rows = [
        ("few-shot count (pairs / instructions)", f"{n_pair} / {n_ins}"),
        ("pairwise accuracy", _fmt(pt["accuracy"])),
        ("both-orders consistency", _fmt(pt["position_consistency"])),
        ("consistent and correct", _fmt(pt["consistent_and_correct"])),
        ("mean P(' A') over orders (0.5 = unbiased)", f"{pt['mean_p_a']:.3f}"),
    ]
    for t, m in pt["at_threshold"].items():
        rows.append(
            (f"accuracy at soft label >= {t}", f"{_fmt(m['accuracy'])}, cov {m['coverage']:.2f}")
        )
    rows += [
        ("instruction judge AUC", f"{it['auc']:.3f}" if it["auc"] is not None else "n/a"),
        (f"instruction accuracy at t={it['threshold']:.3f}", _fmt(it["accuracy"])),
        ("  recall on good instructions", _fmt(it["recall_good"])),
        ("  recall on corrupted instructions", _fmt(it["recall_bad"])),
    ]
    for kind, m in report["test"]["pairs_per_kind"].items():
        rows.append((f"  pairs: {kind}", _fmt(m)))
    for n in shots:
        d = metrics[n]
        rows.append(
            (
                f"dev shots={n}: pair acc / instr AUC",
                f"{d['pairs_dev']['accuracy']['rate']:.3f} / {d['instructions_dev']['auc']:.3f}"
                f" ({timing[n]} s)",
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        f"  gate (pair accuracy CI low > {args.gate_min_accuracy}): {'PASS' if gate_ok else 'FAIL'}"
    )
    print(f"\nwrote {run.out_dir / 'results.json'}")
    return 0 if gate_ok else 1


if __name__ == "__main__":
    sys.exit(main())
