"""The pipeline's skip / resume / stale logic and its process handling (status read from the
manifest, run lock, orphan stages, signals), with real stage scripts (tiny ones) in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.pipeline import STAGES, STAMP, Stage, run_pipeline, stage_status
from utils.stage_process import (
    PID_FILE,
    PipelineLockedError,
    StageStillRunningError,
    check_orphan,
)

REPO = Path(__file__).resolve().parent.parent

# A real stage script on the shared helpers (StageRun, stage_main): appends one line per run to a
# counter file (so reruns are visible), writes its output from the config value it was given,
# and behaves as its section's ``mode`` says:
#   ok            result.txt + manifest ok, exit 0
#   crash         an empty pairs.jsonl, then an uncaught TypeError (what pairs did with
#                 --set pairs.instructions_per_chunk=1.5): exit 1, manifest failed
#   library_value_error  a ValueError after the config was read: exit 1 (not 2), manifest failed
#   keep_nothing  an empty pairs.jsonl, manifest skipped with its numbers, exit 3
#   gate          manifest failed (a quality gate), exit 3
#   exit3         exit 3 with no manifest
#   wait          starts a grandchild (its PID in child.pid), waits for a file named go, then ok
# A file named hard_crash in its folder makes it die with no handler running (os._exit(1)).
STAGE_SCRIPT = """
import subprocess, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from utils.run_context import StageRun, stage_main
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
name = args[args.index("--section") + 1]

def body():
    run = StageRun.start("toy", args[args.index("--config") + 1],
                         [args[i + 1] for i, a in enumerate(args) if a == "--set"], out)
    with open(out / "runs.log", "a") as f:
        f.write("run\\n")
    if (out / "hard_crash").exists():
        import os
        os._exit(1)
    sec = run.cfg[name]
    mode = sec["mode"]
    if mode == "crash":
        (out / "pairs.jsonl").write_text("")
        return list(range(1.5))
    if mode == "library_value_error":  # e.g. TRL mid-training: a crash, not bad input
        raise ValueError("from a library, mid-run")
    if mode == "keep_nothing":
        (out / "pairs.jsonl").write_text("")
        return run.skip("no pair kept (tie 3)", counts={{"pairs_kept": 0, "pairs_dropped": {{"tie": 3}}}})
    if mode == "gate":
        return run.fail_gate("kept 0 of 4 records (>= 1 required)")
    if mode == "exit3":
        return 3
    if mode == "wait":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        (out / "child.tmp").write_text(str(child.pid))
        (out / "child.tmp").replace(out / "child.pid")
        deadline = time.time() + 120
        while not (out / "go").exists() and time.time() < deadline:
            time.sleep(0.05)
        child.kill()
    (out / "result.txt").write_text(str(sec["value"]))
    run.finish(counts={{"value": sec["value"]}})
    return 0

sys.exit(stage_main("toy", out, body))
"""

# A pipeline in a process of its own (to lock a run, be killed, or get a signal).
DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from utils.config import load_config
from utils.pipeline import Stage, run_pipeline
from utils.stage_process import PipelineInterrupted
script, config, run = sys.argv[1:4]
stages = tuple(  # the same stages as _setup's
    Stage(n, script, sections=(sec,), inputs=inputs,
          args=lambda r, n=n, sec=sec: ["--out", str(r / n), "--section", sec])
    for n, sec, inputs in (("a", "toy", ()), ("b", "other", ("a/result.txt",)))
)
try:
    rows = run_pipeline(Path(run), load_config(config), config, [], stages=stages)
except PipelineInterrupted as e:
    sys.exit(128 + e.signum)
sys.exit(1 if any(r["failed"] for r in rows) else 0)
"""


def _setup(tmp_path: Path):
    script = tmp_path / "toy_stage.py"
    script.write_text(STAGE_SCRIPT.format(repo=str(REPO)))
    config = tmp_path / "toy.yaml"
    config.write_text("toy:\n  value: 1\n  mode: ok\nother:\n  x: 0\n  value: 0\n  mode: ok\n")
    stages = (
        Stage("a", str(script), sections=("toy",), inputs=(), args=lambda run: ["--out", str(run / "a"), "--section", "toy"]),
        Stage("b", str(script), sections=("other",), inputs=("a/result.txt",), args=lambda run: ["--out", str(run / "b"), "--section", "other"]),
    )  # fmt: skip
    return stages, config


def _cfg(config: Path, overrides=()):
    from utils.config import load_config

    return load_config(config, list(overrides))


def _pipeline(run: Path, config: Path, stages, overrides=(), log=lambda m: None):
    over = list(overrides)
    return run_pipeline(run, _cfg(config, over), str(config), over, stages=stages, log=log)


def _runs(run: Path, stage: str) -> int:
    return (run / stage / "runs.log").read_text().count("run")


