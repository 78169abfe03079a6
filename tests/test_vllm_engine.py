"""The vLLM generation backend (utils/vllm_engine.py): config resolution everywhere, and where
vllm is installed (requirements-vllm.txt) an end-to-end run on the tiny model against the HF
engine. Without vllm the engine tests are skipped with the reason; the config tests run."""

from __future__ import annotations

import pytest

from utils.config import ConfigError
from utils.vllm_engine import BackendConfig, attached_engine, resolve_backend, vllm_installed

needs_vllm = pytest.mark.skipif(
    not vllm_installed(), reason="vllm not installed (pip install -r requirements-vllm.txt)"
)


def test_backend_config_is_validated_and_auto_is_hf_on_cpu():
    assert resolve_backend(BackendConfig(backend="auto"), "cpu")[0] == "hf"
    assert resolve_backend(BackendConfig(backend="hf"), "cuda:0")[0] == "hf"
    with pytest.raises(ConfigError, match="generation.backend must be one of"):
        BackendConfig(backend="tgi")
    with pytest.raises(ConfigError, match="unknown keys"):
        BackendConfig.from_dict({"backend": "hf", "tensor_paralel_size": 2})
    if not vllm_installed():
        with pytest.raises(ConfigError, match="vllm is not installed"):
            resolve_backend(BackendConfig(backend="vllm"), "cpu")
        assert resolve_backend(BackendConfig(backend="auto"), "cuda:0") == (
            "hf", "auto: CUDA but vllm not installed")  # fmt: skip


def test_an_attached_engine_is_not_used_while_an_adapter_is_attached(tiny_qwen):
    sentinel = object()
    tiny_qwen.derived_cache["generation_backend"] = sentinel
    try:
        assert attached_engine(tiny_qwen) is sentinel
        tiny_qwen.adapters.append("/some/adapter")
        assert attached_engine(tiny_qwen) is None
    finally:
        tiny_qwen.adapters.remove("/some/adapter")
        del tiny_qwen.derived_cache["generation_backend"]


@needs_vllm
@pytest.mark.slow
def test_vllm_backend_greedy_matches_the_hf_engine_and_keeps_the_contract(tiny_qwen):
    """Greedy text, stop reasons and token counts agree with the HF engine on the tiny model;
    chat markup is refused before anything reaches vLLM; per-row seeds reproduce."""
    from utils.clean_model_loader import ContaminationError
    from utils.generation import DecodingConfig, generate
    from utils.vllm_engine import VllmEngine

    prompts = ["Instruction: Name a color.\nResponse:", "The capital of France is",
               "1, 2, 3,", "Once upon a time"]  # fmt: skip
    dc = DecodingConfig(max_new_tokens=16, batch_size=4)
    hf = generate(tiny_qwen, prompts, dc, progress=False)
    stops = tuple(g.text[3:6] for g in hf[:2])
    dc = DecodingConfig(max_new_tokens=16, batch_size=4, stop_strings=stops)
    hf = generate(tiny_qwen, prompts, dc, progress=False)
    engine = VllmEngine(tiny_qwen, BackendConfig(backend="vllm", max_model_len=256))
    tiny_qwen.derived_cache["generation_backend"] = engine
    try:
        vl = generate(tiny_qwen, prompts, dc, progress=False)
        assert [(g.text, g.stop_reason, g.n_new_tokens) for g in vl] == [
            (g.text, g.stop_reason, g.n_new_tokens) for g in hf
        ]
        with pytest.raises(ContaminationError):
            generate(tiny_qwen, ["<|im_start|>user\nhi"], dc, progress=False)
        sampled = DecodingConfig(max_new_tokens=12, do_sample=True, temperature=1.0, batch_size=4)
        a = generate(tiny_qwen, prompts, sampled, seed=5, progress=False)
        b = generate(tiny_qwen, prompts[::-1], sampled, seed=5, progress=False)[::-1]
        assert [g.text for g in a] == [g.text for g in b]
    finally:
        del tiny_qwen.derived_cache["generation_backend"]
