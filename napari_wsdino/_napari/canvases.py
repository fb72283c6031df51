"""The matplotlib canvases of the docks: Evaluate's map of profiles, Train's curves.

Both draw on a ``FigureCanvasQTAgg`` that the dock lays out; they take arrays and
:class:`~napari_wsdino.core.progress.Progress` events, never layers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from napari_wsdino.core.progress import Progress

if TYPE_CHECKING:
    import pandas as pd


class ScatterMap:
    """Profiles in 2-D on a matplotlib canvas: colours, hover names, click callback."""

    def __init__(self, on_click):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.5, 4), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setToolTip("Hover a point to name it; click it to show one of its fields "
                               "in the viewer")
        self.ax = self.figure.add_subplot()
        self.on_click = on_click
        self.names: list[str] = []
        self.collection = None
        self.annotation = None
        self.colorbar = None
        self.canvas.mpl_connect("motion_notify_event", self._hover)
        self.canvas.mpl_connect("pick_event", self._pick)

    def draw(self, xy: np.ndarray, labels: pd.Series, names: list[str], title: str) -> None:
        """Scatter ``xy`` coloured by ``labels`` (categorical or numeric)."""
        import matplotlib
        import pandas as pd
        from matplotlib.lines import Line2D

        if self.colorbar is not None:
            self.colorbar.remove()
            self.colorbar = None
        self.ax.clear()
        self.names = list(names)
        if pd.api.types.is_numeric_dtype(labels):
            values = np.log10(labels.astype(float).clip(lower=1e-3))
            self.collection = self.ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap="viridis",
                                              s=30, picker=True, pickradius=5)
            unit = " (µM)" if "concentration" in str(labels.name).lower() else ""
            name = str(labels.name).replace("Metadata_", "").lower()
            self.colorbar = self.figure.colorbar(self.collection, ax=self.ax,
                                                 label=f"log10 {name}{unit}")
        else:
            cats = sorted(labels.astype(str).unique())
            cmap = matplotlib.colormaps["tab20"]
            colour = {c: cmap(i % 20) for i, c in enumerate(cats)}
            self.collection = self.ax.scatter(xy[:, 0], xy[:, 1], s=30, picker=True, pickradius=5,
                                              c=[colour[v] for v in labels.astype(str)])
            # legend entries without drawing points twice (plain markers: cheaper to lay
            # out than empty scatters, which the legend draws as collections)
            handles = [Line2D([], [], marker="o", linestyle="None", markersize=4.5,
                              color=colour[c], label=c) for c in cats]
            # beside the map, every entry: the layout makes room for it
            self.ax.legend(handles=handles, fontsize=6, loc="upper left",
                           bbox_to_anchor=(1.01, 1.0),
                           ncol=1 + (len(cats) - 1) // 20, markerscale=0.8, frameon=False,
                           borderaxespad=0.0, handletextpad=0.2)
        self.ax.set_title(title, fontsize=9)
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self.annotation = self.ax.annotate("", xy=(0, 0), xytext=(8, 8), textcoords="offset points",
                                           fontsize=8, bbox={"boxstyle": "round", "fc": "w"})
        self.annotation.set_visible(False)
        self.annotation.set_in_layout(False)  # a hover label never moves the map
        self.canvas.draw()

    def clear(self, message: str = "") -> None:
        """An empty map (with ``message`` in its middle): nothing to hover or click."""
        if self.colorbar is not None:
            self.colorbar.remove()
            self.colorbar = None
        self.ax.clear()
        self.names, self.collection, self.annotation = [], None, None
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        if message:
            self.ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8,
                         wrap=True, transform=self.ax.transAxes)
        self.canvas.draw_idle()

    def point_at(self, event) -> int | None:
        """Index of the point under a matplotlib mouse event, if any."""
        if self.collection is None or event.inaxes is not self.ax:
            return None
        hit, info = self.collection.contains(event)
        return self._nearest(info["ind"], event) if hit and len(info["ind"]) else None

    def _nearest(self, indices, mouse) -> int:
        """Of overlapping points under the mouse, the one closest to it."""
        indices = np.asarray(indices)
        xy = self.ax.transData.transform(self.collection.get_offsets()[indices])
        d = np.hypot(xy[:, 0] - mouse.x, xy[:, 1] - mouse.y)
        return int(indices[int(np.argmin(d))])

    def _hover(self, event) -> None:
        """Name the point under the mouse."""
        if self.annotation is None:
            return
        i = self.point_at(event)
        if i is None:
            if self.annotation.get_visible():
                self.annotation.set_visible(False)
                self.canvas.draw_idle()
            return
        self.annotation.xy = self.collection.get_offsets()[i]
        self.annotation.set_text(self.names[i])
        self.annotation.set_visible(True)
        self.canvas.draw_idle()

    def _pick(self, event) -> None:
        if event.artist is self.collection and len(event.ind):
            self.on_click(self._nearest(event.ind, event.mouseevent))


class LossPlot:
    """Loss and learning-rate curves on a matplotlib canvas, cheap to update while training.

    A full draw of the two axes (ticks, labels, legend) costs 50-100 ms of the GUI thread
    on a small CPU, so it happens only when the axes change: a new channel, or a curve
    leaving its axis range, which then grows with a margin (the x range is the run's
    steps from the first event). In between, the curves are animated artists blitted
    onto the cached background at most 4 times a second (a few ms).
    """

    #: Seconds between two updates of the curves.
    INTERVAL = 0.25
    #: Share of the data's span added on each side when an axis range grows.
    MARGIN = 0.25

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(4, 3))
        self.figure.subplots_adjust(left=0.2, right=0.97, top=0.96, bottom=0.14, hspace=0.15)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setToolTip("Training loss and learning rate per step, one line per channel")
        self.ax_loss = self.figure.add_subplot(2, 1, 1)
        self.ax_lr = self.figure.add_subplot(2, 1, 2, sharex=self.ax_loss)
        self.ax_loss.set_ylabel("loss")
        self.ax_lr.set_ylabel("learning rate")
        self.ax_lr.set_xlabel("step")
        self.ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # 1e-4, not 0.0001
        for axis in (self.ax_loss.yaxis, self.ax_lr.yaxis, self.ax_lr.xaxis):
            axis.set_major_locator(MaxNLocator(nbins=4))  # fewer labels: a cheaper full draw
        self.ax_loss.tick_params(labelbottom=False)
        self.series: dict[str, tuple[list, list, list]] = {}
        self._lines: dict[str, tuple] = {}
        self._total = 0          # the run's steps (x range), from the events
        self._background = None  # the canvas without the curves, after each full draw
        self._last = 0.0
        #: Full draws of the figure (for tests: updates between them are blits).
        self.full_draws = 0
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self.canvas.mpl_connect("resize_event", lambda _e: self._full_draw())
        self.clear()

    def clear(self) -> None:
        """No curves (nothing is redrawn when there were none: Start costs no full draw)."""
        drawn = bool(self._lines) or not hasattr(self, "_fitted")
        self.series.clear()
        for loss_line, lr_line in self._lines.values():
            loss_line.remove()
            lr_line.remove()
        self._lines.clear()
        self._total = 0
        self._fitted = {}  # axes -> the y range fitted to the curves
        legend = self.ax_loss.get_legend()
        if legend is not None:
            legend.remove()
        if drawn:
            for ax in (self.ax_loss, self.ax_lr):
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
            self._full_draw()

    def add(self, event: Progress) -> None:
        """Plot a training step (events without a loss, e.g. start-up notes, are skipped)."""
        if "loss" not in event.info:
            return
        channel = str(event.info.get("channel", ""))
        steps, loss, lr = self.series.setdefault(channel, ([], [], []))
        steps.append(event.step)
        loss.append(float(event.info.get("loss", float("nan"))))
        lr.append(float(event.info.get("lr", float("nan"))))
        self._total = max(self._total, int(event.total or 0))
        if time.perf_counter() - self._last > self.INTERVAL:
            self.redraw()

    def redraw(self) -> None:
        """Show the series: blit the curves, or draw everything when the axes must change."""
        self._last = time.perf_counter()
        full = False
        for channel, (steps, loss, lr) in self.series.items():
            if channel not in self._lines:
                (a,) = self.ax_loss.plot([], [], label=channel, lw=1, animated=True)
                (b,) = self.ax_lr.plot([], [], label=channel, lw=1, animated=True)
                self._lines[channel] = (a, b)
                self.ax_loss.legend(fontsize="small")
                full = True
            loss_line, lr_line = self._lines[channel]
            loss_line.set_data(steps, loss)
            lr_line.set_data(steps, lr)
        full |= self._fit_ranges()
        if full or self._background is None:
            self._full_draw()
        else:
            self.canvas.restore_region(self._background)
            self._draw_curves()
            self.canvas.blit(self.figure.bbox)

    def _fit_ranges(self) -> bool:
        """Grow an axis range that no longer holds its curves; True when one changed."""
        steps = [s for series in self.series.values() for s in series[0]]
        if not steps:
            return False
        changed = False
        right = max(self._total, max(steps))  # the run's steps, else the data's
        if self.ax_loss.get_xlim() != (0, right):
            self.ax_loss.set_xlim(0, right)  # shared with ax_lr
            changed = True
        for ax, column in ((self.ax_loss, 1), (self.ax_lr, 2)):
            values = np.array([v for series in self.series.values() for v in series[column]])
            values = values[np.isfinite(values)]
            if not len(values):
                continue
            lo, hi = float(values.min()), float(values.max())
            fitted = self._fitted.get(ax)
            if fitted is not None and fitted[0] <= lo and hi <= fitted[1]:
                continue
            pad = self.MARGIN * ((hi - lo) or abs(hi) or 1.0)
            bottom, top = lo - pad, hi + pad
            if fitted is not None:  # only the side passed grows, by the whole range at least
                grow = fitted[1] - fitted[0]
                bottom = fitted[0] if lo >= fitted[0] else min(bottom, fitted[0] - grow)
                top = fitted[1] if hi <= fitted[1] else max(top, fitted[1] + grow)
            if lo >= 0 > bottom:
                bottom = 0.0  # a positive curve keeps y >= 0
            self._fitted[ax] = (bottom, top)
            ax.set_ylim(*self._fitted[ax])
            changed = True
        return changed

    def _full_draw(self) -> None:
        """Everything but the curves now; they are drawn on top in ``_on_draw``."""
        self._background = None
        self.canvas.draw_idle()

    def _on_draw(self, _event) -> None:
        """After a full draw (also a resize): keep the background, draw the curves on it."""
        self.full_draws += 1
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_curves()

    def _draw_curves(self) -> None:
        for loss_line, lr_line in self._lines.values():
            self.ax_loss.draw_artist(loss_line)
            self.ax_lr.draw_artist(lr_line)
