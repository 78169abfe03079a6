"""The base-model critic: preference maths (pairwise and pointwise), prompts, batching, the
verifiable check set, and evaluate_critic.py end to end on a tiny model."""

from __future__ import annotations

import math
import re

import pytest

from utils import critic_calibration as calibration
from utils import critic_checkset as cc
from utils.critic import (
    CriticConfig,
    compare_pairs,
    judge_instructions,
    judge_prompt_id,
    score_responses,
)
from utils.critic_prompts import (
    INSTRUCTION_SHOTS,
    PAIR_SHOTS,
    POINTWISE_PROMPTS,
    PROMPT_VERSION,
    RESPONSE_SHOTS,
    instruction_prompt,
    pair_prompt,
    pmi_completion,
    pmi_prefix,
    response_prompt,
)
from utils.preference_math import (
    pmi_verdict,
    pointwise_preference,
    response_verdict,
    soft_preference,
    strength_preference,
    two_way_prob,
)
from utils.response_format import END_OF_RESPONSE_MARKER
from utils.soft_label_summary import histogram
from utils.verifiable_checks import check_instruction

L = math.log

# -- preference maths on constructed log-probs ----------------------------------------------


def test_two_way_prob_renormalises_over_the_two_answers():
    assert two_way_prob(L(0.3), L(0.1)) == pytest.approx(0.75)
    assert two_way_prob(L(0.01), L(0.03)) == pytest.approx(0.25)
    assert two_way_prob(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))  # stable
    assert two_way_prob(-math.inf, -math.inf) == 0.5
    with pytest.raises(ValueError, match="log-probability"):
        two_way_prob(0.5, -1.0)


def test_soft_preference_averages_both_orders():
    # First shown as A: P(A)=.6, P(B)=.2 -> .75. First shown as B: P(A)=.1, P(B)=.3 -> .75.
    r = soft_preference((L(0.6), L(0.2)), (L(0.1), L(0.3)))
    assert r["p_first_order_ab"] == pytest.approx(0.75)
    assert r["p_first_order_ba"] == pytest.approx(0.75)
    assert r["p_first"] == pytest.approx(0.75)
    assert r["position_consistent"] is True
    assert r["margin_nats"] == pytest.approx(math.log(3))
    assert r["p_a_mean"] == pytest.approx(0.5)
    assert r["order_ab"] == {"logp_a": L(0.6), "logp_b": L(0.2)}
    assert r["answer_mass_ab"] == pytest.approx(0.8)
    # Orders disagree: .75 for first in AB, .25 in BA -> .5 and inconsistent.
    r = soft_preference((L(0.6), L(0.2)), (L(0.3), L(0.1)))
    assert r["p_first"] == pytest.approx(0.5) and r["position_consistent"] is False


def test_always_a_judge_gives_exactly_one_half():
    for p in (0.9, 0.6, 0.999):
        r = soft_preference((L(p), L(1 - p)), (L(p), L(1 - p)))
        assert r["p_first"] == pytest.approx(0.5)
        assert r["position_consistent"] is False
        assert r["p_a_mean"] == pytest.approx(p)


def test_constant_position_bias_never_flips_the_preference():
    # Judge logit for "A" = (true preference for what is shown as A) + bias.
    for d in (-2.0, -0.3, 0.0, 0.3, 2.0):
        for b in (-3.0, 0.0, 1.5, 4.0):
            ab = (-math.log1p(math.exp(-(d + b))), -math.log1p(math.exp(d + b)))
            ba = (-math.log1p(math.exp(-(-d + b))), -math.log1p(math.exp(-d + b)))
            p = soft_preference(ab, ba)["p_first"]
            if d == 0:
                assert p == pytest.approx(0.5)
            else:
                assert (p > 0.5) == (d > 0)


def test_pointwise_verdict_and_preference_hand_values():
    v = response_verdict(L(0.3), L(0.1))
    assert v["score"] == pytest.approx(0.75) and v["logit_nats"] == pytest.approx(math.log(3))
    assert v["answer_mass"] == pytest.approx(0.4)
    # s1 = .75 (logit ln 3), s2 = .25 (logit -ln 3): p = sigmoid(2 ln 3) = 9 / 10.
    r = pointwise_preference((L(0.3), L(0.1)), (L(0.01), L(0.03)))
    assert r["p_first"] == pytest.approx(0.9)
    assert r["margin_nats"] == pytest.approx(2 * math.log(3))
    assert r["position_consistent"] is None and r["pair_mode"] == "pointwise"
    assert r["first"]["score"] == pytest.approx(0.75) and r["second"]["score"] == pytest.approx(
        0.25
    )
    # Swapping the two gives exactly 1 - p.
    swapped = pointwise_preference((L(0.01), L(0.03)), (L(0.3), L(0.1)))
    assert swapped["p_first"] == pytest.approx(0.1)
    assert r["p_first"] + swapped["p_first"] == pytest.approx(1.0, abs=1e-12)


