"""QC metrics and gates on stage-1 records (utils/qc.py), against hand-counted values."""

from __future__ import annotations

import pytest

from utils.qc import (
    QCGates,
    compute_qc,
    ends_mid_sentence,
    evaluate_gates,
    format_gate_report,
    has_marker_leak,
    is_runaway,
)


def rec(instruction, response, raw=None, stop="marker", tokens=5, kind=None):
    record = {
        "instruction": instruction,
        "response": response,
        "raw_completion": " " + response + "\nInstruction: next" if raw is None else raw,
        "stop_reason": stop,
        "response_tokens": tokens,
    }
    if kind is not None:
        record["type"] = kind
    return record


# Hand-counted flags per record:
#   0 clean
#   1 marker leak ("###")
#   2 limit hit, runaway (no end marker in the raw completion), truncated
#   3 limit hit but the answer ended at the marker: not runaway, not truncated
#   4 empty, near-duplicate of 3
#   5 truncated (no final punctuation)
RECORDS = [
    rec("What is the capital of France?", "Paris is the capital of France.", tokens=8, kind="qa"),
    rec("Name three prime numbers.", "### 2, 3 and 5.", stop="eos", tokens=9),
    rec(
        "Write a long essay about the sea.",
        "The sea is vast and",
        raw=" The sea is vast and",
        stop="max_new_tokens",
        tokens=64,
    ),
    rec(
        "Tell a real-life story about courage.",
        "Once upon a time.",
        raw=" Once upon a time.\nInstruction: Write a",
        stop="max_new_tokens",
        tokens=6,
    ),
    rec("Give a real-life story about courage.", "", raw="\nInstruction: x", tokens=0),
    rec("List two colours.", "Red\nBlue", stop="eos", tokens=3, kind="list"),
]


def test_hand_computed_rates():
    qc = compute_qc(
        RECORDS, step_counts={"instructions": (10, 40), "responses": (6, 8), "critique": (0, 0)}
    )
    assert qc["n"] == 6
    assert qc["empty_rate"] == pytest.approx(1 / 6) and qc["n_empty"] == 1
    assert qc["limit_hit_rate"] == pytest.approx(2 / 6)
    assert qc["runaway_rate"] == pytest.approx(1 / 6)
    assert qc["truncation_rate"] == pytest.approx(2 / 6)
    assert qc["marker_leakage_rate"] == pytest.approx(1 / 6)
    assert qc["near_duplicate_rate"] == pytest.approx(1 / 6)
    assert qc["near_duplicate_threshold"] == 0.7
    # tokens sorted: 0 3 6 8 9 64 -> median (6+8)/2; p90 at position 4.5 -> 9 + 0.5 * 55
    assert qc["median_response_tokens"] == 7.0
    assert qc["p90_response_tokens"] == pytest.approx(36.5)
    assert qc["max_response_tokens"] == 64
    assert qc["stop_reason_counts"] == {
        "marker": 2,
        "eos": 2,
        "max_new_tokens": 2,
        "stop_string": 0,
    }
    assert qc["type_counts"] == {"list": 1, "qa": 1, "untyped": 4}
    assert qc["acceptance"] == {
        "instructions": {"accepted": 10, "attempted": 40, "rate": 0.25},
        "responses": {"accepted": 6, "attempted": 8, "rate": 0.75},
        "critique": {"accepted": 0, "attempted": 0, "rate": None},
    }
    assert qc["flagged_examples"] == {
        "empty": [4],
        "limit_hit": [2, 3],
        "runaway": [2],
        "marker_leak": [1],
        "near_duplicate": [4],
        "truncated": [2, 5],
    }


def test_duplicate_flags_replace_computed_dedup():
    qc = compute_qc(RECORDS, duplicate_flags=[False, True, True, False, False, False])
    assert qc["near_duplicate_rate"] == pytest.approx(2 / 6)
    assert qc["near_duplicate_threshold"] is None
    with pytest.raises(ValueError, match="duplicate_flags has 2 entries for 6 records"):
        compute_qc(RECORDS, duplicate_flags=[False, True])
    # A stricter threshold no longer counts the courage pair (Jaccard 28/36).
    assert compute_qc(RECORDS, dedup_threshold=0.8)["near_duplicate_rate"] == 0.0


