"""Task files as text: the template's headers, parsing and validation, name safety, the
Status log, rendering a new task, filtering and the table. Pure functions, no filesystem;
``utils.task_queue`` stores tasks in folders and re-exports everything here.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

STATES: tuple[str, ...] = ("pending", "in_progress", "completed", "blocked")
PRIORITIES: tuple[str, ...] = ("P0", "P1", "P2", "P3")
REQUIRED_HEADERS: tuple[str, ...] = (
    "Title",
    "Priority",
    "Assigned To",
    "Created",
    "Objective",
    "Success Criteria",
    "Files",
    "Dependencies",
    "Test Plan",
    "Status log",
)
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"in_progress", "blocked"}),
    "in_progress": frozenset({"completed", "blocked"}),
    "completed": frozenset({"blocked"}),
    "blocked": frozenset({"pending", "in_progress"}),
}
UNASSIGNED = "unassigned"
TEMPLATE_NAME = "TEMPLATE.md"
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # the Created header and Status log lines, always UTC
FILE_STAMP_FORMAT = "%Y%m%dT%H%M%S"  # the file-name prefix, sortable as text
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_HEADER_RE = re.compile(r"^##\s+(\S.*?)\s*#*\s*$")
_CHECKBOX_RE = re.compile(r"^[-*] \[( |x|X)\] (\S.*)$")
_SINGLE_LINE_HEADERS = ("Title", "Priority", "Assigned To", "Created")


class TaskError(ValueError):
    """A user error in the task queue (bad name, refused transition, missing task)."""


class TaskFormatError(TaskError):
    """A task file that breaks the template; the message names the file and the header."""

    def __init__(self, path: str | Path, header: str | None, message: str, line: int | None = None):
        self.path, self.header, self.line = str(path), header, line
        where = f"{path}:{line}:" if line else f"{path}:"
        if header:
            where += f" header '## {header}'"
        super().__init__(f"{where} {message}")


@dataclass(frozen=True)
class Task:
    """One parsed task file; ``sections`` keeps every section body as written."""

    name: str
    state: str
    path: Path
    title: str
    priority: str
    assigned_to: str
    created: str
    sections: dict[str, str]
    criteria: tuple[tuple[bool, str], ...]  # (checked, text) per Success Criteria checkbox
    status_log: tuple[str, ...]

    @property
    def unchecked_criteria(self) -> list[str]:
        return [text for checked, text in self.criteria if not checked]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_created(when: datetime) -> str:
    """``when`` as the UTC text used in Created and Status log lines."""
    return _as_utc(when).strftime(CREATED_FORMAT)


def _as_utc(when: datetime) -> datetime:
    # A naive datetime is taken to be UTC already; an aware one is converted.
    return (
        when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    )


def slugify(title: str, max_len: int = 40) -> str:
    """Lowercase ASCII words of ``title`` joined by '-', cut at a word boundary; 'task' if none."""
    words = re.findall(r"[a-z0-9]+", title.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_len:
            break
        slug = candidate
    if not slug and words:
        slug = words[0][:max_len]  # a single over-long word is truncated rather than dropped
    return slug or "task"


def validate_task_name(name: str) -> str:
    """The task stem of ``name`` (an optional '.md' dropped); raises TaskError if it could
    leave the queue root or is not a plain file stem."""
    if not isinstance(name, str) or not name.strip():
        raise TaskError("task name is empty")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise TaskError(f"task name '{name}' is an absolute path; give the bare file name")
    if ".." in name:
        raise TaskError(f"task name '{name}' contains '..'; names must stay inside the queue")
    if "/" in name or "\\" in name or os.sep in name:
        raise TaskError(f"task name '{name}' contains a path separator; give the bare file name")
    stem = name[:-3] if name.endswith(".md") else name
    if not _NAME_RE.match(stem):
        raise TaskError(
            f"task name '{name}' is not a task file name "
            "(letters, digits, '-' and '_' only, e.g. 20261123T160512-short-slug)"
        )
    return stem


def _split_sections(text: str) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Lines of ``text`` and (header, header_line, end_line) per '## ' section.

    Lines inside fenced code blocks are never headers, so a Test Plan may quote markdown.
    """
    lines = text.splitlines()
    starts: list[tuple[str, int]] = []
    in_fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if not in_fence:
            m = _HEADER_RE.match(line)
            if m:
                starts.append((m.group(1), i))
    spans = []
    for k, (header, i) in enumerate(starts):
        end = starts[k + 1][1] if k + 1 < len(starts) else len(lines)
        spans.append((header, i, end))
    return lines, spans


