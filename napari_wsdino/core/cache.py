"""The preprocessed-image cache that training and embedding read.

Layout of a cache folder::

    CACHE/cache.json            settings + format version + channels + shape
    CACHE/index.parquet         the field table (metadata columns), row i = array row i
    CACHE/images_<channel>.npy  float16 array (N, H, W), memory-mappable
    CACHE/illumination/         per (plate, channel) illumination functions (preprocessing)
    CACHE/shards/I-of-N/        shard I of N while preprocessing in shards: a cache of its
                                plates, until merged (``core.preprocess.shard``)

Arrays are written once, with ``numpy.lib.format.open_memmap``, so a cache of any
size is read without loading it into memory.

Example
-------
>>> cache = open_cache("cache/")                      # doctest: +SKIP
>>> cache.images("DAPI").shape                        # doctest: +SKIP
(3848, 512, 640)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from napari_wsdino.core.metadata import DataError

CACHE_FORMAT = "napari-wsdino-cache"
CACHE_VERSION = 1
SETTINGS_FILE = "cache.json"
INDEX_FILE = "index.parquet"
ILLUMINATION_DIR = "illumination"


def image_file(root: Path, channel: str) -> Path:
    return Path(root) / f"images_{channel}.npy"


def illumination_file(root: Path, plate: str, channel: str) -> Path:
    """Where preprocessing stores the illumination function of one (plate, channel)."""
    return Path(root) / ILLUMINATION_DIR / f"{plate}_{channel}.npy"


@dataclass
class Cache:
    """An opened cache: the field table, settings, and memory-mapped images."""

    path: Path
    settings: dict
    table: pd.DataFrame

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.settings["channels"])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.settings["shape"])

    def __len__(self) -> int:
        return len(self.table)

    def images(self, channel: str) -> np.ndarray:
        """``(N, H, W)`` float16 memory map of one channel."""
        if channel not in self.channels:
            raise DataError(
                f"Cache {self.path} has no channel {channel!r}; it holds {list(self.channels)}."
            )
        return np.load(image_file(self.path, channel), mmap_mode="r")

    def field(self, index: int, channels: tuple[str, ...] | None = None) -> np.ndarray:
        """One field as ``(C, H, W)`` float32."""
        chans = channels or self.channels
        return np.stack([np.asarray(self.images(c)[index], dtype=np.float32) for c in chans])

    def illumination(self, plate: str, channel: str) -> np.ndarray | None:
        """Illumination function (input resolution, float32) of one (plate, channel),
        or ``None`` if this cache has none (e.g. made with ``write_cache``)."""
        path = illumination_file(self.path, plate, channel)
        return np.load(path) if path.exists() else None


def open_cache(path: str | Path) -> Cache:
    """Open a preprocessed cache folder (see module docstring)."""
    path = Path(path)
    settings_path = path / SETTINGS_FILE
    if not settings_path.exists():
        raise DataError(
            f"{path} is not a preprocessed cache (no {SETTINGS_FILE}). "
            "Create one with 'wsdino preprocess DATA --out CACHE'."
        )
    settings = json.loads(settings_path.read_text())
    if settings.get("format") != CACHE_FORMAT:
        raise DataError(f"{settings_path} is not a napari-wsdino cache file.")
    if not settings.get("complete", False):
        raise DataError(
            f"Cache {path} is incomplete (preprocessing was interrupted). "
            "Rerun 'wsdino preprocess' with the same --out to resume it."
        )
    table = pd.read_parquet(path / INDEX_FILE)
    return Cache(path=path, settings=settings, table=table)


def write_cache(
    path: str | Path,
    table: pd.DataFrame,
    images: Mapping[str, np.ndarray],
    settings: Mapping | None = None,
) -> Cache:
    """Write a complete cache from in-memory arrays (small data, tests, replicas).

    Parameters
    ----------
    table
        Field table aligned with the arrays' first axis.
    images
        ``{channel: (N, H, W) array}``; stored as float16.
    settings
        Preprocessing settings to record.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = {np.shape(a) for a in images.values()}
    if len(shapes) != 1:
        raise DataError(f"Channel arrays differ in shape: {sorted(shapes)}")
    (shape,) = shapes
    if shape[0] != len(table):
        raise DataError(f"{shape[0]} images but {len(table)} table rows.")
    for ch, arr in images.items():
        np.save(image_file(path, ch), np.asarray(arr, dtype=np.float16))
    table.reset_index(drop=True).to_parquet(path / INDEX_FILE)
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "channels": list(images),
        "shape": list(shape[1:]),
        "n_fields": int(shape[0]),
        "settings": dict(settings or {}),
        "complete": True,
    }
    (path / SETTINGS_FILE).write_text(json.dumps(meta, indent=2))
    return open_cache(path)
