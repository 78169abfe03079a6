"""Offline benchmark (``scripts/benchmark_eval_memory.py``): the peak memory of evaluating arms
sequentially on one base load versus all resident at once, and a random LoRA adapter that
stands in for a trained one (also used by the evaluation tests)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.clean_model_loader import CleanModelLoader, LoadedModel, attach_adapter
from utils.eval_arms import ZERO_SHOT, ArmSpec
from utils.eval_config import ModelSpec
from utils.eval_prompts import build_eval_set
from utils.eval_session import ModelSession
from utils.generation import DecodingConfig, generate
from utils.process_memory import PeakRSSMonitor, release_memory, ru_maxrss_bytes
from utils.response_format import RESPONSE_STOP_STRINGS, format_prompt

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
