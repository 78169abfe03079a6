"""Stage-1 SFT: LoRA on the base model's own instruction data with TRL's SFTTrainer.

The trainer does the training; this module adds only what TRL does not:

- records become prompt/completion pairs in the ONE shared format (``format_prompt`` /
  ``format_completion``; TRL appends the model's EOS to every completion and trains on it);
- a deterministic dev split (by hashed id) for an eval loss, and a length filter that REPORTS
  what it drops (TRL would truncate a completion's EOS away or silently drop the example);
- the mask audit (utils/mask_audit.py) on the trainer's own preprocessed dataset, before step 1;
- resume from the last checkpoint after a kill, refused when the data or LoRA setup changed;
- the adapter in ``<out>/adapter/`` with the base model's weights hash, and per-rank evidence
  (via accelerate's ``gather_object``) of how many processes trained.

The helpers below (config parsing, resume, logging callbacks, adapter saving) are shared with
utils/dpo.py, which trains the same adapter further.
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

from utils.chat_markup import scan_records_for_chat_markup
from utils.checkpoints import flag_unchanged_adapter, last_complete_checkpoint
from utils.clean_model_loader import (
    CleanModelLoader,
    LoadedModel,
    adapter_hash,
    write_adapter_manifest,
)
from utils.errors import ProjectInputError
from utils.jsonl_io import (
    RECORD_ID,
    JsonlAppender,
    read_jsonl,
    read_jsonl_numbered,
    resume,
    write_json_atomic,
    write_jsonl_atomic,
)
from utils.mask_audit import (
    MaskAuditError,
    audit_rows,
    expected_tokens,
    sft_rows,
    write_failed_audit,
    write_mask_audit,
)
from utils.provenance import config_hash
from utils.response_format import format_completion, format_prompt

CHECKPOINT_SUBDIR = "checkpoints"
ADAPTER_SUBDIR = "adapter"
RUN_KEY_FILE = "run_key.json"
SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length", "batch_rebalance")


class ResumeMismatchError(ProjectInputError, RuntimeError):
    """Checkpoints in the output directory came from a different data set or LoRA setup."""


# -- config ----------------------------------------------------------------------------------
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


@dataclass
class SFTStageConfig:
    """The ``sft`` section of the YAML recipe. Defaults are the CPU recipe (Gemma-3-270M, 2 cores)."""

    # LoRA: all linear layers of every block. On CPU the cost of a step is the frozen base's
    # forward/backward (and the 262k-vocab head), so all-linear costs little more than q,k,v,o.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05  # < 1: a fraction of the run
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = 60  # a cap: min(num_train_epochs of data, max_steps); -1 = no cap
    max_length: int = 512  # longer examples are dropped and reported, never cut
    dev_fraction: float = 0.05
    max_dev_examples: int = 32
    eval_steps: int = 30
    logging_steps: int = 5
    save_steps: int = 20
    save_total_limit: int = 2
    seed: int = 0
    # TRL defaults both to True; on a CPU without bf16 units they make a step ~10x slower.
    bf16: bool = False
    gradient_checkpointing: bool = False
    train_sampling_strategy: str = "group_by_length"
    padding_free: bool = False  # GPU only: needs FlashAttention (attn_implementation)
    attn_implementation: str | None = (
        None  # e.g. "flash_attention_2" on GPU; None keeps the model's
    )
    dataloader_num_workers: int = 0
    mask_audit_examples: int = 8

    def __post_init__(self) -> None:
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ValueError("sft.lora_r and sft.lora_alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("sft.lora_dropout must be in [0, 1)")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError("sft.dev_fraction must be in [0, 1)")
        if self.max_length <= 8:
            raise ValueError("sft.max_length must be > 8 tokens")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"sft.train_sampling_strategy must be one of {SAMPLING_STRATEGIES}")
        if self.max_steps == 0 or self.num_train_epochs <= 0:
            raise ValueError("sft.max_steps must be -1 or positive and num_train_epochs positive")
        if self.padding_free and not str(self.attn_implementation or "").startswith("flash"):
            raise ValueError(
                "sft.padding_free needs FlashAttention (GPU only): set sft.attn_implementation to "
                "'flash_attention_2' or 'flash_attention_3', or padding_free: false on CPU"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SFTStageConfig:
        return dataclass_from_dict(cls, d, "sft")


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


# -- model -----------------------------------------------------------------------------------
MODEL_KEYS = ("name", "device", "dtype", "quantization", "trust_remote_code")


def resolve_device(device: str | None) -> str:
    """Each process of a multi-GPU launch takes its own GPU; CPU stays CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def load_base_model(model_cfg: dict[str, Any]) -> LoadedModel:
    """The base model through CleanModelLoader, from the shared ``model`` section (only the keys
    in MODEL_KEYS are read; other stages may keep more there)."""
    return CleanModelLoader(
        device=resolve_device(model_cfg.get("device")),
        dtype=model_cfg.get("dtype"),
        quantization=model_cfg.get("quantization"),
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
    ).load(model_cfg.get("name"))


