"""The state of a cache being made: ``cache.json`` while preprocessing runs, and its end.

A cache folder is begun with every array reserved at full size (:func:`_create_state`),
each finished plate is recorded in ``cache.json`` (so a rerun resumes from the next
plate), and :func:`_finish` cuts the arrays to the rows kept and writes the index.
:func:`_open_state` checks that an existing cache matches what is asked of it.

Example
-------
>>> _describe_difference({"clip": 1.0}, {"clip": 2.0})
'clip: 1.0 in the cache, 2.0 now'
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from napari_wsdino.core.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    ILLUMINATION_DIR,
    INDEX_FILE,
    SETTINGS_FILE,
    Cache,
    array_problem,
    image_file,
    open_cache,
)
from napari_wsdino.core.fsio import atomic_write, preallocate, remove_empty_dirs
from napari_wsdino.core.metadata import DataError

if TYPE_CHECKING:
    import pandas as pd

#: Where shard runs (``preprocess(..., shard=...)``) write inside a cache folder.
SHARDS_DIR = "shards"

def _write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (a crash or a full disk leaves the old file or the new
    one, and no temporary file)."""
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(obj, indent=2))


#: Content stamps (:func:`_file_stamp`) begin with this; older caches recorded sizes and
#: modification times (:func:`_legacy_stamp`), still checked the old way.
STAMP_PREFIX = "c1:"
#: Blocks of each file a stamp reads (first, last and evenly between), and their size.
STAMP_BLOCKS, STAMP_BLOCK = 4, 4096


