"""Compare dock widget: several model sets' results side by side (the paper's Table 1).

Every evaluation made in the Evaluate panel is added as a row (NSC, NSCB, mAP);
results JSON files (Evaluate's export, or ``wsdino evaluate --json``) can be added
too. The table and a grouped bar chart show them together; rows are kept between
sessions. A row is named by its run folder (or weights), weak label and when it was
evaluated (``core.evaluate_workflow.display_name``); it is replaced by a later row of the
same model set (its ``label``: kind, architectures, weights hash).
"""

from __future__ import annotations

import textwrap
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QFileDialog, QHeaderView, QLabel, QTableWidget, QTableWidgetItem

from napari_wsdino.core.errors import DataError
from napari_wsdino.core.evaluate_workflow import METRICS_FILE, display_name, read_results
from napari_wsdino.core.fsio import atomic_write_text
from napari_wsdino._napari import settings
from napari_wsdino._napari.dock import WorkerDock, button, hrow

if TYPE_CHECKING:
    import napari

KEY = "compare.rows"
METRICS = ("nsc", "nscb", "map_nsc", "map_nscb")
TITLES = {"nsc": "NSC", "nscb": "NSCB", "map_nsc": "mAP NSC", "map_nscb": "mAP NSCB"}
#: The table's headers: the name, the numbers (narrow, on two lines), treatments matched.
HEADERS = ("model set", "NSC", "NSCB", "mAP\nNSC", "mAP\nNSCB", "n")
#: What names a row (``Evaluation.display_fields()``, the keys of Evaluate's results JSON).
SHOWN = ("run", "weak_label", "evaluated_at")
LEGEND_CHARS = 46  # legend names wrap at this many characters (whole, never cut)


def row_from_results(label: str, results: dict[str, Any]) -> dict[str, Any]:
    """One comparison row from a results dict (``EvaluationResult.to_dict()`` keys, and
    ``run`` / ``weak_label`` / ``evaluated_at`` where the results name them)."""
    row = {"model set": str(label)}
    for key in METRICS:
        value = results.get(key)
        row[key] = float(value) if isinstance(value, (int, float)) and value == value else None
    row["treatments"] = results.get("n_nsc")
    row.update({key: str(results.get(key) or "") for key in SHOWN})
    return row


def row_name(row: dict[str, Any], now: datetime | None = None) -> str:
    """A row as a person tells it apart: run folder (or weights), weak label, when."""
    return display_name(row.get("run") or row["model set"], row.get("weak_label") or "",
                        row.get("evaluated_at") or "", now)


