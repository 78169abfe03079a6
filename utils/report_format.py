"""How the evaluation report writes its numbers and tables: percentages with Wilson CIs,
p-values, signed differences in points, markdown tables. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def pct_ci(summary: Mapping[str, Any] | None) -> str:
    """``"23.4% [19.1, 28.3]"`` from a summarize_arm dict."""
    if not summary:
        return "n/a"
    return (
        f"{pct(summary['accuracy'])} [{100 * summary['ci_low']:.1f}, "
        f"{100 * summary['ci_high']:.1f}]"
    )


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def fmt_points(x: float | None) -> str:
    """An accuracy difference in percentage points, signed."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x + 0.0:+.1f} pts"  # + 0.0 turns -0.0 into 0.0


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
