"""Sequential arm evaluation on a tiny random Qwen2 and a tiny LoRA adapter made in the test:
caching, resume, adapter swapping, leakage exclusion, skipped arms, statistics by hand."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from scripts.evaluate_capability_differentiation import parse_adapter_args
from utils import eval_cache, eval_session, evaluation
from utils.clean_model_loader import CleanModelLoader
from utils.eval_arms import ArmSpec, check_adapter_base, resolve_arms
from utils.eval_config import EvalConfig, EvalInputError, ModelSpec
from utils.eval_leakage import check_leakage
from utils.eval_memory_benchmark import make_random_adapter
from utils.eval_prompts import build_eval_set, icl_examples
from utils.eval_sentinels import sentinels_unavailable
from utils.eval_statistics import compute_statistics, per_type_breakdown
from utils.evaluation import run_evaluation
from utils.generation import DecodingConfig
from utils.generation import generate as real_generate
from utils.jsonl_io import read_jsonl
from utils.process_memory import PeakRSSMonitor
from utils.response_format import format_few_shot_prompt, format_prompt

N = 6  # prompts per arm in the model tests: seconds on the tiny model


def small_config(**overrides) -> EvalConfig:
    values = {
        "n_prompts": N,
        "max_new_tokens": 4,
        "batch_size": 4,
        "icl_k": 2,
        "bootstrap_resamples": 200,
        "run_sentinels": False,
        "progress": False,
        "rss_interval_s": 0.01,
    }
    return EvalConfig(**{**values, **overrides})


class Counters:
    """Counts prompts sent to generate() and base-model loads during a run."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.prompts: list[str] = []
        self.loads = 0

        def counting_generate(lm, prompts, *a, **k):
            self.prompts.extend(prompts)
            return real_generate(lm, prompts, *a, **k)

        counters = self

        class CountingLoader(CleanModelLoader):
            def load(self, name_or_path=None):
                counters.loads += 1
                return super().load(name_or_path)

        mp.setattr(eval_cache, "generate", counting_generate)  # the arms' generations
        mp.setattr(evaluation, "generate", counting_generate)  # the base_icl dev choice
        mp.setattr(eval_session, "CleanModelLoader", CountingLoader)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_qwen_dir) -> Path:
    """A run with stage-1 data (one instruction leaks an eval prompt) and an SFT adapter only."""
    run = tmp_path_factory.mktemp("run")
    leaked_prompt = build_eval_set(N)[2]["prompt"]
    (run / "stage1").mkdir()
    train = [
        {"id": "t1", "instruction": "Name three prime numbers."},
        {"id": "t2", "instruction": leaked_prompt},
    ]
    (run / "stage1" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    lm = CleanModelLoader().load(str(tiny_qwen_dir))  # own load: make_random_adapter wraps it
    make_random_adapter(lm, run / "sft" / "adapter", seed=3, rank=2)
    return run


@pytest.fixture(scope="module")
def first_run(run_dir, tiny_qwen_dir):
    """The first full evaluation (all default arms; dpo has no adapter), with counters."""
    with pytest.MonkeyPatch.context() as mp:
        counters = Counters(mp)
        results = run_evaluation(
            run_dir, small_config(), ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None
        )
    return results, counters


# ------------------------------------------------------------------ sequential + cache


def test_arms_run_sequentially_on_one_load_and_missing_adapter_is_skipped(first_run):
    results, counters = first_run
    assert [a["name"] for a in results["arms"]] == ["base", "base_icl", "sft"]
    assert counters.loads == 1  # one base model for all arms, the adapter swapped onto it
    assert len(counters.prompts) == 3 * N
    skipped = {s["name"]: s["reason"] for s in results["skipped_arms"]}
    assert sorted(skipped) == ["cai", "dpo"]  # default arms whose stage left no adapter
    assert all("adapter not found" in reason for reason in skipped.values())
    for arm in results["arms"]:
        assert arm["n_generated"] == N and arm["n_cached"] == 0
        assert arm["memory"]["peak_rss_mib"] >= arm["memory"]["rss_start_mib"] > 0
        assert arm["memory"]["ru_maxrss_mib"] >= arm["memory"]["peak_rss_mib"] * 0.99
        (session,) = arm["generation_sessions"]  # timings kept beside the cache
        assert session["n_generated"] == N and session["new_tokens"] > 0
    # the same decoding and stop policy for every arm, recorded
    assert results["decoding"]["do_sample"] is False
    assert results["decoding"]["stop_strings"] == ["\nInstruction:"]


def test_arm_prompts_are_the_shared_format(first_run):
    results, _ = first_run
    records = build_eval_set(N)
    by_arm = {a["name"]: {g["id"]: g for g in read_jsonl(a["cache_path"])} for a in results["arms"]}
    demos = icl_examples()[:2]
    for rec in records:
        assert by_arm["base"][rec["id"]]["prompt"] == format_prompt(rec["prompt"])
        assert by_arm["sft"][rec["id"]]["prompt"] == format_prompt(rec["prompt"])
        assert by_arm["base_icl"][rec["id"]]["prompt"] == format_few_shot_prompt(
            demos, rec["prompt"]
        )
    # the random adapter really changes the model: sft differs from base somewhere
    assert any(by_arm["sft"][i]["text"] != by_arm["base"][i]["text"] for i in by_arm["base"])


def test_rerun_is_served_from_cache_without_generation_or_model_load(
    first_run, run_dir, tiny_qwen_dir, monkeypatch
):
    results, _ = first_run
    counters = Counters(monkeypatch)
    again = run_evaluation(
        run_dir, small_config(), ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None
    )
    assert counters.prompts == [] and counters.loads == 0
    assert all(a["n_cached"] == N and a["n_generated"] == 0 for a in again["arms"])
    assert again["scores"] == results["scores"]
    assert again["comparisons"] == results["comparisons"]
    assert again["model"]["loaded"] is False
    assert [len(a["generation_sessions"]) for a in again["arms"]] == [1, 1, 1]


def test_interrupted_run_resumes_after_a_torn_line(tmp_path, tiny_qwen_dir, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    cfg = small_config(arms=("base",))
    full = run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)
    cache = Path(full["arms"][0]["cache_path"])
    lines = cache.read_bytes().split(b"\n")
    complete = read_jsonl(cache)
    # A kill mid-write: two complete records, then half of the third, no newline.
    cache.write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + lines[2][: len(lines[2]) // 2])
    counters = Counters(monkeypatch)
    resumed = run_evaluation(run, cfg, ModelSpec(name=str(tiny_qwen_dir)), log=lambda _m: None)
    assert len(counters.prompts) == N - 2
    assert resumed["arms"][0]["n_cached"] == 2 and resumed["arms"][0]["n_generated"] == N - 2
    after = read_jsonl(cache)
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in complete)
    assert {r["id"]: r["text"] for r in after} == {r["id"]: r["text"] for r in complete}
    assert resumed["scores"] == full["scores"]


def test_base_arm_after_an_adapter_arm_sees_the_pristine_base(
    tmp_path, run_dir, tiny_qwen_dir, tiny_qwen
):
    cfg = small_config(arms=("sft", "base"))
    results = run_evaluation(
        run_dir, cfg, ModelSpec(name=str(tiny_qwen_dir)), out_dir=tmp_path, log=lambda _m: None
    )
    base = {g["id"]: g["text"] for g in read_jsonl(results["arms"][1]["cache_path"])}
    records = build_eval_set(N)
    direct = real_generate(
        tiny_qwen,
        [format_prompt(r["prompt"]) for r in records],
        DecodingConfig(max_new_tokens=4, batch_size=4, stop_strings=("\nInstruction:",)),
        progress=False,
    )
    assert [base[r["id"]] for r in records] == [g.text for g in direct]


def test_cached_prompt_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps(
            {"id": "a", "prompt": "old", "text": "x", "stop_reason": "eos", "n_new_tokens": 1}
        )
        + "\n"
    )
    with pytest.raises(EvalInputError, match="differs from the prompt"):
        eval_cache.read_arm_cache(path, {"a": "new"})
    with pytest.raises(EvalInputError, match="not in this prompt set"):
        eval_cache.read_arm_cache(path, {"b": "old"})


