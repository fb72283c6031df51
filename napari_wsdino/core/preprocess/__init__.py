"""Preprocessing: illumination correction, resize, clip, normalise -> a cache.

Reproduces the WS-DINO preprocessing (Cross-Zamirski et al. 2022; their
CellProfiler pipelines ``BBBC021_IlluminationCalculate/Apply.cppipe`` and the
training script's data loader), per field of view and channel:

1. divide by the (plate, channel) illumination function (:mod:`.illumination`);
2. resize, bicubic and anti-aliased, to ``settings.size`` (default half the
   input size, as in the paper);
3. clip at ``settings.clip`` (10,000 in the paper's code), in raw 16-bit counts
   after illumination correction: CellProfiler loads the 16-bit TIFF as counts /
   65535, divides by the function (>= 1, so values stay <= 1), and saves a
   16-bit TIFF again, i.e. ``counts / function``; the training script then sets
   pixels > 10000 to 10000. Values below 0 (bicubic overshoot) are set to 0, as
   saving to 16-bit does;
4. normalise: ``"zscore"`` (default; each image to mean 0, std 1, as the paper's
   text states), ``"paper"`` (divide by the clip value to [0, 1], what the paper's
   code does with ``albumentations.Normalize(mean=0, std=1, max_pixel_value=10000)``)
   or ``"none"`` (keep counts).

The result is a :mod:`.cache` folder. Work streams plate by plate (a plate is
read twice: once for its mean image, once to correct it; no more than a few
fields are in memory at once), spreads fields over a process pool, and records
each finished plate in ``cache.json`` so an interrupted run resumes from the next
plate and gives byte-identical files. Unreadable fields are reported with their
path, left out of the cache (every channel of that field) and listed in
``cache.json["failed"]``; the rest of the plate is processed.

Example
-------
>>> from napari_wsdino.core.metadata import load_metadata
>>> from napari_wsdino.core.progress import run_to_end
>>> meta = load_metadata("BBBC021/")                                # doctest: +SKIP
>>> cache = run_to_end(preprocess(meta, "cache/", PreprocessSettings()))  # doctest: +SKIP
>>> cache.images("DAPI").shape                                      # doctest: +SKIP
(3848, 512, 640)
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from napari_wsdino.core import illumination as illum
from napari_wsdino.core.fsio import atomic_write, ensure_dir, preallocate
from napari_wsdino.core.identity import dataset_identity
from napari_wsdino.core.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    ILLUMINATION_DIR,
    INDEX_FILE,
    SETTINGS_FILE,
    Cache,
    illumination_file,
    image_file,
    open_cache,
)
from napari_wsdino.core.imageio import ImageReadError, read_tiff
from napari_wsdino.core.metadata import CONTROL, DataError, Metadata
from napari_wsdino.core.progress import Progress, Timer

NORMALIZATIONS = ("zscore", "paper", "plate", "none")
ILLUMINATION_METHODS = ("fast", "exact", "none")
#: How the resize is done (recorded in the cache settings).
RESIZE_METHOD = "torch.nn.functional.interpolate bicubic antialias=True"
FLOAT16_MAX = float(np.finfo(np.float16).max)
STAGE = "preprocess"


@dataclass(frozen=True)
class PreprocessSettings:
    """What preprocessing does; recorded in the cache and checked on reuse.

    Parameters
    ----------
    size
        Output ``(H, W)``; ``None``: half the input size (512 x 640 for BBBC021).
    clip
        Upper clip in raw 16-bit counts after illumination correction (the paper's
        code: 10,000); ``None``: no clip.
    filter_size
        CellProfiler smoothing filter size at the 1024 x 1280 scale (the paper: 320);
        scaled by ``sqrt(H * W / (1024 * 1280))`` for other input sizes.
    normalize
        ``"zscore"`` (each image to mean 0 / std 1), ``"paper"`` (divide by ``clip``),
        ``"plate"`` (each plate's fields to mean 0 / std 1 together, per channel: keeps
        the differences between a plate's fields; the ``cpu`` demo's choice) or ``"none"``.
    illumination
        ``"fast"`` (within 1 % of exact), ``"exact"`` (slow) or ``"none"``.
    borders
        Median-filter edges of the illumination function: ``"reflect"`` (mirrored) or
        ``"in-image"`` (CellProfiler's own definition; see :mod:`.illumination`).

    Example
    -------
    >>> PreprocessSettings(size=(256, 320), clip=None).output_size((1024, 1280))
    (256, 320)
    >>> PreprocessSettings().output_size((1024, 1280))
    (512, 640)
    """

    size: tuple[int, int] | None = None
    clip: float | None = 10000.0
    filter_size: float = 320.0
    normalize: str = "zscore"
    illumination: str = "fast"
    borders: str = "reflect"

    def __post_init__(self) -> None:
        if self.size is not None:
            size = tuple(int(v) for v in self.size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be two positive integers (H, W), not {self.size!r}")
            object.__setattr__(self, "size", size)
        if self.clip is not None:
            if not float(self.clip) > 0:
                raise ValueError(f"clip must be > 0 (or None for no clip), not {self.clip!r}")
            object.__setattr__(self, "clip", float(self.clip))
        if not float(self.filter_size) > 0:
            raise ValueError(f"filter_size must be > 0, not {self.filter_size!r}")
        object.__setattr__(self, "filter_size", float(self.filter_size))
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {self.normalize!r}")
        if self.normalize == "paper" and self.clip is None:
            raise ValueError("normalize='paper' divides by the clip value: set clip")
        if self.illumination not in ILLUMINATION_METHODS:
            raise ValueError(
                f"illumination must be one of {ILLUMINATION_METHODS}, not {self.illumination!r}"
            )
        if self.borders not in illum.BORDERS:
            raise ValueError(f"borders must be one of {illum.BORDERS}, not {self.borders!r}")

    def output_size(self, input_shape: tuple[int, int]) -> tuple[int, int]:
        """The output ``(H, W)`` for inputs of ``input_shape``."""
        if self.size is not None:
            return self.size
        return (max(1, int(input_shape[0]) // 2), max(1, int(input_shape[1]) // 2))

    def scaled_filter_size(self, input_shape: tuple[int, int]) -> float:
        """Filter size in pixels of images of ``input_shape``."""
        return illum.scaled_filter_size(self.filter_size, tuple(input_shape))

    def record(self, input_shape: tuple[int, int]) -> dict:
        """JSON-able description, with everything resolved for ``input_shape``."""
        scaled = self.scaled_filter_size(input_shape)
        rec = asdict(self)
        if self.borders == "reflect":
            rec.pop("borders")  # caches made before the option existed keep matching
        rec.update(
            size=list(self.output_size(input_shape)),
            input_shape=[int(v) for v in input_shape],
            filter_size_scaled=round(scaled, 6),
            disk_radius=illum.disk_radius(scaled),
            resize=RESIZE_METHOD,
            dtype="float16",
        )
        return rec

    @classmethod
    def from_record(cls, record: dict) -> "PreprocessSettings":
        """Settings back from a cache's ``settings`` record."""
        keys = cls.__dataclass_fields__
        return cls(**{k: record[k] for k in keys if k in record})


# --------------------------------------------------------------------------- per field


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic, anti-aliased resize of ``(H, W)`` or ``(C, H, W)`` images (float32).

    Uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, about
    10x faster on a CPU than ``skimage.transform.resize(order=3, anti_aliasing=True)``
    (which blurs with a Gaussian first; torch widens the cubic kernel instead, as
    PIL does).
    """
    import torch

    arr = np.asarray(images, dtype=np.float32)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if tuple(arr.shape[-2:]) == tuple(size):
        out = arr.copy()
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr))[None]
        out = torch.nn.functional.interpolate(
            t, size=tuple(int(v) for v in size), mode="bicubic", antialias=True,
            align_corners=False,
        )[0].numpy()
    return out[0] if squeeze else out


def normalize(image: np.ndarray, method: str = "zscore", clip: float | None = None) -> np.ndarray:
    """Normalise one 2-D image (float32); see :class:`PreprocessSettings`.

    >>> z = normalize(np.array([[1.0, 3.0]]), "zscore")
    >>> z.tolist()
    [[-1.0, 1.0]]
    """
    image = np.asarray(image, dtype=np.float32)
    if method == "zscore":
        mean = float(image.mean(dtype=np.float64))
        std = float(image.std(dtype=np.float64))
        out = image - np.float32(mean)
        if std > 0:
            out /= np.float32(std)
        return out
    if method == "paper":
        if clip is None:
            raise ValueError("normalize='paper' needs the clip value")
        return image / np.float32(clip)
    if method in ("none", "plate"):  # "plate" is applied to the plate's rows afterwards
        return image
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {method!r}")


def normalise_plate_rows(array_files: Sequence[str], start: int, n: int,
                         controls: np.ndarray | None = None) -> None:
    """``normalize="plate"``: standardise one plate's cached rows, per channel, by the
    mean and standard deviation of the plate's control (DMSO) fields — of all its fields
    when it has none (``controls``: booleans over the ``n`` rows).

    Unlike a per-image z-score this keeps what differs between the fields of a plate
    (a treatment's brighter, larger or fewer nuclei) and removes what differs between
    plates (a week's stain level): the standard per-plate normalisation of profiling.
    Controls, not the whole plate, set the scale, so a plate's mix of treatments does not.
    """
    if n <= 0:
        return
    use = None if controls is None or not np.any(controls) else np.asarray(controls, bool)
    for path in array_files:
        arr = np.load(path, mmap_mode="r+")
        rows = np.asarray(arr[start:start + n], dtype=np.float64)
        ref = rows if use is None else rows[use]
        mean, std = ref.mean(), ref.std()
        arr[start:start + n] = ((rows - mean) / (std if std > 0 else 1.0)).astype(arr.dtype)
        arr.flush()
        del arr


def process_field(
    raw: np.ndarray,
    functions: Sequence[np.ndarray | None] | np.ndarray | None,
    settings: PreprocessSettings = PreprocessSettings(),
) -> np.ndarray:
    """Preprocess one field: correct, resize, clip, normalise.

    Parameters
    ----------
    raw
        ``(C, H, W)`` raw images of one field (any dtype; counts).
    functions
        The plate's illumination function per channel (``(C, H, W)`` or a list with
        ``None`` for no correction), or ``None``.
    settings
        :class:`PreprocessSettings`.

    Returns
    -------
    ``(C, h, w)`` float32, the values the cache stores (before float16).

    Example
    -------
    >>> raw = np.full((1, 8, 10), 20000, np.uint16)
    >>> out = process_field(raw, None, PreprocessSettings(normalize="paper"))
    >>> out.shape, float(out.max())
    ((1, 4, 5), 1.0)
    """
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if functions is None:
        functions = [None] * raw.shape[0]
    # illumination.correct, written into one (C, H, W) buffer (no temporaries).
    corrected = np.empty(raw.shape, dtype=np.float32)
    for c in range(raw.shape[0]):
        if functions[c] is None:
            corrected[c] = raw[c]
        else:
            if np.shape(functions[c]) != raw.shape[1:]:
                raise ValueError(f"illumination function shape {np.shape(functions[c])} "
                                 f"!= image shape {raw.shape[1:]}")
            np.divide(raw[c], np.asarray(functions[c], dtype=np.float32), out=corrected[c])
    small = resize(corrected, settings.output_size(raw.shape[-2:]))
    hi = settings.clip if settings.clip is not None else FLOAT16_MAX
    np.clip(small, 0.0, hi, out=small)
    return np.stack([normalize(im, settings.normalize, settings.clip) for im in small])


def plate_functions(
    metadata: Metadata,
    plate: str,
    settings: PreprocessSettings = PreprocessSettings(),
    cache: Cache | None = None,
) -> dict[str, np.ndarray | None]:
    """Illumination function of each channel of one plate, for display or
    :func:`process_field`.

    Taken from ``cache`` when it holds them, else computed from the plate's TIFFs
    (unreadable files skipped), exactly as :func:`preprocess` does.

    Example
    -------
    >>> fns = plate_functions(meta, meta.table.plate.iloc[0])        # doctest: +SKIP
    >>> raw = read_field([meta.table.loc[0, f"path_{c}"] for c in meta.channels])  # doctest: +SKIP
    >>> shown = process_field(raw, list(fns.values()), PreprocessSettings())  # doctest: +SKIP
    """
    channels = list(metadata.channels)
    if cache is not None:
        stored = {c: cache.illumination(plate, c) for c in channels}
        if all(v is not None for v in stored.values()):
            return stored
    if settings.illumination == "none":
        return {c: None for c in channels}
    rows = metadata.table[metadata.table["plate"] == plate]
    if rows.empty:
        raise DataError(f"No fields of plate {plate!r} in this dataset.")
    # As in preprocess: a field counts only if all its channels read, at the screen's size.
    expect = _probe_image(metadata.table, channels)
    shape = expect[0]
    acc = illum.MeanAccumulator()
    for paths in rows[[f"path_{c}" for c in channels]].astype(str).to_numpy():
        try:
            acc.add(_read_field(list(paths), expect))
        except ImageReadError:
            continue
    if acc.count == 0:
        return {c: None for c in channels}
    mean = acc.mean()
    size = settings.scaled_filter_size(shape)
    return {c: illum.illumination_function(mean[k], size, method=settings.illumination,
                                           borders=settings.borders)
            for k, c in enumerate(channels)}


# --------------------------------------------------------------------------- workers


def _init_worker(parent: int | None = None) -> None:
    """Pool initialiser: one thread per process (the pool is the parallelism), and an
    end with the parent: a SIGKILLed parent runs no cleanup, and its workers (hundreds
    of MB each) would otherwise live on as orphans."""
    import torch

    torch.set_num_threads(1)
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Poll until this process is re-parented (its parent died), then exit at once."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def _read_field(paths: Sequence[str], expect: tuple) -> np.ndarray:
    """Read one field's channels; each must have the screen's ``(shape, dtype)``
    (``expect``, from :func:`_probe_image`): a float or 8-bit file among 16-bit ones
    would skew its whole plate's illumination function."""
    shape, dtype = expect
    planes = []
    for p in paths:
        img = read_tiff(p)
        if img.shape != tuple(shape):
            raise ImageReadError(p, f"image is {img.shape[0]}x{img.shape[1]}, "
                                    f"the screen's images are {shape[0]}x{shape[1]}")
        if dtype is not None and img.dtype != np.dtype(dtype):
            raise ImageReadError(p, f"pixels are {img.dtype}, the screen's images are "
                                    f"{np.dtype(dtype)}; re-export it as {np.dtype(dtype)}")
        planes.append(img)
    return np.stack(planes)


def _sum_task(task: tuple) -> tuple:
    """Worker: sum of a chunk of fields, per channel; unreadable fields reported."""
    index, fields, expect = task
    total = None
    good, bad = [], []
    for field_id, paths in fields:
        try:
            img = _read_field(paths, expect)
        except ImageReadError as exc:
            bad.append((field_id, str(exc.path), exc.reason))
            continue
        if total is None:
            # float32 holds sums of a few 16-bit images exactly (< 2**24).
            small = img.dtype.itemsize <= 2 and len(fields) <= 256
            total = np.zeros(img.shape, dtype=np.float32 if small else np.float64)
        total += img
        good.append(field_id)
    return index, total, good, bad


def _process_task(task: tuple) -> list:
    """Worker: preprocess a chunk of fields and write them into the cache rows."""
    fields, expect, function_files, array_files, settings_record = task
    settings = PreprocessSettings.from_record(settings_record)
    functions = [np.load(f) if f else None for f in function_files]
    arrays = [np.load(f, mmap_mode="r+") for f in array_files]
    results = []
    for field_id, row, paths in fields:
        try:
            raw = _read_field(paths, expect)
        except ImageReadError as exc:
            results.append((field_id, row, (str(exc.path), exc.reason)))
            continue
        out = process_field(raw, functions, settings)
        for c, arr in enumerate(arrays):
            arr[row] = out[c]
        results.append((field_id, row, None))
    # No msync here: the pages are shared; the driver fsyncs once per plate.
    del arrays
    return results


class _Inline:
    """Runs tasks in this process, one at a time (``workers <= 1``)."""

    map = staticmethod(map)

    def run(self, fn: Callable, tasks: Iterable) -> Iterator:
        for task in tasks:
            yield fn(task)

    def shutdown(self) -> None:
        pass


class _Pool:
    """A process pool that yields task results as they finish."""

    def __init__(self, workers: int):
        self.workers = workers
        # "spawn": safe when the caller has threads (napari's thread workers, torch).
        self.executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )
        self.map = self.executor.map

    def run(self, fn: Callable, tasks: Iterable) -> Iterator:
        # A few tasks in flight per worker, and no reference kept to a finished
        # future: results (a chunk's sums are tens of MB) are freed once consumed.
        todo = iter(tasks)
        pending: set = set()
        try:
            while True:
                while len(pending) < 2 * self.workers:
                    task = next(todo, None)
                    if task is None:
                        break
                    pending.add(self.executor.submit(fn, task))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    result = fut.result()
                    del fut
                    yield result
                del done
        finally:
            for fut in pending:
                fut.cancel()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- cache state


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (a crash or a full disk leaves the old file or the new
    one, and no temporary file)."""
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(obj, indent=2))


def _file_stamp(paths: Iterable[str]) -> str:
    """Size and modification time of files (missing: -1), hashed: a repaired,
    re-downloaded or edited image changes it, a moved dataset (``mv``) does not."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(b"-1:-1;")
    return h.hexdigest()[:16]


def _check_files_unchanged(out: Path, state: dict, table: pd.DataFrame, channels: list[str]) -> None:
    """Refuse a cache whose finished plates were made from files that have changed
    since (recorded per plate; caches from before this check have no stamps)."""
    path_cols = [f"path_{c}" for c in channels]
    by_plate = table.groupby("plate", sort=False)
    for plate, done in state.get("plates", {}).items():
        for f in done.get("failed", []):
            if "stamp" in f and _file_stamp([f["path"]]) != f["stamp"]:
                raise DataError(
                    f"{f['path']} was left out of cache {out} as unreadable ({f['reason']}) "
                    "and has changed since: delete the cache folder and rerun to include it "
                    "(or preprocess into another --out)."
                )
        if "stamp" not in done or plate not in by_plate.groups:
            continue
        rows = by_plate.get_group(plate)
        if _file_stamp(rows[path_cols].astype(str).to_numpy().ravel()) != done["stamp"]:
            raise DataError(
                f"Image files of plate {plate} changed (size or modification time) since "
                f"cache {out} was made: delete the cache folder and rerun to rebuild it "
                "(or preprocess into another --out)."
            )


def _fingerprint(table: pd.DataFrame, channels: Sequence[str]) -> str:
    """Identity of the field list (not the file locations: data may move)."""
    cols = ["plate", "well", "site", "compound", "concentration"]
    text = table[cols].to_csv(index=False) + "|" + ",".join(channels)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shrink_rows(path: Path, n_rows: int) -> None:
    """Cut an ``.npy`` file to its first ``n_rows`` rows, in place (header rewritten
    at the same length, data truncated)."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        data_start = f.tell()
        if n_rows == shape[0]:
            return
        new_shape = (int(n_rows),) + tuple(shape[1:])
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype),
                       "fortran_order": fortran, "shape": new_shape})
        prefix = 8 + (2 if version == (1, 0) else 4)
        room = data_start - prefix
        header = header.ljust(room - 1) + "\n"
        f.seek(prefix)
        f.write(header.encode("latin1"))
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.truncate(data_start + n_rows * row_bytes)


def _probe_image(table: pd.DataFrame, channels: Sequence[str]) -> tuple:
    """The screen's image ``(shape, dtype name)``: the commonest among the first
    TIFF headers (of every channel) that can be read, so one odd file among them
    does not set the standard."""
    import tifffile
    from collections import Counter

    tried, seen = [], Counter()
    heads = [p for col in (f"path_{c}" for c in channels) for p in table[col].head(7)]
    for path in heads:
        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                shape, dtype = tuple(int(v) for v in page.shape), np.dtype(page.dtype).name
        except Exception as exc:  # noqa: BLE001 - any unreadable header: try the next
            tried.append(f"{path} ({type(exc).__name__})")
            continue
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) == 2:
            seen[(shape, dtype)] += 1
        else:
            tried.append(f"{path} (shape {shape})")
    if seen:
        return seen.most_common(1)[0][0]
    raise DataError(
        "Cannot find the image size: none of the first images could be read, e.g. "
        + "; ".join(tried[:3]) + ". Check the dataset with 'wsdino info DATA'."
    )


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} in the cache, {new.get(k)!r} now"
             for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _start_state(
    out: Path, record: dict, channels: list[str], fingerprint: str, n: int
) -> dict:
    """Open the state of an existing cache (checking it matches) or create a new one."""
    settings_path = out / SETTINGS_FILE
    if settings_path.exists():
        try:
            state = json.loads(settings_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{settings_path} is damaged ({exc}); delete {out} and rerun.") from None
        if state.get("format") != CACHE_FORMAT:
            raise DataError(f"{settings_path} is not a napari-wsdino cache; choose another --out.")
        if state.get("settings") != record or state.get("channels") != channels:
            diff = _describe_difference(
                dict(state.get("settings", {}), channels=state.get("channels")),
                dict(record, channels=channels),
            )
            raise DataError(
                f"Cache {out} was made with different settings ({diff}). Preprocess into "
                "another --out folder, or delete this one to rebuild it."
            )
        if state.get("fingerprint") != fingerprint:
            raise DataError(
                f"Cache {out} was made from a different set of fields (another dataset, "
                "or other plates / --drop-missing). Preprocess into another --out folder, "
                "or delete this one to rebuild it."
            )
        if not state.get("complete"):
            for ch in channels:
                arr = image_file(out, ch)
                if not arr.exists():
                    raise DataError(f"Incomplete cache {out} lacks {arr.name}; delete {out} and rerun.")
                _reserve(arr)  # caches begun before files were reserved are sparse
        return state
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"{out} exists and is not a preprocessed cache (no {SETTINGS_FILE}). "
            "Give an empty or new folder to --out."
        )
    new_folder = not out.exists()
    ensure_dir(out)
    h, w = record["size"]
    state = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "channels": channels,
        "shape": [h, w],
        "n_fields": 0,
        "settings": record,
        "complete": False,
        "fingerprint": fingerprint,
        "capacity": n,
        "plates": {},
        "failed": [],
    }
    try:
        (out / ILLUMINATION_DIR).mkdir(exist_ok=True)
        for ch in channels:
            arr = np.lib.format.open_memmap(image_file(out, ch), mode="w+", dtype=np.float16,
                                            shape=(n, h, w))
            del arr
            _reserve(image_file(out, ch))
        _write_json(settings_path, state)
    except BaseException:
        # Nothing is computed yet: leave the folder as it was, so a rerun starts afresh.
        for ch in channels:
            image_file(out, ch).unlink(missing_ok=True)
        for folder in (out / ILLUMINATION_DIR, out) if new_folder else (out / ILLUMINATION_DIR,):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return state


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) ``.npy`` file now: a memory-mapped write to a full
    disk kills the process with SIGBUS, without a word; this fails first, with ENOSPC."""
    st = path.stat()
    if st.st_blocks * 512 < st.st_size:  # sparse still (blocks of 512 bytes, POSIX)
        preallocate(path, st.st_size)


def _pool_died(out: Path) -> Exception:
    """The error for a worker pool whose process died: the disk if it is full (a
    worker's own error would have come back as an exception), else the likely cause."""
    try:
        full = shutil.disk_usage(out).free < 64 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
    return DataError(
        "A preprocessing worker process died abruptly (killed, e.g. out of memory); the "
        "plates finished so far are kept: rerun with the same --out and fewer --workers "
        "(1: no subprocesses) to resume."
    )


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --------------------------------------------------------------------------- driver


def preprocess(
    metadata: Metadata,
    out: str | Path,
    settings: PreprocessSettings = PreprocessSettings(),
    workers: int = 2,
    chunk_size: int = 4,
) -> Generator[Progress, None, Cache]:
    """Preprocess every field of a screen into a cache folder, plate by plate.

    Parameters
    ----------
    metadata
        The screen (:func:`~napari_wsdino.core.metadata.load_metadata`).
    out
        Cache folder: new or empty, or a cache this function started before
        (resumed if the settings and fields match; refused otherwise).
    settings
        :class:`PreprocessSettings`.
    workers
        Processes; ``<= 1`` works in this process.
    chunk_size
        Fields per task.

    Yields
    ------
    Progress
        ``stage="preprocess"``, ``step``/``total`` in fields; ``info`` has
        ``plate``, ``phase`` (``"mean"``, ``"illumination"``, ``"correct"``,
        ``"plate done"``, ``"done"``), ``fields_per_s``, ``eta_s`` and, for
        unreadable files, ``failed_path`` / ``reason``.

    Returns
    -------
    Cache
        The opened, complete cache; row ``i`` of every array is row ``i`` of
        ``cache.table``. Fields left out are listed in ``cache.settings["failed"]``.

    Raises
    ------
    DataError
        ``out`` is another kind of folder, or a cache with other settings or fields;
        no image could be read.

    Example
    -------
    >>> cache = run_to_end(preprocess(meta, "cache/"), print)  # doctest: +SKIP
    """
    out = Path(out)
    table = metadata.table.reset_index(drop=True)
    channels = list(metadata.channels)
    if len(table) == 0:
        raise DataError("The dataset has no fields to preprocess.")
    expect = _probe_image(table, channels)
    shape = expect[0]
    record = settings.record(shape)
    state = _start_state(out, record, channels, _fingerprint(table, channels), len(table))
    _check_files_unchanged(out, state, table, channels)
    # Which dataset this is (core.identity): plate/well/site names alone do not tell.
    state.setdefault("dataset_id", dataset_identity(table, channels))
    total = len(table)
    if state.get("complete"):
        yield Progress(STAGE, total, total, f"{out} is already complete", {"phase": "done"})
        return open_cache(out)

    plates = list(dict.fromkeys(table["plate"]))
    path_cols = [f"path_{c}" for c in channels]
    paths = table[path_cols].astype(str).to_numpy()
    plate_rows = table.groupby("plate", sort=False).indices
    done_fields = sum(
        len(p["fields"]) + len(p["failed"]) for p in state["plates"].values()
    )
    next_row = sum(len(p["fields"]) for p in state["plates"].values())
    array_files = [str(image_file(out, c)) for c in channels]
    radius_filter = record["filter_size_scaled"]
    timer = Timer(total - done_fields)
    started = done_fields

    def event(step: int, plate: str, phase: str, message: str, **info) -> Progress:
        done = step - started
        elapsed = time.perf_counter() - timer.start
        info.update(plate=plate, phase=phase,
                    fields_per_s=done / elapsed if elapsed > 0 and done > 0 else 0.0,
                    eta_s=timer.eta(done))
        return Progress(STAGE, step, total, message, info)

    pool = _Pool(workers) if workers > 1 else _Inline()
    try:
        for plate in plates:
            if plate in state["plates"]:
                continue
            ids = [int(i) for i in plate_rows[plate]]
            failed: dict[int, dict] = {}

            def fail(field_id: int, path: str, reason: str) -> Progress:
                row = table.iloc[field_id]
                failed[field_id] = {"plate": str(row.plate), "well": str(row.well),
                                    "site": int(row.site), "path": path, "reason": reason,
                                    "stamp": _file_stamp([path])}
                return event(done_fields, plate, "failed",
                             f"unreadable, field left out: {path} ({reason})",
                             failed_path=path, reason=reason)

            # Pass 1: the plate's mean image per channel (sums added in task order,
            # so the mean never depends on which worker finished first).
            tasks = [(k, [(i, list(paths[i])) for i in chunk], expect)
                     for k, chunk in enumerate(_chunks(ids, chunk_size))]
            acc = illum.MeanAccumulator()
            pending: dict[int, tuple] = {}
            next_task = 0
            good: set[int] = set()
            for index, sums, ok, bad in pool.run(_sum_task, tasks):
                pending[index] = (sums, len(ok))
                good.update(ok)
                for field_id, path, reason in bad:
                    yield fail(field_id, path, reason)
                while next_task in pending:
                    sums_k, n_k = pending.pop(next_task)
                    if n_k:
                        acc.add_sum(sums_k, n_k)
                    next_task += 1
                yield event(done_fields, plate, "mean",
                            f"{plate}: mean image, {len(good)}/{len(ids)} fields read")

            # Illumination function per channel.
            function_files = [""] * len(channels)
            if acc.count and settings.illumination != "none":
                mean = acc.mean()
                for c, ch in enumerate(channels):
                    fn = illum.illumination_function(
                        mean[c], radius_filter, method=settings.illumination,
                        mapper=pool.map, bands=2 * max(1, workers), borders=settings.borders,
                    )
                    path = illumination_file(out, plate, ch)
                    with atomic_write(path) as fh:
                        np.save(fh, fn)
                    function_files[c] = str(path)
                    yield event(done_fields, plate, "illumination",
                                f"{plate}: illumination function {ch}")

            # Pass 2: correct, resize, clip, normalise, write rows.
            kept = [i for i in ids if i in good]
            start = next_row
            row_of = {i: start + k for k, i in enumerate(kept)}
            tasks = [([(i, row_of[i], list(paths[i])) for i in chunk], expect,
                      function_files, array_files, record)
                     for chunk in _chunks(kept, chunk_size)]
            lost: set[int] = set()
            for results in pool.run(_process_task, tasks):
                done_fields += len(results)
                for field_id, _row, error in results:
                    if error is not None:
                        lost.add(field_id)
                        yield fail(field_id, *error)
                yield event(done_fields, plate, "correct", f"{plate}: corrected")
            done_fields += len(ids) - len(kept)  # fields that failed in pass 1
            if lost:  # unreadable only on the second read: close the gaps
                kept = _compact(array_files, kept, row_of, lost, start)
            if record.get("normalize") == "plate":
                controls = (table.loc[kept, "compound"] == CONTROL).to_numpy() \
                    if "compound" in table else None
                normalise_plate_rows(array_files, start, len(kept), controls)
            next_row = start + len(kept)
            _fsync(array_files)  # rows on disk before the plate is recorded as done
            state["plates"][plate] = {
                "start": start,
                "fields": kept,
                "failed": [failed[i] for i in sorted(failed)],
                "stamp": _file_stamp(paths[ids].ravel()),
            }
            _write_json(out / SETTINGS_FILE, state)
            yield event(done_fields, plate, "plate done",
                        f"{plate}: done ({len(kept)} fields, {len(failed)} left out)")
    except BrokenProcessPool:
        raise _pool_died(out) from None
    finally:
        pool.shutdown()

    cache = _finish(out, state, table, channels)
    n_failed = len(cache.settings["failed"])
    yield event(total, "", "done",
                f"{len(cache)} fields cached in {out}, {n_failed} left out")
    return cache


def _fsync(files: list[str]) -> None:
    for name in files:
        fd = os.open(name, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _compact(array_files: list[str], kept: list[int], row_of: dict, lost: set, start: int) -> list[int]:
    survivors = [i for i in kept if i not in lost]
    arrays = [np.load(f, mmap_mode="r+") for f in array_files]
    for k, field_id in enumerate(survivors):
        src, dst = row_of[field_id], start + k
        if src != dst:
            for arr in arrays:
                arr[dst] = arr[src]
    del arrays
    return survivors


def _finish(out: Path, state: dict, table: pd.DataFrame, channels: list[str]) -> Cache:
    kept = [i for p in state["plates"].values() for i in p["fields"]]
    if not kept:
        raise DataError(
            f"No field could be read ({len(table)} tried); see the reported paths. "
            "Check the dataset with 'wsdino info DATA'."
        )
    for ch in channels:
        _shrink_rows(image_file(out, ch), len(kept))
    with atomic_write(out / INDEX_FILE) as fh:
        table.iloc[kept].reset_index(drop=True).to_parquet(fh)
    state["failed"] = [f for p in state["plates"].values() for f in p["failed"]]
    state["n_fields"] = len(kept)
    state["complete"] = True
    _write_json(out / SETTINGS_FILE, state)
    return open_cache(out)
