"""Trainer checkpoints and saved adapters checked before they are trusted.

- ``checkpoint_problem`` / ``last_complete_checkpoint``: a ``checkpoint-N/`` half written by a
  kill or a full disk during the save is moved aside (``incomplete-checkpoint-N-<UTC time>``)
  with a message naming it, and the newest COMPLETE checkpoint is resumed instead (or none).
  Complete means: ``trainer_state.json`` parses and its ``global_step`` is N; every
  ``*.safetensors`` in it opens (header read, at least one tensor, data as long as the header
  says) and the adapter weights exist; ``optimizer.pt`` and ``scheduler.pt`` exist, are
  non-empty, and ``optimizer.pt`` opens with ``torch.load(weights_only=True, mmap=True)`` (its
  tensors are mapped, not read). A DeepSpeed (``global_step*/``) or FSDP (``*_fsdp*``,
  ``optimizer_0/``) checkpoint keeps its own layout: only the trainer state is checked there.
  The aside name does not start with ``checkpoint-``, so neither transformers'
  ``get_last_checkpoint`` nor its ``save_total_limit`` rotation (a ``checkpoint-*`` glob) sees it.
- ``adapter_unchanged`` / ``flag_unchanged_adapter``: an adapter whose weights equal its
  starting point after training (a learning rate of 0, a run whose only step had lr 0) is
  flagged (``AdapterUnchangedWarning``), so a no-op stage is not reported as trained. The
  starting point is the parent adapter (DPO continues the SFT adapter) or, without one, PEFT's
  LoRA initialisation, where every ``lora_B`` is zero.
"""

from __future__ import annotations

import json
import struct
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint-"
INCOMPLETE_PREFIX = "incomplete-"
TRAINER_STATE = "trainer_state.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


class AdapterUnchangedWarning(UserWarning):
    """Training left the adapter's weights exactly where they started."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- safetensors header ----------------------------------------------------------------------
def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets),
    without ``__metadata__``. Raises ValueError naming the file when the file is truncated or
    not safetensors: the header length, the header JSON, and the data length it promises."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or 8 + n > size:
            raise ValueError(f"{path}: header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
            tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from e
    if 8 + n + end > size:
        raise ValueError(
            f"{path}: truncated: the header promises {8 + n + end} bytes, the file has {size}"
        )
    return header


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the header only."""
    return {k: tuple(int(x) for x in v["shape"]) for k, v in safetensors_header(path).items()}


# -- checkpoints -----------------------------------------------------------------------------
def checkpoint_number(path: Path) -> int | None:
    """N of a ``checkpoint-N`` directory name, else None."""
    tail = path.name[len(CHECKPOINT_PREFIX) :]
    if path.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit():
        return int(tail)
    return None


