"""Attention dock widget: the loaded channel model's self-attention over the field in view.

For the current field (plate browser / shared state) and one channel, the last
block's CLS attention (``core.attention.attention_maps``) is added as layers laid
over the image: the per-head stack (a dims slider walks the heads), the head mean,
and DINO's thresholded mean as a contour. The model sees the *preprocessed* field
when a cache holding it is loaded (what it was trained on); otherwise the raw
field, downscaled to at most ``max_side`` pixels and divided by its 99.9th
percentile. Maps are scaled back onto the raw image either way.

The layers record the dataset (``source``) and field (``field``, ``field_index``) they
show. They never stay on another field: when the field or dataset changes they are
removed at once, and with "Update when the field changes" (on by default) recomputed
for the new field; a result that arrives for a field no longer shown is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout

from napari_wsdino.core.attention import (DEFAULT_KEEP, DISPLAY_MODE, MODES, AttentionMaps,
                                          CellAttention, attention_maps, attention_on_cells)
from napari_wsdino.core.cache import Cache, open_cache
from napari_wsdino.core.imageio import read_tiff
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.progress import Progress
from napari_wsdino._napari.layers import (ATTENTION_ROLE, ROLE, cache_row, contrast_for,
                                          on_raw_grid, remove_layers)
from napari_wsdino._napari.dock import WorkerDock, add_row, button, combo, double_spin, spin, tip

if TYPE_CHECKING:
    import napari

COLORMAPS = ("inferno", "magma", "viridis", "turbo", "hot")
PREFIX = "attention."


@dataclass(frozen=True)
class FieldImage:
    """The image a model sees and how it maps onto the raw field's pixels."""

    image: np.ndarray
    scale: tuple[float, float]
    translate: tuple[float, float]
    origin: str


def raw_for_model(raw: np.ndarray, max_side: int = 640) -> np.ndarray:
    """Downscale (anti-aliased) to at most ``max_side`` and divide by the 99.9th percentile."""
    from skimage.transform import resize

    raw = np.asarray(raw, dtype=np.float32)
    factor = max(raw.shape) / float(max_side)
    if factor > 1:
        shape = tuple(max(1, int(round(s / factor))) for s in raw.shape)
        raw = resize(raw, shape, order=3, anti_aliasing=True, preserve_range=True)
    top = float(np.percentile(raw, 99.9)) or 1.0
    return np.clip(raw / top, 0, None).astype(np.float32)


def field_image(metadata, index: int, channel: str, cache: Cache | None = None,
                max_side: int = 640) -> FieldImage:
    """The model input for one field and channel: its cache image if any, else the raw one."""
    row = metadata.table.iloc[index]
    raw = read_tiff(row[f"path_{channel}"])
    if cache is not None and channel in cache.channels:
        hit = cache_row(cache, row)
        if hit is not None:
            image = np.asarray(cache.images(channel)[hit], dtype=np.float32)
            scale, translate = on_raw_grid(raw.shape, image.shape)
            return FieldImage(image, scale, translate, "preprocessed field from the cache")
    image = raw_for_model(raw, max_side)
    scale, translate = on_raw_grid(raw.shape, image.shape)
    return FieldImage(image, scale, translate, "raw field (no cache holds it)")


def mask_outline(mask: np.ndarray, shape: tuple[int, int] | None = None,
                 smooth: float = 0.0) -> np.ndarray:
    """The one-pixel inner boundary of a binary mask (``uint8``, 1 on the outline).

    With ``shape`` (the raw field's), the mask is first brought onto that pixel grid, so
    the line is one *raw* pixel wide however small the image the model saw. With
    ``smooth`` (pixels of that grid, e.g. half a patch), the mask is blurred by a Gaussian
    of that width and cut at one half first: a smooth contour instead of patch steps.
    """
    from skimage.filters import gaussian
    from skimage.segmentation import find_boundaries
    from skimage.transform import resize

    mask = np.asarray(mask, dtype=bool)
    if shape is not None and tuple(shape) != mask.shape:
        mask = resize(mask.astype(np.float32), shape, order=1, preserve_range=True,
                      anti_aliasing=False) > 0.5
    if smooth > 0 and mask.any():
        mask = gaussian(mask.astype(np.float32), sigma=float(smooth), preserve_range=True) > 0.5
    return find_boundaries(mask, mode="inner").astype(np.uint8)


