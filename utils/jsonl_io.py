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
from collections.abc import Iterable, Iterator
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


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """All records of ``path``; raises ``JsonlError`` naming file:line[:field] on bad input."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    path = Path(path)
    required = tuple(required)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise JsonlError(
                    path, lineno, f"expected a JSON object, got {type(record).__name__}"
                )
            for key in required:
                if key not in record:
                    raise JsonlError(path, lineno, "missing required field", field=key)
            yield record


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
        except json.JSONDecodeError:
            complete = False
        if not complete:
            torn = 1
            keep = raw[: len(raw) - len(lines[-1])]
            with path.open("r+b") as f:
                f.truncate(len(keep))
    records = read_jsonl(path)
    seen: dict[Any, int] = {}
    for i, r in enumerate(records, start=1):
        if key in r:
            if r[key] in seen:
                raise JsonlError(
                    path, i, f"duplicate {key} {r[key]!r} (first at record {seen[r[key]]})", key
                )
            seen[r[key]] = i
    return records, torn


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