# -------------------------------------------------------------------------- leakage


def test_leaked_prompt_is_excluded_from_the_headline_and_counted(first_run):
    results, _ = first_run
    leaked_id = build_eval_set(N)[2]["id"]
    assert results["leakage"]["n_leaked"] == 1 and results["leakage"]["ids"] == [leaked_id]
    assert results["leakage"]["rate"] == pytest.approx(1 / N)
    assert results["headline"] == {
        "n_prompts": N - 1,
        "n_excluded_leaked": 1,
        "exclude_leaked": True,
    }
    for arm in results["arms"]:
        assert arm["summary"]["n_prompts"] == N - 1
        assert arm["summary_all_prompts"]["n_prompts"] == N
    assert all(c["n"] == N - 1 for c in results["comparisons"])
    assert leaked_id not in {s["id"] for s in results["samples"]}


def test_check_leakage_exact_and_topic_overlap():
    records = build_eval_set(20)
    train = [records[0]["prompt"], "Describe the ocean.", "Unrelated: name a prime."]
    leak = check_leakage(records, train, threshold=0.7)
    assert leak["status"] == "checked" and leak["ids"] == [records[0]["id"]]
    assert leak["n_leaked"] == 1 and leak["rate"] == pytest.approx(1 / 20)
    ocean = sum(r["prompt"].startswith("Describe the ocean.") for r in records)
    assert leak["topic_overlap"]["n_prompts"] >= ocean >= 1
    assert check_leakage(records, None, 0.7)["status"] == "not_checked"
    assert check_leakage(records, [], 0.7)["n_leaked"] == 0


