"""The window never freezes: event-loop gaps while training and evaluating.

A 50 ms QTimer ticks on the GUI thread while the Train and Evaluate panels run their
task; a gap between two ticks is a time the window could not respond. The test always
asserts, whatever else the machine runs:

* ``CPU_LIMIT_MS`` (200 ms): the GUI thread's own CPU time between two ticks. The
  slowest thing left on it, a full redraw of a dock's matplotlib figure (when an axis
  range of the loss plot grows, or the evaluation's map), costs 50-100 ms on an idle
  2-core machine and up to about twice that when the other hyperthread is busy.
* ``MAX_GAP_MS`` (800 ms): no wall-clock gap is longer, and at most ``SLOW_BUDGET`` gaps
  (plus 2 % of the ticks) exceed ``SLOW_MS`` (100 ms).

The wall-clock limits are set for a 2-core machine shared with other jobs (load average
6-10, the tests under ``nice -n 10``): there the longest gap measured after the fixes of
issue 28 was 190-520 ms, the median 50 ms (the timer's own period). Most of a long gap
is waiting for a core, or for the GIL held by a worker that itself waits for a core
(the summary prints the gap less the run-queue wait, to tell them apart). Before those
fixes (a plot fully redrawn on every step, canvases re-rendered on every layout change)
the same machine showed gaps of 0.6-1.3 s, 3-13 % of them over 100 ms, and 140-250 ms
of GUI-thread CPU.
"""

from __future__ import annotations

import sys

import pytest
from qtpy.QtCore import Qt

from napari_helpers import TINY_TRAIN_TOML, LoopGaps, wait_quiet, write_tiny_cache

from napari_wsdino.core.modelset import ModelSet
from napari_wsdino._napari.state import TaskStatus, state_for

CPU_LIMIT_MS = 200   # the GUI thread's own work between two ticks
MAX_GAP_MS = 800     # the longest wall-clock gap, on a busy 2-core machine
SLOW_MS = 100        # a gap a user may notice ...
SLOW_BUDGET = 6      # ... allowed this often (+ 2 % of the ticks): first events, redraws
COMPOUNDS = ("taxol", "docetaxel", "ALLN", "MG-132", "DMSO")


def _run(qtbot, dock, button, timeout=300_000) -> LoopGaps:
    """Press ``button``, wait for the dock's task; the event-loop gaps meanwhile."""
    wait_quiet(qtbot)  # docks painted and laid out before measuring
    gaps = LoopGaps().start()
    qtbot.mouseClick(button, Qt.LeftButton)
    qtbot.waitUntil(lambda: dock.status != TaskStatus.RUNNING, timeout=timeout)
    qtbot.wait(300)  # results drawn
    gaps.stop()
    assert dock.status == TaskStatus.DONE, dock.status_label.text()
    return gaps


def _check(name: str, gaps: LoopGaps) -> None:
    slow = gaps.count_over(SLOW_MS)
    budget = SLOW_BUDGET + len(gaps.ticks) // 50
    assert gaps.longest_cpu_ms < CPU_LIMIT_MS, f"{name}: {gaps.summary()}"
    assert gaps.longest_ms < MAX_GAP_MS, f"{name}: {gaps.summary()}"
    assert slow <= budget, f"{name}: {slow} gaps over {SLOW_MS} ms > {budget}; {gaps.summary()}"


def test_event_loop_latency_training_and_evaluation(make_napari_viewer, qtbot, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))
    cache = write_tiny_cache(tmp_path / "cache", per_compound=8, size=32, compounds=COMPOUNDS,
                             dataset=tmp_path / "bbbc")
    viewer = make_napari_viewer(show=True)
    state = state_for(viewer)
    browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")[1]
    train = viewer.window.add_plugin_dock_widget("napari-wsdino", "3a Train")[1]
    evaluate = viewer.window.add_plugin_dock_widget("napari-wsdino", "5 Evaluate")[1]
    browser.open(tmp_path / "bbbc")
    state.cache_path = cache.path

    base = tmp_path / "tiny.toml"
    base.write_text(TINY_TRAIN_TOML)
    train.base_edit.setText(str(base))
    for channel in ("Tubulin", "Actin"):
        train.channel_boxes[channel].setChecked(False)
    train.arch_combo.setCurrentText("test_vit")
    train.epochs_spin.setValue(2)
    train.batch_spin.setValue(8)
    train.global_spin.setValue(32)
    train.local_spin.setValue(16)
    train.crops_spin.setValue(2)
    train.outdim_spin.setValue(128)
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    training = _run(qtbot, train, train.start_button)

    state.models = ModelSet.random("test_vit", ("DAPI", "Tubulin", "Actin"), seed=0)
    evaluate.method_combo.setCurrentText("pca")
    evaluate.crop_spin.setValue(16)
    evaluate.device_combo.setCurrentText("cpu")
    evaluation = _run(qtbot, evaluate, evaluate.run_button)
    print(f"event-loop gaps: training {training.summary()} ({train.plot.full_draws} full "
          f"plot draws); evaluation {evaluation.summary()}")
    _check("training", training)
    _check("evaluation", evaluation)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_workers_run_below_the_gui_thread(qtbot):
    """A task's thread (and the torch threads it starts) yields the CPU to the GUI thread."""
    import os
    import threading

    from napari_wsdino.core.progress import Progress
    from napari_wsdino._napari.workers import WORKER_NICENESS, start_worker

    def gen():
        yield Progress("test", 1, 1, "")
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    gui = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    result = []
    worker = start_worker(gen(), on_done=result.append, progress_bar=False)
    qtbot.waitUntil(lambda: bool(result), timeout=10_000)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert result == [min(19, gui + WORKER_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == gui  # GUI unchanged
