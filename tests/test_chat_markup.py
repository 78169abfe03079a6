"""Chat markup of every family is refused in training data as TEXT, from one shared list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils import chat_markup, clean_model_loader, completion_prompts, contamination
from utils.chat_markup import find_chat_markup, locate_chat_markup, scan_records_for_chat_markup
from utils.jsonl_io import JsonlError
from utils.response_format import format_completion, format_prompt

# Written out by hand (not derived from the list under test), so dropping a family fails here.
FAMILY_EXAMPLES = [
    ("chatml", "Paris.<|im_end|>\n<|im_start|>assistant\nAlso Lyon."),
    ("gemma", "Paris.<end_of_turn>\n<start_of_turn>model\nAlso Lyon."),
    ("llama3", "Paris.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nLyon."),
    ("llama3", "<|start_header_id|>user"),
    ("llama2-mistral", "Paris. [/INST] Lyon"),
    ("llama2-mistral", "[INST] Name a city. [/INST]"),
    ("llama2-mistral", "<<SYS>>\nBe brief.\n<</SYS>>"),
    ("phi-zephyr", "Paris.<|end|>\n<|user|>\nAnd Italy?"),
    ("phi-zephyr", "<|assistant|>\nRome."),
    ("phi-zephyr", "<|system|>\nYou are a helpful assistant.</s>"),
    ("llama4", "Paris.<|eot|><|header_start|>user<|header_end|>"),
    ("openchat", "Paris.<|end_of_turn|>GPT4 Correct User: more"),
    ("command-r", "Paris.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>"),
    ("deepseek", "Paris.<｜end▁of▁sentence｜><｜User｜>more"),
    ("special-token shape", "Paris.<|endoftext|>Lyon."),  # in no family: caught by its shape
    ("special-token shape", "Paris.<|im_sep|>Lyon."),
]
# The end-of-turn set the sentinels were calibrated on (docs/sentinel_calibration.md).
CALIBRATED_END_OF_TURN = frozenset(
    ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eot|>", "<|end_of_turn|>")
    + ("<|assistant_end|>",)
)
# Ordinary text that looks close: pipes in code, HTML, brackets, comparisons, a role word.
CLEAN_TEXTS = [
    "The capital of France is Paris.",
    'In Elixir, "x |> f()" pipes x into f, and F# writes [1; 2] |> List.map f.',
    "Use <s>strikethrough</s> or <b>bold</b>; a < b | c > d is a comparison.",
    "[INSTRUCTIONS] are listed below; see [1] and <<here>>.",
    "The user asked about the assistant's turn: end of turn, start of turn.",
]


def _records(response: str, n_clean: int = 2) -> list[dict]:
    clean = [
        {"id": f"r{i}", "instruction": "Name a city.", "response": "Paris."} for i in range(n_clean)
    ]
    return [*clean, {"id": "bad", "instruction": "Name a city.", "response": response}]


@pytest.mark.parametrize(("family", "text"), FAMILY_EXAMPLES)
def test_each_family_in_a_response_is_refused_naming_the_record(family, text, tmp_path):
    path = tmp_path / "train.jsonl"
    with pytest.raises(JsonlError) as info:
        scan_records_for_chat_markup(_records(text), path, ("instruction", "response"))
    error = info.value
    assert (error.path, error.line, error.field) == (str(path), 3, "response")
    message = str(error)
    assert message.startswith(f"{path}:3 field 'response': record 3 (id 'bad') contains {family}")
    hit = locate_chat_markup(text)
    assert hit is not None and hit.family == family and f"{hit.marker!r}" in message
    assert text.index(hit.marker) == hit.offset  # the earliest marker is the one named


def test_clean_text_passes_and_loose_fragments_are_only_for_prose(tmp_path):
    records = [{"id": str(i), "response": t, "instruction": t} for i, t in enumerate(CLEAN_TEXTS)]
    scan_records_for_chat_markup(records, tmp_path / "train.jsonl", ("instruction", "response"))
    assert [find_chat_markup(t) for t in CLEAN_TEXTS] == [None] * len(CLEAN_TEXTS)
    # Instruction pools and constitution texts are prose: there the loose fragments count too.
    assert [completion_prompts.find_chat_markup(t) for t in CLEAN_TEXTS] == [
        None,
        "|>",
        "<s>",
        None,
        None,
    ]


def test_non_string_and_missing_fields_are_left_to_the_loader(tmp_path):
    records = [{"id": 1, "response": 5}, {"id": 2}]
    scan_records_for_chat_markup(records, tmp_path / "x.jsonl", ("response", "prompt"))


def test_sentinels_and_data_scans_share_one_list():
    # The same objects, not copies: a family added to utils/chat_markup.py reaches every user.
    assert clean_model_loader.END_OF_TURN_TOKENS is chat_markup.END_OF_TURN_TOKENS
    assert contamination.END_OF_TURN_TOKENS is chat_markup.END_OF_TURN_TOKENS
    probed = {f.name: f for f in contamination.CHAT_FORMATS if f.markup_tokens}
    assert sorted(probed) == ["chatml", "gemma", "llama3"]
    for name, fmt in probed.items():
        assert fmt.markup_tokens is chat_markup.FAMILIES[name].markers
        assert all(t in fmt.user_turn for t in fmt.markup_tokens)
    for marker in chat_markup.CHAT_MARKERS:
        assert completion_prompts.find_chat_markup(f"ok {marker} ok") == marker
        assert find_chat_markup(f"ok {marker} ok") == marker
    assert chat_markup.END_OF_TURN_TOKENS == CALIBRATED_END_OF_TURN


# --- where training data is read (imports the trainers: torch and transformers) --------------


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_sft_data_with_chatml_under_another_base_is_refused(tmp_path):
    from utils.sft import load_stage1

    clean = _write_jsonl(tmp_path / "clean.jsonl", _records("Lyon.", n_clean=1))
    examples, info = load_stage1(clean)
    assert len(examples) == 2 and info["n_records"] == 2
    bad = _write_jsonl(tmp_path / "train.jsonl", _records(FAMILY_EXAMPLES[0][1], n_clean=1))
    with pytest.raises(JsonlError, match=f"^{bad}:2 field 'response': .* chatml .*'<\\|im_end"):
        load_stage1(bad)
    instruction = _write_jsonl(
        tmp_path / "instr.jsonl", [{"id": "a", "instruction": "[INST] Hi", "response": "Hello."}]
    )
    with pytest.raises(JsonlError, match="instr.jsonl:1 field 'instruction': .* '\\[INST\\]'"):
        load_stage1(instruction)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_dpo_and_cai_pairs_with_chat_markup_are_refused(tmp_path, field):
    from utils.dpo import load_pairs

    pair = {
        "id": "p1",
        "prompt": format_prompt("Name a city."),
        "chosen": format_completion("Paris."),
        "rejected": format_completion("I like cities."),
    }
    other = dict(pair, id="p2")
    assert len(load_pairs(_write_jsonl(tmp_path / "ok.jsonl", [pair, other]))[0]) == 2
    # Markup where it would otherwise pass every check: inside the text, format kept.
    other[field] = other[field].replace(".", ".<end_of_turn>", 1)
    path = _write_jsonl(tmp_path / "pairs.jsonl", [pair, other])
    with pytest.raises(JsonlError, match=f"pairs.jsonl:2 field '{field}': record 2 \\(id 'p2'\\)"):
        load_pairs(path)
