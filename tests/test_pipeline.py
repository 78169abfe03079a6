"""The pipeline's skip / resume / stale logic, with real stage scripts (tiny ones) in subprocesses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from utils.pipeline import STAGES, STAMP, Stage, run_pipeline, stage_status

# A real stage script: appends one line per run to a counter file (so reruns are visible),
# writes its output from the config value it was given, and fails on request.
STAGE_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from utils.config import load_config
args = sys.argv[1:]
cfg = load_config(args[args.index("--config") + 1], [args[i + 1] for i, a in enumerate(args) if a == "--set"])
out = Path(args[args.index("--out") + 1]); out.mkdir(parents=True, exist_ok=True)
with open(out / "runs.log", "a") as f:
    f.write("run\\n")
if cfg["toy"]["fail"]:
    sys.exit(3)
(out / "result.txt").write_text(str(cfg["toy"]["value"]))
"""


def _setup(tmp_path: Path):
    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / "toy_stage.py"
    script.write_text(STAGE_SCRIPT.format(repo=str(repo)))
    config = tmp_path / "toy.yaml"
    config.write_text("toy:\n  value: 1\n  fail: false\nother:\n  x: 0\n")
    stages = (
        Stage("a", str(script), sections=("toy",), inputs=(), args=lambda run: ["--out", str(run / "a")]),
        Stage("b", str(script), sections=("other",), inputs=("a/result.txt",), args=lambda run: ["--out", str(run / "b")]),
    )  # fmt: skip
    return stages, config


def _cfg(config: Path, overrides=()):
    from utils.config import load_config

    return load_config(config, list(overrides))


def _runs(run: Path, stage: str) -> int:
    return (run / stage / "runs.log").read_text().count("run")


def test_finished_stages_are_skipped_and_changes_rerun_what_depends_on_them(tmp_path):
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    rows = run_pipeline(run, _cfg(config), str(config), [], stages=stages, log=lambda m: None)
    assert [r["status"] for r in rows] == ["ran", "ran"] and all(r["exit_code"] == 0 for r in rows)
    assert (run / "a" / STAMP).exists() and (run / "b" / STAMP).exists()

    rows = run_pipeline(run, _cfg(config), str(config), [], stages=stages, log=lambda m: None)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert _runs(run, "a") == 1 and _runs(run, "b") == 1

    # Changing stage a's config reruns a (old output moved aside, not deleted) and, since a's
    # output changed, b as well.
    over = ["toy.value=2"]
    rows = run_pipeline(
        run, _cfg(config, over), str(config), over, stages=stages, log=lambda m: None
    )
    assert [r["status"] for r in rows] == ["ran", "ran"]
    assert (run / "a" / "result.txt").read_text() == "2"
    assert len(list(run.glob("a.stale-*"))) == 1 and len(list(run.glob("b.stale-*"))) == 1

    # Changing only b's section leaves a alone.
    over2 = ["toy.value=2", "other.x=5"]
    rows = run_pipeline(
        run, _cfg(config, over2), str(config), over2, stages=stages, log=lambda m: None
    )
    assert [r["status"] for r in rows] == ["skipped", "ran"]


def test_a_failed_stage_stops_the_pipeline_and_is_resumed_next_time(tmp_path):
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    over = ["toy.fail=true"]
    rows = run_pipeline(
        run, _cfg(config, over), str(config), over, stages=stages, log=lambda m: None
    )
    assert rows == [
        {
            "stage": "a",
            "status": "ran",
            "seconds": rows[0]["seconds"],
            "exit_code": 3,
            "failed": True,
        }
    ]
    assert not (run / "a" / STAMP).exists()
    status, _ = stage_status(stages[0], _cfg(config), run)
    assert status == "resume"  # output present but unfinished
    rows = run_pipeline(run, _cfg(config), str(config), [], stages=stages, log=lambda m: None)
    assert [r["status"] for r in rows] == ["resumed", "ran"]
    assert _runs(run, "a") == 2  # same directory, resumed in place


def test_real_stage_list_is_ordered_and_wired():
    names = [s.name for s in STAGES]
    assert names == ["stage1", "verified_r1", "sft_r1", "verified_r2", "sft", "pairs", "dpo",
                     "cai_pairs", "cai", "eval"]  # fmt: skip
    from utils.pipeline import build_stages

    one = [s.name for s in build_stages({"verified": {"rounds": 1}})]
    assert one[:4] == ["stage1", "verified_r1", "sft", "pairs"]
    three = build_stages({"verified": {"rounds": 3}})
    r3 = next(s for s in three if s.name == "verified_r3")
    args = r3.args(Path("runs/x"))  # round 3 samples with round 2's policy, accumulates round 2
    assert args[args.index("--policy") + 1] == str(Path("runs/x/sft_r2/adapter"))
    assert args[args.index("--previous") + 1] == str(Path("runs/x/verified_r2/sft_data.jsonl"))
    stale = build_stages({"verified": {"rounds": 2, "pairs_from": "last_round"}})
    assert "pairs" not in [s.name for s in stale]  # DPO reads the last round's pairs instead
    dpo = next(s for s in stale if s.name == "dpo")
    assert dpo.inputs[0] == "verified_r2/pairs.jsonl"
    assert dpo.args(Path("runs/x"))[-1] == str(Path("runs/x/verified_r2/pairs.jsonl"))
    repo = Path(__file__).resolve().parent.parent
    for s in STAGES:
        assert (repo / s.script).exists(), s.script
        assert all(isinstance(a, str) for a in s.args(Path("runs/x")))
    # every input a stage reads is produced by an earlier stage
    produced = set()
    for s in STAGES:
        for i in s.inputs:
            assert i.split("/")[0] in produced, (s.name, i)
        produced.add(s.name)
    json.dumps([s.sections for s in STAGES])
    assert sys.executable
    for s in STAGES:  # repository files a stage reads exist and are hashed into its key
        assert all((repo / i).is_file() for i in s.repo_inputs), (s.name, s.repo_inputs)


def test_editing_the_constitution_reruns_the_cai_pairs_stage(tmp_path, monkeypatch):
    import utils.pipeline as P

    (tmp_path / "configs").mkdir()
    const = tmp_path / "configs" / "constitution.yaml"
    const.write_text("version: 1\n")
    monkeypatch.setattr(P, "REPO_ROOT", tmp_path)
    [stage] = [s for s in STAGES if s.name == "cai_pairs"]
    before = P.stage_key(stage, {"cai": {}}, tmp_path / "run")
    assert P.stage_key(stage, {"cai": {}}, tmp_path / "run") == before
    const.write_text("version: 2\n")
    assert P.stage_key(stage, {"cai": {}}, tmp_path / "run") != before


def test_every_config_section_a_stage_script_reads_is_in_its_key():
    """A stage whose script reads a config section missing from ``sections`` is not rerun when
    that section changes (KNOWN_BUGS #16: stage 1 reads ``critic`` for its instruction filter,
    and a new critic threshold kept the old stage-1 data)."""
    import re

    repo = Path(__file__).resolve().parent.parent
    # section(cfg, "x"), run.cfg.get("x"), cfg_all["x"]: reads of a top-level section
    top = r"\b(?:run\.)?cfg(?:_all)?"
    read = re.compile(rf"""(?:section\(\s*{top}\s*,|{top}(?:\.get\(|\[))\s*["']([a-z]\w*)["']""")
    for s in STAGES:
        names = set(read.findall((repo / s.script).read_text()))
        assert names, f"{s.script}: the pattern found no config read; update the test"
        assert names <= set(s.sections), (s.name, sorted(names - set(s.sections)))
