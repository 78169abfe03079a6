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

The pieces SFT shares with utils/dpo.py (config parsing, resume, logging callbacks, adapter
saving) live in utils/training_common.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.chat_markup import scan_records_for_chat_markup
from utils.clean_model_loader import (
    LoadedModel,
)
from utils.errors import ProjectInputError
from utils.jsonl_io import (
    RECORD_ID,
    read_jsonl,
    read_jsonl_numbered,
)
from utils.mask_audit import (
    MaskAuditError,
    audit_rows,
    sft_rows,
    write_failed_audit,
    write_mask_audit,
)
from utils.provenance import config_hash
from utils.response_format import format_completion, format_prompt
from utils.training_common import (
    ADAPTER_SUBDIR,
    CHECKPOINT_SUBDIR,
    SAMPLING_STRATEGIES,
    JsonlLogCallback,
    StageResult,
    StepTimer,
    base_model_evaluation,
    checkpoint_step,
    dataclass_from_dict,
    file_sha256,
    filter_by_length,
    final_evaluation,
    lora_config,
    planned_max_steps,
    prepare_resume,
    rank_report,
    save_adapter,
    summarise_steps,
    trainable_parameter_count,
    truncate_log,
)

# -- config ----------------------------------------------------------------------------------


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
    # Repeat the training examples of a rare constraint type up to this many (0 = off):
    # a 270M model learned JSON from 17 verified records but nothing from 3-6 (issue 13).
    min_examples_per_type: int = 0

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
        if self.min_examples_per_type < 0:
            raise ValueError("sft.min_examples_per_type must be >= 0 (0 = off)")
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


# -- model -----------------------------------------------------------------------------------


# -- data ------------------------------------------------------------------------------------


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
                    "instruction_ids": list(r.get("instruction_ids") or []),
                }
            )
        except ValueError as e:
            raise ValueError(f"{where}: record {n} (id {rid!r}): {e}") from e
    if not out:
        raise ValueError(f"{where}: no records")
    return out


def balance_types(
    train: Sequence[dict[str, Any]], min_per_type: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``train`` plus repeats of the examples of every constraint type that has fewer than
    ``min_per_type`` of them (cycling through that type's examples in order), so a rare type is
    seen as often as a common one. Types with no example stay absent: repeating cannot invent
    one. A repeat gets the id ``<id>~r<j>``; nothing else changes. Deterministic; 0 = off."""
    if min_per_type <= 0:
        return list(train), {"min_per_type": min_per_type, "repeats": {}}
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in train:
        for t in e.get("instruction_ids") or []:
            by_type.setdefault(t, []).append(e)
    counts = {t: len(es) for t, es in by_type.items()}
    out, repeats = list(train), {}
    for t in sorted(by_type):
        have = sum(t in (e.get("instruction_ids") or []) for e in out)
        need = min_per_type - have
        for j in range(max(0, need)):
            e = by_type[t][j % len(by_type[t])]
            out.append({**e, "id": f"{e['id']}~r{j // len(by_type[t]) + 1}:{t}"})
        if need > 0:
            repeats[t] = need
    return out, {"min_per_type": min_per_type, "type_counts": counts, "repeats": repeats}


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


# -- trainer plumbing shared with DPO --------------------------------------------------------


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
