"""The five-stain Cell Painting replica in napari: the reader and the plate browser show
one layer per stain (DNA, ER, RNA, AGP, Mito) in its own colour."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsdino.core.screens import CELLPAINTING_CHANNELS
from napari_wsdino.core.synth import make_replica
from napari_wsdino._napari.layers import CHANNEL_COLORMAPS
from napari_wsdino._napari.reader import get_reader

COLOURS = {"DNA": "blue", "ER": "green", "RNA": "cyan", "AGP": "red", "Mito": "magenta"}


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_replica(tmp_path_factory.mktemp("cp") / "data", sites=1, size=(96, 120),
                        workers=1, layout="cellpainting")


def test_stains_have_distinct_colours():
    assert {c: CHANNEL_COLORMAPS[c] for c in CELLPAINTING_CHANNELS} == COLOURS
    assert len(set(COLOURS.values())) == 5


@pytest.mark.parametrize("which", ["folder", "load_data.csv"])
def test_reader_opens_a_cell_painting_replica(replica, which):
    path = replica if which == "folder" else replica / "load_data.csv"
    reader = get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    assert [kw["name"] for _, kw, _ in layers] == list(CELLPAINTING_CHANNELS)
    assert [kw["colormap"] for _, kw, _ in layers] == [COLOURS[c] for c in CELLPAINTING_CHANNELS]
    images = [data for data, _, kind in layers if kind == "image"]
    assert len(images) == 5 and all(im.shape == (96, 120) for im in images)
    # Five different stains, not one image five times.
    assert len({float(im.mean()) for im in images}) == 5
    meta = layers[0][1]["metadata"]
    assert set(meta["paths"]) == set(CELLPAINTING_CHANNELS)
    assert meta["batch"].startswith("source_")


def test_cell_painting_sample_field(tmp_path, monkeypatch):
    from napari_wsdino._napari import sample_data

    monkeypatch.setattr(sample_data, "SAMPLE_SIZE", (64, 80))  # the real one is 256 x 320
    layers = sample_data.replica_cellpainting_field(tmp_path)
    assert [kw["name"] for _, kw, _ in layers] == [f"{c} (synthetic replica)"
                                                   for c in CELLPAINTING_CHANNELS]
    assert {kw["metadata"]["moa"] for _, kw, _ in layers} == {"DMSO"}
    folder = sample_data.sample_replica(tmp_path, "cellpainting")
    assert (folder / "load_data.csv").exists() and folder.name.startswith("sample_replica_cellpainting")


def test_plate_browser_shows_five_stains(make_napari_viewer, qtbot, replica, tmp_path):
    from napari_wsdino._napari.plate_browser import PlateBrowser

    viewer = make_napari_viewer(show=True)  # a hidden canvas renders black
    _, browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")
    assert isinstance(browser, PlateBrowser)
    assert browser.open(str(replica))
    images = [layer for layer in viewer.layers if layer._type_string == "image"]
    assert [layer.name for layer in images] == list(CELLPAINTING_CHANNELS)
    assert [layer.colormap.name for layer in images] == [COLOURS[c] for c in CELLPAINTING_CHANNELS]
    assert all(layer.blending == "additive" for layer in images)
    assert "stains DNA, ER, RNA, AGP, Mito" in browser.status_label.text()
    assert browser.plate_combo.count() == 6  # 3 sources x 2 plates
    before = {layer.name: layer.data.copy() for layer in images}
    browser.next_button.click()
    assert all(not np.array_equal(before[layer.name], layer.data) for layer in images)
    viewer.reset_view()
    shot = viewer.screenshot(str(tmp_path / "cellpainting_browser.png"), canvas_only=True)
    # Composite of five additive colours: more than one hue on screen.
    rgb = shot[..., :3].reshape(-1, 3).astype(int)
    lit = rgb[rgb.sum(axis=1) > 60]
    assert len(lit) > 100
    assert len({tuple(p // 64) for p in lit}) > 3