def _canonical(header: str) -> str | None:
    # Headers match case- and space-insensitively so "Status Log" is the Status log section.
    key = " ".join(header.split()).lower()
    for required in REQUIRED_HEADERS:
        if required.lower() == key:
            return required
    return None


def parse_task(text: str, path: str | Path, state: str | None = None) -> Task:
    """Parse and validate one task file's text; raises TaskFormatError naming path and header."""
    path = Path(path)
    state = state if state is not None else path.parent.name
    lines, spans = _split_sections(text)
    sections: dict[str, str] = {}
    at: dict[str, int] = {}  # 1-based line of each header, for error messages
    for header, start, end in spans:
        name = _canonical(header) or header
        if name in sections:
            raise TaskFormatError(
                path, name, "appears twice; keep one section per header", start + 1
            )
        sections[name] = "\n".join(lines[start + 1 : end]).strip()
        at[name] = start + 1
    for header in REQUIRED_HEADERS:
        if header not in sections:
            raise TaskFormatError(
                path,
                header,
                "is missing (every template header is required; see tasks/TEMPLATE.md)",
            )
        if not sections[header]:
            raise TaskFormatError(
                path, header, "is empty (write 'none' if nothing applies)", at[header]
            )
    for header in _SINGLE_LINE_HEADERS:
        if "\n" in sections[header]:
            raise TaskFormatError(path, header, "must be a single line", at[header])
    priority = sections["Priority"]
    if priority not in PRIORITIES:
        raise TaskFormatError(
            path,
            "Priority",
            f"has '{priority}'; expected one of {', '.join(PRIORITIES)}",
            at["Priority"],
        )
    try:
        datetime.strptime(sections["Created"], CREATED_FORMAT)
    except ValueError:
        raise TaskFormatError(
            path,
            "Created",
            f"has '{sections['Created']}'; expected UTC like 2026-11-23T16:05:12Z",
            at["Created"],
        ) from None
    criteria = []
    for line in sections["Success Criteria"].splitlines():
        if not line.strip() or line[:1].isspace():
            continue  # blank lines and indented continuations belong to the previous box
        m = _CHECKBOX_RE.match(line)
        if not m:
            raise TaskFormatError(
                path,
                "Success Criteria",
                f"has line '{line}', which is not a '- [ ] ...' checkbox",
                at["Success Criteria"],
            )
        criteria.append((m.group(1) != " ", m.group(2)))
    log = tuple(line for line in sections["Status log"].splitlines() if line.strip())
    return Task(
        name=path.stem,
        state=state,
        path=path,
        title=sections["Title"],
        priority=priority,
        assigned_to=sections["Assigned To"],
        created=sections["Created"],
        sections=sections,
        criteria=tuple(criteria),
        status_log=log,
    )


def set_section(text: str, header: str, body: str) -> str:
    """``text`` with the body of section ``header`` replaced by ``body`` (other text untouched)."""
    lines, spans = _split_sections(text)
    for name, start, end in spans:
        if (_canonical(name) or name) == header:
            # Keep one blank line before the next header so the markdown stays readable.
            tail = [""] if end < len(lines) else []
            new_lines = lines[: start + 1] + body.strip("\n").splitlines() + tail + lines[end:]
            return "\n".join(new_lines) + "\n"
    raise TaskError(f"no '## {header}' section to set")


