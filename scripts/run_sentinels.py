"""Contamination sentinels: is this model (or this prompting) secretly a chat model?

    python scripts/run_sentinels.py                                   # the configured base model
    python scripts/run_sentinels.py --model /models/my-base --json out.json
    python scripts/run_sentinels.py --model smollm2-135m-instruct --allow-instruct-control \\
        --format chat-template                                        # a positive control
    python scripts/run_sentinels.py --report docs/sentinel_calibration.md   # all real controls

Prints a table (sentinel, score, followed?, sample output), the static checks, the weight
probe and the verdict; writes the JSON result (--json) and <out>/result.json + manifest.json.
Exit codes (utils/errors.py): 0 clean; 3 contaminated, suspicious or a check that cannot fire
(fails closed: a result from a model that might be a chat model is worthless); 2 bad input (a
config value, a missing or refused model); 1 a crash (traceback printed, never a clean verdict).
With --report: 0 when every positive control is flagged and every negative control is clean
on greedy and sampled decoding, 3 otherwise. All logic is in utils/contamination.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from utils.config import add_config_args, load_config
from utils.contamination import (
    EXIT_CODES,
    MODES,
    PROMPT_FORMATS,
    SentinelConfig,
    calibration_controls,
    calibration_report,
    make_renamed_instruct_copy,
    run_calibration,
    run_sentinel_suite,
    summary_table,
)
from utils.errors import (
    EXIT_GATE,
    EXIT_OK,
    STATUS_FAILED,
    STATUS_OK,
    as_input_error,
)
from utils.jsonl_io import write_json_atomic
from utils.provenance import write_manifest
from utils.run_context import stage_main


def build_config(cfg: dict, args: argparse.Namespace) -> SentinelConfig:
    values = dict(cfg.get("sentinels") or {})
    if values.get("mode") in (False, None, "off"):  # YAML reads a bare `off` as False
        values.pop("mode", None)  # this script exists to run them: fall back to the default
    if args.mode:
        values["mode"] = args.mode
    elif "mode" not in values or args.report:
        values["mode"] = "full"
    if args.format:
        values["prompt_format"] = args.format
    if args.chat_template:
        values["chat_template"] = args.chat_template.encode().decode("unicode_escape")
    if args.threads:
        values["torch_threads"] = args.threads
    return SentinelConfig.from_dict(values)


def run_report(args: argparse.Namespace, config: SentinelConfig, out_dir: Path) -> int:
    from utils import embedded_models as em

    renamed = make_renamed_instruct_copy(
        em.ensure_asset(em.INSTRUCT_CONTROL, progress=False), out_dir / "mystery-135m"
    )
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cal = run_calibration(config, calibration_controls(renamed), progress=print)
    total = time.perf_counter() - t0
    for c in cal["controls"]:
        print(f"\n=== {c['control']['name']} (must flag: {c['control']['must_flag']})")
        print(summary_table(c["result"]))
    # Load-time cost: the quick mode on the negative control, measured in the same process.
    quick = run_calibration(
        SentinelConfig.from_dict({**config.to_dict(), "mode": "quick"}),
        [c for c in calibration_controls() if not c.must_flag],
    )
    neg_full = [c for c in cal["controls"] if not c["control"]["must_flag"]]
    extra = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads or 'default'} "
        f"torch thread(s); load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (wall times include other jobs' contention; CPU "
        "seconds with one thread are what a core of its own would take)",
        "suite time on the embedded base model, full mode (wall / CPU)": ", ".join(
            f"{c['result']['wall_time_s']:.1f}s / {c['result']['cpu_time_s']:.1f}s "
            f"(model load {c['load_s']:.1f}s extra)"
            for c in neg_full
        ),
        "suite time on the embedded base model, quick mode for load time (wall / CPU)": ", ".join(
            f"{c['result']['wall_time_s']:.1f}s / {c['result']['cpu_time_s']:.1f}s"
            for c in quick["controls"]
        ),
        "quick-mode verdict on the negative control": ", ".join(
            c["result"]["verdict"] for c in quick["controls"]
        ),
        "whole calibration wall time": f"{total:.0f}s",
    }
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(calibration_report(cal, extra))
    write_json_atomic(out_dir / "calibration.json", {**cal, "quick_negative": quick, **extra})
    write_manifest(
        out_dir / "manifest.json",
        stage="sentinel_calibration",
        config=config.to_dict(),
        status=STATUS_OK if cal["all_as_expected"] else STATUS_FAILED,
        reason=None if cal["all_as_expected"] else "a control was not judged as expected",
        report=str(report),
        detection_rate=cal["detection_rate"],
        false_positive_rate=cal["false_positive_rate"],
        all_as_expected=cal["all_as_expected"],
        wall_time_s=round(total, 1),
    )
    print(
        f"\ndetection rate {cal['detection_rate']:.2f}, false-positive rate "
        f"{cal['false_positive_rate']:.2f}, all as expected: {cal['all_as_expected']}; "
        f"report: {report}"
    )
    return EXIT_OK if cal["all_as_expected"] else EXIT_GATE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    ap.add_argument("--model", help="embedded name, local directory or hub id (default: config)")
    ap.add_argument(
        "--allow-instruct-control",
        action="store_true",
        help="load an instruction-tuned model as a positive control (refused otherwise)",
    )
    ap.add_argument("--format", choices=PROMPT_FORMATS, help="how sentinels are prompted")
    ap.add_argument(
        "--chat-template",
        help="template with {prompt} for --format chat-template (escapes like \\n allowed); "
        "default: the first chat format the vocabulary supports",
    )
    ap.add_argument("--mode", choices=MODES, help="default: full")
    ap.add_argument("--threads", type=int, help="torch threads while the suite runs")
    ap.add_argument("--json", help="write the result JSON here too")
    ap.add_argument("--out", help="output directory (default: runs/sentinels/<model>)")
    ap.add_argument(
        "--report",
        help="run the calibration on every real control and write this markdown report",
    )
    args = ap.parse_args(argv)
    # The output folder depends on the config's model name: a failure writes no manifest unless
    # --out is given.
    return stage_main("sentinels", args.out, lambda: run_stage(args))


def run_stage(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    with as_input_error():
        config = build_config(cfg, args)

    from utils.clean_model_loader import CleanModelLoader

    model_cfg = dict(cfg.get("model") or {})
    name = args.model or model_cfg.get("name")
    tag = "calibration" if args.report else Path(str(name)).name
    out_dir = Path(args.out or Path("runs") / "sentinels" / tag)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        return run_report(args, config, out_dir)

    # A missing, unreadable or refused model raises a ProjectInputError (exit 2).
    loader, _ = CleanModelLoader.from_config(
        {**model_cfg, "name": name, "allow_instruct_control": args.allow_instruct_control}
    )
    lm = loader.load(name)
    result = run_sentinel_suite(lm, config)  # a crash is exit 1, never a clean verdict
    print(summary_table(result))
    write_json_atomic(out_dir / "result.json", result)
    if args.json:
        write_json_atomic(args.json, result)
    write_manifest(
        out_dir / "manifest.json",
        stage="sentinels",
        config=config.to_dict(),
        status=STATUS_OK if result["verdict"] == "clean" else STATUS_FAILED,
        reason=None if result["verdict"] == "clean" else f"verdict {result['verdict']}",
        model=lm.provenance,
        verdict=result["verdict"],
        verdict_by_decoding=result["verdict_by_decoding"],
        reasons=result["reasons"],
        wall_time_s=result["wall_time_s"],
    )
    print(f"result: {out_dir / 'result.json'}")
    return EXIT_CODES[result["verdict"]]


if __name__ == "__main__":
    sys.exit(main())
