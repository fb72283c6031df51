"""Load models and attention dock widgets, driven through the GUI."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_helpers import write_tiny_dataset

from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino._napari.state import TaskStatus, state_for

ARCH = "test_vit"  # patch 16, 2 heads in timm's test config


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_dataset(tmp_path / "bbbc", plates=1, wells=2, sites=1, shape=(96, 128))


def _dock(viewer, name):
    return viewer.window.add_plugin_dock_widget("napari-wsdino", name)[1]


def test_load_random_and_per_channel_files(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    loader = _dock(viewer, "3b Load models")
    state = state_for(viewer)
    loader.source_combo.setCurrentIndex(loader.source_combo.findData("run"))
    loader.path_edit.setText(str(tmp_path / "no-such-run"))
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    assert "does not exist" in loader.status_label.text() and state.models is None

    loader.source_combo.setCurrentIndex(loader.source_combo.findData("random"))
    loader.arch_combo.setCurrentText(ARCH)
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: state.models is not None, timeout=20_000)
    assert state.models.channels == ("DAPI", "Tubulin", "Actin")
    assert state.models.kind == "random" and loader.status == TaskStatus.DONE
    assert "Loaded (random)" in loader.status_label.text()

    # export, then load two channels from their own files
    files = state.models.export_safetensors(tmp_path / "export")
    first = state.models
    loader.source_combo.setCurrentIndex(loader.source_combo.findData("files"))
    assert loader.file_edits["DAPI"].isVisibleTo(loader)
    loader.file_edits["DAPI"].setText(str(files[0]))
    loader.file_edits["Actin"].setText(str(files[2]))
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: state.models is not first, timeout=20_000)
    assert state.models.channels == ("DAPI", "Actin")
    ref = ModelSet.from_files({"DAPI": files[0], "Actin": files[2]})
    assert state.models.fingerprint() == ref.fingerprint()

    # an unreadable file fails in the worker: shown in the dock, models unchanged
    loaded = state.models
    bad = tmp_path / "DAPI.pth"
    bad.write_bytes(b"not a checkpoint")
    loader.file_edits["DAPI"].setText(str(bad))
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: loader.status == TaskStatus.CRASHED, timeout=20_000)
    assert "Could not load" in loader.status_label.text()
    assert loader.load_button.isEnabled() and state.models is loaded

    # a finished training run is offered to the loader
    loader.source_combo.setCurrentIndex(loader.source_combo.findData("random"))
    state.model_path = tmp_path / "run"
    assert loader.source_combo.currentData() == "run"
    assert loader.path_edit.text() == str(tmp_path / "run")


def _same_pixel_edges(layer, raw):
    """Outer pixel edges of ``layer`` coincide with the raw image's, in world coordinates."""
    lo, hi = layer.extent.world[:, -2:]
    rlo, rhi = raw.extent.world[:, -2:]
    half = np.asarray(layer.scale[-2:]) / 2
    np.testing.assert_allclose(lo - half, rlo - 0.5)
    np.testing.assert_allclose(hi + half, rhi + 0.5)


def _filled(outline):
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(outline.astype(bool))


def _attention_layers(viewer):
    return {layer.name: layer for layer in viewer.layers if layer.name.startswith("attention")}


