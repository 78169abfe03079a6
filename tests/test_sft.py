"""Stage-1 SFT: config and data helpers (pure), then real TRL runs on tiny random models: the
adapter + manifests + mask audit, resume after a kill, exit codes, a BOS-adding model through
the real trainer, and (slow) the embedded Gemma base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scripts.train_stage1_sft import main as sft_main
from tests.conftest import build_tiny_qwen
from tests.test_mask_audit import build_bos_tokenizer
from utils.clean_model_loader import (
    AdapterMismatchError,
    CleanModelLoader,
    attach_adapter,
    weights_hash,
)
from utils.jsonl_io import read_jsonl, write_jsonl_atomic
from utils.sft import (
    SFTStageConfig,
    check_no_test_overlap,
    make_sft_args,
    run_sft,
    sft_examples,
)
from utils.training_common import (
    ResumeMismatchError,
    filter_by_length,
    final_evaluation,
    planned_max_steps,
    prepare_resume,
    split_dev,
    summarise_steps,
    truncate_log,
)

RESPONSES = [
    "Red, green and blue.",
    ", then the next one.",  # a response starting with punctuation
    "(a) the first option",
    "- x\n- y",
    "Mercury is liquid at room temperature.",
    "1. one\n2. two\n3. three",
]


def stage1_records(n: int = 16) -> list[dict]:
    return [
        {
            "id": f"r{i:02d}",
            "instruction": f"Give answer number {i}.",
            "type": "open_qa",
            "response": RESPONSES[i % len(RESPONSES)],
        }
        for i in range(n)
    ]


def write_run(root: Path, records: list[dict]) -> Path:
    write_jsonl_atomic(root / "stage1" / "train.jsonl", records)
    return root


def write_config(path: Path, model_dir: Path, sft: dict) -> Path:
    path.write_text(yaml.safe_dump({"model": {"name": str(model_dir)}, "sft": sft}))
    return path


TINY_SFT = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "logging_steps": 1,
    "save_steps": 1,
    "eval_steps": 100,
    "max_length": 64,
}


# -- pure helpers ----------------------------------------------------------------------------
def test_config_rejects_unknown_and_mistyped_keys():
    assert SFTStageConfig.from_dict({}).bf16 is False
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lora_rank'\]"):
        SFTStageConfig.from_dict({"lora_rank": 8})
    with pytest.raises(ValueError, match="sft.bf16: expected true/false"):
        SFTStageConfig.from_dict({"bf16": "yes"})
    with pytest.raises(ValueError, match="sft.lora_r: expected an integer"):
        SFTStageConfig.from_dict({"lora_r": 8.5})
    with pytest.raises(ValueError, match="FlashAttention"):
        SFTStageConfig.from_dict({"padding_free": True})
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        SFTStageConfig.from_dict({"train_sampling_strategy": "shortest_first"})


def test_project_cpu_settings_override_trl_defaults(tmp_path):
    from trl import SFTConfig

    trl_default = SFTConfig(output_dir=str(tmp_path / "d"), use_cpu=True)
    assert trl_default.bf16 is True and trl_default.gradient_checkpointing is True
    ours = make_sft_args(SFTStageConfig(), tmp_path, has_dev=True, use_cpu=True)
    assert ours.bf16 is False and ours.gradient_checkpointing is False
    assert ours.completion_only_loss is True and ours.output_dir == str(tmp_path / "checkpoints")
    assert str(ours.eval_strategy) in ("steps", "IntervalStrategy.STEPS")


def test_sft_examples_use_the_one_format_and_name_bad_records():
    ex = sft_examples([{"id": 3, "instruction": " Name a colour. ", "response": " Red. "}])
    assert ex == [
        {
            "id": "3",
            "instruction": " Name a colour. ",
            "prompt": "Instruction: Name a colour.\nResponse:",
            "completion": " Red.",
            "instruction_ids": [],
        }
    ]
    with pytest.raises(ValueError, match="record 2 lacks field 'response'"):
        sft_examples(
            [{"id": 1, "instruction": "a", "response": "b"}, {"id": 2, "instruction": "c"}]
        )
    with pytest.raises(ValueError, match="duplicate id '1'"):
        sft_examples([{"id": 1, "instruction": "a", "response": "b"}] * 2)
    with pytest.raises(ValueError, match=r"record 1 \(id 'e'\): response is empty"):
        sft_examples([{"id": "e", "instruction": "a", "response": "  "}])


def test_split_dev_is_deterministic_sized_and_order_free():
    ex = [{"id": f"e{i}"} for i in range(20)]
    train, dev = split_dev(ex, 0.1, 32, seed=0)
    assert len(dev) == 2 and len(train) == 18  # round(0.1 * 20)
    assert {e["id"] for e in train} | {e["id"] for e in dev} == {e["id"] for e in ex}
    assert len(split_dev(ex, 0.01, 32, 0)[1]) == 1  # at least one when asked for a dev split
    assert len(split_dev(ex, 0.5, 3, 0)[1]) == 3  # capped by max_dev
    assert split_dev(ex, 0.0, 32, 0) == (ex, [])
    assert split_dev(ex[:1], 0.5, 32, 0) == (ex[:1], [])


def test_split_dev_same_ids_whatever_the_order():
    ex = [{"id": f"e{i}"} for i in range(50)]
    a = {e["id"] for e in split_dev(ex, 0.1, 32, seed=0)[1]}
    b = {e["id"] for e in split_dev(ex[::-1], 0.1, 32, seed=0)[1]}
    assert a == b and len(a) == 5


def test_test_overlap_is_refused():
    ex = sft_examples([{"id": "a", "instruction": "Name  a Colour.", "response": "Red."}])
    check_no_test_overlap(ex, [{"instruction": "Name a shape."}])
    with pytest.raises(ValueError, match=r"1 training instruction\(s\).*\['a'\]"):
        check_no_test_overlap(ex, [{"instruction": "name a colour."}])


def test_filter_by_length_reports_what_it_drops(tiny_qwen):
    ex = [
        {"id": "short", "prompt": "Instruction: a\nResponse:", "completion": " b"},
        {"id": "long", "prompt": "Instruction: a\nResponse:", "completion": " b" * 40},
    ]
    kept, dropped = filter_by_length(tiny_qwen, ex, max_length=20)
    # "Instruction", ":", " a", "\n", "Response", ":" + " b" + EOS = 8 tokens; 6 + 40 + 1 = 47
    assert [e["id"] for e in kept] == ["short"] and dropped == [{"id": "long", "n_tokens": 47}]


def test_planned_steps_is_one_epoch_capped_by_max_steps():
    # 330 records, batch 4, 1 process: ceil(330 / 4) = 83 batches = 83 steps per epoch
    assert planned_max_steps(330, 4, 1, 1, 1.0, cap=100) == 83
    assert planned_max_steps(330, 4, 1, 1, 1.0, cap=50) == 50
    assert planned_max_steps(330, 4, 1, 1, 2.0, cap=-1) == 166
    # 2 ranks x batch 2 x accumulation 2: ceil(330 / 4) = 83 batches per rank -> ceil(83 / 2) = 42
    assert planned_max_steps(330, 2, 2, 2, 1.0, cap=-1) == 42
    assert planned_max_steps(3, 4, 1, 1, 0.5, cap=-1) == 1


def test_summarise_steps_excludes_the_warmup_step():
    assert summarise_steps([3.0, 1.0, 2.0], [5.0, 2.0, 3.0]) == {
        "steps_run": 3,
        "step_seconds_mean": 1.5,
        "step_seconds_first": 3.0,
        "step_cpu_seconds_mean": 2.5,
        "train_seconds": 6.0,
    }
    assert summarise_steps([2.0])["step_seconds_mean"] == 2.0


def test_final_evaluation_reuses_the_eval_of_the_last_step():
    from types import SimpleNamespace

    def never():
        raise AssertionError("evaluated again")

    logged = SimpleNamespace(
        state=SimpleNamespace(
            global_step=4,
            log_history=[
                {"step": 2, "eval_loss": 2.0},
                {"step": 4, "loss": 1.2},
                {"step": 4, "eval_loss": 1.5},
            ],
        ),
        evaluate=never,
    )
    assert final_evaluation(logged)["eval_loss"] == 1.5
    stale = SimpleNamespace(
        state=SimpleNamespace(global_step=5, log_history=logged.state.log_history),
        evaluate=lambda: {"eval_loss": 1.1},
    )
    assert final_evaluation(stale) == {"eval_loss": 1.1}


def test_truncate_log_drops_rows_past_the_checkpoint(tmp_path):
    p = tmp_path / "log.jsonl"
    write_jsonl_atomic(p, [{"step": s, "loss": s / 10} for s in (1, 2, 3, 4)])
    assert truncate_log(p, 2) == 2
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    assert truncate_log(tmp_path / "absent.jsonl", 2) == 0


def write_complete_checkpoint_files(ckpt: Path) -> None:
    """The weights, optimizer and scheduler files a resumable checkpoint needs besides its
    trainer_state.json (utils/checkpoints.checkpoint_problem)."""
    import torch
    from safetensors.torch import save_file

    save_file({"lora_A.weight": torch.zeros(2, 2)}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": 3}, ckpt / "scheduler.pt")


def test_resume_refuses_checkpoints_of_another_run(tmp_path):
    d = tmp_path / "ckpt"
    key = {"data_sha256": "a", "lora": [16, 32]}
    assert prepare_resume(d, key, fresh=False, is_main=True) is None
    (d / "checkpoint-3").mkdir()
    (d / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    write_complete_checkpoint_files(d / "checkpoint-3")  # else moved aside (tests/test_faults.py)
    assert prepare_resume(d, key, fresh=False, is_main=True) == d / "checkpoint-3"
    with pytest.raises(ResumeMismatchError, match=r"changed: \['data_sha256'\]"):
        prepare_resume(d, {**key, "data_sha256": "b"}, fresh=False, is_main=True)
    assert prepare_resume(d, {**key, "data_sha256": "b"}, fresh=True, is_main=True) is None
    assert json.loads((d / "run_key.json").read_text())["data_sha256"] == "b"


# -- real TRL runs on tiny models ------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_qwen_dir):
    root = tmp_path_factory.mktemp("sft-run")
    run = write_run(root / "run", stage1_records(16))
    cfg = write_config(
        root / "cfg.yaml", tiny_qwen_dir, {**TINY_SFT, "dev_fraction": 0.125, "max_dev_examples": 2}
    )
    rc = sft_main(["--config", str(cfg), "--run-dir", str(run)])
    return run / "sft", rc


def test_sft_writes_adapter_manifest_and_mask_audit(sft_run, tiny_qwen_dir):
    out, rc = sft_run
    assert rc == 0
    adapter = out / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "adapter_manifest.json"):
        assert (adapter / name).exists(), name
    base_hash = weights_hash(tiny_qwen_dir)  # computed here, independently of the run
    am = json.loads((adapter / "adapter_manifest.json").read_text())
    assert am["base_weights_sha256"] == base_hash and am["stage"] == "sft"
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "sft" and m["model"]["weights_sha256"] == base_hash
    assert m["data"]["n_records"] == 16 and (m["data"]["n_train"], m["data"]["n_dev"]) == (14, 2)
    t = m["training"]
    assert t["global_step"] == 2 and t["steps_run"] == 2 and t["world_size"] == 1
    assert t["resumed_from_step"] == 0 and isinstance(t["eval_loss"], float)
    # the base model's dev loss, same split and mask, adapter disabled: a different number
    assert isinstance(t["base_eval_loss"], float) and t["base_eval_loss"] != t["eval_loss"]
    assert m["mask_audit"]["passed"] and m["mask_audit"]["splits"]["train"]["n_checked"] == 14
    assert m["adapter"]["sha256"] == weights_hash(adapter)
    audit = json.loads((out / "mask_audit.json").read_text())
    assert audit["passed"] and audit["eos_token_id"] == 151643 and audit["add_bos"] is False
    text = (out / "mask_audit.txt").read_text()
    assert "Response:⟦ Red, green and blue.<|endoftext|>⟧" in text
    assert "Response:⟦ , then the next one.<|endoftext|>⟧" in text
    losses = [r for r in read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]


def test_sft_adapter_trained_and_bound_to_its_base(
    sft_run, tiny_qwen_dir, qwen_tokenizer_dir, tmp_path
):
    from safetensors.torch import load_file

    out, _ = sft_run
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    lm = CleanModelLoader().load(str(tiny_qwen_dir))
    attach_adapter(lm, out / "adapter")
    other = CleanModelLoader().load(
        str(build_tiny_qwen(tmp_path / "other", qwen_tokenizer_dir, seed=1))
    )
    with pytest.raises(AdapterMismatchError, match="trained on base model"):
        attach_adapter(other, out / "adapter")


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_qwen_dir):
    run = write_run(tmp_path / "run", stage1_records(16))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_qwen_dir, {**TINY_SFT, "dev_fraction": 0.0})
    base = ["--config", str(cfg), "--run-dir", str(run)]
    assert sft_main(base) == 0  # "killed" after step 2: checkpoint-2 is on disk
    out = run / "sft"
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert sft_main([*base, "--set", "sft.max_steps=4"]) == 0
    t = json.loads((out / "manifest.json").read_text())["training"]
    assert t["resumed_from_step"] == 2 and t["resumed_from_checkpoint"].endswith("checkpoint-2")
    assert t["global_step"] == 4 and t["steps_run"] == 2  # only steps 3 and 4 ran this time
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_exit_codes_for_bad_input_and_failed_audit(tmp_path, tiny_qwen_dir, capsys):
    run = write_run(tmp_path / "run", stage1_records(4))
    bad = write_config(tmp_path / "bad.yaml", tiny_qwen_dir, {"lora_rank": 4})
    assert sft_main(["--config", str(bad), "--run-dir", str(run)]) == 2
    assert "lora_rank" in capsys.readouterr().err
    cfg = write_config(tmp_path / "cfg.yaml", tiny_qwen_dir, {**TINY_SFT, "dev_fraction": 0.0})
    assert sft_main(["--config", str(cfg), "--run-dir", str(tmp_path / "nowhere")]) == 2
    recs = stage1_records(4)
    # Qwen's own <tool_call> (a control token of its chat template) passes the chat-markup scan
    # of the data (no <|...|> shape); the mask audit is the backstop.
    recs[2]["response"] = "Sure <tool_call> here"
    write_run(run, recs)
    assert sft_main(["--config", str(cfg), "--run-dir", str(run)]) == 3  # a failed gate
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "'r02'" in err
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["exit_code"] == 3
    failed = json.loads((run / "sft" / "mask_audit.json").read_text())
    assert failed["passed"] is False and failed["example_id"] == "r02"
    assert not (run / "sft" / "adapter").exists()


def build_tiny_bos_model(out_dir: Path) -> Path:
    """A 2-layer random Llama on a tokenizer that adds <s>: the BOS path of the real trainer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    build_bos_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        )
    )  # fmt: skip
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir)
    return out_dir


