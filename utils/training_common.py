"""What SFT and DPO share: config parsing, the model load, the dev split and length filter,
resume from the last complete checkpoint, step timing and logging callbacks, adapter saving and
the per-rank report. Neither training stage imports the other; both import this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils.checkpoints import flag_unchanged_adapter, last_complete_checkpoint
from utils.clean_model_loader import (
    CleanModelLoader,
    LoadedModel,
    adapter_hash,
    resolve_device,
    write_adapter_manifest,
)
from utils.errors import ProjectInputError
from utils.jsonl_io import (
    JsonlAppender,
    resume,
    write_json_atomic,
    write_jsonl_atomic,
)
from utils.mask_audit import expected_tokens

CHECKPOINT_SUBDIR = "checkpoints"


ADAPTER_SUBDIR = "adapter"


RUN_KEY_FILE = "run_key.json"


SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length", "batch_rebalance")


class ResumeMismatchError(ProjectInputError, RuntimeError):
    """Checkpoints in the output directory came from a different data set or LoRA setup."""


def dataclass_from_dict(cls: type, d: dict[str, Any] | None, where: str) -> Any:
    """``cls(**d)`` that names unknown keys and wrongly typed values instead of running a default."""
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    for k, v in d.items():
        default = fields[k].default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{k}: expected true/false, got {v!r}")
        elif isinstance(default, int) and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{where}.{k}: expected an integer, got {v!r}")
        elif isinstance(default, float) and (
            isinstance(v, bool) or not isinstance(v, (int, float))
        ):
            raise ValueError(f"{where}.{k}: expected a number, got {v!r}")
    return cls(**d)


def lora_config(r: int, alpha: int, dropout: float, target_modules: str | Sequence[str]) -> Any:
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


MODEL_KEYS = ("name", "device", "dtype", "quantization", "trust_remote_code", "attn_implementation")


def load_base_model(model_cfg: dict[str, Any]) -> LoadedModel:
    """The base model through CleanModelLoader, from the shared ``model`` section (only the keys
    in MODEL_KEYS are read; other stages may keep more there). The loader puts each process of a
    multi-GPU launch on its own GPU (``resolve_device``)."""
    return CleanModelLoader(
        device=resolve_device(model_cfg.get("device")),
        dtype=model_cfg.get("dtype"),
        quantization=model_cfg.get("quantization"),
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        attn_implementation=model_cfg.get("attn_implementation"),
    ).load(model_cfg.get("name"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_dev(
    examples: Sequence[dict[str, Any]], dev_fraction: float, max_dev: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, dev): the dev examples are those with the smallest hash of (seed, id), so the
    split does not depend on file order. At least one dev example when dev_fraction > 0 and
    there are two or more examples; at most ``max_dev``."""
    if dev_fraction <= 0 or len(examples) < 2 or max_dev <= 0:
        return list(examples), []
    n_dev = min(max_dev, len(examples) - 1, max(1, round(dev_fraction * len(examples))))
    rank = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e['id']}".encode()).hexdigest())
    dev_ids = {e["id"] for e in rank[:n_dev]}
    return [e for e in examples if e["id"] not in dev_ids], [
        e for e in examples if e["id"] in dev_ids
    ]


def filter_by_length(
    lm: LoadedModel,
    examples: Sequence[dict[str, Any]],
    max_length: int,
    completion_keys=("completion",),
) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): an example whose inference-path tokens (prompt + completion + EOS) exceed
    ``max_length`` is dropped and reported, because truncation would cut off the EOS."""
    kept, dropped = [], []
    for e in examples:
        n = max(
            len(expected_tokens(lm.tokenizer, lm.policy, e["prompt"], e[k])[0])
            for k in completion_keys
        )
        (kept if n <= max_length else dropped).append({**e, "n_tokens": n} if n > max_length else e)
    return kept, [{"id": d["id"], "n_tokens": d["n_tokens"]} for d in dropped]


class StepTimer(TrainerCallback):
    """Wall and CPU seconds of every optimizer step run IN THIS PROCESS (a resumed run counts
    only the steps it ran, which is how a test tells a resume from a restart). CPU seconds (all
    threads) stay meaningful on a shared machine, where wall time mostly measures the others."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        self.step_seconds.append(time.perf_counter() - self._t0)
        self.step_cpu_seconds.append(time.process_time() - self._c0)


