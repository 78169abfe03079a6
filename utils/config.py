"""YAML recipes with command-line overrides: plain values, every knob visible in the file.

    cfg = load_config("configs/cpu_default.yaml", ["sft.max_steps=20", "model.name=/models/qwen"])

Overrides are ``dotted.key=value`` with the value parsed by ``yaml.safe_load`` (so ``20`` is an
int, ``[1, 2]`` a list, ``null`` None). An override of a key that the file does not have is an
error (a typo must not silently run the default).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from utils.errors import ProjectInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "cpu_default.yaml"


class ConfigError(ProjectInputError, ValueError):
    pass


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(cfg).__name__}")
    base = cfg.pop("inherit", None)
    if base:  # a recipe may start from another one and change a few keys
        parent = load_config((path.parent / base).resolve())
        cfg = deep_merge(parent, cfg, where=str(path))
    cfg = apply_overrides(cfg, overrides)
    cfg["_config_path"] = str(path)
    return cfg


def deep_merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if k not in out:
            raise ConfigError(f"{where}: key {k!r} is not in the inherited config")
        out[k] = (
            deep_merge(out[k], v, f"{where}.{k}")
            if isinstance(v, dict) and isinstance(out[k], dict)
            else v
        )
    return out


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section of the config")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(
                f"override {item!r}: unknown key {dotted!r} (known here: {sorted(node)})"
            )
        node[keys[-1]] = yaml.safe_load(raw)
    return cfg


def section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in cfg or not isinstance(cfg[name], dict):
        raise ConfigError(f"{cfg.get('_config_path', 'config')}: missing section {name!r}")
    return cfg[name]


def add_config_args(parser: Any) -> None:
    """The two options every stage script shares."""
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set sft.max_steps=20 (repeatable)",
    )  # fmt: skip
