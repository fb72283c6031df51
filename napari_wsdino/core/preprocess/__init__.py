"""Preprocessing: illumination correction, resize, clip, normalise -> a cache.

Reproduces the WS-DINO preprocessing (Cross-Zamirski et al. 2022; their
CellProfiler pipelines ``BBBC021_IlluminationCalculate/Apply.cppipe`` and the
training script's data loader), per field of view and channel:

1. divide by the (plate, channel) illumination function
   (:mod:`napari_wsdino.core.illumination`);
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

The result is a :mod:`napari_wsdino.core.cache` folder. Work streams plate by
plate (a plate is read twice: once for its mean image, once to correct it; no more than a few
fields are in memory at once), spreads fields over a process pool, and records
each finished plate in ``cache.json`` so an interrupted run resumes from the next
plate and gives byte-identical files. Unreadable fields are reported with their
path, left out of the cache (every channel of that field) and listed in
``cache.json["failed"]``; the rest of the plate is processed.

Past one machine, ``preprocess(..., shard=Shard(i, n))`` does only the plates of
shard ``i`` of ``n`` (each plate's illumination functions and normalisation stay
within it) into ``out/shards/i-of-n/``; :func:`merge_shards` then makes the
same cache as one run (:mod:`.shard`; docs/cluster.md).

The work is split by job: :mod:`.settings` (what is recorded), :mod:`.field`
(one field), :mod:`.workers` (the process pool and its tasks), :mod:`.state`
(``cache.json`` while a cache is made), :mod:`.shard` (shards and their merge);
this module drives them, plate by plate.

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
import os
import shutil
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Generator

import numpy as np

from napari_wsdino.core import illumination as illum
from napari_wsdino.core.cache import (
    SETTINGS_FILE,
    Cache,
    illumination_file,
    image_file,
    open_cache,
)
from napari_wsdino.core.fsio import atomic_write, ensure_dir, first_missing_dir
from napari_wsdino.core.identity import dataset_identity
from napari_wsdino.core.metadata import CONTROL, DataError, Metadata
from napari_wsdino.core.progress import Progress, Timer
# Private names too: tests and callers of the former single module import them here.
from napari_wsdino.core.preprocess.field import (  # noqa: F401
    _probe_image,
    _read_field,
    normalise_plate_rows,
    normalize,
    plate_functions,
    process_field,
    resize,
)
from napari_wsdino.core.preprocess.settings import (
    FLOAT16_MAX,
    ILLUMINATION_METHODS,
    NORMALIZATIONS,
    RESIZE_METHOD,
    STAGE,
    PreprocessSettings,
)
from napari_wsdino.core.preprocess.state import (  # noqa: F401
    SHARDS_DIR,
    _check_files_unchanged,
    _compact,
    _create_state,
    _damage,
    _describe_difference,
    _file_stamp,
    _fingerprint,
    _finish,
    _fsync,
    _open_state,
    _repair,
    _reserve,
    _shrink_rows,
    _write_json,
)
from napari_wsdino.core.preprocess.workers import (  # noqa: F401
    _chunks,
    _exit_with_parent,
    _Inline,
    _init_worker,
    _Pool,
    _process_task,
    _sum_task,
)
from napari_wsdino.core.preprocess.shard import Shard, merge_shards, split_plates

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FLOAT16_MAX", "ILLUMINATION_METHODS", "NORMALIZATIONS", "RESIZE_METHOD", "STAGE",
    "PreprocessSettings", "Shard", "merge_shards", "normalise_plate_rows", "normalize",
    "plate_functions", "preprocess", "process_field", "resize", "split_plates", "DEFAULT_WORKERS",
]

#: Processes ``preprocess`` uses unless told (1: none, the work runs in this process).
DEFAULT_WORKERS = 2


def preprocess(
    metadata: Metadata,
    out: str | Path,
    settings: PreprocessSettings = PreprocessSettings(),
    workers: int = DEFAULT_WORKERS,
    chunk_size: int = 4,
    shard: Shard | str | None = None,
) -> Generator[Progress, None, Cache]:
    """Preprocess every field of a screen into a cache folder, plate by plate.

    Parameters
    ----------
    metadata
        The screen (:func:`~napari_wsdino.core.metadata.load_metadata`).
    out
        Cache folder: new or empty, or a cache this function started before (resumed
        if the settings and fields match, repaired where a file is damaged; refused
        otherwise).
    settings
        :class:`PreprocessSettings`.
    workers, chunk_size
        Processes (``<= 1``: this process); fields per task.
    shard
        A :class:`Shard` (or ``"I/N"``): only shard ``I`` of ``N``'s plates, into
        ``out/shards/I-of-N/``, for :func:`merge_shards` (:mod:`.shard`).

    Yields
    ------
    Progress
        ``stage="preprocess"``, ``step``/``total`` in fields; ``info`` has
        ``plate``, ``phase`` (``"repair"``, ``"mean"``, ``"illumination"``, ``"correct"``,
        ``"plate done"``, ``"done"``), ``fields_per_s``, ``eta_s`` and, for
        unreadable files, ``failed_path`` / ``reason``.

    Returns
    -------
    Cache
        The opened, complete cache (of the shard, with ``shard``): array row ``i`` is
        ``cache.table`` row ``i``; fields left out in ``cache.settings["failed"]``.

    Raises
    ------
    DataError
        ``out`` is another kind of folder, or a cache with other settings or fields;
        no image could be read; more shards than plates.

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
    record, fingerprint = settings.record(expect[0]), _fingerprint(table, channels)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    folder, plates, state = yield from _begin(out, table, channels, record, fingerprint, shard)
    capacity = int(table["plate"].isin(plates).sum())
    if state.get("complete"):
        yield Progress(STAGE, capacity, capacity, f"{folder} is already complete",
                       {"phase": "done"})
        return open_cache(folder)
    run = _Run(folder, table, channels, expect, record, settings, state, workers,
               chunk_size, capacity)
    run.pool = _Pool(workers) if workers > 1 else _Inline()
    try:
        for plate in plates:
            if plate not in state["plates"]:
                yield from _do_plate(run, plate)
    except BrokenProcessPool:
        raise _pool_died(folder) from None
    finally:
        run.pool.shutdown()
    cache = _finish(folder, state, table, channels, allow_empty=shard is not None)
    yield run.event(capacity, "", "done", f"{len(cache)} fields cached in {folder}, "
                    f"{len(cache.settings['failed'])} left out")
    return cache


