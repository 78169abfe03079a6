"""Near-duplicates between the eval prompts and the run's stage-1 training instructions: leaked
prompts leave the headline, overlapping base tasks are reported."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.dedup import leakage_check
from utils.eval_prompts import TASKS
from utils.jsonl_io import read_jsonl


def load_train_instructions(run_dir: Path) -> list[str] | None:
    """Stage-1 training instructions of the run (None when the run has no stage-1 data)."""
    path = Path(run_dir) / "stage1" / "train.jsonl"
    if not path.exists():
        return None
    return [r["instruction"] for r in read_jsonl(path, required={"instruction": str})]


def task_of(prompt: str) -> str:
    """The base task a prompt was built from (its first sentence from TASKS)."""
    return next((t for t in TASKS if prompt.startswith(t)), prompt)


def check_leakage(
    records: Sequence[Mapping[str, Any]],
    train_instructions: Sequence[str] | None,
    threshold: float,
    max_examples: int = 10,
) -> dict[str, Any]:
    """Near-duplicates between eval prompts and training instructions.

    Leaked = the whole eval prompt is a near-duplicate of a training instruction (excluded from
    the headline). Topic overlap = only the base task ("Describe the ocean.") is; reported, not
    excluded, since the constraint, which decides success, was not trained on."""
    if train_instructions is None:
        return {"status": "not_checked", "reason": "no stage1/train.jsonl in the run", "ids": []}
    if not train_instructions:
        return {"status": "checked", "n_train": 0, "n_test": len(records), "n_leaked": 0,
                "rate": 0.0, "threshold": threshold, "ids": [], "examples": [],
                "topic_overlap": {"n_tasks": 0, "n_prompts": 0, "examples": []}}  # fmt: skip
    prompts = [r["prompt"] for r in records]
    full = leakage_check(train_instructions, prompts, threshold, max_examples=max_examples)
    tasks = sorted({task_of(p) for p in prompts})
    topic = leakage_check(train_instructions, tasks, threshold, max_examples=max_examples)
    overlapping = {tasks[i] for i in topic.leaked_test_indices}
    return {
        "status": "checked",
        "n_train": len(train_instructions),
        "n_test": full.n_test,
        "n_leaked": full.n_leaked,
        "rate": full.rate,
        "threshold": full.threshold,
        "ids": [records[i]["id"] for i in full.leaked_test_indices],
        "examples": [
            {"eval_prompt": t, "train_instruction": s, "jaccard": j} for t, s, j in full.examples
        ],
        "topic_overlap": {
            "n_tasks": len(overlapping),
            "n_prompts": sum(task_of(p) in overlapping for p in prompts),
            "examples": [
                {"task": t, "train_instruction": s, "jaccard": j} for t, s, j in topic.examples
            ],
        },
    }
