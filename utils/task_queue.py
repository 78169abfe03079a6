"""The markdown task queue that agents use to pick up work.

A task is one markdown file whose sections are ``## <Header>`` lines (see tasks/TEMPLATE.md).
Its state is the folder it lies in: ``pending/ in_progress/ completed/ blocked/`` under the
queue root. A transition happens under a lock per task (``<root>/.locks/<name>.lock``): the
new text (Status log line appended) is written to a temporary file in the target folder, put
in place in one step (never over an existing file), and only then is the old file removed.
Two agents racing to move the same task cannot both win: the second finds the task no longer
where it saw it and gets "already moved". ``new`` writes the same way, so a failed write (a
full disk) leaves no file. A file that is not valid UTF-8 or breaks the template is reported
by name (and line) by ``scan`` without hiding the other tasks.

Allowed transitions::

    pending -> in_progress -> completed
    pending | in_progress | completed -> blocked      (a reason is required)
    blocked -> pending | in_progress

Task names are file stems such as ``20261123T160512-short-slug``; any name that could escape
the root (``..``, an absolute path, a separator, a symlink) is refused, and so is a name found
in two state folders at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

from utils.atomic_files import (
    LockTimeoutError,
    Utf8Error,
    file_lock,
    publish,
    read_utf8,
    write_temp,
)
from utils.task_format import (  # noqa: F401  (re-exported: the queue's one import point)
    ALLOWED_TRANSITIONS,
    CREATED_FORMAT,
    FILE_STAMP_FORMAT,
    PRIORITIES,
    REQUIRED_HEADERS,
    STATES,
    TEMPLATE_NAME,
    UNASSIGNED,
    Task,
    TaskError,
    TaskFormatError,
    _as_utc,
    _one_line,
    append_status_line,
    filter_tasks,
    format_created,
    format_table,
    parse_task,
    render_new_task,
    set_section,
    slugify,
    status_line,
    utc_now,
    validate_task_name,
)

LOCK_DIR = ".locks"  # per-task lock files under the queue root (git-ignored by its own file)
LOCK_TIMEOUT_S = 30.0


class TaskQueue:
    """The queue under ``root`` (the folder holding pending/ in_progress/ completed/ blocked/)."""

    def __init__(
        self,
        root: str | Path,
        clock: Callable[[], datetime] = utc_now,
        lock_timeout: float = LOCK_TIMEOUT_S,
    ):
        self.root = Path(root)
        self.clock = clock  # injectable so tests get fixed timestamps
        self.lock_timeout = lock_timeout

    # --- locating ---------------------------------------------------------------------------

    def state_dir(self, state: str) -> Path:
        """The folder of ``state``; raises if it is missing or a symlink out of the root."""
        if state not in STATES:
            raise TaskError(f"unknown state '{state}'; expected one of {', '.join(STATES)}")
        folder = self.root / state
        if not folder.is_dir():
            raise TaskError(
                f"{folder}: missing; a queue root needs {'/ '.join(STATES)}/ folders "
                f"(is --root {self.root} right?)"
            )
        if folder.resolve() != self.root.resolve() / state:
            raise TaskError(f"{folder}: resolves to {folder.resolve()}, outside {self.root}")
        return folder

    def _check_inside(self, path: Path) -> None:
        # A task file must be a regular file in its state folder; a symlink could point anywhere.
        if path.is_symlink():
            target = os.readlink(path)
            inside = path.resolve().is_relative_to(self.root.resolve())
            where = "inside" if inside else "outside"
            raise TaskError(
                f"{path}: is a symlink to {target} ({where} the queue); "
                "task files must be regular files"
            )
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise TaskError(f"{path}: resolves outside the queue root {self.root}")
        if not path.is_file():
            raise TaskError(f"{path}: not a regular file")

    def _find(self, stem: str) -> list[Path]:
        candidates = [self.state_dir(s) / f"{stem}.md" for s in STATES]
        return [p for p in candidates if os.path.lexists(p)]

    def locate(self, name: str) -> Path:
        """The one path of task ``name``; raises if absent, or present in two folders."""
        stem = validate_task_name(name)
        found = self._find(stem)
        if not found:
            raise TaskError(f"no task '{stem}' in any of {', '.join(STATES)} under {self.root}")
        if len(found) > 1:
            raise TaskError(
                f"task '{stem}' exists in {len(found)} folders at once: "
                f"{', '.join(str(p) for p in found)}; keep one and delete the others"
            )
        self._check_inside(found[0])
        return found[0]

    def read_text(self, path: Path) -> str:
        """The text of a task file; a file that is not UTF-8 or cannot be read is a
        TaskFormatError naming the file (and the line of the first bad byte)."""
        try:
            return read_utf8(path)
        except Utf8Error as e:
            raise TaskFormatError(path, None, e.detail, e.line) from None
        except FileNotFoundError:
            raise TaskError(f"{path}: moved or deleted by someone else meanwhile") from None
        except OSError as e:
            raise TaskFormatError(path, None, f"cannot be read ({e.strerror})") from None

    def get(self, name: str) -> Task:
        """The parsed task ``name``."""
        path = self.locate(name)
        return parse_task(self.read_text(path), path)

    def scan(self) -> tuple[list[Task], list[str]]:
        """Every valid task, and one error message per invalid file or duplicated name; one
        bad file never hides the others."""
        seen: dict[str, list[Path]] = {}
        for state in STATES:
            for path in sorted(self.state_dir(state).iterdir()):
                if path.name.startswith(".") or path.suffix != ".md":
                    continue  # .gitkeep and in-flight temp files are not tasks
                seen.setdefault(path.stem, []).append(path)
        tasks: list[Task] = []
        errors: list[str] = []
        for stem, paths in sorted(seen.items()):
            try:
                validate_task_name(paths[0].name)
                tasks.append(self._scan_one(stem, paths))
            except TaskError as e:
                errors.append(str(e) if str(paths[0]) in str(e) else f"{paths[0]}: {e}")
        return tasks, errors

    def _scan_one(self, stem: str, paths: list[Path]) -> Task:
        if len(paths) == 1:
            try:
                self._check_inside(paths[0])
                return parse_task(self.read_text(paths[0]), paths[0])
            except TaskFormatError:
                raise
            except TaskError:
                if os.path.lexists(paths[0]):
                    raise
        # Two copies, or a file gone while listing: a move may be half done. Look again while
        # holding the task's lock, when no move of it is under way.
        with self._task_lock(stem):
            path = self.locate(stem)
            return parse_task(self.read_text(path), path)

    # --- writing ----------------------------------------------------------------------------

    @contextmanager
    def _task_lock(self, stem: str) -> Iterator[None]:
        """Hold the lock of task ``stem``; waiting longer than ``lock_timeout`` is a TaskError."""
        folder = self.root / LOCK_DIR
        lock_path = folder / f"{stem}.lock"
        try:
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                (folder / ".gitignore").write_text("*\n", encoding="utf-8")
            if folder.resolve() != self.root.resolve() / LOCK_DIR:
                raise TaskError(f"{folder}: resolves outside the queue root {self.root}")
            with ExitStack() as stack:
                stack.enter_context(file_lock(lock_path, self.lock_timeout))
                acquired = stack.pop_all()
        except LockTimeoutError as e:
            raise TaskError(
                f"task '{stem}': {e.strerror}; another agent is moving it (retry), or delete "
                "the lock file if no agent is running"
            ) from None
        except OSError as e:
            raise TaskError(f"{lock_path}: cannot take the task lock ({e.strerror})") from None
        with acquired:
            yield

    def _write_new_file(self, path: Path, text: str) -> None:
        """``text`` at ``path`` in one step, or no file at all (FileExistsError if taken)."""
        try:
            tmp = write_temp(path.parent, path.name, text)
        except OSError as e:
            raise TaskError(f"{path}: could not be written ({e.strerror}); nothing changed") from e
        publish(tmp, path)

    def new(
        self,
        title: str,
        priority: str = "P2",
        *,
        assigned_to: str = UNASSIGNED,
        objective: str | None = None,
        criteria: Sequence[str] = (),
        files: Sequence[str] = (),
        dependencies: Sequence[str] = (),
        test_plan: str | None = None,
        agent: str | None = None,
        note: str | None = None,
    ) -> Task:
        """Create a pending task from ``<root>/TEMPLATE.md``, named '<UTC stamp>-<slug>.md'.
        The file appears whole or not at all (a failed write raises TaskError, leaving none)."""
        if priority not in PRIORITIES:
            raise TaskError(f"priority '{priority}' is not one of {', '.join(PRIORITIES)}")
        template = self.root / TEMPLATE_NAME
        if not template.is_file():
            raise TaskError(f"{template}: no template; the queue root needs {TEMPLATE_NAME}")
        pending = self.state_dir("pending")
        now = self.clock()
        text = render_new_task(
            self.read_text(template),
            title=title,
            priority=priority,
            created=now,
            assigned_to=assigned_to,
            objective=objective,
            criteria=criteria,
            files=files,
            dependencies=dependencies,
            test_plan=test_plan,
            log_line=status_line(now, "created in pending", agent, note),
        )
        base = f"{_as_utc(now).strftime(FILE_STAMP_FORMAT)}-{slugify(title)}"
        parse_task(text, pending / f"{base}.md")  # the template must yield a valid task
        for k in range(1, 1000):
            stem = base if k == 1 else f"{base}-{k}"  # one title twice in one second: -2, -3
            if self._find(stem):
                continue
            path = pending / f"{stem}.md"
            try:
                self._write_new_file(path, text)
            except FileExistsError:
                continue  # another agent took this name between the check and the write
            return parse_task(text, path)
        raise TaskError(f"{pending}: 999 tasks named '{base}' already; choose another title")

    def move(
        self,
        name: str,
        to_state: str,
        *,
        agent: str | None = None,
        note: str | None = None,
        assign: bool = False,
    ) -> Task:
        """Move task ``name`` to ``to_state`` if allowed, then log it (and with ``assign``,
        write ``agent`` into Assigned To). One step under the task's lock: the new text is
        put into the target folder, then the old file removed. If the task left the folder it
        was in when this call looked (another agent moved it), raises "already moved"."""
        dst_dir = self.state_dir(to_state)
        stem = validate_task_name(name)
        before = self._find(stem)  # what the caller acts on; two or none = a move in flight
        with self._task_lock(stem):
            src = self.locate(stem)
            if len(before) != 1 or before[0] != src:
                was = before[0].parent.name if len(before) == 1 else "a half-done move"
                raise TaskError(
                    f"task '{stem}' already moved by someone else (from {was} to "
                    f"{src.parent.name}) while this {to_state} waited; run 'show {stem}'"
                )
            text = self.read_text(src)
            task = parse_task(text, src)  # refuse to move a broken file
            if to_state not in ALLOWED_TRANSITIONS[task.state]:
                allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[task.state]))
                raise TaskError(
                    f"task '{task.name}' is {task.state}; {task.state} -> {to_state} is not "
                    f"allowed (from {task.state}: {allowed})"
                )
            if assign and not (agent and agent.strip()):
                raise TaskError(f"moving '{task.name}' to {to_state} needs an agent name")
            if assign:
                text = set_section(text, "Assigned To", _one_line(agent or "", "agent"))
            text = append_status_line(
                text, status_line(self.clock(), f"{task.state} -> {to_state}", agent, note)
            )
            dst = dst_dir / src.name
            try:
                self._write_new_file(dst, text)
            except FileExistsError:
                raise TaskError(
                    f"{dst}: already exists; refusing to overwrite it with {src}"
                ) from None
            os.unlink(src)
            return parse_task(text, dst)

    def start(self, name: str, agent: str, note: str | None = None) -> Task:
        """pending|blocked -> in_progress, recording ``agent`` in Assigned To."""
        return self.move(name, "in_progress", agent=agent, note=note, assign=True)

    def done(self, name: str, agent: str | None = None, note: str | None = None) -> Task:
        """in_progress -> completed."""
        return self.move(name, "completed", agent=agent, note=note)

    def block(self, name: str, reason: str, agent: str | None = None) -> Task:
        """Any state but blocked -> blocked; ``reason`` is required and logged."""
        if not reason or not reason.strip():
            raise TaskError("blocking a task needs a reason (what it waits for)")
        return self.move(name, "blocked", agent=agent, note=reason)

    def unblock(self, name: str, agent: str | None = None, note: str | None = None) -> Task:
        """blocked -> pending (use ``start`` for blocked -> in_progress)."""
        return self.move(name, "pending", agent=agent, note=note)
