"""The worker helper, shared state and persisted settings of the napari edge."""

from __future__ import annotations

import threading
import time

import pytest

from napari.utils.notifications import notification_manager

from napari_wsdino.core.progress import Progress
from napari_wsdino._napari import settings
from napari_wsdino._napari.state import WsdinoState, state_for
from napari_wsdino._napari.workers import start_worker


def counting(n, log, delay=0.0, fail_at=None):
    """A core-style generator: yields Progress, returns a result, cleans up in finally."""
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"step {i} went wrong: check the input")
            time.sleep(delay)
            yield Progress("count", i + 1, n, f"step {i + 1}", {"loss": 1.0 / (i + 1)})
        return n * 10
    finally:
        log.append(threading.current_thread() is threading.main_thread())


def test_worker_reports_progress_and_result(qtbot):
    from napari.utils import progress

    events, done, log, bars = [], [], [], []

    def seen(event):
        events.append(event)
        bars.extend((b.n, b.total, b.desc) for b in progress._all_instances if "Counting" in b.desc)

    start_worker(counting(5, log), seen, done.append, desc="Counting")
    qtbot.waitUntil(lambda: bool(done and log), timeout=10_000)  # callbacks connect before start
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    # napari's progress bar followed the events and was closed at the end
    assert [(n, total) for n, total, _ in bars] == [(i, 5) for i in range(1, 6)]
    assert bars[-1][2] == "Counting: step 5"
    qtbot.waitUntil(lambda: not any("Counting" in b.desc for b in progress._all_instances))
    assert events[-1].info["loss"] == pytest.approx(0.2)
    assert done == [50] and log == [False]


def test_worker_error_becomes_a_notification(qtbot):
    errors, log = [], []
    before = len(notification_manager.records)
    start_worker(counting(5, log, fail_at=2), on_error=errors.append, desc="Counting")
    qtbot.waitUntil(lambda: bool(errors and log), timeout=10_000)
    assert len(errors) == 1 and "step 2 went wrong" in str(errors[0])
    messages = [str(r.message) for r in notification_manager.records[before:]]
    assert any("Counting failed: step 2 went wrong" in m for m in messages), messages


def test_a_full_disk_in_a_worker_reads_as_path_cause_and_fix(qtbot, tmp_path):
    import errno

    def writing():
        yield Progress("write", 0, 1, "writing")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.npy"))

    errors = []
    before = len(notification_manager.records)
    start_worker(writing(), on_error=errors.append, desc="Preprocess")
    qtbot.waitUntil(lambda: bool(errors), timeout=10_000)
    text = str(errors[0])
    assert "No space left on the disk holding" in text and "x.npy" in text and "free space" in text
    messages = [str(r.message) for r in notification_manager.records[before:]]
    assert any(m.startswith("Preprocess failed: No space left") for m in messages), messages


def test_stopping_closes_the_core_generator_in_the_worker(qtbot):
    events, done, stopped, log = [], [], [], []
    worker = start_worker(counting(1000, log, delay=0.01), events.append, done.append,
                          on_stopped=lambda: stopped.append(True), progress_bar=False)
    qtbot.waitUntil(lambda: len(events) >= 3, timeout=10_000)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        worker.quit()
    assert stopped == [True] and done == [] and len(events) < 1000
    assert log == [False]  # the generator's finally ran, off the GUI thread


def test_state_signals_and_per_viewer_instances(tmp_path):
    state = WsdinoState()
    seen = []
    state.cache_changed.connect(seen.append)
    state.cache_path = tmp_path
    state.cache_path = tmp_path  # unchanged: no second signal
    assert seen == [tmp_path]
    class Viewer:  # any weak-referenceable object stands for a viewer here
        pass

    viewer, other = Viewer(), Viewer()
    assert state_for(viewer) is state_for(viewer)
    assert state_for(viewer) is not state and state_for(other) is not state_for(viewer)


def test_settings_persist_under_the_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "cfg"))
    assert settings.recall("x", "default") == "default"
    settings.remember("x", [1, 2])
    settings.remember("y", "b")
    assert settings.load_settings() == {"x": [1, 2], "y": "b"}
    assert (tmp_path / "cfg" / "settings.json").exists()
    (tmp_path / "cfg" / "settings.json").write_text("{not json")
    assert settings.recall("x", "fallback") == "fallback"


def test_closing_the_owner_widget_stops_the_work(qtbot):
    from qtpy.QtWidgets import QWidget

    owner = QWidget()
    events, done, stopped, log = [], [], [], []
    worker = start_worker(counting(1000, log, delay=0.01), events.append, done.append,
                          on_stopped=lambda: stopped.append(True), progress_bar=False,
                          owner=owner)
    qtbot.waitUntil(lambda: len(events) >= 2, timeout=10_000)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        owner.deleteLater()  # the dock was closed
    seen = len(events)
    qtbot.wait(50)
    assert log == [False] and done == [] and stopped == [] and len(events) == seen < 1000