def test_pointwise_equal_scores_give_one_half_whatever_the_answer_mass():
    # Same normalised score (.75) from very different raw masses: exactly 0.5, margin 0.
    r = pointwise_preference((L(0.3), L(0.1)), (L(0.003), L(0.001)))
    assert r["p_first"] == pytest.approx(0.5, abs=1e-12)
    assert r["margin_nats"] == pytest.approx(0.0, abs=1e-12)
    r = pointwise_preference((L(0.5), L(0.2)), (L(0.5), L(0.2)))
    assert r["p_first"] == 0.5 and r["margin_nats"] == 0.0


def test_pointwise_yes_bias_cancels_and_infinities_are_handled():
    # A judge that adds log-odds b to every response (says "Yes" to anything): p unchanged.
    def lp(logit: float) -> tuple[float, float]:  # (log P(Yes), log P(No)) with P(Yes)+P(No)=1
        return (-math.log1p(math.exp(-logit)), -math.log1p(math.exp(logit)))

    for z1, z2 in ((1.0, -0.5), (0.2, 0.3), (-2.0, -2.5)):
        p0 = pointwise_preference(lp(z1), lp(z2))["p_first"]
        assert p0 == pytest.approx(1 / (1 + math.exp(-(z1 - z2))))
        for b in (-3.0, 1.5, 4.0):
            assert pointwise_preference(lp(z1 + b), lp(z2 + b))["p_first"] == pytest.approx(p0)
    # No mass on " Yes" for both: both logits -inf, a tie (not NaN).
    r = pointwise_preference((-math.inf, L(0.5)), (-math.inf, L(0.2)))
    assert r["p_first"] == 0.5 and r["margin_nats"] == 0.0
    # No mass on " No" for the first only: it is certainly preferred.
    assert pointwise_preference((L(0.5), -math.inf), (L(0.1), L(0.1)))["p_first"] == 1.0
    # No mass on either answer: score 0.5, logit 0 (no information).
    v = response_verdict(-math.inf, -math.inf)
    assert v["score"] == 0.5 and v["logit_nats"] == 0.0
    with pytest.raises(ValueError, match="log-probability"):
        response_verdict(0.3, -1.0)


def test_histogram_bins():
    h = histogram([0.5, 0.52, 0.56, 0.99, 1.0])
    assert h["counts"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2] and len(h["edges"]) == 11
    assert histogram([0.1, 0.9], lo=0.0, hi=1.0, bins=2)["counts"] == [1, 1]
    with pytest.raises(ValueError, match="outside"):
        histogram([0.4])


# -- config ------------------------------------------------------------------------------------


def test_config_rejects_unknown_and_bad_values():
    assert CriticConfig.from_dict({}) == CriticConfig()
    assert CriticConfig.from_dict({"n_shots_pairs": 2}).n_shots_pairs == 2
    with pytest.raises(ValueError, match="unknown critic keys"):
        CriticConfig.from_dict({"n_shot": 2})
    with pytest.raises(ValueError, match="pair_confidence_threshold"):
        CriticConfig(pair_confidence_threshold=0.4)
    with pytest.raises(ValueError, match="n_shots_pairs"):
        CriticConfig(n_shots_pairs=len(PAIR_SHOTS) + 1)
    with pytest.raises(ValueError, match="pair_mode"):
        CriticConfig(pair_mode="both")
    with pytest.raises(ValueError, match="pointwise_prompt"):
        CriticConfig(pointwise_prompt="nope")
    with pytest.raises(ValueError, match="n_shots_pointwise"):
        CriticConfig(n_shots_pointwise=len(RESPONSE_SHOTS) + 1)
    assert CriticConfig().pair_mode == "pmi"  # the only judge above chance on the check set
    with pytest.raises(ValueError, match="n_shots_pmi"):
        CriticConfig(n_shots_pmi=len(PAIR_SHOTS) + 1)


def test_judge_prompt_id_records_the_mode_and_the_template_in_use():
    pw = judge_prompt_id(CriticConfig(pair_mode="pointwise"))
    ab = judge_prompt_id(CriticConfig(pair_mode="pairwise"))
    assert pw["pair_mode"] == "pointwise" and ab["pair_mode"] == "pairwise"
    assert pw["pair_prompt_sha256"] != ab["pair_prompt_sha256"]
    assert pw["instruction_prompt_sha256"] == ab["instruction_prompt_sha256"]
    assert pw["pair_answers"] == "' Yes'/' No'" and ab["pair_answers"] == "' A'/' B'"
    other = judge_prompt_id(CriticConfig(pair_mode="pointwise", pointwise_prompt="exact-v1"))
    assert other["pair_prompt_sha256"] != pw["pair_prompt_sha256"]
    assert pw["pair_judge_id"].startswith(f"{PROMPT_VERSION}/pointwise/grader-v1/")
    assert ab["pair_judge_id"].startswith(f"{PROMPT_VERSION}/pairwise/ab-both-orders/")
    assert pw["pair_judge_id"].endswith(pw["pair_prompt_sha256"][:12])
    # Shot count changes the template, so it changes the id.
    fewer = judge_prompt_id(CriticConfig(pair_mode="pointwise", n_shots_pointwise=2))
    assert fewer["pair_judge_id"] != pw["pair_judge_id"]
    # ... while the pairwise id ignores the pointwise settings.
    assert judge_prompt_id(CriticConfig(pair_mode="pairwise", n_shots_pointwise=2)) == ab


