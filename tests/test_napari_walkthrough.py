"""The README's workflow through every panel, each opened when its step comes: every
hand-off (dataset -> cache -> run -> model set -> evaluations) is asserted."""

from __future__ import annotations

import pytest
from qtpy.QtCore import Qt

from napari_wsdino._napari import sample_data
from napari_wsdino._napari.state import TaskStatus, state_for


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WSDINO_CACHE", str(tmp_path / "samples"))
    monkeypatch.setattr(sample_data, "SAMPLE_SIZE", (64, 80))  # a tiny replica: seconds


def _dock(viewer, name):
    return viewer.window.add_plugin_dock_widget("napari-wsdino", name)[1]


def _wait_done(qtbot, dock, timeout=600_000):
    qtbot.waitUntil(lambda: dock.status != TaskStatus.RUNNING, timeout=timeout)
    assert dock.status == TaskStatus.DONE, dock.status_label.text()
    qtbot.waitUntil(dock.progress_bar.isHidden, timeout=10_000)  # hidden when the worker ends


def test_walkthrough_sample_to_compare(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    state = state_for(viewer)

    # 1 Data: the synthetic sample
    browser = _dock(viewer, "1 Data - plate browser")
    qtbot.mouseClick(browser.sample_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: state.metadata is not None, timeout=300_000)
    dataset = state.source
    assert len(state.metadata.table) == 146 and viewer.layers["DAPI"].data.shape == (64, 80)

    # 2 Preprocess: proposes a cache beside the dataset; its cache becomes the shared one
    prep = _dock(viewer, "2 Preprocess")
    assert prep.out_edit.text() == str(dataset.parent / f"{dataset.name}_cache")
    prep.workers_spin.setValue(1)
    qtbot.mouseClick(prep.run_button, Qt.LeftButton)
    assert prep.status == TaskStatus.RUNNING and not prep.progress_bar.isHidden()
    _wait_done(qtbot, prep)
    cache = prep.cache
    # the recipe proposed for 64 x 80 fields: the test preset (48 x 64, plate normalisation)
    assert state.preset == "test" and prep.norm_combo.currentText() == "plate"
    assert state.cache_path == cache.path and cache.shape == (48, 64)
    assert state.check_cache(cache).same is True

    # 3a Train, opened now: cache, run folder and the workflow's preset
    train = _dock(viewer, "3a Train")
    run = cache.path.parent / "runs" / "compound"
    assert train.cache_edit.text() == str(cache.path) and train.run_edit.text() == str(run)
    assert train.preset_combo.currentData() == "test" and train.global_spin.value() <= 64
    for channel in ("Tubulin", "Actin"):
        train.channel_boxes[channel].setChecked(False)
    train.epochs_spin.setValue(1)
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    qtbot.mouseClick(train.start_button, Qt.LeftButton)
    _wait_done(qtbot, train)
    assert (run / "DAPI" / "checkpoint.pth").exists() and state.model_path == run
    assert "DAPI 1/1 epochs" in train.run_label.text()

    # 3b Load models, opened after training: points at the run, architecture from the run
    loader = _dock(viewer, "3b Load models")
    assert loader.source_combo.currentData() == "run" and loader.path_edit.text() == str(run)
    assert loader.arch_combo.currentText() == "wsdino_vit_pico_patch8"
    assert not loader.arch_combo.isEnabled()
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    _wait_done(qtbot, loader)
    models = state.models
    assert models.channels == ("DAPI",) and models.kind == "trained"

    # 4 Attention: the loaded channel, on the preprocessed field of this very dataset
    attention = _dock(viewer, "4 Attention")
    assert [attention.channel_combo.itemText(i) for i in range(attention.channel_combo.count())] \
        == ["DAPI"]
    qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
    _wait_done(qtbot, attention)
    assert "from the cache" in attention.status_label.text()
    assert "attention mask [DAPI]" in viewer.layers

    # 5 Evaluate: the shared cache and model set
    evaluate = _dock(viewer, "5 Evaluate")
    assert str(cache.path) in evaluate.inputs_label.text() and "trained" in evaluate.inputs_label.text()
    evaluate.method_combo.setCurrentText("pca")
    evaluate.crop_spin.setValue(16)
    evaluate.device_combo.setCurrentText("cpu")
    qtbot.mouseClick(evaluate.run_button, Qt.LeftButton)
    _wait_done(qtbot, evaluate)
    result = evaluate.evaluation
    assert state.results is result and result.label.startswith("trained")
    assert len(result.profiles) == len(cache)

    # 6 Compare, opened after the evaluation: it is already there
    compare = _dock(viewer, "6 Compare model sets")
    assert compare.table.rowCount() == 1
    assert compare.table.item(0, 0).text() == result.display_name  # run · weak label · time
    assert f"model set: {result.label}" in compare.table.item(0, 0).toolTip()
    assert compare.table.item(0, 1).text() == f"{result.result.nsc:.1%}"