def _manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def test_finished_stages_are_skipped_and_changes_rerun_what_depends_on_them(tmp_path):
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    rows = _pipeline(run, config, stages)
    assert [(r["run"], r["status"], r["exit_code"]) for r in rows] == [("ran", "ok", 0)] * 2
    assert (run / "a" / STAMP).exists() and (run / "b" / STAMP).exists()
    assert not (run / "a" / PID_FILE).exists()  # removed once the stage process ended

    rows = _pipeline(run, config, stages)
    assert [(r["run"], r["status"]) for r in rows] == [("up-to-date", "ok")] * 2
    assert _runs(run, "a") == 1 and _runs(run, "b") == 1

    # Changing stage a's config reruns a (old output moved aside, not deleted) and, since a's
    # output changed, b as well.
    rows = _pipeline(run, config, stages, ["toy.value=2"])
    assert [r["run"] for r in rows] == ["ran", "ran"]
    assert (run / "a" / "result.txt").read_text() == "2"
    assert len(list(run.glob("a.stale-*"))) == 1 and len(list(run.glob("b.stale-*"))) == 1

    # Changing only b's section leaves a alone.
    rows = _pipeline(run, config, stages, ["toy.value=2", "other.x=5"])
    assert [r["run"] for r in rows] == ["up-to-date", "ran"]


def test_a_failed_gate_stops_the_pipeline_and_is_resumed_next_time(tmp_path):
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    rows = _pipeline(run, config, stages, ["toy.mode=gate"])
    assert rows == [
        {"stage": "a", "run": "ran", "status": "failed", "exit_code": 3, "failed": True,
         "reason": "kept 0 of 4 records (>= 1 required)", "seconds": rows[0]["seconds"]}
    ]  # fmt: skip
    assert not (run / "a" / STAMP).exists() and not (run / "b").exists()
    status, _ = stage_status(stages[0], _cfg(config), run)
    assert status == "resume"  # output present but unfinished
    rows = _pipeline(run, config, stages)
    assert [(r["run"], r["status"]) for r in rows] == [("resumed", "ok"), ("ran", "ok")]
    assert _runs(run, "a") == 2  # same directory, resumed in place


def test_a_crash_in_a_stage_that_may_keep_nothing_is_never_stamped(tmp_path):
    """KNOWN_BUGS: pairs exited 1 both for "no pair kept" and for an uncaught exception, and the
    pipeline accepted exit 1 from it: a crash after an empty pairs.jsonl was stamped, DPO said
    "skipped", the pipeline exited 0 and every rerun said "up to date"."""
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    logs: list[str] = []
    rows = _pipeline(run, config, stages, ["toy.mode=crash"], log=logs.append)
    assert [(r["stage"], r["exit_code"], r["status"], r["failed"]) for r in rows] == [
        ("a", 1, "failed", True)
    ]  # b never ran
    assert (run / "a" / "pairs.jsonl").read_text() == "" and not (run / "a" / STAMP).exists()
    m = _manifest(run, "a")
    assert m["status"] == "failed" and m["reason"].startswith("crash: TypeError")
    assert "return list(range(1.5))" in m["traceback_tail"]
    text = "\n".join(logs)
    assert "a FAILED" in text and "TypeError" in text  # the stage's stderr tail
    assert f"PYTHONPATH=. {sys.executable} {stages[0].script} --config {config}" in text
    rows = _pipeline(run, config, stages, ["toy.mode=crash"])  # a rerun reruns it, still failing
    assert [(r["run"], r["failed"]) for r in rows] == [("resumed", True)] and _runs(run, "a") == 2

    # A ValueError raised mid-run is a crash with its traceback, not "bad input" (exit 2).
    rows = _pipeline(tmp_path / "run2", config, stages, ["toy.mode=library_value_error"])
    assert [(r["exit_code"], r["status"], r["failed"]) for r in rows] == [(1, "failed", True)]
    assert (
        _manifest(tmp_path / "run2", "a")["reason"] == "crash: ValueError: from a library, mid-run"
    )
    # Exit 3 is tolerated only with a skipped manifest: without a manifest it is a stop.
    rows = _pipeline(tmp_path / "run3", config, stages, ["toy.mode=exit3"])
    assert [(r["exit_code"], r["status"], r["failed"]) for r in rows] == [(3, None, True)]


def test_a_manifest_from_an_earlier_run_of_the_stage_is_not_trusted(tmp_path):
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    _pipeline(run, config, stages)
    (run / "a" / STAMP).unlink()  # as if the pipeline was killed between the stage and its stamp
    (run / "a" / "hard_crash").write_text("")  # no handler runs: manifest.json still says ok
    rows = _pipeline(run, config, stages)
    assert [(r["exit_code"], r["status"], r["failed"]) for r in rows] == [(1, None, True)]
    assert _manifest(run, "a")["status"] == "ok" and not (run / "a" / STAMP).exists()


