"""The matplotlib canvases of the docks: Evaluate's map of profiles, Train's curves.

Both draw on a ``FigureCanvasQTAgg`` that the dock lays out; they take arrays and
:class:`~napari_wsdino.core.progress.Progress` events, never layers.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from napari_wsdino.core.progress import Progress


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
            for c in cats:  # legend entries without drawing points twice
                self.ax.scatter([], [], color=colour[c], label=c, s=20)
            # beside the map, every entry: the layout makes room for it
            self.ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0),
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
    """Loss and learning-rate curves on a matplotlib canvas (redrawn at most 4x a second).

    Lines are updated in place and the layout is fixed, so a redraw costs a few ms of the
    GUI thread (no re-layout, no new artists).
    """

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3))
        self.figure.subplots_adjust(left=0.2, right=0.97, top=0.96, bottom=0.14, hspace=0.15)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setToolTip("Training loss and learning rate per step, one line per channel")
        self.ax_loss = self.figure.add_subplot(2, 1, 1)
        self.ax_lr = self.figure.add_subplot(2, 1, 2, sharex=self.ax_loss)
        self.ax_loss.set_ylabel("loss")
        self.ax_lr.set_ylabel("learning rate")
        self.ax_lr.set_xlabel("step")
        self.ax_loss.tick_params(labelbottom=False)
        self.series: dict[str, tuple[list, list, list]] = {}
        self._lines: dict[str, tuple] = {}
        self._last = 0.0
        self.clear()

    def clear(self) -> None:
        self.series.clear()
        for loss_line, lr_line in self._lines.values():
            loss_line.remove()
            lr_line.remove()
        self._lines.clear()
        legend = self.ax_loss.get_legend()
        if legend is not None:
            legend.remove()
        self.redraw()

    def add(self, event: Progress) -> None:
        """Plot a training step (events without a loss, e.g. start-up notes, are skipped)."""
        if "loss" not in event.info:
            return
        channel = str(event.info.get("channel", ""))
        steps, loss, lr = self.series.setdefault(channel, ([], [], []))
        steps.append(event.step)
        loss.append(float(event.info.get("loss", float("nan"))))
        lr.append(float(event.info.get("lr", float("nan"))))
        if time.perf_counter() - self._last > 0.25:
            self.redraw()

    def redraw(self) -> None:
        self._last = time.perf_counter()
        for channel, (steps, loss, lr) in self.series.items():
            if channel not in self._lines:
                (a,) = self.ax_loss.plot([], [], label=channel, lw=1)
                (b,) = self.ax_lr.plot([], [], label=channel, lw=1)
                self._lines[channel] = (a, b)
                self.ax_loss.legend(fontsize="small")
            loss_line, lr_line = self._lines[channel]
            loss_line.set_data(steps, loss)
            lr_line.set_data(steps, lr)
        for ax in (self.ax_loss, self.ax_lr):
            ax.relim()
            ax.autoscale_view()
        self.canvas.draw_idle()
