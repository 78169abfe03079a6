"""Contrastive principle pairs (RLCD): the contexts in the constitution, the label rule on hand
values, filters, pair format and counts (pure, well under a second); then on the tiny random
Qwen2: both contexts answered by the policy, answers stored without context, the likelihood
gains reproduced on the base weights, kill-and-resume, the evaluation guard and the CLI."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import yaml

from tests.conftest import fresh_copy
from utils.constitution_config import CAIConfig
from utils.constitution_contrastive import (
    CONTEXT_ECHO_WORDS,
    DROP_REASONS,
    answer_problem,
    checker_verdict,
    context_echo,
    context_prompt,
    contrastive_label,
    contrastive_prompt_id,
    ends_complete,
    eval_leaks,
    pair_record,
    run_cai,
    run_contrastive,
    summarize_records,
)
from utils.constitution_prompts import (
    DEFAULT_CONSTITUTION,
    ConstitutionError,
    cai_prompt_id,
    load_constitution,
    parse_constitution,
    sample_principle,
)
from utils.critic_prompts import pmi_completion
from utils.dedup import leakage_check
from utils.eval_prompts import build_eval_set
from utils.jsonl_io import JsonlError, read_jsonl
from utils.response_format import RESPONSE_STOP_STRINGS, format_completion, format_prompt

REAL = yaml.safe_load(DEFAULT_CONSTITUTION.read_text(encoding="utf-8"))
CFG = CAIConfig()  # T = 1, checker vote 0.9


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the contexts in the constitution ------------------------------------------------------------


def test_every_principle_has_two_plain_one_paragraph_contexts():
    c = load_constitution()
    for p in c.principles:
        for ctx in (p.follow_context, p.violate_context):
            assert ctx and "\n\n" not in ctx and ctx.endswith(".")
            # No role names: "the assistant" / "user" / "chat" prime dialogue style
            # (BASE_MODEL_TRUTH.md); the contexts speak of "the answers below".
            low = ctx.lower()
            assert not any(w in low for w in ("assistant", "user", "chat", "instruction:")), ctx
        assert p.follow_context != p.violate_context


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["principles"][0].pop("follow_context"),
         r"principles\[0\] \(id 'helpful'\), field 'follow_context': missing required field"),
        (lambda d: d["principles"][3].pop("violate_context"),
         r"principles\[3\] \(id 'no_fabrication'\), field 'violate_context': missing required"),
        (lambda d: d["principles"][2].__setitem__("follow_context", "  "),
         r"principles\[2\] \(id 'honest'\), field 'follow_context': is empty"),
        (lambda d: d["principles"][1].__setitem__("violate_context", ["x"]),
         r"principles\[1\].*field 'violate_context': expected a string, got list"),
        (lambda d: d["principles"][4].__setitem__("follow_context", "Safe answers.\n\nMore."),
         r"principles\[4\].*field 'follow_context': a context is one paragraph"),
        (lambda d: d["principles"][5].__setitem__("violate_context", "Bad <start_of_turn> ones."),
         r"principles\[5\].*field 'violate_context': contains chat markup"),
        (lambda d: d["principles"][6].__setitem__("follow_context", "Short. Response: yes."),
         r"principles\[6\].*field 'follow_context': contains the document header 'Response:'"),
        (lambda d: d["principles"][7].__setitem__(
            "violate_context", " " + d["principles"][7]["follow_context"]),
         r"principles\[7\] \(id 'on_topic'\), field 'violate_context': is identical to"),
    ],
)  # fmt: skip
def test_loader_refuses_a_principle_without_valid_contexts(tmp_path, edit, match):
    data = copy.deepcopy(REAL)
    edit(data)
    path = tmp_path / "constitution.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConstitutionError, match=match) as e:
        load_constitution(path)
    assert str(e.value).startswith(str(path))


def test_config_mode_and_contrastive_keys():
    assert CAIConfig().mode == "contrastive"
    assert CAIConfig.from_dict({"mode": "both"}).mode == "both"
    for bad, match in (
        ({"mode": "rlcd"}, "cai.mode must be one of"),
        ({"contrastive_score_text": "judge_question"}, "cai.contrastive_score_text must be"),
        ({"contrastive_temperature": 0.0}, "cai.contrastive_temperature must be > 0"),
        ({"contrastive_checker_p": 0.5}, r"cai.contrastive_checker_p must be in \(0.5, 1\]"),
        ({"contrastive_temperature": "1"}, "cai.contrastive_temperature: expected float"),
    ):
        with pytest.raises(ValueError, match=match):
            CAIConfig.from_dict(bad)
    # the CPU recipe's section loads and sets every contrastive key
    cpu = yaml.safe_load((DEFAULT_CONSTITUTION.parent / "cpu_default.yaml").read_text())["cai"]
    assert {"mode", "contrastive_score_text", "contrastive_temperature",
            "contrastive_checker_p"} <= set(cpu)  # fmt: skip
    CAIConfig.from_dict(cpu)


# -- prompts, filters, checkers, label (pure) -----------------------------------------------------


def test_context_prompt_is_the_context_then_the_one_format():
    assert context_prompt(" The answers below are short. ", "Name a fruit.") == (
        "The answers below are short.\n\nInstruction: Name a fruit.\nResponse:"
    )
    with pytest.raises(ValueError, match="context is empty"):
        context_prompt(" ", "Name a fruit.")


def test_context_echo_and_answer_filters():
    ctx = ("The answers below are short and to the point.", "The answers below ramble.")
    assert context_echo("Sure. the ANSWERS below are short and to, the point!", ctx) == (
        "the answers below are short and"
    )
    assert context_echo("Short answers are below.", ctx) is None
    # a context shorter than the run length counts when repeated whole, not in part
    assert context_echo("x the answers below ramble y", ctx) == "the answers below ramble"
    assert context_echo("x the answers below y", ctx) is None
    f = ("<|endoftext|>",)
    ok = "An apple."
    assert answer_problem("follow", ok, "eos", f, ctx, True) == (None, None)
    assert answer_problem("follow", "  ", "eos", f, ctx, True) == ("follow_empty", None)
    assert answer_problem("violate", "Hi<|endoftext|>", "eos", f, ctx, True)[0] == (
        "violate_leaked"
    )
    assert answer_problem("follow", "Fine.\nAssistant: more", "eos", f, ctx, True) == (
        "follow_leaked", "Assistant:"
    )  # fmt: skip
    assert answer_problem("follow", "Ok. Instruction: again", "eos", f, ctx, True)[0] == (
        "follow_leaked"
    )
    assert answer_problem("violate", "<start_of_turn>model", "eos", f, ctx, True)[0] == (
        "violate_leaked"
    )
    assert answer_problem("follow", "The answers below are short and to the point. A.",
                          "eos", f, ctx, True)[0] == "follow_leaked"  # fmt: skip
    assert answer_problem("violate", ok, "max_new_tokens", f, ctx, True) == (
        "violate_truncated", None
    )  # fmt: skip
    assert answer_problem("violate", ok, "max_new_tokens", f, ctx, False) == (None, None)


def _gen(text: str, stop: str = "eos") -> dict:
    return {"text": text, "stop_reason": stop}


def test_checker_verdicts():
    lower = {"instruction_ids": ["change_case:english_lowercase", "punctuation:no_comma"],
             "kwargs": [{}, {}]}  # fmt: skip
    v = checker_verdict("follow_constraints", lower, _gen("an apple"), _gen("An apple, yes"))
    assert v == {"name": "follow_constraints", "follow": 1.0, "violate": 0.0, "prefers": "follow"}
    v = checker_verdict("follow_constraints", lower, _gen("An apple"), _gen("a pear"))
    assert (v["follow"], v["violate"], v["prefers"]) == (0.5, 1.0, "violate")
    assert checker_verdict("follow_constraints", lower, _gen("x"), _gen("y"))["prefers"] is None
    assert (
        checker_verdict("follow_constraints", {"instruction_ids": []}, _gen("A"), _gen("B")) is None
    )
    assert checker_verdict("follow_constraints", {}, _gen("A"), _gen("B")) is None
    v = checker_verdict("complete_ending", {}, _gen('It said "stop."'), _gen("It said"))
    assert v["prefers"] == "follow"
    v = checker_verdict("complete_ending", {}, _gen("Done.", "max_new_tokens"), _gen("Done!"))
    assert v["prefers"] == "violate"  # cut off by the token limit: not complete
    assert ends_complete("Really?)", "eos") and not ends_complete("Really?) no", "eos")
    v = checker_verdict("concise", {}, _gen("Paris."), _gen("It is the city of Paris."))
    assert (v["follow"], v["violate"], v["prefers"]) == (1.0, 6.0, "follow")
    assert checker_verdict("concise", {}, _gen("A b."), _gen("C d."))["prefers"] is None
    assert checker_verdict("honest", lower, _gen("a"), _gen("B")) is None


def test_label_rule_on_hand_values():
    # No checker: p = sigmoid((g_f - g_v) / T).
    lab = contrastive_label(0.3, 0.1, None, CFG)
    assert lab["p_llh"] == pytest.approx(_sig(0.2)) and lab["p_check"] is None
    assert lab["soft_label"] == lab["p_llh"] and lab["drop_reason"] is None
    assert lab["margin"] == pytest.approx(2 * _sig(0.2) - 1) and lab["chosen"] == "follow"
    sharp = CAIConfig(contrastive_temperature=0.1)
    assert contrastive_label(0.3, 0.1, None, sharp)["soft_label"] == pytest.approx(_sig(2.0))
    # The likelihood contradicts the construction: dropped; equal gains: a tie, dropped.
    assert contrastive_label(0.1, 0.3, None, CFG)["drop_reason"] == "label_contradicts"
    assert contrastive_label(0.2, 0.2, None, CFG)["drop_reason"] == "label_tie"
    # Checker agreeing: mean of 0.9 and p_llh (rescues a weakly contradicting likelihood).
    lab = contrastive_label(0.1, 0.3, "follow", CFG)
    assert lab["p_check"] == 0.9
    assert lab["soft_label"] == pytest.approx((0.9 + _sig(-0.2)) / 2) and not lab["drop_reason"]
    # Checker disagreeing: mean of 0.1 and p_llh: dropped unless the likelihood is near-certain.
    lab = contrastive_label(0.3, 0.1, "violate", CFG)
    assert lab["soft_label"] == pytest.approx((0.1 + _sig(0.2)) / 2)
    assert lab["drop_reason"] == "label_contradicts"
    lab = contrastive_label(0.3, 0.1, "violate", CAIConfig(contrastive_temperature=0.01))
    assert lab["soft_label"] == pytest.approx((0.1 + _sig(20.0)) / 2) and not lab["drop_reason"]
    # The checker's vote is configurable; a checker tie counts as absent.
    lab = contrastive_label(0.0, 0.0, "follow", CAIConfig(contrastive_checker_p=0.7))
    assert lab["soft_label"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="prefers must be"):
        contrastive_label(0.0, 0.0, "chosen", CFG)


def test_prompt_id_is_distinct_from_the_revise_path_and_tracks_what_labels():
    c = load_constitution()
    pid = contrastive_prompt_id(c, CFG)
    assert pid["cai_prompt_id"].startswith("rlcd-v1/constitution-v1/revision_request/")
    assert pid["cai_prompt_id"] != cai_prompt_id(c, CFG)["cai_prompt_id"]
    assert pid == contrastive_prompt_id(parse_constitution(REAL, "elsewhere.yaml"), CFG)
    edited = copy.deepcopy(REAL)
    edited["principles"][0]["violate_context"] = "The answers below are useless."
    for other in (
        contrastive_prompt_id(parse_constitution(edited), CFG),
        contrastive_prompt_id(c, CAIConfig(contrastive_temperature=0.5)),
        contrastive_prompt_id(c, CAIConfig(contrastive_score_text="follow_context")),
    ):
        assert other["cai_prompt_id"] != pid["cai_prompt_id"]
    assert contrastive_prompt_id(c, CAIConfig(label_margin=0.3)) == pid  # revise-only setting


def _record(rid, drop=None, p_llh=0.7, checker=None, principle="helpful"):
    scored = drop is None or drop.startswith("label")
    p = p_llh if drop != "label_contradicts" else 0.3
    return {
        "id": rid, "instruction": f"Say {rid}.", "type": "t", "principle": {"id": principle},
        "policy": {"name": "base"}, "prompt_id": {"cai_prompt_id": "rlcd-v1/x"},
        "follow": None if drop == "eval_leak" else {"text": "Yes.", "stop_reason": "eos"},
        "violate": None if drop == "eval_leak" else {"text": "No", "stop_reason": "eos"},
        "scores": {"follow": {"pmi_nats_per_token": 0.2}, "violate": {"pmi_nats_per_token": 0.1},
                   "checker": checker} if scored else None,
        "label": {"p_llh": p, "p_check": None, "soft_label": p, "margin": 2 * p - 1,
                  "chosen": "follow", "drop_reason": drop} if scored else None,
        "kept": drop is None, "drop_reason": drop, "leak": None,
    }  # fmt: skip


def test_pair_record_format_and_counts_of_every_drop_reason():
    chk = {"name": "concise", "follow": 1.0, "violate": 3.0, "prefers": "follow"}
    kept = _record("a", checker=chk)
    pair = pair_record(kept)
    assert pair["id"] == "a:rlcd" and pair["instruction_id"] == "a"
    assert pair["prompt"] == format_prompt("Say a.") == "Instruction: Say a.\nResponse:"
    assert (pair["chosen"], pair["rejected"]) == (" Yes.", " No")
    assert pair["soft_label"] == 0.7 and pair["margin"] == pytest.approx(0.4)
    assert pair["judge"]["checker"] == chk and pair["judge"]["cai_prompt_id"] == "rlcd-v1/x"
    records = [kept, _record("b", checker={**chk, "prefers": "violate"}, principle="concise")]
    records += [_record(f"d{k}", drop=r) for k, r in enumerate(DROP_REASONS)]
    assert all(pair_record(r) is None for r in records[2:])
    s = summarize_records(records)
    assert s["instructions"] == 2 + len(DROP_REASONS) and s["pairs_kept"] == 2
    assert s["pairs_dropped"] == dict.fromkeys(DROP_REASONS, 1)
    assert s["scored"] == 4  # two kept, the tie and the contradicting one
    assert s["checker"] == {"concise": {"agrees": 1, "disagrees": 1}}
    assert s["llh_prefers_follow_rate"] == pytest.approx(3 / 4)
    assert sum(s["soft_label_histogram_kept"]["counts"]) == 2
    assert sum(s["soft_label_histogram_scored"]["counts"]) == 4


def test_eval_guard_flags_evaluation_prompts():
    ev = build_eval_set()
    items = ["Name three fruits that are red.", ev[5]["prompt"], ev[9]["prompt"] + " Thanks."]
    leaks = eval_leaks(items)
    assert sorted(leaks) == [1, 2]
    assert leaks[1] == (ev[5]["prompt"], 1.0) and leaks[2][0] == ev[9]["prompt"]
    assert eval_leaks([]) == {}


def test_run_cai_refuses_a_directory_laid_out_for_another_mode(tmp_path):
    (tmp_path / "a" / "revise").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"from a cai.mode=both run, but cai.mode is 'contrast"):
        run_cai(None, [], CFG, load_constitution(), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "records.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"records.jsonl: written by a single-mode run"):
        run_cai(None, [], CAIConfig(mode="both"), load_constitution(), tmp_path / "b")


# ================================================================================================
# On the tiny random Qwen2.

EVAL = build_eval_set()
RECORDS = [
    {"id": "t-a", "instruction": "Name a fruit.", "type": "open_qa"},
    {"id": "t-b", "instruction": "What is 2 + 3?", "type": "math_word"},
    {"id": "t-c", "instruction": "Describe a river in lowercase letters.", "type": "advice",
     "instruction_ids": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"id": "t-d", "instruction": "Give one tip for sleeping well.", "type": "advice"},
    {"id": "t-e", "instruction": "Write a line about the sea.", "type": "creative"},
    {"id": "t-f", "instruction": "Why is the sky blue?", "type": "open_qa"},
    {"id": "t-leak", "instruction": EVAL[3]["prompt"], "type": "advice"},  # an eval item
]  # fmt: skip
TINY = CAIConfig(
    policy="base",
    response_max_new_tokens=6,
    exclude_truncated=False,  # a random model never ends by itself
    instructions_per_chunk=4,
    batch_size=16,
    contrastive_temperature=0.05,
)
BASE = {"name": "base", "adapter": None, "adapter_sha256": None}


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("rlcd-tiny")
    c = load_constitution()
    summary = run_contrastive(tiny_qwen, RECORDS, TINY, c, out, BASE, progress=False)
    return out, summary, c


def test_tiny_both_contexts_sampled_and_pairs_carry_no_context(tiny_run, tiny_qwen):
    from utils.constitution import _decoding
    from utils.generation import generate

    out, summary, c = tiny_run
    records = read_jsonl(out / "records.jsonl")
    pairs = read_jsonl(out / "pairs.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in RECORDS]
    counts = summary["counts"]
    assert counts["instructions"] == 7 and counts["pairs_kept"] == len(pairs) > 0
    assert counts["pairs_kept"] + sum(counts["pairs_dropped"].values()) == 7
    answered = [r for r in records if r["follow"]]
    assert len(answered) == 6
    for r in answered:
        p = c.principle(r["principle"]["id"])
        assert p == sample_principle(c, TINY.seed, r["id"])
        assert r["follow"]["prompt"] == context_prompt(p.follow_context, r["instruction"])
        assert r["violate"]["prompt"] == context_prompt(p.violate_context, r["instruction"])
        assert r["follow"]["seed"] == r["violate"]["seed"] == TINY.seed
    # The stored raw completions are what the model writes after each context.
    prompts = [r[s]["prompt"] for r in answered for s in ("follow", "violate")]
    again = generate(tiny_qwen, prompts, _decoding(TINY, "response", RESPONSE_STOP_STRINGS),
                     seed=TINY.seed, progress=False)  # fmt: skip
    assert [g.raw_completion for g in again] == [
        r[s]["raw_completion"] for r in answered for s in ("follow", "violate")
    ]
    by_id = {r["id"]: r for r in records}
    for pair in pairs:
        r = by_id[pair["instruction_id"]]
        p = c.principle(r["principle"]["id"])
        assert pair["prompt"] == format_prompt(r["instruction"])
        assert pair["chosen"] == format_completion(r["follow"]["text"])
        assert pair["rejected"] == format_completion(r["violate"]["text"])
        for text in (pair["prompt"], pair["chosen"], pair["rejected"]):
            for ctx in (p.follow_context, p.violate_context):
                assert ctx not in text
                assert context_echo(text, [ctx], CONTEXT_ECHO_WORDS) is None
        assert pair["soft_label"] > 0.5 and pair["margin"] == pytest.approx(
            2 * pair["soft_label"] - 1
        )


def test_tiny_scores_are_base_likelihood_gains_and_labels_follow_the_rule(tiny_run, tiny_qwen):
    from utils.scoring import completion_logprobs

    out, summary, c = tiny_run
    records = read_jsonl(out / "records.jsonl")
    scored = [r for r in records if r["scores"]]
    assert scored and summary["counts"]["scored"] == len(scored)
    for r in scored:
        p = c.principle(r["principle"]["id"])
        null = format_prompt(r["instruction"])
        cond = p.revision_request + "\n\n" + null
        assert r["scores"]["score_prefix"] == cond and r["scores"]["null_prefix"] == null
        got = completion_logprobs(
            tiny_qwen, [cond, null, cond, null],
            [pmi_completion(r[s]["text"]) for s in ("follow", "follow", "violate", "violate")],
        )  # fmt: skip
        for k, side in enumerate(("follow", "violate")):
            (lc, n), (ln, _) = got[2 * k], got[2 * k + 1]
            assert r["scores"][side]["pmi_nats_per_token"] == pytest.approx((lc - ln) / n, abs=1e-4)
        check = checker_verdict(r["principle"]["id"], r, r["follow"], r["violate"])
        assert r["scores"]["checker"] == check
        want = contrastive_label(
            r["scores"]["follow"]["pmi_nats_per_token"],
            r["scores"]["violate"]["pmi_nats_per_token"],
            None if check is None else check["prefers"], TINY,
        )  # fmt: skip
        assert r["label"] == want
        # contradicting pairs are dropped and counted, never written
        assert r["kept"] == (r["label"]["soft_label"] > 0.5)
        assert r["kept"] or r["drop_reason"] in ("label_contradicts", "label_tie")
    contradicted = [r for r in scored if r["drop_reason"] == "label_contradicts"]
    assert contradicted  # this seed has some: the filter is exercised
    assert summary["counts"]["pairs_dropped"]["label_contradicts"] == len(contradicted)
    pair_ids = {p["instruction_id"] for p in read_jsonl(out / "pairs.jsonl")}
    assert not pair_ids & {r["id"] for r in contradicted}


def test_tiny_no_evaluation_item_reaches_the_pairs(tiny_run):
    out, summary, _ = tiny_run
    leak = next(r for r in read_jsonl(out / "records.jsonl") if r["id"] == "t-leak")
    assert leak["drop_reason"] == "eval_leak" and leak["follow"] is None
    assert leak["leak"] == EVAL[3]["prompt"]
    assert summary["counts"]["pairs_dropped"]["eval_leak"] == 1
    pairs = read_jsonl(out / "pairs.jsonl")
    texts = [t for p in pairs for t in (p["instruction"], p["chosen"], p["rejected"])]
    assert leakage_check(texts, [e["prompt"] for e in EVAL]).n_leaked == 0


def test_tiny_kill_and_resume_writes_no_duplicate(tiny_run, tiny_qwen, tmp_path):
    out, _, c = tiny_run
    original_pairs = (out / "pairs.jsonl").read_text()
    original = read_jsonl(out / "records.jsonl")
    # Kill 1: pairs.jsonl torn mid-line, records complete: the pair is rebuilt from its record.
    a = tmp_path / "a"
    shutil.copytree(out, a)
    last = original_pairs.splitlines()[-1]
    (a / "pairs.jsonl").write_text(original_pairs[: len(original_pairs) - len(last) // 2 - 1])
    s = run_contrastive(tiny_qwen, RECORDS, TINY, c, a, BASE, progress=False)
    assert s["resume"] == {
        "instructions_already_done": 7, "instructions_new": 0,
        "torn_lines_repaired": {"records": 0, "pairs": 1}, "pairs_rebuilt_from_records": 1,
    }  # fmt: skip
    assert (a / "pairs.jsonl").read_text() == original_pairs
    # Kill 2: the last two answered records lost (one torn), their pairs never written.
    b = tmp_path / "b"
    shutil.copytree(out, b)
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (b / "records.jsonl").write_text("".join(lines[:4]) + lines[4][:80])
    lost = {r["id"] for r in original[4:]}
    kept = [ln for ln in original_pairs.splitlines(keepends=True)
            if json.loads(ln)["instruction_id"] not in lost]  # fmt: skip
    (b / "pairs.jsonl").write_text("".join(kept))
    s = run_contrastive(tiny_qwen, RECORDS, TINY, c, b, BASE, progress=False)
    assert s["resume"]["instructions_already_done"] == 4 and s["resume"]["instructions_new"] == 3
    redone = read_jsonl(b / "records.jsonl")
    assert [r["id"] for r in redone] == [r["id"] for r in RECORDS]
    ids = [p["id"] for p in read_jsonl(b / "pairs.jsonl")]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(p["id"] for p in read_jsonl(out / "pairs.jsonl"))
    for r_new, r_old in zip(redone, original, strict=True):  # same texts and labels
        assert r_new["follow"] == r_old["follow"] and r_new["label"] == r_old["label"]
    # A revise-path directory, another constitution or another policy is refused, not mixed.
    with pytest.raises(JsonlError, match="must not be mixed"):
        run_contrastive(tiny_qwen, RECORDS, CAIConfig(**{**TINY.to_dict(),
                        "contrastive_temperature": 1.0}), c, b, BASE, progress=False)  # fmt: skip
    with pytest.raises(JsonlError, match="field 'policy'"):
        run_contrastive(tiny_qwen, RECORDS, TINY, c, b,
                        {"name": "sft", "adapter": "x", "adapter_sha256": "y"}, progress=False)  # fmt: skip
    with pytest.raises(JsonlError, match="must not be mixed"):
        run_cai(tiny_qwen, RECORDS, CAIConfig(**{**TINY.to_dict(), "mode": "revise"}), c, b,
                BASE, progress=False)  # fmt: skip


def test_tiny_policy_adapter_answers_and_the_base_weights_score(
    tiny_qwen, tiny_adapter_dir, tmp_path
):
    from utils.clean_model_loader import adapter_hash, attach_adapter
    from utils.constitution import _decoding
    from utils.generation import generate
    from utils.scoring import completion_logprobs

    c = load_constitution()
    lm = attach_adapter(fresh_copy(tiny_qwen), tiny_adapter_dir)
    policy = {"name": "sft", "adapter": str(tiny_adapter_dir),
              "adapter_sha256": adapter_hash(tiny_adapter_dir)}  # fmt: skip
    cfg = CAIConfig(**{**TINY.to_dict(), "policy": "sft"})
    run_contrastive(lm, RECORDS[:3], cfg, c, tmp_path, policy, progress=False)
    recs = read_jsonl(tmp_path / "records.jsonl")
    prompts = [r[s]["prompt"] for r in recs for s in ("follow", "violate")]
    dec = _decoding(cfg, "response", RESPONSE_STOP_STRINGS)
    stored = [r[s]["raw_completion"] for r in recs for s in ("follow", "violate")]
    assert [g.raw_completion for g in generate(lm, prompts, dec, progress=False)] == stored
    assert [g.raw_completion for g in generate(tiny_qwen, prompts, dec, progress=False)] != stored
    r = next(r for r in recs if r["scores"])
    lc, n = completion_logprobs(tiny_qwen, [r["scores"]["score_prefix"]],
                                [pmi_completion(r["follow"]["text"])])[0]  # fmt: skip
    assert r["scores"]["follow"]["logp_conditional"] == pytest.approx(lc, abs=1e-4)
    assert r["scores"]["follow"]["n_tokens"] == n
    with pytest.raises(ValueError, match="needs its adapter attached"):
        run_contrastive(tiny_qwen, RECORDS[:1], cfg, c, tmp_path / "x", policy, progress=False)


def test_tiny_script_contrastive_and_both_modes(tiny_loads, tiny_qwen_dir, tmp_path, capsys):
    from scripts.generate_cai_pairs import main

    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "stage1" / "constrained.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in RECORDS[:4])
    )
    cfg = {"model": {"name": str(tiny_qwen_dir)}, "sentinels": {"mode": "off"},
           "cai": TINY.to_dict()}  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc = main(["--config", str(cfg_path), "--run", str(run), "--no-progress"])
    manifest = json.loads((run / "cai_pairs" / "manifest.json").read_text())
    assert (rc, manifest["status"]) in ((0, "ok"), (3, "skipped"))
    assert manifest["mode"] == "contrastive"
    assert manifest["prompt_id"]["cai_prompt_id"].startswith("rlcd-v1/")
    assert "CAI contrastive pairs summary" in capsys.readouterr().out
    n_pairs = len(read_jsonl(run / "cai_pairs" / "pairs.jsonl"))
    assert n_pairs == manifest["counts"]["pairs_kept"]
    assert main(["--config", str(cfg_path), "--run", str(run), "--no-progress"]) == rc
    assert len(read_jsonl(run / "cai_pairs" / "records.jsonl")) == 4  # resumed, no duplicate
    # both: each path in its own directory, every pair of both in <out>/pairs.jsonl
    cfg["cai"] = {**TINY.to_dict(), "mode": "both", "n_shots": 1, "n_shots_judge": 1,
                  "critique_max_new_tokens": 4, "revision_max_new_tokens": 4,
                  "label_margin": 0.0}  # fmt: skip
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "both"
    rc = main(["--config", str(cfg_path), "--run", str(run), "--out", str(out), "--no-progress"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (rc, manifest["status"]) in ((0, "ok"), (3, "skipped"))
    assert manifest["mode"] == "both"
    rev, con = (
        read_jsonl(out / "revise" / "pairs.jsonl"),
        read_jsonl(out / "contrastive" / "pairs.jsonl"),
    )
    merged = read_jsonl(out / "pairs.jsonl")
    assert merged == rev + con and manifest["counts"]["pairs_kept"] == len(merged)
    assert all(p["id"].endswith(":cai") for p in rev)
    assert all(p["id"].endswith(":rlcd") for p in con)
    assert len(read_jsonl(out / "revise" / "records.jsonl")) == 4
