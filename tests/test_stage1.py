"""Stage 1: list parsing, rejection accounting, exact prompts, kill-and-resume on the real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from utils.jsonl_io import read_jsonl
from utils.stage1 import Stage1Config, Stage1Generator, round_size, split_list_items

REPO = Path(__file__).resolve().parent.parent


def test_split_list_items_follows_the_numbering_and_flags_the_cut_line():
    raw = " Name a bird.\n10. Write a haiku about rain.\n11. Explain why ice fl"
    assert split_list_items(raw, 9, hit_limit=True) == [
        (" Name a bird.", True),
        ("Write a haiku about rain.", True),
        ("Explain why ice fl", False),
    ]
    # A wrong number or prose ends the list; a stop before the limit means the last line is whole.
    assert split_list_items(" A.\n12. B.\nC", 9, hit_limit=False) == [(" A.", True)]
    assert split_list_items(" A.\n10. B.", 9, hit_limit=False) == [(" A.", True), ("B.", True)]


@pytest.mark.parametrize(
    ("response", "stop", "reason"),
    [("", "eos", "empty"), ("ok then", "max_new_tokens", "hit_token_limit"),
     ("x\nResponse: y", "marker", "marker_leak"), ("a ### b", "eos", "marker_leak"), ("Fine.", "marker", None)],
)  # fmt: skip
def test_response_rejection_reasons(response, stop, reason):
    assert Stage1Generator._reject_reason(response, stop) == reason


def test_round_size_generates_only_what_the_shortfall_needs():
    assert round_size(64, 506, []) == 64  # no yield measured yet: a full round
    # default run: 3 full rounds gave 179, 398, 639 accepted (3.3 per prompt); after two
    # rounds 108 are missing: ceil(1.25 * 108 * 128 / 398) = 44 prompts, not 64.
    two = [{"id": 0, "n_prompts": 64, "n_accepted_total": 179},
           {"id": 1, "n_prompts": 64, "n_accepted_total": 398}]  # fmt: skip
    assert round_size(64, 506, two) == 44
    assert round_size(64, 5000, two) == 64  # never more than a full round
    assert round_size(64, 400, two) == 8  # at least 8 (target met: the loop stops anyway)
    assert round_size(4, 400, two) == 4
    assert round_size(64, 506, [{"id": 0, "n_prompts": 64, "n_accepted_total": 0}]) == 64


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        Stage1Config.from_dict({"n_trian": 3})


TINY = [
    "--set", "stage1.n_train=4", "--set", "stage1.n_test=2", "--set", "stage1.prompts_per_round=4",
    "--set", "stage1.batch_size=4", "--set", "stage1.use_critic=false", "--set", "sentinels.mode=off",
    "--set", "stage1.gates.min_records=1", "--set", "stage1.instruction_max_new_tokens=64",
    "--set", "stage1.response_max_new_tokens=40", "--set", "stage1.responses=true", "--no-progress",
]  # fmt: skip


def _run(out: Path, kill_when=None) -> int:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "generate_stage1_sft_data.py"),
        "--out",
        str(out),
        *TINY,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if kill_when is not None:
        deadline = time.time() + 600
        while proc.poll() is None and not kill_when() and time.time() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # no cleanup handlers: a real kill
            proc.wait()
            return -9
    out_text, _ = proc.communicate(timeout=900)
    if proc.returncode not in (0, 3):  # ok, or a QC gate failed (utils/errors.py)
        raise AssertionError(out_text[-3000:])
    return proc.returncode


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, gemma):
    out = tmp_path / "stage1"
    # Kill as soon as the first response records are on disk (mid response step).
    rc = _run(
        out,
        kill_when=lambda: (
            (out / "train.jsonl").exists() or (out / "rejected_responses.jsonl").exists()
        ),
    )
    assert rc == -9 or (out / "manifest.json").exists()
    _run(out)
    train = read_jsonl(out / "train.jsonl")
    rejected = (
        read_jsonl(out / "rejected_responses.jsonl")
        if (out / "rejected_responses.jsonl").exists()
        else []
    )
    test = read_jsonl(out / "test_instructions.jsonl")
    ids = [r["id"] for r in train]
    assert len(ids) == len(set(ids)), "duplicate records after resume"
    assert train, "no training record produced"
    assert len(test) >= 1 and not {r["id"] for r in test} & set(ids)
    instructions = {r["id"] for r in read_jsonl(out / "instructions.jsonl")}
    assert set(ids) <= instructions
    # Every train instruction has either a record or a rejection for each attempt made.
    for r in train:
        assert r["prompt"].endswith(f"Instruction: {r['instruction']}\nResponse:")
        assert r["stop_reason"] in ("marker", "eos") and r["response"]
    assert all(r["reason"] for r in rejected)
    # QC counts the types the records carry (KNOWN_BUGS #15: it read a key no record has, so
    # every default-run record was "untyped").
    qc = json.loads((out / "qc.json").read_text())["qc"]  # qc.json = {"qc": ..., "gates": ...}
    assert all(r["type"] for r in train)
    assert qc["type_counts"] == dict(sorted(Counter(r["type"] for r in train).items()))

    # The exact prompt and seed reproduce the stored completion (per-record seeding), so the
    # resumed records are the ones an uninterrupted run would have written.
    from utils.generation import DecodingConfig, generate
    from utils.response_format import RESPONSE_STOP_STRINGS

    rec = train[0]
    cfg = Stage1Config()
    dc = DecodingConfig(
        max_new_tokens=40, do_sample=True, temperature=cfg.response_temperature, top_p=cfg.response_top_p,
        stop_strings=RESPONSE_STOP_STRINGS,
    )  # fmt: skip
    again = generate(gemma, [rec["prompt"]], dc, seed=rec["seed"], progress=False)[0]
    assert again.raw_completion == rec["raw_completion"]


CHAIN = " Compose a limerick about purple giraffes wearing hats"


def build_chain_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Qwen2 whose next token depends only on the current one (attention and MLP
    outputs zeroed): after any token outside ``CHAIN`` it writes CHAIN, then a newline. Its
    Yes/No logits are equal, so the instruction critic scores every instruction 0.5."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), eos_token="<|endoftext|>")
    chain = tok.encode(CHAIN, add_special_tokens=False) + tok.encode("\n", add_special_tokens=False)
    assert len(set(chain)) == len(chain)  # a repeated token would loop
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # every token outside the chain -> the chain's first token
        head.zero_()
        head[chain[0], 0] = 50.0
        for i, (cur, nxt) in enumerate(zip(chain, chain[1:], strict=False), start=1):
            emb[cur] = 0.0
            emb[cur, i] = 1.0
            head[nxt, i] = 50.0
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory, qwen_tokenizer_dir):
    from utils.clean_model_loader import CleanModelLoader

    return CleanModelLoader().load(
        str(build_chain_model(tmp_path_factory.mktemp("chain-qwen2"), qwen_tokenizer_dir))
    )


@pytest.mark.parametrize("min_score, kept", [(0.0, True), (1.0, False)])
def test_run_stage1_judges_instructions_with_the_critic_config_it_is_given(
    chain_model, tmp_path, min_score, kept
):
    """Regression (KNOWN_BUGS #13): the script passed its critic config, run_stage1 did not
    accept it (TypeError at the start of every stage-1 run). The critic scores the one new
    instruction 0.5: kept under min_instruction_score 0 and rejected under 1 only if the config
    given here is the one the critic uses (the default, 0.62, would reject it both times)."""
    from utils.critic import CriticConfig
    from utils.stage1 import run_stage1

    earlier = ["List three uses of copper.", "Explain why the sky looks blue.",
               "Write a haiku about autumn rain."]  # fmt: skip
    (tmp_path / "instructions.jsonl").write_text(  # resumed: one more instruction is needed
        "".join(json.dumps({"id": f"e{i}", "instruction": t, "type": "open_qa"}) + "\n"
                for i, t in enumerate(earlier))
    )  # fmt: skip
    cfg = Stage1Config(
        n_train=3, n_test=1, instruction_overshoot=0.0, prompts_per_round=1, max_rounds=1,
        instruction_max_new_tokens=16, responses=False, batch_size=1, gates={"min_records": 1},
    )  # fmt: skip
    critic = CriticConfig(min_instruction_score=min_score)
    summary = run_stage1(chain_model, cfg, tmp_path, progress=False, critic_cfg=critic)
    new = [r for r in read_jsonl(tmp_path / "instructions.jsonl") if r["id"] not in
           {"e0", "e1", "e2"}]  # fmt: skip
    rejected = read_jsonl(tmp_path / "rejected_instructions.jsonl")
    judged = (new if kept else rejected)[0]
    assert judged["critic"]["score"] == pytest.approx(0.5) and judged["critic"]["accepted"] is kept
    assert (len(new), [r["reason"] for r in rejected]) == (
        (1, []) if kept else (0, ["critic_rejected"])
    )  # fmt: skip
    assert summary["counts"]["instructions_accepted"] == 3 + kept
