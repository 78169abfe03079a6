"""The end-to-end pipeline as data: an ordered list of stages, each a script run in a subprocess.

Every stage writes into ``<run>/<stage>/`` and ends with ``manifest.json``, whose ``status``
(ok | skipped | failed; exit codes and statuses in utils/errors.py) decides, not the exit code:
a stage whose process ended with a new manifest saying ``ok`` (exit 0) or ``skipped`` (nothing
kept; exit 0 or 3) gets ``<run>/<stage>/pipeline_stamp.json`` with a key hashing the config
sections the stage reads and the content of its input files; anything else (a crash, bad input,
a failed gate, no new manifest) stops the pipeline unstamped, with the tail of the stage's
stderr and the command to rerun it. A stage is skipped when its stamp matches; a stage without
a stamp (killed mid-way, or failed) is rerun and resumes by itself; a stage whose key changed is
moved aside (``<stage>.stale-<time>``, nothing deleted) and rerun. One pipeline at a time per
run directory, each stage in its own process group (utils/stage_process.py).

Adding a stage is one more ``Stage(...)`` entry in ``STAGES`` (the constitutional stages,
``cai_pairs`` and ``cai``, were added that way).
Each stage runs in its own process, so exactly one model is resident at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.constitution_policy import cai_dpo_args
from utils.errors import STATUS_OK, STATUS_SKIPPED
from utils.jsonl_io import write_json_atomic
from utils.provenance import config_hash
from utils.stage_process import (
    MANIFEST,
    check_orphan,
    file_signature,
    fresh_manifest,
    judge,
    pipeline_lock,
    read_manifest,
    run_stage_process,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
STAMP = "pipeline_stamp.json"


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    sections: tuple[str, ...]  # config sections that change this stage's output
    inputs: tuple[str, ...]  # files (relative to the run dir) whose content it reads
    args: Callable[[Path], list[str]]
    repo_inputs: tuple[str, ...] = ()  # files of the repository it reads (relative to its root)


def sft_stage_name(round_index: int, rounds: int) -> str:
    """The final round's SFT is ``sft`` (what pairs, DPO and the evaluation build on); earlier
    rounds are ``sft_r<r>`` (evaluated as arms of their own: accuracy per round)."""
    return "sft" if round_index == rounds else f"sft_r{round_index}"


def _verified_args(r: int, rounds: int) -> Callable[[Path], list[str]]:
    def args(run: Path) -> list[str]:
        out = ["--run", str(run), "--round", str(r)]
        if r > 1:
            prev = sft_stage_name(r - 1, rounds)
            out += ["--policy", str(run / prev / "adapter"),
                    "--previous", str(run / f"verified_r{r - 1}" / "sft_data.jsonl")]  # fmt: skip
        return out

    return args


def _sft_args(r: int, rounds: int) -> Callable[[Path], list[str]]:
    def args(run: Path) -> list[str]:
        return ["--run-dir", str(run), "--data", str(run / f"verified_r{r}" / "sft_data.jsonl"),
                "--out", str(run / sft_stage_name(r, rounds))]  # fmt: skip

    return args


def _pairs_args(rounds: int) -> Callable[[Path], list[str]]:
    def args(run: Path) -> list[str]:
        return ["--run", str(run), "--round", str(rounds + 1),
                "--policy", str(run / "sft" / "adapter"), "--out", str(run / "pairs")]  # fmt: skip

    return args


VERIFIED_SECTIONS = ("model", "verified", "critic", "constraints", "generation")


def round_stages(rounds: int) -> list[Stage]:
    """Expert iteration: verified_r1 (base, few-shot) -> SFT -> verified_r2 (that policy) -> SFT
    (from the base weights again) ... The final SFT is ``sft``."""
    out: list[Stage] = []
    for r in range(1, rounds + 1):
        inputs = ["stage1/constrained.jsonl"]
        if r > 1:
            inputs += [f"{sft_stage_name(r - 1, rounds)}/adapter/adapter_model.safetensors",
                       f"verified_r{r - 1}/sft_data.jsonl"]  # fmt: skip
        out.append(Stage(f"verified_r{r}", "scripts/sample_verified.py", sections=VERIFIED_SECTIONS,
                         inputs=tuple(inputs), args=_verified_args(r, rounds)))  # fmt: skip
        out.append(Stage(sft_stage_name(r, rounds), "scripts/train_stage1_sft.py",
                         sections=("model", "sft"), inputs=(f"verified_r{r}/sft_data.jsonl",),
                         args=_sft_args(r, rounds)))  # fmt: skip
    return out


def build_stages(cfg: dict[str, Any]) -> tuple[Stage, ...]:
    """The pipeline for this config: stage 1, ``verified.rounds`` rounds of verified sampling
    and SFT, checker-labelled pairs from the final policy, DPO, the constitutional stages and
    the evaluation."""
    verified = cfg.get("verified") or {}
    rounds = verified.get("rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"verified.rounds must be an integer >= 1, got {rounds!r}")
    on_policy = verified.get("pairs_from", "final_policy") == "final_policy"
    pairs_file = "pairs/pairs.jsonl" if on_policy else f"verified_r{rounds}/pairs.jsonl"
    pairs_stage = (
        Stage(
            "pairs",
            "scripts/sample_verified.py",
            sections=VERIFIED_SECTIONS,
            inputs=("stage1/constrained.jsonl", "sft/adapter/adapter_model.safetensors"),
            args=_pairs_args(rounds),
        ),
    ) if on_policy else ()  # fmt: skip
    earlier_sft = [f"{sft_stage_name(r, rounds)}/adapter/adapter_model.safetensors"
                   for r in range(1, rounds)]  # fmt: skip
    return (
        Stage(
            "stage1",
            "scripts/generate_stage1_sft_data.py",
            # the critic filters instructions; constraints augments them
            sections=("model", "stage1", "critic", "constraints", "generation"),
            inputs=(),
            args=lambda run: ["--out", str(run / "stage1")],
        ),
        *round_stages(rounds),
        *pairs_stage,
        Stage(
            "dpo",
            "scripts/train_stage1_dpo.py",
            sections=("model", "dpo"),
            inputs=(pairs_file, "sft/adapter/adapter_model.safetensors"),
            args=lambda run: ["--run-dir", str(run), "--pairs", str(run / pairs_file)],
        ),
        Stage(
            "cai_pairs",
            "scripts/generate_cai_pairs.py",
            sections=("model", "cai", "generation"),
            inputs=(
                "stage1/constrained.jsonl",
                "sft/adapter/adapter_model.safetensors",
                "dpo/adapter/adapter_model.safetensors",
            ),
            args=lambda run: ["--run", str(run)],
            repo_inputs=("configs/constitution.yaml",),
            # No CAI pair kept: manifest "skipped" (exit 3), stamped; the CAI DPO stage records
            # "skipped" and the report lists the cai arm as skipped, with the reason.
        ),
        Stage(
            "cai",
            "scripts/train_stage1_dpo.py",
            sections=("model", "dpo", "cai_dpo"),  # cai_dpo: its keys replace dpo's
            inputs=(
                "cai_pairs/pairs.jsonl",
                "sft/adapter/adapter_model.safetensors",
                "dpo/adapter/adapter_model.safetensors",
            ),
            # --pairs <run>/cai_pairs/pairs.jsonl --sft-adapter <the policy the pairs came from>
            args=lambda run: [*cai_dpo_args(run), "--overrides-section", "cai_dpo"],
        ),
        Stage(
            "eval",
            "scripts/evaluate_capability_differentiation.py",
            sections=("model", "eval", "sentinels", "constraints"),  # verdicts; seen/held-out tags
            inputs=(
                "stage1/train.jsonl",
                *earlier_sft,
                "sft/adapter/adapter_model.safetensors",
                "dpo/adapter/adapter_model.safetensors",
                "cai/adapter/adapter_model.safetensors",
            ),
            args=lambda run: ["--run", str(run)],
        ),
    )


# The default recipe's stages (configs/cpu_default.yaml); run_pipeline takes build_stages(cfg).
STAGES: tuple[Stage, ...] = build_stages({"verified": {"rounds": 2}})


def file_digest(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def stage_key(stage: Stage, cfg: dict[str, Any], run_dir: Path) -> str:
    parts = {
        "stage": stage.name,
        "config": {s: cfg.get(s) for s in stage.sections},
        "inputs": {i: file_digest(run_dir / i) for i in stage.inputs},
    }
    if stage.repo_inputs:  # e.g. the constitution: editing it reruns the CAI stages
        parts["repo_inputs"] = {i: file_digest(REPO_ROOT / i) for i in stage.repo_inputs}
    return config_hash(parts)


def stage_status(stage: Stage, cfg: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """("done" | "resume" | "stale" | "new", key)."""
    key = stage_key(stage, cfg, run_dir)
    d = run_dir / stage.name
    stamp = d / STAMP
    if stamp.exists():
        return ("done" if json.loads(stamp.read_text()).get("key") == key else "stale"), key
    started = d.exists() and any(not p.name.startswith(".") for p in d.iterdir())  # not .stage.pid
    return ("resume" if started else "new"), key


def _aside_path(run_dir: Path, name: str) -> Path:
    """A fresh ``<name>.stale-<time>[-n]`` path: two stale moves in one second must not collide."""
    base = f"{name}.stale-{time.strftime('%Y%m%dT%H%M%S')}"
    aside, n = run_dir / base, 1
    while aside.exists():
        aside, n = run_dir / f"{base}-{n}", n + 1
    return aside


def run_pipeline(
    run_dir: Path,
    cfg: dict[str, Any],
    config_path: str,
    overrides: Sequence[str],
    stages: Sequence[Stage] = STAGES,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the stages in order under ``<run>/.pipeline.lock``; one row per stage reached:
    ``run`` (ran | resumed | up-to-date), ``status`` and ``reason`` (from its manifest),
    ``seconds``, ``exit_code``, ``failed``. The first failed stage ends the run.

    Raises ``PipelineLockedError`` (another pipeline holds the run) and
    ``StageStillRunningError`` (a stage process of a killed pipeline still runs), both
    ``ProjectInputError``; ``PipelineInterrupted`` after SIGTERM/SIGINT ended the running stage."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with pipeline_lock(run_dir):
        for stage in stages:  # before anything runs: no second writer in any stage folder
            check_orphan(stage.name, run_dir / stage.name, log)
        for stage in stages:
            if only and stage.name not in only:
                continue
            rows.append(_run_stage(stage, run_dir, cfg, config_path, overrides, log))
            if rows[-1]["failed"]:
                break
    return rows


def stage_command(
    stage: Stage, run_dir: Path, config_path: str, overrides: Sequence[str]
) -> list[str]:
    cmd = [sys.executable, str(REPO_ROOT / stage.script), "--config", config_path]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + stage.args(run_dir)


def _run_stage(
    stage: Stage,
    run_dir: Path,
    cfg: dict[str, Any],
    config_path: str,
    overrides: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    status, key = stage_status(stage, cfg, run_dir)
    d = run_dir / stage.name
    if status == "done":
        m = read_manifest(d) or {}
        log(f"[pipeline] {stage.name}: up to date (inputs and config unchanged), skipped")
        return {"stage": stage.name, "run": "up-to-date", "status": m.get("status", STATUS_OK),
                "reason": m.get("reason"), "seconds": 0.0, "exit_code": 0, "failed": False}  # fmt: skip
    if status == "stale":
        aside = _aside_path(run_dir, stage.name)
        d.rename(aside)
        log(
            f"[pipeline] {stage.name}: config or inputs changed; previous output moved to {aside.name}"
        )
    elif status == "resume":
        log(f"[pipeline] {stage.name}: unfinished output found, resuming")
    cmd = stage_command(stage, run_dir, config_path, overrides)
    log(f"[pipeline] {stage.name}: {' '.join(cmd[1:])}")
    before = file_signature(d / MANIFEST)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = run_stage_process(d, cmd, env, REPO_ROOT)
    secs = round(time.perf_counter() - t0, 1)
    manifest = fresh_manifest(d, before)
    problem = judge(proc.returncode, manifest)
    row = {"stage": stage.name, "run": "resumed" if status == "resume" else "ran",
           "status": (manifest or {}).get("status"), "reason": (manifest or {}).get("reason"),
           "seconds": secs, "exit_code": proc.returncode, "failed": problem is not None}  # fmt: skip
    if problem is not None:
        log(f"[pipeline] {stage.name} FAILED ({problem}); not stamped, the pipeline stops.")
        if proc.stderr_tail:
            log(f"[pipeline] last lines of its stderr:\n{proc.stderr_tail}")
        rerun = f"cd {shlex.quote(str(REPO_ROOT))} && PYTHONPATH=. {shlex.join(cmd)}"
        log(f"[pipeline] fix the cause, then rerun the stage alone:\n  {rerun}\n"
            "or rerun the pipeline (finished stages are kept)")  # fmt: skip
        return row
    if row["status"] == STATUS_SKIPPED:
        log(f"[pipeline] {stage.name}: skipped by the stage ({row['reason']})")
    write_json_atomic(d / STAMP, {"key": key, "seconds": secs, "finished_unix": round(time.time())})
    return row
