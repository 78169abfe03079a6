"""Small file primitives for state kept as files that several agents change at once.

* ``file_lock``: an exclusive lock per key (``filelock.FileLock``, an flock on Unix), held by
  one thread of one process at a time; waiting longer than ``timeout`` is an error.
* ``write_temp``: the whole content written and fsynced into a hidden temporary file in the
  target folder (removed again if any write fails, so a full disk leaves nothing behind).
* ``publish``: a finished temporary file put at its final name in one step, never over an
  existing file (a hard link fails if the name exists; where links are not supported, an
  existence check and ``os.replace``).
* ``read_utf8``: a text file decoded as UTF-8; a bad byte is reported with its line.

The filesystem ops go through ``os`` so a test can make a write fail the way a full disk does.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

# Errors of os.link meaning "this filesystem has no hard links", not "the name is taken".
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


class LockTimeoutError(OSError):
    """Another holder kept the lock longer than the caller was willing to wait."""


class Utf8Error(ValueError):
    """A file that is not valid UTF-8; ``line`` is the 1-based line of the first bad byte."""

    def __init__(self, path: str | Path, line: int, detail: str):
        self.path, self.line = str(path), line
        self.detail = f"not valid UTF-8 ({detail})"
        super().__init__(f"{path}:{line}: {self.detail}")


@contextmanager
def file_lock(lock_path: str | Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing, never deleted: deleting a
    lock file another process is waiting on would let two holders in)."""
    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise LockTimeoutError(
            errno.EAGAIN, f"{lock_path}: held by someone else for over {timeout:g} s"
        ) from None
    try:
        yield
    finally:
        lock.release()


def write_temp(folder: Path, name: str, text: str, mode: int = 0o644) -> Path:
    """A hidden file in ``folder`` holding exactly ``text`` (UTF-8), fsynced; on any error
    the temporary file is removed and the OSError raised."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        data = memoryview(text.encode("utf-8"))
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, dst: Path) -> None:
    """Give the finished file ``tmp`` the name ``dst`` in one step; raises FileExistsError,
    and leaves ``dst`` untouched, if ``dst`` exists. ``tmp`` is gone afterwards either way."""
    try:
        try:
            os.link(tmp, dst)
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "file exists", str(dst)) from None
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_utf8(path: Path) -> str:
    """The text of ``path``; raises Utf8Error naming the line of the first invalid byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad = raw[e.start : e.end].hex(" ")
        raise Utf8Error(path, line, f"byte(s) {bad} at offset {e.start}: {e.reason}") from None