# -- data ------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sft_examples(records: Sequence[dict[str, Any]], where: str = "train.jsonl") -> list[dict]:
    """``{id, instruction, prompt, completion}`` per stage-1 record, in the one shared format (no EOS: the
    trainer appends the model's EOS). SFT trains on format_prompt(instruction), NOT on the
    few-shot prompt that generated the response."""
    out, seen = [], set()
    for n, r in enumerate(records, start=1):
        for k in ("id", "instruction", "response"):
            if k not in r:
                raise ValueError(f"{where}: record {n} lacks field {k!r}")
        rid = str(r["id"])
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r} (record {n})")
        seen.add(rid)
        try:
            out.append(
                {
                    "id": rid,
                    "instruction": r["instruction"],
                    "prompt": format_prompt(r["instruction"]),
                    "completion": format_completion(r["response"]),
                }
            )
        except ValueError as e:
            raise ValueError(f"{where}: record {n} (id {rid!r}): {e}") from e
    if not out:
        raise ValueError(f"{where}: no records")
    return out


def check_no_test_overlap(
    examples: Sequence[dict[str, Any]], test_records: Sequence[dict[str, Any]]
) -> None:
    """A training instruction identical (case/space-insensitive) to a held-out test instruction
    would inflate the evaluation; refuse to train on it."""

    def norm(s: str) -> str:
        return " ".join(str(s).lower().split())

    test = {norm(r["instruction"]) for r in test_records if "instruction" in r}
    leaked = [e["id"] for e in examples if norm(e["instruction"]) in test]
    if leaked:
        raise ValueError(
            f"{len(leaked)} training instruction(s) also appear in the held-out test set: "
            f"{leaked[:5]}"
        )


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


# -- trainer plumbing shared with DPO --------------------------------------------------------
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