def attention_job(model, metadata, index: int, channel: str, cache: Cache | None,
                  max_side: int, mode: str, keep: float
                  ) -> Generator[Progress, None, tuple[AttentionMaps, FieldImage, list, CellAttention]]:
    """Worker body: read the field, compute the maps, the mask's outline and the
    attention-on-cells score."""
    yield Progress("attention", 0, 3, "reading the field")
    source = field_image(metadata, index, channel, cache, max_side)
    yield Progress("attention", 1, 3, f"{source.image.shape[0]}x{source.image.shape[1]} image")
    maps = attention_maps(model, source.image, mode=mode, keep=keep)
    yield Progress("attention", 2, 3, "outlining the mask")
    raw_shape = tuple(int(round(n * f)) for n, f in zip(source.image.shape, source.scale))
    # Smoothed over half a patch (on the raw grid): DINO's mask drawn as a contour, not as
    # the patch-sized steps of the grid it was computed on.
    outline = mask_outline(maps.mean_threshold, raw_shape,
                           smooth=0.5 * maps.patch_size * float(source.scale[0]))
    cells = attention_on_cells(maps, source.image)
    yield Progress("attention", 3, 3, "done")
    return maps, source, outline, cells


class AttentionWidget(WorkerDock):
    """Compute and overlay the current field's attention maps for one channel."""

    settings_prefix = PREFIX
    failed_text = "Attention failed"

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__(napari_viewer, "Load models (3b Load models) and open a dataset.")
        self._pending = False  # the field changed while a job ran: recompute when it ends
        self._job: tuple[str, str] = ("", "")  # (source, field key) of the last job started
        self._cache: Cache | None = None
        get = self.saved

        self.channel_combo = QComboBox()
        self.mode_combo = combo(MODES, get("mode", DISPLAY_MODE))
        self.keep_spin = double_spin(0.05, 1.0, get("keep", DEFAULT_KEEP), step=0.05)
        self.colormap_combo = combo(COLORMAPS, get("colormap", "inferno"))
        self.opacity_spin = double_spin(0.0, 1.0, get("opacity", 0.5), step=0.1)
        self.max_side_spin = spin(32, 4096, get("max_side", 640))
        self.auto_check = tip(QCheckBox("Update when the field changes"),
                              "Recompute the maps shown whenever the plate browser shows another "
                              "field; unticked, they are removed (never left on another field)")
        self.auto_check.setChecked(bool(get("auto", True)))
        self.compute_button = button("Show attention", "Compute the loaded model's last-block "
                                     "attention for the field in view (in the background) and "
                                     "lay it over the image", self.compute)
        self.idle_controls = (self.compute_button,)

        form = QFormLayout()
        add_row(form, "Channel", self.channel_combo, "Channel model of the loaded set to look at")
        add_row(form, "Upsampling", self.mode_combo,
                "How the patch-grid maps are brought to pixel size: bilinear (smooth) or "
                "nearest (one block per patch)")
        add_row(form, "Mask keeps mass", self.keep_spin,
                "The outline encloses the patches holding this share of the attention "
                "(DINO uses 0.6)")
        add_row(form, "Colormap", self.colormap_combo, "Colormap of the attention maps")
        add_row(form, "Opacity", self.opacity_spin, "Opacity of the attention maps")
        add_row(form, "Raw field max side", self.max_side_spin,
                "When no cache of this dataset holds the field, the raw field is shrunk to "
                "this many pixels on its longer side before the model sees it")
        self.stack(form, self.auto_check, self.compute_button, self.status_label, 1)

        self.opacity_spin.valueChanged.connect(self._restyle)
        self.colormap_combo.currentTextChanged.connect(self._restyle)
        self.state.models_changed.connect(self._on_models)
        self.state.cache_changed.connect(self._on_cache)
        self.state.field_changed.connect(self._on_field)
        self._on_models(self.state.models)
        self._on_cache(self.state.cache_path)

    # -- state -----------------------------------------------------------------------
    def _on_models(self, models) -> None:
        """Offer the loaded model set's channels."""
        current = self.channel_combo.currentText()
        self.channel_combo.clear()
        if models is not None:
            self.channel_combo.addItems(list(models.channels))
            if current in models.channels:
                self.channel_combo.setCurrentText(current)
        self.compute_button.setEnabled(models is not None)

    def _on_cache(self, path) -> None:
        try:
            self._cache = open_cache(path) if path is not None else None
        except DataError as exc:
            self._cache = None
            self.status_label.setText(f"Cache not used: {exc}")

    def _current(self) -> tuple[str, str] | None:
        """(source, field key) of the field in view, or ``None`` without a dataset."""
        metadata = self.state.metadata
        if metadata is None or not len(metadata.table):
            return None
        return str(self.state.source), metadata.field_key(self.state.field_index)

    def _on_field(self, _index: int) -> None:
        """Field or dataset changed: attention of another field leaves the canvas now; in
        automatic mode the maps shown follow (after the running job)."""
        now = self._current()
        stale = [layer for layer in self.viewer.layers
                 if layer.metadata.get(ROLE) == ATTENTION_ROLE and _shows(layer) != now]
        remove_layers(self.viewer, stale)
        elsewhere = self.running and self._job != now  # a job for a field no longer in view
        if not stale and not elsewhere:
            return
        new = now[1] if now is not None else "no dataset"
        if now is not None and self.auto_check.isChecked() and self.state.models is not None:
            if not self.running:
                self.compute()  # its status line names the field now computed
            elif elsewhere:
                self._pending = True
                self.status_label.setText(f"The view moved to {new}: its attention follows "
                                          f"when the running computation (of {self._job[1]}) ends.")
            return
        moved = f"the view moved to {new}"
        if stale:
            moved = f"Attention of {stale[0].metadata.get('field', 'another field')} removed: {moved}"
        running = (f"; the running computation of {self._job[1]} will not be shown"
                   if elsewhere else "")
        again = ("" if self.running and not elsewhere
                 else " Show attention computes it for this field.")
        self.status_label.setText(f"{moved[0].upper()}{moved[1:]}{running}.{again}")

    def task_failed(self, exc: BaseException) -> None:
        self._pending = False
        super().task_failed(exc)

    def task_stopped(self) -> None:
        self._pending = False
        super().task_stopped()

    # -- compute ---------------------------------------------------------------------
    def compute(self) -> None:
        """Attention of the current field for the chosen channel, in a worker."""
        models, metadata = self.state.models, self.state.metadata
        if models is None or metadata is None or not len(metadata.table):
            self.status_label.setText("Needs a dataset (1 Data) and models (3b Load models).")
            return
        channel = self.channel_combo.currentText()
        self._remember()
        try:
            entry = models[channel]
        except (DataError, KeyError) as exc:
            self.input_error(self.status_label, str(exc))
            return
        cache, note = self._cache, ""
        if cache is not None:
            check = self.state.check_cache(cache)
            if check.same is False:  # another dataset's pixels must never stand in for these
                cache = None
                note = f"; the cache {self._cache.path} is of another dataset ({check.reason}), not used"
        trained = self.state.check_models(self.state.models)
        if trained.same is False:
            note += f"; the models were trained on another dataset ({trained.reason})"
        index = self.state.field_index
        key = metadata.field_key(index)
        job = self._job = (str(self.state.source), key)
        self.start_task(
            attention_job(entry.model, metadata, index, channel, cache,
                          self.max_side_spin.value(), self.mode_combo.currentText(),
                          self.keep_spin.value()),
            f"Computing {channel} attention of {key}…",
            on_done=lambda out: self._finished(out, channel, job, index, note),
            desc="Attention",
        )

    def _finished(self, out: tuple, channel: str, job: tuple[str, str], index: int,
                  note: str) -> None:
        """Show a job's maps if its field is still the one in view; else drop them (and,
        in automatic mode, compute the field now in view)."""
        pending, self._pending = self._pending, False
        if job == self._current():
            self._show(*out, channel, job, index, note)
        elif pending:
            self.compute()
        else:
            now = self._current()
            self.status_label.setText(
                f"{channel} attention of {job[1]} not shown: the view moved to "
                f"{now[1] if now else 'no dataset'} while it was computed.")

    def _show(self, maps: AttentionMaps, source: FieldImage, outline: list,
              cells: CellAttention, channel: str, job: tuple[str, str], index: int,
              note: str = "") -> None:
        """Add or update the three attention layers."""
        cmap, opacity = self.colormap_combo.currentText(), self.opacity_spin.value()
        key = job[1]
        common = {"scale": source.scale, "translate": source.translate,
                  "metadata": {ROLE: ATTENTION_ROLE, "channel": channel, "field": key,
                               "field_index": int(index), "source": job[0]}}
        # As DINO's figures: the channel the model saw, in grey, under the heat maps (it
        # hides the colour field layers while shown; untick it to see them again).
        self._put("image", f"attention input [{channel}]", source.image,
                  dict(colormap="gray", blending="translucent", opacity=1.0,
                       contrast_limits=contrast_for(source.image), **common))
        # Additive blending from the map's low percentile: little attention adds nothing,
        # so the grey cells show through where the model does not look.
        self._put("image", f"attention heads [{channel}]", maps.heads,
                  dict(colormap=cmap, opacity=opacity, blending="additive",
                       contrast_limits=_limits(maps.heads), visible=False, **common))
        self._put("image", f"attention mean [{channel}]", maps.mean,
                  dict(colormap=cmap, opacity=opacity, blending="additive",
                       contrast_limits=_limits(maps.mean), **common))
        if self.viewer.dims.ndim == 3:
            self.viewer.dims.axis_labels = ("head", "y", "x")
        self._put_outline(f"attention mask [{channel}]", outline,
                          dict(common, scale=(1.0, 1.0), translate=(0.0, 0.0)))  # raw grid
        self.status_label.setText(
            f"{channel} attention of {key}: {maps.n_heads} heads on a {maps.grid[0]}x{maps.grid[1]}"
            f" patch grid ({source.origin}{note}). Attention on cells: {cells.score:.2f} "
            f"(heads {', '.join(f'{h:.2f}' for h in cells.per_head)}; 1 = spread evenly, above 1"
            f" = on the {channel} foreground, which covers {100 * cells.share:.0f}% of the field)."
            " The channel is shown in grey under the maps (the 'attention input' layer: hide"
            " it for the colour field); the heads layer is hidden: show it and use the slider"
            " to walk the heads."
        )
        self.last_cells = cells

    def _put(self, kind: str, name: str, data: np.ndarray, kwargs: dict) -> "napari.layers.Layer":
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            for key in ("scale", "translate", "metadata"):
                setattr(layer, key, kwargs[key])
            if kind == "image":
                lo, hi = kwargs["contrast_limits"]
                layer.contrast_limits_range = (min(float(data.min()), lo), hi)
                layer.contrast_limits = (lo, hi)
            return layer
        if kind == "image":
            return self.viewer.add_image(data, name=name, **kwargs)
        return self.viewer.add_labels(data, name=name, **kwargs)

    def _put_outline(self, name: str, outline: np.ndarray, common: dict) -> None:
        """The mask as a thin cyan outline in an Image layer (nothing there can be painted),
        locked (napari >= 0.5: not deleted by mistake; the panel replaces it itself)."""
        layer = self._put("image", name, outline,
                          dict(colormap="cyan", blending="additive", opacity=1.0,
                               contrast_limits=(0.0, 1.0), interpolation2d="nearest", **common))
        layer.locked = True

    def _restyle(self, *_):
        """Colormap / opacity apply to the attention layers already shown."""
        for layer in self.viewer.layers:
            if layer.metadata.get(ROLE) == ATTENTION_ROLE and layer.name.startswith(
                    ("attention heads", "attention mean")):
                layer.colormap = self.colormap_combo.currentText()
                layer.opacity = self.opacity_spin.value()

    def _remember(self) -> None:
        self.remember({
            "mode": self.mode_combo.currentText(), "keep": self.keep_spin.value(),
            "colormap": self.colormap_combo.currentText(), "opacity": self.opacity_spin.value(),
            "max_side": self.max_side_spin.value(), "auto": self.auto_check.isChecked(),
        })


def _shows(layer) -> tuple[str, str] | None:
    """(source, field key) an attention layer shows (``None`` when it does not say)."""
    meta = layer.metadata
    return (meta["source"], meta["field"]) if "source" in meta and "field" in meta else None


def _limits(maps: np.ndarray) -> tuple[float, float]:
    """Display range of attention maps: 5th percentile of the seen area to the maximum."""
    seen = maps[maps > 0]
    lo = float(np.percentile(seen, 5)) if seen.size else 0.0
    hi = float(maps.max())
    return (lo, hi) if hi > lo else (0.0, hi or 1.0)
