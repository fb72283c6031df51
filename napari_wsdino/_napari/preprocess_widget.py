"""Preprocess dock widget: illumination correction, resize, clip, normalise → a cache.

Runs ``core.preprocess.preprocess`` on the dataset the plate browser loaded, in a
worker with napari's progress bar; Cancel stops at the next plate step and a later
Run resumes from the next unfinished plate. When the cache is complete it becomes
the shared state's cache (Train, Attention and Evaluate use it). "Compare" lays
the current field's raw image, its plate's illumination function and the
corrected image side by side, to the right of the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.preprocess import (
    ILLUMINATION_METHODS,
    NORMALIZATIONS,
    PreprocessSettings,
    preprocess,
)
from napari_wsdino.core.progress import Progress
from napari_wsdino._napari import settings
from napari_wsdino._napari.layers import cache_row, contrast_for, on_raw_grid, read_channel
from napari_wsdino._napari.dock import WorkerDock, add_row
from napari_wsdino._napari.state import TaskStatus

if TYPE_CHECKING:
    import napari

PREFIX = "preprocess."
GAP = 16  # pixels between the comparison panels
ROLE = "preprocess-compare"


def make_settings(height: int, width: int, clip: float, filter_size: float,
                  normalize: str, illumination: str) -> PreprocessSettings:
    """Widget values → :class:`PreprocessSettings` (0 size: half the input; 0 clip: none)."""
    size = (int(height), int(width)) if height > 0 and width > 0 else None
    return PreprocessSettings(size=size, clip=float(clip) if clip > 0 else None,
                              filter_size=float(filter_size), normalize=normalize,
                              illumination=illumination)


def comparison_images(metadata, index: int, channel: str, cache: Cache) -> dict[str, Any]:
    """Raw image, illumination function and corrected image of one field and channel."""
    row = metadata.table.iloc[index]
    raw = read_channel(metadata, index, channel)
    hit = cache_row(cache, row)
    if hit is None:
        raise DataError(f"{metadata.field_key(index)} is not in the cache {cache.path} "
                        "(unreadable, or the cache was made from another dataset).")
    return {
        "raw": raw,
        "illumination": cache.illumination(str(row.plate), channel),
        "corrected": np.asarray(cache.images(channel)[hit], dtype=np.float32),
        "plate": str(row.plate),
    }


class PreprocessWidget(WorkerDock):
    """Preprocess the loaded dataset into a cache, and compare raw / function / corrected."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.cache: Cache | None = None
        saved = settings.load_settings()
        get = lambda key, default: saved.get(PREFIX + key, default)  # noqa: E731

        self.dataset_label = QLabel("Open a dataset in 1 Data first.")
        self.dataset_label.setWordWrap(True)
        self.out_edit = QLineEdit(get("out", ""))
        self.out_edit.setPlaceholderText("cache folder (new, or one to resume / reuse)")
        self.out_browse = QPushButton("…")
        self.height_spin = _spin(0, 8192, get("height", 0))
        self.width_spin = _spin(0, 8192, get("width", 0))
        self.clip_spin = QDoubleSpinBox()
        self.clip_spin.setRange(0, 1e6)
        self.clip_spin.setDecimals(0)
        self.clip_spin.setValue(float(get("clip", 10000)))
        self.filter_spin = QDoubleSpinBox()
        self.filter_spin.setRange(1, 4096)
        self.filter_spin.setDecimals(0)
        self.filter_spin.setValue(float(get("filter_size", 320)))
        self.norm_combo = QComboBox()
        self.norm_combo.addItems(NORMALIZATIONS)
        self.norm_combo.setCurrentText(get("normalize", "zscore"))
        self.illum_combo = QComboBox()
        self.illum_combo.addItems(ILLUMINATION_METHODS)
        self.illum_combo.setCurrentText(get("illumination", "fast"))
        self.workers_spin = _spin(1, 64, get("workers", 2))
        self.out_browse.setToolTip("Choose the cache folder")
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Preprocess the dataset into the cache folder (resumes an "
                                   "interrupted run)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop at the next step; finished plates are kept")
        self.use_button = QPushButton("Use existing cache")
        self.use_button.setToolTip("Adopt the complete cache in the cache folder without running")
        self.status_label = QLabel("Idle.")
        self.status_label.setWordWrap(True)
        self.channel_combo = QComboBox()
        self.compare_button = QPushButton("Compare raw / illumination / corrected")
        self.follow_check = QCheckBox("Follow the current field")
        self.follow_check.setChecked(True)
        self.follow_check.setToolTip("Keep the comparison on the field the plate browser shows")
        self.compare_button.setToolTip("Lay the raw image, its plate's illumination function and "
                                       "the corrected image beside the field")

        size_row = QHBoxLayout()
        size_row.addWidget(self.height_spin)
        size_row.addWidget(QLabel("x"))
        size_row.addWidget(self.width_spin)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.out_browse)
        form = QFormLayout()
        add_row(form, "Cache folder", out_row,
                "Where the preprocessed images go (new, or a cache of this dataset to resume "
                "or reuse)")
        add_row(form, "Size H x W (0: half)", size_row,
                "Output size in pixels; 0 x 0 = half the input size, as in the paper")
        add_row(form, "Clip (0: none)", self.clip_spin,
                "Raw 16-bit counts above this are clipped (10,000 in the paper's code)")
        add_row(form, "Filter size (px @1024)", self.filter_spin,
                "Smoothing filter of the illumination function, in pixels at the 1024 x 1280 "
                "scale (scaled to other sizes)")
        add_row(form, "Normalise", self.norm_combo, "How each corrected image is normalised")
        add_row(form, "Illumination", self.illum_combo,
                "How the per-plate illumination function is estimated (none = no correction)")
        add_row(form, "Processes", self.workers_spin, "Worker processes (CPU cores) to use")
        buttons = QHBoxLayout()
        for b in (self.run_button, self.cancel_button, self.use_button):
            buttons.addWidget(b)
        compare = QFormLayout()
        add_row(compare, "Channel", self.channel_combo, "Channel shown in the comparison")
        layout = QVBoxLayout(self.body)
        layout.addWidget(self.dataset_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addLayout(compare)
        layout.addWidget(self.compare_button)
        layout.addWidget(self.follow_check)
        layout.addStretch(1)

        self.out_browse.clicked.connect(self._browse)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self.use_existing)
        self.compare_button.clicked.connect(self.compare)
        self.state.metadata_changed.connect(self._on_metadata)
        self.state.field_changed.connect(self._on_field)
        self.state.cache_changed.connect(self._on_cache)
        self._on_metadata(self.state.metadata)
        self._on_cache(self.state.cache_path)
        self._set_running(False)

    # -- state -------------------------------------------------------------------------
    def _on_metadata(self, metadata) -> None:
        """Describe the dataset; propose a cache folder beside it."""
        if metadata is None:
            return
        s = metadata.summary()
        self.dataset_label.setText(f"Dataset {self.state.source}: {s['fields']} fields on "
                                   f"{s['plates']} plates, channels {', '.join(metadata.channels)}.")
        self.channel_combo.clear()
        self.channel_combo.addItems(list(metadata.channels))
        if not self.out_edit.text().strip() and self.state.source is not None:
            src = Path(self.state.source)
            base = src if src.is_dir() else src.parent
            self.out_edit.setText(str(base.parent / f"{base.name}_cache"))

    def _on_cache(self, path) -> None:
        if path is not None and (self.cache is None or Path(self.cache.path) != Path(path)):
            try:
                self.cache = open_cache(path)
            except DataError:
                self.cache = None

    def _on_field(self, _index) -> None:
        """Keep the comparison panels on the field in view."""
        if self.follow_check.isChecked() and self._compare_layers():
            self.compare()

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Cache folder", self.out_edit.text())
        if path:
            self.out_edit.setText(path)

    def prep_settings(self) -> PreprocessSettings:
        return make_settings(self.height_spin.value(), self.width_spin.value(),
                             self.clip_spin.value(), self.filter_spin.value(),
                             self.norm_combo.currentText(), self.illum_combo.currentText())

    # -- run -----------------------------------------------------------------------------
    def run(self) -> None:
        """Preprocess (or resume) in a worker."""
        if self.status == TaskStatus.RUNNING:
            return
        metadata, out = self.state.metadata, self.out_edit.text().strip()
        try:
            if metadata is None:
                raise DataError("Open a dataset in 1 Data first.")
            if not out:
                raise DataError("Choose a cache folder.")
            prep = self.prep_settings()
        except (DataError, ValueError) as exc:
            self.input_error(self.status_label, str(exc))
            return
        settings.remember_many({
            PREFIX + "out": out, PREFIX + "height": self.height_spin.value(),
            PREFIX + "width": self.width_spin.value(), PREFIX + "clip": self.clip_spin.value(),
            PREFIX + "filter_size": self.filter_spin.value(),
            PREFIX + "normalize": self.norm_combo.currentText(),
            PREFIX + "illumination": self.illum_combo.currentText(),
            PREFIX + "workers": self.workers_spin.value(),
        })
        self.status = TaskStatus.RUNNING
        self._set_running(True)
        self.status_label.setText(f"Preprocessing {len(metadata.table)} fields into {out}…")
        self.run_task(
            preprocess(metadata, out, prep, workers=self.workers_spin.value()),
            on_progress=self._progress, on_done=self._done, on_error=self._failed,
            on_stopped=self._stopped, desc="Preprocess",
        )

    def cancel(self) -> None:
        """Stop at the next step; finished plates are kept for a later Run."""
        if self.worker is not None and self.status == TaskStatus.RUNNING:
            self.worker.quit()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("Cancelling…")

    def use_existing(self) -> None:
        """Adopt a complete cache without running."""
        try:
            cache = open_cache(self.out_edit.text().strip())
            check = self.state.check_cache(cache)
            if check.same is False:
                raise DataError(f"{cache.path} is a cache of another dataset ({check.reason}): "
                                "choose another cache folder and Run.")
        except (DataError, OSError) as exc:
            self.input_error(self.status_label, str(exc))
            return
        self._adopt(cache)

    def _progress(self, event: Progress) -> None:
        if self.status != TaskStatus.RUNNING:
            return  # a late event must not hide the final message
        self.status_label.setText(f"{event.message} ({event.step}/{event.total} fields)")

    def _done(self, cache: Cache) -> None:
        self.status = TaskStatus.DONE
        self._set_running(False)
        self._adopt(cache)

    def _adopt(self, cache: Cache) -> None:
        self.cache = cache
        self.out_edit.setText(str(cache.path))
        failed = cache.settings.get("failed") or []
        note = f"; {len(failed)} unreadable field(s) left out" if failed else ""
        self.status_label.setText(f"Cache ready: {len(cache)} fields, {cache.shape[0]}x"
                                  f"{cache.shape[1]} px, at {cache.path}{note}.")
        self.state.cache_path = cache.path

    def _stopped(self) -> None:
        self.status = TaskStatus.STOPPED
        self._set_running(False)
        self.status_label.setText("Cancelled. Run again to resume from the next unfinished plate.")

    def _failed(self, exc: BaseException) -> None:
        self.status = TaskStatus.CRASHED
        self._set_running(False)
        self.status_label.setText(f"Preprocessing failed: {exc}")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.use_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    # -- compare ------------------------------------------------------------------------
    def _compare_layers(self) -> dict:
        return {l.metadata["panel"]: l for l in self.viewer.layers
                if l.metadata.get("wsdino_role") == ROLE}

    def compare(self) -> None:
        """Raw | illumination function | corrected, right of the field, for one channel."""
        metadata, channel = self.state.metadata, self.channel_combo.currentText()
        if metadata is None or self.cache is None or not channel:
            self.input_error(self.status_label, "Compare needs a dataset (1 Data) and a "
                                                "complete cache of it (Run or Use existing cache).")
            return
        if self.state.check_cache(self.cache).same is False:
            self.input_error(self.status_label, f"The cache {self.cache.path} is of another "
                                                "dataset: Run into another cache folder first.")
            return
        try:
            images = comparison_images(metadata, self.state.field_index, channel, self.cache)
        except (DataError, OSError) as exc:
            self.status_label.setText(str(exc))
            return
        raw = images["raw"]
        h, w = raw.shape
        panels = [("raw", raw, (1.0, 1.0), (0.0, 0.0), "gray")]
        if images["illumination"] is not None:
            fn = images["illumination"]
            scale, shift = on_raw_grid(raw.shape, fn.shape)
            panels.append(("illumination", fn, scale, shift, "viridis"))
        scale, shift = on_raw_grid(raw.shape, images["corrected"].shape)
        panels.append(("corrected", images["corrected"], scale, shift, "gray"))
        existing = self._compare_layers()
        for name in set(existing) - {p[0] for p in panels}:
            self.viewer.layers.remove(existing.pop(name))
        for k, (panel, data, scale, shift, cmap) in enumerate(panels, start=1):
            translate = (shift[0], shift[1] + k * (w + GAP))
            meta = {"wsdino_role": ROLE, "panel": panel, "channel": channel,
                    "plate": images["plate"], "field": metadata.field_key(self.state.field_index)}
            limits = contrast_for(data)
            layer = existing.get(panel)
            if layer is None:
                self.viewer.add_image(data, name=f"{panel} [{channel}]", colormap=cmap,
                                      scale=scale, translate=translate, metadata=meta,
                                      contrast_limits=limits)
                continue
            layer.data = data
            layer.scale, layer.translate, layer.metadata = scale, translate, meta
            layer.name = f"{panel} [{channel}]"
            layer.contrast_limits_range = (min(float(data.min()), limits[0]),
                                           max(float(data.max()), limits[1]))
            layer.contrast_limits = limits
        self.viewer.reset_view()


def _spin(lo: int, hi: int, value) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setValue(int(value))
    return spin