# --------------------------------------------------------------------------- arms / input


def test_resolve_arms_skips_missing_adapters_and_rejects_unknown_names(tmp_path):
    (tmp_path / "sft" / "adapter").mkdir(parents=True)  # exists but incomplete
    extra = tmp_path / "other"
    specs, skipped = resolve_arms(tmp_path, ["base", "sft", "dpo"], {"cai": extra})
    assert specs == [ArmSpec("base", "zero_shot")]
    assert [(s["name"], s["reason"].split(":")[0]) for s in skipped] == [
        ("sft", "adapter incomplete"),
        ("dpo", "adapter not found"),
        ("cai", "adapter not found"),
    ]
    with pytest.raises(EvalInputError, match="unknown arm 'cia'"):
        resolve_arms(tmp_path, ["base", "cia"])


def test_parse_adapter_args_and_config_reject_bad_input():
    assert parse_adapter_args(["cai=runs/x/cai"]) == {"cai": Path("runs/x/cai")}
    for bad in (["cai"], ["=p"], ["base=p"], ["a b=p"], ["x=1", "x=2"]):
        with pytest.raises(EvalInputError):
            parse_adapter_args(bad)
    with pytest.raises(ValueError, match="unknown eval config key"):
        EvalConfig.from_dict({"n_prompt": 5})
    with pytest.raises(ValueError, match="icl_k"):
        EvalConfig(icl_k=99)
    with pytest.raises(ValueError, match="twice"):
        EvalConfig.from_dict({"arms": "base,base"})
    assert EvalConfig.from_dict({"arms": "base, sft"}).arms == ("base", "sft")


def test_adapter_of_another_base_is_refused_before_generation(tmp_path):
    (tmp_path / "adapter_manifest.json").write_text(
        json.dumps({"base_model_id": "other", "base_weights_sha256": "ab" * 32})
    )
    with pytest.raises(EvalInputError, match="trained on base 'other'"):
        check_adapter_base(tmp_path, "cd" * 32)
    check_adapter_base(tmp_path, "ab" * 32)
    with pytest.raises(EvalInputError, match="missing"):
        check_adapter_base(tmp_path / "nowhere", "ab" * 32)


def test_model_spec_rejects_unknown_keys():
    assert ModelSpec.from_dict({"name": "m", "dtype": None}) == ModelSpec(name="m")
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelSpec.from_dict({"nmae": "m"})


def test_cache_key_tracks_what_changes_outputs_but_not_batch_size():
    base = {
        "weights_sha256": "w",
        "adapter_sha256": None,
        "prompt_set_sha256": "p",
        "decoding": DecodingConfig(max_new_tokens=64, batch_size=32),
        "prompt_format": {"format": "zero_shot"},
        "load_options": {"dtype": None},
    }
    key = eval_cache.cache_key(eval_cache.cache_key_fields(**base))
    same = {**base, "decoding": DecodingConfig(max_new_tokens=64, batch_size=4)}
    assert eval_cache.cache_key(eval_cache.cache_key_fields(**same)) == key
    for change in (
        {"adapter_sha256": "a"},
        {"weights_sha256": "w2"},
        {"prompt_set_sha256": "p2"},
        {"decoding": DecodingConfig(max_new_tokens=32)},
        {"prompt_format": {"format": "few_shot", "k": 3}},
        {"load_options": {"dtype": "bfloat16"}},
    ):
        assert eval_cache.cache_key(eval_cache.cache_key_fields(**{**base, **change})) != key


# ------------------------------------------------------------------------- sentinels


