"""Completion-style prompts for stage-1 data: pools, list prompts, parsing, response prompts."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from utils import completion_prompts as cp
from utils.eval_prompts import ICL_RECORDS, TASKS
from utils.jsonl_io import JsonlError
from utils.response_format import RESPONSE_STOP_STRINGS


@pytest.fixture(scope="module")
def seeds():
    return cp.load_seed_instructions()


@pytest.fixture(scope="module")
def examples():
    return cp.load_response_examples()


# --------------------------------------------------------------------------------------------
# Pools.


def test_pools_load_with_counts_and_type_coverage(seeds, examples):
    assert len(seeds) >= 120
    assert len(examples) >= 40
    seed_types = Counter(s["type"] for s in seeds)
    example_types = Counter(e["type"] for e in examples)
    assert len(seed_types) >= 12 and len(example_types) >= 12
    # Every known type can be a diversity target (half of 8 items) and a same-type demo
    # remains when one example equals the target.
    assert {t: n for t, n in seed_types.items() if n < 4} == {}
    assert set(seed_types) == set(cp.KNOWN_TYPES)
    assert {t: n for t, n in example_types.items() if n < 2} == {}
    assert set(example_types) == set(cp.KNOWN_TYPES)
    assert set(cp.FORMAT_CHECK_IDS) == set(cp.FORMAT_TYPES)


def test_pool_texts_are_short_and_single_line(seeds, examples):
    for r in seeds + examples:
        # A repeat-the-request demonstration carries the constraint library's own training
        # phrasing (about 20 words) after its task: the task is what must be short.
        repeat = [c["kwargs"]["prompt_to_repeat"] for c in r.get("checks") or []
                  if c["id"] == "combination:repeat_prompt"]  # fmt: skip
        assert len((repeat[0] if repeat else r["instruction"]).split()) <= 25, r["instruction"]
        assert "\n" not in r["instruction"]
    for e in examples:
        assert len(e["response"].split()) <= 50, e["response"]
    # Seeds and examples are distinct, so a seed target never loses its own demo type.
    assert not {s["id"] for s in seeds} & {e["id"] for e in examples}
    assert len({r["id"] for r in seeds}) == len(seeds)


def test_pools_avoid_eval_tasks_and_icl_demos(seeds, examples):
    texts = [r["instruction"].casefold() for r in seeds + examples]
    texts += [e["response"].casefold() for e in examples]
    for task in TASKS:
        key = task.rstrip(".").casefold()
        assert not [t for t in texts if key in t], task
    icl = {r["instruction"].casefold() for r in ICL_RECORDS} | {
        r["task"].rstrip(".").casefold() for r in ICL_RECORDS
    }
    assert not [t for t in texts if any(k in t for k in icl)]
    for topic in ("ocean", "sky is blue", "new student"):
        assert not [t for t in texts if topic in t], topic


def _number(text: str) -> int:
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    m = re.search(r"\b(\d+|one|two|three|four|five)\b", text)
    assert m, text
    return int(m.group(1)) if m.group(1).isdigit() else words[m.group(1)]


def _quoted(text: str) -> list[str]:
    return re.findall(r'"([^"]+)"', text)


def _bullets_ok(i: str, r: str) -> bool:
    lines = [line for line in r.splitlines() if line.strip()]
    return all(line.startswith("- ") for line in lines) and len(lines) == _number(i)


def _word_limit_ok(i: str, r: str) -> bool:
    n, words = _number(i), len(r.split())
    return words < n if "fewer than" in i else words <= n


def _sentences_ok(i: str, r: str) -> bool:
    n = len(re.findall(r"[.!?](?:\s|$)", r))
    return n == _number(i) if "exactly" in i else n <= _number(i)


# Simple code per format type, independent of utils.verifiable_checks: the instruction text
# itself (numbers, quoted phrases) says what the response must satisfy.
SIMPLE_CHECKS = {
    "format_lowercase": lambda i, r: r == r.lower() and any(c.isalpha() for c in r),
    "format_uppercase": lambda i, r: r == r.upper() and any(c.isalpha() for c in r),
    "format_bullets": _bullets_ok,
    "format_one_word": lambda i, r: len(r.strip(".!").split()) == 1,
    "format_word_limit": _word_limit_ok,
    "format_sentence_count": _sentences_ok,
    "format_paragraphs": lambda i, r: len(re.split(r"\n\s*\n|\n\*\*\*\n", r)) == _number(i),
    "format_start_with": lambda i, r: r.startswith(_quoted(i)[0]),
    "format_end_with": lambda i, r: r.endswith(_quoted(i)[0]),
    "format_json": lambda i, r: set(json.loads(r)) == set(_quoted(i)),
    "format_no_comma": lambda i, r: "," not in r,
    "format_keywords": lambda i, r: all(k in r for k in _quoted(i)),
    "format_forbidden_word": lambda i, r: _quoted(i)[0] not in re.findall(r"\w+", r.lower()),
    "format_quotation": lambda i, r: r.startswith('"') and r.endswith('"') and len(r) > 2,
    "format_title": lambda i, r: re.match(r"<<[^<>\n]+>>\n", r) is not None,
    "format_placeholders": lambda i, r: len(re.findall(r"\[[^\]]+\]", r)) >= 2,
    "format_postscript": lambda i, r: any(line.startswith("P.S. ") for line in r.splitlines()),
    "format_highlights": lambda i, r: len(re.findall(r"\*[^*\n]+\*", r)) >= _number(i),
}


def test_every_format_example_follows_its_own_instruction(examples):
    assert set(SIMPLE_CHECKS) == set(cp.FORMAT_TYPES)
    checked = 0
    for e in examples:
        if e["type"] in cp.FORMAT_TYPES:
            assert SIMPLE_CHECKS[e["type"]](e["instruction"], e["response"]), e
            # The evaluation's checker for the type is declared (and was run by the loader).
            assert cp.FORMAT_CHECK_IDS[e["type"]] in [c["id"] for c in e["checks"]], e
            checked += 1
    assert checked == sum(1 for e in examples if e["type"] in cp.FORMAT_TYPES) >= 36


def test_simple_checks_can_fail():
    assert not SIMPLE_CHECKS["format_lowercase"]("x", "Hello there.")
    assert not SIMPLE_CHECKS["format_bullets"]("Give three tips as bullets.", "- a\n- b")
    assert not SIMPLE_CHECKS["format_one_word"]("x", "Two words")
    assert not SIMPLE_CHECKS["format_word_limit"]("in fewer than 3 words", "one two three")
    assert not SIMPLE_CHECKS["format_json"]('keys "a" and "b"', '{"a": 1}')


def test_infer_format_type_matches_every_pool_type(seeds, examples):
    for r in seeds + examples:
        expected = r["type"] if r["type"] in cp.FORMAT_TYPES else None
        assert cp.infer_format_type(r["instruction"]) == expected, r


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("Explain tides using no capital letters.", "format_lowercase"),
        ("Write a motto in capital letters.", "format_uppercase"),
        ("Name a river. One word only.", "format_one_word"),
        ("Describe rust in under 20 words.", "format_word_limit"),
        ('Describe a goat without using the word "horn".', "format_forbidden_word"),
        ('Describe a goat and include the words "horn" and "hay".', "format_keywords"),
        ("Explain gravity to a child.", None),
        ("Name a fruit that starts with B.", None),
    ],
)
def test_infer_format_type_cases(instruction, expected):
    assert cp.infer_format_type(instruction) == expected


# --------------------------------------------------------------------------------------------
# Pool validation errors name file and line.


def _write(tmp_path, lines):
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "Name a red fruit.", "type": "open_qa"})


def test_bad_json_on_line_3_names_file_and_line(tmp_path):
    path = _write(
        tmp_path, [GOOD, json.dumps({"instruction": "Name a bird.", "type": "open_qa"}), "{oops"]
    )
    with pytest.raises(JsonlError, match=re.escape(f"{path}:3")) as err:
        cp.load_pool(path)
    assert err.value.line == 3


def test_missing_field_names_file_line_and_field(tmp_path):
    path = _write(tmp_path, [GOOD, json.dumps({"instruction": "Name a bird."})])
    with pytest.raises(JsonlError, match=re.escape(f"{path}:2 field 'type'")):
        cp.load_pool(path)
    path = _write(tmp_path, [json.dumps({"instruction": "Name a bird.", "type": "open_qa"})])
    with pytest.raises(JsonlError, match=re.escape(f"{path}:1 field 'response'")):
        cp.load_pool(path, require_response=True)


@pytest.mark.parametrize(
    "record, field, message",
    [
        (
            {"instruction": "<start_of_turn>user Name a bird.", "type": "open_qa"},
            "instruction",
            "chat markup",
        ),
        (
            {"instruction": "[INST] Name a bird. [/INST]", "type": "open_qa"},
            "instruction",
            "chat markup",
        ),
        (
            {"instruction": "Name a bird.<|im_end|>", "type": "open_qa"},
            "instruction",
            "chat markup",
        ),
        (
            {"instruction": "Instruction: Name a bird.", "type": "open_qa"},
            "instruction",
            "scaffolding",
        ),
        (
            {"instruction": "Name a bird.", "type": "open_qa", "response": "Robin.\nUser: more"},
            "response",
            "scaffolding",
        ),
        (
            {"instruction": "Name a bird.", "type": "open_qa", "response": "<s>Robin"},
            "response",
            "chat markup",
        ),
        ({"instruction": "Name a bird.", "type": "trivia"}, "type", "unknown type"),
        ({"instruction": "  ", "type": "open_qa"}, "instruction", "non-empty"),
        (
            {"instruction": "Name a bird.", "type": "open_qa", "response": ""},
            "response",
            "non-empty",
        ),
        ({"instruction": "Name\na bird.", "type": "open_qa"}, "instruction", "single line"),
        (
            {"instruction": "Name a bird.", "type": "open_qa", "respons": "Robin"},
            "respons",
            "unknown field",
        ),
        (
            {
                "instruction": "Name a bird in lowercase.",
                "type": "format_lowercase",
                "response": "Robin",
                "checks": [{"id": "change_case:english_lowercase", "kwargs": {}}],
            },
            "checks",
            "fails its own check",
        ),
        (
            {
                "instruction": "Name a bird.",
                "type": "open_qa",
                "response": "robin",
                "checks": [{"id": "no_such_check", "kwargs": {}}],
            },
            "checks",
            "unknown check id",
        ),
    ],
)
def test_invalid_records_name_file_line_and_field(tmp_path, record, field, message):
    # A blank line before the bad record: the error counts file lines, not records.
    path = _write(tmp_path, [GOOD, "", json.dumps(record)])
    with pytest.raises(JsonlError, match=re.escape(f"{path}:3 field '{field}'") + ".*" + message):
        cp.load_pool(path)


def test_duplicate_instruction_names_both_lines(tmp_path):
    dup = json.dumps({"instruction": "name a  RED fruit.", "type": "open_qa"})
    path = _write(tmp_path, [GOOD, dup])
    with pytest.raises(JsonlError, match=r":2 field 'instruction'.*first on line 1"):
        cp.load_pool(path)


def test_empty_pool_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="pool is empty"):
        cp.load_pool(path)


def test_example_id_is_sha1_prefix_of_stripped_instruction():
    # sha1("abc") = a9993e364706816aba3e25717850c26c9cd0d89d
    assert cp.example_id({"instruction": " abc\n"}) == "a9993e3647"


def test_stop_strings():
    assert cp.INSTRUCTION_STOP_STRINGS == ("\n",)
    assert cp.RESPONSE_STOP_STRINGS is RESPONSE_STOP_STRINGS


# --------------------------------------------------------------------------------------------
# Instruction-list prompts.


def test_instruction_list_prompt_structure_and_determinism(seeds):
    prompt, ids = cp.instruction_list_prompt(seeds, random.Random(7), n_examples=5)
    lines = prompt.split("\n")
    assert lines[0] == cp.DEFAULT_LIST_HEADER
    assert lines[-1] == "6." and not prompt.endswith(" ")
    by_id = {s["id"]: s["instruction"] for s in seeds}
    assert lines[1:6] == [f"{n}. {by_id[i]}" for n, i in enumerate(ids, start=1)]
    assert len(set(ids)) == 5
    assert cp.instruction_list_prompt(seeds, random.Random(7), n_examples=5) == (prompt, ids)
    assert cp.instruction_list_prompt(seeds, random.Random(8), n_examples=5)[0] != prompt
    assert cp.find_chat_markup(prompt) is None and cp.find_scaffolding(prompt) is None


def test_instruction_list_prompt_default_and_custom_header(seeds):
    prompt, ids = cp.instruction_list_prompt(seeds, random.Random(0))
    assert prompt.endswith("\n8. " + {s["id"]: s["instruction"] for s in seeds}[ids[-1]] + "\n9.")
    prompt, _ = cp.instruction_list_prompt(seeds, random.Random(0), 2, header="Things to do:")
    assert prompt.startswith("Things to do:\n1. ") and prompt.endswith("\n3.")
    with pytest.raises(ValueError, match="n_examples"):
        cp.instruction_list_prompt(seeds[:3], random.Random(0), n_examples=4)
    with pytest.raises(ValueError, match="n_examples"):
        cp.instruction_list_prompt(seeds, random.Random(0), n_examples=0)


def test_rotate_categories_cycles():
    types = ("a", "b", "c")
    assert [cp.rotate_categories(types, i) for i in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    with pytest.raises(ValueError):
        cp.rotate_categories((), 0)


def test_diversity_prompt_mixes_recent_and_category_seeds(seeds):
    recent = [{"instruction": f"Write a riddle about item number {n}."} for n in range(60)]
    prompt, info = cp.diversity_prompt(recent, seeds, random.Random(3), "format_json")
    lines = prompt.split("\n")
    assert lines[0] == cp.category_header("format_json")
    assert "answers given as a JSON object" in lines[0]
    assert lines[-1] == "9." and info["open_number"] == 9
    by_id = {s["id"]: s for s in seeds}
    # The 4 category seeds come last, nearest the open number.
    assert len(info["category_seed_ids"]) == 4
    assert info["item_ids"][-4:] == info["category_seed_ids"]
    assert all(by_id[i]["type"] == "format_json" for i in info["category_seed_ids"])
    # Two recent items, from the last 50 only (item numbers 10..59).
    assert len(info["recent_ids"]) == 2
    recent_lines = [ln for ln in lines[1:-1] if "riddle about item number" in ln]
    assert len(recent_lines) == 2
    assert all(int(re.search(r"number (\d+)", ln).group(1)) >= 10 for ln in recent_lines)
    others = [i for i in info["seed_ids"] if i not in info["category_seed_ids"]]
    assert len(others) == 2 and all(by_id[i]["type"] != "format_json" for i in others)
    assert len(set(info["item_ids"])) == 8
    assert cp.diversity_prompt(recent, seeds, random.Random(3), "format_json") == (prompt, info)
    assert cp.find_chat_markup(prompt) is None


def test_diversity_prompt_without_recent_and_errors(seeds):
    prompt, info = cp.diversity_prompt([], seeds, random.Random(0), "math_word", n_examples=6)
    assert prompt.endswith("\n7.") and info["recent_ids"] == []
    assert len(info["category_seed_ids"]) == 3 and len(info["seed_ids"]) == 6
    with pytest.raises(ValueError, match="unknown category"):
        cp.diversity_prompt([], seeds, random.Random(0), "poetry")
    with pytest.raises(ValueError, match="no seed of category"):
        cp.diversity_prompt(
            [], [s for s in seeds if s["type"] != "advice"], random.Random(0), "advice"
        )
    with pytest.raises(ValueError, match=r"recent_accepted\[1\]"):
        cp.diversity_prompt(
            [{"instruction": "ok"}, {"text": "x"}], seeds, random.Random(0), "advice"
        )


# --------------------------------------------------------------------------------------------
# Parsing continuations.


@pytest.mark.parametrize(
    "completion, stopped, text, reason",
    [
        (" Name three kinds of cheese.\n", True, "Name three kinds of cheese.", "ok"),
        (" Name three  kinds of cheese.", True, "Name three kinds of cheese.", "ok"),
        (" List four uses for string\n10. Write", False, "List four uses for string", "ok"),
        (" How does the weather", True, "How does the weather", "ok"),
        (" How does the weather", False, None, "truncated"),
        (' Start your answer with "Yes."', False, 'Start your answer with "Yes."', "ok"),
        (" Why do cats purr?", False, "Why do cats purr?", "ok"),
        ("", True, None, "empty"),
        ("  \n10. Name a dog.", True, None, "empty"),
        (" 10. Name a dog breed.", True, None, "starts_number"),
        ("9) Name a dog breed.", True, None, "starts_number"),
        (" Name a dog.<end_of_turn>", True, None, "chat_markup"),
        (" Name a dog.\n<|im_start|>assistant", True, None, "chat_markup"),
        (" Instruction: Name a dog breed.", True, None, "scaffolding"),
        (" Name a dog breed. Response: Poodle.", True, None, "scaffolding"),
        (" User: name a dog breed please", True, None, "scaffolding"),
        (" Summarize the following paragraph:", True, None, "needs_input"),
        (" Be kind.", True, None, "too_short"),
        (" " + " ".join(["word"] * 40) + ".", True, " ".join(["word"] * 40) + ".", "ok"),
        (" " + " ".join(["word"] * 41) + ".", True, None, "too_long"),
    ],
)
def test_parse_instruction_continuation(completion, stopped, text, reason):
    parsed = cp.parse_instruction_continuation(completion, stopped_at_newline=stopped)
    assert parsed == cp.ParsedInstruction(text, reason)
    assert parsed.ok is (text is not None)
    assert parsed.reason in cp.PARSE_REASONS


# --------------------------------------------------------------------------------------------
# Response prompts.


def test_response_prompt_format_and_determinism(examples):
    target = "Describe a horse in all lowercase letters."
    prompt, ids = cp.response_prompt(target, examples, random.Random(5))
    assert prompt.startswith("Instruction: ") and prompt.endswith(
        f"Instruction: {target}\nResponse:"
    )
    assert prompt.count("Instruction: ") == 4 and len(ids) == 3
    by_id = {e["id"]: e for e in examples}
    blocks = prompt.split("\n\n")
    for block, i in zip(blocks[:3], ids, strict=True):
        assert block == f"Instruction: {by_id[i]['instruction']}\nResponse: {by_id[i]['response']}"
    # One lowercase demonstration, placed last.
    assert by_id[ids[-1]]["type"] == "format_lowercase"
    assert cp.response_prompt(target, examples, random.Random(5)) == (prompt, ids)
    assert cp.find_chat_markup(prompt) is None


def test_response_prompt_never_shows_the_target(examples):
    for n, e in enumerate(examples):
        for k in (3, 4):
            target = "  " + e["instruction"].upper() if n % 2 else e["instruction"]
            prompt, ids = cp.response_prompt(target, examples, random.Random(n * 10 + k), k=k)
            assert e["id"] not in ids and len(set(ids)) == k
            assert prompt.count(e["instruction"]) <= 1  # only as the open target
            # The type's other demonstration stands in for it.
            if e["type"] in cp.FORMAT_TYPES:
                assert {x["id"]: x for x in examples}[ids[-1]]["type"] == e["type"]


def test_response_prompt_explicit_type_and_errors(examples):
    _, ids = cp.response_prompt("Who painted this?", examples, random.Random(1), 4, "definition")
    assert {e["id"]: e for e in examples}[ids[-1]]["type"] == "definition" and len(ids) == 4
    with pytest.raises(ValueError, match="k=5"):
        cp.response_prompt("Who painted this?", examples[:4], random.Random(0), k=5)
    with pytest.raises(ValueError, match="k=3 but only 2"):
        cp.response_prompt(examples[0]["instruction"], examples[:3], random.Random(0))
    with pytest.raises(ValueError, match="unknown instruction_type"):
        cp.response_prompt("Who painted this?", examples, random.Random(0), 3, "poetry")
    with pytest.raises(ValueError, match="empty"):
        cp.response_prompt(" ", examples, random.Random(0))
