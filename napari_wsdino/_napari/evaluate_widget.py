"""Evaluate dock widget: one click from the cache and model set to NSC / NSCB / mAP.

Evaluate runs ``core.evaluate_workflow.evaluate_job`` in one worker: it embeds every
field of the cache with the loaded model set (cancellable, finished chunks kept for a
rerun), runs TVN, aggregation and matching, and projects the treatment (or well)
profiles to 2-D. The dock then shows the numbers, per-MoA accuracy, the MoA confusion
matrix, and a scatter coloured by MoA / compound / batch / concentration
(``canvases.ScatterMap``): hovering a point names it, clicking it opens one of its
fields in the viewer. Profiles, figures and results can be exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.fsio import atomic_path, atomic_write_text
from napari_wsdino.core.embed import DEFAULT_CROP
from napari_wsdino.core.evaluate_workflow import (  # noqa: F401 - importable from here too
    LEVELS, Evaluation, evaluate_job, labelled_confusion, model_set_label, point_names,
    profiles_path_for,
)
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.figures import confusion_figure, per_moa_figure, save_figure
from napari_wsdino.core.presets import PRESETS, describe_preset
from napari_wsdino.core.profiles import BATCH, COMPOUND, CONCENTRATION, MOA, PLATE, TREATMENT, WELL
from napari_wsdino.core.projection import METHODS as PROJECTIONS
from napari_wsdino.core.train import DEVICES
from napari_wsdino.core.tvn import DEFAULT_TVN, METHODS, TVN_METHODS
from napari_wsdino.core.why import evaluation_notes
from napari_wsdino._napari.canvases import ScatterMap  # noqa: F401 - importable from here too
from napari_wsdino._napari.dock import WorkerDock, add_row, button, combo, hrow, item_tips, spin

if TYPE_CHECKING:
    import napari

PREFIX = "evaluate."
COLOUR_BY = {"MoA": MOA, "compound": COMPOUND, "batch": BATCH, "concentration": CONCENTRATION}
#: One line per number: what it means (shown beside it and as its tooltip).
MEANINGS = {
    "NSC": "share of treatments whose most similar treatment of another compound has the "
           "same MoA (not-same-compound 1-NN accuracy)",
    "NSCB": "as NSC, but the neighbour must also come from another batch: batch effects "
            "cannot help (harder)",
    "mAP": "mean average precision: how high same-MoA treatments rank among all candidates "
           "(1 = all first)",
    "TVN": "typical variation normalisation: whitening fitted on the DMSO controls, so "
           "directions in which untreated cells vary anyway count less",
}
#: Each TVN method's help, from core's registry.
TVN_HELP = {m.name: m.help for m in TVN_METHODS.values()}
DOC_LINK = "docs/evaluation.md"


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.1%}" if isinstance(value, float) else str(value)


class EvaluateWidget(WorkerDock):
    """Embed, evaluate, and explore the result: numbers, confusion matrix, map."""

    settings_prefix = PREFIX
    failed_text = "Evaluation failed"
    stopping_text = "Cancelling…"
    stopped_text = "Cancelled. Evaluate again to continue the embedding."

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.evaluation: Evaluation | None = None
        self._model_note = ""
        get = self.saved

        self.inputs_label = QLabel()
        self.inputs_label.setWordWrap(True)
        self.tvn_combo = combo(METHODS, get("tvn", DEFAULT_TVN))
        item_tips(self.tvn_combo, (TVN_HELP[method] for method in METHODS))
        # The recipe's crop (set by _describe_inputs); a value typed here is stated as a change.
        self.crop_spin = spin(8, 2048, DEFAULT_CROP)
        self.device_combo = combo(DEVICES, get("device", DEVICES[0]))
        self.level_combo = combo(LEVELS, get("level", "treatments"))
        self.method_combo = combo(PROJECTIONS, get("method", PROJECTIONS[0]))
        self.colour_combo = combo(COLOUR_BY, get("colour", "MoA"))
        self.run_button = button("Evaluate", "Embed every field of the cache with the loaded "
                                 "model set, then TVN, NSC / NSCB / mAP and the map (in the "
                                 "background)", self.run)
        self.cancel_button = button("Cancel", "Stop at the next step; embedded chunks are kept "
                                    "and the next Evaluate continues", self.cancel)

        self.numbers = QTableWidget(0, 3)
        self.numbers.setHorizontalHeaderLabels(["", "value", "what this means"])
        self.numbers.verticalHeader().setVisible(False)
        self.numbers.setWordWrap(True)
        self.numbers.setToolTip(f"The evaluation's numbers; {DOC_LINK} explains each")
        self.per_moa = QTableWidget(0, 3)
        self.per_moa.setHorizontalHeaderLabels(["MoA", "NSC", "NSCB"])
        self.per_moa.verticalHeader().setVisible(False)
        self.per_moa.setToolTip("NSC and NSCB of the treatments of each MoA")
        self.confusion_combo = combo(("NSC", "NSCB"))
        self.confusion_combo.setToolTip("Confusion matrix of NSC or NSCB matching: rows the "
                                        "true MoA, columns the MoA predicted by the neighbour")
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.confusion_figure = Figure(figsize=(4.5, 4.5), layout="constrained")
        self.confusion_canvas = FigureCanvasQTAgg(self.confusion_figure)
        self.confusion_canvas.setMinimumHeight(380)
        self.map = ScatterMap(self.open_point)
        self.map.canvas.setMinimumHeight(340)
        self.export_profiles_button = button("Profiles…", "Write the field profiles (Parquet "
                                             "or CSV)", self._ask_profiles)
        self.export_figures_button = button("Figures…", "Write the confusion matrices, per-MoA "
                                            "accuracy and the map (PNG or SVG)", self._ask_figures)
        self.export_results_button = button("Results…", "Write the numbers as JSON (the keys of "
                                            "wsdino evaluate --json); 6 Compare reads it",
                                            self._ask_results)
        self.idle_controls, self.busy_controls = (self.run_button,), (self.cancel_button,)

        form = QFormLayout()
        add_row(form, "TVN", self.tvn_combo, f"TVN: {MEANINGS['TVN']}. {DEFAULT_TVN}: {TVN_HELP[DEFAULT_TVN]}")
        add_row(form, "Crop px", self.crop_spin,
                "Side of the crops embedded per field: the recipe's (2 Preprocess) unless "
                "changed here (four centre crops and their median, or one crop per nucleus "
                "averaged, as the recipe says)")
        add_row(form, "Device", self.device_combo, "auto uses the GPU when there is one")
        add_row(form, "Map of", self.level_combo, "One point per treatment, or per well")
        add_row(form, "Map method", self.method_combo,
                "UMAP (neighbourhoods; slower the first time) or PCA (linear, instant)")
        add_row(form, "Colour by", self.colour_combo, "What the map's colours show")
        confusion_tab = self.confusion_tab = QWidget()
        cl = QVBoxLayout(confusion_tab)
        cl.addWidget(self.confusion_combo)
        cl.addWidget(self.confusion_canvas, 1)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.map.canvas, "Map")
        self.tabs.addTab(self.numbers, "Numbers")
        self.tabs.addTab(self.per_moa, "Per MoA")
        self.tabs.addTab(confusion_tab, "Confusion")
        # A fixed height: a longer status line never resizes (so fully redraws) the map.
        self.tabs.setFixedHeight(460)
        exports = QHBoxLayout()
        exports.addWidget(QLabel("Export:"))
        for b in (self.export_profiles_button, self.export_figures_button, self.export_results_button):
            exports.addWidget(b)
        self.stack(self.inputs_label, form, hrow(self.run_button, self.cancel_button),
                   self.status_label, self.tabs, exports, 1)

        self.colour_combo.currentTextChanged.connect(lambda _t: self._draw_map())
        self.confusion_combo.currentTextChanged.connect(lambda _t: self._draw_confusion())
        self.state.cache_changed.connect(lambda _p: self._describe_inputs(recipe_changed=True))
        self.state.models_changed.connect(lambda _m: self._describe_inputs())
        self.state.metadata_changed.connect(self._on_dataset)
        self.state.preset_changed.connect(lambda _n: self._describe_inputs(recipe_changed=True))
        self.crop_spin.valueChanged.connect(lambda _v: self._describe_inputs())
        self.tabs.currentChanged.connect(lambda _i: self._draw_confusion())
        self._describe_inputs(recipe_changed=True)
        self.set_running(False)
        _preload()
        if isinstance(self.state.results, Evaluation):  # evaluated before this dock opened
            self._show(self.state.results)

    # -- inputs --------------------------------------------------------------------------
    def recipe(self) -> tuple[str, str]:
        """The preset this panel embeds with and why (the workflow's, else the one that fits
        the cache)."""
        path, shape = self.state.cache_path, None
        if path is not None:
            if getattr(self, "_shape_of", (None,))[0] != path:
                try:
                    self._shape_of = (path, open_cache(path).shape)
                except DataError:
                    self._shape_of = (path, None)
            shape = self._shape_of[1]
        return self.state.recipe_for(shape)

    def _describe_inputs(self, recipe_changed: bool = False) -> None:
        cache, models = self.state.cache_path, self.state.models
        name, why = self.recipe()
        preset = PRESETS[name]
        if recipe_changed:
            with _signals_blocked(self.crop_spin):
                self.crop_spin.setValue(preset.embed_crop)
        crop = self.crop_spin.value()
        changed = (f"; Crop px changed here to {crop} (recipe: {preset.embed_crop}): profiles "
                   "will differ from the demo's" if crop != preset.embed_crop else "")
        self.inputs_label.setText(
            f"Cache: {cache or '– (2 Preprocess)'}\n"
            f"Models: {f'{models.kind}, ' + ', '.join(models.channels) if models else '– (3b Load models)'}\n"
            f"Recipe ({why}): {describe_preset(preset)}{changed}."
        )

    def _on_dataset(self, _metadata) -> None:
        """Another dataset: results shown here were of the previous one; clear them."""
        self._describe_inputs()
        if self.evaluation is None or self.running:
            return
        self.evaluation = None
        _fill(self.numbers, [])
        _fill(self.per_moa, [])
        self.confusion_figure.clear()
        self.confusion_canvas.draw_idle()
        self._confusion_drawn = None
        self.map.clear("Another dataset was opened: evaluate it to see its map.")
        self.status_label.setText("Another dataset was opened in 1 Data: the results of the "
                                  "previous one were cleared (6 Compare keeps them).")
        self.set_running(False)

    def run(self) -> None:
        """Embed + evaluate + map in a worker."""
        if self.running:
            return
        try:
            if self.state.models is None:
                raise DataError("Load a model set first (3b Load models).")
            if self.state.cache_path is None:
                raise DataError("Preprocess the dataset or pick a cache first (2 Preprocess).")
            cache = open_cache(self.state.cache_path)
            models = self.state.models
            models.check_channels(cache.channels)
            check = self.state.check_cache(cache)
            if check.same is False:
                raise DataError(
                    f"The cache {cache.path} was made from another dataset than the one open "
                    f"in 1 Data ({check.reason}). Open the cache's dataset, or preprocess "
                    "this one (2 Preprocess).")
            trained = self.state.check_models(models)
        except DataError as exc:
            self.input_error(self.status_label, str(exc))
            return
        # Models of another dataset are allowed (transfer) but always marked as such.
        self._model_note = (f" The models were trained on another dataset ({trained.reason}): "
                            "these numbers measure how they transfer."
                            if trained.same is False else "")
        values = {"tvn": self.tvn_combo.currentText(), "crop": self.crop_spin.value(),
                  "device": self.device_combo.currentText(),
                  "level": self.level_combo.currentText(),
                  "method": self.method_combo.currentText()}
        self.remember({**values, "colour": self.colour_combo.currentText()})
        values["preset"] = self.recipe()[0]
        self.start_task(evaluate_job(cache, models, **values),
                        f"Embedding {len(cache)} fields…", describe=lambda e: e.message,
                        on_done=self._done, desc="Evaluate")

    def cancel(self) -> None:
        """Stop at the next step (embedded chunks are kept: Evaluate again resumes)."""
        self.stop_task()

    def set_running(self, running: bool) -> None:
        super().set_running(running)
        done = self.evaluation is not None and not running
        for b in (self.export_profiles_button, self.export_figures_button, self.export_results_button):
            b.setEnabled(done)

    # -- results -------------------------------------------------------------------------
    def why_lines(self, evaluation: Evaluation) -> list[str]:
        """Where a number surprises (``core.why``): NSCB > NSC, a fine-tune that scored as
        its initial weights did (evaluated earlier in this session)."""
        others = [e for e in self.state.evaluations if e is not evaluation]
        return evaluation_notes(evaluation, others, self.state.model_path)

    def _done(self, evaluation: Evaluation) -> None:
        self._show(evaluation)
        self.state.results = evaluation

    def _show(self, evaluation: Evaluation) -> None:
        """Fill the tabs with an evaluation's numbers, confusion matrix and map."""
        self.evaluation = evaluation
        self.set_running(False)
        r = evaluation.result
        self.status_label.setText(
            f"NSC {_fmt(r.nsc)}, NSCB {_fmt(r.nscb)} on {r.n_treatments} treatments "
            f"({r.n_fields} fields; recipe {evaluation.preset or 'custom'}). "
            + " ".join([*evaluation.notes, *r.notes, *self.why_lines(evaluation)])
            + self._model_note)
        rows = [("NSC", _fmt(r.nsc), MEANINGS["NSC"]), ("NSCB", _fmt(r.nscb), MEANINGS["NSCB"]),
                ("mAP (NSC)", _fmt(r.map_nsc), MEANINGS["mAP"] + ", NSC candidates"),
                ("mAP (NSCB)", _fmt(r.map_nscb), MEANINGS["mAP"] + ", NSCB candidates"),
                ("treatments (NSC)", str(r.n_nsc), "treatments that were matched for NSC"),
                ("treatments (NSCB)", str(r.n_nscb), "treatments with a candidate in another batch"),
                ("fields", str(r.n_fields), "fields embedded"),
                ("DMSO fields", str(r.n_dmso_fields), "control fields TVN was fitted on"),
                ("features", str(r.n_features), "length of a profile"),
                ("TVN", r.tvn, TVN_HELP.get(r.tvn, MEANINGS["TVN"])),
                ("model set", evaluation.label, "model kind, architectures, weights hash")]
        _fill(self.numbers, rows)
        for i, (_name, _value, meaning) in enumerate(rows):
            for j in range(3):
                self.numbers.item(i, j).setToolTip(f"{meaning} (see {DOC_LINK})")
        _fill(self.per_moa, [(m, _fmt(d.get("nsc")), _fmt(d.get("nscb")))
                             for m, d in r.per_moa.items()])
        self._draw_confusion()
        self._draw_map()

    def _draw_confusion(self) -> None:
        """Draw the chosen confusion matrix (labelled: true MoA rows, predicted MoA columns).

        Only while its tab is shown: drawing a dozen MoA labels and counts is the slowest
        thing the dock does on the GUI thread, and a hidden tab need not pay for it.
        """
        if self.evaluation is None or self.tabs.currentWidget() is not self.confusion_tab:
            return
        key = (id(self.evaluation), self.confusion_combo.currentText())
        if getattr(self, "_confusion_drawn", None) == key:
            return
        self._confusion_drawn = key
        which = self.confusion_combo.currentText()
        confusion = self.evaluation.confusion
        matrix = confusion.get(which, confusion.get("NSC"))
        if matrix is None:
            return
        fig = self.confusion_figure
        fig.clear()
        ax = fig.add_subplot()
        counts = matrix.to_numpy(dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        shown = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        n = len(matrix)
        ax.set_xticks(range(n), labels=[str(c) for c in matrix.columns], rotation=60,
                      ha="right", fontsize=6)
        ax.set_yticks(range(n), labels=[str(i) for i in matrix.index], fontsize=6)
        ax.set_xlabel(matrix.columns.name, fontsize=8)
        ax.set_ylabel(matrix.index.name, fontsize=8)
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=6,
                    color="white" if shown[i, j] > 0.5 else "black")
        total = counts.sum()
        acc = f"{np.trace(counts) / total:.1%}" if total else "no queries"
        ax.set_title(f"MoA confusion ({which}): {acc}", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true MoA's row")
        self.confusion_canvas.draw_idle()

    def _draw_map(self) -> None:
        if self.evaluation is None:
            return
        ev = self.evaluation
        column = COLOUR_BY[self.colour_combo.currentText()]
        meta = ev.points.meta
        labels = meta[column] if column in meta else pd.Series([""] * len(meta), name=column)
        self.map.draw(ev.xy, labels, ev.names or point_names(ev.points, ev.level),
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
        """The numbers as JSON (``wsdino evaluate --json`` keys plus the model set, its run
        folder or weights, weak label and when it was evaluated: what 6 Compare names)."""
        path = Path(path)
        data = {"model_set": self.evaluation.label, **self.evaluation.display_fields(),
                **self.evaluation.result.to_dict()}
        return atomic_write_text(path, json.dumps(data, indent=2))

    def export_figures(self, folder: str | Path, fmt: str = "png") -> list[Path]:
        """Confusion matrices, per-MoA accuracy and the map, as PNG or SVG files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        r = self.evaluation.result
        out = [save_figure(confusion_figure(labelled_confusion(r.confusion_nsc), "MoA confusion (NSC)"),
                           folder / f"confusion_nsc.{fmt}"),
               save_figure(per_moa_figure(r.per_moa, "Accuracy per MoA"), folder / f"per_moa.{fmt}")]
        if r.confusion_nscb is not None:
            out.append(save_figure(confusion_figure(labelled_confusion(r.confusion_nscb),
                                                    "MoA confusion (NSCB)"),
                                   folder / f"confusion_nscb.{fmt}"))
        path = folder / f"map_{self.evaluation.level}.{fmt}"
        with atomic_path(path) as tmp:
            self.map.figure.savefig(tmp, dpi=120)
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


class _signals_blocked:
    """``with _signals_blocked(widget):`` set a value without emitting its signals."""

    def __init__(self, widget):
        self.widget = widget

    def __enter__(self):
        self._was = self.widget.blockSignals(True)

    def __exit__(self, *exc):
        self.widget.blockSignals(self._was)


def _preload() -> None:
    """Import what evaluation needs (scikit-learn's shrinkage; the embedding, the nuclei
    finder of the CPU presets' cell crops and the recipes, with their scikit-image modules)
    when the dock opens.

    Imported in the worker, their hundreds of modules and shared libraries hold the GIL long
    enough to freeze the window for a second or more in the middle of an evaluation (1.4 s
    measured for the nuclei finder's); here they cost the same once, while the panel opens.
    UMAP is imported by the worker only when chosen (its import is slow and most of it runs
    without the GIL).
    """
    import sklearn.covariance  # noqa: F401

    import napari_wsdino.core.embed.runner  # noqa: F401
    import napari_wsdino.core.nuclei  # noqa: F401
    import napari_wsdino.core.preprocess  # noqa: F401
    import napari_wsdino.core.recipes  # noqa: F401
    from skimage.filters import threshold_otsu  # noqa: F401 - the nuclei finder's, lazy in skimage


def _fill(table: QTableWidget, rows: list[tuple[Any, ...]]) -> None:
    table.setRowCount(len(rows))
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            table.setItem(i, j, QTableWidgetItem(str(value)))
    table.resizeColumnsToContents()
