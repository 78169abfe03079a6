"""DPO with no preference pair (a critic at chance keeps none) is a recorded skip, not a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def test_dpo_skips_with_a_manifest_when_no_pair_was_kept(tmp_path):
    import train_stage1_dpo

    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "pairs.jsonl").write_text("")
    assert train_stage1_dpo.main(["--run-dir", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["status"] == "skipped" and "no preference pair" in manifest["reason"]
    assert not (tmp_path / "dpo" / "adapter").exists()


def test_evaluation_reports_why_a_skipped_stage_has_no_adapter(tmp_path):
    from utils.eval_arms import adapter_problem

    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "manifest.json").write_text(
        '{"status": "skipped", "reason": "no pair kept"}'
    )
    assert adapter_problem(tmp_path / "dpo" / "adapter") == "stage skipped: no pair kept"
    assert "does not exist" in adapter_problem(tmp_path / "sft" / "adapter")


def test_cai_skip_reason_quotes_the_cai_stage_drop_counts(tmp_path):
    """The skip reason comes from the stage that wrote the pairs, not from the pairs-stage
    critic (the CAI stage drops labels near 0.5, it has no critic threshold)."""
    import train_stage1_dpo

    (tmp_path / "cai_pairs").mkdir()
    (tmp_path / "cai_pairs" / "pairs.jsonl").write_text("")
    counts = {"pairs_dropped": {"label_near_half": 45, "revision_identical": 1, "tie": 0}}
    (tmp_path / "cai_pairs" / "manifest.json").write_text(json.dumps({"counts": counts}))
    args = ["--run-dir", str(tmp_path), "--pairs", str(tmp_path / "cai_pairs" / "pairs.jsonl")]
    assert train_stage1_dpo.main([*args, "--out", str(tmp_path / "cai")]) == 0
    reason = json.loads((tmp_path / "cai" / "manifest.json").read_text())["reason"]
    assert reason.endswith("(label_near_half 45, revision_identical 1)")
    assert "critic" not in reason
