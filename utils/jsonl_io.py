"""JSONL reading and crash-safe appending.

Every artifact of the project is JSONL: one JSON object per line. Readers name the file, line
and field of anything malformed; writers append and flush (and fsync) each record, so a run
killed at any moment leaves at most one partial last line, which ``resume`` discards and
reports before the run continues, with no lost and no duplicate record.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from utils.errors import ProjectInputError


class JsonlError(ProjectInputError, ValueError):
    """A malformed JSONL file; the message names file, line and field."""

    def __init__(self, path: str | Path, line: int, message: str, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}" + (f" field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class DiskFullError(OSError):
    """Raised instead of a bare ENOSPC, naming the file whose write failed."""


# A field's expected JSON type(s): ``str``, ``NUMBER``, ``list``, ``dict``, ``NULL``, or a tuple.
FieldTypes = type | tuple[type, ...]
NUMBER: tuple[type, ...] = (int, float)  # never a boolean, though Python's bool is an int
NULL = type(None)
RECORD_ID: tuple[type, ...] = (str, int)
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object", NULL: "null"}  # fmt: skip
# Text opened with errors="surrogateescape" holds each undecodable byte as U+DC80..U+DCFF.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _describe(types: tuple[type, ...]) -> str:
    if int in types and float in types:
        types = (float, *(t for t in types if t not in (int, float)))
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)


def _got(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    return _describe((type(value),))


def check_fields(
    record: Mapping[str, Any],
    path: str | Path,
    line: int,
    required: Iterable[str] | Mapping[str, FieldTypes] = (),
    optional: Mapping[str, FieldTypes] | None = None,
) -> None:
    """Raise ``JsonlError`` (file, line, field) when a ``required`` field is missing or a field
    of ``required``/``optional`` (given as a mapping name -> type(s)) has another JSON type."""
    for key in required:
        if key not in record:
            raise JsonlError(path, line, "missing required field", field=key)
    typed = {**(required if isinstance(required, Mapping) else {}), **(optional or {})}
    for key, types in typed.items():
        types = types if isinstance(types, tuple) else (types,)
        if key not in record:
            continue
        value = record[key]
        ok = bool in types if isinstance(value, bool) else isinstance(value, types)
        if not ok:
            raise JsonlError(
                path, line, f"must be {_describe(types)}, got {_got(value)}", field=key
            )


def read_jsonl(
    path: str | Path,
    required: Iterable[str] | Mapping[str, FieldTypes] = (),
    optional: Mapping[str, FieldTypes] | None = None,
) -> list[dict[str, Any]]:
    """All records of ``path``; raises ``JsonlError`` naming file:line[:field] on bad input:
    invalid UTF-8 or JSON, a missing ``required`` field, a field of the wrong type (when
    ``required``/``optional`` map names to types, see ``check_fields``)."""
    return [r for _, r in iter_jsonl_numbered(path, required, optional)]


def read_jsonl_numbered(
    path: str | Path,
    required: Iterable[str] | Mapping[str, FieldTypes] = (),
    optional: Mapping[str, FieldTypes] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every record, checked as ``read_jsonl`` does; for readers
    that validate further and must name the line (blank lines are skipped, so the record's
    index is not its line)."""
    return list(iter_jsonl_numbered(path, required, optional))


def iter_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    return (r for _, r in iter_jsonl_numbered(path, required))


def iter_jsonl_numbered(
    path: str | Path,
    required: Iterable[str] | Mapping[str, FieldTypes] = (),
    optional: Mapping[str, FieldTypes] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    path = Path(path)
    required = required if isinstance(required, Mapping) else tuple(required)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    # surrogateescape: a bad byte is reported with its line instead of a bare UnicodeDecodeError.
    with path.open("r", encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            bad = _BAD_BYTE.search(line)
            if bad:
                byte = ord(bad.group()) - 0xDC00
                raise JsonlError(
                    path,
                    lineno,
                    f"invalid UTF-8 (byte 0x{byte:02x} at character {bad.start() + 1})",
                    field=_field_with_bad_bytes(line),
                )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise JsonlError(
                    path, lineno, f"expected a JSON object, got {type(record).__name__}"
                )
            check_fields(record, path, lineno, required, optional)
            yield lineno, record


def _field_with_bad_bytes(line: str) -> str | None:
    """The top-level field whose name or value holds an undecodable byte (None if the line is
    not a JSON object); undecodable bytes in the name are shown as U+FFFD."""

    def bad(v: Any) -> bool:
        if isinstance(v, str):
            return bool(_BAD_BYTE.search(v))
        if isinstance(v, dict):
            return any(bad(k) or bad(x) for k, x in v.items())
        return isinstance(v, list) and any(bad(x) for x in v)

    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    for key, value in record.items():
        if bad(key) or bad(value):
            return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


def resume(path: str | Path, key: str = "id") -> tuple[list[dict[str, Any]], int]:
    """Records already written to ``path`` and the number of torn trailing lines removed.

    Only a torn LAST line (a write interrupted by a kill) is repaired; malformed lines elsewhere
    raise ``JsonlError``. Duplicate keys raise too: they mean two writers shared the file.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = 0
    # The text after the last newline is complete only if it parses as an object.
    if lines and lines[-1].strip():
        try:
            json.loads(lines[-1])
            complete = True
        except ValueError:  # bad JSON, or a kill in the middle of a multi-byte character
            complete = False
        if not complete:
            torn = 1
            keep = raw[: len(raw) - len(lines[-1])]
            with path.open("r+b") as f:
                f.truncate(len(keep))
    numbered = read_jsonl_numbered(path)
    seen: dict[Any, int] = {}
    for i, r in numbered:
        if key in r:
            if r[key] in seen:
                raise JsonlError(
                    path, i, f"duplicate {key} {r[key]!r} (first on line {seen[r[key]]})", key
                )
            seen[r[key]] = i
    return [r for _, r in numbered], torn


class JsonlAppender:
    """Append records one line at a time, flushed and fsynced, so a kill loses nothing written."""

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        # Make sure an existing file ends with a newline before appending.
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
            if needs_newline:
                raise JsonlError(
                    self.path, -1, "file does not end with a newline; call resume() first"
                )
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(
                    errno.ENOSPC, f"disk full while appending to {self.path}"
                ) from e
            raise

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole file via a temporary file and rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}") from e
        raise
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(
            json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}") from e
        raise
    os.replace(tmp, path)
