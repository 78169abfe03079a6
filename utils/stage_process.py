"""How the pipeline runs one stage process: a lock per run directory, a PID file per stage, the
stage in its own process group, stderr teed and its tail kept, and the stage's verdict read from
its manifest (exit codes and statuses: utils/errors.py).

- ``<run>/.pipeline.lock`` (``fcntl.flock``, holding the PID): a second pipeline on the same run
  is refused naming the holder (``PipelineLockedError``, exit 2). The kernel drops the lock when
  the holder dies, even by ``kill -9``.
- ``<stage dir>/.stage.pid`` (PID and command line) while the stage runs: a pipeline killed by
  ``kill -9`` leaves its stage running in its own session; a rerun that finds that PID alive with
  the same command line refuses to start a second writer in the same folder
  (``StageStillRunningError``, exit 2).
- SIGTERM/SIGINT to the pipeline end the running stage's whole process group (SIGTERM, then
  SIGKILL after a grace period) and raise ``PipelineInterrupted``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import EXIT_GATE, EXIT_OK, STATUS_OK, STATUS_SKIPPED, ProjectInputError
from utils.jsonl_io import write_json_atomic

LOCK_FILE = ".pipeline.lock"
PID_FILE = ".stage.pid"
MANIFEST = "manifest.json"
TAIL_BYTES = 64 * 1024
KILL_GRACE_S = 10.0


class PipelineLockedError(ProjectInputError):
    """Another pipeline holds this run directory's lock."""


class StageStillRunningError(ProjectInputError):
    """A stage process of an earlier (killed) pipeline still runs in this run directory."""


class PipelineInterrupted(Exception):
    """SIGTERM or SIGINT reached the pipeline; the running stage's process group was ended."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# -- the run lock ------------------------------------------------------------------------------
@contextmanager
def pipeline_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run>/.pipeline.lock`` for the block; refuse when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise PipelineLockedError(
                f"{run_dir}: another pipeline (PID {holder}) is running on this run directory "
                f"(lock {path}); wait for it to end or stop it (kill -TERM {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (deleting a lock file invites races)


# -- orphan stage processes --------------------------------------------------------------------
def _cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None where /proc cannot tell (then a live PID counts as a match)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return [] if Path("/proc/self").exists() else None  # gone, or no /proc on this system
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_orphan(stage_name: str, stage_dir: Path, log: Any = print) -> None:
    """Refuse when ``<stage dir>/.stage.pid`` names a live process with the recorded command
    line; remove the file when its process is gone (or the PID now belongs to another program)."""
    path = stage_dir / PID_FILE
    try:
        rec = json.loads(path.read_text())
        pid, cmd = int(rec["pid"]), list(rec["cmd"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        log(f"[pipeline] {stage_name}: unreadable {path}; ignored")
        path.unlink(missing_ok=True)
        return
    if _alive(pid):
        current = _cmdline(pid)
        if current is None or current == cmd:
            raise StageStillRunningError(
                f"stage {stage_name}: process {pid} from an earlier pipeline run is still running "
                f"in {stage_dir} ({' '.join(cmd)}); wait for it to end or stop it "
                f"(kill -TERM -- -{pid}), then rerun"
            )
    log(f"[pipeline] {stage_name}: stage process {pid} of an earlier run has ended")
    path.unlink(missing_ok=True)


# -- one stage process -------------------------------------------------------------------------
@dataclass
class StageProcess:
    returncode: int
    stderr_tail: str


class _Interrupts:
    """SIGTERM/SIGINT handlers for the pipeline's main thread: the first signal raises
    ``PipelineInterrupted``; later ones (while the stage group is being ended) are noted only."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
            raise PipelineInterrupted(signum)

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group; after ``KILL_GRACE_S`` (or once the leader is gone)
    SIGKILL to whatever of the group is left (workers of a multi-process stage)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tee(stream: Any, tail: bytearray) -> None:
    """Copy the stage's stderr to ours as it comes (progress bars included), keeping the tail."""
    out = getattr(sys.stderr, "buffer", None)
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        tail += chunk
        del tail[:-TAIL_BYTES]
        try:
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
        except (OSError, ValueError):
            pass  # our stderr is gone; keep draining so the stage never blocks on a full pipe


def last_lines(text: str, n: int = 25) -> str:
    """The last ``n`` non-blank lines; a line rewritten with carriage returns (a progress bar)
    counts as its last state."""
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.split("\n")]
    return "\n".join([ln for ln in lines if ln.strip()][-n:])


def run_stage_process(
    stage_dir: Path, cmd: Sequence[str], env: Mapping[str, str], cwd: Path
) -> StageProcess:
    """Run ``cmd`` in its own session (process group) with ``.stage.pid`` recorded, stderr
    teed; SIGTERM/SIGINT end the group and raise ``PipelineInterrupted``."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    pid_file = stage_dir / PID_FILE
    tail = bytearray()
    with _Interrupts():
        proc = subprocess.Popen(
            list(cmd), env=dict(env), cwd=cwd, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            write_json_atomic(
                pid_file,
                {"pid": proc.pid, "cmd": list(cmd), "pipeline_pid": os.getpid(),
                 "started_unix": round(time.time(), 3)},
            )  # fmt: skip
            reader = threading.Thread(target=_tee, args=(proc.stderr, tail), daemon=True)
            reader.start()
            rc = proc.wait()
            reader.join(timeout=30)
        except BaseException:
            _end_group(proc)
            raise
        finally:
            if proc.poll() is not None:
                pid_file.unlink(missing_ok=True)
            if proc.stderr is not None:
                proc.stderr.close()
    return StageProcess(rc, last_lines(tail.decode(errors="replace")))


# -- the stage's verdict -----------------------------------------------------------------------
def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size): a manifest rewritten by the stage (atomic replace) differs."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def fresh_manifest(stage_dir: Path, before: tuple[int, int, int] | None) -> dict | None:
    """The stage's manifest when this run of it wrote one (its signature changed), else None."""
    path = stage_dir / MANIFEST
    sig = file_signature(path)
    if sig is None or sig == before:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def judge(returncode: int, manifest: dict | None) -> str | None:
    """None when the stage may be stamped, else why not. ``ok`` needs exit 0; ``skipped`` (nothing
    kept) is accepted with exit 0 or 3; anything else (a crash, bad input, a failed gate, no new
    manifest) stops the pipeline, whatever the exit code."""
    if manifest is None:
        return f"exit code {returncode} and no new {MANIFEST}"
    status, reason = manifest.get("status"), manifest.get("reason")
    if status == STATUS_OK and returncode == EXIT_OK:
        return None
    if status == STATUS_SKIPPED and returncode in (EXIT_OK, EXIT_GATE):
        return None
    return f"exit code {returncode}, manifest status {status!r}" + (f": {reason}" if reason else "")
