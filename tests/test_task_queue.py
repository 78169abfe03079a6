"""The markdown task queue: parsing, validation, transitions, name safety and the CLI."""

from __future__ import annotations

import errno
import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from utils.task_queue import (
    STATES,
    TaskError,
    TaskFormatError,
    TaskQueue,
    append_status_line,
    filter_tasks,
    format_table,
    parse_task,
    set_section,
    slugify,
    validate_task_name,
)

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 23, 16, 5, 12, tzinfo=timezone.utc)


def _load_cli():
    spec = importlib.util.spec_from_file_location("tasks_cli", REPO / "scripts" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


class Clock:
    """A clock that starts at T0 and advances one minute per call, so log lines are exact."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(minutes=1)):
        self.now, self.step = start, step

    def __call__(self) -> datetime:
        current = self.now
        self.now += self.step
        return current


@pytest.fixture
def root(tmp_path: Path) -> Path:
    queue_root = tmp_path / "tasks"
    for state in STATES:
        (queue_root / state).mkdir(parents=True)
    shutil.copy(REPO / "tasks" / "TEMPLATE.md", queue_root / "TEMPLATE.md")
    return queue_root


@pytest.fixture
def queue(root: Path) -> TaskQueue:
    return TaskQueue(root, clock=Clock())


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = CLI.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- pure helpers -----------------------------------------------------------------------------


def test_slugify_hand_values():
    assert slugify("Short slug") == "short-slug"
    assert slugify("Run the Qwen2.5-32B recipe!") == "run-the-qwen2-5-32b-recipe"
    assert slugify("a b c", max_len=3) == "a-b"  # cut at a word boundary, never mid-word
    assert slugify("x" * 50, max_len=10) == "x" * 10
    assert slugify("???") == "task"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../etc/passwd", "'..'"),
        ("..", "'..'"),
        ("/abs", "absolute path"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("", "empty"),
        ("has space", "not a task file name"),
        (".hidden", "not a task file name"),
    ],
)
def test_validate_task_name_refuses_escapes(name, fragment):
    with pytest.raises(TaskError) as info:
        validate_task_name(name)
    assert fragment in str(info.value)


def test_validate_task_name_accepts_stem_and_md():
    assert validate_task_name("20261123T160512-short-slug") == "20261123T160512-short-slug"
    assert validate_task_name("20261123T160512-short-slug.md") == "20261123T160512-short-slug"


def test_set_section_and_append_keep_other_text():
    text = "## A\nold\n\n## Status log\n- one\n\n## B\ntail\n"
    with pytest.raises(TaskError, match="no '## Assigned To' section"):
        set_section(text, "Assigned To", "x")
    replaced = set_section("## Assigned To\nunassigned\n\n## B\nkeep\n", "Assigned To", "w1")
    assert replaced == "## Assigned To\nw1\n\n## B\nkeep\n"
    appended = append_status_line(text, "- two")
    assert appended == "## A\nold\n\n## Status log\n- one\n- two\n\n## B\ntail\n"


def test_header_inside_code_fence_is_not_a_section(queue):
    task = queue.new("Fenced", test_plan="run:\n```\n## Priority\nP9\n```")
    parsed = parse_task(task.path.read_text(), task.path)
    assert parsed.priority == "P2"
    assert "## Priority\nP9" in parsed.sections["Test Plan"]


# --- create / list / transitions --------------------------------------------------------------


def test_new_names_file_from_timestamp_and_slug(queue, root):
    task = queue.new("Short slug", "P1", criteria=["it works"], files=["utils/x.py"])
    assert task.path == root / "pending" / "20261123T160512-short-slug.md"
    assert (task.state, task.priority, task.assigned_to) == ("pending", "P1", "unassigned")
    assert task.created == "2026-11-23T16:05:12Z"
    assert task.criteria == ((False, "it works"),)
    assert task.sections["Files"] == "- utils/x.py"
    assert task.status_log == ("- 2026-11-23T16:05:12Z created in pending",)
    # The template's guidance preamble (before '## Title') is not copied into tasks.
    assert task.path.read_text().startswith("## Title\nShort slug\n")


def test_new_same_title_same_second_gets_suffix(root):
    frozen = TaskQueue(root, clock=Clock(step=timedelta(0)))
    first = frozen.new("Same")
    second = frozen.new("Same")
    assert first.name == "20261123T160512-same"
    assert second.name == "20261123T160512-same-2"


def test_round_trip_and_status_log_grows(queue, root):
    name = queue.new("Round trip").name
    started = queue.start(name, "worker-1", note="on it")
    assert started.path == root / "in_progress" / f"{name}.md"
    assert started.assigned_to == "worker-1"
    assert not (root / "pending" / f"{name}.md").exists()
    done = queue.done(name, agent="worker-1")
    assert done.state == "completed"
    blocked = queue.block(name, "regression found\nin eval", agent="reviewer")
    unblocked = queue.unblock(name)
    restarted = queue.start(name, "worker-2")
    assert restarted.assigned_to == "worker-2"
    assert restarted.status_log == (
        "- 2026-11-23T16:05:12Z created in pending",
        "- 2026-11-23T16:06:12Z pending -> in_progress by worker-1: on it",
        "- 2026-11-23T16:07:12Z in_progress -> completed by worker-1",
        "- 2026-11-23T16:08:12Z completed -> blocked by reviewer: regression found in eval",
        "- 2026-11-23T16:09:12Z blocked -> pending",
        "- 2026-11-23T16:10:12Z pending -> in_progress by worker-2",
    )
    assert [blocked.state, unblocked.state] == ["blocked", "pending"]
    assert sorted(p.name for p in root.rglob("*.md")) == [f"{name}.md", "TEMPLATE.md"]


@pytest.mark.parametrize(
    ("moves", "fragment"),
    [
        (["done"], "pending -> completed is not allowed"),
        (["start", "start"], "in_progress -> in_progress is not allowed"),
        (["block", "block"], "blocked -> blocked is not allowed"),
        (["block", "done"], "blocked -> completed is not allowed"),
    ],
)
def test_disallowed_transitions(queue, moves, fragment):
    name = queue.new("Moves").name
    actions = {
        "start": lambda: queue.start(name, "w"),
        "done": lambda: queue.done(name),
        "block": lambda: queue.block(name, "waits"),
    }
    for move in moves[:-1]:
        actions[move]()
    before = queue.get(name)
    with pytest.raises(TaskError) as info:
        actions[moves[-1]]()
    assert fragment in str(info.value)
    after = queue.get(name)
    assert (after.state, after.status_log) == (before.state, before.status_log)


def test_block_needs_reason_and_start_needs_agent(queue):
    name = queue.new("Needs").name
    with pytest.raises(TaskError, match="needs a reason"):
        queue.block(name, "  ")
    with pytest.raises(TaskError, match="needs an agent"):
        queue.start(name, "")
    assert queue.get(name).state == "pending"


def test_filter_and_table(queue):
    a = queue.new("Alpha", "P2")
    b = queue.new("Beta", "P0")
    queue.new("Gamma", "P1")
    queue.start(a.name, "Ann")
    tasks, errors = queue.scan()
    assert errors == []
    pending = filter_tasks(tasks, state="pending")
    assert [t.title for t in pending] == ["Beta", "Gamma"]  # P0 before P1
    assert [t.title for t in filter_tasks(tasks, assignee="ann")] == ["Alpha"]
    assert [t.title for t in filter_tasks(tasks, priority="P0")] == ["Beta"]
    assert format_table(filter_tasks(tasks, priority="P0")) == (
        "NAME                  STATE    PRI  ASSIGNED TO  TITLE\n"
        f"{b.name}  pending  P0   unassigned   Beta\n"
    )
    with pytest.raises(TaskError, match="unknown state 'done'"):
        filter_tasks(tasks, state="done")


# --- validation -------------------------------------------------------------------------------


def _break(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "header", "fragment"),
    [
        ("## Priority\nP2\n", "", "Priority", "is missing"),
        ("## Priority\nP2", "## Priority\nP4", "Priority", "has 'P4'; expected one of P0, P1"),
        ("## Priority\nP2", "## Priority\nhigh", "Priority", "has 'high'"),
        ("## Success Criteria\n- [ ]", "## Success Criteria\n- ", "Success Criteria", "checkbox"),
        ("## Files\n- utils/x.py", "## Files\n", "Files", "is empty"),
        ("## Created\n2026-11-23T16:05:12Z", "## Created\nyesterday", "Created", "'yesterday'"),
        ("## Title\nBroken", "## Title\nBroken\nsecond line", "Title", "single line"),
        ("## Files\n", "## Test Plan\nx\n\n## Files\n", "Test Plan", "appears twice"),
    ],
)
def test_header_errors_name_file_and_header(queue, old, new, header, fragment):
    task = queue.new("Broken", criteria=["c"], files=["utils/x.py"])
    _break(task.path, old, new)
    with pytest.raises(TaskFormatError) as info:
        queue.get(task.name)
    message = str(info.value)
    assert str(task.path) in message
    assert f"'## {header}'" in message
    assert fragment in message
    assert info.value.header == header
    # A broken task is not moved: start refuses before renaming.
    with pytest.raises(TaskFormatError):
        queue.start(task.name, "w")
    assert task.path.exists()


def test_headers_match_case_insensitively(queue):
    task = queue.new("Case")
    _break(task.path, "## Status log", "## Status  Log")
    moved = queue.start(task.name, "w")
    assert len(moved.status_log) == 2


# --- name safety ------------------------------------------------------------------------------


def test_duplicate_in_two_folders_is_refused(queue, root):
    task = queue.new("Dup")
    copy = root / "completed" / task.path.name
    shutil.copy(task.path, copy)
    for action in (lambda: queue.get(task.name), lambda: queue.start(task.name, "w")):
        with pytest.raises(TaskError) as info:
            action()
        assert str(task.path) in str(info.value) and str(copy) in str(info.value)
    tasks, errors = queue.scan()
    assert tasks == [] and len(errors) == 1 and "2 folders at once" in errors[0]


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a/b"])
def test_path_traversal_is_refused(queue, name):
    for action in (queue.get, lambda n: queue.start(n, "w"), lambda n: queue.block(n, "r")):
        with pytest.raises(TaskError):
            action(name)


def test_symlink_pointing_outside_is_refused(queue, root, tmp_path):
    outside = tmp_path / "outside.md"
    shutil.copy(queue.new("Real").path, outside)
    link = root / "pending" / "20261123T000000-l.md"
    os.symlink(outside, link)
    with pytest.raises(TaskError, match=f"is a symlink to {outside} \\(outside the queue\\)"):
        queue.get(link.stem)
    with pytest.raises(TaskError, match="is a symlink"):
        queue.start(link.stem, "w")
    assert link.is_symlink() and outside.exists()
    _, errors = queue.scan()
    assert any("is a symlink" in e for e in errors)


def test_symlink_inside_the_queue_is_refused_too(queue, root):
    target = root / "inside.txt"
    target.write_text(queue.new("Real").path.read_text())
    link = root / "pending" / "20261123T000000-l.md"
    os.symlink(target, link)
    with pytest.raises(TaskError, match="\\(inside the queue\\); task files must be regular"):
        queue.get(link.stem)


def test_move_never_overwrites_an_existing_destination(queue, root, monkeypatch):
    name = queue.new("Clobber").name
    real_locate = queue.locate

    def locate_then_another_agent_writes(n):
        # Another writer creates the destination after our duplicate check, before our move.
        found = real_locate(n)
        (root / "in_progress" / found.name).write_text("theirs")
        return found

    monkeypatch.setattr(queue, "locate", locate_then_another_agent_writes)
    with pytest.raises(TaskError, match="already exists; refusing to overwrite"):
        queue.start(name, "w")
    assert (root / "in_progress" / f"{name}.md").read_text() == "theirs"
    assert (root / "pending" / f"{name}.md").exists()


def test_missing_state_folder_and_template(tmp_path):
    with pytest.raises(TaskError, match="pending: missing"):
        TaskQueue(tmp_path).scan()
    for state in STATES:
        (tmp_path / state).mkdir()
    with pytest.raises(TaskError, match="no template"):
        TaskQueue(tmp_path).new("x")


# --- CLI --------------------------------------------------------------------------------------


def test_cli_round_trip_and_exit_codes(root, capsys):
    r = ["--root", str(root)]
    code, out, _ = _cli([*r, "new", "CLI task", "--priority", "P1", "--criterion", "ok"], capsys)
    assert code == 0
    path = Path(out.strip())
    name = path.stem
    assert path.parent == root / "pending" and path.exists()

    code, out, _ = _cli(["list", "--root", str(root), "--priority", "P1"], capsys)
    assert code == 0 and name in out and "CLI task" in out
    code, out, _ = _cli([*r, "list", "--state", "completed"], capsys)
    assert (code, out) == (0, "no tasks match\n")

    code, out, _ = _cli([*r, "show", name], capsys)
    assert code == 0 and "## Title\nCLI task" in out

    code, _, err = _cli([*r, "start", name], capsys)
    assert code == 2 and "needs --agent" in err
    code, out, _ = _cli([*r, "start", name, "--agent", "w9", "--note", "go"], capsys)
    assert code == 0 and "pending -> in_progress by w9: go" in out
    code, _, err = _cli([*r, "done", name], capsys)
    assert code == 0 and "1 success criteria still unchecked" in err
    code, _, err = _cli([*r, "block", name], capsys)  # argparse: --reason is required
    assert code == 2 and "--reason" in err
    code, _, err = _cli([*r, "done", name], capsys)
    assert code == 2 and "completed -> completed is not allowed" in err
    code, _, err = _cli([*r, "show", "../etc/passwd"], capsys)
    assert code == 2 and err.startswith("error: task name '../etc/passwd'")
    code, _, _ = _cli([*r, "list", "--priority", "P7"], capsys)
    assert code == 2

    code, out, _ = _cli([*r, "check"], capsys)
    assert code == 0 and "1 valid task file(s)" in out
    _break(root / "completed" / f"{name}.md", "## Priority\nP1", "## Priority\nP9")
    code, _, err = _cli([*r, "check"], capsys)
    assert code == 2 and f"{name}.md:4: header '## Priority' has 'P9'" in err


def test_cli_runs_as_a_plain_script(root):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tasks.py"), "--root", str(root), "show", "/abs"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
    )
    assert result.returncode == 2
    assert "absolute path" in result.stderr


def test_repo_queue_is_valid_and_seeded():
    tasks, errors = TaskQueue(REPO / "tasks").scan()
    assert errors == []
    assert len([t for t in tasks if t.state == "pending"]) >= 2
    for task in tasks:
        assert task.name.startswith(task.created.replace("-", "").replace(":", "").rstrip("Z"))


# --- races and faults -------------------------------------------------------------------------


def _copies(root: Path, name: str) -> list[Path]:
    """Every file of task ``name`` in the state folders, temporary files included."""
    return sorted(p for s in STATES for p in (root / s).iterdir() if name in p.name)


RACERS = (
    ("start", lambda q, n: q.start(n, "w1")),
    ("start", lambda q, n: q.start(n, "w2")),
    ("block", lambda q, n: q.block(n, "waits for w3")),
)


def _race_once(root: Path, name: str, barrier, outcome: list) -> None:
    # One racer per thread, each with its own TaskQueue, all released at once.
    def run(k: int) -> None:
        _, action = RACERS[k]
        queue = TaskQueue(root, clock=Clock())
        barrier.wait()
        try:
            outcome[k] = action(queue, name).state
        except TaskError as e:
            outcome[k] = str(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(RACERS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def _check_race_outcome(root: Path, name: str, outcome: list) -> None:
    winners = [k for k, r in enumerate(outcome) if r in STATES]
    assert len(winners) == 1, outcome
    for k, r in enumerate(outcome):
        if k not in winners:
            # A loser either raced the move ("already moved by someone else") or looked only
            # after it had landed, and was refused the transition from the winner's state.
            raced = "already moved by someone else" in r
            late = f"is {outcome[winners[0]]};" in r and "is not allowed" in r
            assert raced or late, outcome
    copies = _copies(root, name)
    assert len(copies) == 1 and copies[0].parent.name == outcome[winners[0]], copies
    moved = parse_task(copies[0].read_text(), copies[0])
    assert len(moved.status_log) == 2, moved.status_log  # created + the winner's move, once
    assert moved.status_log[1].split()[2:4] == ["pending", "->"]


def test_racing_moves_in_threads_leave_exactly_one_file(root):
    queue = TaskQueue(root, clock=Clock())
    for attempt in range(30):
        name = queue.new(f"Race {attempt}").name
        outcome: list = [None] * len(RACERS)
        _race_once(root, name, threading.Barrier(len(RACERS)), outcome)
        _check_race_outcome(root, name, outcome)


def _process_racer(root: str, name: str, k: int, barrier, results) -> None:
    _, action = RACERS[k]
    queue = TaskQueue(root, clock=Clock())
    barrier.wait()
    try:
        results[k] = action(queue, name).state
    except TaskError as e:
        results[k] = str(e)


def test_racing_moves_in_processes_leave_exactly_one_file(root):
    ctx = multiprocessing.get_context("fork")
    queue = TaskQueue(root, clock=Clock())
    with ctx.Manager() as manager:
        for attempt in range(20):
            name = queue.new(f"Process race {attempt}").name
            barrier, results = manager.Barrier(len(RACERS)), manager.list([None] * len(RACERS))
            procs = [
                ctx.Process(target=_process_racer, args=(str(root), name, k, barrier, results))
                for k in range(len(RACERS))
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout=60)
                assert p.exitcode == 0
            _check_race_outcome(root, name, list(results))


def test_losing_a_race_names_where_the_task_went(queue, root, monkeypatch):
    name = queue.new("Race").name
    other_agent = TaskQueue(root, clock=Clock())
    real_lock = queue._task_lock

    def other_agent_moves_first(stem):
        # The other agent's whole move lands after we looked and before we got the lock.
        other_agent.start(stem, "winner")
        return real_lock(stem)

    monkeypatch.setattr(queue, "_task_lock", other_agent_moves_first)
    with pytest.raises(TaskError, match="already moved by someone else \\(from pending to in_pr"):
        queue.block(name, "loser")
    monkeypatch.undo()
    assert _copies(root, name) == [root / "in_progress" / f"{name}.md"]
    assert queue.get(name).assigned_to == "winner"


def test_a_held_lock_times_out_with_a_clear_error(root):
    queue = TaskQueue(root, clock=Clock(), lock_timeout=0.2)
    name = queue.new("Locked").name
    held = f"task '{name}': .*held by someone else"
    with queue._task_lock(name), pytest.raises(TaskError, match=held):
        TaskQueue(root, lock_timeout=0.2).start(name, "w")
    assert queue.start(name, "w").state == "in_progress"
    assert (root / ".locks" / ".gitignore").read_text() == "*\n"  # lock files stay out of git


def _full_disk_after(monkeypatch, n_bytes: int) -> None:
    # The disk fills up mid-write: the first call writes n_bytes, the next raises ENOSPC.
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data[:n_bytes]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("utils.atomic_files.os.write", write)


def test_new_on_a_full_disk_leaves_no_file(queue, root, monkeypatch):
    _full_disk_after(monkeypatch, 10)
    with pytest.raises(TaskError) as info:
        queue.new("Full disk")
    monkeypatch.undo()
    assert "20261123T160512-full-disk.md: could not be written (No space left" in str(info.value)
    assert sorted(os.listdir(root / "pending")) == []  # no 0-byte task, no temporary file
    assert queue.new("Full disk").path.stat().st_size > 0


def test_move_on_a_full_disk_leaves_the_task_where_it_was(queue, root, monkeypatch):
    task = queue.new("Stays")
    before = task.path.read_bytes()
    _full_disk_after(monkeypatch, 10)
    with pytest.raises(TaskError, match="could not be written \\(No space left"):
        queue.start(task.name, "w")
    monkeypatch.undo()
    assert _copies(root, task.name) == [task.path] and task.path.read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda t: t.replace(b"## Objective", b"## Obj\xffective"), ":13: not valid UTF-8 (byte"),
        (lambda t: t.replace(b"\nP2\n", b"\n\xc3\n"), ":5: not valid UTF-8 (byte(s) c3"),
        (lambda t: t.replace(b"\nP2\n", b"\nurgent\n"), ":4: header '## Priority' has 'urgent'"),
        (lambda t: t.replace(b"## Title\n", b"#Title\n"), ": header '## Title' is missing"),
    ],
)
def test_a_bad_file_is_named_and_the_rest_of_the_queue_works(queue, root, capsys, damage, fragment):
    bad = queue.new("Bad one", test_plan="ok")
    good = queue.new("Good one")
    bad.path.write_bytes(damage(bad.path.read_bytes()))
    expected = f"{bad.path}{fragment}"

    tasks, errors = queue.scan()
    assert [t.name for t in tasks] == [good.name]
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    with pytest.raises(TaskFormatError) as info:
        queue.get(bad.name)
    assert str(info.value).startswith(expected)

    r = ["--root", str(root)]
    code, out, err = _cli([*r, "list"], capsys)
    assert code == 0 and good.name in out and bad.name not in out
    assert err == f"warning: skipped {errors[0]}\n"
    code, out, err = _cli([*r, "check"], capsys)
    assert code == 2 and "1 valid task file(s)" in out and err == f"error: {errors[0]}\n"
    code, _, err = _cli([*r, "show", bad.name], capsys)
    assert code == 2 and err.startswith(f"error: {expected}")
    code, out, _ = _cli([*r, "start", good.name, "--agent", "w"], capsys)
    assert code == 0 and "pending -> in_progress by w" in out
    assert bad.path.exists()