def _begin(out: Path, table: pd.DataFrame, channels: list[str], record: dict, fingerprint: str,
           shard: Shard | None) -> Generator[Progress, None, tuple[Path, list, dict]]:
    """Where this run writes, its plates, and the state there: resumed (if it matches),
    begun, or begun again where its files are damaged (:func:`.state._repair`; an event
    says what was repaired). A shard of a cache already merged finds that cache complete
    (if damaged, the shard runs again, for a merge that repairs it)."""
    plates, folder, extra = list(dict.fromkeys(table["plate"])), out, {}
    if shard is not None:
        merged = _open_state(out, record, channels, fingerprint, merging=True)
        if merged is not None and merged.get("complete") and not _damage(out, merged, channels):
            return out, plates, merged
        plates = shard.plates(table)
        folder, extra = shard.folder(out), {"shard": shard.record(plates)}
    state = _open_state(folder, record, channels, fingerprint, shard=extra.get("shard"))
    capacity = int(table["plate"].isin(plates).sum())
    repair = ""
    if state is None:
        made = first_missing_dir(folder)
        ensure_dir(folder)
        state = _create_state(folder, record, channels, fingerprint, capacity, made, **extra)
    else:
        _check_files_unchanged(folder, state, table, channels)
        state, repair = _repair(
            folder, state, table, channels, allow_empty=shard is not None,
            fresh=lambda: _create_state(folder, record, channels, fingerprint, capacity, **extra))
    if repair:
        yield Progress(STAGE, 0, capacity, repair, {"phase": "repair", "repair": repair})
    # Which dataset this is (core.identity): plate/well/site names alone do not tell.
    state.setdefault("dataset_id", dataset_identity(table, channels))
    return folder, plates, state


@dataclass
class _Run:
    """What the passes over one plate share: inputs, pool, state and counters."""

    out: Path
    table: pd.DataFrame
    channels: list[str]
    expect: tuple
    record: dict
    settings: PreprocessSettings
    state: dict
    workers: int
    chunk_size: int
    total: int
    pool: object = None
    paths: np.ndarray = dataclass_field(init=False)
    plate_rows: dict = dataclass_field(init=False)
    array_files: list[str] = dataclass_field(init=False)
    done_fields: int = dataclass_field(init=False)
    next_row: int = dataclass_field(init=False)
    started: int = dataclass_field(init=False)
    timer: Timer = dataclass_field(init=False)

    def __post_init__(self) -> None:
        self.paths = self.table[[f"path_{c}" for c in self.channels]].astype(str).to_numpy()
        self.plate_rows = self.table.groupby("plate", sort=False).indices
        self.array_files = [str(image_file(self.out, c)) for c in self.channels]
        done = self.state["plates"].values()
        self.done_fields = sum(len(p["fields"]) + len(p["failed"]) for p in done)
        self.next_row = sum(len(p["fields"]) for p in done)
        self.started = self.done_fields
        self.timer = Timer(self.total - self.done_fields)

    def event(self, step: int, plate: str, phase: str, message: str, **info) -> Progress:
        done = step - self.started
        elapsed = time.perf_counter() - self.timer.start
        info.update(plate=plate, phase=phase,
                    fields_per_s=done / elapsed if elapsed > 0 and done > 0 else 0.0,
                    eta_s=self.timer.eta(done))
        return Progress(STAGE, step, self.total, message, info)

    def fail(self, failed: dict, plate: str, field_id: int, path: str, reason: str) -> Progress:
        """Record an unreadable field of ``plate`` in ``failed``; the event that says so."""
        row = self.table.iloc[field_id]
        failed[field_id] = {"plate": str(row.plate), "well": str(row.well),
                            "site": int(row.site), "path": path, "reason": reason,
                            "stamp": _file_stamp([path])}
        return self.event(self.done_fields, plate, "failed",
                          f"unreadable, field left out: {path} ({reason})",
                          failed_path=path, reason=reason)