# -- prompts -----------------------------------------------------------------------------------


def test_prompts_are_plain_documents_ending_before_the_answer():
    p = pair_prompt("Name a fruit.", " Mango. ", "Tiger.", 2)
    assert p.endswith("Instruction: Name a fruit.\nResponse A: Mango.\nResponse B: Tiger.\n"
                      "Which response follows the instruction better? Answer:")  # fmt: skip
    assert p.count("Answer: A") == 1 and p.count("Answer: B") == 1  # 2 balanced shots
    q = instruction_prompt("2023", 4)
    assert q.endswith("Instruction: 2023\nIs this a clear, complete instruction? Answer:")
    assert q.count("Answer: Yes") == 2 and q.count("Answer: No") == 2
    for text in (p, q):
        assert not re.search(r"<\||\|>|<start_of_turn>|<end_of_turn>|\[INST\]|<s>", text)
        assert "user:" not in text.lower() and "assistant:" not in text.lower()
    with pytest.raises(ValueError, match="response B is empty"):
        pair_prompt("Name a fruit.", "Mango", "  ", 2)


def test_pointwise_prompt_is_the_shared_format_with_balanced_contrastive_shots():
    for pid, (header, question) in POINTWISE_PROMPTS.items():
        p = response_prompt(" Name a fruit. ", " Mango. ", 4, pid)
        assert p.endswith(f"Instruction: Name a fruit.\nResponse: Mango.\n{question}")
        assert p.startswith(header)
        assert p.count(f"{question} Yes") == 2 and p.count(f"{question} No") == 2
        assert not re.search(r"<\||\|>|<start_of_turn>|<end_of_turn>|\[INST\]|<s>", p)
        assert "user:" not in p.lower() and "assistant:" not in p.lower()
    bare = response_prompt("Name a fruit.", "Mango.", 0, "exact-v1")
    assert bare.count("Answer:") == 1
    # Every demonstration pair: the good response is labelled Yes, the bad one No, same instruction.
    assert len(RESPONSE_SHOTS) == 2 * len(PAIR_SHOTS)
    for k, (ins, a, b, better) in enumerate(PAIR_SHOTS):
        pair = RESPONSE_SHOTS[2 * k : 2 * k + 2]
        labels = {resp: verdict for i, resp, verdict in pair if i == ins}
        assert labels == {a: "Yes" if better == "A" else "No", b: "Yes" if better == "B" else "No"}
    for n in range(0, len(RESPONSE_SHOTS) + 1, 4):
        assert sum(v == "Yes" for _, _, v in RESPONSE_SHOTS[:n]) == n // 2
    with pytest.raises(ValueError, match="response is empty"):
        response_prompt("Name a fruit.", " ", 2, "exact-v1")
    with pytest.raises(ValueError, match="unknown pointwise prompt"):
        response_prompt("Name a fruit.", "Mango.", 2, "nope")
    with pytest.raises(ValueError, match="n_shots"):
        response_prompt("Name a fruit.", "Mango.", len(RESPONSE_SHOTS) + 1, "exact-v1")


def test_judging_goes_through_lm_encode_batched_and_orders_are_consistent(tiny_qwen, monkeypatch):
    seen: list[str] = []
    real = tiny_qwen.encode

    def spy(text, allow_control_tokens=False):
        seen.append(text)
        assert allow_control_tokens is False
        return real(text, allow_control_tokens)

    monkeypatch.setattr(tiny_qwen, "encode", spy)
    cfg = CriticConfig(pair_mode="pairwise", n_shots_pairs=1, n_shots_instructions=1, batch_size=3)
    items = [("Name a fruit.", "Mango.", "Tiger."), ("What is 2+2?", "4", "5")]
    fwd = compare_pairs(tiny_qwen, items, cfg)
    assert len(seen) == 4 and all(s.endswith("better? Answer:") for s in seen)
    for control in tiny_qwen.policy.control_token_strings:
        assert not any(control in s for s in seen)
    rev = compare_pairs(tiny_qwen, [(i, b, a) for i, a, b in items], cfg)
    for f, r in zip(fwd, rev, strict=True):
        # Swapping first and second swaps the two orders: the preference complements exactly.
        assert f["p_first"] + r["p_first"] == pytest.approx(1.0, abs=1e-6)
        assert f["order_ab"] == pytest.approx(r["order_ba"])
        assert f["position_consistent"] == r["position_consistent"]
    seen.clear()
    ins = judge_instructions(tiny_qwen, ["Name a fruit.", "1997 the of"], cfg)
    assert len(seen) == 2
    for v in ins:
        assert v["score"] == pytest.approx(1 / (1 + math.exp(v["logp_no"] - v["logp_yes"])))
        assert v["accepted"] == (v["score"] >= cfg.min_instruction_score)
        assert v["logp_yes"] <= 0 and v["logp_no"] <= 0


