"""The eval set: determinism, balance, no conflicts, valid answers pass, ICL demos held out."""

from __future__ import annotations

import json
import re

import pytest

from utils import eval_prompts as ep
from utils import verifiable_checks as vc
from utils.response_format import format_few_shot_prompt, marker_leaked


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return ep.build_eval_set()


def _valid_response(type_id: str, kwargs: dict) -> str | None:
    """A hand-constructed answer that follows one instruction (None: not constructed)."""
    base = "The answer is here and it is short"
    if type_id == "length_constraints:number_words":
        n = kwargs["num_words"] - (1 if kwargs["relation"] == "less than" else 0)
        return " ".join(["word"] * n)
    if type_id == "length_constraints:number_sentences":
        n = kwargs["num_sentences"]
        return " ".join(f"Sentence number {i} is here." for i in range(n))
    if type_id == "length_constraints:number_paragraphs":
        return "\n\n".join(f"Paragraph {i}." for i in range(kwargs["num_paragraphs"]))
    if type_id == "length_constraints:one_word":
        return "Blue."
    if type_id == "change_case:english_capital":
        return base.upper() + "."
    if type_id == "change_case:english_lowercase":
        return base.lower() + "."
    if type_id == "keywords:existence":
        return base + " with " + " and ".join(kwargs["keywords"]) + "."
    if type_id == "keywords:forbidden_words":
        return "Calm blue waves roll in."
    if type_id == "detectable_format:number_bullet_lists":
        return "\n".join(f"* point {i}" for i in range(kwargs["num_bullets"]))
    if type_id == "detectable_format:json_format":
        return "```json\n" + json.dumps({k: "x" for k in kwargs["keys"]}) + "\n```"
    if type_id == "detectable_format:number_highlighted_sections":
        return " ".join(f"*part {i}*" for i in range(kwargs["num_highlights"]))
    if type_id == "detectable_format:title":
        return "<<Short Title>>\n" + base + "."
    if type_id == "detectable_content:number_placeholders":
        return " ".join(f"[slot{i}]" for i in range(kwargs["num_placeholders"]))
    if type_id == "detectable_content:postscript":
        return base + ".\n" + kwargs["postscript_marker"] + " One more thing."
    if type_id == "startend:start_checker":
        return kwargs["start_phrase"] + " " + base + "."
    if type_id == "startend:end_checker":
        return base + ". " + kwargs["end_phrase"]
    if type_id == "startend:quotation":
        return '"' + base + '."'
    if type_id == "punctuation:no_comma":
        return base + "."
    if type_id == "combination:repeat_prompt":
        return kwargs["prompt_to_repeat"] + " " + base + "."
    return None


def test_default_size_and_record_shape(records):
    assert len(records) == ep.DEFAULT_N == 320
    for r in records:
        assert set(r) == {"id", "prompt", "instruction_ids", "kwargs", "type"}
        assert r["type"] == r["instruction_ids"][0]
        assert len(r["instruction_ids"]) == len(r["kwargs"]) in (1, 2)
        assert re.fullmatch(r"ve-[0-9a-f]{16}", r["id"])
        assert any(r["prompt"].startswith(task + " ") for task in ep.TASKS)
        assert "\n" not in r["prompt"]
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["prompt"] for r in records}) == len(records)
    n_pairs = sum(len(r["instruction_ids"]) == 2 for r in records)
    assert 0.2 * len(records) < n_pairs < 0.5 * len(records)  # "sometimes 2"


def test_prompt_text_is_task_plus_described_constraints(records):
    for r in records[:40]:
        for type_id, kwargs in zip(r["instruction_ids"], r["kwargs"], strict=True):
            phrasings = [
                vc.describe(type_id, kwargs, i)
                for i in range(len(vc.INSTRUCTION_TYPES[type_id].templates))
            ]
            assert any(p in r["prompt"] for p in phrasings), (r["prompt"], type_id)


def test_deterministic_and_hash(records):
    again = ep.build_eval_set()
    assert again == records
    assert ep.prompt_set_hash(again) == ep.prompt_set_hash(records)
    # The hash is of canonical JSON: a JSON round trip (as from a JSONL file) keeps it.
    assert ep.prompt_set_hash(json.loads(json.dumps(records))) == ep.prompt_set_hash(records)
    other = ep.build_eval_set(seed=99)
    assert other != records
    assert ep.prompt_set_hash(other) != ep.prompt_set_hash(records)
    changed = [dict(r) for r in records]
    changed[5]["prompt"] += " "
    assert ep.prompt_set_hash(changed) != ep.prompt_set_hash(records)
    # Ids are content hashes: a shorter set from the same seed shares its first records.
    assert ep.build_eval_set(n=30) == records[:30]


def test_type_balance(records):
    counts = ep.type_counts(records)
    assert set(counts) == set(vc.INSTRUCTION_TYPES)
    assert min(counts.values()) >= 20, counts
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    for seed in (1, 2):
        assert min(ep.type_counts(ep.build_eval_set(seed=seed)).values()) >= 20


