"""Each arm's generations cached on disk: ``<run>/eval/cache/<key>.jsonl``, key = hash(weights,
adapter, prompt set, decoding, prompt format, load options), appended and flushed per batch so a
killed run resumes at the first missing prompt; beside it, the timings and memory of every
session that generated into it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.clean_model_loader import LoadedModel
from utils.eval_config import EvalInputError
from utils.generation import DecodingConfig, generate
from utils.jsonl_io import JsonlAppender, resume, write_json_atomic
from utils.provenance import config_hash

CACHE_SCHEMA = 1  # bump when a cache record's meaning changes, so old caches are not reused


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


def record_generation_session(path: Path, info: Mapping[str, Any]) -> None:
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