# -- SFT -------------------------------------------------------------------------------------
def sft_args_kwargs(
    cfg: SFTStageConfig,
    out_dir: str | Path,
    has_dev: bool,
    use_cpu: bool,
    eos_token: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of trl.SFTConfig for this stage (the benchmark edits a copy)."""
    kw: dict[str, Any] = {
        "output_dir": str(Path(out_dir) / CHECKPOINT_SUBDIR),
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_eval_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "optim": cfg.optim,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "eval_strategy": "steps" if has_dev else "no",
        "eval_steps": cfg.eval_steps,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": cfg.bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "train_sampling_strategy": cfg.train_sampling_strategy,
        "padding_free": cfg.padding_free,
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "max_length": cfg.max_length,
        "completion_only_loss": True,  # loss on the response + EOS only
        "ddp_find_unused_parameters": False,  # every LoRA parameter is used in every step
        "report_to": "none",
        "use_cpu": use_cpu,
    }
    if eos_token is not None:
        kw["eos_token"] = eos_token  # the EOS appended and trained = the one inference stops on
    return kw


def make_sft_args(cfg: SFTStageConfig, out_dir: str | Path, has_dev: bool, use_cpu: bool) -> Any:
    """Built BEFORE the model is loaded, so a DeepSpeed ZeRO-3 launch can shard at load time."""
    from trl import SFTConfig

    return SFTConfig(**sft_args_kwargs(cfg, out_dir, has_dev, use_cpu))


def build_sft_trainer(
    lm: LoadedModel,
    train: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    cfg: SFTStageConfig,
    args: Any,
    callbacks: Sequence[Any] = (),
) -> Any:
    from datasets import Dataset
    from trl import SFTTrainer

    if cfg.attn_implementation:
        lm.model.set_attn_implementation(cfg.attn_implementation)
    args.eos_token = lm.policy.eos_token  # the EOS TRL appends is the model's stop token
    if not dev and str(args.eval_strategy) != "no":
        from transformers.trainer_utils import IntervalStrategy

        args.eval_strategy = IntervalStrategy.NO
    keep = ("id", "prompt", "completion")
    return SFTTrainer(
        model=lm.model,
        args=args,
        train_dataset=Dataset.from_list([{k: e[k] for k in keep} for e in train]),
        eval_dataset=Dataset.from_list([{k: e[k] for k in keep} for e in dev]) if dev else None,
        processing_class=lm.tokenizer,
        peft_config=lora_config(
            cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules
        ),
        callbacks=list(callbacks),
    )


def audit_sft_trainer(
    trainer: Any,
    lm: LoadedModel,
    train: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    n_render: int,
    out_dir: str | Path | None,
) -> dict[str, Any]:
    """Run the mask audit on the datasets the trainer will iterate; write it with the run (main
    process); raise ``MaskAuditError`` (and keep the failure on disk) on the first bad example."""
    eos = lm.policy.eos_token
    is_main = trainer.is_world_process_zero()
    try:
        audits = {
            "train": audit_rows(
                sft_rows(trainer.train_dataset, eos),
                lm.tokenizer,
                lm.policy,
                n_render=n_render,
                expected_ids=[e["id"] for e in train],
                title="SFT train split",
            )
        }
        if dev:
            audits["dev"] = audit_rows(
                sft_rows(trainer.eval_dataset, eos),
                lm.tokenizer,
                lm.policy,
                n_render=min(2, n_render),
                expected_ids=[e["id"] for e in dev],
                title="SFT dev split",
            )
    except MaskAuditError as e:
        if out_dir is not None and is_main:
            write_failed_audit(out_dir, e)
        raise
    if out_dir is None:
        return {"passed": True, "splits": {k: a.summary() for k, a in audits.items()}}
    if is_main:
        return write_mask_audit(out_dir, audits, lm.policy)
    return {"passed": True, "splits": {k: a.summary() for k, a in audits.items()}}


@dataclass
class StageResult:
    """What a training stage did, for the manifest and the printed summary."""

    summary: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True


def run_sft(
    lm: LoadedModel,
    train: list[dict[str, Any]],
    dev: list[dict[str, Any]],
    cfg: SFTStageConfig,
    args: Any,
    out_dir: str | Path,
    data_info: dict[str, Any],
    fresh: bool = False,
) -> StageResult:
    """Filter by length, build the trainer, audit the mask, train (resuming), save the adapter."""
    out_dir = Path(out_dir)
    train, dropped_train = filter_by_length(lm, train, cfg.max_length)
    dev, dropped_dev = filter_by_length(lm, dev, cfg.max_length)
    if not train:
        raise ProjectInputError(f"no training example fits max_length={cfg.max_length} tokens")
    args.max_steps = planned_max_steps(
        len(train),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
        cfg.num_train_epochs,
        cfg.max_steps,
    )
    timer = StepTimer()
    log_path = out_dir / "train_log.jsonl"
    log_cb = JsonlLogCallback(log_path)
    trainer = build_sft_trainer(lm, train, dev, cfg, args, callbacks=[timer, log_cb])
    is_main = trainer.is_world_process_zero()
    audit = audit_sft_trainer(trainer, lm, train, dev, cfg.mask_audit_examples, out_dir)

    run_key = {
        "stage": "sft",
        "data_sha256": data_info.get("sha256"),
        "base_weights_sha256": lm.provenance["weights_sha256"],
        "lora": [cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules],
        "seed": cfg.seed,
        "train_ids_sha256": config_hash(sorted(e["id"] for e in train)),
    }
    with trainer.accelerator.main_process_first():
        ckpt = prepare_resume(Path(args.output_dir), run_key, fresh, is_main)
    resumed_from_step = checkpoint_step(ckpt) if ckpt else 0
    if ckpt and is_main:
        truncate_log(log_path, resumed_from_step)
    elif is_main and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    base_eval_loss = base_model_evaluation(trainer) if dev else None
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_wall = time.perf_counter() - t0
    final_eval = final_evaluation(trainer) if dev else {}

    trainable, total = trainable_parameter_count(trainer.model)
    adapter = save_adapter(
        trainer,
        out_dir / ADAPTER_SUBDIR,
        lm,
        {
            "stage": "sft",
            "lora": {
                "r": cfg.lora_r,
                "alpha": cfg.lora_alpha,
                "dropout": cfg.lora_dropout,
                "target_modules": cfg.lora_target_modules,
            },
            "global_step": trainer.state.global_step,
        },
    )
    ranks = rank_report(trainer, len(timer.step_seconds))
    history = trainer.state.log_history
    # TRL's cumulative non-pad token count (all ranks) over the steps this process ran
    tokens_seen = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    train_losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "data": {
            **data_info,
            "n_train": len(train),
            "n_dev": len(dev),
            "dropped_too_long": dropped_train + dropped_dev,
        },
        "training": {
            "planned_steps": args.max_steps,
            "global_step": trainer.state.global_step,
            "resumed_from_checkpoint": str(ckpt) if ckpt else None,
            "resumed_from_step": resumed_from_step,
            "train_loss_first": train_losses[0] if train_losses else None,
            "train_loss_last": train_losses[-1] if train_losses else None,
            "train_loss_mean": out.training_loss,
            "eval_loss": final_eval.get("eval_loss"),
            "base_eval_loss": base_eval_loss,  # same dev split, adapter disabled
            "train_wall_seconds": round(train_wall, 3),
            **summarise_steps(timer.step_seconds, timer.step_cpu_seconds),
            "tokens_seen": tokens_seen,
            "nonpad_tokens_per_second": (
                round(tokens_seen / sum(timer.step_seconds), 2)
                if tokens_seen and timer.step_seconds
                else None
            ),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "world_size": trainer.args.world_size,
            "ranks": ranks,
        },
        "mask_audit": audit,
        "adapter": adapter,
        "log": str(log_path),
    }
    return StageResult(summary=summary, is_main=is_main)


def load_stage1(
    data_path: str | Path, test_path: str | Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stage-1 records as SFT examples, plus the data facts for the manifest."""
    data_path = Path(data_path)
    numbered = read_jsonl_numbered(
        data_path, {"id": RECORD_ID, "instruction": str, "response": str}
    )
    records = [r for _, r in numbered]
    # Other families' chat markup is plain text to this tokenizer; refuse it before training.
    scan_records_for_chat_markup(
        records, data_path, ("instruction", "response"), [n for n, _ in numbered]
    )
    examples = sft_examples(records, where=str(data_path))
    info: dict[str, Any] = {
        "path": str(data_path),
        "sha256": file_sha256(data_path),
        "n_records": len(records),
    }
    if test_path is not None and Path(test_path).exists():
        check_no_test_overlap(examples, read_jsonl(test_path, optional={"instruction": str}))
        info["test_overlap_checked"] = str(test_path)
    return examples, info
