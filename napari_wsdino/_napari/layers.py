"""Showing one field of view as additive coloured image layers.

Shared by the reader (which returns layer-data tuples) and the plate browser
(which replaces the data of existing layers in place, so the user's zoom, layer
order and visibility survive a change of field). Only the field's own channel
files are read. The canvas shows one dataset: :func:`show_field` leaves one field
layer per channel, of the dataset it shows. Every layer records the dataset
(``source``) and field it shows in ``layer.metadata``.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
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
ATTENTION_ROLE = "attention"
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


def same_source(a: Any, b: Any) -> bool:
    """Do two dataset sources (folder or image CSV, as str or Path) name the same path?"""
    return a is not None and b is not None and Path(str(a)) == Path(str(b))


def is_field_layer(layer) -> bool:
    """A field layer this plugin made (one stain of one field)."""
    return layer.metadata.get(ROLE) == FIELD_ROLE and "channel" in layer.metadata


def field_layers(viewer: "napari.viewer.Viewer") -> dict[str, "napari.layers.Image"]:
    """The viewer's field layers by channel (layers this plugin made; the newest of a channel)."""
    return {layer.metadata["channel"]: layer for layer in viewer.layers if is_field_layer(layer)}


def remove_layers(viewer: "napari.viewer.Viewer", layers) -> None:
    """Remove ``layers`` from the viewer in one batch where napari offers one (0.9 does): its
    canvas then cleans up once (a full garbage collection) instead of once per layer."""
    layers = [layer for layer in layers if layer in viewer.layers]
    if not layers:
        return
    batch = getattr(viewer.layers, "batched_update", contextlib.nullcontext)
    with batch():
        for layer in layers:
            viewer.layers.remove(layer)


def _keepers(viewer: "napari.viewer.Viewer", channels, source: Any) -> dict[str, Any]:
    """One field layer per channel to show the new field in: ``source``'s own (File > Open
    just added them) before another dataset's, the newest first."""
    keep: dict[str, Any] = {}
    for layer in reversed(list(viewer.layers)):
        meta = layer.metadata
        if not is_field_layer(layer) or meta["channel"] not in channels:
            continue
        old = keep.get(meta["channel"])
        if old is None or (same_source(meta.get("source"), source)
                           and not same_source(old.metadata.get("source"), source)):
            keep[meta["channel"]] = layer
    return keep


def _plain_name(layer, channel: str, source: Any) -> str:
    """The channel's name for a layer taking another dataset's field; for one of the same
    dataset, its name less napari's " [1]" (added while a layer of that name was there)."""
    if same_source(layer.metadata.get("source"), source):
        return re.sub(r" \[\d+\]$", "", layer.name)
    return channel


def show_field(viewer: "napari.viewer.Viewer", metadata: Metadata, index: int,
               source: Any = None) -> list["napari.layers.Image"]:
    """Show field ``index`` with one field layer per channel, updated in place.

    The canvas shows one dataset: field layers of another source, of a channel this
    dataset lacks, or a second layer of a channel (File > Open adds "DAPI [1]" beside
    "DAPI") are removed. The layer kept per channel takes the field's data, contrast and
    metadata in place, so zoom, layer order and visibility survive; missing ones are added.
    """
    tuples = field_layer_data(metadata, index, source)  # read first: a failed read changes nothing
    source = tuples[0][1]["metadata"]["source"] if tuples else source
    keep = _keepers(viewer, metadata.channels, source)
    remove_layers(viewer, [la for la in viewer.layers
                           if is_field_layer(la) and la not in keep.values()])
    shown = []
    for data, kwargs, _ in tuples:
        channel = kwargs["metadata"]["channel"]
        layer = keep.get(channel)
        if layer is None:
            shown.append(viewer.add_image(data, **kwargs))
            continue
        name = _plain_name(layer, channel, source)
        lo, hi = kwargs["contrast_limits"]
        full = (min(float(data.min()), lo), max(float(data.max()), hi))
        layer.data = data
        layer.contrast_limits_range = full
        layer.contrast_limits = (lo, hi)
        layer.metadata = kwargs["metadata"]
        layer.name = name
        shown.append(layer)
    return shown