def test_a_stage_that_keeps_nothing_is_stamped_and_the_pipeline_goes_on(tmp_path, capsys):
    stages, config = _setup(tmp_path)
    run = tmp_path / "run"
    rows = _pipeline(run, config, stages, ["toy.mode=keep_nothing"])
    assert [(r["stage"], r["status"], r["exit_code"], r["failed"]) for r in rows] == [
        ("a", "skipped", 3, False), ("b", "ok", 0, False)
    ]  # fmt: skip
    assert rows[0]["reason"] == "no pair kept (tie 3)" and (run / "a" / STAMP).exists()
    assert _manifest(run, "a")["counts"] == {"pairs_kept": 0, "pairs_dropped": {"tie": 3}}
    rows = _pipeline(run, config, stages, ["toy.mode=keep_nothing"])
    assert [(r["run"], r["status"], r["reason"]) for r in rows][0] == (
        "up-to-date", "skipped", "no pair kept (tie 3)"
    )  # fmt: skip
    sys.path.insert(0, str(REPO / "scripts"))
    import run_pipeline as script

    script.print_table(rows, 1.0)  # the final table names the skipped stage's reason
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("a "))
    assert "skipped" in line and line.endswith("no pair kept (tie 3)")


# -- process handling: lock, orphans, signals ----------------------------------------------------
def _start_driver(tmp_path: Path, run: Path, config: Path, stages) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    cmd = [sys.executable, str(driver), stages[0].script, str(config), str(run)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Ended (a zombie waiting for its parent counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _waiting_stage(tmp_path: Path):
    stages, config = _setup(tmp_path)
    config.write_text(config.read_text().replace("mode: ok", "mode: wait", 1))
    run = tmp_path / "run"
    driver = _start_driver(tmp_path, run, config, stages)
    _wait_for(lambda: (run / "a" / "child.pid").exists(), "the stage to start")
    stage_pid = json.loads((run / "a" / PID_FILE).read_text())["pid"]
    return stages, config, run, driver, stage_pid


def test_a_second_pipeline_on_the_same_run_is_refused_naming_the_pid(tmp_path):
    stages, config, run, driver, _ = _waiting_stage(tmp_path)
    try:
        with pytest.raises(PipelineLockedError, match=rf"another pipeline \(PID {driver.pid}\)"):
            _pipeline(run, config, stages)
        assert _runs(run, "a") == 1  # nothing was started by the refused pipeline
    finally:
        (run / "a" / "go").write_text("")
        assert driver.wait(timeout=120) == 0
    assert [r["run"] for r in _pipeline(run, config, stages)] == ["up-to-date"] * 2  # lock freed


def test_a_stage_left_running_by_a_killed_pipeline_is_detected(tmp_path):
    stages, config, run, driver, stage_pid = _waiting_stage(tmp_path)
    driver.send_signal(signal.SIGKILL)  # no handler runs: the stage lives on in its own session
    driver.wait()
    try:
        assert not _gone(stage_pid)
        with pytest.raises(StageStillRunningError, match=rf"stage a: process {stage_pid} "):
            _pipeline(run, config, stages)
    finally:
        (run / "a" / "go").write_text("")
    _wait_for(lambda: _gone(stage_pid), "the orphan stage to end")
    rows = _pipeline(run, config, stages)  # its PID file names a dead process now: rerun
    assert [r["run"] for r in rows] == ["resumed", "ran"] and not (run / "a" / PID_FILE).exists()


def test_a_reused_pid_is_not_taken_for_an_orphan_stage(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / PID_FILE).write_text(json.dumps({"pid": os.getpid(), "cmd": ["python", "other.py"]}))
    check_orphan("a", d, log=lambda m: None)  # alive, but running another command line
    assert not (d / PID_FILE).exists()
    own = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().split(b"\0")[:-1]
    (d / PID_FILE).write_text(json.dumps({"pid": os.getpid(), "cmd": [a.decode() for a in own]}))
    with pytest.raises(StageStillRunningError, match=f"process {os.getpid()} "):
        check_orphan("a", d, log=lambda m: None)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_pipeline_ends_the_stage_process_group(tmp_path, sig):
    _stages, _config, run, driver, stage_pid = _waiting_stage(tmp_path)
    child = int((run / "a" / "child.pid").read_text())  # a process the stage started
    driver.send_signal(sig)
    assert driver.wait(timeout=60) == 128 + sig
    _wait_for(lambda: _gone(stage_pid) and _gone(child), "the stage's group to end", 30)
    assert not (run / "a" / STAMP).exists() and not (run / "a" / PID_FILE).exists()


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


def test_the_cai_stage_trains_with_cai_dpo_over_dpo_and_reruns_when_it_changes(tmp_path):
    """The cai stage runs the DPO script with ``--overrides-section cai_dpo`` (its own learning
    rate and epochs over the dpo section's), and only its key depends on cai_dpo."""
    import utils.pipeline as P

    [cai] = [s for s in STAGES if s.name == "cai"]
    [dpo] = [s for s in STAGES if s.name == "dpo"]
    args = cai.args(tmp_path / "run")
    assert args[args.index("--overrides-section") + 1] == "cai_dpo"
    assert "--overrides-section" not in dpo.args(tmp_path / "run")
    cfg = {"model": {}, "dpo": {"learning_rate": 2e-5}, "cai_dpo": {"learning_rate": 2e-5}}
    changed = {**cfg, "cai_dpo": {"learning_rate": 1e-4}}
    run = tmp_path / "run"
    assert P.stage_key(cai, changed, run) != P.stage_key(cai, cfg, run)
    assert P.stage_key(dpo, changed, run) == P.stage_key(dpo, cfg, run)
