"""The soft-label histogram and the end-of-run summary table the pairs stages print and record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def histogram(values: Sequence[float], lo: float = 0.5, hi: float = 1.0, bins: int = 10) -> dict:
    """Counts in ``bins`` equal bins over [lo, hi] (the last bin includes hi); soft labels of
    kept pairs live in [0.5, 1], so the default bins are 0.05 wide."""
    if bins < 1 or not hi > lo:
        raise ValueError(f"need bins >= 1 and hi > lo, got bins={bins}, [{lo}, {hi}]")
    counts = [0] * bins
    width = (hi - lo) / bins
    for v in values:
        if not lo <= v <= hi:
            raise ValueError(f"value {v} outside the histogram range [{lo}, {hi}]")
        counts[min(int((v - lo) / width), bins - 1)] += 1
    edges = [round(lo + k * width, 10) for k in range(bins + 1)]
    return {"edges": edges, "counts": counts}


def print_summary_table(title: str, rows: Sequence[tuple[str, Any]], hist: dict) -> None:
    """The pairs stages' end-of-run table: aligned rows, then the kept soft-label histogram
    (``histogram``'s dict) as "lower edge:count" pairs."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    pairs = zip(hist["edges"], hist["counts"], strict=False)  # one more edge than counts
    print("  kept soft labels: " + " ".join(f"{e:.2f}:{n}" for e, n in pairs))