def test_attention_layers_over_raw_and_cached_fields(make_napari_viewer, qtbot, tiny, tmp_path):
    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = _dock(viewer, "1 Data - plate browser")
    attention = _dock(viewer, "4 Attention")
    assert not attention.compute_button.isEnabled()
    browser.open(tiny)
    state.models = ModelSet.random(ARCH, ("DAPI", "Tubulin", "Actin"), seed=0)
    assert attention.channel_combo.count() == 3
    attention.channel_combo.setCurrentText("Tubulin")
    attention.max_side_spin.setValue(64)  # raw 96x128 -> model sees 48x64 (3x4 patches of 16)
    qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE, timeout=20_000)
    layers = _attention_layers(viewer)
    heads = layers["attention heads [Tubulin]"]
    mean = layers["attention mean [Tubulin]"]
    mask = layers["attention mask [Tubulin]"]
    assert heads.data.shape == (2, 48, 64) and mean.data.shape == (48, 64)
    # the mask is a thin outline in an Image layer: nothing to paint on (not a Labels layer)
    from skimage.segmentation import find_boundaries

    assert mask._type_string == "image" and mask.data.shape == (96, 128)  # raw pixels
    _same_pixel_edges(mask, viewer.layers["DAPI"])
    assert set(np.unique(mask.data)) <= {0, 1} and mask.data.any()
    assert not (mask.data.astype(bool) & ~find_boundaries(mask.data.astype(bool) | _filled(mask.data),
                                                           mode="inner")).any()
    # scaled onto the 96x128 raw field: same world extent as the DAPI layer
    np.testing.assert_allclose(mean.scale, (2.0, 2.0))
    _same_pixel_edges(mean, viewer.layers["DAPI"])
    assert 0 < mean.opacity < 1 and mean.colormap.name == "inferno"
    np.testing.assert_allclose(heads.data.reshape(2, -1).sum(1) / 256, 1.0, rtol=1e-4)
    assert "raw field" in attention.status_label.text()
    # The attention-on-cells score of this field, shown next to the overlay.
    assert "Attention on cells:" in attention.status_label.text()
    cells = attention.last_cells
    assert 0.0 < cells.share < 1.0 and len(cells.per_head) == heads.data.shape[0]
    assert cells.score == pytest.approx(sum(cells.per_head) / len(cells.per_head))

    # a preprocessed cache holding the field is used instead (half size here)
    meta = load_metadata(tiny)
    images = {c: np.random.default_rng(1).random((len(meta.table), 32, 48)).astype("f4")
              for c in meta.channels}
    write_cache(tmp_path / "cache", meta.table, images)
    state.cache_path = tmp_path / "cache"
    attention.auto_check.setChecked(True)
    browser.well_combo.setCurrentIndex(1)  # automatic update on field change
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE
                    and "attention mean [Tubulin]" in viewer.layers, timeout=20_000)
    layers = _attention_layers(viewer)  # the old field's layers left: these are new ones
    heads, mean = layers["attention heads [Tubulin]"], layers["attention mean [Tubulin]"]
    assert mean.metadata["field"] == meta.field_key(1)
    assert mean.data.shape == (32, 48) and heads.data.shape == (2, 32, 48)
    np.testing.assert_allclose(mean.scale, (96 / 32, 128 / 48))
    _same_pixel_edges(mean, viewer.layers["DAPI"])
    assert "cache" in attention.status_label.text()
    attention.opacity_spin.setValue(0.3)
    assert mean.opacity == pytest.approx(0.3)
    # heads, mean, mask and the grey channel the model saw (the cache's image) under them
    assert len(_attention_layers(viewer)) == 4
    grey = _attention_layers(viewer)["attention input [Tubulin]"]
    np.testing.assert_array_equal(grey.data, images["Tubulin"][1].astype(np.float16))  # as cached
    assert grey.colormap.name == "gray" and grey.metadata["field"] == meta.field_key(1)
    names = [layer.name for layer in viewer.layers]
    assert names.index("attention input [Tubulin]") < names.index("attention mean [Tubulin]")