def test_sentinel_not_importable_is_recorded_as_not_run(monkeypatch):
    import utils

    monkeypatch.setitem(sys.modules, "utils.contamination", None)  # import now raises
    monkeypatch.delattr(utils, "contamination", raising=False)
    out = sentinels_unavailable(small_config(run_sentinels=True))
    assert out["verdict"] == "not run" and "not importable" in out["reason"]
    assert sentinels_unavailable(small_config())["status"] == "disabled"
    for off in ("off", False, None):  # YAML reads a bare `off` as False (KNOWN_BUGS #10)
        cfg = small_config(run_sentinels=True, sentinel={"mode": off})
        assert sentinels_unavailable(cfg)["reason"] == "sentinels.mode=off"


def test_sentinel_suite_runs_once_per_model_state_and_is_cached(
    first_run, tmp_path, run_dir, tiny_qwen_dir, monkeypatch
):
    """The real static sentinel suite (seconds on the tiny model), counted through a wrapper."""
    from utils import contamination

    real_suite, calls = contamination.run_sentinel_suite, []

    def counting_suite(lm, config, trained_arm=None):
        calls.append((list(lm.adapters), trained_arm))
        return real_suite(lm, config, trained_arm=trained_arm)

    monkeypatch.setattr(contamination, "run_sentinel_suite", counting_suite)
    cfg = small_config(
        run_sentinels=True, sentinel={"mode": "static"}, arms=("base", "base_icl", "sft")
    )
    spec = ModelSpec(name=str(tiny_qwen_dir))
    shutil.copytree(run_dir / "eval" / "cache", tmp_path / "cache")  # generations are cached
    results = run_evaluation(run_dir, cfg, spec, out_dir=tmp_path, log=lambda _m: None)
    assert all(a["n_generated"] == 0 for a in results["arms"])
    sentinels = [a["sentinel"] for a in results["arms"]]
    assert [(s["status"], s["verdict"]) for s in sentinels] == [("ran", "clean")] * 3
    for s in sentinels:  # the suite ran as configured: static checks only, every one passed
        d = s["details"]
        assert d["config"]["mode"] == "static" and d["weight_probe"] is None
        assert d["static"] and all(c["passed"] for c in d["static"]), d["static"]
    # base and base_icl share the model state: 2 calls, the second with the adapter attached
    assert [c[0] == [] for c in calls] == [True, False]
    assert [c[1] for c in calls] == [False, True]  # the adapter arm is judged as a trained arm
    assert [s["details"]["trained_arm"] for s in sentinels] == [False, False, True]
    counters = Counters(monkeypatch)
    again = run_evaluation(run_dir, cfg, spec, out_dir=tmp_path, log=lambda _m: None)
    assert len(calls) == 2 and counters.loads == 0  # verdicts served from the cache
    assert [a["sentinel"] for a in again["arms"]] == sentinels


# ------------------------------------------------------------------- statistics by hand


def _scores(records, strict_by_id):
    """Score dicts with prompt_strict and per-instruction strict results given by hand."""
    out = {}
    for r in records:
        inst = strict_by_id[r["id"]]
        out[r["id"]] = {
            "prompt_strict": all(inst),
            "prompt_loose": all(inst),
            "instruction_strict": inst,
            "instruction_loose": inst,
        }
    return out


def test_compute_statistics_matches_hand_values():
    # 10 one-instruction prompts. A succeeds on 0-1; B on 0-6: 5 prompts B only, 0 A only.
    records = [
        {"id": f"r{i}", "instruction_ids": ["t:x" if i < 5 else "t:y"], "kwargs": [{}]}
        for i in range(10)
    ]
    a = _scores(records, {f"r{i}": [i < 2] for i in range(10)})
    b = _scores(records, {f"r{i}": [i < 7] for i in range(10)})
    cfg = EvalConfig(bootstrap_resamples=500)
    out = compute_statistics(records, {"base_icl": a, "sft": b}, ["base_icl", "sft"], cfg)
    s = out["summaries"]["sft"]["prompt_strict"]
    assert (s["n"], s["successes"], s["accuracy"]) == (10, 7, 0.7)
    (row,) = out["comparisons"]
    assert (row["n_a_only"], row["n_b_only"]) == (0, 5)
    assert row["p_value"] == pytest.approx(2 * 0.5**5)  # exact McNemar: 2 * P(X <= 0 | 5)
    assert row["p_value_holm"] == row["p_value"]  # a family of one
    assert row["diff"] == pytest.approx(0.5)
    (verdict,) = out["verdicts"]
    # p = 0.0625 > 0.05: a 50-point gain on 10 prompts is not significant
    assert verdict["verdict"] == "no significant difference" and verdict["gain"] == 0.5
    assert out["mde"]["reference_arm"] == "base_icl" and out["mde"]["n"] == 10
    # per type: t:x holds r0-r4 (A 2/5, B 5/5: 3 B only), t:y r5-r9 (A 0, B 2: 2 B only)
    x, y = out["per_type"]
    assert (x["type"], x["accuracy"]) == ("t:x", {"base_icl": 0.4, "sft": 1.0})
    assert x["comparisons"][0]["p_value"] == pytest.approx(2 * 0.5**3)  # 0.25
    assert y["comparisons"][0]["p_value"] == pytest.approx(2 * 0.5**2)  # 0.5
    # Holm across the two types: sorted (0.25, 0.5) -> (2 * 0.25, max(0.5, 1 * 0.5))
    assert x["comparisons"][0]["p_value_holm"] == pytest.approx(0.5)
    assert y["comparisons"][0]["p_value_holm"] == pytest.approx(0.5)


