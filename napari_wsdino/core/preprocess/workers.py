"""The process pool of preprocessing and the tasks its workers run.

A task is a chunk of fields: :func:`_sum_task` adds them up for a plate's mean image,
:func:`_process_task` preprocesses them and writes them straight into the cache's
memory-mapped rows. :class:`_Pool` (``spawn`` processes, one thread each, a few tasks
in flight per worker) and :class:`_Inline` (``workers <= 1``) run them alike.

Example
-------
>>> list(_Inline().run(len, [[1, 2], [3]]))
[2, 1]
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator

import numpy as np

from napari_wsdino.core.imageio import ImageReadError
from napari_wsdino.core.preprocess.field import _read_field, process_field
from napari_wsdino.core.preprocess.settings import PreprocessSettings

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



def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]