def append_status_line(text: str, line: str) -> str:
    """``text`` with ``line`` appended after the last non-blank line of the Status log."""
    lines, spans = _split_sections(text)
    for name, start, end in spans:
        if _canonical(name) == "Status log":
            last = start
            for i in range(start + 1, end):
                if lines[i].strip():
                    last = i
            new_lines = lines[: last + 1] + [line] + lines[last + 1 :]
            return "\n".join(new_lines) + "\n"
    raise TaskError("no '## Status log' section to append to")


def status_line(
    when: datetime, event: str, agent: str | None = None, note: str | None = None
) -> str:
    """One Status log line: '- <UTC time> <event>[ by <agent>][: <note>]'."""
    line = f"- {format_created(when)} {event}"
    if agent:
        line += f" by {_one_line(agent, 'agent')}"
    if note and note.strip():
        line += f": {' '.join(note.split())}"  # a note is collapsed onto the log's one line
    return line


def _one_line(value: str, what: str) -> str:
    value = value.strip()
    if not value or "\n" in value or "\r" in value:
        raise TaskError(f"{what} must be one non-empty line, got {value!r}")
    return value


def _wrap(text: str, width: int = 100) -> str:
    # Prose given on one command line is wrapped so the file reads well; author newlines stay.
    return "\n".join(
        textwrap.fill(line, width, break_on_hyphens=False) if line.strip() else ""
        for line in text.splitlines()
    )


def render_new_task(
    template_text: str,
    *,
    title: str,
    priority: str,
    created: datetime,
    assigned_to: str = UNASSIGNED,
    objective: str | None = None,
    criteria: Sequence[str] = (),
    files: Sequence[str] = (),
    dependencies: Sequence[str] = (),
    test_plan: str | None = None,
    log_line: str,
) -> str:
    """A new task's markdown from the template: the metadata filled in, template guidance kept
    for every section not given, and the text before the first '## ' header dropped."""
    lines, spans = _split_sections(template_text)
    if not spans:
        raise TaskError("the template has no '## ' headers")
    text = "\n".join(lines[spans[0][1] :]) + "\n"
    fills: dict[str, str] = {
        "Title": _one_line(title, "title"),
        "Priority": priority,
        "Assigned To": _one_line(assigned_to, "assigned to"),
        "Created": format_created(created),
        "Status log": log_line,
    }
    if objective is not None:
        fills["Objective"] = _wrap(objective)
    if criteria:
        fills["Success Criteria"] = "\n".join(
            f"- [ ] {_one_line(c, 'criterion')}" for c in criteria
        )
    if files:
        fills["Files"] = "\n".join(f"- {_one_line(f, 'file')}" for f in files)
    if dependencies:
        fills["Dependencies"] = "\n".join(f"- {_one_line(d, 'dependency')}" for d in dependencies)
    if test_plan is not None:
        fills["Test Plan"] = _wrap(test_plan)
    for header, body in fills.items():
        text = set_section(text, header, body)
    return text


def filter_tasks(
    tasks: Iterable[Task],
    state: str | None = None,
    assignee: str | None = None,
    priority: str | None = None,
) -> list[Task]:
    """Tasks matching every given filter (assignee case-insensitively), sorted by state order,
    priority, then name (oldest first)."""
    if state is not None and state not in STATES:
        raise TaskError(f"unknown state '{state}'; expected one of {', '.join(STATES)}")
    if priority is not None and priority not in PRIORITIES:
        raise TaskError(f"unknown priority '{priority}'; expected one of {', '.join(PRIORITIES)}")
    kept = [
        t
        for t in tasks
        if (state is None or t.state == state)
        and (assignee is None or t.assigned_to.lower() == assignee.strip().lower())
        and (priority is None or t.priority == priority)
    ]
    return sorted(kept, key=lambda t: (STATES.index(t.state), t.priority, t.name))


def format_table(tasks: Sequence[Task]) -> str:
    """A fixed-width text table: NAME, STATE, PRI, ASSIGNED TO, TITLE."""
    rows = [("NAME", "STATE", "PRI", "ASSIGNED TO", "TITLE")]
    rows += [(t.name, t.state, t.priority, t.assigned_to, t.title) for t in tasks]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    return "\n".join(line.rstrip() for line in out) + "\n"