def _file_stamp(paths: Iterable[str]) -> str:
    """Size and a few sampled blocks of each file (missing: -1), hashed: a repaired,
    re-downloaded or edited image changes it; a moved or copied dataset (``mv``,
    ``cp -r``, ``touch``: new modification times) does not. About 16 KiB read a file."""
    h = hashlib.sha256()
    for p in paths:
        try:
            with open(p, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                h.update(f"{size}:".encode())
                if size <= STAMP_BLOCKS * STAMP_BLOCK:
                    h.update(fh.read())
                else:
                    for k in range(STAMP_BLOCKS):
                        fh.seek((size - STAMP_BLOCK) * k // (STAMP_BLOCKS - 1))
                        h.update(fh.read(STAMP_BLOCK))
        except OSError:
            h.update(b"-1")
        h.update(b";")
    return STAMP_PREFIX + h.hexdigest()[:16]


def _legacy_stamp(paths: Iterable[str]) -> str:
    """The stamp of caches made before content stamps: sizes and modification times."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(b"-1:-1;")
    return h.hexdigest()[:16]


def _stamp_matches(paths: Sequence[str], stamp: str) -> bool:
    make = _file_stamp if stamp.startswith(STAMP_PREFIX) else _legacy_stamp
    return make(paths) == stamp


def _check_files_unchanged(out: Path, state: dict, table: pd.DataFrame, channels: list[str]) -> None:
    """Refuse a cache whose finished plates were made from files that have changed
    since (recorded per plate; caches from before this check have no stamps)."""
    path_cols = [f"path_{c}" for c in channels]
    by_plate = table.groupby("plate", sort=False)
    for plate, done in state.get("plates", {}).items():
        for f in done.get("failed", []):
            if "stamp" in f and not _stamp_matches([f["path"]], f["stamp"]):
                raise DataError(
                    f"{f['path']} was left out of cache {out} as unreadable ({f['reason']}) "
                    "and has changed since: delete the cache folder and rerun to include it "
                    "(or preprocess into another --out)."
                )
        if "stamp" not in done or plate not in by_plate.groups:
            continue
        rows = by_plate.get_group(plate)
        if not _stamp_matches(rows[path_cols].astype(str).to_numpy().ravel(), done["stamp"]):
            raise DataError(
                f"Image files of plate {plate} changed (size or content) since "
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


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} in the cache, {new.get(k)!r} now"
             for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _settings_difference(state: dict, record: dict, channels: list[str]) -> str:
    """What differs between the settings of a cache's ``state`` and these ("": nothing)."""
    if state.get("settings") == record and state.get("channels") == channels:
        return ""
    return _describe_difference(dict(state.get("settings", {}), channels=state.get("channels")),
                                dict(record, channels=channels))


def _open_state(out: Path, record: dict, channels: list[str], fingerprint: str,
                shard: dict | None = None, merging: bool = False) -> dict | None:
    """The state of the cache in ``out``, checked against what is asked of it (settings,
    channels, fields, shard); ``None`` when ``out`` is new or empty (``merging``: but for
    its ``shards/``)."""
    settings_path = out / SETTINGS_FILE
    if not settings_path.exists():
        _check_no_cache_yet(out, merging)
        return None
    try:
        state = json.loads(settings_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{settings_path} is damaged ({exc}); delete {out} and rerun.") from None
    if state.get("format") != CACHE_FORMAT:
        raise DataError(f"{settings_path} is not a napari-wsdino cache; choose another --out.")
    diff = _settings_difference(state, record, channels)
    if diff:
        raise DataError(
            f"Cache {out} was made with different settings ({diff}). Preprocess into "
            "another --out folder, or delete this one to rebuild it."
        )
    if state.get("fingerprint") != fingerprint or state.get("shard") != shard:
        raise DataError(
            f"Cache {out} was made from a different set of fields (another dataset, "
            "or other plates / --drop-missing / --shard). Preprocess into another --out "
            "folder, or delete this one to rebuild it."
        )
    if not state.get("complete"):
        for ch in channels:
            if image_file(out, ch).is_file():  # a missing one is for _repair
                _reserve(image_file(out, ch))  # caches begun before files were reserved are sparse
    return state


def _damage(out: Path, state: dict, channels: list[str]) -> dict[str, str]:
    """What is wrong with the files of cache folder ``out`` that ``state`` describes,
    ``{file name: problem}`` (empty: nothing): each array checked against the rows
    ``state`` records (all reserved rows while the cache is made, the rows kept once
    complete), and a complete cache's field table against its row count. Headers only."""
    import pyarrow.parquet as pq

    h, w = state.get("shape", (0, 0))
    complete = bool(state.get("complete"))
    rows = state.get("n_fields") if complete else state.get("capacity")
    damage = {}
    for ch in channels:
        if rows is None:  # a cache from before capacities were recorded
            problem = None if image_file(out, ch).is_file() else "is missing"
        else:
            problem = array_problem(image_file(out, ch), (int(rows), int(h), int(w)))
        if problem:
            damage[image_file(out, ch).name] = problem
    if complete:
        try:
            found = pq.ParquetFile(out / INDEX_FILE).metadata.num_rows
        except FileNotFoundError:
            damage[INDEX_FILE] = "is missing"
        except Exception as exc:  # pyarrow raises its own types for a damaged file
            damage[INDEX_FILE] = f"is damaged ({type(exc).__name__})"
        else:
            if found != rows:
                damage[INDEX_FILE] = f"holds {found} rows, not {rows}"
    return damage


def _repair(out: Path, state: dict, table: pd.DataFrame, channels: list[str],
            fresh: Callable[[], dict], allow_empty: bool = False) -> tuple[dict, str]:
    """Mend cache folder ``out`` where its files do not match its ``state``
    (:func:`_damage`): a complete cache's field table alone is written again from
    ``state``; a damaged array (cut short by a copy or a full disk, another shape) means
    the arrays begin again (``fresh()``: a new state, arrays reserved) and every plate is
    computed anew, to the same bytes. Returns the state to go on with and what was
    done ("" when nothing was wrong)."""
    damage = _damage(out, state, channels)
    if not damage:
        return state, ""
    what = "; ".join(f"{name} {problem}" for name, problem in damage.items())
    if set(damage) == {INDEX_FILE} and state.get("complete"):
        _finish(out, state, table, channels, allow_empty=allow_empty)
        return state, f"repaired cache {out}: {what}; {INDEX_FILE} written again"
    n = len(state.get("plates", {}))
    return fresh(), (f"repairing cache {out}: {what}; recomputing its images "
                     f"({n} plate{'s' if n != 1 else ''} done before)")


def _check_no_cache_yet(out: Path, merging: bool) -> None:
    """Refuse a folder with other things in it (``merging``: its ``shards/`` belong)."""
    if not out.is_dir():
        return
    others = [p for p in out.iterdir() if not (merging and p.name == SHARDS_DIR)]
    if others and (out / SHARDS_DIR).is_dir() and not merging:
        raise DataError(
            f"{out} holds preprocessing shards ({SHARDS_DIR}/) and no merged cache yet: "
            f"merge them with 'wsdino preprocess DATA --out {out} --merge' (or delete "
            f"{out / SHARDS_DIR} to preprocess in one run)."
        )
    if others:
        raise DataError(
            f"{out} exists and is not a preprocessed cache (no {SETTINGS_FILE}). "
            "Give an empty or new folder to --out."
        )


def _create_state(out: Path, record: dict, channels: list[str], fingerprint: str, n: int,
                  made: Path | None = None, **extra) -> dict:
    """Begin a cache in folder ``out`` (which exists): state, illumination folder and the
    ``n``-row arrays, reserved. On failure nothing is left behind, up to folder ``made``
    (the outermost folder created for it), so a rerun starts afresh."""
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
        **extra,
    }
    try:
        (out / ILLUMINATION_DIR).mkdir(exist_ok=True)
        for ch in channels:
            arr = np.lib.format.open_memmap(image_file(out, ch), mode="w+", dtype=np.float16,
                                            shape=(n, h, w))
            del arr
            _reserve(image_file(out, ch))
        _write_json(out / SETTINGS_FILE, state)
    except BaseException:
        for ch in channels:
            image_file(out, ch).unlink(missing_ok=True)
        try:
            (out / ILLUMINATION_DIR).rmdir()
        except OSError:
            pass
        remove_empty_dirs(out, made)
        raise
    return state


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) ``.npy`` file now: a memory-mapped write to a full
    disk kills the process with SIGBUS, without a word; this fails first, with ENOSPC."""
    st = path.stat()
    if st.st_blocks * 512 < st.st_size:  # sparse still (blocks of 512 bytes, POSIX)
        preallocate(path, st.st_size)


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


def _finish(out: Path, state: dict, table: pd.DataFrame, channels: list[str],
            allow_empty: bool = False) -> Cache:
    """Cut the arrays to the rows kept, write the index, mark the cache complete
    (``allow_empty``: a shard may have no readable field; the merged cache may not)."""
    kept = [i for p in state["plates"].values() for i in p["fields"]]
    if not kept and not allow_empty:
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
