"""Sequential, memory-safe evaluation of every arm on the held-out verifiable-instruction set.

An "arm" is one way of asking the model: ``base`` (zero-shot in the shared format),
``base_icl`` (the same base model with K hand-written in-context demonstrations, URIAL-style:
the zero-training baseline every trained arm must beat), ``sft`` and ``dpo`` (LoRA adapters of
a run), and any adapter given by path. Every arm answers the SAME prompts with the SAME greedy
decoding and stop policy, so arms are compared paired, prompt by prompt (utils/stats.py).

Memory: one base model is resident at a time and adapters are swapped onto that one load
(attach_adapter, then peft set_adapter / delete_adapter / disable_adapter), with gc between
arms; the peak RSS of every arm is measured by a sampling thread plus ``ru_maxrss``.

Caching: each arm's generations are appended (flushed per batch) to
``<run>/eval/cache/<key>.jsonl``, key = hash(weights, adapter, prompt set, decoding, prompt
format, load options). A rerun of a finished arm loads its file without loading a model; a
killed run resumes at the first missing prompt (``jsonl_io.resume`` drops a torn last line).
Scores are recomputed from the cached text on every run, so a fixed checker never meets stale
scores.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import re
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from utils import stats
from utils.adapter_shapes import BaseShapes, adapter_shape_problem
from utils.clean_model_loader import (
    ADAPTER_MANIFEST,
    CleanModelLoader,
    LoadedModel,
    adapter_hash,
    attach_adapter,
    resolve_model,
    weights_hash,
)
from utils.dedup import leakage_check
from utils.errors import ProjectInputError
from utils.eval_prompts import (
    TASKS,
    build_eval_set,
    icl_examples,
    prompt_set_hash,
    score_response,
    type_counts,
)
from utils.generation import DecodingConfig, generate
from utils.icl_selection import candidate_prompt_parts, icl_prompt, select_icl
from utils.jsonl_io import JsonlAppender, read_jsonl, resume, write_json_atomic
from utils.provenance import config_hash
from utils.response_format import (
    RESPONSE_STOP_STRINGS,
    clean_response,
    format_prompt,
    marker_leaked,
)

BASE_ARMS = ("base", "base_icl")  # arms without an adapter
# arm -> path inside the run
RUN_ADAPTER_ARMS = {"sft": "sft/adapter", "dpo": "dpo/adapter", "cai": "cai/adapter"}
DEFAULT_ARMS = ("base", "base_icl", "sft", "dpo", "cai")
ROUND_ARM = re.compile(r"^sft_r[1-9][0-9]*$")  # earlier rounds of verified SFT
ZERO_SHOT, FEW_SHOT = "zero_shot", "few_shot"
CACHE_SCHEMA = 1  # bump when a cache record's meaning changes, so old caches are not reused
_ARM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class EvalInputError(ProjectInputError, ValueError):
    """Bad evaluation input (unknown arm, adapter of another base, corrupt cache...)."""


# ---------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of the evaluation; ``from_dict`` reads the YAML ``eval:`` block."""

    n_prompts: int = 320
    seed: int = 1234  # eval-set seed (build_eval_set)
    arms: tuple[str, ...] = DEFAULT_ARMS
    icl_k: int = 3  # in-context demonstrations for base_icl when no candidate is selected
    # base_icl settings tried on a dev split (utils/icl_selection.py); () = icl_k demos as is
    icl_candidates: tuple[str, ...] = ()
    icl_dev_prompts: int = 48
    # harmful handling, over-refusal, principle preference per arm (utils/eval_constitution.py)
    constitution: bool = False
    max_new_tokens: int = 64
    batch_size: int = 32
    bootstrap_resamples: int = 10000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    alpha: float = 0.05
    power: float = 0.8  # for the minimum detectable effect
    leakage_threshold: float = 0.7  # exact Jaccard of char 5-grams (utils.dedup)
    exclude_leaked: bool = True
    run_sentinels: bool = True
    # Options of run_sentinel_suite; the script starts from the top-level `sentinels:` block.
    sentinel: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 3  # sample outputs per arm in the report
    rss_interval_s: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_prompts", "icl_k", "max_new_tokens", "batch_size", "bootstrap_resamples"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "bootstrap_seed", "n_samples"):
            _check_int(name, getattr(self, name), minimum=0)
        n_demos = len(icl_examples())
        if self.icl_k > n_demos:
            raise ValueError(f"icl_k must be <= {n_demos} (demonstrations available)")
        for name in ("confidence", "alpha", "leakage_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 < self.confidence < 1 or not 0 < self.alpha < 1:
            raise ValueError("confidence and alpha must be in (0, 1)")
        if not 0 < self.leakage_threshold <= 1:
            raise ValueError(f"leakage_threshold must be in (0, 1], got {self.leakage_threshold}")
        if not 0.5 < self.power < 1:
            raise ValueError(f"power must be in (0.5, 1), got {self.power!r}")
        if not self.rss_interval_s > 0:
            raise ValueError(f"rss_interval_s must be > 0, got {self.rss_interval_s!r}")
        if isinstance(self.arms, str) or not self.arms:
            raise ValueError(f"arms must be a non-empty list of arm names, got {self.arms!r}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms lists an arm twice: {list(self.arms)}")
        if not isinstance(self.sentinel, dict):
            raise ValueError(f"sentinel must be a mapping, got {self.sentinel!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalConfig:
        """Build from a mapping; unknown keys raise (a typo must not silently run a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown eval config key(s) {unknown}; valid keys: {sorted(known)}")
        values = dict(values)
        if "arms" in values:
            arms = values["arms"]
            values["arms"] = tuple(parse_arm_list(arms) if isinstance(arms, str) else arms)
        if "icl_candidates" in values:
            values["icl_candidates"] = tuple(values["icl_candidates"] or ())
        if values.get("sentinel") is None:
            values.pop("sentinel", None)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "arms": list(self.arms),
            "icl_candidates": list(self.icl_candidates),
        }

    def decoding(self) -> DecodingConfig:
        """The ONE decoding policy of every arm: greedy, stop on the next block or EOS."""
        return DecodingConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            batch_size=self.batch_size,
            stop_strings=RESPONSE_STOP_STRINGS,
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how: the YAML ``model:`` block (same keys as
    ``CleanModelLoader.from_config``)."""

    name: str = "gemma-3-270m"
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    trust_remote_code: bool = False
    allow_instruct_control: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def load_options(self) -> dict[str, Any]:
        """The load options that can change greedy outputs (part of the cache key)."""
        return {"device": self.device, "dtype": self.dtype, "quantization": self.quantization}


def parse_arm_list(text: str) -> list[str]:
    """``"base, sft"`` -> ["base", "sft"]; empty names are an error."""
    arms = [a.strip() for a in text.split(",")]
    if not text.strip() or any(not a for a in arms):
        raise EvalInputError(f"--arms must be comma-separated arm names, got {text!r}")
    return arms


def parse_adapter_args(items: Sequence[str]) -> dict[str, Path]:
    """``["name=path", ...]`` (the repeatable --adapter option) -> {name: Path}."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise EvalInputError(f"--adapter must look like NAME=PATH, got {item!r}")
        if not _ARM_NAME.match(name):
            raise EvalInputError(f"--adapter name {name!r}: use letters, digits, '_', '-', '.'")
        if name in BASE_ARMS:
            raise EvalInputError(f"--adapter name {name!r} is reserved for an arm without adapter")
        if name in out:
            raise EvalInputError(f"--adapter {name!r} is given twice")
        out[name] = Path(path)
    return out


# ------------------------------------------------------------------------------------ arms


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


def check_adapters(specs: Sequence[ArmSpec], session: ModelSession) -> None:
    """Every adapter arm against the base BEFORE any generation: the manifest's base weights
    hash, then every LoRA tensor's shape against the base's config and weight shapes (headers
    only, utils/adapter_shapes.py), so a copied manifest on another model's adapter fails here."""
    dirs = [spec.adapter_dir for spec in specs if spec.adapter_dir is not None]
    if not dirs:
        return
    base_sha = session.weights_sha256()
    _display, local = resolve_model(session.spec.name)
    if local is not None:
        base = BaseShapes.from_dir(local)
    else:
        base = BaseShapes.from_model(session.load().model, session.spec.name)
    for adapter_dir in dirs:
        check_adapter_base(adapter_dir, base_sha)
        problem = adapter_shape_problem(adapter_dir, base)
        if problem:
            raise EvalInputError(problem)


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


def cache_key_fields(
    *,
    weights_sha256: str,
    adapter_sha256: str | None,
    prompt_set_sha256: str,
    decoding: DecodingConfig,
    prompt_format: Mapping[str, Any],
    load_options: Mapping[str, Any],
) -> dict[str, Any]:
    """What an arm's generations depend on. batch_size is left out: it changes speed, not
    which prompt gets which greedy answer (up to float ties in padded batches)."""
    decoding_dict = {k: v for k, v in decoding.to_dict().items() if k != "batch_size"}
    return {
        "schema": CACHE_SCHEMA,
        "weights_sha256": weights_sha256,
        "adapter_sha256": adapter_sha256,
        "prompt_set_sha256": prompt_set_sha256,
        "decoding_sha256": config_hash(decoding_dict),
        "prompt_format": dict(prompt_format),
        "load_options": dict(load_options),
    }


def cache_key(key_fields: Mapping[str, Any]) -> str:
    return config_hash(dict(key_fields))[:32]


# ---------------------------------------------------------------------------------- memory


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def ru_maxrss_bytes() -> int:
    """This process's RSS high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSSMonitor:
    """Peak resident memory over a block, sampled by a background thread every interval_s.

    ``ru_maxrss`` is exact but is a whole-process high-water mark (it never goes down), so the
    first arm's model load dominates it; the sampled peak is per block, within one interval.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = self.end_bytes = self.ru_maxrss_bytes = 0
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = current_rss_bytes()
        self.peak_bytes = max(self.peak_bytes, value)
        self.n_samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSSMonitor:
        self.start_bytes = current_rss_bytes()
        self.peak_bytes = self.start_bytes
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.end_bytes = current_rss_bytes()
        self.ru_maxrss_bytes = ru_maxrss_bytes()

    def to_dict(self) -> dict[str, Any]:
        mib = 1024 * 1024
        return {
            "rss_start_mib": round(self.start_bytes / mib, 1),
            "peak_rss_mib": round(self.peak_bytes / mib, 1),
            "rss_end_mib": round(self.end_bytes / mib, 1),
            "ru_maxrss_mib": round(self.ru_maxrss_bytes / mib, 1),
            "n_samples": self.n_samples,
            "interval_s": self.interval_s,
        }


def release_memory() -> None:
    """Give freed tensors back before the next arm (CPython refcounts + cyclic gc + CUDA cache)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard dependency of generation
        pass


class ModelSession:
    """At most one base model resident; adapters swapped onto it arm by arm.

    The first adapter wraps the model in a PeftModel (attach_adapter); later adapters are
    loaded next to it with load_adapter + set_adapter and the previous one is deleted; an arm
    without adapter on a wrapped model runs inside ``disable_adapter()``. The load is lazy, so
    a fully cached evaluation never loads a model.
    """

    def __init__(self, spec: ModelSpec, log: Callable[[str], None] = print):
        self.spec = spec
        self.lm: LoadedModel | None = None
        self.load_s: float | None = None
        self._log = log
        self._active: tuple[str, str] | None = None  # (peft adapter name, adapter dir)
        self._n_adapters = 0

    def weights_sha256(self) -> str:
        """The base weights hash, without loading the model when it is a local directory."""
        if self.lm is not None:
            return self.lm.provenance["weights_sha256"]
        _display, local = resolve_model(self.spec.name)
        if local is not None:
            return weights_hash(local)
        return self.load().provenance["weights_sha256"]

    def load(self) -> LoadedModel:
        if self.lm is None:
            self._log(f"loading base model {self.spec.name} ...")
            t0 = time.perf_counter()
            loader = CleanModelLoader(
                device=self.spec.device,
                dtype=self.spec.dtype,
                quantization=self.spec.quantization,
                trust_remote_code=self.spec.trust_remote_code,
                allow_instruct_control=self.spec.allow_instruct_control,
            )
            self.lm = loader.load(self.spec.name)
            self.load_s = time.perf_counter() - t0
        return self.lm

    @property
    def loaded(self) -> bool:
        return self.lm is not None

    @contextmanager
    def arm(self, spec: ArmSpec) -> Iterator[LoadedModel]:
        lm = self.load()
        if spec.adapter_dir is None:
            if self._active is not None:
                with lm.model.disable_adapter():  # base weights only, adapter stays loaded
                    yield lm
            else:
                yield lm
            return
        name = f"arm{self._n_adapters}"  # peft module keys cannot contain user text like '.'
        self._n_adapters += 1
        previous = self._active
        attach_adapter(lm, spec.adapter_dir, adapter_name=name)
        self._active = (name, str(spec.adapter_dir))
        if previous is not None:
            self._drop(previous)
        yield lm

    def _drop(self, adapter: tuple[str, str]) -> None:
        name, directory = adapter
        assert self.lm is not None
        self.lm.model.delete_adapter(name)
        if directory in self.lm.adapters:
            self.lm.adapters.remove(directory)
        release_memory()

    def close(self) -> None:
        """Drop the model (and every adapter) and collect, so nothing stays resident."""
        self.lm = None
        self._active = None
        release_memory()


# ----------------------------------------------------------------------------- generation


def read_arm_cache(path: Path, expected_prompts: Mapping[str, str]) -> tuple[list[dict], int]:
    """(cached generations, torn lines dropped). Records must match this arm's prompts."""
    records, torn = resume(path, key="id")
    for i, rec in enumerate(records, start=1):
        for fld in ("id", "prompt", "text", "stop_reason", "n_new_tokens"):
            if fld not in rec:
                raise EvalInputError(f"{path}:{i}: cache record lacks {fld!r}; delete the file")
        want = expected_prompts.get(rec["id"])
        if want is None:
            raise EvalInputError(f"{path}:{i}: id {rec['id']!r} is not in this prompt set")
        if rec["prompt"] != want:
            raise EvalInputError(
                f"{path}:{i}: cached prompt of {rec['id']!r} differs from the prompt this arm "
                "would send; the cache belongs to other inputs, delete it"
            )
    return records, torn


def generate_into_cache(
    lm: LoadedModel,
    arm: str,
    pending: Sequence[tuple[str, str]],
    decoding: DecodingConfig,
    cache_path: Path,
    progress: bool = True,
) -> tuple[int, float]:
    """Generate (id, prompt) pairs in length-sorted batches, appending each batch to the
    cache as it finishes. Returns (new tokens, seconds)."""
    from tqdm.auto import tqdm

    lengths = {pid: len(lm.encode(prompt)) for pid, prompt in pending}
    order = sorted(pending, key=lambda item: lengths[item[0]])
    n_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(order), desc=f"eval {arm}", unit="prompt", disable=not progress)
    with JsonlAppender(cache_path) as out:
        for start in range(0, len(order), decoding.batch_size):
            batch = order[start : start + decoding.batch_size]
            gens = generate(lm, [p for _, p in batch], decoding, progress=False)
            for (pid, _prompt), g in zip(batch, gens, strict=True):
                n_tokens += g.n_new_tokens
                out.write(
                    {
                        "id": pid,
                        "arm": arm,
                        "prompt": g.prompt,
                        "text": g.text,
                        "raw_completion": g.raw_completion,
                        "stop_reason": g.stop_reason,
                        "matched_stop": g.matched_stop,
                        "n_prompt_tokens": g.n_prompt_tokens,
                        "n_new_tokens": g.n_new_tokens,
                    }
                )
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    return n_tokens, time.perf_counter() - t0


# ------------------------------------------------------------------------------ sentinels


def sentinels_unavailable(config: EvalConfig) -> dict[str, Any] | None:
    """The "not run" record when sentinels cannot run (disabled, module missing), else None.

    Decided before any model is loaded, so a fully cached rerun stays instant."""
    if not config.run_sentinels:
        return {"status": "disabled", "verdict": "not run", "reason": "eval.run_sentinels=false"}
    if config.sentinel.get("mode", "quick") in ("off", False, None):  # YAML reads off as False
        return {"status": "disabled", "verdict": "not run", "reason": "sentinels.mode=off"}
    try:
        from utils import contamination
    except ImportError as e:
        return {"status": "not_run", "verdict": "not run", "reason": f"not importable: {e}"}
    if not callable(getattr(contamination, "run_sentinel_suite", None)):
        reason = "utils.contamination has no run_sentinel_suite"
        return {"status": "not_run", "verdict": "not run", "reason": reason}
    return None


def run_sentinels(lm: LoadedModel, config: EvalConfig, trained_arm: bool = False) -> dict[str, Any]:
    """The contamination sentinel verdict for the model as currently set up (adapter included).
    ``trained_arm``: an adapter arm (the suite then discounts what the training taught).

    utils/contamination.py is optional here: when it is missing the report says "not run"."""
    unavailable = sentinels_unavailable(config)
    if unavailable is not None:
        return unavailable
    from utils import contamination

    suite = contamination.run_sentinel_suite
    sentinel_config: Any = dict(config.sentinel)
    config_cls = getattr(contamination, "SentinelConfig", None)
    if config_cls is not None and hasattr(config_cls, "from_dict"):
        sentinel_config = config_cls.from_dict(sentinel_config)
    try:
        result = suite(lm, sentinel_config, trained_arm=trained_arm)
    except Exception as e:  # a sentinel crash must not discard an hour of generations
        return {"status": "error", "verdict": "error", "reason": f"{type(e).__name__}: {e}"}
    details = _jsonable(result)
    return {"status": "ran", "verdict": _verdict_of(details), "details": details}


def sentinel_suite_version() -> int | None:
    """``utils.contamination.SUITE_VERSION`` (part of the cached verdicts' key), None without it."""
    try:
        from utils import contamination
    except ImportError:
        return None
    return getattr(contamination, "SUITE_VERSION", None)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    elif hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    return json.loads(json.dumps(value, default=str))


def _verdict_of(details: Any) -> str:
    if isinstance(details, Mapping):
        for key in ("verdict", "status"):
            if isinstance(details.get(key), str):
                return details[key]
        for key in ("passed", "clean", "ok"):
            if isinstance(details.get(key), bool):
                return "pass" if details[key] else "FAIL"
    return "see details"


# ---------------------------------------------------------------------------------- scoring


def score_arm(
    records: Sequence[Mapping[str, Any]], generations: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """id -> score_response(...) plus the cleaned response and stop reason."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        gen = generations[rec["id"]]
        response = clean_response(gen["text"])
        out[rec["id"]] = {
            **score_response(rec, response),
            "response": response,
            "stop_reason": gen["stop_reason"],
            "n_new_tokens": gen["n_new_tokens"],
            "marker_leaked": marker_leaked(response),
        }
    return out


def arm_summary(scores: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, strict and loose, each with its Wilson CI.

    Instruction-level CIs treat instructions as independent although two can share a prompt,
    so they are a little narrow; the headline and every test are prompt-level."""
    if not scores:
        raise ValueError("no scored prompts for this arm")
    prompt_strict = [s["prompt_strict"] for s in scores]
    prompt_loose = [s["prompt_loose"] for s in scores]
    instr_strict = [x for s in scores for x in s["instruction_strict"]]
    instr_loose = [x for s in scores for x in s["instruction_loose"]]
    return {
        "n_prompts": len(scores),
        "n_instructions": len(instr_strict),
        "prompt_strict": stats.summarize_arm(prompt_strict, confidence),
        "prompt_loose": stats.summarize_arm(prompt_loose, confidence),
        "instruction_strict": stats.summarize_arm(instr_strict, confidence),
        "instruction_loose": stats.summarize_arm(instr_loose, confidence),
    }


def per_type_breakdown(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    arms: Sequence[str],
    pairs: Sequence[tuple[str, str]],
) -> list[dict[str, Any]]:
    """Per instruction type: strict instruction-level accuracy of every arm on the instances
    of that type, and an exact McNemar test per arm pair, Holm-corrected across types
    separately for each pair (one family per comparison)."""
    items: dict[str, list[tuple[str, int]]] = {}
    for rec in records:
        for j, type_id in enumerate(rec["instruction_ids"]):
            items.setdefault(type_id, []).append((rec["id"], j))
    rows: list[dict[str, Any]] = []
    for type_id in sorted(items):
        its = items[type_id]
        success = {
            arm: [bool(scores[arm][rid]["instruction_strict"][j]) for rid, j in its] for arm in arms
        }
        comparisons = []
        for a, b in pairs:
            test = stats.mcnemar_exact(success[a], success[b])
            comparisons.append(
                {
                    "arm_a": a,
                    "arm_b": b,
                    "n_a_only": test.n_a_only,
                    "n_b_only": test.n_b_only,
                    "p_value": test.p_value_exact,
                }
            )
        rows.append(
            {
                "type": type_id,
                "n": len(its),
                "accuracy": {arm: sum(success[arm]) / len(its) for arm in arms},
                "comparisons": comparisons,
            }
        )
    for k in range(len(pairs)):
        adjusted = stats.holm_correction([row["comparisons"][k]["p_value"] for row in rows])
        for row, p_holm in zip(rows, adjusted, strict=True):
            row["comparisons"][k]["p_value_holm"] = p_holm
    return rows


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def reference_arm(arms: Sequence[str]) -> str:
    """The baseline trained arms must beat: base_icl when evaluated, else the first arm."""
    return "base_icl" if "base_icl" in arms else arms[0]


def compute_statistics(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    arms: Sequence[str],
    config: EvalConfig,
) -> dict[str, Any]:
    """Per-arm summaries, every pairwise comparison (Holm and BH across ALL of them), the
    minimum detectable effect, the per-type breakdown and one verdict per non-reference arm."""
    if not records:
        return {"summaries": {}, "comparisons": [], "mde": None, "per_type": [], "verdicts": []}
    summaries = {
        arm: arm_summary([scores[arm][r["id"]] for r in records], config.confidence) for arm in arms
    }
    success = {arm: [scores[arm][r["id"]]["prompt_strict"] for r in records] for arm in arms}
    comparisons = (
        stats.compare_arms(
            success,
            n_resamples=config.bootstrap_resamples,
            confidence=config.confidence,
            seed=config.bootstrap_seed,
        )
        if len(arms) >= 2
        else []
    )
    n = len(records)
    for row in comparisons:
        psi = (row["n_a_only"] + row["n_b_only"]) / n
        try:
            mde_obs = stats.minimum_detectable_effect(
                n, row["accuracy_a"], config.alpha, config.power, p_discordant=psi
            )
        except ValueError:
            mde_obs = math.inf
        row["mde_at_observed_discordance"] = _finite(mde_obs)
        row["significant_holm"] = row["p_value_holm"] < config.alpha
    ref = reference_arm(arms)
    p_ref = summaries[ref]["prompt_strict"]["accuracy"]
    mde = {
        "n": n,
        "reference_arm": ref,
        "reference_accuracy": p_ref,
        "alpha": config.alpha,
        "power": config.power,
        "mde_independent_errors": _finite(
            stats.minimum_detectable_effect(n, p_ref, config.alpha, config.power)
        ),
    }
    pairs = [(row["arm_a"], row["arm_b"]) for row in comparisons]
    per_type = per_type_breakdown(records, scores, arms, pairs)
    verdicts = []
    for arm in arms:
        if arm == ref:
            continue
        row = next(r for r in comparisons if {r["arm_a"], r["arm_b"]} == {arm, ref})
        gain = row["diff"] if row["arm_b"] == arm else -row["diff"]
        if not row["significant_holm"]:
            verdict = "no significant difference"
        else:
            verdict = "beats" if gain > 0 else "loses to"
        verdicts.append(
            {
                "arm": arm,
                "reference": ref,
                "gain": gain,
                "p_value_holm": row["p_value_holm"],
                "verdict": verdict,
            }
        )
    return {
        "summaries": summaries,
        "comparisons": comparisons,
        "mde": mde,
        "per_type": per_type,
        "verdicts": verdicts,
    }


def round_sampling_stats(run_dir: Path) -> list[dict[str, Any]]:
    """The verified rounds' sampling statistics (``<run>/verified_r<k>/stats.json``), in order:
    what the checkers found in each round's samples, next to the arms trained on them."""
    out = []
    k = 1
    while (Path(run_dir) / f"verified_r{k}" / "stats.json").exists():
        st = json.loads((Path(run_dir) / f"verified_r{k}" / "stats.json").read_text())
        out.append({"round": k, **st})
        k += 1
    return out


def prompt_split(record: Mapping[str, Any], held_out: Sequence[str]) -> str:
    """'held_out' when any constraint of the prompt is of a held-out type, else 'seen'."""
    return "held_out" if any(t in held_out for t in record["instruction_ids"]) else "seen"


def split_statistics(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    config: EvalConfig,
    held_out: Sequence[str] | None,
) -> dict[str, Any]:
    """``compute_statistics`` on the seen-type and the held-out-type prompts separately (each
    with its own Holm family), plus the type lists; {} when no split is declared."""
    if held_out is None:
        return {}
    out: dict[str, Any] = {"held_out_types": sorted(held_out)}
    for name in ("seen", "held_out"):
        part = [r for r in records if prompt_split(r, held_out) == name]
        st = compute_statistics(part, scores, list(scores), config) if part else {}
        out[name] = {
            "n_prompts": len(part),
            "summaries": st.get("summaries", {}),
            "comparisons": st.get("comparisons", []),
            "verdicts": st.get("verdicts", []),
        }
    return out


# --------------------------------------------------------------------------------- leakage


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


# ------------------------------------------------------------------------------- the run


def _record_session(path: Path, info: Mapping[str, Any]) -> None:
    sessions = json.loads(path.read_text()) if path.exists() else []
    sessions.append(
        {
            "created_unix": round(time.time(), 3),
            "n_generated": info["n_generated"],
            "new_tokens": info["new_tokens_generated"],
            "generation_s": round(info["generation_s"], 3),
            "memory": info["memory"],
            "load_average_1min": round(os.getloadavg()[0], 2),  # timings on a shared machine
        }
    )
    write_json_atomic(path, sessions)


def _stop_reasons(gens: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(g["stop_reason"] for g in gens).items()))


@dataclass
class _ArmContext:
    """What every arm of one evaluation shares."""

    config: EvalConfig
    model: ModelSpec
    session: ModelSession
    records: list[dict]
    demos: list[tuple[str, str]]
    decoding: DecodingConfig
    base_sha: str
    pset_sha: str
    cache_dir: Path
    log: Callable[[str], None]
    preamble: str = ""


def _evaluate_arm(spec: ArmSpec, ctx: _ArmContext) -> tuple[dict[str, Any], dict[str, dict]]:
    """(arm info, id -> generation) for one arm: cache first, the model only for what is
    missing (generations, sentinel verdict), peak RSS measured over the arm."""
    config, records = ctx.config, ctx.records
    prompts = {r["id"]: arm_prompt(spec, r["prompt"], ctx.demos, ctx.preamble) for r in records}
    key_fields = cache_key_fields(
        weights_sha256=ctx.base_sha,
        adapter_sha256=adapter_hash(spec.adapter_dir) if spec.adapter_dir else None,
        prompt_set_sha256=ctx.pset_sha,
        decoding=ctx.decoding,
        prompt_format=prompt_format_id(spec, ctx.demos, ctx.preamble),
        load_options=ctx.model.load_options(),
    )
    key = cache_key(key_fields)
    cache_path = ctx.cache_dir / f"{key}.jsonl"
    sessions_path = ctx.cache_dir / f"{key}.sessions.json"
    write_json_atomic(ctx.cache_dir / f"{key}.meta.json", {"arm": spec.name, **key_fields})
    cached, torn = read_arm_cache(cache_path, prompts)
    if torn:
        ctx.log(f"arm {spec.name}: dropped {torn} torn line(s) from {cache_path} (resuming)")
    done = {g["id"] for g in cached}
    pending = [(r["id"], prompts[r["id"]]) for r in records if r["id"] not in done]
    # Sentinels judge the model state (base + adapter), so base and base_icl share one.
    sentinel_key = config_hash(
        {**key_fields, "prompt_set_sha256": None, "decoding_sha256": None,
         "prompt_format": None, "sentinel": config.sentinel,
         "suite_version": sentinel_suite_version()}
    )[:32]  # fmt: skip
    sentinel_path = ctx.cache_dir / f"sentinel-{sentinel_key}.json"
    sentinel = sentinels_unavailable(config)
    if sentinel is None and sentinel_path.exists():
        sentinel = json.loads(sentinel_path.read_text())
    info: dict[str, Any] = {
        "name": spec.name,
        "status": "evaluated",
        "prompt_format": spec.prompt_format,
        "adapter_dir": str(spec.adapter_dir) if spec.adapter_dir else None,
        "adapter_sha256": key_fields["adapter_sha256"],
        "cache_key": key,
        "cache_path": str(cache_path),
        "n_cached": len(cached),
        "n_generated": len(pending),
        "new_tokens_generated": 0,
        "generation_s": 0.0,
        "memory": None,
    }
    ctx.log(f"arm {spec.name}: {len(cached)} cached, {len(pending)} to generate")
    if pending or sentinel is None:
        with PeakRSSMonitor(config.rss_interval_s) as mon:
            t_arm = time.perf_counter()
            with ctx.session.arm(spec) as lm:
                if pending:
                    n_tok, secs = generate_into_cache(
                        lm, spec.name, pending, ctx.decoding, cache_path, config.progress
                    )
                    info["new_tokens_generated"], info["generation_s"] = n_tok, secs
                if sentinel is None:
                    sentinel = run_sentinels(lm, config, trained_arm=spec.adapter_dir is not None)
                    if sentinel["status"] == "ran":  # only real results are worth caching
                        write_json_atomic(sentinel_path, sentinel)
            info["arm_s"] = time.perf_counter() - t_arm
            release_memory()
        info["memory"] = mon.to_dict()
        cached, _ = read_arm_cache(cache_path, prompts)
        if pending:
            _record_session(sessions_path, info)
    # Timings and memory of every run that generated into this cache: a cached rerun still
    # reports how long generation took and how much memory it needed.
    info["generation_sessions"] = (
        json.loads(sessions_path.read_text()) if sessions_path.exists() else []
    )
    info["sentinel"] = sentinel
    info["tokens_per_s"] = (
        info["new_tokens_generated"] / info["generation_s"] if info["generation_s"] else None
    )
    by_id = {g["id"]: g for g in cached}
    if set(by_id) != set(prompts):
        raise RuntimeError(f"arm {spec.name}: cache {cache_path} is incomplete after generation")
    info["stop_reasons"] = _stop_reasons(list(by_id.values()))
    info["mean_new_tokens"] = sum(g["n_new_tokens"] for g in by_id.values()) / len(by_id)
    info["example_prompt"] = prompts[records[0]["id"]]
    return info, by_id


def _samples(
    records: Sequence[Mapping[str, Any]],
    headline: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
    n_samples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The same few headline prompts, answered by every arm, for the report."""
    rng = random.Random(seed)
    sample_ids = rng.sample([r["id"] for r in headline], min(n_samples, len(headline)))
    by_record = {r["id"]: r for r in records}
    return [
        {
            "id": sid,
            "instruction": by_record[sid]["prompt"],
            "instruction_ids": by_record[sid]["instruction_ids"],
            "arms": {
                arm: {
                    "response": arm_scores[sid]["response"],
                    "prompt_strict": arm_scores[sid]["prompt_strict"],
                    "stop_reason": arm_scores[sid]["stop_reason"],
                }
                for arm, arm_scores in scores.items()
            },
        }
        for sid in sample_ids
    ]


def run_evaluation(
    run_dir: str | Path,
    config: EvalConfig,
    model: ModelSpec,
    adapters: Mapping[str, Path] | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    held_out: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every arm sequentially (cached, resumable) and return the results dict that
    utils/report.py renders. Raises EvalInputError on bad input before any generation.

    ``held_out``: the constraint types never trained on (config ``constraints.held_out``); each
    prompt is then tagged ``seen`` or ``held_out`` (held out when any of its types is) and
    every statistic is also reported on each part."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalInputError(f"run directory {run_dir} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"

    records = build_eval_set(config.n_prompts, config.seed)
    specs, skipped = resolve_arms(run_dir, config.arms, adapters)
    for s in skipped:
        log(f"SKIPPED arm {s['name']}: {s['reason']}")
    leakage = check_leakage(records, load_train_instructions(run_dir), config.leakage_threshold)
    leaked = set(leakage["ids"]) if config.exclude_leaked else set()
    headline = [r for r in records if r["id"] not in leaked]
    session = ModelSession(model, log=log)
    check_adapters(specs, session)  # before any generation (the ICL choice generates too)
    icl_choice = None
    demos, preamble = icl_examples()[: config.icl_k], ""
    if config.icl_candidates and "base_icl" in [s.name for s in specs]:
        icl_choice = choose_icl(session, config, out_dir / "cache", log)
        preamble, demos = candidate_prompt_parts(icl_choice["chosen"])
    ctx = _ArmContext(
        config=config,
        model=model,
        session=session,
        records=records,
        demos=demos,
        preamble=preamble,
        decoding=config.decoding(),
        base_sha=session.weights_sha256(),
        pset_sha=prompt_set_hash(records),
        cache_dir=out_dir / "cache",
        log=log,
    )
    log(
        f"eval set: {len(records)} prompts (sha256 {ctx.pset_sha[:12]}), leakage "
        f"{leakage.get('n_leaked', 'not checked')}, headline n={len(headline)}"
    )
    arm_results: list[dict[str, Any]] = []
    generations: dict[str, dict[str, dict]] = {}
    for spec in specs:
        info, generations[spec.name] = _evaluate_arm(spec, ctx)
        arm_results.append(info)
    constitution = None
    if config.constitution and specs:
        from utils.eval_constitution import run_constitution_eval

        keys = {
            spec.name: {"weights": ctx.base_sha,
                        "adapter": adapter_hash(spec.adapter_dir) if spec.adapter_dir else None}
            for spec in specs
        }  # fmt: skip
        constitution = run_constitution_eval(
            specs, session.arm, keys,
            lambda spec, text: arm_prompt(spec, text, ctx.demos, ctx.preamble),
            config, out_dir / "cache", log,
        )  # fmt: skip
    provenance = session.lm.provenance if session.lm is not None else None
    load_s = session.load_s
    session.close()

    scores = {arm: score_arm(records, gens) for arm, gens in generations.items()}
    statistics = compute_statistics(headline, scores, list(scores), config) if scores else {}
    subsets = split_statistics(headline, scores, config, held_out) if scores else {}
    for info in arm_results:
        arm_scores = scores[info["name"]]
        info["summary"] = statistics.get("summaries", {}).get(info["name"])
        info["summary_all_prompts"] = arm_summary(list(arm_scores.values()), config.confidence)
        info["n_marker_leaked"] = sum(s["marker_leaked"] for s in arm_scores.values())
    return {
        "schema": "eval-results/1",
        "run_dir": str(run_dir),
        "out_dir": str(out_dir),
        "created_unix": round(time.time(), 3),
        "config": config.to_dict(),
        "model": {
            "spec": asdict(model),
            "weights_sha256": ctx.base_sha,
            "provenance": provenance,
            "loaded": provenance is not None,
            "load_s": load_s,
        },
        "decoding": {
            **ctx.decoding.to_dict(),
            "eos": "model EOS / stop_token_ids (always a stop)",
            "icl_k": len(ctx.demos),
            "icl_instructions": [d[0] for d in ctx.demos],
            "icl_preamble": ctx.preamble,
            "icl_selection": icl_choice,
        },
        "prompt_set": {
            "n": len(records),
            "seed": config.seed,
            "sha256": ctx.pset_sha,
            "type_counts": type_counts(records),
        },
        "leakage": leakage,
        "headline": {
            "n_prompts": len(headline),
            "n_excluded_leaked": len(records) - len(headline),
            "exclude_leaked": config.exclude_leaked,
        },
        "arms": arm_results,
        "skipped_arms": skipped,
        "comparisons": statistics.get("comparisons", []),
        "mde": statistics.get("mde"),
        "per_type": statistics.get("per_type", []),
        "verdicts": statistics.get("verdicts", []),
        "splits": subsets,
        "samples": _samples(records, headline, scores, config.n_samples, config.seed),
        "scores": {
            arm: {
                sid: {k: s[k] for k in ("prompt_strict", "prompt_loose", "instruction_strict")}
                for sid, s in arm_scores.items()
            }
            for arm, arm_scores in scores.items()
        },
        "rounds": round_sampling_stats(run_dir),
        "constitution": constitution,
        "timing": {"total_s": time.perf_counter() - t_start, "model_load_s": load_s},
    }


def choose_icl(
    session: ModelSession, config: EvalConfig, cache_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The dev-chosen base_icl setting (utils/icl_selection.py), cached per base weights,
    candidates, dev size and decoding: a rerun does not load the model for it."""
    key = config_hash({"weights": session.weights_sha256(), "candidates": list(config.icl_candidates),
                       "n_dev": config.icl_dev_prompts, "seed": config.seed,
                       "decoding": config.decoding().to_dict(), "schema": 1})[:24]  # fmt: skip
    path = cache_dir / f"icl-selection-{key}.json"
    if path.exists():
        choice = json.loads(path.read_text())
    else:
        lm = session.load()
        decoding = config.decoding()

        def texts(prompts: list[str]) -> list[str]:
            return [g.text for g in generate(lm, prompts, decoding, progress=config.progress,
                                             desc="icl dev")]  # fmt: skip

        t0 = time.perf_counter()
        choice = select_icl(texts, config.icl_candidates, config.icl_dev_prompts, config.seed + 1)
        choice["seconds"] = round(time.perf_counter() - t0, 1)
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, choice)
    log(
        f"base_icl: dev-chosen setting {choice['chosen']} (dev prompt strict {choice['dev_accuracy']})"
    )
    return choice


# ------------------------------------------------------------------- memory benchmark

DEFAULT_BENCH_SEED = 7


def make_random_adapter(lm: LoadedModel, out_dir: Path, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter with random (non-zero) A and B on every attention projection, saved
    with its base-model manifest: a stand-in for a trained adapter of the same size.
    Wraps ``lm.model`` in place and unloads it again, leaving the base model unchanged."""
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.clean_model_loader import write_adapter_manifest

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random B too, so the adapter changes outputs
    )
    peft_model = get_peft_model(lm.model, config)
    peft_model.save_pretrained(str(out_dir))
    lm.model = peft_model.unload()
    write_adapter_manifest(out_dir, lm, {"note": "random-init LoRA for the memory benchmark"})
    return out_dir


def memory_benchmark_child(
    mode: str,
    model_name: str,
    adapter_dirs: Sequence[str],
    n_prompts: int,
    max_new_tokens: int,
    batch_size: int = 4,
) -> dict[str, Any]:
    """One benchmark mode in THIS process; the caller runs each mode in a fresh subprocess.

    - "one_arm": one base load, the base arm only (the reference peak);
    - "sequential": one base load, base arm then each adapter swapped on (ModelSession);
    - "all_at_once": one model copy per arm, all resident, then each arm generates.
    """
    records = build_eval_set(n_prompts, DEFAULT_BENCH_SEED)
    prompts = [format_prompt(r["prompt"]) for r in records]
    decoding = DecodingConfig(
        max_new_tokens=max_new_tokens, batch_size=batch_size, stop_strings=RESPONSE_STOP_STRINGS
    )
    arms = [ArmSpec("base", ZERO_SHOT)] + [
        ArmSpec(f"adapter{i}", ZERO_SHOT, Path(d)) for i, d in enumerate(adapter_dirs)
    ]
    outputs: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    with PeakRSSMonitor(0.02) as mon:
        if mode == "one_arm":
            session = ModelSession(ModelSpec(name=model_name), log=lambda _m: None)
            with session.arm(arms[0]) as lm:
                outputs["base"] = [g.text for g in generate(lm, prompts, decoding, progress=False)]
            session.close()
        elif mode == "sequential":
            session = ModelSession(ModelSpec(name=model_name), log=lambda _m: None)
            for spec in arms:
                with session.arm(spec) as lm:
                    gens = generate(lm, prompts, decoding, progress=False)
                    outputs[spec.name] = [g.text for g in gens]
                release_memory()
            session.close()
        elif mode == "all_at_once":
            models = []
            for spec in arms:
                lm = CleanModelLoader().load(model_name)
                if spec.adapter_dir is not None:
                    attach_adapter(lm, spec.adapter_dir)
                models.append(lm)
            for spec, lm in zip(arms, models, strict=True):
                gens = generate(lm, prompts, decoding, progress=False)
                outputs[spec.name] = [g.text for g in gens]
            del models
        else:
            raise ValueError(f"unknown benchmark mode {mode!r}")
    return {
        "mode": mode,
        "arms": list(outputs),
        "n_prompts": n_prompts,
        "max_new_tokens": max_new_tokens,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_sampled_mib": mon.to_dict()["peak_rss_mib"],
        "ru_maxrss_mib": round(ru_maxrss_bytes() / 1024 / 1024, 1),
        "outputs_sha256": hashlib.sha256(json.dumps(outputs).encode()).hexdigest(),
        "outputs": outputs,
    }
