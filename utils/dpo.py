"""Stage-1 DPO: continue training the SFT LoRA adapter on self-judged preference pairs (TRL).

Why continue the SFT adapter rather than merge it and train a new one: TRL 1.16's DPOTrainer,
given a PeftModel that already carries an adapter and no ``ref_model``, copies that adapter into
a frozen "ref" adapter and computes the reference log-probs through it (``use_adapter(...,
"ref")``). So the reference is exactly the SFT policy, no second model is loaded, and the result
is ONE adapter on the untouched base weights: its manifest's base-weights hash stays true and
evaluation loads it with ``attach_adapter`` like any other arm. Merging would change the base
weights (an adapter trained on merged weights no longer matches the recorded base hash) and
costs a full copy of the model.

What this module adds to TRL: pair loading/validation in the shared format, the mask audit of
the tokenised pairs, ``dpo_log.jsonl`` with rewards, margins and the chosen log-prob trend per
logging step, and a warning when the chosen responses' log-probs fall during training (trl #800:
DPO can raise the margin by pushing both responses down, which degrades the chosen outputs),
per-pair soft labels in the sigmoid loss (``dpo.soft_labels``, utils/dpo_loss.py) and an optional
SFT term on the chosen responses (``loss_type: [sigmoid, sft]`` with ``loss_weights``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils.chat_markup import scan_records_for_chat_markup
from utils.clean_model_loader import LoadedModel, adapter_hash, attach_adapter
from utils.errors import ProjectInputError
from utils.jsonl_io import NULL, NUMBER, RECORD_ID, JsonlError, read_jsonl, read_jsonl_numbered
from utils.mask_audit import (
    MaskAuditError,
    audit_rows,
    dpo_rows,
    write_failed_audit,
    write_mask_audit,
)
from utils.provenance import config_hash
from utils.response_format import INSTRUCTION_HEADER, RESPONSE_HEADER
from utils.training_common import (
    ADAPTER_SUBDIR,
    CHECKPOINT_SUBDIR,
    SAMPLING_STRATEGIES,
    JsonlLogCallback,
    StageResult,
    StepTimer,
    checkpoint_step,
    dataclass_from_dict,
    file_sha256,
    filter_by_length,
    final_evaluation,
    planned_max_steps,
    prepare_resume,
    rank_report,
    save_adapter,
    summarise_steps,
    trainable_parameter_count,
    truncate_log,
)

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


class ChosenLogprobWarning(UserWarning):
    """The chosen responses became less likely than under the SFT policy during DPO."""


@dataclass
class DPOStageConfig:
    """The ``dpo`` section of the YAML recipe. Defaults are the CPU recipe (Gemma-3-270M)."""

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"  # both recipes: [sigmoid, sft] (configs/*.yaml)
    loss_weights: list[float] | None = None  # one per loss_type; None = 1.0 each (TRL)
    soft_labels: bool = True  # smooth the sigmoid loss per pair: eps_i = 1 - soft_label_i
    learning_rate: float = 2e-5  # LoRA DPO; TRL's 1e-6 default is for full fine-tuning
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    per_device_train_batch_size: int = 2  # pairs: each pair is 2 sequences + 2 reference passes
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = 20  # a cap: min(num_train_epochs of pairs, max_steps); -1 = no cap
    max_length: int = 512  # pairs whose longer side exceeds it are dropped and reported
    min_margin: float | None = None  # drop pairs whose judge margin is below this
    dev_fraction: float = 0.05
    max_dev_examples: int = 8
    eval_steps: int = 20
    logging_steps: int = 2
    save_steps: int = 10
    save_total_limit: int = 2
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    train_sampling_strategy: str = "random"
    precompute_ref_log_probs: bool = False
    attn_implementation: str | None = None
    dataloader_num_workers: int = 0
    chosen_logp_warn_nats: float = 1.0  # warn when chosen log-prob fell this much (per sequence)
    chosen_logp_window: int = 3  # logging points averaged at the start and end of the trend
    mask_audit_examples: int = 4

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError("dpo.beta must be positive")
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        bad = [x for x in losses if x not in DPO_LOSS_TYPES]
        if not losses or bad:
            raise ValueError(f"dpo.loss_type {bad or losses} unknown; choose from {DPO_LOSS_TYPES}")
        w = self.loss_weights
        if w is not None and (
            not isinstance(w, list)
            or len(w) != len(losses)
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in w)
        ):
            raise ValueError(f"dpo.loss_weights {w!r}: one number >= 0 per loss_type {losses}")
        if self.soft_labels and "sigmoid" not in losses:
            raise ValueError(
                f"dpo.soft_labels smooths the sigmoid loss; loss_type {losses} has none "
                "(set dpo.soft_labels=false)"
            )
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError("dpo.dev_fraction must be in [0, 1)")
        if self.max_length <= 8:
            raise ValueError("dpo.max_length must be > 8 tokens")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"dpo.train_sampling_strategy must be one of {SAMPLING_STRATEGIES}")
        if self.max_steps == 0 or self.num_train_epochs <= 0:
            raise ValueError("dpo.max_steps must be -1 or positive and num_train_epochs positive")
        if self.chosen_logp_window < 1 or self.chosen_logp_warn_nats < 0:
            raise ValueError("dpo.chosen_logp_window >= 1 and chosen_logp_warn_nats >= 0 required")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DPOStageConfig:
        return dataclass_from_dict(cls, d, "dpo")


# -- pairs -----------------------------------------------------------------------------------
def load_pairs(
    path: str | Path, min_margin: float | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference pairs in the shared format, validated, plus data facts for the manifest.

    Each record needs ``id``, ``prompt`` (= format_prompt(instruction)), ``chosen`` and
    ``rejected`` (format_completion form: a leading space, no EOS; the trainer appends EOS), and
    may carry ``soft_label`` = P(chosen is better) in [0.5, 1]; without one it is 1.0 (counted)."""
    path = Path(path)
    numbered = read_jsonl_numbered(
        path,
        {"id": RECORD_ID, "prompt": str, "chosen": str, "rejected": str},
        optional={"margin": (*NUMBER, NULL)},  # soft_label: checked below, null = absent
    )
    records = [r for _, r in numbered]
    scan_records_for_chat_markup(
        records, path, ("prompt", "chosen", "rejected"), [n for n, _ in numbered]
    )
    pairs, seen, below, no_label = [], set(), [], 0
    for n, r in numbered:
        rid = str(r["id"])
        where = f"{path}:{n} (id {rid!r})"
        if rid in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(rid)
        p, c, j = r["prompt"], r["chosen"], r["rejected"]
        if not (p.startswith(INSTRUCTION_HEADER) and p.endswith(RESPONSE_HEADER)):
            raise ValueError(
                f"{where}: prompt is not in the shared format 'Instruction: ...\\nResponse:' "
                "(utils/response_format.format_prompt)"
            )
        for side, text in (("chosen", c), ("rejected", j)):
            if not text.strip() or not text.startswith(" "):
                raise ValueError(
                    f"{where}: {side} must be format_completion(response) (' ' + response), "
                    f"got {text[:40]!r}"
                )
        if c == j:
            raise ValueError(f"{where}: chosen and rejected are identical")
        soft = r.get("soft_label")
        no_label += soft is None
        soft = 1.0 if soft is None else soft
        if isinstance(soft, bool) or not isinstance(soft, (int, float)) or not 0.5 <= soft <= 1:
            raise JsonlError(
                path, n, f"(id {rid!r}) soft_label must be a number in [0.5, 1], got {soft!r}",
                "soft_label",
            )  # fmt: skip
        if min_margin is not None:
            m = r.get("margin")
            if m is None:
                raise ValueError(f"{where}: dpo.min_margin is set but the record has no margin")
            if float(m) < min_margin:
                below.append(rid)
                continue
        pairs.append(
            {"id": rid, "prompt": p, "chosen": c, "rejected": j, "soft_label": float(soft)}
        )
    if not pairs:
        raise ValueError(f"{path}: no usable pairs ({len(below)} below min_margin)")
    info = {
        "path": str(path),
        "sha256": file_sha256(path),
        "n_records": len(records),
        "n_below_min_margin": len(below),
        "n_without_soft_label": no_label,
    }
    return pairs, info


