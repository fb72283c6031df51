"""Preprocess dock widget: illumination correction, resize, clip, normalise → a cache.

Runs ``core.preprocess.preprocess`` on the dataset the plate browser loaded, in a
worker with napari's progress bar; Cancel stops at the next plate step and a later
Run resumes from the next unfinished plate. When the cache is complete it becomes
the shared state's cache (Train, Attention and Evaluate use it). "Compare" lays
the current field's raw image, its plate's illumination function and the
corrected image side by side, to the right of the field; those layers record their
dataset and field, follow the field (or leave when it changes) and leave when another
dataset opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QFormLayout, QLabel, QLineEdit

from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.fsio import locked
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.preprocess import (
    ILLUMINATION_METHODS,
    NORMALIZATIONS,
    PreprocessSettings,
    preprocess,
)
from napari_wsdino.core.presets import (PRESET_TITLES, PRESETS, describe_preset, preprocess_settings,
                                        preset_for_fields)
from napari_wsdino._napari.layers import (cache_row, contrast_for, on_raw_grid, read_channel,
                                          remove_layers)
from napari_wsdino._napari.dock import (
    WorkerDock, add_row, button, combo, data_combo, double_spin, edit_row, hrow, spin, tip,
)

if TYPE_CHECKING:
    import napari

PREFIX = "preprocess."
CUSTOM_TITLE = "custom (the fields below)"
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

    settings_prefix = PREFIX
    failed_text = "Preprocessing failed"
    stopping_text = "Cancelling…"
    stopped_text = "Cancelled. Run again to resume from the next unfinished plate."

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer)
        self.cache: Cache | None = None
        get, d = self.saved, PreprocessSettings()  # remembered values, else core's defaults

        self.dataset_label = QLabel("Open a dataset in 1 Data first.")
        self.dataset_label.setWordWrap(True)
        # The recipe of the whole workflow (shared state): Train and Evaluate follow it.
        self.preset_combo = data_combo(
            [(CUSTOM_TITLE, "")] + [(t, n) for n, t in PRESET_TITLES.items()],
            self.state.preset or get("preset", ""))
        self.recipe_label = QLabel("")
        self.recipe_label.setWordWrap(True)
        self.out_edit = QLineEdit(get("out", ""))
        self.out_edit.setPlaceholderText("cache folder (new, or one to resume / reuse)")
        self.out_browse = button("…", "Choose the cache folder", self._browse)
        self.height_spin = spin(0, 8192, get("height", 0))
        self.width_spin = spin(0, 8192, get("width", 0))
        self.clip_spin = double_spin(0, 1e6, get("clip", d.clip), decimals=0)
        self.filter_spin = double_spin(1, 4096, get("filter_size", d.filter_size), decimals=0)
        self.norm_combo = combo(NORMALIZATIONS, get("normalize", d.normalize))
        self.illum_combo = combo(ILLUMINATION_METHODS, get("illumination", d.illumination))
        self.workers_spin = spin(1, 64, get("workers", 2))
        self.run_button = button("Run", "Preprocess the dataset into the cache folder (resumes "
                                 "an interrupted run)", self.run)
        self.cancel_button = button("Cancel", "Stop at the next step; finished plates are kept",
                                    self.cancel)
        self.use_button = button("Use existing cache", "Adopt the complete cache in the cache "
                                 "folder without running", self.use_existing)
        self.idle_controls = (self.run_button, self.use_button)
        self.busy_controls = (self.cancel_button,)
        self.channel_combo = QComboBox()
        self.compare_button = button("Compare raw / illumination / corrected",
                                     "Lay the raw image, its plate's illumination function and "
                                     "the corrected image beside the field", self.compare)
        self.follow_check = tip(QCheckBox("Follow the current field"),
                                "Keep the comparison on the field the plate browser shows; "
                                "unchecked, it is removed when the field changes")
        self.follow_check.setChecked(True)

        form = QFormLayout()
        add_row(form, "Recipe", self.preset_combo,
                "The preset this workflow runs, as 'wsdino demo --preset' does: it sets the size "
                "and normalisation here, the training settings (3 Train) and the embedding "
                "(4 Evaluate). 'custom': the fields below, as you set them")
        form.addRow(self.recipe_label)
        add_row(form, "Cache folder", edit_row(self.out_edit, self.out_browse),
                "Where the preprocessed images go (new, or a cache of this dataset to resume "
                "or reuse)")
        add_row(form, "Size H x W (0: half)",
                hrow(self.height_spin, QLabel("x"), self.width_spin),
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
        compare = QFormLayout()
        add_row(compare, "Channel", self.channel_combo, "Channel shown in the comparison")
        self.stack(self.dataset_label, form,
                   hrow(self.run_button, self.cancel_button, self.use_button),
                   self.status_label, compare, self.compare_button, self.follow_check, 1)

        self.state.metadata_changed.connect(self._on_dataset)
        self.state.field_changed.connect(self._on_field)
        self.state.cache_changed.connect(self._on_cache)
        self.state.preset_changed.connect(self._on_preset)
        self.preset_combo.activated.connect(lambda _i: self._preset_picked())
        for box in (self.height_spin, self.width_spin, self.clip_spin):
            box.valueChanged.connect(lambda _v: self._describe_recipe())
        self.norm_combo.currentTextChanged.connect(lambda _t: self._describe_recipe())
        self._on_preset(self.state.preset)
        self._on_metadata(self.state.metadata)
        self._on_cache(self.state.cache_path)
        self.set_running(False)

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
        self._propose_preset(metadata)
        if not self.out_edit.text().strip() and self.state.source is not None:
            src = Path(self.state.source)
            base = src if src.is_dir() else src.parent
            self.out_edit.setText(str(base.parent / f"{base.name}_cache"))

    def _on_dataset(self, metadata) -> None:
        """Another dataset opened: the comparison showed the previous one's field; remove it."""
        remove_layers(self.viewer, self._compare_layers().values())
        self._on_metadata(metadata)

    def _preset_picked(self) -> None:
        """The user chose a recipe here: it becomes the workflow's (Train, Evaluate follow)."""
        self.remember({"preset": self.preset_combo.currentData()})
        self.state.preset = self.preset_combo.currentData() or None
        self._apply_preset()

    def _propose_preset(self, metadata) -> None:
        """No recipe chosen yet (here or before): the preset that fits the raw fields."""
        if self.state.preset is not None or self.saved("preset") is not None:
            return
        try:
            shape = read_channel(metadata, 0, metadata.channels[0]).shape
        except (OSError, ValueError, IndexError):
            return
        self.state.preset = preset_for_fields(shape)  # fills the fields via _on_preset

    def _on_preset(self, name: str | None) -> None:
        """The workflow's recipe changed (here or in 3 Train): show it, fill the fields."""
        index = self.preset_combo.findData(name or "")
        if index != self.preset_combo.currentIndex():
            self.preset_combo.setCurrentIndex(index)
        self._apply_preset()

    def _apply_preset(self) -> None:
        name = self.preset_combo.currentData()
        if name:
            ps = preprocess_settings(PRESETS[name])
            self.height_spin.setValue(ps.size[0])
            self.width_spin.setValue(ps.size[1])
            self.clip_spin.setValue(ps.clip)
            self.norm_combo.setCurrentText(ps.normalize)
        self._describe_recipe()

    def _describe_recipe(self) -> None:
        """What the chosen recipe runs, and every field set otherwise than it says."""
        name = self.preset_combo.currentData()
        if not name:
            self.recipe_label.setText("Custom settings: Train and Evaluate use the preset "
                                      "that fits the cache, and say which.")
            return
        try:
            ps, mine = preprocess_settings(PRESETS[name]), self.prep_settings()
        except ValueError as exc:
            self.recipe_label.setText(f"Recipe {name}; the fields below are invalid: {exc}")
            return
        changed = [f"{k} {getattr(mine, k)} (recipe: {getattr(ps, k)})"
                   for k in ("size", "clip", "normalize") if getattr(mine, k) != getattr(ps, k)]
        self.recipe_label.setText(
            f"Recipe {describe_preset(PRESETS[name])}."
            + (f" Changed here: {'; '.join(changed)}: profiles will differ from the "
               "demo's." if changed else ""))

    def _on_cache(self, path) -> None:
        if path is not None and (self.cache is None or Path(self.cache.path) != Path(path)):
            try:
                self.cache = open_cache(path)
            except DataError:
                self.cache = None

    def _on_field(self, _index) -> None:
        """Keep the comparison panels on the field in view (Follow), or remove them: never a
        comparison of another field beside the field in view."""
        layers = self._compare_layers()
        if layers and self.follow_check.isChecked():
            self.compare()
            layers = self._compare_layers()
        metadata = self.state.metadata
        now = ((str(self.state.source), metadata.field_key(self.state.field_index))
               if metadata is not None and len(metadata.table) else None)
        remove_layers(self.viewer, [layer for layer in layers.values()
                                    if (layer.metadata.get("source"),
                                        layer.metadata.get("field")) != now])

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
        if self.running:
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
        self.remember({
            "out": out, "height": self.height_spin.value(), "width": self.width_spin.value(),
            "clip": self.clip_spin.value(), "filter_size": self.filter_spin.value(),
            "normalize": self.norm_combo.currentText(),
            "illumination": self.illum_combo.currentText(),
            "workers": self.workers_spin.value(),
        })
        # The lock `wsdino preprocess` takes: a command or another panel writing this cache
        # meanwhile is refused, naming this one (and this one the other).
        self.start_task(locked(preprocess(metadata, out, prep, workers=self.workers_spin.value()),
                               out, "this cache"),
                        f"Preprocessing {len(metadata.table)} fields into {out}…",
                        describe=lambda e: f"{e.message} ({e.step}/{e.total} fields)",
                        on_done=self._adopt, desc="Preprocess")

    def cancel(self) -> None:
        """Stop at the next step; finished plates are kept for a later Run."""
        self.stop_task()

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

    def _adopt(self, cache: Cache) -> None:
        self.cache = cache
        self.out_edit.setText(str(cache.path))
        failed = cache.settings.get("failed") or []
        note = f"; {len(failed)} unreadable field(s) left out" if failed else ""
        self.status_label.setText(f"Cache ready: {len(cache)} fields, {cache.shape[0]}x"
                                  f"{cache.shape[1]} px, at {cache.path}{note}.")
        self.state.cache_path = cache.path

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
                    "plate": images["plate"], "source": str(self.state.source),
                    "field": metadata.field_key(self.state.field_index)}
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

