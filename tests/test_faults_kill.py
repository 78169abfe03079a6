"""Issue 14, case 'kill -9 during training' (SFT and DPO, one resume path): the stage process is
killed with SIGKILL while it saves checkpoint-3 (weights written, optimizer not yet), a real
kill of a real run on the tiny Llama. The rerun, the same command, moves the half-written
checkpoint aside, resumes from checkpoint-2 and runs steps 3 and 4 only: every step logged
once, in the stage's log and in the trainer state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.train_stage1_dpo import main as dpo_main
from scripts.train_stage1_sft import main as sft_main
from tests.conftest import dpo_pair
from tests.test_sft import TINY_SFT, build_tiny_bos_model, stage1_records, write_config, write_run
from utils.jsonl_io import read_jsonl

REPO = Path(__file__).resolve().parent.parent
KILL_AT_STEP = 3

# The stage script, held in the middle of saving checkpoint-KILL_AT (after the adapter weights,
# before the optimizer) so the test can SIGKILL it there.
HELD_STAGE = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import transformers
marker = Path(sys.argv[1])
save = transformers.Trainer._save_optimizer_and_scheduler

def held(self, output_dir):
    if self.state.global_step == {step}:
        marker.write_text(str(os.getpid()))
        time.sleep(900)
    return save(self, output_dir)

transformers.Trainer._save_optimizer_and_scheduler = held
from scripts.{script} import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    return build_tiny_bos_model(tmp_path_factory.mktemp("tiny-llama-base"))


def kill_while_saving(script: str, argv: list[str], tmp_path: Path) -> None:
    """Run ``scripts/<script>.py argv`` until it is saving checkpoint-KILL_AT_STEP, then
    SIGKILL it (no handler, no finally block runs)."""
    wrapper = tmp_path / "held_stage.py"
    wrapper.write_text(HELD_STAGE.format(repo=str(REPO), step=KILL_AT_STEP, script=script))
    marker = tmp_path / "saving"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(wrapper), str(marker), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"the stage never reached step {KILL_AT_STEP}: {proc.stderr.read()[-3000:]}"
            )
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kill_9_during_a_checkpoint_save_resumes_from_the_last_complete_one(
    stage, small_model_dir, tiny_dpo_run, tmp_path
):
    steps = {"max_steps": 4, "save_steps": 1, "logging_steps": 1, "save_total_limit": 3}
    if stage == "sft":
        run = write_run(tmp_path / "run", stage1_records(16))
        cfg = write_config(tmp_path / "cfg.yaml", small_model_dir,
                           {**TINY_SFT, **steps, "dev_fraction": 0.0, "max_length": 256})  # fmt: skip
        script, main, log_name = "train_stage1_sft", sft_main, "train_log.jsonl"
    else:
        pairs = [dpo_pair(i) for i in range(8)]
        run, cfg = tiny_dpo_run(tmp_path, small_model_dir, pairs, **steps, max_length=256)
        script, main, log_name = "train_stage1_dpo", dpo_main, "dpo_log.jsonl"
    argv = ["--config", str(cfg), "--run-dir", str(run)]
    out = run / stage
    ckpts = out / "checkpoints"

    kill_while_saving(script, argv, tmp_path)
    torn = ckpts / f"checkpoint-{KILL_AT_STEP}"
    assert (torn / "adapter_model.safetensors").exists() and not (torn / "optimizer.pt").exists()
    assert not (out / "manifest.json").exists()  # killed: no manifest, nothing stamped
    logged = [r["step"] for r in read_jsonl(out / log_name) if "loss" in r]
    assert logged == [1, 2, 3]  # step 3 was logged before its save: it must not count twice
    resumed_from = {p.name: p.stat().st_mtime_ns for p in (ckpts / "checkpoint-2").iterdir()}

    assert main(argv) == 0  # the same command
    t = json.loads((out / "manifest.json").read_text())["training"]
    assert t["resumed_from_checkpoint"].endswith("checkpoint-2") and t["resumed_from_step"] == 2
    assert t["global_step"] == 4 and t["steps_run"] == 2  # steps 3 and 4, once each
    aside = [
        p.name
        for p in ckpts.iterdir()
        if p.name.startswith(f"incomplete-checkpoint-{KILL_AT_STEP}-")
    ]
    assert len(aside) == 1 and not (ckpts / aside[0] / "optimizer.pt").exists()
    assert [r["step"] for r in read_jsonl(out / log_name) if "loss" in r] == [1, 2, 3, 4]
    state = json.loads((ckpts / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    # the checkpoint the run resumed from was read, not rewritten
    assert resumed_from == {
        p.name: p.stat().st_mtime_ns for p in (ckpts / "checkpoint-2").iterdir()
    }
