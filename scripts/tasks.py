"""The agents' task queue: create, list, show and move markdown tasks under tasks/.

    python scripts/tasks.py new "Run the 32B recipe" --priority P1 --criterion "timings in docs"
    python scripts/tasks.py list --state pending --priority P1
    python scripts/tasks.py show 20261123T160512-run-the-32b-recipe
    python scripts/tasks.py start NAME --agent worker-3 [--note ...]
    python scripts/tasks.py done NAME [--agent ...] [--note ...]
    python scripts/tasks.py block NAME --reason "needs the H100 recipe first"
    python scripts/tasks.py unblock NAME            # blocked -> pending
    python scripts/tasks.py check                   # validate every task file

Exit codes: 0 ok, 2 user error (message on stderr). 'list' names each unreadable or invalid
task file in a warning and lists the rest (exit 0); 'check' exits 2 on any. All logic is in
utils/task_queue.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from utils.task_queue import (
    PRIORITIES,
    STATES,
    TaskError,
    TaskQueue,
    filter_tasks,
    format_table,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT / "tasks"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasks.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="queue root folder")
    # --root is also accepted after the subcommand; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, default=argparse.SUPPRESS, help="queue root folder")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("new", parents=[common], help="create a pending task from TEMPLATE.md")
    p.add_argument("title")
    p.add_argument("--priority", default="P2", choices=PRIORITIES)
    p.add_argument("--assign", default="unassigned", help="initial Assigned To")
    p.add_argument("--objective")
    p.add_argument("--criterion", action="append", default=[], help="repeatable")
    p.add_argument("--file", action="append", default=[], help="repeatable")
    p.add_argument("--depends-on", action="append", default=[], help="repeatable")
    p.add_argument("--test-plan")
    p.add_argument("--agent")
    p.add_argument("--note")

    p = sub.add_parser("list", parents=[common], help="print a table of tasks")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--assignee")
    p.add_argument("--priority", choices=PRIORITIES)

    p = sub.add_parser("show", parents=[common], help="print one task")
    p.add_argument("name")

    sub.add_parser("check", parents=[common], help="validate every task file")

    for command, help_text in (
        ("start", "pending|blocked -> in_progress; records --agent in Assigned To"),
        ("done", "in_progress -> completed"),
        ("block", "any state -> blocked; needs --reason"),
        ("unblock", "blocked -> pending"),
    ):
        p = sub.add_parser(command, parents=[common], help=help_text)
        p.add_argument("name")
        p.add_argument(
            "--agent",
            default=os.environ.get("TASK_AGENT"),
            help="who does this (default: $TASK_AGENT)",
        )
        if command == "block":
            p.add_argument("--reason", required=True, help="what the task waits for")
        else:
            p.add_argument("--note")
    return parser


def run(args: argparse.Namespace) -> int:
    queue = TaskQueue(args.root)
    if args.command == "new":
        task = queue.new(
            args.title,
            args.priority,
            assigned_to=args.assign,
            objective=args.objective,
            criteria=args.criterion,
            files=args.file,
            dependencies=args.depends_on,
            test_plan=args.test_plan,
            agent=args.agent,
            note=args.note,
        )
        print(task.path)
        return 0
    if args.command in ("list", "check"):
        tasks, errors = queue.scan()
        if args.command == "list":
            # A bad file is named, and the other tasks are still listed: exit 0 ('check' fails).
            shown = filter_tasks(tasks, args.state, args.assignee, args.priority)
            print(format_table(shown) if shown else "no tasks match", end="" if shown else "\n")
            for error in errors:
                print(f"warning: skipped {error}", file=sys.stderr)
            return 0
        print(f"{len(tasks)} valid task file(s) under {args.root}")
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 2 if errors else 0
    if args.command == "show":
        path = queue.locate(args.name)
        queue.get(args.name)  # validates, so a broken file is reported rather than shown
        print(f"{path}\n")
        print(queue.read_text(path), end="")
        return 0
    if args.command == "start":
        if not args.agent:
            raise TaskError("start needs --agent NAME (or $TASK_AGENT) to fill 'Assigned To'")
        task = queue.start(args.name, args.agent, args.note)
    elif args.command == "done":
        task = queue.done(args.name, args.agent, args.note)
    elif args.command == "block":
        task = queue.block(args.name, args.reason, args.agent)
    else:
        task = queue.unblock(args.name, args.agent, args.note)
    print(f"{task.name}: {task.status_log[-1].removeprefix('- ')}  ({task.path})")
    if args.command == "done" and task.unchecked_criteria:
        print(
            f"warning: {len(task.unchecked_criteria)} success criteria still unchecked in "
            f"{task.path}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage; report its code (2 on bad usage)
        return int(e.code or 0)
    try:
        return run(args)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
