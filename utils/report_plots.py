"""The evaluation report's two PNG plots (matplotlib, imported only when a plot is drawn):
accuracy per arm and per-type accuracy per arm."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_accuracy(results: Mapping[str, Any], path: str | Path) -> Path:
    """Prompt-level strict and loose accuracy per arm with Wilson CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in results["arms"] if a.get("summary")]
    names = [a["name"] for a in arms]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 2), 3.6))
    width = 0.38
    for k, (metric, label) in enumerate([("prompt_strict", "strict"), ("prompt_loose", "loose")]):
        acc = [a["summary"][metric]["accuracy"] for a in arms]
        lo = [acc[i] - a["summary"][metric]["ci_low"] for i, a in enumerate(arms)]
        hi = [a["summary"][metric]["ci_high"] - acc[i] for i, a in enumerate(arms)]
        xs = [i + (k - 0.5) * width for i in range(len(arms))]
        ax.bar(xs, acc, width, yerr=[lo, hi], capsize=4, label=f"prompt-level {label}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1)
    n = results["headline"]["n_prompts"]
    ax.set_title(f"Verifiable instruction following (n = {n} prompts)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_type_heatmap(results: Mapping[str, Any], path: str | Path) -> Path:
    """Instruction-level strict accuracy per (instruction type, arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_type = results["per_type"]
    arms = [a["name"] for a in results["arms"]]
    grid = np.array([[row["accuracy"][arm] for arm in arms] for row in per_type], dtype=float)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(arms), 1.2 + 0.32 * len(per_type)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_yticks(
        range(len(per_type)), [f"{row['type']} (n={row['n']})" for row in per_type], fontsize=7
    )
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(
                j,
                i,
                f"{100 * grid[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if grid[i, j] < 0.6 else "black",
            )
    fig.colorbar(im, ax=ax, label="strict instruction accuracy")
    ax.set_title("Per instruction type")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
