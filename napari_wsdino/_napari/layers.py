"""Showing one field of view as additive coloured image layers.

Shared by the reader (which returns layer-data tuples) and the plate browser
(which replaces the data of existing layers in place, so the user's zoom, layer
order and visibility survive a change of field). Only the field's own channel
files are read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from napari_wsdino.core.imageio import read_tiff
from napari_wsdino.core.metadata import Metadata

if TYPE_CHECKING:
    import napari

#: Colours of the registered layouts' stains: BBBC021 (DAPI, Tubulin, Actin) and Cell
#: Painting (DNA, ER, RNA, AGP, Mito), in the field's usual false colours.
CHANNEL_COLORMAPS = {"DAPI": "blue", "Tubulin": "green", "Actin": "red",
                     "DNA": "blue", "ER": "green", "RNA": "cyan", "AGP": "red",
                     "Mito": "magenta"}
FALLBACK_COLORMAPS = ("blue", "green", "red", "magenta", "cyan", "yellow")
ROLE = "wsdino_role"
FIELD_ROLE = "field"
ROW_KEYS = ("plate", "batch", "well", "site", "replicate", "compound", "concentration",
            "treatment", "moa")


def channel_colormap(channel: str, position: int) -> str:
    """DAPI / DNA blue, Tubulin / ER green, Actin / AGP red, RNA cyan, Mito magenta;
    other screens' channels cycle colours by position."""
    return CHANNEL_COLORMAPS.get(channel, FALLBACK_COLORMAPS[position % len(FALLBACK_COLORMAPS)])


def contrast_for(image: np.ndarray) -> tuple[float, float]:
    """Robust display range (0.5th-99.8th percentile of a subsample), never empty."""
    sample = np.asarray(image[::4, ::4], dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.8)))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def on_raw_grid(raw_shape, shape) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translate that lay a ``shape`` image over a ``raw_shape`` one.

    Pixel centres are matched: the outer pixel edges of both coincide.
    """
    scale = tuple(float(r) / float(s) for r, s in zip(raw_shape, shape))
    return scale, tuple((s - 1.0) / 2.0 for s in scale)


def cache_row(cache, row) -> int | None:
    """Row of a cache's arrays holding the field ``row`` (plate, well, site), or ``None``."""
    t = cache.table
    hit = np.flatnonzero((t.plate.values == row.plate) & (t.well.values == row.well)
                         & (t.site.values.astype(int) == int(row.site)))
    return int(hit[0]) if len(hit) else None


def field_metadata(metadata: Metadata, index: int, source: Any = None) -> dict[str, Any]:
    """Plain-Python metadata of one field (what goes into ``layer.metadata``)."""
    row = metadata.table.iloc[index]
    meta: dict[str, Any] = {ROLE: FIELD_ROLE, "field_index": int(index)}
    for key in ROW_KEYS:
        if key in row.index:
            value = row[key]
            meta[key] = value.item() if isinstance(value, np.generic) else value
    meta["source"] = str(source) if source is not None else str(metadata.root)
    return meta


def read_channel(metadata: Metadata, index: int, channel: str) -> np.ndarray:
    """One channel image of one field (reads a single file)."""
    return read_tiff(metadata.table.iloc[index][f"path_{channel}"])


def field_layer_data(metadata: Metadata, index: int, source: Any = None) -> list[tuple]:
    """Layer-data tuples ``(data, kwargs, "image")``, one per channel of field ``index``."""
    meta = field_metadata(metadata, index, source)
    out = []
    for pos, channel in enumerate(metadata.channels):
        image = read_channel(metadata, index, channel)
        kwargs = {
            "name": channel,
            "colormap": channel_colormap(channel, pos),
            "blending": "additive",
            "contrast_limits": contrast_for(image),
            "metadata": {**meta, "channel": channel, "paths": {
                c: str(metadata.table.iloc[index][f"path_{c}"]) for c in metadata.channels}},
        }
        out.append((image, kwargs, "image"))
    return out


def field_layers(viewer: "napari.viewer.Viewer") -> dict[str, "napari.layers.Image"]:
    """The viewer's field layers by channel (layers this plugin made)."""
    return {
        layer.metadata["channel"]: layer
        for layer in viewer.layers
        if layer.metadata.get(ROLE) == FIELD_ROLE and "channel" in layer.metadata
    }


def show_field(viewer: "napari.viewer.Viewer", metadata: Metadata, index: int,
               source: Any = None) -> list["napari.layers.Image"]:
    """Show field ``index``: replace the data of existing field layers, or add them."""
    existing = field_layers(viewer)
    shown = []
    for data, kwargs, _ in field_layer_data(metadata, index, source):
        channel = kwargs["metadata"]["channel"]
        layer = existing.get(channel)
        if layer is None:
            shown.append(viewer.add_image(data, **kwargs))
            continue
        lo, hi = kwargs["contrast_limits"]
        full = (min(float(data.min()), lo), max(float(data.max()), hi))
        layer.data = data
        layer.contrast_limits_range = full
        layer.contrast_limits = (lo, hi)
        layer.metadata = kwargs["metadata"]
        shown.append(layer)
    return shown
