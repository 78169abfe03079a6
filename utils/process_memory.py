"""This process's resident memory: the peak over a block (sampled by a thread), the whole-process
high-water mark (``ru_maxrss``), and giving freed memory back between model uses."""

from __future__ import annotations

import gc
import resource
import sys
import threading
from typing import Any


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def ru_maxrss_bytes() -> int:
    """This process's RSS high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSSMonitor:
    """Peak resident memory over a block, sampled by a background thread every interval_s.

    ``ru_maxrss`` is exact but is a whole-process high-water mark (it never goes down), so the
    first arm's model load dominates it; the sampled peak is per block, within one interval.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = self.end_bytes = self.ru_maxrss_bytes = 0
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = current_rss_bytes()
        self.peak_bytes = max(self.peak_bytes, value)
        self.n_samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSSMonitor:
        self.start_bytes = current_rss_bytes()
        self.peak_bytes = self.start_bytes
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.end_bytes = current_rss_bytes()
        self.ru_maxrss_bytes = ru_maxrss_bytes()

    def to_dict(self) -> dict[str, Any]:
        mib = 1024 * 1024
        return {
            "rss_start_mib": round(self.start_bytes / mib, 1),
            "peak_rss_mib": round(self.peak_bytes / mib, 1),
            "rss_end_mib": round(self.end_bytes / mib, 1),
            "ru_maxrss_mib": round(self.ru_maxrss_bytes / mib, 1),
            "n_samples": self.n_samples,
            "interval_s": self.interval_s,
        }


def release_memory() -> None:
    """Give freed tensors back before the next arm (CPython refcounts + cyclic gc + CUDA cache)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard dependency of generation
        pass