class JsonlLogCallback(TrainerCallback):
    """Append every ``on_log`` record (main process only) to a JSONL file, optionally through
    ``transform`` (DPO adds derived fields)."""

    def __init__(self, path: str | Path, transform: Callable[[dict], dict] | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        self.rows: list[dict[str, Any]] = []

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
        if not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        if self.transform is not None:
            row = self.transform(row)
        self.rows.append(row)
        if state.is_world_process_zero:
            with JsonlAppender(self.path) as f:
                f.write(row)


def truncate_log(path: str | Path, max_step: int) -> int:
    """Drop log rows past the checkpoint a run resumes from (they will be logged again), so the
    log has no duplicate step. Returns the number of rows removed."""
    path = Path(path)
    if not path.exists():
        return 0
    rows, _ = resume(path, key="__none__")
    keep = [r for r in rows if int(r.get("step", 0)) <= max_step]
    if len(keep) != len(rows):
        write_jsonl_atomic(path, keep)
    return len(rows) - len(keep)


def last_checkpoint(checkpoint_dir: str | Path, move_incomplete: bool = False) -> Path | None:
    """The newest COMPLETE checkpoint; newer half-written ones are moved aside when
    ``move_incomplete`` (utils/checkpoints.py says what complete means)."""
    return last_complete_checkpoint(checkpoint_dir, move_incomplete)


def checkpoint_step(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state["global_step"])


def prepare_resume(
    checkpoint_dir: str | Path, run_key: dict[str, Any], fresh: bool, is_main: bool
) -> Path | None:
    """The checkpoint to resume from, or None. Checkpoints from another data set or LoRA setup
    are refused (``ResumeMismatchError``) unless ``fresh``, which deletes them."""
    d = Path(checkpoint_dir)
    key_file = d / RUN_KEY_FILE
    if fresh and is_main and d.exists():
        shutil.rmtree(d)
    if key_file.exists():
        old = json.loads(key_file.read_text())
        if old != run_key:
            changed = sorted(k for k in set(old) | set(run_key) if old.get(k) != run_key.get(k))
            raise ResumeMismatchError(
                f"{d} holds checkpoints of a different run (changed: {changed}); rerun with "
                "--fresh to discard them, or choose another --out"
            )
    elif is_main:
        write_json_atomic(key_file, run_key)
    return last_checkpoint(d, move_incomplete=is_main)


def save_adapter(trainer: Any, adapter_dir: str | Path, lm: LoadedModel, extra: dict) -> dict:
    """Save only the trained ("default") LoRA adapter and its base-model manifest."""
    adapter_dir = Path(adapter_dir)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(adapter_dir))  # sharded weights need every rank to gather
        if trainer.is_world_process_zero():
            (adapter_dir / "training_args.bin").unlink(missing_ok=True)
            shutil.rmtree(adapter_dir / "ref", ignore_errors=True)
    elif trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(
            str(adapter_dir), selected_adapters=["default"], save_embedding_layers=False
        )
    if trainer.is_world_process_zero():
        write_adapter_manifest(adapter_dir, lm, extra)
        # the starting point: DPO's parent (SFT) adapter, else LoRA's init (every lora_B zero)
        unchanged = flag_unchanged_adapter(adapter_dir, extra.get("parent_adapter"), extra["stage"])
        return {"path": str(adapter_dir), "sha256": adapter_hash(adapter_dir),
                "adapter_unchanged": unchanged}  # fmt: skip
    return {"path": str(adapter_dir)}


def rank_report(trainer: Any, steps_run: int) -> list[dict[str, Any]]:
    """One record per process (rank, pid, host, device, steps it ran), gathered by accelerate."""
    from accelerate.utils import gather_object

    acc = trainer.accelerator
    mine = {
        "rank": acc.process_index,
        "local_rank": acc.local_process_index,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(acc.device),
        "distributed_type": str(acc.distributed_type),
        "steps_run": steps_run,
    }
    return sorted(gather_object([mine]), key=lambda r: r["rank"])


def planned_max_steps(
    n_train: int, per_device_batch: int, grad_accum: int, world_size: int, epochs: float, cap: int
) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_train`` examples, capped at ``cap`` (-1: no
    cap). HF's max_steps > 0 REPLACES epochs (it would loop the data past one epoch); the
    config's max_steps is a cap on the CPU run, so the stage passes this value instead."""
    batches = math.ceil(n_train / (per_device_batch * world_size))
    total = max(1, math.ceil(epochs * max(1, math.ceil(batches / grad_accum))))
    return total if cap < 0 else min(cap, total)


def base_model_evaluation(trainer: Any) -> float | None:
    """Dev loss of the BASE model (every LoRA adapter disabled) on the same dev split, through
    the same collator and completion-only mask: the number the adapter's ``eval_loss`` must
    beat. Logged as ``base_eval_loss``."""
    if trainer.eval_dataset is None:
        return None
    with trainer.model.disable_adapter():
        metrics = trainer.evaluate(metric_key_prefix="base_eval")
    return metrics.get("base_eval_loss")


def final_evaluation(trainer: Any) -> dict[str, Any]:
    """Metrics of the trained adapter on the dev split: the eval logged at the last step when
    there is one (an eval pass costs a minute on CPU), else a fresh ``trainer.evaluate()``."""
    step = trainer.state.global_step
    for h in reversed(trainer.state.log_history):
        if h.get("step") == step and "eval_loss" in h:
            return dict(h)
    return trainer.evaluate()


def trainable_parameter_count(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def summarise_steps(
    step_seconds: Sequence[float], step_cpu_seconds: Sequence[float] = ()
) -> dict[str, Any]:
    """Mean step time; the first step (allocator and kernel warm-up) is excluded when others ran."""

    def steady_mean(xs: Sequence[float]) -> float | None:
        steady = list(xs[1:] if len(xs) > 1 else xs)
        return round(sum(steady) / len(steady), 4) if steady else None

    s = list(step_seconds)
    return {
        "steps_run": len(s),
        "step_seconds_mean": steady_mean(s),
        "step_seconds_first": round(s[0], 4) if s else None,
        "step_cpu_seconds_mean": steady_mean(list(step_cpu_seconds)),
        "train_seconds": round(sum(s), 3),
    }


@dataclass
class StageResult:
    """What a training stage did, for the manifest and the printed summary."""

    summary: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True