def test_verdict_says_loses_when_a_trained_arm_is_significantly_worse():
    records = [{"id": f"r{i}", "instruction_ids": ["t:x"], "kwargs": [{}]} for i in range(12)]
    icl = _scores(records, {f"r{i}": [True] for i in range(12)})
    sft = _scores(records, {f"r{i}": [i < 2] for i in range(12)})  # 10 A only
    out = compute_statistics(
        records, {"base_icl": icl, "sft": sft}, ["base_icl", "sft"], EvalConfig()
    )
    (v,) = out["verdicts"]
    assert v["verdict"] == "loses to" and v["gain"] == pytest.approx(-10 / 12)
    assert v["p_value_holm"] == pytest.approx(2 * 0.5**10)


def test_per_type_holm_is_per_comparison_across_types():
    records = [
        {"id": "p1", "instruction_ids": ["t:a", "t:b"]},
        {"id": "p2", "instruction_ids": ["t:a"]},
    ]
    scores = {
        "x": {"p1": {"instruction_strict": [False, False]}, "p2": {"instruction_strict": [False]}},
        "y": {"p1": {"instruction_strict": [True, False]}, "p2": {"instruction_strict": [True]}},
    }
    rows = per_type_breakdown(records, scores, ["x", "y"], [("x", "y")])
    assert [(r["type"], r["n"]) for r in rows] == [("t:a", 2), ("t:b", 1)]
    assert rows[0]["accuracy"] == {"x": 0.0, "y": 1.0}
    assert rows[0]["comparisons"][0]["p_value"] == pytest.approx(0.5)  # 2 of 2 discordant
    assert rows[1]["comparisons"][0]["p_value"] == 1.0  # no discordant pair
    assert [r["comparisons"][0]["p_value_holm"] for r in rows] == pytest.approx([1.0, 1.0])


def test_peak_rss_monitor_sees_a_temporary_allocation():
    import time

    with PeakRSSMonitor(0.01) as mon:
        block = b"x" * (64 * 1024 * 1024)  # written, so resident
        time.sleep(0.1)
        del block
    d = mon.to_dict()
    assert d["peak_rss_mib"] - d["rss_start_mib"] >= 50
    assert d["ru_maxrss_mib"] >= d["peak_rss_mib"] * 0.99 and mon.n_samples >= 2


# ------------------------------------------------------------------------------------ CLI


def _cli_main():
    import importlib.util

    path = (
        Path(__file__).resolve().parent.parent
        / "scripts"
        / "evaluate_capability_differentiation.py"
    )
    spec = importlib.util.spec_from_file_location("evaluate_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_runs_extra_adapter_arms_and_rejects_bad_input(tmp_path, run_dir, tiny_qwen_dir):
    main = _cli_main()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model:\n  name: {tiny_qwen_dir}\neval:\n  n_prompts: 4\n  max_new_tokens: 3\n"
        "  run_sentinels: false\n"
    )
    common = ["--config", str(cfg), "--no-progress", "--out", str(tmp_path / "eval")]
    adapter = f"extra={run_dir / 'sft' / 'adapter'}"
    argv = ["--run", str(run_dir), "--arms", "base", "--adapter", adapter, *common]
    assert main([*argv, "--set", "eval.bootstrap_resamples=100"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["base", "extra"]
    assert results["config"]["bootstrap_resamples"] == 100 and results["prompt_set"]["n"] == 4
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and manifest["model_provenance"]["weights_sha256"]
    assert (tmp_path / "eval" / "report.md").exists()
    assert main([*argv[:2], "--arms", "base,nope", *common]) == 2
    assert main(["--run", str(tmp_path / "missing"), *common]) == 2
    assert main([*argv, "--set", "eval.n_prompt=3"]) == 2
    assert main([*argv, "--set", "eval.icl_k=0"]) == 2
    assert main([*argv[:2], "--adapter", "broken", *common]) == 2
