"""The base-model critic: preference maths, prompts, batching, and the verifiable check set."""

from __future__ import annotations

import math
import re

import pytest

from utils import critic_checkset as cc
from utils.critic import (
    INSTRUCTION_SHOTS,
    PAIR_SHOTS,
    CriticConfig,
    compare_pairs,
    instruction_prompt,
    judge_instructions,
    pair_prompt,
    soft_preference,
    two_way_prob,
)
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


def test_judging_goes_through_lm_encode_batched_and_orders_are_consistent(tiny_qwen, monkeypatch):
    seen: list[str] = []
    real = tiny_qwen.encode

    def spy(text, allow_control_tokens=False):
        seen.append(text)
        assert allow_control_tokens is False
        return real(text, allow_control_tokens)

    monkeypatch.setattr(tiny_qwen, "encode", spy)
    cfg = CriticConfig(n_shots_pairs=1, n_shots_instructions=1, batch_size=3)
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
    assert cc.roc_auc([0.9, 0.8, 0.4, 0.3], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert cc.roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert cc.roc_auc([0.1, 0.9], [False, True]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        cc.roc_auc([0.1, 0.2], [1, 1])


def test_pair_metrics_hand_values():
    m = cc.pair_metrics([0.9, 0.4, 0.65, 0.5], [True, False, True, False], (0.6, 0.7))
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
    assert cc.best_threshold([0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1]) == 0.5
    assert cc.best_threshold([0.1, 0.2, 0.3, 0.9], [0, 1, 1, 1]) == pytest.approx(0.15)
    m = cc.instruction_metrics([0.2, 0.4, 0.6, 0.8], [0, 1, 1, 1], 0.5)
    assert m["accuracy"]["successes"] == 3
    assert m["recall_good"]["successes"] == 2 and m["recall_good"]["n"] == 3
    assert m["recall_bad"]["rate"] == 1.0
    assert m["auc"] == pytest.approx(1.0)


def test_choose_variant_uses_dev_and_prefers_fewer_shots_on_ties():
    def mk(acc, cons, auc):
        return {
            "pairs_dev": {"accuracy": {"rate": acc}, "position_consistency": {"rate": cons}},
            "instructions_dev": {"auc": auc},
        }

    metrics = {2: mk(0.7, 0.5, 0.8), 4: mk(0.7, 0.6, 0.8), 8: mk(0.6, 0.9, 0.7)}
    assert cc.choose_variant(metrics, "pairs") == 4  # same accuracy, better consistency
    assert cc.choose_variant(metrics, "instructions") == 2  # same AUC, fewer shots


def test_variant_metrics_choose_the_threshold_on_dev_and_report_test(checkset):
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
    m = cc.variant_metrics({"pairs": pairs, "instructions": ins})
    assert m["instructions_dev"]["threshold"] == pytest.approx(0.65)
    assert m["instructions_test"]["threshold"] == pytest.approx(0.65)
    assert m["instructions_dev"]["accuracy"]["rate"] == 1.0
    assert m["instructions_test"]["recall_good"]["rate"] == 0.0  # no peeking at test
    assert m["instructions_test"]["auc"] == 1.0
    assert m["pairs_test"]["accuracy"]["rate"] == 1.0 and m["pairs_test"][
        "mean_p_a"
    ] == pytest.approx(0.6)
    n_test = sum(c["split"] == "test" for c in checkset["pairs"])
    assert m["pairs_test"]["accuracy"]["n"] == n_test
    per_kind = cc.per_kind_accuracy(pairs, "test")
    assert set(per_kind) == set(cc.PAIR_KINDS)
