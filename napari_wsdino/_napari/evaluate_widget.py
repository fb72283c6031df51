"""Evaluate dock widget: one click from the cache and model set to NSC / NSCB / mAP.

Evaluate embeds every field of the cache with the loaded model set
(``core.embed.embed_cache``; cancellable, finished chunks kept for a rerun), runs
TVN, aggregation and matching (``core.evaluation.iter_evaluate``) and a 2-D map of
the treatment (or well) profiles (``core.projection.project_2d``), all in one
worker. The dock then shows the numbers, per-MoA accuracy, the MoA confusion
matrix, and a scatter coloured by MoA / compound / batch / concentration:
hovering a point names it, clicking it opens one of its fields in the viewer.
Profiles, figures and results can be exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_wsdino.core.aggregate import aggregate_wells
from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.embed import DEFAULT_CROP, embed_cache
from napari_wsdino.core.evaluation import EvaluationResult, iter_evaluate
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.plots import confusion_figure, per_moa_figure, save_figure
from napari_wsdino.core.profiles import (
    BATCH, COMPOUND, CONCENTRATION, MOA, PLATE, TREATMENT, WELL, ProfileTable,
)
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.projection import project_2d
from napari_wsdino.core.tvn import METHODS as TVN_METHODS
from napari_wsdino._napari import settings
from napari_wsdino._napari.dock import WorkerDock
from napari_wsdino._napari.state import TaskStatus
from napari_wsdino._napari.workers import start_worker

if TYPE_CHECKING:
    import napari

PREFIX = "evaluate."
COLOUR_BY = {"MoA": MOA, "compound": COMPOUND, "batch": BATCH, "concentration": CONCENTRATION}
LEVELS = ("treatments", "wells")


@dataclass
class Evaluation:
    """What one Evaluate click produced."""

    label: str
    profiles: ProfileTable
    result: EvaluationResult
    points: ProfileTable  # the profiles drawn in the map (treatments or wells)
    xy: np.ndarray
    level: str
    profiles_path: Path | None


def profiles_path_for(cache: Cache, models) -> Path:
    """Where a cache's profiles for a model set go (beside the cache; reruns resume)."""
    return Path(cache.path).parent / "profiles" / f"{models.kind}-{models.fingerprint()[:10]}.parquet"


def evaluate_job(cache: Cache, models, out: Path | None, *, tvn: str, crop: int, device: str,
                 level: str, method: str, label: str) -> Generator[Progress, None, Evaluation]:
    """Embed, evaluate and project, as one progress generator (the worker body)."""
    profiles = yield from embed_cache(cache, models, out, crop=crop, device=device)
    result = yield from iter_evaluate(profiles, tvn)
    points = result.treatments if level == "treatments" else aggregate_wells(profiles)
    yield Progress("evaluate", 0, 1, f"{method.upper()} of {len(points)} {level}")
    xy = project_2d(points.features, method=method)
    return Evaluation(label, profiles, result, points, np.asarray(xy), level, out)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.1%}" if isinstance(value, float) else str(value)


class ScatterMap:
    """Profiles in 2-D on a matplotlib canvas: colours, hover names, click callback."""

    def __init__(self, on_click):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.5, 4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
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
            self.colorbar = self.figure.colorbar(self.collection, ax=self.ax,
                                                 label=f"log10 {labels.name}")
        else:
            cats = sorted(labels.astype(str).unique())
            cmap = matplotlib.colormaps["tab20"]
            colour = {c: cmap(i % 20) for i, c in enumerate(cats)}
            self.collection = self.ax.scatter(xy[:, 0], xy[:, 1], s=30, picker=True, pickradius=5,
                                              c=[colour[v] for v in labels.astype(str)])
            for c in cats:  # legend entries without drawing points twice
                self.ax.scatter([], [], color=colour[c], label=c, s=20)
            self.ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.02),
                           ncol=2, markerscale=0.8, frameon=False)
        self.ax.set_title(title, fontsize=9)
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self.annotation = self.ax.annotate("", xy=(0, 0), xytext=(8, 8), textcoords="offset points",
                                           fontsize=8, bbox={"boxstyle": "round", "fc": "w"})
        self.annotation.set_visible(False)
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


