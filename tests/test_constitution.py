"""The constitutional stage: constitution validation, prompt documents, the two-order A/B soft
label, filtering and resume (pure, no model, well under 3 s); then end to end on the tiny
random Qwen2 (base policy and a random LoRA policy whose adapter must be off for critique,
revision and judge), the CLI, and one slow test on the real embedded base model."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import fresh_copy
from utils.completion_prompts import find_chat_markup
from utils.constitution import run_constitution
from utils.constitution_config import CAIConfig
from utils.constitution_pairs import (
    DROP_REASONS,
    ab_soft_label,
    critique_problem,
    find_leak,
    label_decision,
    pair_record,
    response_problem,
    resume_outputs,
    revision_problem,
    summarize_records,
)
from utils.constitution_policy import cai_dpo_args, resolve_policy
from utils.constitution_prompts import (
    CAI_MARKERS,
    DEFAULT_CONSTITUTION,
    ConstitutionError,
    cai_prompt_id,
    critique_prompt,
    judge_prompt,
    judge_prompts,
    load_constitution,
    parse_constitution,
    revision_prompt,
    sample_principle,
)
from utils.jsonl_io import JsonlAppender, JsonlError, read_jsonl
from utils.response_format import RESPONSE_STOP_STRINGS, format_completion, format_prompt
from utils.soft_label_summary import histogram

REAL = yaml.safe_load(DEFAULT_CONSTITUTION.read_text(encoding="utf-8"))

SMALL = {
    "version": "t1",
    "critique_header": "Header C.",
    "judge_header": "Header J.",
    "principles": [
        {"id": "p1", "critique_request": "Find errors.", "revision_request": "Fix them.",
         "judge_question": "Which is better?", "follow_context": "The answers below are right.",
         "violate_context": "The answers below are wrong."},
        {"id": "p2", "critique_request": "Find rudeness.", "revision_request": "Be polite.",
         "judge_question": "Which is politer?", "follow_context": "The answers below are kind.",
         "violate_context": "The answers below are rude."},
    ],
    "demonstrations": [
        {"principle": "p1", "instruction": "Say hi.", "response": "Bye.",
         "critique": "It says bye.", "revision": "Hi."},
        {"principle": "p2", "instruction": "Greet me.", "response": "Go away.",
         "critique": "It is rude.", "revision": "Hello, nice to see you."},
    ],
}  # fmt: skip


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "constitution.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- the constitution file ----------------------------------------------------------------------


def test_the_project_constitution_loads():
    c = load_constitution()
    assert 8 <= len(c.principles) <= 12 and 2 <= len(c.demonstrations) <= 3
    assert len({p.id for p in c.principles}) == len(c.principles)
    assert {"helpful", "honest", "harmless", "follow_constraints", "concise"} <= {
        p.id for p in c.principles
    }
    assert c.path == str(DEFAULT_CONSTITUTION) and len(c.sha256) == 64
    # The content hash ignores where the file lives.
    assert parse_constitution(REAL, "elsewhere.yaml").sha256 == c.sha256


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["principles"][2].pop("judge_question"),
         r"principles\[2\] \(id 'honest'\), field 'judge_question': missing required field"),
        (lambda d: d["principles"][1].__setitem__("critique_request", 5),
         r"principles\[1\] \(id 'follow_constraints'\), field 'critique_request': expected a "
         r"string, got int"),
        (lambda d: d["principles"][0].__setitem__("revision_request", "   "),
         r"principles\[0\] \(id 'helpful'\), field 'revision_request': is empty"),
        (lambda d: d.__setitem__("principles", []), r"'principles' is an empty list"),
        (lambda d: d.__setitem__("demonstrations", []), r"'demonstrations' is an empty list"),
        (lambda d: d.__setitem__("principles", "helpful"), r"'principles' must be a list"),
        (lambda d: d["principles"].__setitem__(3, "honest"),
         r"principles\[3\]: expected a mapping, got str"),
        (lambda d: d["principles"][4].__setitem__("critque_request", "x"),
         r"principles\[4\] \(id '[a-z_]+'\), field 'critque_request': unknown field"),
        (lambda d: d["principles"][5].__setitem__("id", d["principles"][0]["id"]),
         r"principles\[5\] \(id 'helpful'\), field 'id': duplicate id \(first at principles\[0\]\)"),
        (lambda d: d["principles"][0].__setitem__("id", "Has Space"),
         r"principles\[0\] \(id 'Has Space'\), field 'id': 'Has Space' must match"),
        (lambda d: d["principles"][1].__setitem__("critique_request", "Line one.\nLine two."),
         r"principles\[1\].*field 'critique_request': must be a single line"),
        (lambda d: d["principles"][1].__setitem__("judge_question", "Which? Answer:"),
         r"field 'judge_question': must not end with 'Answer:'"),
        (lambda d: d["principles"][2].__setitem__("revision_request", "Fix <start_of_turn>it."),
         r"principles\[2\].*field 'revision_request': contains chat markup '<start_of_turn>'"),
        (lambda d: d["demonstrations"][0].__setitem__("revision", "Response: fine."),
         r"demonstrations\[0\], field 'revision': contains the document header 'Response:'"),
        (lambda d: d["demonstrations"][1].__setitem__("critique", "Bad.\n\nVery bad."),
         r"demonstrations\[1\], field 'critique': a critique is one paragraph"),
        (lambda d: d["demonstrations"][1].__setitem__("principle", "kindness"),
         r"demonstrations\[1\], field 'principle': names principle 'kindness', which is not"),
        (lambda d: d["demonstrations"][2].__setitem__("revision", d["demonstrations"][2]["response"]),
         r"demonstrations\[2\], field 'revision': revision is identical to the response"),
        (lambda d: d.pop("judge_header"), r"missing top-level key 'judge_header'"),
        (lambda d: d.__setitem__("principals", []), r"unknown top-level key\(s\) \['principals'\]"),
    ],
)  # fmt: skip
def test_malformed_constitutions_name_file_index_and_field(tmp_path, edit, match):
    data = copy.deepcopy(REAL)
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError, match=match) as e:
        load_constitution(path)
    assert str(e.value).startswith(str(path))


def test_unreadable_constitution_files(tmp_path):
    with pytest.raises(ConstitutionError, match="no such file"):
        load_constitution(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConstitutionError, match=r"bad\.yaml: invalid YAML"):
        load_constitution(bad)
    bad.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ConstitutionError, match="top level must be a mapping, got list"):
        load_constitution(bad)


# -- stage config --------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_values():
    assert CAIConfig.from_dict(None) == CAIConfig() == CAIConfig.from_dict({})
    assert CAIConfig.from_dict({"max_instructions": None, "label_margin": 0}).label_margin == 0
    with pytest.raises(ValueError, match=r"unknown cai keys \['label_margn'\]; known: \["):
        CAIConfig.from_dict({"label_margn": 0.1})
    with pytest.raises(ValueError, match=r"cai\.batch_size: expected int, got '16'"):
        CAIConfig.from_dict({"batch_size": "16"})
    with pytest.raises(ValueError, match=r"cai\.seed: expected int, got True"):
        CAIConfig.from_dict({"seed": True})
    with pytest.raises(ValueError, match=r"cai\.exclude_truncated: expected bool"):
        CAIConfig.from_dict({"exclude_truncated": "yes"})
    with pytest.raises(ValueError, match=r"cai\.max_instructions: expected int or None"):
        CAIConfig.from_dict({"max_instructions": 2.5})
    with pytest.raises(ValueError, match=r"label_margin .* \[0, 0\.5\)"):
        CAIConfig(label_margin=0.5)
    with pytest.raises(ValueError, match="cai.policy must be one of"):
        CAIConfig(policy="teacher")
    with pytest.raises(ValueError, match="cai.critique_temperature must be >= 0"):
        CAIConfig(critique_temperature=-1.0)
    assert CAIConfig.from_dict(CAIConfig().to_dict()) == CAIConfig()


# -- prompt documents ------------------------------------------------------------------------------


def test_prompt_builders_exact_strings():
    c = parse_constitution(SMALL, "small.yaml")
    p1 = c.principle("p1")
    demo1 = (
        "Instruction: Say hi.\nResponse: Bye.\nCritique request: Find errors.\n"
        "Critique: It says bye.\nRevision request: Fix them.\nRevision: Hi."
    )
    crit = critique_prompt(c, p1, " Name a fruit. ", "Tiger.\n", 1)
    assert crit == (
        f"Header C.\n\n{demo1}\n\nInstruction: Name a fruit.\nResponse: Tiger.\n"
        "Critique request: Find errors.\nCritique:"
    )
    assert critique_prompt(c, p1, "Name a fruit.", "Tiger.", 0) == (
        "Header C.\n\nInstruction: Name a fruit.\nResponse: Tiger.\n"
        "Critique request: Find errors.\nCritique:"
    )
    rev = revision_prompt(c, p1, "Name a fruit.", "Tiger.", " A tiger is an animal. ", 1)
    assert rev == crit + " A tiger is an animal.\nRevision request: Fix them.\nRevision:"
    judge = judge_prompt(c, c.principle("p2"), "Name a fruit.", "Mango.", "Tiger.", 2)
    assert judge == (
        "Header J.\n\n"
        "Instruction: Say hi.\nResponse A: Hi.\nResponse B: Bye.\nWhich is better? Answer: A\n\n"
        "Instruction: Greet me.\nResponse A: Go away.\nResponse B: Hello, nice to see you.\n"
        "Which is politer? Answer: B\n\n"
        "Instruction: Name a fruit.\nResponse A: Mango.\nResponse B: Tiger.\n"
        "Which is politer? Answer:"
    )
    rev_a, rev_b = judge_prompts(c, p1, "Name a fruit.", "Tiger.", "Mango.", 0)
    assert rev_a.endswith("Response A: Mango.\nResponse B: Tiger.\nWhich is better? Answer:")
    assert rev_b.endswith("Response A: Tiger.\nResponse B: Mango.\nWhich is better? Answer:")
    with pytest.raises(ValueError, match="response is empty"):
        critique_prompt(c, p1, "Name a fruit.", "  ", 1)
    with pytest.raises(ValueError, match="critique is empty"):
        revision_prompt(c, p1, "Name a fruit.", "Tiger.", "", 1)
    with pytest.raises(ValueError, match=r"n_shots must be in 0\.\.2"):
        judge_prompt(c, p1, "Name a fruit.", "Mango.", "Tiger.", 3)


def test_real_prompts_are_plain_documents_that_end_where_the_model_continues():
    c = load_constitution()
    for p in c.principles:
        crit = critique_prompt(c, p, "Name a fruit.", "Tiger.", len(c.demonstrations))
        rev = revision_prompt(c, p, "Name a fruit.", "Tiger.", "It names an animal.", 2)
        ja, jb = judge_prompts(c, p, "Name a fruit.", "Tiger.", "Mango.", len(c.demonstrations))
        assert crit.endswith("\nCritique:") and rev.endswith("\nRevision:")
        assert ja.endswith(" Answer:") and jb.endswith(" Answer:") and ja != jb
        for text in (crit, rev, ja, jb):
            assert find_chat_markup(text) is None and text == text.rstrip()
            assert "<|" not in text and "<start_of_turn>" not in text
    # Demonstrated judge answers alternate, so the few-shot prefix itself is balanced.
    j = judge_prompt(c, c.principles[0], "Name a fruit.", "a", "b", 3)
    assert [line[-1] for line in j.splitlines() if "Answer: " in line] == ["A", "B", "A"]


def test_generation_stops_where_the_document_moves_on():
    from utils.constitution_prompts import CRITIQUE_STOP_STRINGS, REVISION_STOP_STRINGS

    for marker in CAI_MARKERS:
        assert "\n" + marker in CRITIQUE_STOP_STRINGS and "\n" + marker in REVISION_STOP_STRINGS
    assert "\nInstruction:" in CRITIQUE_STOP_STRINGS and "\nInstruction:" in REVISION_STOP_STRINGS
    assert "\n\n" in CRITIQUE_STOP_STRINGS  # a critique is one paragraph ...
    assert "\n\n" not in REVISION_STOP_STRINGS  # ... a revision may have several


def test_principle_draw_is_seeded_by_instruction_id():
    c = load_constitution()
    draws = [sample_principle(c, 0, f"id{k}").id for k in range(200)]
    assert draws == [sample_principle(c, 0, f"id{k}").id for k in range(200)]
    assert set(draws) == {p.id for p in c.principles}  # every principle gets drawn
    assert draws != [sample_principle(c, 1, f"id{k}").id for k in range(200)]


def test_prompt_id_changes_with_the_constitution_and_shots():
    c = parse_constitution(SMALL, "a.yaml")
    edited = copy.deepcopy(SMALL)
    edited["principles"][0]["judge_question"] = "Which is best?"
    base = cai_prompt_id(c, CAIConfig(n_shots=1, n_shots_judge=1))
    assert base == cai_prompt_id(parse_constitution(SMALL, "b.yaml"), CAIConfig(n_shots=1,
                                                                                  n_shots_judge=1))  # fmt: skip
    assert base["cai_prompt_id"].startswith("cai-v1/t1/s1j1/")
    for other in (
        cai_prompt_id(parse_constitution(edited), CAIConfig(n_shots=1, n_shots_judge=1)),
        cai_prompt_id(c, CAIConfig(n_shots=2, n_shots_judge=1)),
        cai_prompt_id(c, CAIConfig(n_shots=1, n_shots_judge=0)),
    ):
        assert other["cai_prompt_id"] != base["cai_prompt_id"]
    # Settings that do not change a prompt do not change the id.
    assert cai_prompt_id(c, CAIConfig(n_shots=1, n_shots_judge=1, label_margin=0.3)) == base


# -- soft labels -----------------------------------------------------------------------------------

L = math.log


def test_ab_soft_label_hand_values_with_the_swap():
    # Revision shown as A: P(A) = 0.6 / (0.6 + 0.2) = 0.75 -> P(rev) = 0.75.
    # Revision shown as B: P(B) = 0.3 / (0.5 + 0.3) = 0.375 -> P(rev) = 0.375.
    # Order-averaged: 0.5 * (0.75 + 0.375) = 0.5625; the orders disagree.
    rev_a, rev_b = (L(0.6), L(0.2)), (L(0.5), L(0.3))
    s = ab_soft_label(rev_a, rev_b)
    assert s["p_revision"] == pytest.approx(0.5625)
    assert s["p_revision_when_a"] == pytest.approx(0.75)
    assert s["p_revision_when_b"] == pytest.approx(0.375)
    assert s["position_consistent"] is False
    assert s["p_a_mean"] == pytest.approx(0.5 * (0.75 + 0.625))
    assert s["margin_nats"] == pytest.approx(0.5 * (L(3) + L(0.6)))
    assert s["revision_a"] == {"logp_a": L(0.6), "logp_b": L(0.2)}
    assert s["revision_b"] == {"logp_a": L(0.5), "logp_b": L(0.3)}
    assert s["answer_mass_revision_a"] == pytest.approx(0.8)
    # The swap: seen from the ORIGINAL, the prompt showing it as A is the one that shows the
    # revision as B, and vice versa; P(prefer original) = 1 - P(prefer revision) = 0.4375.
    assert ab_soft_label(rev_b, rev_a)["p_revision"] == pytest.approx(0.4375)
    # Normalised over the two answer tokens: the mass left elsewhere does not matter.
    scaled = ab_soft_label((L(0.06), L(0.02)), (L(0.05), L(0.03)))
    assert scaled["p_revision"] == pytest.approx(0.5625)
    # A consistent judge: 0.5 * (0.9 + 0.7 / 0.9) = 0.838888...
    strong = ab_soft_label((L(0.9), L(0.1)), (L(0.2), L(0.7)))
    assert strong["p_revision"] == pytest.approx(0.5 * (0.9 + 0.7 / 0.9))
    assert strong["position_consistent"] is True
    # A judge that always says A is cancelled exactly by the two orders.
    always_a = ab_soft_label((L(0.9), L(0.1)), (L(0.9), L(0.1)))
    assert always_a["p_revision"] == 0.5 and always_a["p_a_mean"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="log-probability"):
        ab_soft_label((0.5, L(0.1)), (L(0.2), L(0.7)))
    with pytest.raises(ValueError, match="exactly"):
        ab_soft_label((L(0.5),), (L(0.2), L(0.7)))


def test_label_decision_picks_the_preferred_side_and_drops_near_half():
    cfg = CAIConfig(label_margin=0.1)
    d = label_decision(0.5 * (0.9 + 0.7 / 0.9), True, cfg)
    assert d["chosen"] == "revision" and d["drop_reason"] is None
    assert d["soft_label"] == pytest.approx(0.8388889) and d["margin"] == pytest.approx(0.6777778)
    d = label_decision(0.2, True, cfg)  # the judge prefers the original
    assert d["chosen"] == "original" and d["soft_label"] == pytest.approx(0.8)
    assert d["margin"] == pytest.approx(0.6) and d["drop_reason"] is None
    assert label_decision(0.5625, False, cfg)["drop_reason"] == "label_near_half"
    assert label_decision(0.45, True, cfg)["drop_reason"] == "label_near_half"
    assert label_decision(0.6, False, cfg)["drop_reason"] is None  # the boundary is kept
    assert label_decision(0.5, True, CAIConfig(label_margin=0.0))["drop_reason"] == (
        "label_near_half"
    )  # a tie prefers nothing, whatever the margin
    strict = CAIConfig(label_margin=0.1, require_position_consistent=True)
    assert label_decision(0.7, False, strict)["drop_reason"] == "position_inconsistent"
    assert label_decision(0.7, True, strict)["drop_reason"] is None
    for p in (0.0, 1.0):
        assert label_decision(p, True, cfg)["soft_label"] == 1.0
    with pytest.raises(ValueError, match="probability"):
        label_decision(1.2, True, cfg)


# -- filtering --------------------------------------------------------------------------------------

EOS = ("<eos>",)


def test_revision_filters():
    cases = [
        ("Hi there.", "", "eos", None, ("revision_empty", None)),
        ("Hi there.", "  \n ", "eos", None, ("revision_empty", None)),
        ("Hi there.", "Hi   there.\n", "eos", None, ("revision_identical", None)),
        ("Hi there.", "Hello.\nInstruction: more", "eos", None, ("revision_leaked", "Instruction:")),
        ("Hi there.", "Hello.\nResponse: x", "eos", None, ("revision_leaked", "Response:")),
        ("Hi there.", "<start_of_turn>Hello.", "eos", None,
         ("revision_leaked", "<start_of_turn>")),
        ("Hi there.", "Hello.<eos>", "eos", None, ("revision_leaked", "<eos>")),
        ("Hi there.", "Critique: the answer is fine.", "eos", None,
         ("revision_leaked", "Critique:")),
        ("Hi there.", "User: hello", "eos", None, ("revision_leaked", "User:")),
        ("Hi there.", "Hello, friend.", "max_new_tokens", True, ("revision_truncated", None)),
        ("Hi there.", "Hello, friend.", "max_new_tokens", False, (None, None)),
        ("Hi there.", "Hello, friend.", "stop_string", True, (None, None)),
        ("mango", "MANGO", "eos", True, (None, None)),  # case is content, not whitespace
    ]  # fmt: skip
    for original, revision, stop, exclude, want in cases:
        got = revision_problem(original, revision, stop, EOS, bool(exclude))
        assert got == want, (revision, got)


def test_response_and_critique_filters():
    assert response_problem("", "eos", EOS, True) == ("original_empty", None)
    assert response_problem("Sure.\nInstruction: next", "eos", EOS, True)[0] == "original_leaked"
    assert response_problem("Half a sen", "max_new_tokens", EOS, True) == (
        "original_truncated", None,
    )  # fmt: skip
    assert response_problem("Half a sen", "max_new_tokens", EOS, False) == (None, None)
    assert response_problem("Mango.", "eos", EOS, True) == (None, None)
    assert critique_problem(" ", EOS) == ("critique_empty", None)
    assert critique_problem("Fine <eos> text", EOS) == ("critique_leaked", "<eos>")
    assert critique_problem("Mentions [INST] markup", EOS) == ("critique_leaked", "[INST]")
    # A critique may quote the format; it is never trained on.
    assert critique_problem('It repeats "Response:" twice.', EOS) == (None, None)
    assert find_leak("A plain answer.") is None
    assert all(find_leak(f"x {m} y") == m for m in CAI_MARKERS)


PID = {"cai_prompt_id": "cai-v1/t1/s1j1/abc", "prompt_version": "cai-v1"}
POLICY = {"name": "sft", "adapter": "runs/x/sft/adapter", "adapter_sha256": "f" * 64}


def make_record(rid, drop=None, p_revision=0.8, consistent=True, principle="p1", judged=True,
                prompt_id=PID, policy=POLICY):  # fmt: skip
    """A stage record as process_chunk writes it (structure only; texts made up)."""
    rec = {
        "id": rid, "instruction": f"Task {rid}.", "type": "open_qa",
        "principle": {"id": principle, "seed": 0}, "policy": dict(policy),
        "prompt_id": dict(prompt_id),
        "response": {"prompt": format_prompt(f"Task {rid}."), "text": f"Answer {rid}.",
                     "stop_reason": "eos", "seed": 0, "raw_completion": f" Answer {rid}."},
        "critique": {"prompt": "...", "text": "Too short.", "stop_reason": "stop_string"},
        "revision": {"prompt": "...", "text": f"A better answer {rid}.", "stop_reason": "eos"},
        "judge": None, "label": None, "kept": False, "drop_reason": drop, "leak": None,
    }  # fmt: skip
    if judged:
        a = math.log(p_revision)
        rec["judge"] = {"prompt_revision_a": "...A", "prompt_revision_b": "...B",
                        **ab_soft_label((a, math.log(1 - p_revision)),
                                        (math.log(1 - p_revision), a))}  # fmt: skip
        rec["judge"]["position_consistent"] = consistent
        rec["label"] = label_decision(rec["judge"]["p_revision"], consistent, CAIConfig())
        rec["drop_reason"] = rec["label"]["drop_reason"]
        rec["kept"] = rec["drop_reason"] is None
    return rec


def test_pair_record_is_in_the_dpo_pair_format():
    rec = make_record("r1", p_revision=0.8)
    pair = pair_record(rec)
    assert pair["id"] == "r1:cai" and pair["instruction_id"] == "r1"
    assert pair["prompt"] == format_prompt("Task r1.") == "Instruction: Task r1.\nResponse:"
    assert pair["chosen"] == format_completion("A better answer r1.") == " A better answer r1."
    assert pair["rejected"] == " Answer r1."
    assert pair["chosen_side"] == "revision" and pair["soft_label"] == pytest.approx(0.8)
    assert pair["margin"] == pytest.approx(0.6) and pair["principle_id"] == "p1"
    assert pair["judge"]["cai_prompt_id"] == PID["cai_prompt_id"]
    assert "prompt_revision_a" not in pair["judge"] and "revision_a" in pair["judge"]
    flipped = pair_record(make_record("r2", p_revision=0.1))
    assert flipped["chosen"] == " Answer r2." and flipped["rejected"] == " A better answer r2."
    assert flipped["chosen_side"] == "original" and flipped["soft_label"] == pytest.approx(0.9)
    assert pair_record(make_record("r3", p_revision=0.55)) is None  # near half: dropped
    assert pair_record(make_record("r4", drop="revision_identical", judged=False)) is None


def test_summary_counts_every_drop_reason():
    records = [
        make_record("a", p_revision=0.92),
        make_record("b", p_revision=0.13),
        make_record("c", p_revision=0.52, consistent=False),
        make_record("d", drop="revision_identical", judged=False, principle="p2"),
        make_record("e", drop="revision_identical", judged=False, principle="p2"),
        make_record("f", drop="original_empty", judged=False),
        make_record("g", drop="critique_leaked", judged=False),
    ]
    s = summarize_records(records)
    assert s["instructions"] == 7 and s["pairs_kept"] == 2 and s["judged"] == 3
    assert s["judge_prompts"] == 6
    assert list(s["pairs_dropped"]) == list(DROP_REASONS)
    assert s["pairs_dropped"]["revision_identical"] == 2
    assert s["pairs_dropped"]["original_empty"] == 1 and s["pairs_dropped"]["critique_leaked"] == 1
    assert s["pairs_dropped"]["label_near_half"] == 1
    assert s["pairs_kept"] + sum(s["pairs_dropped"].values()) == s["instructions"]
    assert s["chosen_side"] == {"revision": 1, "original": 1}
    assert s["position_consistent_rate"] == pytest.approx(2 / 3)
    assert s["p_revision_mean"] == pytest.approx((0.92 + 0.13 + 0.52) / 3)
    assert s["principles_drawn"] == {"p1": 5, "p2": 2} and s["principles_kept"] == {"p1": 2}
    assert sum(s["soft_label_histogram_kept"]["counts"]) == 2
    assert sum(s["soft_label_histogram_judged"]["counts"]) == 3
    assert s["soft_label_histogram_kept"] == histogram([0.92, 0.87])
    assert summarize_records([])["position_consistent_rate"] is None


# -- resume (pure, through utils/jsonl_io) ---------------------------------------------------------


def _write_outputs(out: Path, records) -> None:
    with JsonlAppender(out / "records.jsonl") as rw, JsonlAppender(out / "pairs.jsonl") as pw:
        for r in records:
            rw.write(r)
            if (p := pair_record(r)) is not None:
                pw.write(p)


RESUME_RECORDS = [make_record("a", p_revision=0.9), make_record("b", drop="revision_empty",
                  judged=False), make_record("c", p_revision=0.2)]  # fmt: skip


def test_resume_repairs_a_torn_pairs_line_and_rebuilds_the_pair(tmp_path):
    _write_outputs(tmp_path, RESUME_RECORDS)
    original = (tmp_path / "pairs.jsonl").read_text()
    lines = original.splitlines(keepends=True)
    assert len(lines) == 2
    (tmp_path / "pairs.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    state = resume_outputs(tmp_path, PID, POLICY)
    assert state["torn_lines_repaired"] == {"records": 0, "pairs": 1}
    assert [r["id"] for r in state["records"]] == ["a", "b", "c"]
    assert [p["id"] for p in state["missing_pairs"]] == ["c:cai"]
    with JsonlAppender(tmp_path / "pairs.jsonl") as pw:
        pw.write_many(state["missing_pairs"])
    assert (tmp_path / "pairs.jsonl").read_text() == original
    again = resume_outputs(tmp_path, PID, POLICY)
    assert again["missing_pairs"] == [] and again["torn_lines_repaired"]["pairs"] == 0


def test_resume_drops_a_torn_record_so_it_is_redone(tmp_path):
    _write_outputs(tmp_path, RESUME_RECORDS[:2])
    with (tmp_path / "records.jsonl").open("a") as f:  # killed while writing record c
        f.write(json.dumps(RESUME_RECORDS[2])[:50])
    state = resume_outputs(tmp_path, PID, POLICY)
    assert state["torn_lines_repaired"] == {"records": 1, "pairs": 0}
    assert [r["id"] for r in state["records"]] == ["a", "b"] and state["missing_pairs"] == []
    assert read_jsonl(tmp_path / "records.jsonl") == RESUME_RECORDS[:2]


def test_resume_refuses_mixed_or_foreign_outputs(tmp_path):
    _write_outputs(tmp_path, RESUME_RECORDS)
    other = {**PID, "cai_prompt_id": "cai-v1/t2/s1j1/def"}
    with pytest.raises(JsonlError, match=r"records\.jsonl:1 field 'prompt_id'.*must not be mixed"):
        resume_outputs(tmp_path, other, POLICY)
    with pytest.raises(JsonlError, match=r"records\.jsonl:1 field 'policy'"):
        resume_outputs(tmp_path, PID, {**POLICY, "adapter_sha256": "0" * 64})
    with pytest.raises(JsonlError, match=r"records\.jsonl:1 field 'policy'"):
        resume_outputs(tmp_path, PID, {"name": "base", "adapter": None, "adapter_sha256": None})
    stray = tmp_path / "stray"
    stray.mkdir()
    _write_outputs(stray, RESUME_RECORDS)
    lines = (stray / "records.jsonl").read_text().splitlines(keepends=True)
    (stray / "records.jsonl").write_text(lines[1])  # records a and c gone, their pairs kept
    with pytest.raises(JsonlError, match=r"pairs for instructions with no record: \['a', 'c'\]"):
        resume_outputs(stray, PID, POLICY)
    with (stray / "records.jsonl").open("a") as f:  # two writers: duplicate ids
        f.write(lines[1])
    with pytest.raises(JsonlError, match="duplicate id 'b'"):
        resume_outputs(stray, PID, POLICY)


# -- which policy answers ----------------------------------------------------------------------------


def _adapter(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_policy_resolution(tmp_path):
    run = tmp_path / "run"
    assert resolve_policy(run, "base") == ("base", None)
    # A fresh run directory: the pipeline can still build the CAI DPO command.
    assert cai_dpo_args(run)[5] == str(run / "sft" / "adapter")
    with pytest.raises(FileNotFoundError, match=r"sft/adapter: no SFT adapter.*no usable DPO"):
        resolve_policy(run, "auto")
    sft = _adapter(run / "sft" / "adapter")
    assert resolve_policy(run, "auto") == ("sft", sft)
    (run / "dpo").mkdir()
    (run / "dpo" / "manifest.json").write_text(json.dumps({"status": "skipped", "reason": "x"}))
    assert resolve_policy(run, "auto") == ("sft", sft)  # DPO kept no pair: the SFT policy
    with pytest.raises(FileNotFoundError, match="recorded as skipped"):
        resolve_policy(run, "dpo")
    dpo = _adapter(run / "dpo" / "adapter")
    (run / "dpo" / "manifest.json").write_text(json.dumps({"stage": "dpo"}))
    assert resolve_policy(run, "auto") == ("dpo", dpo)
    assert resolve_policy(run, "sft") == ("sft", sft)
    with pytest.raises(ValueError, match="cai.policy must be one of"):
        resolve_policy(run, "teacher")
    # The CAI DPO stage continues the adapter the pairs came from.
    args = cai_dpo_args(run)
    assert args[args.index("--sft-adapter") + 1] == str(dpo)
    (run / "cai_pairs").mkdir()
    (run / "cai_pairs" / "manifest.json").write_text(
        json.dumps({"inputs": {"policy_adapter": str(sft)}})
    )
    assert cai_dpo_args(run) == [
        "--run-dir", str(run), "--pairs", str(run / "cai_pairs" / "pairs.jsonl"),
        "--sft-adapter", str(sft), "--out", str(run / "cai"),
    ]  # fmt: skip
    (run / "cai_pairs" / "manifest.json").write_text(
        json.dumps({"inputs": {"policy_adapter": None}})
    )
    with pytest.raises(ValueError, match="base policy"):
        cai_dpo_args(run)


# ==================================================================================================
# On the tiny random Qwen2 (loads a model: not part of the pure tests above).

RECORDS = [
    {"id": "s1-a", "instruction": "Name a fruit.", "type": "open_qa"},
    {"id": "s1-b", "instruction": "What is 2 + 3?", "type": "math_word"},
    {"id": "s1-c", "instruction": "Write one word in capital letters.", "type": "format_uppercase"},
]
TINY_CFG = CAIConfig(
    mode="revise",  # this file tests the critique-and-revision path
    policy="base",
    n_shots=1,
    n_shots_judge=1,
    response_max_new_tokens=6,
    critique_max_new_tokens=6,
    revision_max_new_tokens=6,
    exclude_truncated=False,  # a random model never ends by itself
    label_margin=0.0,
    instructions_per_chunk=4,  # one chunk: each generate call pays a stop-string setup
    batch_size=8,
)
BASE_POLICY = {"name": "base", "adapter": None, "adapter_sha256": None}


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("cai-tiny")
    c = load_constitution()
    summary = run_constitution(tiny_qwen, RECORDS, TINY_CFG, c, out, BASE_POLICY, progress=False)
    return out, summary, c


def _all_prompts(rec) -> list[str]:
    out = [rec[s]["prompt"] for s in ("response", "critique", "revision") if rec.get(s)]
    if rec.get("judge"):
        out += [rec["judge"]["prompt_revision_a"], rec["judge"]["prompt_revision_b"]]
    return out


def test_tiny_end_to_end_records_hold_the_exact_documents(tiny_run, tiny_qwen):
    out, summary, c = tiny_run
    records = read_jsonl(out / "records.jsonl")
    pairs = read_jsonl(out / "pairs.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in RECORDS]
    counts = summary["counts"]
    assert counts["instructions"] == 3 and counts["pairs_kept"] == len(pairs) > 0
    assert counts["pairs_kept"] + sum(counts["pairs_dropped"].values()) == 3
    assert summary["resume"]["instructions_new"] == 3
    assert set(summary["timings"]) == {"response_s", "critique_s", "revision_s", "judge_s"}
    for rec in records:
        p = c.principle(rec["principle"]["id"])
        assert p == sample_principle(c, TINY_CFG.seed, rec["id"])
        assert rec["prompt_id"] == cai_prompt_id(c, TINY_CFG) and rec["policy"] == BASE_POLICY
        resp, crit, rev = rec["response"], rec["critique"], rec["revision"]
        assert resp["prompt"] == format_prompt(rec["instruction"])
        assert resp["seed"] == TINY_CFG.seed and crit["seed"] == TINY_CFG.seed + 1
        assert crit["prompt"] == critique_prompt(c, p, rec["instruction"], resp["text"], 1)
        assert rev["prompt"] == revision_prompt(
            c, p, rec["instruction"], resp["text"], crit["text"], 1
        )
        assert rev["seed"] == TINY_CFG.seed + 2
        for step in (resp, crit, rev):
            assert step["stop_reason"] in ("eos", "stop_string", "max_new_tokens")
            assert step["raw_completion"].strip().startswith(step["text"][:3])
        if rec["judge"]:
            j = rec["judge"]
            assert (j["prompt_revision_a"], j["prompt_revision_b"]) == judge_prompts(
                c, p, rec["instruction"], resp["text"], rev["text"], 1
            )
            again = ab_soft_label(
                (j["revision_a"]["logp_a"], j["revision_a"]["logp_b"]),
                (j["revision_b"]["logp_a"], j["revision_b"]["logp_b"]),
            )
            assert again["p_revision"] == pytest.approx(j["p_revision"])
            assert rec["label"] == label_decision(j["p_revision"], j["position_consistent"],
                                                  TINY_CFG)  # fmt: skip
        assert rec["kept"] == (rec["drop_reason"] is None)
        for prompt in _all_prompts(rec):
            tiny_qwen.encode(prompt)  # the contamination guard accepts every stored prompt
    for pair in pairs:
        assert pair["prompt"] == format_prompt(pair["instruction"])
        assert pair["chosen"] != pair["rejected"] and pair["chosen"].startswith(" ")
        assert 0.5 < pair["soft_label"] <= 1
        assert pair["margin"] == pytest.approx(2 * pair["soft_label"] - 1)


def test_tiny_judge_reads_the_base_models_answer_tokens(tiny_run, tiny_qwen):
    from utils.generation import single_token_id
    from utils.scoring import next_token_logprobs

    out, _, _ = tiny_run
    judged = [r for r in read_jsonl(out / "records.jsonl") if r["judge"]]
    assert judged
    ids = [single_token_id(tiny_qwen, " A"), single_token_id(tiny_qwen, " B")]
    for r in judged:
        j = r["judge"]
        got = next_token_logprobs(
            tiny_qwen, [j["prompt_revision_a"], j["prompt_revision_b"]], ids
        ).tolist()
        assert got[0] == pytest.approx([j["revision_a"]["logp_a"], j["revision_a"]["logp_b"]],
                                       abs=1e-4)  # fmt: skip
        assert got[1] == pytest.approx([j["revision_b"]["logp_a"], j["revision_b"]["logp_b"]],
                                       abs=1e-4)  # fmt: skip


def test_tiny_pairs_load_in_the_dpo_trainer(tiny_run, tiny_qwen):
    from utils.dpo import check_no_eos, load_pairs

    out, summary, _ = tiny_run
    pairs, info = load_pairs(out / "pairs.jsonl")
    assert len(pairs) == summary["counts"]["pairs_kept"] == info["n_records"]
    check_no_eos(pairs, tiny_qwen.policy.eos_token)
    records = {r["id"]: r for r in read_jsonl(out / "records.jsonl")}
    for p in read_jsonl(out / "pairs.jsonl"):
        rec = records[p["instruction_id"]]
        sides = {
            format_completion(rec["response"]["text"]),
            format_completion(rec["revision"]["text"]),
        }
        assert {p["chosen"], p["rejected"]} == sides
        assert load_pairs(out / "pairs.jsonl", min_margin=0.0)[0]


def test_tiny_resume_after_kill_has_no_duplicates_and_loses_nothing(tiny_run, tiny_qwen, tmp_path):
    out, _, c = tiny_run
    original_pairs = (out / "pairs.jsonl").read_text()
    original = read_jsonl(out / "records.jsonl")
    # Kill 1: pairs.jsonl torn mid-line, records complete.
    a = tmp_path / "a"
    shutil.copytree(out, a)
    last = original_pairs.splitlines()[-1]
    (a / "pairs.jsonl").write_text(original_pairs[: len(original_pairs) - len(last) // 2 - 1])
    s = run_constitution(tiny_qwen, RECORDS, TINY_CFG, c, a, BASE_POLICY, progress=False)
    assert s["resume"] == {
        "instructions_already_done": 3, "instructions_new": 0,
        "torn_lines_repaired": {"records": 0, "pairs": 1}, "pairs_rebuilt_from_records": 1,
    }  # fmt: skip
    assert (a / "pairs.jsonl").read_text() == original_pairs
    # Kill 2: the last record torn mid-line and its pair never written.
    b = tmp_path / "b"
    shutil.copytree(out, b)
    r_lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (b / "records.jsonl").write_text("".join(r_lines[:-1]) + r_lines[-1][:60])
    last_id = original[-1]["id"]
    kept = [ln for ln in original_pairs.splitlines(keepends=True)
            if json.loads(ln)["instruction_id"] != last_id]  # fmt: skip
    (b / "pairs.jsonl").write_text("".join(kept))
    s = run_constitution(tiny_qwen, RECORDS, TINY_CFG, c, b, BASE_POLICY, progress=False)
    assert s["resume"]["instructions_already_done"] == 2 and s["resume"]["instructions_new"] == 1
    assert s["resume"]["torn_lines_repaired"]["records"] == 1
    redone = read_jsonl(b / "records.jsonl")
    assert [r["id"] for r in redone] == [r["id"] for r in RECORDS]
    ids = [p["id"] for p in read_jsonl(b / "pairs.jsonl")]
    assert len(ids) == len(set(ids)) and (b / "pairs.jsonl").read_text().startswith("".join(kept))
    # Per-(seed, prompt) sampling: the redone instruction gets the same texts alone in its batch.
    for step in ("response", "critique", "revision"):
        assert redone[-1][step]["text"] == original[-1][step]["text"]
    assert s["counts"]["instructions"] == 3
    # Another constitution or another policy is refused, not mixed.
    edited = copy.deepcopy(REAL)
    edited["principles"][0]["judge_question"] = "Which response helps more?"
    with pytest.raises(JsonlError, match="must not be mixed"):
        run_constitution(tiny_qwen, RECORDS, TINY_CFG, parse_constitution(edited), b,
                         BASE_POLICY, progress=False)  # fmt: skip
    with pytest.raises(JsonlError, match="field 'policy'"):
        run_constitution(tiny_qwen, RECORDS, TINY_CFG, c, b,
                         {"name": "sft", "adapter": "x", "adapter_sha256": "y"}, progress=False)  # fmt: skip


def test_tiny_sft_policy_answers_and_the_base_model_critiques(
    tiny_qwen, tiny_adapter_dir, tmp_path
):
    """The adapter writes the response; critique, revision and judge run on the base weights
    (reproduced exactly on the plain base model from the stored prompts and seeds)."""
    from utils.clean_model_loader import adapter_hash, attach_adapter
    from utils.constitution import _decoding
    from utils.constitution_prompts import CRITIQUE_STOP_STRINGS, REVISION_STOP_STRINGS
    from utils.generation import generate

    c = load_constitution()
    lm_sft = attach_adapter(fresh_copy(tiny_qwen), tiny_adapter_dir)
    policy = {
        "name": "sft",
        "adapter": str(tiny_adapter_dir),
        "adapter_sha256": adapter_hash(tiny_adapter_dir),
    }
    cfg = CAIConfig(**{**TINY_CFG.to_dict(), "policy": "sft"})
    run_constitution(lm_sft, RECORDS[:2], cfg, c, tmp_path, policy, progress=False)
    recs = read_jsonl(tmp_path / "records.jsonl")
    assert all(r["policy"] == policy for r in recs)
    for step, stops, seed in (("critique", CRITIQUE_STOP_STRINGS, cfg.seed + 1),
                              ("revision", REVISION_STOP_STRINGS, cfg.seed + 2)):  # fmt: skip
        todo = [r for r in recs if r.get(step)]
        assert todo
        base = generate(tiny_qwen, [r[step]["prompt"] for r in todo],
                        _decoding(cfg, step, stops), seed=seed, progress=False)  # fmt: skip
        assert [g.raw_completion for g in base] == [r[step]["raw_completion"] for r in todo]
    prompts = [r["response"]["prompt"] for r in recs]
    decoding = _decoding(cfg, "response", RESPONSE_STOP_STRINGS)
    policy_gens = generate(lm_sft, prompts, decoding, seed=cfg.seed, progress=False)
    base_gens = generate(tiny_qwen, prompts, decoding, seed=cfg.seed, progress=False)
    stored = [r["response"]["raw_completion"] for r in recs]
    assert [g.raw_completion for g in policy_gens] == stored
    assert [g.raw_completion for g in base_gens] != stored  # the adapter did write them
    with pytest.raises(ValueError, match="needs its adapter attached"):
        run_constitution(tiny_qwen, RECORDS[:1], cfg, c, tmp_path / "x", policy, progress=False)


def test_tiny_script_end_to_end(tiny_loads, tiny_qwen_dir, tmp_path, monkeypatch, capsys):
    from scripts.generate_cai_pairs import main

    loads = tiny_loads
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "stage1" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = {"model": {"name": str(tiny_qwen_dir)}, "sentinels": {"mode": "off"},
           "cai": TINY_CFG.to_dict()}  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc = main(["--config", str(cfg_path), "--run", str(run), "--no-progress"])
    manifest = json.loads((run / "cai_pairs" / "manifest.json").read_text())
    n_kept = manifest["counts"]["pairs_kept"]
    assert (rc, manifest["status"]) == ((0, "ok") if n_kept else (3, "skipped"))
    assert loads == [str(tiny_qwen_dir)]
    assert manifest["stage"] == "cai_pairs" and manifest["inputs"]["policy"] == "base"
    assert manifest["inputs"]["policy_adapter"] is None
    assert manifest["inputs"]["constitution_sha256"] == load_constitution().sha256
    assert manifest["cai_config"] == TINY_CFG.to_dict()
    assert manifest["prompt_id"]["cai_prompt_id"].startswith("cai-v1/constitution-v1/s1j1/")
    assert len(read_jsonl(run / "cai_pairs" / "records.jsonl")) == 3
    assert "CAI pairs summary" in capsys.readouterr().out
    # Rerun: everything resumed, nothing duplicated.
    assert main(["--config", str(cfg_path), "--run", str(run), "--no-progress"]) == rc
    assert len(read_jsonl(run / "cai_pairs" / "records.jsonl")) == 3
    # Bad input: exit 2 with a message naming what is wrong.
    bad = copy.deepcopy(REAL)
    del bad["principles"][1]["revision_request"]
    bad_path = _write(tmp_path, bad)
    assert main(["--config", str(cfg_path), "--run", str(run), "--constitution",
                 str(bad_path), "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert str(bad_path) in err and "principles[1]" in err and "'revision_request'" in err
    cfg["cai"]["bogus"] = 1
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(cfg_path), "--run", str(run), "--no-progress"]) == 2
    assert "cai.bogus: unknown key" in capsys.readouterr().err  # run_context.check_sections
    del cfg["cai"]  # no cai section: defaults, policy auto, and this run has no adapter
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(cfg_path), "--run", str(run), "--no-progress"]) == 2
    assert "no SFT adapter" in capsys.readouterr().err
    (run / "stage1" / "train.jsonl").write_text('{"id": "x", "type": "open_qa"}\n')
    cfg["cai"] = TINY_CFG.to_dict()
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(cfg_path), "--run", str(run), "--no-progress"]) == 2
    assert "train.jsonl:1 field 'instruction'" in capsys.readouterr().err


@pytest.mark.slow
def test_gemma_every_stored_prompt_passes_the_contamination_guard(gemma, tmp_path):
    """Three instructions through the real embedded base model: every prompt the stage stored
    (response, critique, revision, both judge orders) passes the loader's encode path and
    carries no chat markup."""
    c = load_constitution()
    # exclude_truncated=False: the zero-shot base model rarely stops by itself within 32
    # tokens, and every step's prompt must be built and checked.
    cfg = CAIConfig(policy="base", response_max_new_tokens=32, critique_max_new_tokens=32,
                    revision_max_new_tokens=40, label_margin=0.0,
                    exclude_truncated=False)  # fmt: skip
    summary = run_constitution(gemma, RECORDS, cfg, c, tmp_path, BASE_POLICY, progress=False)
    records = read_jsonl(tmp_path / "records.jsonl")
    assert len(records) == 3 and summary["counts"]["instructions"] == 3
    n_prompts = 0
    for rec in records:
        for prompt in _all_prompts(rec):
            ids = gemma.encode(prompt)  # raises ContaminationError on chat-control tokens
            gemma.check_ids(ids, where=f"record {rec['id']}")
            assert find_chat_markup(prompt) is None
            assert not any(s in prompt for s in gemma.policy.control_token_strings)
            n_prompts += 1
    assert any(rec["judge"] for rec in records)  # some record reached the A/B judge
    assert n_prompts >= 3 * 3 + 2
    for p in read_jsonl(tmp_path / "pairs.jsonl"):
        assert "<eos>" not in p["chosen"] + p["rejected"]
