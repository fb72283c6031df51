"""Plate browser dock widget, driven as a user would."""

from __future__ import annotations

import time

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_helpers import write_tiny_dataset

import napari_wsdino._napari.layers as layers_mod
from napari_wsdino.core.imageio import write_tiff
from napari_wsdino.core.metadata import bundled_metadata_dir, load_metadata
from napari_wsdino._napari.plate_browser import PlateBrowser
from napari_wsdino._napari.state import state_for


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_dataset(tmp_path / "bbbc", plates=2, wells=2, sites=2)


@pytest.fixture
def reads(monkeypatch):
    """Count the TIFFs the GUI reads (the real reader still does the work)."""
    calls = []
    real = layers_mod.read_tiff

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(layers_mod, "read_tiff", counting)
    return calls


def _field_of(viewer):
    """Which CSV row the DAPI layer shows (tiny datasets: mean = 1000 * (row + 1))."""
    return int(round(viewer.layers["DAPI"].data.mean() / 1000)) - 1


def _browser(viewer, qtbot):
    _, widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")
    assert isinstance(widget, PlateBrowser)
    return widget


def test_open_and_browse_fields(make_napari_viewer, qtbot, tiny, reads, tmp_path):
    viewer = make_napari_viewer()
    browser = _browser(viewer, qtbot)
    assert not browser.plate_combo.isEnabled()
    # a folder that is no dataset is reported in the dock, not raised
    assert not browser.open(tmp_path / "config")
    assert "Cannot open" in browser.status_label.text() and len(viewer.layers) == 0
    browser.path_edit.setText(str(tiny))
    qtbot.mouseClick(browser.open_button, Qt.LeftButton)

    assert [layer.name for layer in viewer.layers] == ["DAPI", "Tubulin", "Actin"]
    dapi = viewer.layers["DAPI"]
    assert _field_of(viewer) == 0 and len(reads) == 3
    assert [browser.plate_combo.itemText(i) for i in range(browser.plate_combo.count())] == \
        ["Week10_40111", "Week10_40115"]
    assert browser.info["compound"].text() == "taxol"
    assert "8 fields, 2 plates" in browser.status_label.text()

    browser.site_combo.setCurrentText("2")
    assert _field_of(viewer) == 1
    browser.well_combo.setCurrentText("C05")
    assert _field_of(viewer) == 2 and dapi.metadata["well"] == "C05"
    assert browser.info["compound"].text() == "AZ138"
    assert browser.info["moa"].text() == "Eg5 inhibitors"
    assert browser.site_combo.currentText() == "1"
    browser.plate_combo.setCurrentText("Week10_40115")
    assert _field_of(viewer) == 4 and dapi.metadata["plate"] == "Week10_40115"
    assert browser.well_combo.currentText() == "B11"
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    assert _field_of(viewer) == 5 and browser.site_combo.currentText() == "2"

    # in place: same layer objects, contrast follows the new field, one read per channel
    assert viewer.layers["DAPI"] is dapi and len(viewer.layers) == 3
    lo, hi = dapi.contrast_limits
    assert lo < dapi.data.mean() < hi and hi < 2 * dapi.data.mean()
    assert all(layer.metadata["field_index"] == 5 for layer in viewer.layers)
    assert len(reads) == 3 * 5
    assert state_for(viewer).field_index == 5

    state_for(viewer).field_index = 6  # another widget moves the field (e.g. a UMAP click)
    assert _field_of(viewer) == 6
    assert (browser.plate_combo.currentText(), browser.well_combo.currentText(),
            browser.site_combo.currentText()) == ("Week10_40115", "C05", "1")


def test_file_open_feeds_the_browser_and_folder_is_remembered(make_napari_viewer, qtbot, tiny):
    viewer = make_napari_viewer()
    browser = _browser(viewer, qtbot)
    viewer.open(str(tiny / "BBBC021_v1_image.csv"), plugin="napari-wsdino")
    qtbot.waitUntil(lambda: browser.plate_combo.count() == 2)
    assert browser.plate_combo.isEnabled()
    assert len(viewer.layers) == 3  # the browser reuses the reader's layers
    browser.well_combo.setCurrentText("C05")
    assert _field_of(viewer) == 2
    # next session: the last folder is pre-filled
    assert PlateBrowser(viewer).path_edit.text() == str(tiny / "BBBC021_v1_image.csv")


def test_whole_screen_metadata_stays_responsive(make_napari_viewer, qtbot, tmp_path, reads):
    """All 3,848 fields / 55 plates: switching plates reads three files and is quick."""
    meta = load_metadata(bundled_metadata_dir(), check_files=False)
    for c, channel in enumerate(meta.channels):  # every field points at one small image
        path = tmp_path / f"{channel}.tif"
        write_tiff(path, np.full((32, 40), 100 * (c + 1), np.uint16))
        meta.table[f"path_{channel}"] = str(path)
    viewer = make_napari_viewer()
    browser = _browser(viewer, qtbot)
    t0 = time.perf_counter()
    state_for(viewer).set_dataset(meta, tmp_path)
    assert browser.plate_combo.count() == 55
    for plate in ("Week5_29321", "Week9_39206", "Week1_22123"):
        browser.plate_combo.setCurrentText(plate)
        assert viewer.layers["DAPI"].metadata["plate"] == plate
    assert time.perf_counter() - t0 < 10
    assert len(reads) == 3 * 4


def test_synthetic_sample_button(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_wsdino._napari import sample_data

    # a finished sample already in the cache folder is reused, not rewritten
    monkeypatch.setenv("WSDINO_CACHE", str(tmp_path / "cache"))
    h, w = sample_data.SAMPLE_SIZE
    # the folder names the replica version (v2): a v1 sample is never shown as v2
    folder = tmp_path / "cache" / (f"sample_replica_{sample_data.SAMPLE_SUBSET}_s"
                                   f"{sample_data.SAMPLE_SITES}_{h}x{w}_seed{sample_data.SAMPLE_SEED}_v2")
    write_tiny_dataset(folder, plates=1, wells=2, sites=1)
    (folder / ".complete").write_text("ok\n")
    assert sample_data.sample_replica() == folder
    viewer = make_napari_viewer()
    browser = _browser(viewer, qtbot)
    qtbot.mouseClick(browser.sample_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: browser.well_combo.count() == 2, timeout=20_000)
    assert str(state_for(viewer).source) == str(folder)
    assert [layer.name for layer in viewer.layers] == ["DAPI", "Tubulin", "Actin"]

    # File > Open Sample (the manifest's sample data) feeds the browser as well
    viewer.layers.clear()
    state_for(viewer).set_dataset(None)
    assert not browser.plate_combo.isEnabled()
    viewer.open_sample("napari-wsdino", "replica_taxol")
    qtbot.waitUntil(lambda: browser.plate_combo.isEnabled(), timeout=20_000)
    assert browser.info["compound"].text() == "taxol" and len(viewer.layers) == 3
    browser.well_combo.setCurrentIndex(1 - browser.well_combo.currentIndex())
    assert viewer.layers[0].metadata["compound"] != "taxol" and len(viewer.layers) == 3
