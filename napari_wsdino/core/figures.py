"""Every figure of an evaluation, a report or a panel: MoA confusion matrix, per-MoA
accuracy, UMAPs, training curves, bar charts and attention overlays.

Built on :class:`matplotlib.figure.Figure` directly (no pyplot, no GUI backend), so
they render headless and in worker threads.

Example
-------
>>> fig = umap_figure(xy, labels, "MoA")                        # doctest: +SKIP
>>> save_figure(confusion_figure(result.confusion_nsc, "NSC"), "nsc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from napari_wsdino.core.fsio import atomic_path


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def umap_figure(xy: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """Scatter of a 2-D map, one colour per label value, legend outside."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot(111)
    labels = np.asarray([str(v) for v in labels])
    values = sorted(set(labels))
    cmap = _cmap(len(values))
    for i, v in enumerate(values):
        sel = labels == v
        ax.scatter(xy[sel, 0], xy[sel, 1], s=22, color=cmap[i], label=v, edgecolors="none")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(values) <= 15:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def _cmap(n: int) -> list:
    from matplotlib import colormaps

    base = colormaps["tab20" if n > 10 else "tab10"]
    return [base(i % base.N) for i in range(n)]


def read_log(path: str | Path) -> list[dict]:
    """The per-epoch records of a training run's ``log.jsonl``."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves_figure(logs: Mapping[str, list[dict]], title: str = "Training") -> Figure:
    """Loss and learning rate per epoch, one line per channel (or run)."""
    fig = Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    for name, records in logs.items():
        if not records:
            continue
        ep = [r["epoch"] for r in records]
        ax1.plot(ep, [r["loss"] for r in records], marker=".", label=name)
        ax2.plot(ep, [r["lr"] for r in records], marker=".", label=name)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("DINO loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    ax1.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_grid_figure(panels: list[tuple[str, np.ndarray, np.ndarray]]) -> Figure:
    """Rows of (image, attention overlay): ``panels`` holds ``(title, image, mean map)``."""
    n = max(1, len(panels))
    fig = Figure(figsize=(4.2, 2.0 * n))
    for i, (title, image, attn) in enumerate(panels):
        lo, hi = np.percentile(image, [1, 99.5])
        ax = fig.add_subplot(n, 2, 2 * i + 1)
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
        ax = fig.add_subplot(n, 2, 2 * i + 2)
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        ax.imshow(attn, cmap="inferno", alpha=0.55)
        ax.set_title("mean CLS attention", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def bar_figure(rows: list[dict], metrics: Sequence[str] = ("nsc", "nscb", "map_nsc"),
               label_key: str = "model", title: str = "") -> Figure:
    """Grouped bars of metrics per model (how the paper's Table 1 reads as a picture)."""
    fig = Figure(figsize=(max(4.5, 1.1 * len(rows) + 2), 3.2))
    ax = fig.add_subplot(111)
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(rows))
    for j, m in enumerate(metrics):
        vals = [np.nan if r.get(m) is None else float(r[m]) for r in rows]
        ax.bar(x + j * width, vals, width, label=m.upper())
    ax.set_xticks(x + width * (len(metrics) - 1) / 2)
    ax.set_xticklabels([str(r.get(label_key, "")) for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


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
    """Render a figure to a file (PNG, SVG, PDF by suffix) with a non-interactive backend,
    through a temporary file renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def umap_figures(treatments) -> dict[str, bytes]:
    """UMAPs of treatment profiles coloured by MoA and by batch."""
    from napari_wsdino.core.projection import project_2d

    xy = project_2d(treatments.features)
    meta = treatments.meta
    figs = {"UMAP of treatment profiles by MoA": png_bytes(
        umap_figure(xy, meta["Metadata_MoA"], "treatments by MoA"))}
    if "Metadata_Batch" in meta:
        first = meta["Metadata_Batch"].astype(str).str.split(",").str[0]
        figs["UMAP of treatment profiles by batch"] = png_bytes(
            umap_figure(xy, first, "treatments by (first) batch"))
    return figs


def attention_examples(cache, run: Path, per_moa: int = 1, max_panels: int = 6,
                       channel: str | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(title, image, mean attention) for the top dose field of a few MoAs."""
    from napari_wsdino.core.attention import channel_attention_maps
    from napari_wsdino.core.modelset import ModelSet

    channel = channel or cache.channels[0]
    models = ModelSet.from_run(run, [channel])
    t = cache.table
    panels = []
    for moa, grp in t.groupby("moa", sort=True):
        top = grp[grp.concentration == grp.concentration.max()]
        for idx in top.index[:per_moa]:
            img = np.asarray(cache.images(channel)[idx], dtype=np.float32)
            maps = channel_attention_maps(models[channel], img)
            panels.append((f"{moa} · {t.treatment[idx]} · {channel}", img, maps.mean))
        if len(panels) >= max_panels:
            break
    return panels