def test_no_conflicting_pairs(records):
    for r in records:
        ids = r["instruction_ids"]
        assert vc.compatible(ids), ids
        if len(ids) == 2:
            assert frozenset(ids) not in vc.CONFLICTS
        if set(ids) & vc.EXCLUSIVE_TYPES:
            assert len(ids) == 1


def test_sampled_words_are_not_in_the_task(records):
    for r in records:
        task = next(t for t in ep.TASKS if r["prompt"].startswith(t + " "))
        for type_id, kwargs in zip(r["instruction_ids"], r["kwargs"], strict=True):
            for word in kwargs.get("keywords", []) + kwargs.get("forbidden_words", []):
                assert not re.search(rf"\b{word}\b", task, flags=re.IGNORECASE), (task, word)
            if type_id == "combination:repeat_prompt":
                assert kwargs["prompt_to_repeat"] == task


def test_constructed_valid_responses_pass(records):
    singles = [r for r in records if len(r["instruction_ids"]) == 1]
    covered = set()
    for r in singles:
        response = _valid_response(r["type"], r["kwargs"][0])
        assert response is not None
        scored = ep.score_response(r, response)
        assert scored["prompt_strict"] and scored["prompt_loose"], (r["prompt"], response)
        covered.add(r["type"])
    assert len(covered) >= 12


def test_score_response_fields_and_failures(records):
    record = next(r for r in records if r["type"] == "change_case:english_lowercase")
    scored = ep.score_response(record, "Sure!\nthe sea is calm.")
    assert scored["id"] == record["id"]
    assert scored["instruction_ids"] == record["instruction_ids"]
    assert scored["instruction_strict"][0] is False
    assert scored["instruction_loose"][0] is True
    assert scored["prompt_strict"] is False
    pair = {
        "id": "x",
        "prompt": "p",
        "instruction_ids": ["change_case:english_lowercase", "punctuation:no_comma"],
        "kwargs": [{}, {}],
    }
    scored = ep.score_response(pair, "the sea, calm.")
    assert scored["instruction_strict"] == [True, False]
    assert scored["prompt_strict"] is False and scored["prompt_loose"] is False
    assert ep.score_response(pair, "the sea is calm.")["prompt_strict"] is True


def test_bad_records_and_sizes_raise():
    with pytest.raises(ValueError, match="lacks field 'kwargs'"):
        ep.score_response({"id": "a", "prompt": "p", "instruction_ids": []}, "x")
    with pytest.raises(ValueError, match="conflicting instructions"):
        ep.score_response(
            {
                "id": "a",
                "prompt": "p",
                "instruction_ids": ["change_case:english_lowercase", "change_case:english_capital"],
                "kwargs": [{}, {}],
            },
            "x",
        )
    with pytest.raises(ValueError, match="equal length"):
        ep.score_response(
            {"id": "a", "prompt": "p", "instruction_ids": ["punctuation:no_comma"], "kwargs": []},
            "x",
        )
    with pytest.raises(ValueError, match="n must be a positive int"):
        ep.build_eval_set(n=0)


def test_task_pool():
    assert len(ep.TASKS) >= 60
    assert len(set(ep.TASKS)) == len(ep.TASKS)
    for task in ep.TASKS:
        assert "," not in task and task.endswith(".")


def test_icl_examples_follow_their_constraints():
    examples = ep.icl_examples()
    assert 6 <= len(examples) <= 12
    assert [e[0] for e in examples] == [r["instruction"] for r in ep.ICL_RECORDS]
    for rec in ep.ICL_RECORDS:
        assert vc.compatible(rec["instruction_ids"])
        assert all(vc.evaluate_strict(rec["instruction_ids"], rec["kwargs"], rec["response"]))
        assert rec["instruction"].startswith(rec["task"] + " ")
        assert not marker_leaked(rec["response"])
    assert format_few_shot_prompt(examples, "Describe the ocean.").count("Instruction:") == 10


def test_icl_examples_are_held_out_from_the_eval_set(records):
    icl_instructions = {r["instruction"] for r in ep.ICL_RECORDS}
    for seed in (ep.DEFAULT_SEED, 7):
        prompts = {r["prompt"] for r in ep.build_eval_set(seed=seed)}
        assert not icl_instructions & prompts
    assert not {r["task"] for r in ep.ICL_RECORDS} & set(ep.TASKS)
    # Constraint values: no ICL (type, kwargs) with parameters occurs in the eval set.
    eval_pairs = {
        (t, json.dumps(kw, sort_keys=True))
        for r in records
        for t, kw in zip(r["instruction_ids"], r["kwargs"], strict=True)
    }
    for rec in ep.ICL_RECORDS:
        for t, kw in zip(rec["instruction_ids"], rec["kwargs"], strict=True):
            if kw:
                assert (t, json.dumps(kw, sort_keys=True)) not in eval_pairs, (t, kw)
