"""How good a judge is the BASE model? Accuracy of utils.critic on the verifiable check set.

    python scripts/evaluate_critic.py --model gemma-3-270m      # the configured judge (pmi)
    python scripts/evaluate_critic.py --pair-mode pointwise --pointwise-prompts exact-v1 \\
        --shots 4,8 --instruction-shots none --out runs/critic_eval_pointwise
    python scripts/evaluate_critic.py --pair-mode pairwise --shots 2,4

Every case's label is right by construction (utils/critic_checkset.py). Every variant of the
pair judge (pmi and pairwise: few-shot count; pointwise: prompt wording x few-shot count) is scored on
the DEV split only; the dev-best variant alone is then scored on the TEST split, so no choice
can see a test case. The same holds for the instruction judge (few-shot count by dev AUC,
threshold by dev accuracy) and for the recommended pair_confidence_threshold (the smallest
threshold whose covered dev pairs reach --min-kept-accuracy). Reported numbers are TEST, with
Wilson 95% CIs. Writes results.json (every verdict) and manifest.json into --out.
Exit 0 ok; 1 when the test pairwise accuracy's CI does not clear --gate-min-accuracy (the judge
is not shown to beat chance); 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from utils import critic_calibration as calibration
from utils import critic_checkset as cc
from utils.config import ConfigError, add_config_args
from utils.critic import CriticConfig, judge_prompt_id
from utils.critic_prompts import PAIR_MODES, POINTWISE_PROMPTS
from utils.jsonl_io import JsonlError, write_json_atomic
from utils.run_context import StageRun

DEFAULT_SHOTS = {"pmi": "0,3", "pointwise": "4,8", "pairwise": "2,4"}


def _fmt(rate: dict) -> str:
    if rate["rate"] is None:
        return "n/a (n=0)"
    return f"{rate['rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] (n={rate['n']})"


def _ints(text: str, what: str) -> list[int]:
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError as e:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from e
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def pair_variants(base: CriticConfig, mode: str, shots: list[int], prompts: list[str]) -> dict:
    """Variant key -> CriticConfig, cheapest first (fewer shots first): the dev choice keeps
    the first of tied variants."""
    if mode == "pmi":
        return {f"pmi/{n}": replace(base, pair_mode=mode, n_shots_pmi=n) for n in shots}
    if mode == "pointwise":
        return {
            f"{p}/{n}": replace(base, pair_mode=mode, pointwise_prompt=p, n_shots_pointwise=n)
            for n in shots
            for p in prompts
        }
    return {f"ab/{n}": replace(base, pair_mode=mode, n_shots_pairs=n) for n in shots}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--model", default=None, help="model name or path (default: config model.name)")
    ap.add_argument("--out", default="runs/critic_eval", help="output directory")
    ap.add_argument("--seed", type=int, default=cc.DEFAULT_SEED, help="check-set seed")
    ap.add_argument("--dev-fraction", type=float, default=cc.DEFAULT_DEV_FRACTION)
    ap.add_argument(
        "--pair-mode", choices=PAIR_MODES, default=None, help="default: config critic.pair_mode"
    )
    ap.add_argument(
        "--shots",
        default=None,
        help="pair-judge few-shot counts to try on dev, comma-separated "
        "(default: " + ", ".join(f"{v} {k}" for k, v in DEFAULT_SHOTS.items()) + ")",
    )
    ap.add_argument(
        "--pointwise-prompts",
        default=",".join(POINTWISE_PROMPTS),
        help="pointwise prompt wordings to try on dev (keys of utils.critic_prompts.POINTWISE_PROMPTS)",
    )
    ap.add_argument(
        "--instruction-shots",
        default=None,
        help="instruction-judge few-shot counts to try on dev (default: the config's); "
        "'none' skips the instruction judge",
    )
    ap.add_argument(
        "--min-kept-accuracy",
        type=float,
        default=0.75,
        help="dev accuracy the kept pairs must reach to pick pair_confidence_threshold",
    )
    ap.add_argument("--gate-min-accuracy", type=float, default=0.5)
    args = ap.parse_args(argv)
    try:
        run = StageRun.start("critic_eval", args.config, args.overrides, args.out, ("critic",))
        if args.model:
            run.cfg["model"]["name"] = args.model
        base_cfg = CriticConfig.from_dict(run.cfg.get("critic", {}))
        mode = args.pair_mode or base_cfg.pair_mode
        shots = _ints(args.shots or DEFAULT_SHOTS[mode], "--shots")
        prompts = [p.strip() for p in args.pointwise_prompts.split(",") if p.strip()]
        if mode == "pointwise" and not prompts:
            raise ValueError("--pointwise-prompts is empty")
        unknown = [p for p in prompts if p not in POINTWISE_PROMPTS]
        if unknown:
            raise ValueError(
                f"--pointwise-prompts: unknown {unknown}; known: {sorted(POINTWISE_PROMPTS)}"
            )
        variants = pair_variants(base_cfg, mode, shots, prompts)  # validates every value
        if args.instruction_shots == "none":
            ins_shots: list[int] = []
        else:
            ins_shots = _ints(
                args.instruction_shots or str(base_cfg.n_shots_instructions), "--instruction-shots"
            )
            for n in ins_shots:
                replace(base_cfg, n_shots_instructions=n)
        checkset = cc.build_checkset(args.seed, args.dev_fraction)
        lm = run.load_model()
    except (ConfigError, JsonlError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    pair_dev = cc.split_cases(checkset["pairs"], "dev")
    pair_test = cc.split_cases(checkset["pairs"], "test")
    timing: dict[str, float] = {}

    def timed(label: str, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        timing[label] = round(time.perf_counter() - t0, 1)
        print(f"[critic_eval] {label}: {timing[label]} s", file=sys.stderr)
        return out

    # Pair judge: every variant on dev, the dev-best alone on test.
    dev_rows, dev_metrics = {}, {}
    for key, cfg in variants.items():
        dev_rows[key] = timed(f"pairs dev {key}", calibration.score_pair_cases, lm, pair_dev, cfg)
        dev_metrics[key] = calibration.pair_split_metrics(dev_rows[key])
    chosen = calibration.choose_variant(dev_metrics, "pairs")
    test_rows = timed(
        f"pairs test {chosen}", calibration.score_pair_cases, lm, pair_test, variants[chosen]
    )
    pt = calibration.pair_split_metrics(test_rows)
    conf = calibration.choose_confidence_threshold(
        [r["p_first"] for r in dev_rows[chosen]], calibration.THRESHOLD_GRID, args.min_kept_accuracy
    )
    chosen_cfg = variants[chosen]
    if conf["threshold"] is not None:
        chosen_cfg = replace(chosen_cfg, pair_confidence_threshold=conf["threshold"])

    # Instruction judge, same protocol.
    ins_report = None
    if ins_shots:
        ins_dev = cc.split_cases(checkset["instructions"], "dev")
        ins_test = cc.split_cases(checkset["instructions"], "test")
        ins_dev_rows, ins_dev_metrics = {}, {}
        for n in ins_shots:
            cfg = replace(base_cfg, n_shots_instructions=n)
            ins_dev_rows[n] = timed(
                f"instructions dev {n}", calibration.score_instruction_cases, lm, ins_dev, cfg
            )
            ins_dev_metrics[n] = calibration.instruction_judge_metrics(ins_dev_rows[n])["dev"]
        n_ins = calibration.choose_variant(ins_dev_metrics, "instructions")
        cfg = replace(base_cfg, n_shots_instructions=n_ins)
        ins_test_rows = timed(
            f"instructions test {n_ins}", calibration.score_instruction_cases, lm, ins_test, cfg
        )
        im = calibration.instruction_judge_metrics(ins_dev_rows[n_ins], ins_test_rows)
        chosen_cfg = replace(
            chosen_cfg, n_shots_instructions=n_ins, min_instruction_score=im["dev"]["threshold"]
        )
        ins_report = {
            "n_shots": n_ins,
            "dev_by_shots": {str(n): m for n, m in ins_dev_metrics.items()},
            "test": im["test"],
            "verdicts": {"dev": ins_dev_rows[n_ins], "test": ins_test_rows},
        }

    report = {
        "model": lm.provenance["model_id"],
        "pair_mode": mode,
        "checkset": {
            "seed": checkset["seed"],
            "dev_fraction": checkset["dev_fraction"],
            "sha256": checkset["sha256"],
            "pairs": {"dev": len(pair_dev), "test": len(pair_test)},
            "instructions": {
                s: sum(c["split"] == s for c in checkset["instructions"]) for s in ("dev", "test")
            },
        },
        "chosen_on_dev": {
            "pair_variant": chosen,
            "pair_confidence_threshold": conf,
            "instruction_shots": ins_report["n_shots"] if ins_report else None,
            "instruction_threshold": ins_report["test"]["threshold"] if ins_report else None,
        },
        "recommended_critic_config": chosen_cfg.to_dict(),
        "judge_prompt": judge_prompt_id(chosen_cfg),
        "dev": {"pairs_by_variant": dev_metrics},
        "test": {
            "pairs": pt,
            "pairs_per_kind": calibration.per_kind_accuracy(test_rows, "test"),
            "instructions": ins_report["test"] if ins_report else None,
        },
        "seconds": timing,
        "verdicts": {
            "pairs_dev": dev_rows,
            "pairs_test": test_rows,
            "instructions": ins_report["verdicts"] if ins_report else None,
        },
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
        pair_mode=mode,
        variants=list(variants),
        instruction_shots_grid=ins_shots,
        chosen_on_dev=report["chosen_on_dev"],
        recommended_critic_config=report["recommended_critic_config"],
        judge_prompt=report["judge_prompt"],
        test=report["test"],
        gate=report["gate"],
        checkset=report["checkset"],
        seconds=timing,
    )

    print(f"\ncritic check set, model {report['model']} (TEST split; choices made on DEV)")
    sl = pt["soft_labels"]["quantiles"]
    rows = [
        ("pair judge (chosen on dev)", f"{mode} {chosen}"),
        ("pairwise accuracy", _fmt(pt["accuracy"])),
        ("both-orders consistency", _fmt(pt["position_consistency"])),
        ("mean P(' A') over orders (0.5 = unbiased)",
         f"{pt['mean_p_a']:.3f}" if pt["mean_p_a"] is not None else "n/a (no positions)"),
        ("soft label max(p,1-p) p10/p50/p90",
         f"{sl['p10']:.3f} / {sl['p50']:.3f} / {sl['p90']:.3f}"),
    ]  # fmt: skip
    for t, m in pt["at_threshold"].items():
        rows.append(
            (f"accuracy at soft label >= {t}", f"{_fmt(m['accuracy'])}, cov {m['coverage']:.2f}")
        )
    rows.append(
        (
            "pair_confidence_threshold (dev rule)",
            f"{conf['threshold']} ({conf['rule']})",
        )
    )
    if ins_report:
        it = ins_report["test"]
        rows += [
            ("instruction judge shots / AUC",
             f"{ins_report['n_shots']} / " + (f"{it['auc']:.3f}" if it["auc"] is not None
                                              else "n/a")),
            (f"instruction accuracy at t={it['threshold']:.3f}", _fmt(it["accuracy"])),
            ("  recall on good instructions", _fmt(it["recall_good"])),
            ("  recall on corrupted instructions", _fmt(it["recall_bad"])),
        ]  # fmt: skip
    for kind, m in report["test"]["pairs_per_kind"].items():
        rows.append((f"  pairs: {kind}", _fmt(m)))
    for key, d in dev_metrics.items():
        rows.append(
            (
                f"dev {key}: pair acc / mean P(good)",
                f"{_fmt(d['accuracy'])} / {d['mean_p_good']:.3f} ({timing[f'pairs dev {key}']} s)",
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
