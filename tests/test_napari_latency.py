"""The window never freezes: the longest event-loop gap while training and evaluating."""

from __future__ import annotations

import os

import pytest
from qtpy.QtCore import Qt

from napari_helpers import TINY_TRAIN_TOML, LoopGaps, write_tiny_cache

from napari_wsdino.core.modelset import ModelSet
from napari_wsdino._napari.state import TaskStatus, state_for

LIMIT_MS = 250  # the test's bound (a loaded CI machine); the benchmark figure is < 100 ms
COMPOUNDS = ("taxol", "docetaxel", "ALLN", "MG-132", "DMSO")


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def _run(qtbot, dock, button, timeout=300_000) -> LoopGaps:
    """Press ``button``, wait for the dock's task; the longest event-loop gap meanwhile."""
    qtbot.wait(200)  # let the docks settle (first paint) before measuring
    gaps = LoopGaps().start()
    qtbot.mouseClick(button, Qt.LeftButton)
    qtbot.waitUntil(lambda: dock.status != TaskStatus.RUNNING, timeout=timeout)
    qtbot.wait(300)  # results drawn
    gaps.stop()
    assert dock.status == TaskStatus.DONE, dock.status_label.text()
    return gaps


def test_event_loop_latency_training_and_evaluation(make_napari_viewer, qtbot, tmp_path):
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
    print(f"longest event-loop gap: training {training.longest_ms:.0f} ms "
          f"(GUI thread CPU {training.longest_cpu_ms:.0f} ms), evaluation "
          f"{evaluation.longest_ms:.0f} ms (CPU {evaluation.longest_cpu_ms:.0f} ms)")
    for gaps in (training, evaluation):
        assert gaps.longest_cpu_ms < LIMIT_MS  # nothing slow runs on the GUI thread
        if not _overloaded():  # wall clock: also no worker holding the GIL for long
            assert gaps.longest_ms < LIMIT_MS, gaps.longest_ms


def _overloaded() -> bool:
    """Other processes keep every core busy: the wall clock then measures the machine."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)