def _do_plate(run: _Run, plate: str) -> Generator[Progress, None, None]:
    """Mean image, illumination functions, corrected rows; then record the plate."""
    ids = [int(i) for i in run.plate_rows[plate]]
    failed: dict[int, dict] = {}
    acc, good = yield from _mean_pass(run, plate, ids, failed)
    function_files = yield from _illumination_pass(run, plate, acc)
    read = [i for i in ids if i in good]
    start = run.next_row
    kept = yield from _correct_pass(run, plate, read, function_files, failed)
    run.done_fields += len(ids) - len(read)  # fields that failed in pass 1
    if run.record.get("normalize") == "plate":
        table = run.table
        controls = (table.loc[kept, "compound"] == CONTROL).to_numpy() \
            if "compound" in table else None
        normalise_plate_rows(run.array_files, start, len(kept), controls)
    run.next_row = start + len(kept)
    _fsync(run.array_files)  # rows on disk before the plate is recorded as done
    run.state["plates"][plate] = {
        "start": start,
        "fields": kept,
        "failed": [failed[i] for i in sorted(failed)],
        "stamp": _file_stamp(run.paths[ids].ravel()),
    }
    _write_json(run.out / SETTINGS_FILE, run.state)
    yield run.event(run.done_fields, plate, "plate done",
                    f"{plate}: done ({len(kept)} fields, {len(failed)} left out)")


def _mean_pass(run: _Run, plate: str, ids: list[int], failed: dict):
    """Pass 1: the plate's mean image per channel (sums added in task order, so the
    mean never depends on which worker finished first). Returns ``(acc, good ids)``."""
    tasks = [(k, [(i, list(run.paths[i])) for i in chunk], run.expect)
             for k, chunk in enumerate(_chunks(ids, run.chunk_size))]
    acc = illum.MeanAccumulator()
    pending: dict[int, tuple] = {}
    next_task = 0
    good: set[int] = set()
    for index, sums, ok, bad in run.pool.run(_sum_task, tasks):
        pending[index] = (sums, len(ok))
        good.update(ok)
        for field_id, path, reason in bad:
            yield run.fail(failed, plate, field_id, path, reason)
        while next_task in pending:
            sums_k, n_k = pending.pop(next_task)
            if n_k:
                acc.add_sum(sums_k, n_k)
            next_task += 1
        yield run.event(run.done_fields, plate, "mean",
                        f"{plate}: mean image, {len(good)}/{len(ids)} fields read")
    return acc, good


def _illumination_pass(run: _Run, plate: str, acc) -> Generator[Progress, None, list[str]]:
    """The plate's illumination function per channel, saved; their files ("" = none)."""
    function_files = [""] * len(run.channels)
    if not acc.count or run.settings.illumination == "none":
        return function_files
    mean = acc.mean()
    for c, ch in enumerate(run.channels):
        fn = illum.illumination_function(
            mean[c], run.record["filter_size_scaled"], method=run.settings.illumination,
            mapper=run.pool.map, bands=2 * max(1, run.workers), borders=run.settings.borders,
        )
        path = illumination_file(run.out, plate, ch)
        with atomic_write(path) as fh:
            np.save(fh, fn)
        function_files[c] = str(path)
        yield run.event(run.done_fields, plate, "illumination",
                        f"{plate}: illumination function {ch}")
    return function_files


def _correct_pass(run: _Run, plate: str, kept: list[int], function_files: list[str],
                  failed: dict) -> Generator[Progress, None, list[int]]:
    """Pass 2: correct, resize, clip, normalise and write the rows of the fields read in
    pass 1, from row ``run.next_row`` on. Returns the fields kept (rows compacted)."""
    start = run.next_row
    row_of = {i: start + k for k, i in enumerate(kept)}
    tasks = [([(i, row_of[i], list(run.paths[i])) for i in chunk], run.expect,
              function_files, run.array_files, run.record)
             for chunk in _chunks(kept, run.chunk_size)]
    lost: set[int] = set()
    for results in run.pool.run(_process_task, tasks):
        run.done_fields += len(results)
        for field_id, _row, error in results:
            if error is not None:
                lost.add(field_id)
                yield run.fail(failed, plate, field_id, *error)
        yield run.event(run.done_fields, plate, "correct", f"{plate}: corrected")
    if lost:  # unreadable only on the second read: close the gaps
        kept = _compact(run.array_files, kept, row_of, lost, start)
    return kept


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