def test_pointwise_judge_scores_each_response_once_through_lm_encode(tiny_qwen, monkeypatch):
    seen: list[str] = []
    real = tiny_qwen.encode

    def spy(text, allow_control_tokens=False):
        seen.append(text)
        assert allow_control_tokens is False
        return real(text, allow_control_tokens)

    monkeypatch.setattr(tiny_qwen, "encode", spy)
    cfg = CriticConfig(pair_mode="pointwise", n_shots_pointwise=2, batch_size=3)
    question = POINTWISE_PROMPTS[cfg.pointwise_prompt][1]
    items = [("Name a fruit.", "Mango.", "Tiger."), ("What is 2+2?", "4", "5")]
    fwd = compare_pairs(tiny_qwen, items, cfg)
    # One prompt per response, no order, plain documents with no control text.
    assert len(seen) == 4 and all(s.endswith(f"\n{question}") for s in seen)
    assert sum(s.endswith(f"Response: Mango.\n{question}") for s in seen) == 1
    for control in tiny_qwen.policy.control_token_strings:
        assert not any(control in s for s in seen)
    seen.clear()
    rev = compare_pairs(tiny_qwen, [(i, b, a) for i, a, b in items], cfg)
    verdicts = score_responses(tiny_qwen, [(i, r) for i, a, b in items for r in (a, b)], cfg)
    for k, (f, r) in enumerate(zip(fwd, rev, strict=True)):
        assert f["p_first"] + r["p_first"] == pytest.approx(1.0, abs=1e-6)  # swap -> 1 - p
        assert f["position_consistent"] is None and f["pair_mode"] == "pointwise"
        v1, v2 = verdicts[2 * k], verdicts[2 * k + 1]
        assert f["first"]["score"] == pytest.approx(v1["score"], abs=1e-6)
        want = 1 / (1 + math.exp(-(v1["logit_nats"] - v2["logit_nats"])))
        assert f["p_first"] == pytest.approx(want, abs=1e-6)
        assert v1["logp_yes"] <= 0 and v1["logp_no"] <= 0
        assert v1["pointwise_prompt"] == cfg.pointwise_prompt
    # Identical responses: one prompt, and exactly one half.
    seen.clear()
    [same] = compare_pairs(tiny_qwen, [("Name a fruit.", "Mango.", " Mango. ")], cfg)
    assert len(seen) == 1 and same["p_first"] == 0.5
    with pytest.raises(ValueError, match="expected \\(instruction, response\\)"):
        score_responses(tiny_qwen, [("Name a fruit.",)], cfg)