def test_configured_leak_and_stop_strings():
    record = rec("Say hi.", "Hi there. <END>", stop="eos")
    assert compute_qc([record])["marker_leakage_rate"] == 0.0
    assert compute_qc([record], leak_strings=["<END>"])["marker_leakage_rate"] == 1.0
    assert has_marker_leak("Sure.\nResponse: again")  # response_format.marker_leaked
    assert has_marker_leak("Fine. ###")
    cut = rec("Say hi.", "Hi.", raw=" Hi.<STOP> more text", stop="max_new_tokens")
    assert is_runaway(cut)
    assert not is_runaway(cut, stop_strings=["<STOP>"])


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Done.", False),
        ('He said "yes."', False),
        ("(See above.)", False),
        ("**Bold.**", False),
        ("Really?!", False),
        ("Wait\u2026", False),
        ("```python\nx = 1\n```", False),
        ("", False),  # empty is counted as empty, not as truncated
        ("and then", True),
        ("Here is a list:", True),
        ("The answer is 42", True),
    ],
)
def test_ends_mid_sentence(response, expected):
    assert ends_mid_sentence(response) is expected


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stop_reason", "length", "record 1: field 'stop_reason' must be one of"),
        ("response_tokens", 4.0, "record 1: field 'response_tokens' must be a non-negative int"),
        ("response_tokens", True, "record 1: field 'response_tokens'"),
        ("response_tokens", -1, "record 1: field 'response_tokens'"),
        ("response", None, "record 1: field 'response' must be a str"),
        ("type", 3, "record 1: field 'type'"),
    ],
)
def test_bad_records_name_the_record_and_field(field, value, message):
    bad = dict(RECORDS[1], **{field: value})
    with pytest.raises(ValueError, match=message):
        compute_qc([RECORDS[0], bad])


def test_missing_field_and_bad_step_counts():
    bad = dict(RECORDS[0])
    del bad["raw_completion"]
    with pytest.raises(ValueError, match="record 0: missing field 'raw_completion'"):
        compute_qc([bad])
    with pytest.raises(ValueError, match=r"accepted 5 > attempted 4"):
        compute_qc(RECORDS, step_counts={"responses": (5, 4)})
    with pytest.raises(ValueError, match=r"must be \(accepted, attempted\)"):
        compute_qc(RECORDS, step_counts={"responses": 5})


def test_gates_pass_and_fail_at_hand_computed_boundaries():
    qc = compute_qc(RECORDS)
    lenient = QCGates(
        min_records=6,
        max_near_duplicate_rate=1 / 6,  # equal to the value: passes
        max_marker_leakage_rate=1 / 6,
        max_limit_hit_rate=0.5,
        max_runaway_rate=0.2,
        max_empty_rate=0.2,
        max_truncation_rate=1 / 3,
    )
    report = evaluate_gates(qc, lenient)
    assert report.passed and report.failures == []
    assert len(report.checks) == 7

    strict = QCGates(min_records=7, max_marker_leakage_rate=0.0, max_limit_hit_rate=0.5)
    report = evaluate_gates(qc, strict)
    assert not report.passed
    failed = {c.gate: (c.value, c.threshold) for c in report.checks if not c.passed}
    assert failed == {
        "min_records": (6, 7),
        "max_near_duplicate_rate": (pytest.approx(1 / 6), 0.05),
        "max_marker_leakage_rate": (pytest.approx(1 / 6), 0.0),
        "max_runaway_rate": (pytest.approx(1 / 6), 0.05),
        "max_empty_rate": (pytest.approx(1 / 6), 0.0),
    }
    assert "marker_leakage_rate = 0.1667, required <= 0.0000: FAILED" in report.failures
    assert "n = 6, required >= 7: FAILED" in report.failures
    assert len(report.failures) == 5


def test_no_records_fails_every_enabled_gate():
    qc = compute_qc([])
    assert qc["n"] == 0 and qc["empty_rate"] is None and qc["median_response_tokens"] is None
    report = evaluate_gates(qc, QCGates())
    enabled = [c for c in report.checks if c.threshold is not None]
    assert not report.passed and len(report.failures) == len(enabled) == 6
    assert "marker_leakage_rate = n/a, required <= 0.0000: FAILED" in report.failures


def test_gate_config_errors():
    with pytest.raises(ValueError, match=r"unknown QC gate key\(s\) \['max_dup_rate'\]"):
        QCGates.from_dict({"max_dup_rate": 0.1})
    with pytest.raises(ValueError, match="valid keys: .*max_near_duplicate_rate"):
        QCGates.from_dict({"max_dup_rate": 0.1})
    with pytest.raises(ValueError, match="max_empty_rate must be a rate in"):
        QCGates.from_dict({"max_empty_rate": 1.5})
    with pytest.raises(ValueError, match="min_records must be a non-negative int"):
        QCGates(min_records=-1)
    gates = QCGates.from_dict({"max_limit_hit_rate": 0.2, "max_truncation_rate": None})
    assert gates.max_limit_hit_rate == 0.2 and gates.max_near_duplicate_rate == 0.05
    with pytest.raises(ValueError, match="qc has no metric 'n'"):
        evaluate_gates({"empty_rate": 0.0}, QCGates())


def test_format_gate_report_is_a_table_with_a_verdict():
    qc = compute_qc(RECORDS)
    gates = QCGates(
        min_records=5, max_near_duplicate_rate=0.2, max_runaway_rate=0.2, max_empty_rate=0.2
    )
    text = format_gate_report(evaluate_gates(qc, gates))
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value", "required", "status"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert rows["n"] == ["6", ">=", "5", "pass"]
    assert rows["marker_leakage_rate"] == ["0.1667", "<=", "0.0000", "FAIL"]
    assert rows["limit_hit_rate"] == ["0.3333", "<=", "0.1000", "FAIL"]
    assert rows["truncation_rate"] == ["0.3333", "-", "off"]
    assert lines[-1] == "QC gates FAILED: 2 of 6 enabled gates failed"
