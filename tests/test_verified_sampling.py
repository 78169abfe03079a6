"""The constraint library, the type split, augmentation, checker-labelled keeps and pairs, the
held-out protocol, and kill/resume of the rejection-sampling stage (tiny model)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from utils import instruction_checkers as ic
from utils import verifiable_checks as vc
from utils.config import load_config
from utils.constraint_library import (
    FAMILIES,
    LIBRARY,
    TRAIN_END_PHRASES,
    TRAIN_FORBIDDEN_WORDS,
    TRAIN_JSON_KEY_SETS,
    TRAIN_KEYWORDS,
    TRAIN_START_PHRASES,
    SplitError,
    TypeSplit,
    augment,
    constrain_tasks,
    constraints_from_config,
    eval_phrasing_match,
    render,
    training_record_problems,
)
from utils.eval_prompts import build_eval_set
from utils.jsonl_io import read_jsonl
from utils.verified_sampling import (
    VerifiedConfig,
    allowed_demos,
    decide,
    fewshot_demos,
    pair_records,
    sampling_stats,
    sft_record,
)

SPLIT, MIX, SEED = constraints_from_config(load_config()["constraints"])


def test_every_type_has_family_three_phrasings_sampler_and_checker():
    assert set(LIBRARY) == set(vc.INSTRUCTION_TYPES) == set(FAMILIES)
    rng = random.Random(0)
    for t, c in LIBRARY.items():
        assert len(c.phrasings) >= 3, t
        assert callable(c.checker)
        kw = c.sample_train(rng, "Describe a lighthouse.")
        render(c.train_phrasings[0], kw)  # every field of the phrasing is sampled


def test_default_split_holds_out_a_third_with_every_family_on_both_sides():
    assert 3 * len(SPLIT.held_out) >= len(LIBRARY)
    assert not set(SPLIT.held_out) & set(SPLIT.train)
    for family in set(FAMILIES.values()):
        members = {t for t, f in FAMILIES.items() if f == family}
        if len(members) >= 2:
            assert members & set(SPLIT.train) and members & set(SPLIT.held_out), family


@pytest.mark.parametrize(
    "held_out, message",
    [
        (["change_case:english_capital"], "at least a third"),
        (["nope:type"], "unknown types"),
        (
            [  # both case types held out: the family has no training type
                "change_case:english_capital", "change_case:english_lowercase",
                "keywords:forbidden_words", "length_constraints:number_sentences",
                "detectable_format:title", "detectable_content:postscript", "startend:quotation",
            ],
            "family 'case'",
        ),
    ],
)  # fmt: skip
def test_split_refuses_bad_declarations(held_out, message):
    with pytest.raises(SplitError, match=message):
        TypeSplit.from_held_out(held_out)


def test_no_training_phrasing_matches_an_evaluation_phrasing_and_eval_ones_do():
    rng = random.Random(1)
    tasks = ["Describe a lighthouse.", "Name three fruits.", "Explain what rust is."]
    for t, c in LIBRARY.items():
        for phrasing in c.train_phrasings:
            for task in tasks:
                for _ in range(20):
                    text = f"{task} {render(phrasing, c.sample_train(rng, task))}"
                    assert eval_phrasing_match(text) is None, (t, text)
        for phrasing in c.eval_phrasings:
            assert eval_phrasing_match(render(phrasing, c.sample_eval(rng, tasks[0]))), phrasing


def test_training_values_are_disjoint_from_the_evaluation_pools():
    assert not set(TRAIN_KEYWORDS) & set(vc.KEYWORDS)
    assert not set(TRAIN_FORBIDDEN_WORDS) & set(vc.FORBIDDEN_WORDS)
    assert not set(TRAIN_START_PHRASES) & set(vc.START_PHRASES)
    assert not set(TRAIN_END_PHRASES) & set(vc.END_PHRASES)
    assert not set(TRAIN_JSON_KEY_SETS) & set(vc.JSON_KEY_SETS)


def test_augment_draws_train_types_only_in_the_configured_mix():
    rng = random.Random(0)
    n = Counter()
    for k in range(2000):
        rec = augment(f"Describe object number {k}.", SPLIT, MIX, rng)
        n[len(rec["instruction_ids"])] += 1
        assert all(t in SPLIT.train for t in rec["instruction_ids"])
        assert vc.compatible(rec["instruction_ids"]) if rec["instruction_ids"] else True
        assert len(rec["kwargs"]) == len(rec["instruction_ids"])
        assert rec["instruction"].startswith(rec["task"])
    for count, p in enumerate(MIX):
        assert abs(n[count] / 2000 - p) < 0.04, (count, n)


def test_constrain_tasks_drops_tasks_that_state_a_format_of_their_own():
    records = [
        {"id": "a", "instruction": "Write a slogan in all capital letters.", "type": "format_uppercase"},
        {"id": "b", "instruction": "Describe a quiet harbour.", "type": "creative_writing"},
        {"id": "c", "instruction": "List two fruits as bullet points.", "type": "brainstorm_list"},
    ]  # fmt: skip
    out, dropped = constrain_tasks(records, SPLIT, MIX, SEED)
    assert [r["id"] for r in out] == ["b"]
    assert dropped == {"task_states_a_format": 2}
    again, _ = constrain_tasks(records, SPLIT, MIX, SEED)
    assert again == out  # seeded by the record id


def _cand(index, text, checks, relevance, usable=True):
    return {"index": index, "text": text, "checks": checks, "relevance": relevance,
            "usable": usable, "excluded": None if usable else "empty", "source": "base_fewshot",
            "prompt": "p"}  # fmt: skip


def _record(ids, kwargs, cands):
    return {"id": "r1", "task": "Describe a lighthouse.", "instruction": "Describe a lighthouse. "
            "Reply using only lowercase letters.", "instruction_ids": ids, "kwargs": kwargs,
            "type": "creative_writing", "round": 1, "candidates": cands}  # fmt: skip


def test_checkers_label_keep_and_pair_on_hand_made_candidates():
    ids, kw = ["change_case:english_lowercase"], [{}]
    texts = [
        "A lighthouse is a tall tower.",  # fails lowercase, relevant
        "ok.",  # passes, but says nothing about a lighthouse
        "a lighthouse is a tall tower with a light for ships.",  # passes and relevant
        "a lighthouse is a tall tower with a light for ships!",  # passes, near-identical to 2
    ]
    cands = [
        _cand(i, t, vc.evaluate_strict(ids, kw, t), rel)
        for i, (t, rel) in enumerate(zip(texts, [0.9, -0.2, 0.8, 0.5], strict=True))
    ]
    rec = decide(_record(ids, kw, cands), VerifiedConfig(relevance_threshold=0.0), 0.6)
    assert [c["passes"] for c in rec["candidates"]] == [False, True, True, True]
    assert [c["verified"] for c in rec["candidates"]] == [False, False, True, True]
    assert rec["kept_index"] == 2  # the most relevant verified candidate
    (pair,) = pair_records(rec)
    assert pair["chosen"] == " " + texts[2] and pair["rejected"] == " " + texts[0]
    assert pair["soft_label"] == 1.0 and pair["judge"] == "checker"
    assert pair["prompt"] == "Instruction: " + rec["instruction"] + "\nResponse:"
    assert sft_record(rec)["response"] == texts[2]


def test_relevance_filter_rejects_a_constraint_satisfying_off_topic_or_empty_answer():
    ids, kw = ["change_case:english_lowercase"], [{}]
    cands = [
        _cand(0, "ok.", [True], -0.3),  # passes the checker, off topic
        _cand(1, "", [False], None, usable=False),  # empty: excluded before any check
    ]
    rec = decide(_record(ids, kw, cands), VerifiedConfig(relevance_threshold=0.0), 0.6)
    assert rec["kept_index"] is None and rec["pairs"] == []
    assert rec["pairs_dropped"] == {"nothing_kept": 1}
    assert sft_record(rec) is None


def test_near_identical_pairs_are_dropped_and_counted():
    ids, kw = ["startend:end_checker"], [{"end_phrase": "Good luck!"}]
    a = "a lighthouse guides ships at night. Good luck!"
    b = "a lighthouse guides ships at night. Good luck"
    cands = [_cand(0, a, vc.evaluate_strict(ids, kw, a), 0.5),
             _cand(1, b, vc.evaluate_strict(ids, kw, b), 0.6)]  # fmt: skip
    rec = decide(_record(ids, kw, cands), VerifiedConfig(), 0.6)
    assert rec["kept_index"] == 0 and rec["pairs"] == []
    assert rec["pairs_dropped"] == {"near_identical": 1}
    stats = sampling_stats([rec])
    assert stats["per_type"]["startend:end_checker"] == {
        "pass_at_1": 0.5, "pass_at_k": 1.0, "instructions": 1
    }  # fmt: skip


def test_unconstrained_instructions_are_paired_by_the_pmi_judge_above_its_threshold():
    cands = [_cand(0, "a tall tower by the sea.", [], 1.2), _cand(1, "i like cheese.", [], -0.4)]
    rec = decide(_record([], [], cands), VerifiedConfig(), 0.6)
    (pair,) = rec["pairs"]
    assert pair["judge"] == "pmi" and pair["chosen_index"] == 0
    assert pair["soft_label"] == pytest.approx(1 / (1 + 2.718281828**-1.6), abs=1e-6)


def test_round_one_demonstrations_are_train_types_only_with_the_own_type_last():
    from utils.completion_prompts import load_response_examples

    demos = allowed_demos(load_response_examples(), SPLIT)
    assert demos
    for e in demos:
        assert all(c["id"] in SPLIT.train for c in e.get("checks") or [])
    rec = {"instruction": "Describe a harbour. Reply using only lowercase letters.",
           "instruction_ids": ["change_case:english_lowercase"]}  # fmt: skip
    shots = fewshot_demos(rec, demos, 3, random.Random(0))
    own_ids = [{c["id"] for c in e.get("checks") or []} for e in demos]
    lower = [e for e, o in zip(demos, own_ids, strict=True) if "change_case:english_lowercase" in o]
    assert len(shots) == 3 and len({e["instruction"] for e in shots}) == 3
    # As many demonstrations of the record's own type as the pool has (up to k), last.
    n_own = min(3, len(lower))
    assert all(e in lower for e in shots[-n_own:]) and n_own >= 2
    two = {**rec, "instruction_ids": ["change_case:english_lowercase", "keywords:existence"]}
    shots = fewshot_demos(two, demos, 3, random.Random(1))
    own = [{c["id"] for c in e.get("checks") or []} for e in shots]
    assert any("keywords:existence" in o for o in own)
    assert any("change_case:english_lowercase" in o for o in own)


def test_training_record_audit_catches_held_out_types_and_eval_phrasings():
    held = SPLIT.held_out[0]
    assert training_record_problems({"instruction_ids": [held], "instruction": "x"}, SPLIT)
    ev = build_eval_set(20, 1234)[0]
    assert training_record_problems({"instruction_ids": [], "instruction": ev["prompt"]}, SPLIT)
    ok = augment("Describe a harbour.", SPLIT, MIX, random.Random(3))
    assert training_record_problems(ok, SPLIT) == []


# --------------------------------------------------------------------------------------------
# The stage on a tiny random model: every training record it writes obeys the held-out
# protocol, and a killed run resumes with no duplicate and the same result.


def _stage_inputs():
    tasks = [f"Describe a small {w} in the garden." for w in
             ("stone", "bench", "pond", "gate", "shed", "path", "lamp", "wall")]  # fmt: skip
    stage1 = [
        {"id": f"t{k}", "instruction": t, "type": "creative_writing"} for k, t in enumerate(tasks)
    ]
    records, _ = constrain_tasks(stage1, SPLIT, MIX, SEED)
    return records


def _run(lm, out, records, on_chunk=None):
    from utils.completion_prompts import load_response_examples
    from utils.critic import CriticConfig
    from utils.verified_sampling import run_verified_sampling

    cfg = VerifiedConfig(num_candidates=3, max_new_tokens=8, batch_size=8,
                         instructions_per_chunk=3, relevance_threshold=-100.0,
                         exclude_truncated=False)  # fmt: skip
    critic = CriticConfig.from_dict(load_config()["critic"])
    demos = allowed_demos(load_response_examples(), SPLIT)
    return run_verified_sampling(lm, records, cfg, critic, out, "base_fewshot", 1, demos,
                                 progress=False, on_chunk=on_chunk)  # fmt: skip


def test_killed_sampling_resumes_without_duplicates_and_matches_an_uninterrupted_run(
    tiny_qwen, tmp_path
):
    records = _stage_inputs()
    full = _run(tiny_qwen, tmp_path / "full", records)

    class Killed(Exception):
        pass

    def kill(done, total):
        raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        _run(tiny_qwen, out, records, on_chunk=kill)
    with (out / "samples.jsonl").open("a") as f:
        f.write('{"id": "t7", "torn')  # a kill mid-write
    resumed = _run(tiny_qwen, out, records)
    assert resumed["resume"]["instructions_already_done"] == 3
    assert resumed["resume"]["torn_lines_repaired"] == 1
    ids = [r["id"] for r in read_jsonl(out / "samples.jsonl")]
    assert len(ids) == len(set(ids)) == len(records)
    for name in ("samples.jsonl", "train.jsonl", "pairs.jsonl"):
        assert read_jsonl(out / name) == read_jsonl(tmp_path / "full" / name), name
    assert resumed["stats"] == full["stats"]
    for name in ("train.jsonl", "pairs.jsonl", "sft_data.jsonl"):
        for r in read_jsonl(out / name):
            assert training_record_problems(r, SPLIT) == [], (name, r["id"])


@pytest.mark.slow
def test_real_relevance_filter_rejects_checker_passing_off_topic_answers(gemma):
    """On the embedded base model: answers that satisfy "reply using only lowercase letters"
    but ignore the task fall below the configured relevance threshold; on-topic ones pass."""
    from utils.critic import CriticConfig, pmi_scores

    cfg = load_config()
    critic = CriticConfig.from_dict(cfg["critic"])
    threshold = VerifiedConfig.from_dict(cfg["verified"]).relevance_threshold
    cases = [
        ("Describe a lighthouse.", "a lighthouse is a tall tower by the sea with a bright lamp "
         "that warns ships away from rocks at night.", True),
        ("Describe a lighthouse.", "ok.", False),
        ("Describe a lighthouse.", "i like to eat pasta with cheese on sundays.", False),
        ("Explain how bread is baked.", "you mix flour, water, salt and yeast, let the dough "
         "rise, shape it and bake it in a hot oven.", True),
        ("Explain how bread is baked.", "yes.", False),
        ("Explain how bread is baked.", "the football match ended in a draw last night.", False),
    ]  # fmt: skip
    scores = pmi_scores(gemma, [(t, r) for t, r, _ in cases], critic)
    for (task, response, on_topic), s in zip(cases, scores, strict=True):
        assert ic.check_english_lowercase(response)
        assert (s["pmi_nats_per_token"] >= threshold) == on_topic, (task, response, s)


def test_hindsight_records_state_a_train_rule_the_sample_already_follows():
    from utils.verified_sampling import hindsight_records

    texts = [
        "A harbour is a sheltered place.",
        "a harbour is a calm stretch of water where boats rest, protected from the waves.",
        "Boats sail in and out of the harbour every morning before sunrise.",
        "ok",  # not relevant: never relabelled
    ]
    cands = [{"index": i, "text": t, "relevant": i < 3, "relevance": 1.0 - i / 10, "prompt": "p"}
             for i, t in enumerate(texts)]  # fmt: skip
    rec = {"id": "x", "task": "Describe a harbour.", "round": 1, "type": "t", "kept_index": 0,
           "candidates": cands}  # fmt: skip
    out = hindsight_records(rec, SPLIT, 5, 0)
    assert [h["response"] for h in out] == texts[1:3]  # the kept one and the irrelevant one: no
    for h in out:
        (t,) = h["instruction_ids"]
        assert t in SPLIT.train and h["source"] == "hindsight"
        assert vc.evaluate_strict(h["instruction_ids"], h["kwargs"], h["response"]) == [True]
        assert h["instruction"].startswith("Describe a harbour. ")
        assert training_record_problems(h, SPLIT) == []
        for v in h["kwargs"][0].values():
            assert not (set(v if isinstance(v, list) else [v]) & set(vc.KEYWORDS + vc.END_PHRASES))
    assert hindsight_records(rec, SPLIT, 0, 0) == []
    assert hindsight_records(rec, SPLIT, 5, 0) == out  # seeded


def test_stage_script_writes_status_and_exit_codes(tmp_path, tiny_loads):
    """The script runs the shared lifecycle: a good run writes an ``ok`` manifest (exit 0); bad
    input is one message, exit 2 and a ``failed`` manifest."""
    import json
    import sys

    sys.path.insert(
        0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "scripts")
    )
    import sample_verified

    from utils.jsonl_io import write_jsonl_atomic

    run = tmp_path / "run"
    write_jsonl_atomic(run / "stage1" / "constrained.jsonl", _stage_inputs()[:3])
    common = ["--run", str(run), "--set", "sentinels.mode=off", "--set", "verified.num_candidates=2",
              "--set", "verified.max_new_tokens=6", "--set", "verified.relevance_threshold=-100",
              "--set", "verified.exclude_truncated=false", "--no-progress"]  # fmt: skip
    assert sample_verified.main([*common, "--round", "1"]) == 0
    manifest = json.loads((run / "verified_r1" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["counts"]["kept"] >= 1
    assert sample_verified.main([*common, "--round", "0", "--out", str(run / "bad")]) == 2
    assert json.loads((run / "bad" / "manifest.json").read_text())["status"] == "failed"