class EvaluateWidget(WorkerDock):
    """Embed, evaluate, and explore the result: numbers, confusion matrix, map."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.evaluation: Evaluation | None = None
        saved = settings.load_settings()
        get = lambda key, default: saved.get(PREFIX + key, default)  # noqa: E731

        self.inputs_label = QLabel()
        self.inputs_label.setWordWrap(True)
        self.tvn_combo = QComboBox()
        self.tvn_combo.addItems(TVN_METHODS)
        self.tvn_combo.setCurrentText(get("tvn", "paper"))
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(8, 2048)
        self.crop_spin.setValue(int(get("crop", DEFAULT_CROP)))
        self.device_combo = QComboBox()
        self.device_combo.addItems(("auto", "cpu", "cuda"))
        self.device_combo.setCurrentText(get("device", "auto"))
        self.level_combo = QComboBox()
        self.level_combo.addItems(LEVELS)
        self.level_combo.setCurrentText(get("level", "treatments"))
        self.method_combo = QComboBox()
        self.method_combo.addItems(("umap", "pca"))
        self.method_combo.setCurrentText(get("method", "umap"))
        self.colour_combo = QComboBox()
        self.colour_combo.addItems(list(COLOUR_BY))
        self.colour_combo.setCurrentText(get("colour", "MoA"))
        self.run_button = QPushButton("Evaluate")
        self.cancel_button = QPushButton("Cancel")
        self.status_label = QLabel("Idle.")
        self.status_label.setWordWrap(True)

        self.numbers = QTableWidget(0, 2)
        self.numbers.setHorizontalHeaderLabels(["", "value"])
        self.numbers.verticalHeader().setVisible(False)
        self.per_moa = QTableWidget(0, 3)
        self.per_moa.setHorizontalHeaderLabels(["MoA", "NSC", "NSCB"])
        self.per_moa.verticalHeader().setVisible(False)
        self.confusion_combo = QComboBox()
        self.confusion_combo.addItems(("NSC", "NSCB"))
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.confusion_canvas = FigureCanvasQTAgg(Figure(figsize=(4, 4)))
        self.map = ScatterMap(self.open_point)
        self.map.canvas.setMinimumHeight(340)
        self.export_profiles_button = QPushButton("Profiles…")
        self.export_figures_button = QPushButton("Figures…")
        self.export_results_button = QPushButton("Results…")

        form = QFormLayout()
        form.addRow("TVN", self.tvn_combo)
        form.addRow("Crop px", self.crop_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Map of", self.level_combo)
        form.addRow("Map method", self.method_combo)
        form.addRow("Colour by", self.colour_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        confusion_tab = QWidget()
        cl = QVBoxLayout(confusion_tab)
        cl.addWidget(self.confusion_combo)
        cl.addWidget(self.confusion_canvas, 1)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.map.canvas, "Map")
        self.tabs.addTab(self.numbers, "Numbers")
        self.tabs.addTab(self.per_moa, "Per MoA")
        self.tabs.addTab(confusion_tab, "Confusion")
        exports = QHBoxLayout()
        exports.addWidget(QLabel("Export:"))
        for b in (self.export_profiles_button, self.export_figures_button, self.export_results_button):
            exports.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addWidget(self.inputs_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(exports)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.colour_combo.currentTextChanged.connect(lambda _t: self._draw_map())
        self.confusion_combo.currentTextChanged.connect(lambda _t: self._draw_confusion())
        self.export_profiles_button.clicked.connect(self._ask_profiles)
        self.export_figures_button.clicked.connect(self._ask_figures)
        self.export_results_button.clicked.connect(self._ask_results)
        self.state.cache_changed.connect(lambda _p: self._describe_inputs())
        self.state.models_changed.connect(lambda _m: self._describe_inputs())
        self._describe_inputs()
        self._set_running(False)

    # -- inputs --------------------------------------------------------------------------
    def _describe_inputs(self) -> None:
        cache, models = self.state.cache_path, self.state.models
        self.inputs_label.setText(
            f"Cache: {cache or '– (2 Preprocess)'}\n"
            f"Models: {f'{models.kind}, ' + ', '.join(models.channels) if models else '– (3b Load models)'}"
        )

    def run(self) -> None:
        """Embed + evaluate + map in a worker."""
        if self.status == TaskStatus.RUNNING:
            return
        try:
            if self.state.models is None:
                raise DataError("Load a model set first (3b Load models).")
            if self.state.cache_path is None:
                raise DataError("Preprocess the dataset or pick a cache first (2 Preprocess).")
            cache = open_cache(self.state.cache_path)
            models = self.state.models
            models.check_channels(cache.channels)
        except DataError as exc:
            self.status_label.setText(str(exc))
            return
        settings.remember_many({PREFIX + k: v for k, v in (
            ("tvn", self.tvn_combo.currentText()), ("crop", self.crop_spin.value()),
            ("device", self.device_combo.currentText()), ("level", self.level_combo.currentText()),
            ("method", self.method_combo.currentText()), ("colour", self.colour_combo.currentText()),
        )})
        label = f"{models.kind} ({', '.join(models.archs.values())}) {models.fingerprint()[:6]}"
        self.status = TaskStatus.RUNNING
        self._set_running(True)
        self.status_label.setText(f"Embedding {len(cache)} fields…")
        self.worker = start_worker(
            evaluate_job(cache, models, profiles_path_for(cache, models),
                         tvn=self.tvn_combo.currentText(), crop=self.crop_spin.value(),
                         device=self.device_combo.currentText(),
                         level=self.level_combo.currentText(),
                         method=self.method_combo.currentText(), label=label),
            on_progress=lambda e: self.status_label.setText(e.message), on_done=self._done,
            on_error=self._failed, on_stopped=self._stopped, desc="Evaluate", owner=self
        )

    def cancel(self) -> None:
        """Stop at the next step (embedded chunks are kept: Evaluate again resumes)."""
        if self.worker is not None and self.status == TaskStatus.RUNNING:
            self.worker.quit()
            self.cancel_button.setEnabled(False)

    def _stopped(self) -> None:
        self.status = TaskStatus.STOPPED
        self._set_running(False)
        self.status_label.setText("Cancelled. Evaluate again to continue the embedding.")

    def _failed(self, exc: BaseException) -> None:
        self.status = TaskStatus.CRASHED
        self._set_running(False)
        self.status_label.setText(f"Evaluation failed: {exc}")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        done = self.evaluation is not None and not running
        for b in (self.export_profiles_button, self.export_figures_button, self.export_results_button):
            b.setEnabled(done)

    # -- results -------------------------------------------------------------------------
    def _done(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation
        self.status = TaskStatus.DONE
        self._set_running(False)
        r = evaluation.result
        self.status_label.setText(f"NSC {_fmt(r.nsc)}, NSCB {_fmt(r.nscb)} on {r.n_treatments} "
                                  f"treatments ({r.n_fields} fields). {' '.join(r.notes)}")
        rows = [("NSC", _fmt(r.nsc)), ("NSCB", _fmt(r.nscb)), ("mAP (NSC)", _fmt(r.map_nsc)),
                ("mAP (NSCB)", _fmt(r.map_nscb)), ("treatments (NSC)", str(r.n_nsc)),
                ("treatments (NSCB)", str(r.n_nscb)), ("fields", str(r.n_fields)),
                ("DMSO fields", str(r.n_dmso_fields)), ("features", str(r.n_features)),
                ("TVN", r.tvn), ("model set", evaluation.label)]
        _fill(self.numbers, rows)
        _fill(self.per_moa, [(m, _fmt(d.get("nsc")), _fmt(d.get("nscb")))
                             for m, d in r.per_moa.items()])
        self._draw_confusion()
        self._draw_map()
        self.state.results = evaluation

    def _draw_confusion(self) -> None:
        """Re-render the confusion matrix picture on the dock's canvas."""
        if self.evaluation is None:
            return
        r = self.evaluation.result
        which = self.confusion_combo.currentText()
        matrix = r.confusion_nscb if which == "NSCB" and r.confusion_nscb is not None else r.confusion_nsc
        fig = confusion_figure(matrix, f"MoA confusion ({which})")
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

        canvas = FigureCanvasQTAgg(fig)
        layout = self.confusion_canvas.parentWidget().layout()
        layout.replaceWidget(self.confusion_canvas, canvas)
        self.confusion_canvas.deleteLater()
        self.confusion_canvas = canvas

    def _names(self) -> list[str]:
        meta = self.evaluation.points.meta
        if self.evaluation.level == "treatments":
            return [f"{t} ({m})" for t, m in zip(meta[TREATMENT], meta[MOA])]
        return [f"{p}/{w}: {t} ({m})" for p, w, t, m in
                zip(meta[PLATE], meta[WELL], meta[TREATMENT], meta[MOA])]

    def _draw_map(self) -> None:
        if self.evaluation is None:
            return
        ev = self.evaluation
        column = COLOUR_BY[self.colour_combo.currentText()]
        meta = ev.points.meta
        labels = meta[column] if column in meta else pd.Series([""] * len(meta), name=column)
        self.map.draw(ev.xy, labels, self._names(),
                      f"{self.method_combo.currentText().upper()} of {len(meta)} {ev.level}")

    def field_of_point(self, i: int) -> int | None:
        """Row of the viewer's field table showing point ``i`` (a field of that treatment/well)."""
        metadata = self.state.metadata
        if metadata is None or self.evaluation is None:
            return None
        meta = self.evaluation.points.meta.iloc[i]
        t = metadata.table
        mask = t.treatment.values == meta[TREATMENT]
        if self.evaluation.level == "wells":
            mask &= (t.plate.values == str(meta[PLATE])) & (t.well.values == str(meta[WELL]))
        hits = np.flatnonzero(mask)
        return int(hits[0]) if len(hits) else None

    def open_point(self, i: int) -> None:
        """Click on the map: show a field of that treatment (or well) in the viewer."""
        index = self.field_of_point(i)
        name = self.map.names[i] if i < len(self.map.names) else str(i)
        if index is None:
            self.status_label.setText(f"{name}: no field of it in the dataset open in 1 Data.")
            return
        self.state.field_index = index
        self.status_label.setText(f"Showing {name}: {self.state.metadata.field_key(index)}.")

    # -- export --------------------------------------------------------------------------
    def export_profiles(self, path: str | Path) -> Path:
        """Field profiles as Parquet or CSV (by suffix)."""
        return self.evaluation.profiles.write(path)

    def export_results(self, path: str | Path) -> Path:
        """The numbers as JSON (``wsdino evaluate --json`` keys plus the model set)."""
        path = Path(path)
        data = {"model_set": self.evaluation.label, **self.evaluation.result.to_dict()}
        path.write_text(json.dumps(data, indent=2))
        return path

    def export_figures(self, folder: str | Path, fmt: str = "png") -> list[Path]:
        """Confusion matrices, per-MoA accuracy and the map, as PNG or SVG files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        r = self.evaluation.result
        out = [save_figure(confusion_figure(r.confusion_nsc, "MoA confusion (NSC)"),
                           folder / f"confusion_nsc.{fmt}"),
               save_figure(per_moa_figure(r.per_moa, "Accuracy per MoA"), folder / f"per_moa.{fmt}")]
        if r.confusion_nscb is not None:
            out.append(save_figure(confusion_figure(r.confusion_nscb, "MoA confusion (NSCB)"),
                                   folder / f"confusion_nscb.{fmt}"))
        path = folder / f"map_{self.evaluation.level}.{fmt}"
        self.map.figure.savefig(path, dpi=120)
        out.append(path)
        return out

    def _ask_profiles(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export profiles", "profiles.parquet",
                                              "Parquet (*.parquet);;CSV (*.csv)")
        if path:
            self.status_label.setText(f"Profiles written to {self.export_profiles(path)}.")

    def _ask_results(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export results", "results.json", "JSON (*.json)")
        if path:
            self.status_label.setText(f"Results written to {self.export_results(path)}.")

    def _ask_figures(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(self, "Export figures (folder and format)",
                                                   "figures.png", "PNG (*.png);;SVG (*.svg)")
        if path:
            fmt = "svg" if path.lower().endswith(".svg") or "svg" in chosen.lower() else "png"
            files = self.export_figures(Path(path).with_suffix(""), fmt)
            self.status_label.setText(f"{len(files)} figures written to {files[0].parent}.")


def _fill(table: QTableWidget, rows: list[tuple[Any, ...]]) -> None:
    table.setRowCount(len(rows))
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            table.setItem(i, j, QTableWidgetItem(str(value)))
    table.resizeColumnsToContents()
