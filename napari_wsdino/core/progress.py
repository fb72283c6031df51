"""Progress events that long-running core generators yield.

Core work (preprocess, train, embed, evaluate) is written as generators that
``yield`` :class:`Progress` events and ``return`` their result. The CLI prints
them, tests iterate them, and the napari edge wraps them in a ``thread_worker``
whose ``quit()`` takes effect at the next yield.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a long task.

    Attributes
    ----------
    stage
        Short name of the task ("preprocess", "train", "embed", ...).
    step, total
        Steps done and steps in all (``total`` 0 when unknown).
    message
        One human-readable line.
    info
        Task-specific numbers (loss, learning rate, images/s, ...).
    """

    stage: str
    step: int
    total: int
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


def run_to_end(gen: Generator[Progress, None, T], callback=None) -> T:
    """Drive a progress generator to its end and return its result.

    Parameters
    ----------
    gen
        A core generator yielding :class:`Progress`.
    callback
        Called with each event (e.g. a progress-bar update).
    """
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)


class Timer:
    """Rate and ETA over a run of steps."""

    def __init__(self, total: int):
        self.total = total
        self.start = time.perf_counter()

    def eta(self, done: int) -> float:
        elapsed = time.perf_counter() - self.start
        if done <= 0:
            return float("nan")
        return elapsed / done * max(self.total - done, 0)
