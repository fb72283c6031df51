"""The window never freezes: event-loop gaps while training and evaluating.

A 50 ms QTimer ticks on the GUI thread while the Train and Evaluate panels run their
task; a gap between two ticks is a time the window could not respond. The test always
asserts, whatever else the machine runs:

* the GUI thread's own CPU time between two ticks stays under ``CPU_LIMIT_MS`` (150 ms):
  nothing slow runs on the GUI thread (a full redraw of a dock's matplotlib figure costs
  50-100 ms on a small CPU, and happens only when an axis range grows or a task ends);
* no wall-clock gap exceeds ``MAX_GAP_MS`` (500 ms), and at most ``SLOW_BUDGET`` gaps
  (plus 5 % of the ticks) exceed ``SLOW_MS`` (100 ms).

The wall-clock limits are set for a busy 2-core machine: the tests run under
``nice -n 10`` beside other jobs, so the GUI thread waits for a core as well as for its
own work; there the longest gap measured was 200-450 ms (benchmarks/RESULTS.md, "GUI
event-loop gaps (issue 28)"), on an idle machine it is under 100 ms. A regression that
blocks the GUI thread (a plot redrawn on every step, a worker holding the GIL in a long
Python loop) shows as a gap of a second or more.
"""

from __future__ import annotations

import sys

import pytest
from qtpy.QtCore import Qt

from napari_helpers import TINY_TRAIN_TOML, LoopGaps, wait_quiet, write_tiny_cache

from napari_wsdino.core.modelset import ModelSet
from napari_wsdino._napari.state import TaskStatus, state_for

CPU_LIMIT_MS = 150   # the GUI thread's own work between two ticks
MAX_GAP_MS = 500     # the longest wall-clock gap, on a busy 2-core machine
SLOW_MS = 100        # a gap a user may notice ...
SLOW_BUDGET = 8      # ... allowed this often (+ 5 % of the ticks): first events, redraws
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
    budget = SLOW_BUDGET + len(gaps.ticks) // 20
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
