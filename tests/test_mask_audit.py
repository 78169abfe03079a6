"""Mask audit: hand-built token rows, and TRL's own SFT preprocessing, for a tokenizer without
BOS (the real Qwen2.5 vocabulary) and one that adds BOS (a tiny byte-level BPE built here;
Gemma-3's real tokenizer in the slow test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.clean_model_loader import CleanModelLoader, derive_token_policy, encode_text
from utils.mask_audit import (
    IGNORE_INDEX,
    MaskAuditError,
    TokenRow,
    audit_rows,
    check_row,
    dpo_rows,
    expected_tokens,
    render_row,
    sft_rows,
    strip_eos,
    write_mask_audit,
)
from utils.response_format import format_prompt

PROMPT = format_prompt("Name a colour.")
BOS_CORPUS = [
    "Instruction: Name a colour.\nResponse: Red, green and blue.",
    "Instruction: List two things.\nResponse: (a) a cat, then (b) a dog - x",
    "The quick brown fox jumps over the lazy dog; 1. one 2. two",
]


def build_bos_tokenizer(out_dir: Path) -> Path:
    """A 300-token byte-level BPE whose post-processor prepends <s>, like Gemma/Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        BOS_CORPUS * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "</s>", "<s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    d = build_bos_tokenizer(tmp_path_factory.mktemp("bos-tokenizer"))
    tok, original, _, _ = CleanModelLoader().load_tokenizer(str(d))
    return tok, derive_token_policy(tok, None, original)


@pytest.fixture(scope="module")
def qwen_tok(tiny_qwen):
    return tiny_qwen.tokenizer, tiny_qwen.policy


