"""Self-judged preference pairs: pure selection/counting maths (pairwise and pointwise judge),
and end to end on a tiny Qwen2 with a tiny LoRA adapter (generation with the adapter, judging
with it disabled, resume, refusal to mix judges)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tests.conftest import fresh_copy
from utils.critic import CriticConfig, compare_pairs, score_responses
from utils.critic_prompts import PROMPT_VERSION
from utils.jsonl_io import JsonlError, read_jsonl
from utils.pair_selection import (
    candidate_scores,
    exclusion_reasons,
    pair_records,
    pointwise_candidate_scores,
    pointwise_comparisons,
    select_pairs,
    summarize_judgements,
)
from utils.preference_math import response_verdict
from utils.preference_pairs import (
    PairsConfig,
    candidate_plan,
    generate_candidates,
    judge_candidates,
    run_preference_pairs,
)
from utils.response_format import format_completion, format_prompt
from utils.soft_label_summary import histogram

# -- config and pure pieces --------------------------------------------------------------------


def test_config_checks():
    assert PairsConfig.from_dict({}) == PairsConfig()
    cfg = PairsConfig.from_dict({"candidate_sources": ["sft", "base_fewshot"]})
    assert cfg.candidate_sources == ("sft", "base_fewshot")
    with pytest.raises(ValueError, match="unknown pairs keys"):
        PairsConfig.from_dict({"num_candidate": 4})
    with pytest.raises(ValueError, match="unknown candidate_sources"):
        PairsConfig(candidate_sources=("teacher",))
    with pytest.raises(ValueError, match="must be a list"):
        PairsConfig.from_dict({"candidate_sources": "sft"})
    with pytest.raises(ValueError, match=">= 2"):
        PairsConfig(num_candidates=1)
    assert PairsConfig(num_candidates=4).selection_for(4) == "all_pairs"
    assert PairsConfig(num_candidates=6).selection_for(6) == "best_vs_worst"
    assert PairsConfig(pair_selection="best_vs_worst").selection_for(3) == "best_vs_worst"


def test_candidate_plan_round_robin_with_recorded_seeds():
    cfg = PairsConfig(num_candidates=5, candidate_sources=("sft", "base_fewshot"), seed=10)
    assert candidate_plan(cfg) == [
        ("sft", 10), ("base_fewshot", 11), ("sft", 12), ("base_fewshot", 13), ("sft", 14),
    ]  # fmt: skip


def test_exclusions_never_pair_empty_identical_or_broken_candidates():
    texts = ["", "a b", "a  b ", "c", "see\nInstruction: x", "<|im_start|>hi", "d", "e"]
    stops = ["eos", "eos", "eos", "stop_string", "eos", "eos", "max_new_tokens", "eos"]
    got = exclusion_reasons(texts, stops, ("<|im_start|>",), exclude_truncated=True)
    assert got == [
        "empty", None, "duplicate", None, "marker_leaked", "control_token", "truncated", None,
    ]  # fmt: skip
    got = exclusion_reasons(texts, stops, ("<|im_start|>",), exclude_truncated=False)
    assert got[6] is None
    # Case differences are NOT duplicates: they are exactly what format instructions test.
    assert exclusion_reasons(["MANGO", "mango"], ["eos", "eos"], (), True) == [None, None]


COMPS = [
    {"i": 0, "j": 1, "p_first": 0.8, "position_consistent": True},
    {"i": 0, "j": 2, "p_first": 0.3, "position_consistent": False},
    {"i": 1, "j": 2, "p_first": 0.5, "position_consistent": False},
]


def test_scores_and_all_pairs_selection_hand_values():
    scores = candidate_scores(4, COMPS)
    assert scores[:3] == pytest.approx([0.55, 0.35, 0.6]) and scores[3] is None
    critic = CriticConfig(pair_confidence_threshold=0.75)
    pairs = select_pairs(COMPS, scores, "all_pairs", critic)
    assert [(p["chosen_index"], p["rejected_index"]) for p in pairs] == [(0, 1), (2, 0), (1, 2)]
    assert [p["soft_label"] for p in pairs] == pytest.approx([0.8, 0.7, 0.5])
    assert [p["margin"] for p in pairs] == pytest.approx([0.6, 0.4, 0.0])
    assert [p["drop_reason"] for p in pairs] == [None, "below_confidence", "tie"]
    strict = CriticConfig(pair_confidence_threshold=0.6, require_position_consistent=True)
    assert [p["drop_reason"] for p in select_pairs(COMPS, scores, "all_pairs", strict)] == [
        None, "position_inconsistent", "tie",
    ]  # fmt: skip


def test_best_vs_worst_uses_the_direct_duel_for_the_label():
    comps = [dict(c) for c in COMPS]
    comps[2]["p_first"] = 0.45  # c1 vs c2: c2 slightly better
    scores = candidate_scores(3, comps)  # c0 .55, c1 .325, c2 .625
    [p] = select_pairs(comps, scores, "best_vs_worst", CriticConfig(pair_confidence_threshold=0.6))
    assert (p["chosen_index"], p["rejected_index"], p["pair_key"]) == (2, 1, "c1-c2")
    assert p["soft_label"] == pytest.approx(0.55) and p["drop_reason"] == "below_confidence"


def _lp(logit: float) -> dict[str, float]:
    """A pointwise verdict from raw log-probs with P(Yes) + P(No) = 1 and the given log-odds."""
    return response_verdict(-math.log1p(math.exp(-logit)), -math.log1p(math.exp(logit)))


def test_pointwise_pairs_from_scores_hand_values():
    # Logits ln 3, 0, -ln 3 (scores .75, .5, .25); candidate 3 excluded (no verdict).
    verdicts = [_lp(math.log(3)), _lp(0.0), _lp(-math.log(3)), None]
    comps = pointwise_comparisons(verdicts, [(0, 1), (0, 2), (1, 2)])
    assert [c["p_first"] for c in comps] == pytest.approx([0.75, 0.9, 0.75])
    assert all(c["position_consistent"] is None and c["pair_mode"] == "pointwise" for c in comps)
    scores = pointwise_candidate_scores(verdicts)
    assert scores[:3] == pytest.approx([0.75, 0.5, 0.25]) and scores[3] is None
    # Position consistency never applies to pointwise pairs, even when required.
    critic = CriticConfig(pair_confidence_threshold=0.8, require_position_consistent=True)
    pairs = select_pairs(comps, scores, "all_pairs", critic)
    assert [(p["chosen_index"], p["rejected_index"]) for p in pairs] == [(0, 1), (0, 2), (1, 2)]
    assert [p["drop_reason"] for p in pairs] == ["below_confidence", None, "below_confidence"]
    [bw] = select_pairs(comps, scores, "best_vs_worst", critic)
    assert (bw["chosen_index"], bw["rejected_index"]) == (0, 2)
    assert bw["soft_label"] == pytest.approx(0.9) and bw["margin"] == pytest.approx(0.8)
    # Swapped order in the comparison: the chosen side and its label do not change.
    [flipped] = pointwise_comparisons(verdicts, [(2, 0)])
    assert flipped["p_first"] == pytest.approx(0.1)
    [p] = select_pairs([flipped], scores, "all_pairs", critic)
    assert (p["chosen_index"], p["soft_label"]) == (0, pytest.approx(0.9))
    # Equal scores: a tie, dropped and counted as such.
    tied = [_lp(0.4), _lp(0.4)]
    [p] = select_pairs(pointwise_comparisons(tied, [(0, 1)]), pointwise_candidate_scores(tied),
                       "best_vs_worst", critic)  # fmt: skip
    assert p["soft_label"] == 0.5 and p["drop_reason"] == "tie"
    with pytest.raises(ValueError, match="no pointwise verdict"):
        pointwise_comparisons(verdicts, [(0, 3)])


def test_summary_of_pointwise_judgements():
    verdicts = [_lp(math.log(3)), _lp(0.0), _lp(-math.log(3))]
    comps = pointwise_comparisons(verdicts, [(0, 1), (0, 2), (1, 2)])
    scores = pointwise_candidate_scores(verdicts)
    cand = {"source": "sft", "stop_reason": "eos", "excluded": None}
    j = {
        "pair_mode": "pointwise",
        "judge_prompts": 3,
        "candidates": [cand] * 3,
        "comparisons": comps,
        "pairs": select_pairs(
            comps, scores, "all_pairs", CriticConfig(pair_confidence_threshold=0.8)
        ),
    }
    s = summarize_judgements([j])
    assert s["pair_modes"] == {"pointwise": 1} and s["judge_prompts"] == 3
    assert s["comparisons"] == 3 and s["position_consistent_rate"] is None
    assert s["pairs_kept"] == 1 and s["pairs_dropped"]["below_confidence"] == 2


def test_histogram_and_summary_count_every_drop():
    h = histogram([0.5, 0.52, 0.56, 0.99, 1.0])
    assert h["counts"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2] and len(h["edges"]) == 11
    with pytest.raises(ValueError, match="outside"):
        histogram([0.4])
    cand = {"source": "sft", "stop_reason": "eos", "excluded": None}
    judgements = [
        {
            "candidates": [cand, cand, {**cand, "excluded": "duplicate"}],
            "comparisons": COMPS,
            "pairs": select_pairs(
                COMPS,
                candidate_scores(3, COMPS),
                "all_pairs",
                CriticConfig(pair_confidence_threshold=0.75),
            ),
        },  # fmt: skip
        {"candidates": [{**cand, "excluded": "empty"}], "comparisons": [], "pairs": []},
    ]
    s = summarize_judgements(judgements)
    assert s["instructions"] == 2 and s["instructions_without_comparable_candidates"] == 1
    assert s["candidates"] == 4 and s["candidates_excluded"]["duplicate"] == 1
    assert s["candidates_excluded"]["empty"] == 1
    assert s["pairs_considered"] == 3 and s["pairs_kept"] == 1
    assert s["pairs_dropped"] == {"below_confidence": 1, "position_inconsistent": 0, "tie": 1}
    assert s["position_consistent_rate"] == pytest.approx(1 / 3)
    assert s["pair_modes"] == {"pairwise": 2} and s["judge_prompts"] == 6  # 2 orders x 3
    assert sum(s["soft_label_histogram_kept"]["counts"]) == 1
    assert sum(s["soft_label_histogram_considered"]["counts"]) == 3


# -- end to end on the tiny model with a tiny adapter -------------------------------------------


@pytest.fixture(scope="module")
def lm_sft(tiny_qwen, tiny_adapter_dir):
    from utils.clean_model_loader import attach_adapter

    return attach_adapter(fresh_copy(tiny_qwen), tiny_adapter_dir)


def _record(rid: str, instruction: str, rtype: str, demo: tuple[str, str]) -> dict:
    prompt = f"Instruction: {demo[0]}\nResponse: {demo[1]}\n\n{format_prompt(instruction)}"
    return {"id": rid, "instruction": instruction, "type": rtype, "prompt": prompt}


RECORDS = [
    _record("s1-a", "Name a fruit.", "open_qa", ("Name a colour.", "Red.")),
    _record("s1-b", "What is 2 + 3?", "math_word", ("What is 1 + 1?", "2")),
    _record("s1-c", "Write one word in capital letters.", "format_uppercase", ("Say hi.", "Hi.")),
]
CFG = PairsConfig(
    num_candidates=3,
    candidate_sources=("sft", "base_fewshot"),
    fewshot_prompts="stage1_record",
    max_new_tokens=5,
    exclude_truncated=False,  # a random model never ends by itself
    instructions_per_chunk=4,  # one chunk: each generate call pays a stop-string setup
    batch_size=8,
)
CRITIC = CriticConfig(
    pair_mode="pairwise", n_shots_pairs=1, n_shots_instructions=1, pair_confidence_threshold=0.5
)
CRITIC_POINTWISE = CriticConfig(
    pair_mode="pointwise", n_shots_pointwise=2, pair_confidence_threshold=0.5
)


def test_critic_judges_with_the_adapter_disabled(lm_sft, tiny_qwen):
    from utils.scoring import next_token_logprobs

    items = [("Name a fruit.", "Mango.", "Tiger.")]
    with_adapter = compare_pairs(lm_sft, items, CRITIC)[0]
    base = compare_pairs(tiny_qwen, items, CRITIC)[0]
    assert with_adapter["order_ab"] == pytest.approx(base["order_ab"], abs=1e-5)
    assert with_adapter["order_ba"] == pytest.approx(base["order_ba"], abs=1e-5)
    # ... while the adapter itself is live for generation.
    on = next_token_logprobs(lm_sft, ["Instruction: Hi\nResponse:"], [0, 1, 2])
    off = next_token_logprobs(tiny_qwen, ["Instruction: Hi\nResponse:"], [0, 1, 2])
    assert (on - off).abs().max().item() > 1e-4


def test_pointwise_judge_scores_each_candidate_once_with_the_adapter_disabled(
    lm_sft, tiny_qwen, monkeypatch
):
    """k prompts for k usable candidates (not k(k-1)), judged on the base weights; pairs and
    drops derived from the scores; the judgement records the mode and the judge id."""
    texts = [["Mango.", "Tiger.", "", "Pear and plum."], ["5", "5", "Five.", "six"]]
    cands = [
        [{"index": i, "text": t, "source": "sft", "seed": i, "stop_reason": "eos"}
         for i, t in enumerate(row)]
        for row in texts
    ]  # fmt: skip
    seen: list[str] = []
    real = lm_sft.encode

    def spy(text, allow_control_tokens=False):
        seen.append(text)
        return real(text, allow_control_tokens)

    monkeypatch.setattr(lm_sft, "encode", spy)
    cfg = PairsConfig(num_candidates=4, pair_selection="all_pairs")
    critic = CriticConfig(pair_mode="pointwise", n_shots_pointwise=2, pair_confidence_threshold=0.5)
    js = judge_candidates(lm_sft, RECORDS[:2], cands, cfg, critic)
    # Usable: 3 in the first (one empty), 3 in the second (one duplicate): 6 prompts in all.
    assert len(seen) == 6 and [j["judge_prompts"] for j in js] == [3, 3]
    assert [c["excluded"] for c in js[1]["candidates"]] == [None, "duplicate", None, None]
    base = score_responses(tiny_qwen, [(RECORDS[0]["instruction"], "Mango.")], critic)[0]
    c0 = js[0]["candidates"][0]
    assert c0["judge"]["logp_yes"] == pytest.approx(base["logp_yes"], abs=1e-5)  # adapter off
    assert c0["score"] == pytest.approx(base["score"], abs=1e-6)
    assert js[0]["candidates"][2]["judge"] is None and js[0]["candidates"][2]["score"] is None
    for j in js:
        assert j["pair_mode"] == "pointwise" and j["judge_prompt"]["pair_mode"] == "pointwise"
        assert len(j["comparisons"]) == 3 == len(j["pairs"])
        by_index = {c["index"]: c for c in j["candidates"]}
        for comp in j["comparisons"]:
            zi = by_index[comp["i"]]["judge"]["logit_nats"]
            zj = by_index[comp["j"]]["judge"]["logit_nats"]
            assert comp["p_first"] == pytest.approx(1 / (1 + math.exp(zj - zi)))
        for p in j["pairs"]:
            ch, rj = by_index[p["chosen_index"]], by_index[p["rejected_index"]]
            assert ch["score"] >= rj["score"] and p["soft_label"] >= 0.5
            assert p["kept"] == (p["soft_label"] > 0.5)
        for rec in pair_records(j):
            assert rec["judge"]["pair_mode"] == "pointwise"
            assert rec["judge"]["pair_judge_id"].startswith(f"{PROMPT_VERSION}/pointwise/")
            assert rec["judge"]["position_consistent"] is None
    s = summarize_judgements(js)
    assert s["judge_prompts"] == 6 and s["pairs_considered"] == 6
    assert s["pairs_kept"] + sum(s["pairs_dropped"].values()) == 6


def test_pmi_judge_scores_candidates_on_the_base_weights(lm_sft, tiny_qwen):
    """The default judge: each usable candidate scored with and without its instruction on
    the BASE weights (adapter disabled), pairs derived from the per-token gains."""
    texts = [["Mango.", "Tiger.", "Pear and plum."]]
    cands = [
        [{"index": i, "text": t, "source": "sft", "seed": i, "stop_reason": "eos"}
         for i, t in enumerate(row)]
        for row in texts
    ]  # fmt: skip
    critic = CriticConfig(pair_mode="pmi", n_shots_pmi=1, pair_confidence_threshold=0.5)
    [j] = judge_candidates(
        lm_sft, RECORDS[:1], cands, PairsConfig(num_candidates=3, pair_selection="all_pairs"),
        critic,
    )  # fmt: skip
    assert j["pair_mode"] == "pmi" and j["judge_prompts"] == 6  # 3 candidates x (with, without)
    base = score_responses(tiny_qwen, [(RECORDS[0]["instruction"], "Mango.")], critic)[0]
    c0 = j["candidates"][0]
    assert c0["judge"]["logp_conditional"] == pytest.approx(base["logp_conditional"], abs=1e-4)
    assert c0["score"] == pytest.approx(base["score"], abs=1e-5)
    by_index = {c["index"]: c for c in j["candidates"]}
    for comp in j["comparisons"]:
        gi, gj = (by_index[comp[k]]["judge"]["pmi_nats_per_token"] for k in ("i", "j"))
        assert comp["p_first"] == pytest.approx(1 / (1 + math.exp(gj - gi)))
    for rec in pair_records(j):
        assert rec["judge"]["pair_judge_id"].startswith(f"{PROMPT_VERSION}/pmi/shots1/")


def test_sft_source_requires_the_adapter(tiny_qwen):
    with pytest.raises(ValueError, match="SFT adapter"):
        generate_candidates(tiny_qwen, RECORDS[:1], PairsConfig(num_candidates=2))


@pytest.fixture(scope="module")
def full_run(lm_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs-full")
    summary = run_preference_pairs(lm_sft, RECORDS, CFG, CRITIC, out, progress=False)
    return out, summary


def test_end_to_end_writes_pairs_with_full_provenance(full_run):
    out, summary = full_run
    judgements = read_jsonl(out / "judgements.jsonl")
    pairs = read_jsonl(out / "pairs.jsonl")
    assert [j["id"] for j in judgements] == [r["id"] for r in RECORDS]
    c = summary["counts"]
    assert c["instructions"] == 3 and c["candidates"] == 9
    assert c["candidates_by_source"] == {"sft": 6, "base_fewshot": 3}
    assert c["pairs_kept"] == len(pairs) > 0
    assert c["pairs_considered"] == c["pairs_kept"] + sum(c["pairs_dropped"].values())
    assert sum(c["soft_label_histogram_kept"]["counts"]) == len(pairs)
    for j, rec in zip(judgements, RECORDS, strict=True):
        for cand in j["candidates"]:
            if cand["source"] == "sft":
                assert cand["prompt"] == format_prompt(rec["instruction"])
            else:
                assert cand["prompt"] == rec["prompt"]
            assert cand["seed"] == CFG.seed + cand["index"]
            assert cand["stop_reason"] in ("eos", "stop_string", "max_new_tokens")
    for p in pairs:
        assert p["prompt"] == format_prompt(p["instruction"])
        cands = p["candidates"]
        ch, rj = cands[p["chosen_index"]], cands[p["rejected_index"]]
        assert p["chosen"] == format_completion(ch["text"])
        assert p["rejected"] == format_completion(rj["text"])
        assert p["chosen"] != p["rejected"] and ch["excluded"] is None and rj["excluded"] is None
        assert 0.5 < p["soft_label"] <= 1 and p["margin"] == pytest.approx(2 * p["soft_label"] - 1)
        assert all({"text", "source", "seed", "stop_reason", "score"} <= set(x) for x in cands)
        assert "prompt" not in cands[0] and "prompt_sha256" in cands[0]
        j = p["judge"]
        assert j["prompt_version"] and len(j["pair_prompt_sha256"]) == 64
        assert j["pair_mode"] == "pairwise" and j["pair_judge_id"].startswith(
            f"{PROMPT_VERSION}/pairwise"
        )
        assert {"order_ab", "order_ba", "p_first", "position_consistent"} <= set(j)
        want = j["p_first"] if p["chosen_index"] == j["i"] else 1 - j["p_first"]
        assert p["soft_label"] == pytest.approx(want)
        assert "<|" not in p["prompt"] + p["chosen"] + p["rejected"]


def test_resume_after_kill_has_no_duplicates_and_loses_nothing(full_run, lm_sft, tmp_path):
    out, _ = full_run
    original = (out / "pairs.jsonl").read_text()
    j_lines = (out / "judgements.jsonl").read_text().splitlines(keepends=True)

    # Kill 1: pairs.jsonl torn in the middle of its last line (judgements complete).
    a = tmp_path / "a"
    shutil.copytree(out, a)
    torn = original[: len(original) - len(original.splitlines()[-1]) // 2 - 1]
    (a / "pairs.jsonl").write_text(torn)
    s = run_preference_pairs(lm_sft, RECORDS, CFG, CRITIC, a, progress=False)
    assert s["resume"]["instructions_already_done"] == 3 and s["resume"]["instructions_new"] == 0
    assert s["resume"]["torn_lines_repaired"]["pairs"] == 1
    assert s["resume"]["pairs_rebuilt_from_judgements"] >= 1
    assert (a / "pairs.jsonl").read_text() == original

    # Kill 2: the last judgement torn mid-line and its pairs never written.
    b = tmp_path / "b"
    shutil.copytree(out, b)
    (b / "judgements.jsonl").write_text("".join(j_lines[:-1]) + j_lines[-1][:40])
    last_id = json.loads(j_lines[-1])["id"]
    kept = [
        ln
        for ln in original.splitlines(keepends=True)
        if json.loads(ln)["instruction_id"] != last_id
    ]
    (b / "pairs.jsonl").write_text("".join(kept))
    s = run_preference_pairs(lm_sft, RECORDS, CFG, CRITIC, b, progress=False)
    assert s["resume"]["instructions_already_done"] == 2 and s["resume"]["instructions_new"] == 1
    assert s["resume"]["torn_lines_repaired"]["judgements"] == 1
    ids = [p["id"] for p in read_jsonl(b / "pairs.jsonl")]
    assert len(ids) == len(set(ids))
    assert [j["id"] for j in read_jsonl(b / "judgements.jsonl")] == [r["id"] for r in RECORDS]
    assert (b / "pairs.jsonl").read_text().startswith("".join(kept))
    assert s["counts"]["instructions"] == 3


def test_resume_refuses_to_mix_judges(full_run, lm_sft, tmp_path):
    out, _ = full_run
    d = tmp_path / "mixed"
    shutil.copytree(out, d)
    with pytest.raises(JsonlError, match="another judge"):
        run_preference_pairs(lm_sft, RECORDS, CFG, CRITIC_POINTWISE, d, progress=False)
    # Only a judge-changing setting counts: a new threshold on the same judge resumes.
    stricter = CriticConfig(**{**CRITIC.to_dict(), "pair_confidence_threshold": 0.9})
    s = run_preference_pairs(lm_sft, RECORDS, CFG, stricter, d, progress=False)
    assert s["resume"]["instructions_new"] == 0


def test_script_end_to_end_counts_every_dropped_pair(
    tiny_loads, tiny_qwen_dir, tiny_adapter_dir, tmp_path, monkeypatch
):
    """The CLI on a run directory, with a threshold no pair can meet: nothing is kept, every
    considered pair is counted as dropped, the run says so with exit code 1."""
    import yaml

    from scripts.generate_preference_pairs import main

    loads = tiny_loads
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "stage1" / "train.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    shutil.copytree(tiny_adapter_dir, run / "sft" / "adapter")
    cfg = {
        "model": {"name": str(tiny_qwen_dir)},
        "sentinels": {"mode": "off"},
        "pairs": {**CFG.to_dict(), "candidate_sources": ["sft"]},
        "critic": {**CRITIC.to_dict(), "pair_confidence_threshold": 0.999},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc = main(["--config", str(cfg_path), "--run", str(run), "--no-progress"])
    assert rc == 3 and loads == [str(tiny_qwen_dir)]  # nothing kept: the gate exit code
    manifest = json.loads((run / "pairs" / "manifest.json").read_text())
    assert manifest["status"] == "skipped" and manifest["reason"].startswith("no preference pair")
    c = manifest["counts"]
    judged = read_jsonl(run / "pairs" / "judgements.jsonl")
    n_comp = sum(len(j["comparisons"]) for j in judged)
    assert c["instructions"] == 1 and c["candidates"] == 3
    assert c["pairs_kept"] == 0 and (run / "pairs" / "pairs.jsonl").read_text() == ""
    n_usable = 3 - sum(c["candidates_excluded"].values())
    assert c["pairs_considered"] == n_comp == math.comb(n_usable, 2)
    assert c["pairs_dropped"]["below_confidence"] + c["pairs_dropped"]["tie"] == n_comp > 0
    assert all(not p["kept"] for j in judged for p in j["pairs"]) and pair_records(judged[0]) == []
    assert all(x["score"] is not None for x in judged[0]["candidates"] if not x["excluded"])
    assert len(manifest["inputs"]["adapter_sha256"]) == 64
    assert manifest["judge_prompt"]["prompt_version"] == PROMPT_VERSION
    assert manifest["critic_config"]["pair_confidence_threshold"] == 0.999
    assert manifest["model"]["weights_sha256"] and manifest["wall_time_s"] >= 0
    # Bad input is exit 2 with a message, not a traceback.
    cfg["pairs"]["bogus"] = 1
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(cfg_path), "--run", str(run), "--no-progress"]) == 2