class CompareWidget(WorkerDock):
    """Results of several model sets as a table and a bar chart."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.rows: list[dict[str, Any]] = [r for r in settings.recall(KEY, []) if isinstance(r, dict)]

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        # The numbers take what they need; the name the rest, wrapped (cut in the middle
        # only where one word is wider): every column in view in a narrow dock.
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setHorizontalHeaderLabels(list(HEADERS))
        self.table.horizontalHeaderItem(len(HEADERS) - 1).setToolTip("Treatments matched for NSC")
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(True)
        self.table.setTextElideMode(Qt.ElideMiddle)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.Stretch)
        header.sectionResized.connect(self._name_width_changed)
        self.figure = Figure(figsize=(4.5, 3), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.table.setToolTip("One row per model set: its run folder (or weights), weak label "
                              "and when it was evaluated; NSC / NSCB: MoA accuracy of the "
                              "nearest other compound (NSCB: on another batch); mAP: mean "
                              "average precision of retrieving the same MoA")
        self.canvas.setToolTip("The table's numbers as bars (percent)")
        self.add_button = button("Add results JSON…", "Add results exported by 5 Evaluate, "
                                 "written by wsdino evaluate --json, or an evaluation folder's "
                                 "metrics.json (complete sets only)", self._ask_add)
        self.remove_button = button("Remove selected", "Remove the selected rows",
                                    self.remove_selected)
        self.clear_button = button("Clear", "Remove every row", self.clear)
        self.export_button = button("Export CSV…", "Write the table as CSV", self._ask_export)
        self.hint = QLabel("Each evaluation of 5 Evaluate is added here, named by run "
                           "folder (or weights), weak label and time.")
        self.hint.setWordWrap(True)
        self.stack(self.hint, self.table, (self.canvas, 1),
                   hrow(self.add_button, self.remove_button, self.clear_button,
                        self.export_button))

        self.state.results_changed.connect(self._on_results)
        for evaluation in self.state.evaluations:  # computed before this dock opened
            self._on_results(evaluation, refresh=False)
        self._refresh()

    def _on_results(self, evaluation, refresh: bool = True) -> None:
        """A new evaluation (``Evaluate`` panel): add it, replacing a row of the same label."""
        if evaluation is not None:
            results = {**evaluation.result.to_dict(), **evaluation.display_fields()}
            self.add(row_from_results(evaluation.label, results), refresh)

    def _name_width_changed(self, section: int, _old: int, _new: int) -> None:
        """The names rewrap: row heights follow, once the header has laid its sections out."""
        if section == 0:
            QTimer.singleShot(0, self.table.resizeRowsToContents)

    def add(self, row: dict[str, Any], refresh: bool = True) -> None:
        self.rows = [r for r in self.rows if r.get("model set") != row["model set"]] + [row]
        if refresh:
            self._refresh()

    def add_file(self, path: str | Path) -> None:
        """Add a results JSON (Evaluate export, ``wsdino evaluate --json``, or an evaluation
        folder's ``metrics.json``: only from a complete set, ``read_results``); a file that
        does not say when it was evaluated is dated by its modification time."""
        path = Path(path)
        data = read_results(path)
        path = path / METRICS_FILE if path.is_dir() else path
        data["run"] = data.get("run") or (path.stem if "model_set" not in data else "")
        data["evaluated_at"] = data.get("evaluated_at") or datetime.fromtimestamp(
            path.stat().st_mtime).isoformat(timespec="seconds")
        self.add(row_from_results(data.get("model_set", path.stem), data))

    def remove_selected(self) -> None:
        chosen = {i.row() for i in self.table.selectedIndexes()}
        self.rows = [r for i, r in enumerate(self.rows) if i not in chosen]
        self._refresh()

    def clear(self) -> None:
        self.rows = []
        self._refresh()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["model set", *METRICS, "treatments", *SHOWN])

    def names(self) -> list[str]:
        """Each row's name (:func:`row_name`), in table order."""
        now = datetime.now()
        return [row_name(row, now) for row in self.rows]

    def _refresh(self) -> None:
        """Table, chart, and the saved copy."""
        settings.remember(KEY, self.rows)
        names = self.names()
        self.table.setRowCount(len(self.rows))
        for i, (row, name) in enumerate(zip(self.rows, names)):
            cells = [name, *[_pct(row.get(m)) for m in METRICS], str(row.get("treatments") or "–")]
            for j, text in enumerate(cells):
                self.table.setItem(i, j, QTableWidgetItem(text))
            self.table.item(i, 0).setToolTip(
                f"{name}\nmodel set: {row['model set']}"
                + (f"\nevaluated {row['evaluated_at']}" if row.get("evaluated_at") else ""))
        self.table.resizeRowsToContents()
        self._draw(names)

    def _draw(self, names: list[str]) -> None:
        """Grouped bars, one colour per row; the legend below holds every name whole."""
        self.figure.clear()
        ax = self.figure.add_subplot()
        labels = [textwrap.fill(n, LEGEND_CHARS, break_long_words=False, break_on_hyphens=False)
                  for n in names]
        if self.rows:
            x = np.arange(len(METRICS))
            width = 0.8 / len(self.rows)
            for k, (row, label) in enumerate(zip(self.rows, labels)):
                values = [100 * (row.get(m) or 0.0) for m in METRICS]
                ax.bar(x + (k - (len(self.rows) - 1) / 2) * width, values, width, label=label)
            ax.set_xticks(x, [TITLES[m] for m in METRICS])
            ax.set_ylabel("%")
            ax.set_ylim(0, 100)
            self.figure.legend(loc="outside lower center", fontsize=7, frameon=False)
        # room for the bars above a legend of any length
        lines = sum(label.count("\n") + 1 for label in labels)
        self.canvas.setMinimumHeight(200 + 13 * lines)
        self.canvas.draw_idle()

    def _ask_add(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Results JSON", "", "JSON (*.json)")
        if path:
            self.add_path(path)

    def add_path(self, path: str | Path) -> bool:
        """:meth:`add_file`, or the reason it cannot (an incomplete result set, not JSON)
        in the hint line; whether a row was added."""
        try:
            self.add_file(path)
        except (OSError, ValueError) as exc:
            self.hint.setText(f"Not added: {exc}" if isinstance(exc, DataError)
                              else f"Cannot read {path}: {exc}")
            return False
        return True

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export comparison", "comparison.csv", "CSV (*.csv)")
        if path:
            atomic_write_text(path, self.frame().to_csv(index=False))
            self.hint.setText(f"Written to {path}.")


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"
