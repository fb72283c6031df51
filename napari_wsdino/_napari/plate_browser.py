"""Plate browser dock widget: open a dataset, pick plate / well / site, see the field.

Only the chosen field's channel files are read (the metadata table of a whole
screen is small; its images are not), so a 55-plate dataset stays responsive.
The field is shown in one additive layer per stain (three for BBBC021, five for Cell
Painting), updated in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QLabel, QLineEdit

from napari.utils.notifications import show_error

from napari_wsdino.core.imageio import ImageReadError
from napari_wsdino.core.metadata import DataError, Metadata, load_metadata
from napari_wsdino.core.progress import Progress
from napari_wsdino._napari import settings
from napari_wsdino._napari.layers import (FIELD_ROLE, ROLE, field_layers, is_field_layer,
                                          same_source, show_field)
from napari_wsdino._napari.dock import WorkerDock, add_row, button, edit_row, hrow, tip

if TYPE_CHECKING:
    import napari

LAST_FOLDER = "browser.last_folder"


class FieldIndex:
    """Plate → wells → sites → row lookups of one field table (built once per dataset)."""

    def __init__(self, metadata: Metadata):
        table = metadata.table
        self.plates: list[str] = sorted(table.plate.unique())
        self.wells: dict[str, list[str]] = {
            p: sorted(g.unique()) for p, g in table.groupby("plate").well
        }
        self.sites: dict[tuple[str, str], list[int]] = {
            k: sorted(int(s) for s in g) for k, g in table.groupby(["plate", "well"]).site
        }
        self.row: dict[tuple[str, str, int], int] = {
            (p, w, int(s)): i
            for i, (p, w, s) in enumerate(zip(table.plate, table.well, table.site))
        }

    def key(self, metadata: Metadata, index: int) -> tuple[str, str, int]:
        row = metadata.table.iloc[index]
        return str(row.plate), str(row.well), int(row.site)


class PlateBrowser(WorkerDock):
    """Open a BBBC021-layout or Cell Painting dataset folder (or its image CSV) and
    browse its fields; the layout is detected from the CSV."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer, "No dataset loaded.")
        self._index: FieldIndex | None = None
        self._inserted: dict | None = None  # metadata of a field layer the reader just added

        self.path_edit = tip(QLineEdit(str(settings.recall(LAST_FOLDER, ""))),
                             "A dataset folder or its image CSV: BBBC021 layout "
                             "(BBBC021_v1_image.csv and BBBC021_v1_moa.csv) or a Cell "
                             "Painting load_data.csv (FileName_OrigDNA ... OrigMito)")
        self.path_edit.setPlaceholderText(
            "dataset folder, BBBC021-layout or Cell Painting load_data.csv")
        self.browse_button = button("Browse…", "Choose a dataset folder and open it", self._browse)
        self.open_button = button("Open", "Open the dataset named on the left",
                                  lambda: self.open(self.path_edit.text()))
        self.sample_button = button("Synthetic sample", "Open a small synthetic BBBC021 replica "
                                    "(written once into ~/.cache/napari-wsdino)", self.open_sample)
        self._sample_worker = None
        self.plate_combo = QComboBox()
        self.well_combo = QComboBox()
        self.site_combo = QComboBox()
        self.prev_button = button("◀ Previous", "The previous field in table order",
                                  lambda: self._step(-1))
        self.next_button = button("Next ▶", "The next field in table order", lambda: self._step(+1))
        self.info = {k: QLabel("–") for k in ("compound", "concentration", "moa", "batch", "treatment")}

        form = QFormLayout()
        add_row(form, "Plate", self.plate_combo, "Plate of the field shown")
        add_row(form, "Well", self.well_combo, "Well of the plate (its first site is shown)")
        add_row(form, "Site", self.site_combo, "Site (field of view) of the well")
        form.addRow(hrow(self.prev_button, self.next_button))
        for key, title in (("compound", "Compound"), ("concentration", "Concentration (µM)"),
                           ("moa", "MoA"), ("batch", "Batch"), ("treatment", "Treatment")):
            form.addRow(title, self.info[key])
        self.stack(edit_row(self.path_edit, self.browse_button, self.open_button),
                   self.sample_button, self.status_label, form, 1)

        self.path_edit.returnPressed.connect(lambda: self.open(self.path_edit.text()))
        self.plate_combo.currentTextChanged.connect(self._plate_picked)
        self.well_combo.currentTextChanged.connect(self._well_picked)
        self.site_combo.currentTextChanged.connect(self._site_picked)
        self.state.metadata_changed.connect(self._on_metadata)
        self.state.field_changed.connect(self._on_field)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self._set_enabled(False)
        if self.state.metadata is not None:  # a dataset was opened before this dock
            self._on_metadata(self.state.metadata)
            self._sync_controls(self.state.field_index)
        else:  # File > Open before this dock: its newest field becomes the dataset
            for layer in reversed(list(self.viewer.layers)):
                if is_field_layer(layer) and layer.metadata.get("source"):
                    self._adopt(layer.metadata["source"],
                                int(layer.metadata.get("field_index", 0)))
                    break

    # -- opening -----------------------------------------------------------------
    def _browse(self) -> None:
        """Ask for a dataset folder."""
        folder = QFileDialog.getExistingDirectory(self, "Dataset folder (BBBC021 or Cell Painting)",
                                                  self.path_edit.text())
        if folder:
            self.path_edit.setText(folder)
            self.open(folder)

    def open(self, path: str | Path, field_index: int = 0) -> bool:
        """Load a dataset's metadata (fields with missing files dropped) and show a field."""
        path = str(path).strip()
        if not path:
            return False
        try:
            metadata = load_metadata(path, drop_missing=True, unannotated="drop")
            if not len(metadata.table):
                raise DataError(
                    f"None of the image files named in {path} exist under {metadata.root}."
                )
        except (DataError, OSError) as exc:
            self.status_label.setText(f"Cannot open {path}: {exc}")
            show_error(f"Cannot open {path}: {exc}")
            return False
        self.path_edit.setText(path)
        settings.remember(LAST_FOLDER, path)
        self.state.set_dataset(metadata, path, field_index)
        return True

    def open_sample(self) -> None:
        """Write (first time only, in a worker) and open the synthetic sample replica."""
        from napari_wsdino._napari.sample_data import sample_replica
        from napari_wsdino._napari.workers import start_worker

        def job():
            yield Progress("sample", 0, 1, "writing the synthetic replica (first time only)")
            return sample_replica()

        self.sample_button.setEnabled(False)
        self.status_label.setText("Preparing the synthetic sample…")

        def done(path):
            self.sample_button.setEnabled(True)
            self.open(path)

        def failed(_exc):
            self.sample_button.setEnabled(True)
            self.status_label.setText(f"Could not write the sample: {_exc}")

        self._sample_worker = start_worker(job(), on_done=done, on_error=failed,
                                           desc="Synthetic sample", owner=self)

    def _on_layer_inserted(self, event) -> None:
        """A field opened by the reader (File > Open, Open Sample) becomes the browser's dataset."""
        meta = getattr(event.value, "metadata", {}) or {}
        if meta.get(ROLE) != FIELD_ROLE or not meta.get("source"):
            return
        # Deferred, once: the reader inserts its layers one by one; let it finish first.
        pending, self._inserted = self._inserted, meta
        if pending is None:
            QTimer.singleShot(0, self._adopt_inserted)

    def _adopt_inserted(self) -> None:
        meta, self._inserted = self._inserted, None
        if meta is not None:
            self._adopt(meta["source"], int(meta.get("field_index", 0)))

    def _adopt(self, source: str, field_index: int) -> None:
        """Open ``source`` unless it already is the current dataset; either way the canvas
        is left with one set of field layers, showing the field just opened."""
        if not same_source(self.state.source, source):
            self.open(source, field_index)
        elif field_index != self.state.field_index:
            self.state.field_index = field_index
        elif len(field_layers(self.viewer)) != sum(map(is_field_layer, self.viewer.layers)):
            self._on_field(field_index)  # the same field opened again: drop the duplicates

    # -- state → controls ----------------------------------------------------------
    def _on_metadata(self, metadata: Metadata | None) -> None:
        """New dataset: rebuild the lookups and the plate list."""
        self._index = FieldIndex(metadata) if metadata is not None else None
        self._set_enabled(self._index is not None)
        if metadata is None:
            self.status_label.setText("No dataset loaded.")
            return
        s = metadata.summary()
        dropped = f", {metadata.dropped} dropped (missing files)" if metadata.dropped else ""
        self.status_label.setText(
            f"{s['fields']} fields, {s['plates']} plates, {s['batches']} batches, "
            f"{s['treatments']} treatments{dropped}; stains "
            f"{', '.join(metadata.channels)}."
        )
        with _blocked(self.plate_combo):
            self.plate_combo.clear()
            self.plate_combo.addItems(self._index.plates)

    def _on_field(self, index: int) -> None:
        """Current field changed (here or in another widget): sync controls, show it."""
        metadata = self.state.metadata
        if metadata is None or self._index is None:
            return
        self._sync_controls(index)
        try:
            show_field(self.viewer, metadata, index, self.state.source)
        except ImageReadError as exc:
            show_error(str(exc))

    def _sync_controls(self, index: int) -> None:
        metadata = self.state.metadata
        plate, well, site = self._index.key(metadata, index)
        with _blocked(self.plate_combo, self.well_combo, self.site_combo):
            self.plate_combo.setCurrentText(plate)
            self.well_combo.clear()
            self.well_combo.addItems(self._index.wells[plate])
            self.well_combo.setCurrentText(well)
            self.site_combo.clear()
            self.site_combo.addItems([str(s) for s in self._index.sites[(plate, well)]])
            self.site_combo.setCurrentText(str(site))
        row = metadata.table.iloc[index]
        for key, label in self.info.items():
            value = row.get(key, "")
            label.setText(f"{value:g}" if isinstance(value, float) else str(value))
        self.prev_button.setEnabled(index > 0)
        self.next_button.setEnabled(index < len(metadata.table) - 1)

    # -- controls → state ----------------------------------------------------------
    def _plate_picked(self, plate: str) -> None:
        """First site of the plate's first well."""
        if self._index and plate in self._index.wells:
            well = self._index.wells[plate][0]
            self._go(plate, well, self._index.sites[(plate, well)][0])

    def _well_picked(self, well: str) -> None:
        """First site of the well."""
        plate = self.plate_combo.currentText()
        if self._index and (plate, well) in self._index.sites:
            self._go(plate, well, self._index.sites[(plate, well)][0])

    def _site_picked(self, site: str) -> None:
        if self._index and site:
            self._go(self.plate_combo.currentText(), self.well_combo.currentText(), int(site))

    def _go(self, plate: str, well: str, site: int) -> None:
        index = self._index.row.get((plate, well, int(site)))
        if index is not None:
            self.state.field_index = index

    def _step(self, delta: int) -> None:
        """Previous / next field in table order."""
        if self.state.metadata is not None:
            n = len(self.state.metadata.table)
            self.state.field_index = min(max(self.state.field_index + delta, 0), n - 1)

    def _set_enabled(self, on: bool) -> None:
        for w in (self.plate_combo, self.well_combo, self.site_combo,
                  self.prev_button, self.next_button):
            w.setEnabled(on)


class _blocked:
    """Block Qt signals of some widgets while the code changes them programmatically."""

    def __init__(self, *widgets):
        self.widgets = widgets

    def __enter__(self):
        self.old = [w.blockSignals(True) for w in self.widgets]

    def __exit__(self, *exc):
        for w, old in zip(self.widgets, self.old):
            w.blockSignals(old)