def check_no_eos(pairs: Sequence[dict[str, Any]], eos_token: str) -> None:
    """Pairs carry no EOS: the trainer appends the model's own, once."""
    for p in pairs:
        for side in ("chosen", "rejected"):
            if eos_token in p[side]:
                raise ValueError(
                    f"pair {p['id']!r}: {side} contains the EOS {eos_token!r}; pairs carry none"
                )


# -- the chosen log-prob trend (trl #800) -----------------------------------------------------
def chosen_logratio(row: dict[str, Any], beta: float) -> float | None:
    """log pi(chosen) - log pi_ref(chosen) in nats, summed over the chosen tokens of the logged
    batch: TRL logs rewards/chosen = beta * that. The reference is the SFT policy, so this is the
    change of the chosen log-prob since DPO started, free of batch-length effects."""
    r = row.get("rewards/chosen")
    return None if r is None else float(r) / beta


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def chosen_logprob_trend(
    rows: Sequence[dict[str, Any]], warn_nats: float = 1.0, window: int = 3
) -> dict[str, Any]:
    """Whether the chosen log-prob fell over training, from ``dpo_log.jsonl`` training rows
    (those with ``chosen_logratio_nats``).

    falling = the mean of the last ``window`` points is below zero AND below the mean of the
    first ``window`` points by more than ``warn_nats`` AND the least-squares slope is negative.
    """
    pts = [
        (float(r["step"]), float(r["chosen_logratio_nats"]))
        for r in rows
        if r.get("chosen_logratio_nats") is not None
    ]
    out: dict[str, Any] = {"n_points": len(pts), "warn_nats": warn_nats, "window": window}
    if len(pts) < 2:
        return {**out, "falling": False, "message": "fewer than 2 logged training points"}
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    w = min(window, len(pts) // 2) or 1
    first, last = sum(ys[:w]) / w, sum(ys[-w:]) / w
    slope = least_squares_slope(xs, ys)
    falling = last < 0 and (first - last) > warn_nats and slope < 0
    out.update(
        first_mean_nats=first,
        last_mean_nats=last,
        drop_nats=first - last,
        slope_nats_per_step=slope,
        falling=falling,
        message=(
            f"chosen log-prob fell by {first - last:.2f} nats per sequence (now {last:+.2f} vs "
            f"the SFT policy; slope {slope:+.3f}/step): DPO is widening the margin by making "
            "the chosen responses less likely too (trl #800). Lower the learning rate, raise "
            "beta, or add an SFT term (loss_type: [sigmoid, sft])."
            if falling
            else f"chosen log-prob change {last:+.2f} nats vs the SFT policy (no sustained fall)"
        ),
    )
    return out


def dpo_log_transform(beta: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Adds ``chosen_logratio_nats`` (training rows) to each logged record."""

    def transform(row: dict[str, Any]) -> dict[str, Any]:
        v = chosen_logratio(row, beta)
        if v is not None and math.isfinite(v):
            row["chosen_logratio_nats"] = v
        return row

    return transform


class ChosenTrendCallback(TrainerCallback):
    """Re-assess the trend at every log and warn once, as soon as the fall is sustained."""

    def __init__(self, log_cb: JsonlLogCallback, warn_nats: float, window: int) -> None:
        self.log_cb, self.warn_nats, self.window = log_cb, warn_nats, window
        self.warned = False
        self.last: dict[str, Any] = {}

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
        self.last = chosen_logprob_trend(self.log_cb.rows, self.warn_nats, self.window)
        if self.last["falling"] and not self.warned and state.is_world_process_zero:
            self.warned = True
            warnings.warn(
                f"step {state.global_step}: {self.last['message']}",
                ChosenLogprobWarning,
                stacklevel=2,
            )


# -- trainer ---------------------------------------------------------------------------------
def dpo_args_kwargs(cfg: DPOStageConfig, out_dir: str | Path, has_dev: bool, use_cpu: bool) -> dict:
    return {
        "output_dir": str(Path(out_dir) / CHECKPOINT_SUBDIR),
        "beta": cfg.beta,
        "loss_type": [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type),
        "loss_weights": None if cfg.loss_weights is None else [float(x) for x in cfg.loss_weights],
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
        "max_length": cfg.max_length,
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
        "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "ddp_find_unused_parameters": False,
        "report_to": "none",
        "use_cpu": use_cpu,
    }


def make_dpo_args(cfg: DPOStageConfig, out_dir: str | Path, has_dev: bool, use_cpu: bool) -> Any:
    """Built BEFORE the model is loaded, so a DeepSpeed ZeRO-3 launch can shard at load time."""
    from trl import DPOConfig

    return DPOConfig(**dpo_args_kwargs(cfg, out_dir, has_dev, use_cpu))


def attach_trainable_sft_adapter(lm: LoadedModel, sft_adapter_dir: str | Path) -> LoadedModel:
    """Attach the SFT adapter (base-hash checked by the loader) as "default" and make its LoRA
    weights trainable: ``attach_adapter`` loads adapters frozen, for inference."""
    attach_adapter(lm, sft_adapter_dir, adapter_name="default")
    lm.model.peft_config["default"].inference_mode = False
    n = 0
    for name, p in lm.model.named_parameters():
        if "lora_" in name and ".default." in name:
            p.requires_grad_(True)
            n += p.numel()
    if n == 0:
        raise ProjectInputError(f"{sft_adapter_dir}: the adapter has no LoRA weights to train")
    return lm


def check_trainable_is_default_only(model: Any) -> int:
    """After TRL copied the adapter to the frozen "ref": only "default" LoRA weights train."""
    for name, p in model.named_parameters():
        if ".ref." in name and p.requires_grad:
            p.requires_grad_(False)  # the reference must stay the SFT policy
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    wrong = [n for n in trainable if ".default." not in n]
    if not trainable or wrong:
        raise RuntimeError(
            f"DPO would train {len(trainable)} tensors, {len(wrong)} outside the 'default' "
            f"adapter (e.g. {wrong[:3]}); expected only the SFT adapter's LoRA weights"
        )
    if "ref" not in model.peft_config:
        raise RuntimeError(
            "TRL did not create the frozen 'ref' adapter; the reference would be the bare base "
            "model instead of the SFT policy"
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_dpo_trainer(
    lm: LoadedModel,
    train: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    cfg: DPOStageConfig,
    args: Any,
    callbacks: Sequence[Any] = (),
) -> Any:
    from datasets import Dataset
    from trl import DPOTrainer

    from utils.dpo_loss import SoftLabelDPOTrainer

    if cfg.attn_implementation:
        lm.model.set_attn_implementation(cfg.attn_implementation)
    if not dev and str(args.eval_strategy) != "no":
        from transformers.trainer_utils import IntervalStrategy

        args.eval_strategy = IntervalStrategy.NO
    keep = ("id", "prompt", "chosen", "rejected") + (("soft_label",) if cfg.soft_labels else ())
    trainer = (SoftLabelDPOTrainer if cfg.soft_labels else DPOTrainer)(
        model=lm.model,
        ref_model=None,  # reference = TRL's frozen copy of the SFT adapter ("ref")
        args=args,
        train_dataset=Dataset.from_list([{k: e[k] for k in keep} for e in train]),
        eval_dataset=Dataset.from_list([{k: e[k] for k in keep} for e in dev]) if dev else None,
        processing_class=lm.tokenizer,
        callbacks=list(callbacks),
    )
    check_trainable_is_default_only(trainer.model)
    return trainer


def audit_dpo_trainer(
    trainer: Any,
    lm: LoadedModel,
    train: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    max_length: int,
    n_render: int,
    out_dir: str | Path | None,
) -> dict[str, Any]:
    """The mask audit on the tokenised pairs, chosen and rejected, as the collator builds them."""
    eos = lm.policy.eos_token
    is_main = trainer.is_world_process_zero()

    def want(examples: Sequence[dict]) -> list[str]:
        return [f"{e['id']}:{side}" for e in examples for side in ("chosen", "rejected")]

    try:
        audits = {
            "train": audit_rows(
                dpo_rows(trainer.train_dataset, eos, max_length),
                lm.tokenizer,
                lm.policy,
                n_render=n_render,
                expected_ids=want(train),
                title="DPO train pairs",
            )
        }
        if dev:
            audits["dev"] = audit_rows(
                dpo_rows(trainer.eval_dataset, eos, max_length),
                lm.tokenizer,
                lm.policy,
                n_render=min(2, n_render),
                expected_ids=want(dev),
                title="DPO dev pairs",
            )
    except MaskAuditError as e:
        if out_dir is not None and is_main:
            write_failed_audit(out_dir, e)
        raise
    if out_dir is not None and is_main:
        return write_mask_audit(out_dir, audits, lm.policy)
    return {"passed": True, "splits": {k: a.summary() for k, a in audits.items()}}


def run_dpo(
    lm: LoadedModel,
    train: list[dict[str, Any]],
    dev: list[dict[str, Any]],
    cfg: DPOStageConfig,
    args: Any,
    out_dir: str | Path,
    data_info: dict[str, Any],
    sft_adapter_dir: str | Path,
    fresh: bool = False,
) -> StageResult:
    """Length-filter, attach the SFT adapter, audit, train (resuming), save the adapter."""
    out_dir = Path(out_dir)
    check_no_eos([*train, *dev], lm.policy.eos_token)
    keys = ("chosen", "rejected")
    train, dropped_train = filter_by_length(lm, train, cfg.max_length, completion_keys=keys)
    dev, dropped_dev = filter_by_length(lm, dev, cfg.max_length, completion_keys=keys)
    if not train:
        raise ProjectInputError(f"no preference pair fits max_length={cfg.max_length} tokens")
    sft_adapter_dir = Path(sft_adapter_dir)
    sft_hash = adapter_hash(sft_adapter_dir)
    attach_trainable_sft_adapter(lm, sft_adapter_dir)

    args.max_steps = planned_max_steps(
        len(train),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
        cfg.num_train_epochs,
        cfg.max_steps,
    )
    timer = StepTimer()
    log_path = out_dir / "dpo_log.jsonl"
    log_cb = JsonlLogCallback(log_path, transform=dpo_log_transform(cfg.beta))
    trend_cb = ChosenTrendCallback(log_cb, cfg.chosen_logp_warn_nats, cfg.chosen_logp_window)
    trainer = build_dpo_trainer(lm, train, dev, cfg, args, callbacks=[timer, log_cb, trend_cb])
    is_main = trainer.is_world_process_zero()
    audit = audit_dpo_trainer(
        trainer, lm, train, dev, cfg.max_length, cfg.mask_audit_examples, out_dir
    )

    run_key = {
        "stage": "dpo",
        "data_sha256": data_info.get("sha256"),
        "base_weights_sha256": lm.provenance["weights_sha256"],
        "sft_adapter_sha256": sft_hash,
        "beta": cfg.beta,
        "loss_type": cfg.loss_type,
        "loss_weights": cfg.loss_weights,
        "soft_labels": cfg.soft_labels,
        "seed": cfg.seed,
        "train_ids_sha256": config_hash(sorted(e["id"] for e in train)),
    }
    with trainer.accelerator.main_process_first():
        ckpt = prepare_resume(Path(args.output_dir), run_key, fresh, is_main)
    resumed_from_step = checkpoint_step(ckpt) if ckpt else 0
    if is_main:
        if ckpt:
            truncate_log(log_path, resumed_from_step)
            log_cb.rows = read_jsonl(log_path) if log_path.exists() else []
        elif log_path.exists():
            log_path.unlink()
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_wall = time.perf_counter() - t0
    final_eval = final_evaluation(trainer) if dev else {}

    train_rows = [r for r in log_cb.rows if "chosen_logratio_nats" in r]
    trend = chosen_logprob_trend(train_rows, cfg.chosen_logp_warn_nats, cfg.chosen_logp_window)
    if trend["falling"] and is_main and not trend_cb.warned:
        warnings.warn(trend["message"], ChosenLogprobWarning, stacklevel=2)
    trainable, total = trainable_parameter_count(trainer.model)
    adapter = save_adapter(
        trainer,
        out_dir / ADAPTER_SUBDIR,
        lm,
        {
            "stage": "dpo",
            "parent_adapter": str(sft_adapter_dir),
            "parent_adapter_sha256": sft_hash,
            "beta": cfg.beta,
            "loss_type": cfg.loss_type,
            "loss_weights": cfg.loss_weights,
            "soft_labels": cfg.soft_labels,
            "global_step": trainer.state.global_step,
        },
    )
    ranks = rank_report(trainer, len(timer.step_seconds))
    last = train_rows[-1] if train_rows else {}
    summary = {
        "data": {
            **data_info,
            "n_train": len(train),
            "n_dev": len(dev),
            "dropped_too_long": dropped_train + dropped_dev,
        },
        "sft_adapter": {"path": str(sft_adapter_dir), "sha256": sft_hash},
        "reference": "frozen copy of the SFT adapter (TRL 'ref' adapter)",
        "training": {
            "planned_steps": args.max_steps,
            "global_step": trainer.state.global_step,
            "resumed_from_checkpoint": str(ckpt) if ckpt else None,
            "resumed_from_step": resumed_from_step,
            "train_loss_mean": out.training_loss,
            "rewards_chosen_last": last.get("rewards/chosen"),
            "rewards_rejected_last": last.get("rewards/rejected"),
            "rewards_margin_last": last.get("rewards/margins"),
            "rewards_accuracy_last": last.get("rewards/accuracies"),
            "eval_loss": final_eval.get("eval_loss"),
            "eval_rewards_margin": final_eval.get("eval_rewards/margins"),
            "eval_rewards_accuracy": final_eval.get("eval_rewards/accuracies"),
            "train_wall_seconds": round(train_wall, 3),
            **summarise_steps(timer.step_seconds, timer.step_cpu_seconds),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "world_size": trainer.args.world_size,
            "ranks": ranks,
        },
        "chosen_logprob_trend": trend,
        "mask_audit": audit,
        "adapter": adapter,
        "log": str(log_path),
    }
    return StageResult(summary=summary, is_main=is_main)
