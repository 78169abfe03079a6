"""Exit codes and the exception hierarchy every stage script shares (the one place they live).

Exit codes of every stage script (and of ``run_pipeline.py`` for its own checks):

    0  ok (the stage's ``manifest.json`` says ``status: ok``, or ``skipped`` for a stage with
       nothing to consume, e.g. DPO on an empty pairs file)
    1  crash: an uncaught exception; Python prints the traceback, and the stage's manifest says
       ``status: failed`` with the exception's last lines
    2  bad input: a ``ProjectInputError`` (config, data files, a refused model, a mismatched
       adapter or checkpoint); one ``error: ...`` line naming what is wrong, no traceback
    3  gate: a quality gate failed (``GateError``, manifest ``failed``) or nothing was kept
       (manifest ``skipped``: the pipeline goes on, the arms built on it are reported skipped)

The pipeline reads the manifest's ``status``, not only the exit code: a crash never counts as
"no pair kept", whatever code it exits with.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_GATE = 3

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"
STATUSES = (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)


class ProjectInputError(Exception):
    """Bad input: a config value, a data file, a refused model. Exit 2, message only."""


class GateError(Exception):
    """A quality gate failed (e.g. the mask audit): the stage's output must not be used. Exit 3."""


class InputMissingError(ProjectInputError, FileNotFoundError):
    """A file or directory a stage needs does not exist (an earlier stage did not run)."""


@contextmanager
def as_input_error(what: str = "") -> Iterator[None]:
    """The parsing boundary: a ``ValueError``/``TypeError`` raised while parsing a config section
    or reading an input file inside this block is bad input (``ProjectInputError``; a missing
    file ``InputMissingError``); anywhere else the same exception is a crash with its traceback.
    Wrap only the parsing and reading, never training or generation."""
    try:
        yield
    except ProjectInputError:
        raise
    except FileNotFoundError as e:
        raise InputMissingError(f"{what}: {e}" if what else str(e)) from e
    except (ValueError, TypeError) as e:
        raise ProjectInputError(f"{what}: {e}" if what else str(e)) from e


def error_tail(exc: BaseException, lines: int = 12) -> str:
    """The last ``lines`` lines of the formatted traceback (what a manifest keeps of a crash)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])
