"""The constitution evaluation wired into the evaluation (tiny model), and the dev-chosen
in-context baseline: both computed per arm, cached, and reported."""

from __future__ import annotations

import pytest

from utils.eval_config import EvalConfig, ModelSpec
from utils.eval_memory_benchmark import make_random_adapter
from utils.eval_prompts import TASKS, build_eval_set
from utils.evaluation import run_evaluation
from utils.generation import generate as real_generate
from utils.icl_selection import DEV_TASKS, ICL_CANDIDATES, build_dev_set, choose, icl_prompt
from utils.report_markdown import render_markdown


def _config(**extra) -> EvalConfig:
    return EvalConfig(n_prompts=4, max_new_tokens=3, batch_size=8, icl_k=2,
                      bootstrap_resamples=100, run_sentinels=False, progress=False,
                      arms=("base", "base_icl", "sft"), **extra)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_qwen_dir):
    from utils.clean_model_loader import CleanModelLoader

    run = tmp_path_factory.mktemp("run")
    lm = CleanModelLoader().load(str(tiny_qwen_dir))
    make_random_adapter(lm, run / "sft" / "adapter", seed=3, rank=2)
    return run


def test_constitution_measures_every_arm_paired_and_cached(run, tiny_qwen_dir, monkeypatch):
    from utils.eval_constitution import eval_items

    items = eval_items()
    cfg = _config(constitution=True)
    results = run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)
    c = results["constitution"]
    assert c["n"] == {k: len(v) for k, v in items.items()}
    assert c["n"]["harmful"] >= 60 and c["n"]["overrefusal"] >= 60
    for measure in ("harmful_safe", "overrefusal", "principle_preference"):
        assert set(c[measure]["summaries"]) == {"base", "base_icl", "sft"}
        assert len(c[measure]["comparisons"]) == 3  # every pair of arms, Holm across them
    assert "## Constitution" in render_markdown(results)
    # A rerun generates nothing new: generations and margins come from the cache.
    prompts: list[str] = []

    def counting(lm, p, *a, **k):
        prompts.extend(p)
        return real_generate(lm, p, *a, **k)

    monkeypatch.setattr("utils.generation.generate", counting)
    again = run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)
    assert prompts == []
    assert again["constitution"]["harmful_safe"] == c["harmful_safe"]


def test_dev_chosen_icl_setting_is_recorded_and_used_by_base_icl(run, tiny_qwen_dir):
    cfg = _config(icl_candidates=("icl3", "urial3"), icl_dev_prompts=4)
    results = run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)
    sel = results["decoding"]["icl_selection"]
    assert sel["chosen"] in ("icl3", "urial3") and set(sel["dev_accuracy"]) == {"icl3", "urial3"}
    arm = next(a for a in results["arms"] if a["name"] == "base_icl")
    k, preamble = ICL_CANDIDATES[sel["chosen"]]
    assert results["decoding"]["icl_k"] == k and results["decoding"]["icl_preamble"] == preamble
    assert arm["example_prompt"].startswith(preamble or "Instruction:")


def test_dev_split_is_disjoint_from_the_test_prompts():
    assert not set(DEV_TASKS) & set(TASKS)
    dev = build_dev_set(40, 7)
    test_prompts = {r["prompt"] for r in build_eval_set(320, 1234)}
    from utils.constraint_library import eval_phrasing_match

    for r in dev:
        assert r["prompt"] not in test_prompts
        assert eval_phrasing_match(r["prompt"]) is None  # training phrasings only
    assert choose({"icl3": 0.2, "urial6": 0.2, "icl6": 0.1}) == "icl3"  # ties: fewer demos
    assert (
        icl_prompt("", [("a", "b")], "c")
        == "Instruction: a\nResponse: b\n\nInstruction: c\nResponse:"
    )
