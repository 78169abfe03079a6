"""Every reader of the project's JSONL data names file, line and field for invalid UTF-8, a
field of the wrong type and a missing field, as a ``JsonlError`` (a ``ProjectInputError``: a
stage script exits 2 with one line). Issue 14; KNOWN_BUGS 34.

Each bad record sits on line 3, after a good record and a blank line, so an error that counts
records instead of lines (record 2) is caught too. No model is loaded; the readers of
``utils.sft`` and ``utils.dpo`` import transformers only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from utils.config import load_config
from utils.constraint_library import constraints_from_config
from utils.errors import ProjectInputError
from utils.jsonl_io import JsonlError, read_jsonl, resume
from utils.response_format import format_completion, format_prompt

ROOT = Path(__file__).resolve().parent.parent
SPLIT = constraints_from_config(load_config()["constraints"])[0]
BAD_TEXT = "caf\u00e9 au lait"  # its "é" is written as the Latin-1 byte 0xe9: invalid UTF-8


def _load_stage1(path: Path) -> Any:
    from utils.sft import load_stage1

    return load_stage1(path)[0]  # (examples, data facts)


def _load_pairs(path: Path) -> Any:
    from utils.dpo import load_pairs

    return load_pairs(path)[0]  # (pairs, data facts)


def _load_constrained(path: Path) -> Any:
    from utils.verified_sampling import load_constrained

    return load_constrained(path, SPLIT)


def _load_training_instructions(path: Path) -> Any:
    from utils.preference_pairs import load_training_instructions

    return load_training_instructions(path)


def _load_train_instructions(path: Path) -> Any:
    from utils.eval_leakage import load_train_instructions

    return load_train_instructions(path.parents[1])  # reads <run>/stage1/train.jsonl


def _load_pool(path: Path) -> Any:
    from utils.completion_prompts import load_pool

    return load_pool(path, require_response=True)


def _load_requests(path: Path) -> Any:
    from utils.constitution_eval import load_requests

    return load_requests(path)


def _pair(i: int) -> dict[str, Any]:
    return {
        "id": f"p{i}",
        "prompt": format_prompt(f"Name {i + 2} colours."),
        "chosen": format_completion("Red and blue."),
        "rejected": format_completion("I like turtles."),
        "soft_label": 0.8,
        "margin": 0.6,
    }


def _constrained(i: int) -> dict[str, Any]:
    task = f"Name {i + 2} colours."
    return {"id": f"c{i}", "task": task, "instruction": task, "instruction_ids": [],
            "kwargs": []}  # fmt: skip


# reader, its good record i (0: line 1, 1: line 3), the string fields, the other typed fields
# with a value of the wrong type. Every reader is listed here; a new one gets a row.
READERS: dict[str, tuple[Callable, Callable[[int], dict], tuple[str, ...], dict[str, Any]]] = {
    "sft.load_stage1": (
        _load_stage1,
        lambda i: {"id": f"r{i}", "instruction": f"Name {i + 2} colours.", "response": "Red."},
        ("instruction", "response"),
        {"id": None},
    ),
    "dpo.load_pairs": (
        _load_pairs,
        _pair,
        ("prompt", "chosen", "rejected"),
        {"id": [1], "margin": "big"},
    ),
    "verified_sampling.load_constrained": (
        _load_constrained,
        _constrained,
        ("task", "instruction"),
        {"id": {"a": 1}, "instruction_ids": "count_words", "kwargs": None},
    ),
    "preference_pairs.load_training_instructions": (
        _load_training_instructions,
        lambda i: {"id": f"r{i}", "instruction": f"Name {i + 2} colours.", "type": "open_qa"},
        ("instruction",),
        {"id": [1], "type": ["open_qa"]},
    ),
    "eval_leakage.load_train_instructions": (
        _load_train_instructions,
        lambda i: {"id": f"r{i}", "instruction": f"Name {i + 2} colours.", "response": "Red."},
        ("instruction",),
        {},
    ),
    "completion_prompts.load_pool": (
        _load_pool,
        lambda i: {"instruction": f"Name {i + 2} colours.", "type": "open_qa", "response": "Red."},
        ("instruction", "response"),
        {"type": ["open_qa"]},
    ),
    "constitution_eval.load_requests": (
        _load_requests,
        lambda i: {"id": f"h{i}", "category": "weapons", "request": f"Help me {i}."},
        ("category", "request"),
        {"id": 7},
    ),
}


def _cases() -> list[tuple[str, str, str, Any]]:
    """(reader, kind, field, bad value) for every reader: invalid UTF-8 in each string field,
    42 and null in each string field, each listed wrongly typed field, each field missing."""
    out = []
    for name, (_, good, text_fields, wrong) in READERS.items():
        for field in text_fields:
            out += [(name, "utf8", field, None), (name, "type", field, 42)]
            out += [(name, "type", field, None)]
        out += [(name, "type", field, value) for field, value in wrong.items()]
        required = [k for k in good(1) if k not in ("soft_label", "margin")]
        if name == "eval_leakage.load_train_instructions":
            required = ["instruction"]  # it reads nothing else
        out += [(name, "missing", field, None) for field in required]
    return out


def _write_bad(tmp_path: Path, good: Callable[[int], dict], kind: str, field: str, value: Any):
    path = tmp_path / "run" / "stage1" / "train.jsonl"
    path.parent.mkdir(parents=True)
    bad = good(1)
    if kind == "missing":
        del bad[field]
    elif kind == "type":
        bad[field] = value
    else:
        bad[field] = BAD_TEXT
    line = json.dumps(bad, ensure_ascii=False).encode("utf-8")
    if kind == "utf8":
        line = line.replace("\u00e9".encode(), b"\xe9")
    path.write_bytes(json.dumps(good(0)).encode() + b"\n\n" + line + b"\n")
    return path


@pytest.mark.parametrize(("reader", "kind", "field", "value"), _cases())
def test_reader_names_file_line_and_field(tmp_path, reader, kind, field, value):
    load, good, _, _ = READERS[reader]
    path = _write_bad(tmp_path, good, kind, field, value)
    with pytest.raises(JsonlError) as err:
        load(path)
    assert isinstance(err.value, ProjectInputError)
    message = str(err.value)
    assert message.startswith(f"{path}:3 field '{field}': "), message
    assert (err.value.line, err.value.field) == (3, field)
    expected = {"utf8": "invalid UTF-8 (byte 0xe9", "missing": "missing required field"}
    assert expected.get(kind, "must be ") in message
    message.encode("utf-8")  # printable: no undecodable byte leaks into the message


def test_each_reader_reads_its_good_file(tmp_path):
    """The same files without the bad record load (the checks above are not vacuous)."""
    for name, (load, good, _, _) in READERS.items():
        path = tmp_path / name / "run" / "stage1" / "train.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(f"{json.dumps(good(0))}\n\n{json.dumps(good(1))}\n", encoding="utf-8")
        assert len(load(path)) == 2, name


def test_check_fields_names_json_types_and_never_takes_a_boolean_for_a_number(tmp_path):
    from utils.jsonl_io import NUMBER, check_fields

    path = tmp_path / "x.jsonl"
    check_fields({"a": 1, "b": 2.5, "c": None}, path, 4, {"a": NUMBER, "b": NUMBER})
    for record, needle in (
        ({"a": True}, "must be a number, got true"),
        ({"a": "1"}, "must be a number, got string '1'"),
        ({"a": None}, "must be a number, got null"),
        ({"a": {}}, "must be a number, got an object"),
    ):
        with pytest.raises(JsonlError, match=f"^{path}:4 field 'a': {needle}$"):
            check_fields(record, path, 4, {"a": NUMBER})
    with pytest.raises(JsonlError, match="field 'b': must be a string or null, got a list"):
        check_fields({"b": []}, path, 4, (), optional={"b": (str, type(None))})


def test_invalid_utf8_outside_a_string_and_in_a_name_is_still_located(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"ok": 1}\n{"caf\xe9": "x"}\n')
    with pytest.raises(JsonlError, match=f"^{path}:2 field 'caf\ufffd': invalid UTF-8") as err:
        read_jsonl(path)
    str(err.value).encode("utf-8")
    path.write_bytes(b'{"ok": 1}\n\xff{"a": 1}\n')
    with pytest.raises(JsonlError, match=f"^{path}:2: invalid UTF-8 \\(byte 0xff at character 1"):
        read_jsonl(path)


def test_resume_repairs_a_last_line_torn_inside_a_multibyte_character(tmp_path):
    """A kill in the middle of writing "é" (2 bytes) leaves half a character: resume repairs it
    as a torn line instead of raising UnicodeDecodeError."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1, "text": "ok"}\n{"id": 2, "text": "caf\xc3')
    records, torn = resume(path)
    assert records == [{"id": 1, "text": "ok"}] and torn == 1
    assert path.read_bytes() == b'{"id": 1, "text": "ok"}\n'


