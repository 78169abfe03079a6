"""Which arms an evaluation runs and the exact prompt each one sends.

An arm is ``base`` (zero-shot in the shared format), ``base_icl`` (the base model with
in-context demonstrations), a run's adapter (``sft``, ``dpo``, ``cai``, ``sft_r<k>``) or an
adapter given by path. Files only: no model is loaded here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.clean_model_loader import ADAPTER_MANIFEST
from utils.eval_config import DEFAULT_ARMS, EvalInputError
from utils.icl_selection import icl_prompt
from utils.provenance import config_hash
from utils.response_format import format_prompt

# arm -> path inside the run
RUN_ADAPTER_ARMS = {"sft": "sft/adapter", "dpo": "dpo/adapter", "cai": "cai/adapter"}
ROUND_ARM = re.compile(r"^sft_r[1-9][0-9]*$")  # earlier rounds of verified SFT
ZERO_SHOT, FEW_SHOT = "zero_shot", "few_shot"


@dataclass(frozen=True)
class ArmSpec:
    name: str
    prompt_format: str  # ZERO_SHOT | FEW_SHOT
    adapter_dir: Path | None = None


def resolve_arms(
    run_dir: Path, arm_names: Sequence[str], adapters: Mapping[str, Path] | None = None
) -> tuple[list[ArmSpec], list[dict[str, Any]]]:
    """(arms to evaluate, skipped arms with a reason). --adapter arms not listed are appended.

    An unknown arm name is bad input; an adapter arm whose adapter is not on disk is skipped,
    so a run without a DPO stage still evaluates its other arms and says so.
    """
    adapters = dict(adapters or {})
    names = list(arm_names) + [n for n in adapters if n not in arm_names]
    specs: list[ArmSpec] = []
    skipped: list[dict[str, Any]] = []
    for name in names:
        if name in adapters:
            adapter_dir: Path | None = Path(adapters[name])
        elif name == "base":
            specs.append(ArmSpec(name, ZERO_SHOT))
            continue
        elif name == "base_icl":
            specs.append(ArmSpec(name, FEW_SHOT))
            continue
        elif name in RUN_ADAPTER_ARMS:
            adapter_dir = Path(run_dir) / RUN_ADAPTER_ARMS[name]
        elif ROUND_ARM.match(name):  # an earlier round's SFT policy: <run>/sft_r<k>/adapter
            adapter_dir = Path(run_dir) / name / "adapter"
        else:
            raise EvalInputError(
                f"unknown arm {name!r}: known arms are {list(DEFAULT_ARMS)}; "
                f"give other adapters as --adapter {name}=PATH"
            )
        problem = adapter_problem(adapter_dir)
        if problem is None:
            specs.append(ArmSpec(name, ZERO_SHOT, adapter_dir))
        else:
            skipped.append({"name": name, "adapter_dir": str(adapter_dir), "reason": problem})
    return specs, skipped


def adapter_problem(adapter_dir: Path) -> str | None:
    """Why ``adapter_dir`` cannot be evaluated (None when it looks complete)."""
    if not adapter_dir.is_dir():
        # A stage that decided not to train (e.g. DPO with no confident pair) says why.
        stage_manifest = adapter_dir.parent / "manifest.json"
        if stage_manifest.exists():
            m = json.loads(stage_manifest.read_text())
            if m.get("status") == "skipped":
                return f"stage skipped: {m.get('reason', 'no reason recorded')}"
        return f"adapter not found: {adapter_dir} does not exist (stage not run?)"
    if not (adapter_dir / "adapter_config.json").exists():
        return f"adapter incomplete: {adapter_dir}/adapter_config.json is missing"
    if not any(p.suffix in (".safetensors", ".bin") for p in adapter_dir.iterdir()):
        return f"adapter incomplete: {adapter_dir} has no weight file (*.safetensors, *.bin)"
    return None


def adapter_unchanged(adapter_dir: Path, adapter_sha256: str) -> bool | None:
    """The training stage's flag that ``adapter_dir`` is identical to where its training started
    (``adapter.adapter_unchanged`` in the stage's manifest.json beside it), trusted only when
    that manifest records this adapter's hash; None when nothing says."""
    try:
        manifest = json.loads((adapter_dir.parent / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    adapter = manifest.get("adapter") if isinstance(manifest, dict) else None
    if not isinstance(adapter, dict) or adapter.get("sha256") != adapter_sha256:
        return None
    return adapter.get("adapter_unchanged")


def check_adapter_base(adapter_dir: Path, base_weights_sha256: str) -> None:
    """Fail before any generation when an adapter belongs to another base model."""
    path = adapter_dir / ADAPTER_MANIFEST
    if not path.exists():
        raise EvalInputError(
            f"{path}: missing; cannot verify which base model the adapter was trained on"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}: invalid JSON ({e})") from e
    want = manifest.get("base_weights_sha256")
    if want != base_weights_sha256:
        raise EvalInputError(
            f"adapter {adapter_dir} was trained on base {manifest.get('base_model_id')!r} "
            f"(weights {str(want)[:12]}...), but the evaluated base has weights "
            f"{base_weights_sha256[:12]}...; set model.name to the run's base model"
        )


def arm_prompt(
    spec: ArmSpec, instruction: str, demos: Sequence[tuple[str, str]], preamble: str = ""
) -> str:
    """The exact prompt an arm's model sees for one instruction."""
    if spec.prompt_format == FEW_SHOT:
        return icl_prompt(preamble, demos, instruction)
    return format_prompt(instruction)


def prompt_format_id(
    spec: ArmSpec, demos: Sequence[tuple[str, str]], preamble: str = ""
) -> dict[str, Any]:
    if spec.prompt_format == FEW_SHOT:
        out = {"format": FEW_SHOT, "k": len(demos), "demos_sha256": config_hash(list(demos))}
        if preamble:  # absent when empty, so caches made before preambles existed stay valid
            out["preamble_sha256"] = config_hash(preamble)
        return out
    return {"format": ZERO_SHOT}