def test_pmi_verdict_and_preference_hand_values():
    # log P(r | instruction) = -6 over 3 tokens, log P(r | empty) = -12: gain 2 nats per token.
    v1 = pmi_verdict(-6.0, -12.0, 3)
    assert v1["pmi_nats_per_token"] == v1["logit_nats"] == v1["score"] == pytest.approx(2.0)
    v2 = pmi_verdict(-10.0, -10.0, 5)  # the instruction explains nothing: gain 0
    assert v2["score"] == 0.0
    r = strength_preference(v1, v2, "pmi")
    assert r["p_first"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert r["margin_nats"] == pytest.approx(2.0) and r["position_consistent"] is None
    assert strength_preference(v2, v1, "pmi")["p_first"] == pytest.approx(1 - r["p_first"])
    assert strength_preference(v1, dict(v1), "pmi")["p_first"] == 0.5
    # A constant added to both gains (a prompt-wide shift) cancels.
    shifted = strength_preference(pmi_verdict(-3.0, -12.0, 3), pmi_verdict(-5.0, -10.0, 5), "pmi")
    assert shifted["p_first"] == pytest.approx(r["p_first"])
    with pytest.raises(ValueError, match="n_tokens"):
        pmi_verdict(-1.0, -1.0, 0)
    with pytest.raises(ValueError, match="log-probability"):
        pmi_verdict(0.5, -1.0, 1)


def test_pmi_prompts_are_the_shared_format_with_an_empty_null_instruction():
    cond = pmi_prefix("Name a fruit.", 2)
    null = pmi_prefix(None, 2)
    assert cond.endswith("Instruction: Name a fruit.\nResponse:")
    assert null.endswith("\n\nInstruction:\nResponse:")
    assert cond.split("\n\n")[:2] == null.split("\n\n")[:2]  # same demonstrations
    assert pmi_prefix(None, 0) == "Instruction:\nResponse:"
    assert pmi_completion("  Mango. ") == " Mango." + END_OF_RESPONSE_MARKER
    with pytest.raises(ValueError, match="empty"):
        pmi_completion("  ")


def test_completion_logprobs_equal_an_unpadded_forward_in_any_batch(tiny_qwen):
    import torch

    from utils.scoring import completion_logprobs

    prefixes = ["Instruction: Name a fruit.\nResponse:", "Hi", "Instruction: a\nResponse:"]
    comps = [" Mango.\nInstruction:", " there, how are you today?", " b"]
    batched = completion_logprobs(tiny_qwen, prefixes, comps, batch_size=3)
    single = completion_logprobs(tiny_qwen, prefixes, comps, batch_size=1)
    for (p, c), (lp_b, n_b), (lp_s, n_s) in zip(
        zip(prefixes, comps, strict=True), batched, single, strict=True
    ):
        p_ids = tiny_qwen.encode(p)
        c_ids = tiny_qwen.tokenizer(c, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = tiny_qwen.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        want = sum(float(logp[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids))
        assert n_b == n_s == len(c_ids)
        assert lp_b == pytest.approx(want, abs=1e-4) and lp_s == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="prefixes but"):
        completion_logprobs(tiny_qwen, prefixes, comps[:2])


def test_pmi_judge_scores_each_distinct_text_once_and_swaps_exactly(tiny_qwen, monkeypatch):
    import utils.scoring as gen

    calls: list[tuple[list[str], list[str]]] = []
    real = gen.completion_logprobs

    def spy(lm, prefixes, completions, batch_size=8):
        calls.append((list(prefixes), list(completions)))
        return real(lm, prefixes, completions, batch_size)

    monkeypatch.setattr(gen, "completion_logprobs", spy)
    cfg = CriticConfig(pair_mode="pmi", n_shots_pmi=1, batch_size=2)
    items = [("Name a fruit.", "Mango.", "Tiger."), ("What is 2+2?", "4", "Mango.")]
    fwd = compare_pairs(tiny_qwen, items, cfg)
    [(prefixes, completions)] = calls
    # 4 conditional scorings + 3 distinct null ones ("Mango." is shared).
    assert len(prefixes) == 7 and sum(p == pmi_prefix(None, 1) for p in prefixes) == 3
    rev = compare_pairs(tiny_qwen, [(i, b, a) for i, a, b in items], cfg)
    for f, r in zip(fwd, rev, strict=True):
        assert f["p_first"] + r["p_first"] == pytest.approx(1.0, abs=1e-6)
        assert f["pair_mode"] == "pmi" and f["position_consistent"] is None
        assert f["first"]["logp_conditional"] <= 0 and f["first"]["n_tokens"] >= 2
    assert judge_prompt_id(cfg)["pair_judge_id"].startswith(f"{PROMPT_VERSION}/pmi/shots1/")


# -- check set -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkset():
    return cc.build_checkset()


def test_checkset_is_deterministic_sized_and_split(checkset):
    again = cc.build_checkset()
    assert again == checkset
    assert cc.build_checkset(seed=1)["sha256"] != checkset["sha256"]
    assert len(checkset["pairs"]) >= 60 and len(checkset["instructions"]) >= 40
    for part in ("pairs", "instructions"):
        ids = [c["id"] for c in checkset[part]]
        assert len(set(ids)) == len(ids)
        for kind in {c["kind"] for c in checkset[part]}:
            splits = {c["split"] for c in checkset[part] if c["kind"] == kind}
            assert splits == {"dev", "test"}, (part, kind)
    labels = [c["label"] for c in checkset["instructions"]]
    assert sum(labels) == len(labels) - sum(labels)  # balanced good / corrupted


def test_pair_labels_are_right_by_construction(checkset):
    n_checked = 0
    for c in checkset["pairs"]:
        assert c["good"] != c["bad"]
        if c["check"] is not None:
            ch = c["check"]
            assert check_instruction(ch["instruction_id"], c["good"], ch["kwargs"]), c
            assert not check_instruction(ch["instruction_id"], c["bad"], ch["kwargs"]), c
            n_checked += 1
        elif c["kind"] == "arithmetic":
            f = c["facts"]
            assert f["answer"] == (f["a"] + f["b"] if f["op"] == "+" else f["a"] * f["b"])
            assert re.findall(r"\d+", c["good"])[-1] == str(f["answer"])
            assert re.findall(r"\d+", c["bad"])[-1] != str(f["answer"])
        elif c["kind"] == "relevance":
            cat = c["facts"]["category"]
            assert c["good"].rstrip(".").lower() in cc.CATEGORIES[cat]
            assert c["bad"].rstrip(".").lower() not in cc.CATEGORIES[cat]
        else:
            pytest.fail(f"case {c['id']} has no way to verify its label")
    assert n_checked >= 40


def test_instruction_labels_are_right_by_construction(checkset):
    good = cc.good_instructions()
    for c in checkset["instructions"]:
        text = c["instruction"]
        if c["kind"] == "good":
            assert c["label"] and text in good and text[-1] in ".?"
            continue
        assert not c["label"]
        if c["kind"] == "truncated":
            assert any(g.startswith(text + " ") for g in good)
            assert text.split()[-1].lower() in cc._DANGLING
        elif c["kind"] == "word_salad":
            words = sorted(text.split())
            assert any(sorted(w.strip(".?").lower() for w in g.split()) == words for g in good)
            assert text not in good
        elif c["kind"] == "bare_number":
            assert text.isdigit()
        else:
            assert c["kind"] == "response_like" and not text.endswith("?") and text not in good


def test_checkset_never_overlaps_the_judge_demonstrations(checkset):
    shots = {s[0] for s in PAIR_SHOTS} | {s[0] for s in INSTRUCTION_SHOTS}
    for c in checkset["pairs"] + checkset["instructions"]:
        assert c["instruction"] not in shots
        # The demonstrations' topics stay out of the check set, so no case is answered by copy.
        for topic in ("lamp", "lighthouse", "kite", "owls", "volcano", "teapot", "harbor"):
            assert topic not in c["instruction"].lower()


def test_truncate_and_salad_helpers():
    assert cc.truncate_instruction("Give three tips for growing tomatoes.") == "Give three tips for"
    with pytest.raises(ValueError, match="no dangling"):
        cc.truncate_instruction("Sing loudly.")
    import random

    s = cc.word_salad("Write a short poem about a paper boat.", random.Random(3))
    assert sorted(s.split()) == sorted(
        ["write", "a", "short", "poem", "about", "a", "paper", "boat"]
    )


# -- metrics, hand-computed --------------------------------------------------------------------


def test_roc_auc_hand_values():
    assert calibration.roc_auc([0.9, 0.8, 0.4, 0.3], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert calibration.roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert calibration.roc_auc([0.1, 0.9], [False, True]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        calibration.roc_auc([0.1, 0.2], [1, 1])


def test_pair_metrics_hand_values():
    m = calibration.pair_metrics([0.9, 0.4, 0.65, 0.5], [True, False, True, False], (0.6, 0.7))
    assert m["accuracy"]["successes"] == 2 and m["accuracy"]["rate"] == 0.5  # a tie is wrong
    assert m["position_consistency"]["rate"] == 0.5
    assert m["consistent_and_correct"]["successes"] == 2
    assert m["at_threshold"]["0.6"]["coverage"] == 0.75
    assert m["at_threshold"]["0.6"]["accuracy"]["successes"] == 2
    assert m["at_threshold"]["0.6"]["accuracy"]["n"] == 3
    assert m["at_threshold"]["0.7"]["coverage"] == 0.25
    assert m["at_threshold"]["0.7"]["accuracy"]["rate"] == 1.0
    lo, hi = m["accuracy"]["ci_low"], m["accuracy"]["ci_high"]
    assert lo == pytest.approx(0.15003, abs=1e-4) and hi == pytest.approx(0.84997, abs=1e-4)


def test_thresholds_and_instruction_metrics_hand_values():
    assert calibration.best_threshold([0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1]) == 0.5
    assert calibration.best_threshold([0.1, 0.2, 0.3, 0.9], [0, 1, 1, 1]) == pytest.approx(0.15)
    m = calibration.instruction_metrics([0.2, 0.4, 0.6, 0.8], [0, 1, 1, 1], 0.5)
    assert m["accuracy"]["successes"] == 3
    assert m["recall_good"]["successes"] == 2 and m["recall_good"]["n"] == 3
    assert m["recall_bad"]["rate"] == 1.0
    assert m["auc"] == pytest.approx(1.0)


def test_pair_metrics_without_positions():
    # Pointwise verdicts carry no order: consistency does not apply (n=0), accuracy still counts.
    m = calibration.pair_metrics([0.9, 0.3, 0.7], [None, None, None], (0.6,))
    assert m["accuracy"]["successes"] == 2
    assert m["position_consistency"]["n"] == 0 and m["position_consistency"]["rate"] is None
    assert m["consistent_and_correct"]["rate"] is None
    m = calibration.pair_metrics([0.9, 0.3], [True, None])
    assert m["position_consistency"]["n"] == 1 and m["position_consistency"]["rate"] == 1.0


def test_quantile_and_soft_label_distribution_hand_values():
    assert calibration.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert calibration.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.1) == pytest.approx(1.4)
    assert calibration.quantile([7.0], 0.9) == 7.0
    with pytest.raises(ValueError, match="no values"):
        calibration.quantile([], 0.5)
    # Soft label = max(p, 1 - p): .2 -> .8, .45 -> .55.
    d = calibration.soft_label_distribution([0.2, 0.45, 0.5, 0.9, 0.62])
    assert d["n"] == 5 and d["mean"] == pytest.approx((0.8 + 0.55 + 0.5 + 0.9 + 0.62) / 5)
    assert d["quantiles"]["min"] == 0.5 and d["quantiles"]["max"] == pytest.approx(0.9)
    assert d["quantiles"]["p50"] == pytest.approx(0.62)
    assert d["histogram"]["counts"] == [1, 1, 1, 0, 0, 0, 1, 0, 1, 0]


def test_confidence_threshold_is_the_smallest_that_keeps_mostly_right_pairs():
    # Soft labels (max(p, 1-p)) and correctness: .95 R, .85 R, .8 R, .72 W, .7 R, .62 W, .58 W.
    p = [0.95, 0.85, 0.8, 0.28, 0.7, 0.38, 0.42]
    r = calibration.choose_confidence_threshold(p, (0.5, 0.6, 0.7, 0.75, 0.8), min_accuracy=0.75,
                                       min_covered=3)  # fmt: skip
    table = {row["threshold"]: row for row in r["table"]}
    assert table[0.5]["covered"] == 7 and table[0.5]["accuracy"] == pytest.approx(4 / 7)
    assert table[0.6]["covered"] == 6 and table[0.6]["accuracy"] == pytest.approx(4 / 6)
    assert table[0.7]["covered"] == 5 and table[0.7]["accuracy"] == pytest.approx(4 / 5)
    assert table[0.8]["covered"] == 3 and table[0.8]["accuracy"] == 1.0
    assert [row["qualifies"] for row in r["table"]] == [False, False, True, True, True]
    assert r["threshold"] == 0.7
    # Too few covered cases never qualify; nothing qualifying gives None.
    assert (
        calibration.choose_confidence_threshold(p, (0.8,), 0.75, min_covered=4)["threshold"] is None
    )
    assert (
        calibration.choose_confidence_threshold(p, (0.6, 0.8), 0.9, min_covered=3)["threshold"]
        == 0.8
    )
    # Exact ties (p = .5) are never kept, so they never count.
    assert (
        calibration.choose_confidence_threshold([0.5, 0.5], (0.5,), 0.5, 1)["table"][0]["covered"]
        == 0
    )
    with pytest.raises(ValueError, match="outside"):
        calibration.choose_confidence_threshold(p, (0.4,))


def test_choose_variant_uses_dev_and_prefers_the_first_listed_on_ties():
    def mk(acc, cons, mean_p=0.5):
        return {
            "accuracy": {"rate": acc},
            "position_consistency": {"rate": cons},
            "mean_p_good": mean_p,
        }

    metrics = {"ab/2": mk(0.7, 0.5), "ab/4": mk(0.7, 0.6), "ab/8": mk(0.6, 0.9)}
    assert (
        calibration.choose_variant(metrics, "pairs") == "ab/4"
    )  # same accuracy, better consistency
    pointwise = {"a/4": mk(0.8, None, 0.6), "b/4": mk(0.8, None, 0.7), "a/8": mk(0.8, None, 0.7)}
    assert (
        calibration.choose_variant(pointwise, "pairs") == "b/4"
    )  # then mean P(good); then first listed
    ins = {2: {"auc": 0.8}, 4: {"auc": 0.8}, 8: {"auc": 0.7}}
    assert calibration.choose_variant(ins, "instructions") == 2
    with pytest.raises(ValueError, match="judge must be"):
        calibration.choose_variant(ins, "both")


def test_split_metrics_choose_the_threshold_on_dev_and_report_test(checkset):
    """Synthetic verdicts: the instruction threshold comes from dev rows only."""
    pairs = [
        {"split": c["split"], "kind": c["kind"], "p_first": 0.7, "position_consistent": True,
         "p_a_mean": 0.6}
        for c in checkset["pairs"]
    ]  # fmt: skip
    # Dev: perfectly separated at 0.65; test: separated at 0.35 (a dev-chosen t misfires).
    score = {("dev", True): 0.8, ("dev", False): 0.5, ("test", True): 0.4, ("test", False): 0.3}
    ins = [
        {"split": c["split"], "label": c["label"], "score": score[c["split"], c["label"]]}
        for c in checkset["instructions"]
    ]
    m = calibration.instruction_judge_metrics(
        cc.split_cases(ins, "dev"), cc.split_cases(ins, "test")
    )
    assert m["dev"]["threshold"] == pytest.approx(0.65)
    assert m["test"]["threshold"] == pytest.approx(0.65)
    assert m["dev"]["accuracy"]["rate"] == 1.0
    assert m["test"]["recall_good"]["rate"] == 0.0  # no peeking at test
    assert m["test"]["auc"] == 1.0
    test_pairs = cc.split_cases(pairs, "test")
    pm = calibration.pair_split_metrics(test_pairs)
    assert pm["accuracy"]["rate"] == 1.0 and pm["mean_p_a"] == pytest.approx(0.6)
    assert pm["accuracy"]["n"] == sum(c["split"] == "test" for c in checkset["pairs"])
    assert pm["soft_labels"]["quantiles"]["p50"] == pytest.approx(0.7)
    pointwise = [{**r, "position_consistent": None} for r in test_pairs]
    for r in pointwise:
        del r["p_a_mean"]
    pm = calibration.pair_split_metrics(pointwise)
    assert pm["mean_p_a"] is None and pm["position_consistency"]["rate"] is None
    per_kind = calibration.per_kind_accuracy(pairs, "test")
    assert set(per_kind) == set(cc.PAIR_KINDS)
    with pytest.raises(ValueError, match="split must be"):
        cc.split_cases(pairs, "train")


# -- evaluate_critic.py end to end on the tiny model --------------------------------------------


def test_evaluate_critic_chooses_on_dev_and_scores_test_once(
    tiny_qwen, tiny_qwen_dir, tmp_path, monkeypatch
):
    """Every variant sees dev cases only; test cases are scored once, by the dev-chosen
    variant; the report records the mode, the prompt id and the soft-label distribution."""
    import json

    import yaml

    from scripts import evaluate_critic as ev
    from utils.clean_model_loader import CleanModelLoader

    monkeypatch.setattr(CleanModelLoader, "load", lambda self, name=None: tiny_qwen)
    calls: list[tuple[set, str, int]] = []
    real = calibration.score_pair_cases

    def spy(lm, cases, cfg):
        calls.append(({c["split"] for c in cases}, cfg.pointwise_prompt, cfg.n_shots_pointwise))
        return real(lm, cases, cfg)

    monkeypatch.setattr(calibration, "score_pair_cases", spy)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(tiny_qwen_dir)},
                "sentinels": {"mode": "off"},
                "critic": {"batch_size": 48},  # few forward calls: the tiny model is call-bound
            }
        )
    )
    out = tmp_path / "out"
    args = ["--config", str(cfg_path), "--out", str(out), "--pair-mode", "pointwise",
            "--shots", "0", "--pointwise-prompts", "exact-v1,grader-v1",
            "--instruction-shots", "none"]  # fmt: skip
    rc = ev.main(args)
    report = json.loads((out / "results.json").read_text())
    assert rc == (0 if report["gate"]["passed"] else 1)
    assert calls[:2] == [({"dev"}, "exact-v1", 0), ({"dev"}, "grader-v1", 0)]
    chosen = report["chosen_on_dev"]["pair_variant"]
    assert chosen in ("exact-v1/0", "grader-v1/0") and len(calls) == 3
    assert calls[2] == ({"test"}, chosen.split("/")[0], 0)
    dev_acc = {k: v["accuracy"]["rate"] for k, v in report["dev"]["pairs_by_variant"].items()}
    assert dev_acc[chosen] == max(dev_acc.values())
    test_ids = {c["id"] for c in cc.split_cases(cc.build_checkset()["pairs"], "test")}
    assert {r["id"] for r in report["verdicts"]["pairs_test"]} == test_ids
    assert report["pair_mode"] == "pointwise" and report["judge_prompt"]["pair_mode"] == "pointwise"
    rec = report["recommended_critic_config"]
    assert rec["pair_mode"] == "pointwise" and rec["n_shots_pointwise"] == 0
    assert rec["pointwise_prompt"] == chosen.split("/")[0]
    conf = report["chosen_on_dev"]["pair_confidence_threshold"]
    if conf["threshold"] is not None:
        assert rec["pair_confidence_threshold"] == conf["threshold"]
    assert report["test"]["pairs"]["soft_labels"]["n"] == len(test_ids)
    assert report["test"]["instructions"] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pair_mode"] == "pointwise"
    assert manifest["judge_prompt"]["pair_judge_id"] == report["judge_prompt"]["pair_judge_id"]
    # Bad input: exit 2 before any model work.
    assert ev.main([*args[:6], "--pointwise-prompts", "nope"]) == 2
    assert ev.main([*args[:6], "--shots", "x"]) == 2
    with pytest.raises(SystemExit) as e:
        ev.main([*args[:4], "--pair-mode", "neither"])
    assert e.value.code == 2
