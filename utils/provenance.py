"""Provenance for every artifact: code version, package versions, config, seed, timings."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from utils.errors import STATUS_OK, STATUSES
from utils.jsonl_io import write_json_atomic

TRACKED_PACKAGES = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
    "safetensors", "gguf", "numpy", "scipy",
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit() -> dict[str, Any]:
    """HEAD commit and whether the tree had uncommitted changes (a run from a dirty tree says so)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def config_hash(obj: Any) -> str:
    """SHA-256 of canonical JSON: the key a stage uses to decide whether its inputs changed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(
    path: str | Path,
    *,
    stage: str,
    config: dict[str, Any] | None,
    status: str = STATUS_OK,
    reason: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Write ``manifest.json`` for a stage's output: enough to reproduce the run from it alone.

    ``status`` is what the pipeline reads (utils/errors.py): ``ok``, ``skipped`` (nothing kept,
    ``reason`` says why) or ``failed`` (``reason`` says what)."""
    if status not in STATUSES:
        raise ValueError(f"manifest status must be one of {STATUSES}, got {status!r}")
    manifest = {
        "stage": stage,
        "status": status,
        "reason": reason,
        "created_unix": round(time.time(), 3),
        "git": git_commit(),
        "package_versions": package_versions(),
        "platform": platform.platform(),
        "config": config,
        "config_sha256": config_hash(config),
        **fields,
    }
    write_json_atomic(path, manifest)
    return manifest
