"""Evaluation report: writes results.json, report.md (``utils/report_markdown.py``), two PNG
plots (``utils/report_plots.py``) and prints a summary table.

Everything here renders the results dict built by ``utils.evaluation.run_evaluation``; no
model, no statistics of its own (every number comes from the results), so a report can be
re-rendered from ``results.json`` alone. Every evaluated arm is shown, including arms that
lose to the baseline, and every skipped arm is listed with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.jsonl_io import write_json_atomic
from utils.report_format import fmt_p, fmt_points, pct, pct_ci
from utils.report_markdown import render_markdown
from utils.report_plots import plot_accuracy, plot_type_heatmap

RESULTS_JSON, REPORT_MD = "results.json", "report.md"
ACCURACY_PNG, TYPE_HEATMAP_PNG = "accuracy.png", "per_type_heatmap.png"


def summary_table(results: Mapping[str, Any]) -> str:
    """Plain-text table printed at the end of a run."""
    lines = [
        f"{'arm':<14} {'n':>5} {'prompt strict [95% CI]':>26} {'loose':>7} "
        f"{'instr strict':>12} {'sentinel':>10}"
    ]
    for a in results["arms"]:
        s = a.get("summary")
        if not s:
            lines.append(f"{a['name']:<14} (no headline prompts)")
            continue
        lines.append(
            f"{a['name']:<14} {s['n_prompts']:>5} {pct_ci(s['prompt_strict']):>26} "
            f"{pct(s['prompt_loose']['accuracy']):>7} "
            f"{pct(s['instruction_strict']['accuracy']):>12} {a['sentinel']['verdict']:>10}"
        )
    for s in results.get("skipped_arms", []):
        lines.append(f"{s['name']:<14} SKIPPED: {s['reason']}")
    splits = results.get("splits") or {}
    if splits:
        lines.append(f"{'arm':<14} {'seen types [95% CI]':>26} {'held-out types [95% CI]':>26}")
        for a in results["arms"]:
            seen = splits["seen"]["summaries"].get(a["name"], {}).get("prompt_strict")
            held = splits["held_out"]["summaries"].get(a["name"], {}).get("prompt_strict")
            lines.append(f"{a['name']:<14} {pct_ci(seen):>26} {pct_ci(held):>26}")
    for c in results.get("comparisons", []):
        lines.append(
            f"  {c['arm_b']} - {c['arm_a']}: {fmt_points(c['diff'])} "
            f"(discordant {c['n_a_only']}/{c['n_b_only']}, p_holm {fmt_p(c['p_value_holm'])})"
        )
    leak = results["leakage"]
    lines.append(
        "leakage: "
        + (
            f"{leak['n_leaked']}/{leak['n_test']} prompts ({pct(leak['rate'], 2)}), "
            f"{results['headline']['n_excluded_leaked']} excluded"
            if leak["status"] == "checked"
            else f"not checked ({leak['reason']})"
        )
    )
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, the plots and report.md into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / RESULTS_JSON, "report": out_dir / REPORT_MD}
    write_json_atomic(paths["results"], json.loads(json.dumps(results, default=str)))
    plots: dict[str, str] = {}
    if any(a.get("summary") for a in results["arms"]):
        paths["accuracy_plot"] = plot_accuracy(results, out_dir / ACCURACY_PNG)
        plots["accuracy per arm"] = ACCURACY_PNG
    if results["per_type"]:
        paths["type_heatmap"] = plot_type_heatmap(results, out_dir / TYPE_HEATMAP_PNG)
        plots["per-type accuracy"] = TYPE_HEATMAP_PNG
    tmp = paths["report"].with_suffix(".md.tmp")
    tmp.write_text(render_markdown(results, plots), encoding="utf-8")
    tmp.replace(paths["report"])
    return paths
