"""The one module that runs core generators in napari thread workers.

Core work is a generator yielding :class:`~napari_wsdino.core.progress.Progress`
and returning its result (see ``core.progress``). :func:`start_worker` runs such a
generator in a ``napari.qt.threading`` worker, shows napari's progress bar (with
the event's message as its description), routes errors to a visible notification
and, when the user stops the worker, closes the core generator *in the worker
thread* so that its ``finally`` blocks (e.g. writing a last checkpoint) run off the
GUI thread.

Widgets pass arrays, paths and configs into the generator — never widgets or layers.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, Generator

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error

from napari_wsdino.core.fsio import describe_os_error
from napari_wsdino.core.progress import Progress


class ClosingGeneratorWorker(GeneratorWorker):
    """A generator worker that closes its generator when it is quit.

    napari's worker just stops iterating on ``quit()``; closing the generator
    raises ``GeneratorExit`` at the core's current ``yield`` so its cleanup runs
    (in this thread, before ``finished`` is emitted).
    """

    def work(self):  # noqa: D102 - Qt entry point
        try:
            return super().work()
        finally:
            if self.abort_requested:
                self._gen.close()


class DiskError(OSError):
    """A file-system failure of a background task, worded as path, cause and fix."""


#: How much lower than the GUI thread a worker runs (Linux nice steps).
WORKER_NICENESS = 5
_GUI_NICE = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0


def yield_cpu_to_gui() -> None:
    """Run the calling worker thread, and the threads it starts, below the GUI thread.

    On a machine with few cores, training or embedding fills every core (torch's OpenMP
    threads, started by the worker thread, inherit its priority) and the GUI thread,
    which needs a few ms now and then, waits its turn behind them: the window stutters.
    Linux gives each thread its own nice value; the worker takes the GUI thread's plus
    ``WORKER_NICENESS`` (an absolute value: a pooled thread reused by the next task does
    not sink further). Elsewhere, or when refused, nothing changes. Only work that
    competes with the GUI slows down; an idle GUI leaves the worker every core.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       min(19, _GUI_NICE + WORKER_NICENESS))
    except OSError:
        pass


def _drive(gen: Generator[Progress, Any, Any]):
    """Re-yield a core generator so that napari sees a generator function (below the GUI)."""
    yield_cpu_to_gui()
    return (yield from gen)


class ProgressBar:
    """napari's progress bar fed by :class:`Progress` events (main thread only)."""

    def __init__(self, desc: str):
        self.desc = desc
        self._bar: napari_progress | None = None

    def update(self, event: Progress) -> None:
        if self._bar is None:
            self._bar = napari_progress(total=event.total or 0, desc=self.desc)
        bar = self._bar
        if event.total and bar.total != event.total:
            bar.total = event.total
        bar.n = min(int(event.step), int(event.total)) if event.total else int(event.step)
        text = f"{self.desc}: {event.message}" if event.message else self.desc
        # tqdm's set_description appends ": "; set the text as is and tell napari's bar.
        bar.set_description_str(text, refresh=False)
        bar.events.description(value=text)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def start_worker(
    gen: Generator[Progress, Any, Any],
    on_progress: Callable[[Progress], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    *,
    on_stopped: Callable[[], None] | None = None,
    desc: str = "WS-DINO",
    progress_bar: bool = True,
    owner=None,
) -> ClosingGeneratorWorker:
    """Run a core progress generator in a thread worker and start it.

    Parameters
    ----------
    gen
        A started-or-not core generator (``core.preprocess.preprocess(...)`` etc.).
    on_progress
        Called in the GUI thread with each :class:`Progress` event.
    on_done
        Called in the GUI thread with the generator's return value.
    on_error
        Called in the GUI thread with the exception, after the error notification
        (``napari.utils.notifications.show_error`` with the exception's message).
    on_stopped
        Called in the GUI thread after ``worker.quit()`` took effect.
    desc
        Label of napari's progress bar.
    progress_bar
        Show napari's progress bar.
    owner
        The widget that started the work: when it is destroyed (dock closed), the
        worker is stopped and the callbacks, which would touch deleted Qt objects,
        are no longer called.

    Returns
    -------
    ClosingGeneratorWorker
        Call ``quit()`` on it to stop at the core's next ``yield``.
    """
    worker = create_worker(
        _drive, gen, _worker_class=ClosingGeneratorWorker, _ignore_errors=True,
        _start_thread=False,
    )
    bar = ProgressBar(desc) if progress_bar else None
    alive = [True]

    def _yielded(event):
        if isinstance(event, Progress):
            if bar is not None:
                bar.update(event)
            if on_progress is not None and alive[0]:
                on_progress(event)

    def _errored(exc):
        # A full, read-only or missing disk reads as the one line the CLI prints too
        # (path, cause, fix); the dock's own handler gets that line as the exception's text.
        described = describe_os_error(exc)
        if described is not None:
            exc = DiskError(described)
        show_error(f"{desc} failed: {exc}")
        if on_error is not None and alive[0]:
            on_error(exc)

    def _guard(callback):
        return lambda *args: callback(*args) if alive[0] else None

    worker.yielded.connect(_yielded)
    worker.errored.connect(_errored)
    if on_done is not None:
        worker.returned.connect(_guard(on_done))
    if on_stopped is not None:
        worker.aborted.connect(_guard(on_stopped))
    if owner is not None:
        def _owner_gone(*_):
            alive[0] = False
            worker.quit()

        owner.destroyed.connect(_owner_gone)
    if bar is not None:
        worker.finished.connect(bar.close)
    worker.start()
    return worker


def run_in_background(func: Callable[[], Any], on_done: Callable[[Any], None], *,
                      owner=None) -> None:
    """Call ``func()`` in a thread worker below the GUI thread; ``on_done(result)`` in the GUI.

    For warm-up work a panel must not wait for while it opens (importing torch and timm:
    seconds on a small CPU). A failure is left to the real task, which reports it; nothing
    is called back after ``owner`` is destroyed.
    """
    def _call():
        yield_cpu_to_gui()
        return func()

    worker = create_worker(_call, _ignore_errors=True, _start_thread=False)
    alive = [True]
    if owner is not None:
        owner.destroyed.connect(lambda *_: alive.__setitem__(0, False))
    worker.returned.connect(lambda result: on_done(result) if alive[0] else None)
    worker.start()