def _nonempty(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size == 0:
        return f"{path.name} is empty (0 bytes)"
    return None


def _sharded_layout(ckpt: Path) -> bool:
    """DeepSpeed or FSDP checkpoints keep weights and optimizer in their own files."""
    return any(
        p.is_dir() and (p.name.startswith("global_step") or p.name.startswith("optimizer_"))
        for p in ckpt.iterdir()
    ) or any("_fsdp" in p.name for p in ckpt.iterdir())


def _optimizer_problem(path: Path) -> str | None:
    problem = _nonempty(path)
    if problem:
        return problem
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to open means an unusable file
        return f"{path.name} does not load ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(state, dict):
        return f"{path.name} is not an optimizer state dict ({type(state).__name__})"
    return None


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt`` (a ``checkpoint-N`` directory) cannot be resumed from; None if complete."""
    ckpt = Path(ckpt)
    n = checkpoint_number(ckpt)
    if n is None or not ckpt.is_dir():
        return f"{ckpt} is not a checkpoint-N directory"
    state_file = ckpt / TRAINER_STATE
    problem = _nonempty(state_file)
    if problem:
        return problem
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{TRAINER_STATE} does not parse ({e})"
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step != n:
        return f"{TRAINER_STATE} has global_step {step!r}, expected {n}"
    if _sharded_layout(ckpt):
        return None
    weights = [ckpt / w for w in ADAPTER_WEIGHT_FILES + MODEL_WEIGHT_FILES if (ckpt / w).exists()]
    if not weights:
        return f"no weights file ({', '.join(ADAPTER_WEIGHT_FILES + MODEL_WEIGHT_FILES)})"
    for w in weights:
        problem = _nonempty(w)
        if problem:
            return problem
    for st in sorted(ckpt.rglob("*.safetensors")):
        try:
            if not safetensors_header(st):
                return f"{st.relative_to(ckpt)} holds no tensor"
        except ValueError as e:
            return f"{st.relative_to(ckpt)} does not open: {e}"
    return _optimizer_problem(ckpt / OPTIMIZER_FILE) or _nonempty(ckpt / SCHEDULER_FILE)


def move_aside(ckpt: Path, problem: str, log: Callable[[str], None] = _stderr) -> Path:
    """Rename an incomplete checkpoint to ``incomplete-checkpoint-N-<UTC time>`` next to it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = ckpt.with_name(f"{INCOMPLETE_PREFIX}{ckpt.name}-{stamp}")
    k = 1
    while target.exists():
        target = ckpt.with_name(f"{INCOMPLETE_PREFIX}{ckpt.name}-{stamp}-{k}")
        k += 1
    ckpt.rename(target)
    log(
        f"incomplete checkpoint {ckpt} ({problem}); moved aside to {target.name}, resuming "
        "from the last complete checkpoint instead"
    )
    return target


def last_complete_checkpoint(
    checkpoint_dir: str | Path,
    move_incomplete: bool = True,
    log: Callable[[str], None] = _stderr,
) -> Path | None:
    """The newest ``checkpoint-N`` in ``checkpoint_dir`` that passes ``checkpoint_problem``,
    or None. Newer incomplete ones are moved aside (``move_incomplete``, the main process) or
    only skipped (other processes, which run after the main one has moved them)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = sorted(
        (p for p in d.iterdir() if p.is_dir() and checkpoint_number(p) is not None),
        key=lambda p: checkpoint_number(p) or 0,
        reverse=True,
    )
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if move_incomplete:
            move_aside(ckpt, problem, log)
    return None


# -- adapters that training did not change ---------------------------------------------------
def _adapter_tensors(adapter_dir: Path) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHT_FILES[0]
    return load_file(str(path)) if path.is_file() else None


def adapter_unchanged(adapter_dir: str | Path, start_dir: str | Path | None = None) -> bool | None:
    """True when the saved adapter equals its starting point: the adapter in ``start_dir``
    (same tensor names, every tensor equal), or, without one, PEFT's LoRA initialisation
    (every ``lora_B`` all zeros). None when it cannot be judged: no
    ``adapter_model.safetensors`` on either side, or (no ``start_dir``) no ``lora_B`` tensor."""
    import torch

    now = _adapter_tensors(Path(adapter_dir))
    if now is None:
        return None
    if start_dir is not None:
        start = _adapter_tensors(Path(start_dir))
        if start is None:
            return None
        return set(now) == set(start) and all(
            now[k].shape == start[k].shape and torch.equal(now[k], start[k]) for k in now
        )
    lora_b = [v for k, v in now.items() if "lora_B" in k]
    return all(not torch.any(v) for v in lora_b) if lora_b else None


def flag_unchanged_adapter(
    adapter_dir: str | Path, start_dir: str | Path | None = None, stage: str = "training"
) -> bool | None:
    """``adapter_unchanged`` plus an ``AdapterUnchangedWarning`` naming the adapter when true."""
    unchanged = adapter_unchanged(adapter_dir, start_dir)
    if unchanged:
        start = f"the adapter it started from ({start_dir})" if start_dir else "its LoRA init"
        warnings.warn(
            f"{stage}: the adapter in {adapter_dir} is identical to {start}: training changed "
            "nothing (learning rate 0, or every step at lr 0?). Manifest: adapter_unchanged=true",
            AdapterUnchangedWarning,
            stacklevel=2,
        )
    return unchanged