def test_cache_of_another_dataset_is_refused(make_napari_viewer, qtbot, tmp_path):
    """Same plates, wells and sites, other pixels (another replica seed): never mixed up."""
    from napari.utils.notifications import notification_manager

    from napari_wsdino.core.preprocess import PreprocessSettings, preprocess
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.synth import make_replica

    data = {seed: make_replica(tmp_path / f"seed{seed}", subset="mini", sites=1, size=(32, 40),
                               seed=seed, workers=1) for seed in (0, 1)}
    other = run_to_end(preprocess(load_metadata(data[1]), tmp_path / "cache1",
                                  PreprocessSettings(), workers=1))
    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = _dock(viewer, "1 Data - plate browser")
    prep = _dock(viewer, "2 Preprocess")
    attention = _dock(viewer, "4 Attention")
    evaluate = _dock(viewer, "5 Evaluate")
    browser.open(data[0])
    state.cache_path = other.path
    state.models = ModelSet.random(ARCH, ("DAPI", "Tubulin", "Actin"), seed=0)
    assert state.check_cache(other).same is False

    # attention: the raw field of the open dataset, and the cache named as another dataset's
    attention.max_side_spin.setValue(32)
    qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE, timeout=20_000)
    text = attention.status_label.text()
    assert "raw field" in text and "another dataset" in text and "from the cache" not in text

    # evaluation and "Use existing cache" refuse it, in the dock and as a notification
    before = len(notification_manager.records)
    qtbot.mouseClick(evaluate.run_button, Qt.LeftButton)
    assert evaluate.status == TaskStatus.IDLE and "another dataset" in evaluate.status_label.text()
    prep.out_edit.setText(str(other.path))
    qtbot.mouseClick(prep.use_button, Qt.LeftButton)
    assert "another dataset" in prep.status_label.text()
    notes = [str(r.message) for r in notification_manager.records[before:]]
    assert sum("another dataset" in n for n in notes) == 2, notes

    # its own dataset: the cache is used
    browser.open(data[1])
    qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE
                    and "from the cache" in attention.status_label.text(), timeout=20_000)


def test_models_of_another_dataset_are_marked(make_napari_viewer, qtbot, tmp_path):
    """Models trained on another replica seed's cache: allowed, and always said so."""
    from napari_wsdino.core.preprocess import PreprocessSettings, preprocess
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.synth import make_replica
    from napari_wsdino.core.train import TrainConfig, train

    data = {seed: make_replica(tmp_path / f"seed{seed}", subset="mini", sites=1, size=(32, 40),
                               seed=seed, workers=1) for seed in (0, 1)}
    other = run_to_end(preprocess(load_metadata(data[1]), tmp_path / "cache1",
                                  PreprocessSettings(), workers=1))
    config = TrainConfig(arch=ARCH, channel="DAPI", epochs=1, batch_size=8, global_size=16,
                         local_size=16, local_crops=1, out_dim=64, hidden_dim=32,
                         bottleneck_dim=16, device="cpu", global_scale=(0.5, 1.0),
                         local_scale=(0.3, 0.5))
    run_to_end(train(other, config, tmp_path / "run" / "DAPI"))
    models = ModelSet.from_run(tmp_path / "run", ["DAPI"])
    assert models.dataset_identity() == other.settings["dataset_id"]

    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = _dock(viewer, "1 Data - plate browser")
    attention = _dock(viewer, "4 Attention")
    browser.open(data[0])
    state.models = models
    assert state.check_models(models).same is False
    assert state.check_models(ModelSet.random(ARCH, ("DAPI",), seed=0)).same is None
    attention.max_side_spin.setValue(32)
    qtbot.mouseClick(attention.compute_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: attention.status == TaskStatus.DONE, timeout=20_000)
    assert "models were trained on another dataset" in attention.status_label.text()
    browser.open(data[1])                     # their own dataset: nothing to mark
    assert state.check_models(models).same is True


def test_bundled_weights_by_name_in_the_models_panel():
    """'Same initial weights for every channel' takes the bundled weights' name; the
    panel's architecture does not override the one the bundled file was made for."""
    from napari_wsdino.core.metadata import DataError
    from napari_wsdino.core.pretrained import BUNDLED
    from napari_wsdino._napari.models_widget import load_model_set, make_config

    config = make_config("init-only", ("DAPI", "Actin"), "replica-dino-pico8-cells")
    models = load_model_set(config)
    assert models.kind == "init-only" and models.channels == ("DAPI", "Actin")
    assert set(models.archs.values()) == {BUNDLED["replica-dino-pico8-cells"].arch}
    with pytest.raises(DataError, match="does not exist"):
        make_config("init-only", ("DAPI",), "replica-dino-pico9")