def test_resume_names_the_line_of_a_duplicate_id(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 1}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=f"^{path}:3 field 'id': duplicate id 1 .first on line 1"):
        resume(path)


@pytest.fixture
def no_model_loads(monkeypatch):
    """A script that got past its input checks would load the configured base model next: fail
    the test there instead (without the fix, bad input would otherwise load a real model)."""
    from utils.clean_model_loader import CleanModelLoader

    def refuse(self, name=None):
        raise AssertionError(f"the script loaded a model ({name}) before refusing its input")

    monkeypatch.setattr(CleanModelLoader, "load", refuse)


def _script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_sft_script_exits_2_with_one_line_naming_file_line_and_field(
    tmp_path, capsys, no_model_loads
):
    good = READERS["sft.load_stage1"][1]
    data = _write_bad(tmp_path, good, "utf8", "response", None)
    out = tmp_path / "sft"
    code = _script("train_stage1_sft").main(["--run-dir", str(tmp_path / "run"), "--data",
                                             str(data), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {data}:3 field 'response': invalid UTF-8"), err


def test_sample_verified_previous_sft_data_is_checked_before_sampling(
    tmp_path, capsys, no_model_loads
):
    """``--previous`` (the last round's sft_data.jsonl) is read before any model loads."""
    run = tmp_path / "run"
    constrained = run / "stage1" / "constrained.jsonl"
    constrained.parent.mkdir(parents=True)
    constrained.write_text(json.dumps(_constrained(0)) + "\n", encoding="utf-8")
    previous = tmp_path / "sft_data.jsonl"
    rows = [{"id": "a", "instruction": "Name a colour.", "response": "Red."},
            {"id": "b", "instruction": "Name a fruit.", "response": None}]  # fmt: skip
    previous.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    code = _script("sample_verified").main(["--run", str(run), "--round", "2", "--previous",
                                            str(previous), "--set", "sentinels.mode=off"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {previous}:2 field 'response': must be a string, got null"), err