def trl_sft_rows(tok, examples, max_length=128):
    """Rows exactly as TRL 1.16's SFTTrainer preprocesses a prompt/completion dataset."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir="unused", completion_only_loss=True, max_length=max_length,
        report_to="none", use_cpu=True, bf16=False,
    )  # fmt: skip
    bare = SFTTrainer.__new__(SFTTrainer)  # only the dataset preparation, no model
    bare._tokenizer, bare.completion_only_loss, bare.chat_template = tok, True, None
    ds = bare._prepare_dataset(Dataset.from_list(examples), tok, args, False, None, "train")
    return sft_rows(ds, tok.eos_token)


def valid_row(tok, policy, completion=" Red.", rid="x"):
    ids, n_prompt = expected_tokens(tok, policy, PROMPT, completion)
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return TokenRow(id=rid, prompt=PROMPT, completion=completion, input_ids=ids, labels=labels)


EXAMPLES = [
    {"id": "plain", "prompt": PROMPT, "completion": " Red."},
    {"id": "comma", "prompt": PROMPT, "completion": " , then"},
    {"id": "paren", "prompt": PROMPT, "completion": " (a)"},
    {"id": "list", "prompt": format_prompt("List two things."), "completion": " - x\n- y"},
]


@pytest.mark.parametrize("which", ["qwen_tok", "bos_tok"])
def test_trl_sft_tokenisation_passes_the_audit(which, request):
    tok, policy = request.getfixturevalue(which)
    rows = trl_sft_rows(tok, EXAMPLES)
    audit = audit_rows(rows, tok, policy, n_render=2, expected_ids=[e["id"] for e in EXAMPLES])
    assert audit.n_checked == 4 and len(audit.examples) == 2
    for row, ex in zip(rows, EXAMPLES, strict=True):
        prompt_ids = encode_text(tok, policy, ex["prompt"])
        ids, labels = row.input_ids, row.labels
        if policy.add_bos:  # TRL adds the BOS itself; the prompt must not get a second one
            assert ids[0] == policy.bos_token_id and ids.count(policy.bos_token_id) == 1
        else:
            assert tok.bos_token_id is None or tok.bos_token_id not in ids
            assert ids[0] == tok(ex["prompt"], add_special_tokens=False).input_ids[0]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert ids[-1] == labels[-1] == policy.eos_token_id  # EOS appended and trained
        assert ids.count(policy.eos_token_id) == 1
        assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]  # whole completion trained
        assert row.completion == ex["completion"]  # the audit strips TRL's EOS string


def test_newline_completion_merges_with_the_prompt_on_qwen(qwen_tok, bos_tok):
    """Qwen's pre-tokenizer glues ':' + '\\n' into one token: TRL then trains a token that is
    half prompt. The shared format never produces this (completions start with a space), but a
    record that did must stop the run, named."""
    tok, policy = qwen_tok
    rows = trl_sft_rows(tok, [{"id": "nl", "prompt": PROMPT, "completion": "\n- x"}])
    with pytest.raises(MaskAuditError) as e:
        audit_rows(rows, tok, policy)
    assert e.value.example_id == "nl"
    assert "prompt token" in str(e.value) and "merged" in str(e.value)
    assert (
        tok.convert_ids_to_tokens(rows[0].input_ids[len(encode_text(tok, policy, PROMPT)) - 1])
        == ":Ċ"
    )
    # The same completion is clean for a tokenizer whose pre-tokenizer splits ':' from '\n'.
    btok, bpolicy = bos_tok
    audit_rows(
        trl_sft_rows(btok, [{"id": "nl", "prompt": PROMPT, "completion": "\n- x"}]), btok, bpolicy
    )


def mutate(row, **kw):
    return TokenRow(**{**row.__dict__, **kw})


def test_each_failure_raises_naming_the_example(qwen_tok):
    tok, policy = qwen_tok
    good = valid_row(tok, policy, rid="r7")
    n_prompt = len(encode_text(tok, policy, PROMPT))
    facts = check_row(good, tok, policy)
    assert facts["n_prompt_tokens"] == n_prompt and facts["first_trained_position"] == n_prompt
    assert facts["first_trained_token"] == " Red"
    cases = {
        "fully masked": mutate(good, labels=[IGNORE_INDEX] * len(good.labels)),
        "prompt token 0": mutate(good, labels=[good.input_ids[0], *good.labels[1:]]),
        "first response token": mutate(
            good, labels=[*good.labels[:n_prompt], IGNORE_INDEX, *good.labels[n_prompt + 1 :]]
        ),
        "not the EOS": mutate(good, input_ids=good.input_ids[:-1], labels=good.labels[:-1]),
        "final EOS is not trained": mutate(good, labels=[*good.labels[:-1], IGNORE_INDEX]),
        "has label": mutate(
            good, labels=[*good.labels[:n_prompt], 7, *good.labels[n_prompt + 1 :]]
        ),
        "input ids but": mutate(good, labels=good.labels[:-1]),
        "differ from the inference path": mutate(
            good,
            input_ids=[*good.input_ids[:n_prompt], 1234, *good.input_ids[n_prompt + 1 :]],
            labels=[*good.labels[:n_prompt], 1234, *good.labels[n_prompt + 1 :]],
        ),
    }
    for needle, row in cases.items():
        with pytest.raises(MaskAuditError) as e:
            check_row(row, tok, policy)
        assert e.value.example_id == "r7" and needle in str(e.value), (needle, str(e.value))
    with pytest.raises(MaskAuditError) as e:
        audit_rows([good], tok, policy, expected_ids=["r7", "gone"])
    assert e.value.example_id == "gone" and "dropped" in str(e.value)
    with pytest.raises(MaskAuditError, match="empty"):
        audit_rows([], tok, policy)


def test_chat_control_token_in_a_response_is_caught(qwen_tok):
    tok, policy = qwen_tok
    row = valid_row(tok, policy, completion=" hi <|im_start|>assistant", rid="leak")
    assert 151644 in row.input_ids  # <|im_start|> tokenised as the control token
    with pytest.raises(MaskAuditError) as e:
        check_row(row, tok, policy)
    assert e.value.example_id == "leak" and "chat-control token id 151644" in str(e.value)


def test_double_and_missing_bos_are_caught(bos_tok):
    tok, policy = bos_tok
    good = valid_row(tok, policy, rid="b1")
    assert good.input_ids[0] == policy.bos_token_id == tok.convert_tokens_to_ids("<s>")
    check_row(good, tok, policy)
    double = mutate(
        good,
        input_ids=[policy.bos_token_id, *good.input_ids],
        labels=[IGNORE_INDEX, *good.labels],
    )
    with pytest.raises(MaskAuditError, match="exactly one BOS at position 0, found 2"):
        check_row(double, tok, policy)
    missing = mutate(good, input_ids=good.input_ids[1:], labels=good.labels[1:])
    with pytest.raises(MaskAuditError, match="found 0"):
        check_row(missing, tok, policy)


def test_render_marks_exactly_the_trained_span(qwen_tok, bos_tok):
    tok, policy = qwen_tok
    assert render_row(valid_row(tok, policy), tok) == (
        "Instruction: Name a colour.\nResponse:⟦ Red.<|endoftext|>⟧"
    )
    btok, bpolicy = bos_tok
    assert render_row(valid_row(btok, bpolicy), btok) == (
        "<s>Instruction: Name a colour.\nResponse:⟦ Red.</s>⟧"
    )


def test_audit_files(qwen_tok, tmp_path):
    tok, policy = qwen_tok
    rows = [valid_row(tok, policy, " Red.", "a"), valid_row(tok, policy, " Blue and green.", "b")]
    audit = audit_rows(rows, tok, policy, n_render=1)
    summary = write_mask_audit(tmp_path, {"train": audit}, policy)
    data = json.loads((tmp_path / "mask_audit.json").read_text())
    assert summary["passed"] and data["splits"]["train"]["n_checked"] == 2
    (ex,) = data["examples"]["train"]
    assert (
        ex["id"] == "a" and sum(t[2] for t in ex["tokens"]) == ex["n_trained"] == 3
    )  # " Red", ".", EOS
    assert [t[0] for t in ex["tokens"] if t[2]] == ["ĠRed", ".", "<|endoftext|>"]
    text = (tmp_path / "mask_audit.txt").read_text()
    assert "⟦ Red.<|endoftext|>⟧" in text and "Blue" not in text  # only the first N rendered
    assert audit.n_trained_tokens == 3 + len(tok(" Blue and green.").input_ids) + 1


def test_dpo_rows_match_the_preference_collator():
    from datasets import Dataset

    ds = Dataset.from_list(
        [
            {
                "id": "p1", "prompt": "P", "chosen": " a</s>", "rejected": " bc</s>",
                "prompt_ids": [5, 6], "chosen_ids": [7, 1], "rejected_ids": [8, 9, 1],
            }
        ]
    )  # fmt: skip
    rows = dpo_rows(ds, "</s>")
    assert [(r.id, r.completion, r.input_ids, r.labels) for r in rows] == [
        ("p1:chosen", " a", [5, 6, 7, 1], [-100, -100, 7, 1]),
        ("p1:rejected", " bc", [5, 6, 8, 9, 1], [-100, -100, 8, 9, 1]),
    ]
    cut = dpo_rows(ds, "</s>", max_length=3)
    assert cut[1].input_ids == [5, 6, 8] and cut[1].labels == [-100, -100, 8]
    with pytest.raises(ValueError, match="lacks columns"):
        dpo_rows(Dataset.from_list([{"id": 1}]), "</s>")


def test_strip_eos():
    assert strip_eos(" Red.<eos>", "<eos>") == " Red."
    assert strip_eos(" Red.", "<eos>") == " Red."
    assert strip_eos(" <eos> x", "<eos>") == " <eos> x"


@pytest.mark.slow
def test_gemma_tokenizer_through_trl_has_one_bos_and_its_eos():
    """The real embedded base tokenizer: TRL adds <bos> once, appends <eos> (id 1), and none of
    the awkward response starts breaks the prompt/completion boundary."""
    tok, original, _, _ = CleanModelLoader().load_tokenizer("gemma-3-270m")
    policy = derive_token_policy(tok, None, original)
    assert policy.add_bos and policy.bos_token_id == 2 and policy.eos_token_id == 1
    examples = [*EXAMPLES, {"id": "nl", "prompt": PROMPT, "completion": "\n- x"}]
    rows = trl_sft_rows(tok, examples)
    audit_rows(rows, tok, policy, expected_ids=[e["id"] for e in examples])
    for row in rows:
        assert row.input_ids[0] == 2 and row.input_ids.count(2) == 1
        assert row.input_ids[-1] == row.labels[-1] == 1
    assert render_row(rows[0], tok) == "<bos>Instruction: Name a colour.\nResponse:⟦ Red.<eos>⟧"
