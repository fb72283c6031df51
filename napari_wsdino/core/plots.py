"""Matplotlib figures of an evaluation: MoA confusion matrix and per-MoA accuracy.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot,
no GUI backend), so they work headless, in worker threads and in the napari
edge alike; ``fig.savefig`` renders them with Agg.

Example
-------
>>> fig = confusion_figure(result.confusion_nsc, "NSC")          # doctest: +SKIP
>>> fig.savefig("confusion_nsc.png")                              # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def confusion_figure(confusion: pd.DataFrame, title: str = "", normalise: bool = True) -> Figure:
    """Heat map of a MoA confusion matrix (rows true MoA, columns neighbour's MoA).

    With ``normalise`` the colours show each row's share; the cells always print counts.
    """
    counts = confusion.to_numpy(dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0) if normalise else counts
    n = len(confusion)
    size = 2.5 + 0.45 * n
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    ax.set_xticks(range(n), labels=[str(c) for c in confusion.columns], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=[str(i) for i in confusion.index], fontsize=8)
    ax.set_xlabel(confusion.columns.name or "predicted")
    ax.set_ylabel(confusion.index.name or "true")
    high = shown.max() / 2 if shown.size else 0
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > high else "black")
    correct = np.trace(counts)
    total = counts.sum()
    acc = f"{correct / total:.1%} ({int(correct)}/{int(total)})" if total else "no queries"
    ax.set_title(f"{title} {acc}".strip())
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="share of row" if normalise else "count")
    fig.tight_layout()
    return fig


def per_moa_figure(per_moa: dict, title: str = "") -> Figure:
    """Grouped bars of NSC and NSCB accuracy per MoA (from ``EvaluationResult.per_moa``)."""
    moas = list(per_moa)
    nsc = [per_moa[m].get("nsc") for m in moas]
    nscb = [per_moa[m].get("nscb") for m in moas]
    fig = Figure(figsize=(max(5.0, 0.55 * len(moas) + 2), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(moas))
    as_float = lambda v: np.array([np.nan if a is None else a for a in v], dtype=float)  # noqa: E731
    ax.bar(x - 0.2, as_float(nsc), width=0.4, label="NSC")
    ax.bar(x + 0.2, as_float(nscb), width=0.4, label="NSCB")
    ax.set_xticks(x, labels=moas, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper right", ncol=2, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render a figure to a file (PNG, SVG, PDF by suffix) with a non-interactive backend."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
