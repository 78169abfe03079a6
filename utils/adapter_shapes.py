"""An adapter's tensor shapes checked against a base model WITHOUT loading either.

The base-weights hash in ``adapter_manifest.json`` says which weights an adapter was trained on,
but a manifest can be copied. The shapes cannot lie: a LoRA pair on a linear layer of
``in_features -> out_features`` is ``lora_A: [r, in]``, ``lora_B: [out, r]`` (transposed for
``fan_in_fan_out`` layers). ``adapter_shape_problem`` reads ``adapter_config.json`` and the
adapter's safetensors header, and compares every LoRA tensor with

- the base model's ``config.json`` (``num_hidden_layers``: no layer index past it), and
- the base's own weight shapes, from its safetensors headers (``BaseShapes.from_dir``) or, for
  a model already in memory, its state dict (``BaseShapes.from_model``); without weight shapes
  (e.g. ``.bin`` weights) one side of every block linear must be ``hidden_size``.

It returns the first mismatch as a message naming the adapter file and the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.checkpoints import safetensors_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class BaseShapes:
    """What the shape check needs to know about the base model."""

    where: str  # the directory or model name, for messages
    hidden_size: int | None
    num_layers: int | None
    weights: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> shape

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str, weights=None) -> BaseShapes:
        cfg = dict(config)
        text = cfg.get("text_config")  # multimodal configs nest the language model's numbers
        if "hidden_size" not in cfg and isinstance(text, Mapping):
            cfg = dict(text)
        hidden, layers = (
            cfg.get("hidden_size", cfg.get("n_embd")),
            cfg.get("num_hidden_layers", cfg.get("n_layer")),
        )
        return cls(
            where,
            int(hidden) if isinstance(hidden, int) else None,
            int(layers) if isinstance(layers, int) else None,
            dict(weights or {}),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> BaseShapes:
        """``config.json`` and the safetensors headers (sharded or not) of a local model."""
        d = Path(model_dir)
        cfg_path = d / "config.json"
        try:  # no config.json (e.g. GGUF only): the weight shapes alone are checked
            config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            paths = [d / f for f in files]
        else:
            paths = sorted(d.glob("*.safetensors"))
        weights: dict[str, tuple[int, ...]] = {}
        for p in paths:
            weights.update(safetensors_shapes(p))
        return cls.from_config(config, str(d), weights)

    @classmethod
    def from_model(cls, model: Any, where: str) -> BaseShapes:
        """A model already in memory (a hub id: no local files to read)."""
        weights = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return cls.from_config(model.config.to_dict(), where, weights)

    def module_shape(self, module: str) -> tuple[int, ...] | None:
        """The weight shape of ``module`` (a dotted path as PEFT names it), or None."""
        exact = self.weights.get(f"{module}.weight")
        if exact is not None:
            return exact
        parts = module.split(".")
        for start in range(1, len(parts)):  # e.g. a "language_model." prefix on one side only
            tail = ".".join(parts[start:]) + ".weight"
            hits = [s for k, s in self.weights.items() if k == tail or k.endswith("." + tail)]
            if len(hits) == 1:
                return hits[0]
        return None


def _lora_tensors(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, str]]:
    """(tensor name, module path, lora_A|lora_B) of every LoRA matrix, in name order."""
    out = []
    for name in sorted(shapes):
        m = LORA_KEY.match(name)
        if m:
            module = m["module"]
            module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
            out.append((name, module, m["kind"]))
    return out


def adapter_shape_problem(adapter_dir: str | Path, base: BaseShapes) -> str | None:
    """The first LoRA tensor of ``adapter_dir`` whose shape does not fit ``base``, as a message
    naming the adapter file and the tensor; None when every tensor fits."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        return None  # .bin adapters: no header to read; the loader checks them when attaching
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f"{cfg_path}: cannot read the adapter config ({e})"
    try:
        shapes = safetensors_shapes(weights_path)
    except ValueError as e:
        return f"{weights_path}: {e}"
    transposed = bool(config.get("fan_in_fan_out"))
    lora = _lora_tensors(shapes)
    if not lora:
        return f"{weights_path}: no LoRA tensor (lora_A / lora_B) in the file"
    ranks: dict[str, int] = {}
    base_desc = (
        f"base model {base.where} (hidden size {base.hidden_size}, {base.num_layers} layers)"
    )
    for name, module, kind in lora:
        shape = shapes[name]

        def bad(why: str, shape: tuple[int, ...] = shape, name: str = name) -> str:
            return (
                f"adapter {weights_path}: tensor {name} has shape {list(shape)}, {why}; the "
                f"adapter does not fit the {base_desc}. It was trained on another model "
                "(a copied adapter_manifest.json?)"
            )

        if len(shape) != 2:
            return bad("expected a 2-d LoRA matrix")
        layer = LAYER_INDEX.search(f".{module}.")
        if layer and base.num_layers is not None and int(layer[1]) >= base.num_layers:
            return bad(f"it sits in layer {layer[1]} but the base has {base.num_layers} layers")
        r = shape[0] if kind == "lora_A" else shape[1]
        if ranks.setdefault(module, r) != r:
            return bad(f"its rank {r} differs from its pair's rank {ranks[module]}")
        size = shape[1] if kind == "lora_A" else shape[0]  # in (A) or out (B) features
        side = "in" if kind == "lora_A" else "out"
        want = base.module_shape(module)
        if want is not None:
            out_f, in_f = (want[1], want[0]) if transposed else (want[0], want[-1])
            expected = in_f if kind == "lora_A" else out_f
            if size != expected:
                return bad(f"but the base's {module} has {expected} {side}-features")
        elif base.weights:
            return bad(f"but the base model has no module {module}")
        elif base.hidden_size is not None and _pair_misses_hidden(
            shapes, name, kind, base.hidden_size
        ):
            return bad(f"neither side of {module} has the base's hidden size {base.hidden_size}")
    return None


def _pair_misses_hidden(
    shapes: Mapping[str, tuple[int, ...]], name: str, kind: str, hidden: int
) -> bool:
    """Without base weight shapes: a block linear maps from or to the hidden size, so a LoRA
    pair whose in (lora_A) and out (lora_B) features are both other numbers does not fit."""
    if kind != "lora_A":
        return False
    partner = shapes.get(name.replace(".lora_A", ".lora_B"))
    if partner is None:
        return False
    return shapes[name][1] != hidden and partner[0] != hidden