def test_bos_model_gets_exactly_one_bos_through_the_real_trainer(tmp_path):
    lm = CleanModelLoader().load(str(build_tiny_bos_model(tmp_path / "tiny-bos-base")))
    assert lm.policy.add_bos
    cfg = SFTStageConfig.from_dict({**TINY_SFT, "max_steps": 1, "dev_fraction": 0.0})
    ex = sft_examples(stage1_records(6))
    args = make_sft_args(cfg, tmp_path / "out", has_dev=False, use_cpu=True)
    res = run_sft(lm, ex, [], cfg, args, tmp_path / "out", {"sha256": "t"})
    assert res.summary["mask_audit"]["add_bos"] is True
    audit = json.loads((tmp_path / "out" / "mask_audit.json").read_text())
    for e in audit["examples"]["train"]:
        ids = [t[1] for t in e["tokens"]]
        assert ids[0] == lm.policy.bos_token_id and ids.count(lm.policy.bos_token_id) == 1
        assert ids[-1] == lm.policy.eos_token_id and e["tokens"][-1][2] is True
    assert (tmp_path / "out" / "mask_audit.txt").read_text().count("<s>Instruction:") == 6


@pytest.mark.slow
def test_gemma_sft_one_step(tmp_path):
    """The embedded base: TRL's tokenisation passes the audit (one <bos>, <eos> trained) and a
    LoRA step runs with the CPU settings. Its own load: training injects LoRA layers in place,
    which must not leak into the session's shared ``gemma`` fixture."""
    gemma = CleanModelLoader().load("gemma-3-270m")
    cfg = SFTStageConfig.from_dict(
        {"max_steps": 1, "per_device_train_batch_size": 2, "dev_fraction": 0.0, "max_length": 96}
    )
    ex = sft_examples(stage1_records(4))
    args = make_sft_args(cfg, tmp_path, has_dev=False, use_cpu=True)
    res = run_sft(gemma, ex, [], cfg, args, tmp_path, {"sha256": "g"})
    s = res.summary
    assert s["mask_audit"]["add_bos"] is True and s["mask_audit"]["eos_token_id"] == 1
    assert s["training"]["global_step"] == 1
    assert (
        "<bos>Instruction: Give answer number 0.\nResponse:⟦ Red, green and blue.<eos>⟧"
        in (tmp_path / "mask_audit.txt").read_text()
    )


def test_balance_types_repeats_rare_types_up_to_the_minimum_and_only_them():
    from utils.sft import balance_types

    def ex(i, ids):
        return {"id": f"r{i}", "prompt": "p", "completion": "c", "instruction_ids": ids}

    common = [ex(i, ["length_constraints:number_words"]) for i in range(5)]
    rare = [ex(10, ["detectable_format:json_format"]), ex(11, ["detectable_format:json_format"])]
    plain = [ex(20, [])]
    out, info = balance_types(common + rare + plain, 4)
    count = {t: sum(t in e["instruction_ids"] for e in out) for t in info["type_counts"]}
    assert count == {"length_constraints:number_words": 5, "detectable_format:json_format": 4}
    assert info["repeats"] == {"detectable_format:json_format": 2}
    assert len({e["id"] for e in out}) == len(out)  # repeats get their own ids
    assert [e["id"] for e in out[:8]] == [e["id"] for e in common + rare + plain]
    assert balance_types(common, 0)[0] == common  # 0 = off
