"""The evaluation report: every section present, numbers as computed, plots written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils import report
from utils.eval_config import EvalConfig, ModelSpec
from utils.eval_prompts import build_eval_set
from utils.evaluation import run_evaluation
from utils.report_format import fmt_p, fmt_points, md_table, pct, pct_ci
from utils.report_markdown import render_markdown
from utils.stats import benjamini_hochberg, holm_correction

N = 5


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_qwen_dir) -> dict:
    """A real (tiny) evaluation: base and base_icl evaluated, sft and dpo missing, one leak."""
    run = tmp_path_factory.mktemp("run")
    (run / "stage1").mkdir()
    leaked = build_eval_set(N)[0]["prompt"]
    (run / "stage1" / "train.jsonl").write_text(json.dumps({"instruction": leaked}) + "\n")
    cfg = EvalConfig(
        n_prompts=N,
        max_new_tokens=3,
        batch_size=8,
        icl_k=1,
        bootstrap_resamples=100,
        run_sentinels=False,
        progress=False,
        n_samples=2,
    )
    return run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)


def test_write_report_produces_every_section_and_file(results, tmp_path):
    paths = report.write_report(results, tmp_path)
    for key in ("results", "report", "accuracy_plot", "type_heatmap"):
        assert paths[key].exists() and paths[key].stat().st_size > 0
    assert paths["accuracy_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report"].read_text()
    for heading in (
        "## Headline",
        "## Arms",
        "### Skipped arms",
        "## Pairwise comparisons",
        "## Per instruction type",
        "## Sentinels",
        "## Leakage",
        "## Decoding and prompts",
        "## Memory and timing",
        "## Sample outputs",
        "## Plots",
    ):
        assert heading in md, heading
    assert "- **sft** SKIPPED: adapter not found" in md
    assert "- **dpo** SKIPPED: adapter not found" in md
    assert "1 leaked prompt(s) excluded" in md and "Minimum detectable effect" in md
    assert "- **base**: not run (eval.run_sentinels=false)" in md
    assert "![accuracy per arm](accuracy.png)" in md
    assert "including arms that do not beat the baseline" in md
    # 2 samples x 2 arms, same prompts for every arm
    assert md.count("**Sample ") == 2 and md.count("- base_icl (") == 2
    reloaded = json.loads(paths["results"].read_text())
    assert reloaded["arms"][0]["name"] == "base" and reloaded["headline"]["n_prompts"] == N - 1


def test_report_numbers_are_the_computed_ones(results):
    md = render_markdown(results)
    (c,) = results["comparisons"]
    assert (c["arm_a"], c["arm_b"]) == ("base", "base_icl")
    assert c["p_value_holm"] == holm_correction([c["p_value"]])[0]
    assert c["p_value_bh"] == benjamini_hochberg([c["p_value"]])[0]
    row = f"| base | base_icl | {pct(c['accuracy_a'])} | {pct(c['accuracy_b'])} |"
    assert row in md
    s = results["arms"][1]["summary"]["prompt_strict"]
    assert pct_ci(s) in md
    table = report.summary_table(results)
    assert (
        "sft            SKIPPED" in table and "leakage: 1/5 prompts (20.00%), 1 excluded" in table
    )


def test_format_helpers_by_hand():
    summary = {"accuracy": 0.25, "ci_low": 0.1234, "ci_high": 0.4567}
    assert pct_ci(summary) == "25.0% [12.3, 45.7]"
    assert fmt_p(0.00001) == "<0.0001" and fmt_p(0.04321) == "0.0432"
    assert fmt_points(-0.031) == "-3.1 pts" and fmt_points(None) == "n/a"
    assert md_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_report_without_evaluated_arms_or_leakage_check_says_so(results, tmp_path):
    empty = {
        **results,
        "arms": [],
        "comparisons": [],
        "per_type": [],
        "verdicts": [],
        "samples": [],
        "mde": None,
        "leakage": {"status": "not_checked", "reason": "no stage1/train.jsonl in the run"},
        "headline": {"n_prompts": N, "n_excluded_leaked": 0, "exclude_leaked": True},
    }
    paths = report.write_report(empty, tmp_path)
    md = Path(paths["report"]).read_text()
    assert "No arm was evaluated." in md and "Leakage NOT checked" in md
    assert "Fewer than two arms were evaluated" in md
    assert "accuracy_plot" not in paths


def test_trained_arm_that_does_not_beat_base_icl_is_called_out(results):
    arms = [dict(a) for a in results["arms"]]
    arms[0]["adapter_dir"] = "runs/x/sft/adapter"  # pretend base were a trained arm
    verdict = {"arm": "base", "reference": "base_icl", "gain": -0.0, "p_value_holm": 1.0}
    md = render_markdown(
        {**results, "arms": arms, "verdicts": [{**verdict, "verdict": "no significant difference"}]}
    )
    assert (
        "- **base** vs **base_icl**: no significant difference (+0.0 pts for base, "
        "p_holm = 1.0000). base does NOT beat the zero-training in-context baseline" in md
    )
    md = render_markdown(
        {**results, "arms": arms, "verdicts": [{**verdict, "gain": 0.2, "verdict": "beats"}]}
    )
    assert "+20.0 pts for base" in md and "does NOT beat" not in md


def test_sentinel_line_says_what_a_trained_arm_was_judged_on():
    from utils.report_markdown import _sentinel_line

    base = {"name": "base", "sentinel": {"verdict": "clean", "details": {"trained_arm": False}}}
    assert _sentinel_line(base) == "- **base**: clean"
    details = {
        "trained_arm": True,
        "weight_probe": {"score": 0.0},
        "weight_probe_every_stop": {"score": 0.789886},
        "generation_probe_every_stop": {"score": 1.0},
    }
    line = _sentinel_line({"name": "sft", "sentinel": {"verdict": "clean", "details": details}})
    assert line.startswith("- **sft**: clean (trained arm: judged on static checks")
    assert "score 0.0000" in line and "reads 0.789886" in line and "rate 1.0: informational" in line
