"""Compare dock widget: several model sets' results side by side (the paper's Table 1).

Every evaluation made in the Evaluate panel is added as a row (NSC, NSCB, mAP);
results JSON files (Evaluate's export, or ``wsdino evaluate --json``) can be added
too. The table and a grouped bar chart show them together; rows are kept between
sessions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtWidgets import QFileDialog, QLabel, QTableWidget, QTableWidgetItem

from napari_wsdino._napari import settings
from napari_wsdino._napari.dock import WorkerDock, button, hrow

if TYPE_CHECKING:
    import napari

KEY = "compare.rows"
METRICS = ("nsc", "nscb", "map_nsc", "map_nscb")
TITLES = {"nsc": "NSC", "nscb": "NSCB", "map_nsc": "mAP NSC", "map_nscb": "mAP NSCB"}


def row_from_results(label: str, results: dict[str, Any]) -> dict[str, Any]:
    """One comparison row from a results dict (``EvaluationResult.to_dict()`` keys)."""
    row = {"model set": str(label)}
    for key in METRICS:
        value = results.get(key)
        row[key] = float(value) if isinstance(value, (int, float)) and value == value else None
    row["treatments"] = results.get("n_nsc")
    return row


class CompareWidget(WorkerDock):
    """Results of several model sets as a table and a bar chart."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.rows: list[dict[str, Any]] = [r for r in settings.recall(KEY, []) if isinstance(r, dict)]

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.table = QTableWidget(0, 2 + len(METRICS))
        self.table.setHorizontalHeaderLabels(["model set", *[TITLES[m] for m in METRICS], "treatments"])
        self.table.verticalHeader().setVisible(False)
        self.figure = Figure(figsize=(4.5, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.table.setToolTip("One row per model set; NSC / NSCB: MoA accuracy of the nearest "
                              "other compound (NSCB: on another batch); mAP: mean average "
                              "precision of retrieving the same MoA")
        self.canvas.setToolTip("The table's numbers as bars (percent)")
        self.add_button = button("Add results JSON…", "Add results exported by 5 Evaluate or "
                                 "written by wsdino evaluate --json", self._ask_add)
        self.remove_button = button("Remove selected", "Remove the selected rows",
                                    self.remove_selected)
        self.clear_button = button("Clear", "Remove every row", self.clear)
        self.export_button = button("Export CSV…", "Write the table as CSV", self._ask_export)
        self.hint = QLabel("Each evaluation of 5 Evaluate is added here.")
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
            self.add(row_from_results(evaluation.label, evaluation.result.to_dict()), refresh)

    def add(self, row: dict[str, Any], refresh: bool = True) -> None:
        self.rows = [r for r in self.rows if r.get("model set") != row["model set"]] + [row]
        if refresh:
            self._refresh()

    def add_file(self, path: str | Path) -> None:
        """Add a results JSON (Evaluate export or ``wsdino evaluate --json``)."""
        path = Path(path)
        data = json.loads(path.read_text())
        self.add(row_from_results(data.get("model_set", path.stem), data))

    def remove_selected(self) -> None:
        chosen = {i.row() for i in self.table.selectedIndexes()}
        self.rows = [r for i, r in enumerate(self.rows) if i not in chosen]
        self._refresh()

    def clear(self) -> None:
        self.rows = []
        self._refresh()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["model set", *METRICS, "treatments"])

    def _refresh(self) -> None:
        """Table, chart, and the saved copy."""
        settings.remember(KEY, self.rows)
        self.table.setRowCount(len(self.rows))
        for i, row in enumerate(self.rows):
            cells = [row["model set"], *[_pct(row.get(m)) for m in METRICS],
                     str(row.get("treatments") or "–")]
            for j, text in enumerate(cells):
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        self.figure.clear()
        ax = self.figure.add_subplot()
        if self.rows:
            x = np.arange(len(METRICS))
            width = 0.8 / len(self.rows)
            for k, row in enumerate(self.rows):
                values = [100 * (row.get(m) or 0.0) for m in METRICS]
                ax.bar(x + (k - (len(self.rows) - 1) / 2) * width, values, width,
                       label=row["model set"][:40])
            ax.set_xticks(x, [TITLES[m] for m in METRICS])
            ax.set_ylabel("%")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=7)
        self.canvas.draw_idle()

    def _ask_add(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Results JSON", "", "JSON (*.json)")
        if path:
            try:
                self.add_file(path)
            except (OSError, ValueError) as exc:
                self.hint.setText(f"Cannot read {path}: {exc}")

    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export comparison", "comparison.csv", "CSV (*.csv)")
        if path:
            self.frame().to_csv(path, index=False)
            self.hint.setText(f"Written to {path}.")


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"
