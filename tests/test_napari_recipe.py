"""One recipe everywhere: the panels run the preset the CLI and the demo run (issue 28)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from qtpy.QtCore import Qt

from napari_wsdino.cli import main
from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.metadata import IMAGE_CSV
from napari_wsdino.core.presets import PRESETS
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino._napari.state import TaskStatus, state_for

ARCH = "wsdino_vit_pico_patch8"


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def _two_weeks(replica, root):
    """The session's mini replica (64 x 80) cut to week 1, site 1 (2 plates, 23 fields,
    DMSO on each): its files linked, its image CSV filtered."""
    root.mkdir()
    for item in replica.iterdir():
        if item.name != IMAGE_CSV:
            (root / item.name).symlink_to(item)
    table = pd.read_csv(replica / IMAGE_CSV)
    keep = (table.Image_Metadata_Plate_DAPI.str.match(r"Week1_")
            & table.Image_FileName_DAPI.str.contains("_s1_"))
    table[keep].to_csv(root / IMAGE_CSV, index=False)
    return root


def _pick(combo, value) -> None:
    """Choose ``value`` as a user does (the ``activated`` signal, not only the index)."""
    index = combo.findData(value)
    assert index >= 0, value
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


def test_gui_and_cli_give_same_profiles_with_the_same_recipe(make_napari_viewer, qtbot, tmp_path,
                                                             mini_replica):
    data = _two_weeks(mini_replica, tmp_path / "data")
    viewer = make_napari_viewer()
    state = state_for(viewer)
    dock = viewer.window.add_plugin_dock_widget
    browser = dock("napari-wsdino", "1 Data - plate browser")[1]
    prep = dock("napari-wsdino", "2 Preprocess")[1]
    train = dock("napari-wsdino", "3a Train")[1]
    loader = dock("napari-wsdino", "3b Load models")[1]
    evaluate = dock("napari-wsdino", "5 Evaluate")[1]

    browser.open(data)
    # Nothing chosen yet: the largest preset whose cache fits the raw 64 x 80 fields.
    assert state.preset == "test" and prep.norm_combo.currentText() == "plate"
    assert train.preset_combo.currentData() == "test"
    # A recipe picked in one panel is the workflow's: Train shows it, Preprocess fills it in.
    _pick(prep.preset_combo, "cpu")
    assert state.preset == "cpu" and train.preset_combo.currentData() == "cpu"
    assert (prep.height_spin.value(), prep.width_spin.value()) == PRESETS["cpu"].cache_size
    _pick(train.preset_combo, "test")
    assert state.preset == "test" and prep.preset_combo.currentData() == "test"
    assert (prep.height_spin.value(), prep.width_spin.value()) == PRESETS["test"].cache_size
    assert "test: 48 x 64 cache, plate normalisation" in prep.recipe_label.text()
    prep.out_edit.setText(str(tmp_path / "gui_cache"))
    prep.workers_spin.setValue(1)
    qtbot.mouseClick(prep.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: prep.status != TaskStatus.RUNNING, timeout=120_000)
    assert prep.status == TaskStatus.DONE, prep.status_label.text()

    _pick(loader.source_combo, "random")
    loader.arch_combo.setCurrentText(ARCH)
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: state.models is not None, timeout=60_000)
    assert "Recipe (chosen): test:" in evaluate.inputs_label.text()
    assert evaluate.crop_spin.value() == PRESETS["test"].embed_crop
    evaluate.method_combo.setCurrentText("pca")
    evaluate.device_combo.setCurrentText("cpu")
    qtbot.mouseClick(evaluate.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: evaluate.status != TaskStatus.RUNNING, timeout=180_000)
    assert evaluate.status == TaskStatus.DONE, evaluate.status_label.text()
    assert "One batch only: NSC alone" in evaluate.status_label.text()  # not a crash
    gui = evaluate.evaluation.profiles

    cli_cache, cli_profiles = tmp_path / "cli_cache", tmp_path / "cli.parquet"
    assert main(["preprocess", str(data), "--out", str(cli_cache), "--preset", "test",
                 "--workers", "1", "--quiet"]) == 0
    assert main(["embed", str(cli_cache), "--random", "--arch", ARCH, "--seed", "0",
                 "--preset", "test", "--device", "cpu", "--out", str(cli_profiles),
                 "--quiet"]) == 0
    cli = ProfileTable.read(cli_profiles)

    # The same cache pixels, then the same table: the GUI ran the CLI's recipe.
    gui_cache = open_cache(tmp_path / "gui_cache")
    for channel in gui_cache.channels:
        np.testing.assert_array_equal(gui_cache.images(channel), open_cache(cli_cache).images(channel))
    assert list(gui.feature_names) == list(cli.feature_names)
    assert gui.meta.reset_index(drop=True).equals(cli.meta.reset_index(drop=True))
    np.testing.assert_array_equal(gui.features, cli.features)
    # ... and that recipe is the preset's: CLS + mean token (twice a CLS-only width).
    assert gui.features.shape[1] == 2 * len(gui_cache.channels) * state.models[
        "DAPI"].model.embed_dim
