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
from typing import TYPE_CHECKING, Mapping

import numpy as np

from napari_wsdino.core.fsio import atomic_path, atomic_write_text
from napari_wsdino.core.metadata import DataError

if TYPE_CHECKING:
    import pandas as pd

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
    """Open a preprocessed cache folder (see module docstring).

    Every file is checked first: ``cache.json`` must parse, ``index.parquet`` exist and
    read, and each ``images_<channel>.npy`` hold the ``(N, H, W)`` float16 array that
    ``cache.json`` and the index describe, all of its bytes present (:func:`array_problem`),
    so that a damaged cache is one message naming the file and the repair, not a
    memory-map error deep in training or embedding.
    """
    path = Path(path)
    settings_path = path / SETTINGS_FILE
    rebuild = f"delete {path} and rerun 'wsdino preprocess DATA --out {path}' to rebuild it"
    # preprocess mends damaged arrays and a damaged field table in place (it reads cache.json)
    repair = (f"rerun 'wsdino preprocess DATA --out {path}' (with the options it was made "
              "with) to repair it")
    if not settings_path.exists():
        raise DataError(
            f"{path} is not a preprocessed cache (no {SETTINGS_FILE}). "
            "Create one with 'wsdino preprocess DATA --out CACHE'."
        )
    try:
        settings = json.loads(settings_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{settings_path} is damaged (not valid JSON: {exc}): {rebuild}.") from None
    if not isinstance(settings, dict) or settings.get("format") != CACHE_FORMAT:
        raise DataError(f"{settings_path} is not a napari-wsdino cache file.")
    if not settings.get("complete", False):
        raise DataError(
            f"Cache {path} is incomplete (preprocessing was interrupted). "
            "Rerun 'wsdino preprocess' with the same --out to resume it."
        )
    index = path / INDEX_FILE
    if not index.exists():
        raise DataError(f"Cache {path} lacks its field table {INDEX_FILE}: {repair}.")
    import pandas as pd  # here, not above: the Train panel asks before a cache is chosen

    try:
        table = pd.read_parquet(index)
    except Exception as exc:  # pyarrow raises its own types for a damaged file
        raise DataError(f"{index} is damaged ({type(exc).__name__}: {exc}): {repair}.") from None
    try:
        shape = (len(table), *(int(n) for n in settings["shape"]))
        channels = [str(c) for c in settings["channels"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{settings_path} lacks the channels or image shape: {rebuild}.") from None
    for ch in channels:
        problem = array_problem(image_file(path, ch), shape)
        if problem:
            raise DataError(f"{image_file(path, ch)} {problem}: {repair}.")
    return Cache(path=path, settings=settings, table=table)


def array_problem(path: str | Path, shape: tuple[int, ...], dtype=np.float16) -> str | None:
    """What is wrong with the ``.npy`` file ``path`` that should hold a ``shape`` array of
    ``dtype``: missing, not an array file, another shape or type, or fewer bytes than
    its header promises (a copy or a disk that gave out); ``None`` when it is whole.
    Reads the header only.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.npy"
    >>> np.save(f, np.zeros((2, 3), np.float16))
    >>> array_problem(f, (2, 3)) is None, array_problem(f, (4, 3))
    (True, 'holds an array of shape (2, 3), not (4, 3) as the cache records')
    """
    path = Path(path)
    if not path.is_file():
        return "is missing"
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            found, _, found_dtype = read(fh)
            offset = fh.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        return f"is not a readable .npy array ({exc})"
    if tuple(found) != tuple(shape):
        return (f"holds an array of shape {tuple(found)}, not {tuple(shape)} as the cache "
                "records")
    if found_dtype != np.dtype(dtype):
        return f"holds {found_dtype} values, not {np.dtype(dtype)}"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    return None


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
        with atomic_path(image_file(path, ch)) as tmp:
            np.save(tmp, np.asarray(arr, dtype=np.float16))
    with atomic_path(path / INDEX_FILE) as tmp:
        table.reset_index(drop=True).to_parquet(tmp)
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "channels": list(images),
        "shape": list(shape[1:]),
        "n_fields": int(shape[0]),
        "settings": dict(settings or {}),
        "complete": True,
    }
    atomic_write_text(path / SETTINGS_FILE, json.dumps(meta, indent=2))  # last: complete
    return open_cache(path)
