"""SFT and DPO as 2 processes on CPU through the existing engine (torchrun -> accelerate
MULTI_CPU, gloo), on the tiny Qwen: both ranks train and the manifest says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import dpo_pair
from tests.test_sft import stage1_records
from utils.jsonl_io import write_jsonl_atomic

REPO = Path(__file__).resolve().parent.parent


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(REPO / "scripts" / script), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def assert_two_ranks(manifest: dict, steps: int) -> None:
    t = manifest["training"]
    assert t["world_size"] == 2
    ranks = t["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2  # two processes, not one process counted twice
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert all(r["steps_run"] == steps for r in ranks)
    assert t["global_step"] == steps


def test_sft_then_dpo_on_two_cpu_processes(tmp_path, tiny_qwen_dir):
    run = tmp_path / "run"
    write_jsonl_atomic(run / "stage1" / "train.jsonl", stage1_records(8))
    write_jsonl_atomic(run / "pairs" / "pairs.jsonl", [dpo_pair(i) for i in range(4)])
    small = {"max_steps": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
             "dev_fraction": 0.0, "logging_steps": 1, "save_steps": 2, "max_length": 64}  # fmt: skip
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": {"name": str(tiny_qwen_dir)}, "sft": small, "dpo": small})
    )
    common = ["--config", str(cfg), "--run-dir", str(run)]

    sft = torchrun("train_stage1_sft.py", *common)
    assert sft.returncode == 0, sft.stderr[-3000:]
    m = json.loads((run / "sft" / "manifest.json").read_text())
    assert_two_ranks(m, steps=2)
    # The data is sharded: 8 records, 1 per rank per step, 2 ranks -> 4 steps per epoch, so
    # 2 steps are half an epoch (a single process would be at a quarter).
    log = [r for r in map(json.loads, (run / "sft" / "train_log.jsonl").open()) if "loss" in r]
    assert log[-1]["epoch"] == 0.5
    assert (
        m["mask_audit"]["passed"] and (run / "sft" / "adapter" / "adapter_manifest.json").exists()
    )
    assert sft.stdout.count("stage-1 SFT") == 1  # only the main process reports

    dpo = torchrun("train_stage1_dpo.py", *common)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    m = json.loads((run / "dpo" / "manifest.json").read_text())
    assert_two_ranks(m, steps=2)
    assert (run / "dpo" / "adapter" / "adapter_model.safetensors").exists()
    log = [r for r in map(json.loads, (run / "dpo" / "dpo_log.jsonl").open()) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2]  # written once (rank 0), not once per rank
