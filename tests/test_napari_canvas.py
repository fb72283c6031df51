"""One dataset on the canvas, and no attention overlay left on another field (issue 28)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_helpers import write_tiny_dataset

from napari_wsdino.core.imageio import read_tiff
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino._napari import settings
from napari_wsdino._napari.attention_widget import AttentionWidget
from napari_wsdino._napari.layers import FIELD_ROLE, ROLE
from napari_wsdino._napari.state import TaskStatus, state_for

ARCH = "test_vit"  # patch 16, 2 heads in timm's test config
BBBC021 = ["DAPI", "Tubulin", "Actin"]


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def _dock(viewer, name):
    return viewer.window.add_plugin_dock_widget("napari-wsdino", name)[1]


def _images(viewer):
    return [layer for layer in viewer.layers if layer._type_string == "image"]


def _assert_shows(viewer, folder, index, channels=BBBC021, suffix=""):
    """The canvas holds exactly one field layer per channel, named by its channel, all
    visible and showing field ``index`` of ``folder``: the very pixels of its TIFFs."""
    table = load_metadata(folder).table
    fields = [layer for layer in viewer.layers if layer.metadata.get(ROLE) == FIELD_ROLE]
    assert [layer.name for layer in fields] == [f"{c}{suffix}" for c in channels]
    for layer in fields:
        assert layer.visible
        source = Path(layer.metadata["source"])
        assert (source.parent if source.suffix == ".csv" else source) == Path(folder)
        assert layer.metadata["field_index"] == index
        expected = read_tiff(table[f"path_{layer.metadata['channel']}"].iloc[index])
        np.testing.assert_array_equal(np.asarray(layer.data), expected)


def test_second_dataset_replaces_the_first(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """File > Open (the plugin's reader), the browser's Open and File > Open Sample on
    another dataset while one is browsed: one dataset's field layers, the new one's."""
    first = write_tiny_dataset(tmp_path / "first", plates=1, wells=2, sites=2, seed=1)
    second = write_tiny_dataset(tmp_path / "second", plates=2, wells=1, sites=2,
                                shape=(40, 56), seed=2)
    viewer = make_napari_viewer()
    state = state_for(viewer)
    # File > Open before the browser exists: the browser, once opened, browses that one
    viewer.open(str(second), plugin="napari-wsdino")
    browser = _dock(viewer, "1 Data - plate browser")
    assert state.source == second
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    _assert_shows(viewer, second, 1)

    # the browser's Open shows the other dataset in the same layers
    dapi = viewer.layers["DAPI"]
    browser.path_edit.setText(str(first))
    qtbot.mouseClick(browser.open_button, Qt.LeftButton)
    _assert_shows(viewer, first, 0)
    assert viewer.layers["DAPI"] is dapi
    assert len(_images(viewer)) == 3
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    _assert_shows(viewer, first, 1)

    # File > Open: the reader adds "DAPI [1]" ... beside A's layers; A's leave, B's stay
    viewer.open(str(second), plugin="napari-wsdino")
    qtbot.waitUntil(lambda: state.source == second)
    _assert_shows(viewer, second, 0)
    assert len(_images(viewer)) == 3
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)  # browsing moves that one set
    _assert_shows(viewer, second, 1)

    # the same dataset opened again: still one set, on the field opened
    viewer.open(str(second), plugin="napari-wsdino")
    qtbot.waitUntil(lambda: state.field_index == 0)
    _assert_shows(viewer, second, 0)
    # ... and by its image CSV
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    viewer.open(str(second / "BBBC021_v1_image.csv"), plugin="napari-wsdino")
    qtbot.waitUntil(lambda: state.source.suffix == ".csv")
    _assert_shows(viewer, second, 0)

    # File > Open Sample (a sample replica, here a tiny one already in the cache folder)
    from napari_wsdino._napari import sample_data

    monkeypatch.setenv("WSDINO_CACHE", str(tmp_path / "cache"))
    folder = _tiny_sample(tmp_path / "cache", sample_data)
    viewer.open_sample("napari-wsdino", "replica_taxol")
    qtbot.waitUntil(lambda: state.source == folder)
    taxol = int(load_metadata(folder).table.query("compound == 'taxol'").index[0])
    _assert_shows(viewer, folder, taxol, suffix=" (synthetic replica)")
    assert len(_images(viewer)) == 3

    # another screen layout (five stains over three): no BBBC021 stain stays
    from napari_wsdino.core.screens import CELLPAINTING_CHANNELS
    from napari_wsdino.core.synth import make_replica

    painting = make_replica(tmp_path / "painting", sites=1, size=(32, 40), workers=1,
                            layout="cellpainting")
    viewer.open(str(painting), plugin="napari-wsdino")
    qtbot.waitUntil(lambda: state.source is not None and state.source.name == "painting")
    _assert_shows(viewer, painting, 0, CELLPAINTING_CHANNELS)
    assert len(_images(viewer)) == 5


def _tiny_sample(cache, sample_data):
    """A finished tiny sample where ``sample_replica`` looks for it (no replica written)."""
    h, w = sample_data.SAMPLE_SIZE
    folder = cache / (f"sample_replica_{sample_data.SAMPLE_SUBSET}_s{sample_data.SAMPLE_SITES}"
                      f"_{h}x{w}_seed{sample_data.SAMPLE_SEED}_v2")
    write_tiny_dataset(folder, plates=1, wells=2, sites=1, seed=3)
    (folder / ".complete").write_text("ok\n")
    assert sample_data.sample_replica() == folder
    return folder


def _attention(viewer):
    return [layer for layer in viewer.layers if layer.metadata.get(ROLE) == "attention"]


def _shown_on(viewer, state):
    """Every attention layer on the canvas shows the field and dataset in view."""
    key = state.metadata.field_key(state.field_index)
    return all(layer.metadata["field"] == key and layer.metadata["source"] == str(state.source)
               and layer.metadata["field_index"] == state.field_index
               for layer in _attention(viewer))


def test_no_stale_attention_after_next_or_map_click(make_napari_viewer, qtbot, tmp_path):
    data = write_tiny_dataset(tmp_path / "bbbc", plates=1, wells=2, sites=2, shape=(64, 96))
    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = _dock(viewer, "1 Data - plate browser")
    attention = _dock(viewer, "4 Attention")
    assert attention.auto_check.isChecked()  # following the field is the default
    browser.open(data)
    state.models = ModelSet.random(ARCH, ("DAPI",), seed=0)
    attention.max_side_spin.setValue(48)

    def compute():
        qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
        qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE, timeout=20_000)
        assert len(_attention(viewer)) == 4 and _shown_on(viewer, state)

    # "Update when the field changes" off: Next and a map click remove the overlay at once
    attention.auto_check.setChecked(False)
    compute()
    mask = viewer.layers["attention mask [DAPI]"]
    assert mask.locked and mask.metadata["source"] == str(data)
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    assert state.field_index == 1 and _attention(viewer) == []
    assert "Attention of Week" in attention.status_label.text()
    assert "removed" in attention.status_label.text()
    compute()
    state.field_index = 3  # what a click on the Evaluate map does
    assert _attention(viewer) == []
    # a result that arrives after the view moved on is dropped
    qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
    state.field_index = 2
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE, timeout=20_000)
    assert _attention(viewer) == [] and "not shown" in attention.status_label.text()

    # on: removed at once as well, then recomputed for the field now in view
    attention.auto_check.setChecked(True)
    compute()
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    assert _attention(viewer) == [] and attention.status == TaskStatus.RUNNING
    assert state.metadata.field_key(3) in attention.status_label.text()
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE and bool(_attention(viewer)),
                    timeout=20_000)
    assert len(_attention(viewer)) == 4 and _shown_on(viewer, state)
    # two map clicks while a job runs: the last field's maps, never the first's
    state.field_index = 0
    assert attention.status == TaskStatus.RUNNING
    state.field_index = 1
    assert _attention(viewer) == [] and "follows" in attention.status_label.text()
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE and bool(_attention(viewer)),
                    timeout=40_000)
    assert len(_attention(viewer)) == 4 and _shown_on(viewer, state)
    assert state.field_index == 1

    # another dataset: the overlay leaves with the old dataset's field, then follows
    other = write_tiny_dataset(tmp_path / "other", plates=1, wells=2, sites=1, seed=4)
    browser.open(other)
    assert _attention(viewer) == []
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE and bool(_attention(viewer)),
                    timeout=20_000)
    assert _shown_on(viewer, state) and _attention(viewer)[0].metadata["source"] == str(other)

    # a remembered choice is kept
    settings.remember_many({"attention.auto": False})
    assert not AttentionWidget(viewer).auto_check.isChecked()
