"""Train dock widget: Start to completion, Stop mid-way, Resume, errors — via its buttons."""

from __future__ import annotations

import pytest
import torch
from qtpy.QtCore import Qt

from napari_helpers import TINY_TRAIN_TOML, write_tiny_cache

from napari_wsdino.core.modelset import ModelSet
from napari_wsdino._napari.state import TaskStatus, state_for
from napari_wsdino._napari.train_widget import TrainWidget, make_train_config
from napari_wsdino.core.presets import preset_for


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def cache(tmp_path):
    return write_tiny_cache(tmp_path / "cache")


def _setup(viewer, cache, tmp_path, epochs):
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "3a Train")[1]
    assert isinstance(widget, TrainWidget)
    state_for(viewer).cache_path = cache.path  # as the Preprocess panel does
    assert widget.cache_edit.text() == str(cache.path)
    assert widget.run_edit.text() == str(cache.path.parent / "runs" / "compound")
    base = tmp_path / "tiny.toml"
    base.write_text(TINY_TRAIN_TOML)
    widget.base_edit.setText(str(base))
    widget.channel_boxes["Tubulin"].setChecked(False)
    widget.channel_boxes["Actin"].setChecked(False)
    widget.arch_combo.setCurrentText("test_vit")
    widget.epochs_spin.setValue(epochs)
    widget.batch_spin.setValue(8)
    widget.lr_spin.setValue(5e-4)
    widget.global_spin.setValue(32)
    widget.local_spin.setValue(16)
    widget.crops_spin.setValue(2)
    widget.outdim_spin.setValue(128)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    return widget


def test_config_from_widget_values(tmp_path):
    base = tmp_path / "b.toml"
    base.write_text(TINY_TRAIN_TOML)
    cfg = make_train_config({"epochs": 3, "weak_label": "moa", "arch": "test_vit"}, str(base))
    assert (cfg.epochs, cfg.weak_label, cfg.hidden_dim) == (3, "moa", 64)
    with pytest.raises(ValueError, match="weak_label"):
        make_train_config({"weak_label": "colour"})
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        make_train_config({"init": str(tmp_path / "nope.pth")})
    # 'random' (on purpose) and the bundled weights' name are not files, and are fine.
    assert make_train_config({"init": "random"}).init == "random"
    assert make_train_config({}, preset="cpu").init == "replica-dino-pico8-cells"


def test_train_one_epoch_then_load_it(make_napari_viewer, qtbot, cache, tmp_path):
    viewer = make_napari_viewer()
    widget = _setup(viewer, cache, tmp_path, epochs=1)
    loader = viewer.window.add_plugin_dock_widget("napari-wsdino", "3b Load models")[1]

    # an error inside the worker: a notification, a message in the dock, buttons back
    from napari.utils.notifications import notification_manager

    before = len(notification_manager.records)
    widget.arch_combo.setCurrentText("no_such_vit")
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.CRASHED
    assert "no_such_vit" in widget.status_label.text() and widget.start_button.isEnabled()
    notes = [str(r.message) for r in notification_manager.records[before:]]
    assert any(n.startswith("Training failed:") and "no_such_vit" in n for n in notes), notes

    widget.arch_combo.setCurrentText("test_vit")
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert widget.status == TaskStatus.RUNNING and not widget.start_button.isEnabled()
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    run = cache.path.parent / "runs" / "compound"
    ckpt = torch.load(run / "DAPI" / "checkpoint.pth", weights_only=False)
    n = ckpt["steps_per_epoch"]  # 18 non-DMSO fields / batch 8
    assert ckpt["finished"] and ckpt["epoch"] == 1 and ckpt["step"] == n == 2
    steps, loss, lr = widget.plot.series["DAPI"]
    assert steps == [1, 2] and all(v == v for v in loss) and max(lr) > 0
    assert len(widget.plot.ax_loss.lines) == 1
    # the loader already points at the run; one click loads it
    assert loader.path_edit.text() == str(run)
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: state_for(viewer).models is not None, timeout=30_000)
    assert state_for(viewer).models.channels == ("DAPI",)
    assert state_for(viewer).models.fingerprint() == ModelSet.from_run(run).fingerprint()
    # Start again on the same folder is refused (Continue resumes or extends instead)
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert "already holds checkpoints" in widget.status_label.text()
    assert "DAPI 1/1 epochs" in widget.run_label.text()

    # Continue with more epochs extends the finished run (its own saved settings)
    widget.epochs_spin.setValue(2)
    widget.lr_spin.setValue(0.1)  # ignored: Continue keeps the run's settings
    qtbot.mouseClick(widget.resume_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    ckpt = torch.load(run / "DAPI" / "checkpoint.pth", weights_only=False)
    assert ckpt["finished"] and ckpt["epoch"] == 2 and ckpt["config"]["lr"] == 5e-4
    assert "DAPI 2/2 epochs" in widget.run_label.text()
    assert widget.plot.series["DAPI"][0][-2:] == [3, 4], widget.plot.series


def test_preset_for_a_cache_follows_its_field_size():
    """Each demo's cache gets its own preset's views: the same pixel sizes, not fractions."""
    from napari_wsdino.core.presets import PRESETS

    for name in ("test", "cpu", "cpu-hires", "gpu"):
        assert preset_for(PRESETS[name].cache_size) == name
    assert preset_for((256, 320)) == "cpu"


def test_defaults_fit_the_cache_or_name_the_setting(make_napari_viewer, qtbot, cache):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "3a Train")[1]
    assert "test_vit" not in [widget.arch_combo.itemText(i) for i in range(widget.arch_combo.count())]
    state_for(viewer).cache_path = cache.path  # 48 x 48 px fields
    assert widget.preset_combo.currentData() == "test"
    # Under the weak label, counted on the cache's fields: its three compounds (taxol's
    # first fields among them) each sit in one week, so pairs never cross a batch.
    assert widget.weak_combo.currentData() == "compound"
    assert widget.weak_note.text() == ("All 3 compounds sit in one batch: pairs rarely cross "
                                       "batches, so expect WS-DINO and plain DINO to tie on NSCB.")
    assert "every pair WS-DINO learns from shares a batch" in widget.weak_note.toolTip()
    widget.weak_combo.setCurrentIndex(widget.weak_combo.findData("none"))
    assert widget.weak_note.text() == ""
    widget.weak_combo.setCurrentIndex(widget.weak_combo.findData("moa"))
    assert "not discovery" in widget.weak_note.text()
    widget.weak_combo.setCurrentIndex(widget.weak_combo.findData("compound"))
    assert widget.arch_combo.currentText() == "wsdino_vit_pico_patch8"
    assert widget.global_spin.value() <= 2 * 48
    assert widget.init_edit.text() == ""
    # the cpu preset starts from the bundled weights, and says so in the form
    widget.preset_combo.setCurrentIndex(widget.preset_combo.findData("cpu"))
    assert widget.init_edit.text() == "replica-dino-pico8-cells"
    assert make_train_config(widget.values(), "", "cpu").init == "replica-dino-pico8-cells"
    # the paper's settings do not fit: the message names the setting and its limit
    widget.preset_combo.setCurrentIndex(widget.preset_combo.findData("gpu"))
    assert widget.global_spin.value() == 224
    before = len(notification_manager.records)
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    assert widget.status == TaskStatus.IDLE
    text = widget.status_label.text()
    assert "global_size = 224 (Global crop px)" in text and "at most 96" in text
    assert "Or choose the preset 'quick test" in text  # the panel's hint after core's message
    assert any("Global crop px" in str(r.message) for r in notification_manager.records[before:])


def test_stop_midway_and_resume(make_napari_viewer, qtbot, cache, tmp_path):
    viewer = make_napari_viewer()
    widget = _setup(viewer, cache, tmp_path, epochs=200)
    seen = []
    qtbot.mouseClick(widget.start_button, Qt.LeftButton)
    widget.worker.yielded.connect(lambda e: seen.append(e.step))
    qtbot.waitUntil(lambda: len(seen) >= 2, timeout=60_000)
    qtbot.mouseClick(widget.stop_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.STOPPED
    ckpt = torch.load(widget._run / "DAPI" / "checkpoint.pth", weights_only=False)
    stopped_at = ckpt["step"]
    assert 2 <= stopped_at < 400 and not ckpt["finished"]
    assert state_for(viewer).model_path == widget._run

    seen.clear()
    qtbot.mouseClick(widget.resume_button, Qt.LeftButton)
    widget.worker.yielded.connect(lambda e: seen.append(e.step))
    qtbot.waitUntil(lambda: len(seen) >= 1, timeout=60_000)
    qtbot.mouseClick(widget.stop_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert seen[0] == stopped_at + 1 and widget.status == TaskStatus.STOPPED


def test_architecture_and_preset_survive_a_restart(make_napari_viewer, qtbot):
    """Issue 28: the panel reopened with the first architecture beside the tiny-ViT preset.

    Qt rewrote the editable architecture box from its first item when the item tooltips
    were set; the choice is also remembered when made, not only at Start.
    """
    from napari_wsdino.core.presets import DEFAULT_PRESET
    from napari_wsdino._napari.train_widget import ARCHS, preset_config

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)  # nothing remembered: the default preset, all of it
    default = preset_config(DEFAULT_PRESET)
    assert widget.preset_combo.currentData() == DEFAULT_PRESET
    assert (widget.arch_combo.currentText(), widget.init_edit.text()) == (default.arch,
                                                                           default.init)
    assert widget.global_spin.value() == default.global_size

    widget.preset_combo.setCurrentIndex(widget.preset_combo.findData("cpu"))
    arch = "wsdino_vit_nano_patch8"
    assert arch in ARCHS and ARCHS.index(arch) > 0  # not the item Qt fell back to
    widget.arch_combo.setCurrentIndex(widget.arch_combo.findText(arch))  # as a user picks
    init = widget.init_edit.text()
    widget.close()
    widget.deleteLater()

    again = TrainWidget(viewer)  # a new session: same config dir
    assert again.preset_combo.currentData() == "cpu"
    assert again.arch_combo.currentText() == arch
    assert again.arch_combo.currentIndex() == again.arch_combo.findText(arch)
    assert again.init_edit.text() == init == "replica-dino-pico8-cells"

    # a timm name typed into the box (not an item) survives too
    again.arch_combo.lineEdit().setText("vit_tiny_patch16_224")
    again.arch_combo.lineEdit().editingFinished.emit()
    again.close()
    assert TrainWidget(viewer).arch_combo.currentText() == "vit_tiny_patch16_224"


def test_status_line_never_reads_nan():
    """The first steps have no speed yet (NaN): the status leaves it out."""
    from napari_wsdino.core.progress import Progress
    from napari_wsdino._napari.train_status import describe_step

    info = {"channel": "DAPI", "epoch": 1, "loss": 10.5, "images_per_s": float("nan"),
            "eta_s": float("nan")}
    first = describe_step(Progress("train", 1, 8, "DAPI epoch 1/2 nan img/s", info), 2)
    assert first == "DAPI epoch 1/2 loss 10.5000 (step 1/8)"
    later = describe_step(Progress("train", 3, 8, "", {**info, "images_per_s": 12.3,
                                                         "eta_s": 4.2}), 2)
    assert later == "DAPI epoch 1/2 loss 10.5000 12 img/s (step 3/8, ETA 4 s)"
    assert "nan" not in describe_step(Progress("train", 2, 8, "", {**info, "loss": float("nan")}))


def test_one_eta_for_the_whole_run():
    """Channels train in turn: the ETA counts the ones still to come at this one's pace."""
    from napari_wsdino.core.progress import Progress
    from napari_wsdino._napari.train_status import describe_step

    info = {"channel": "DAPI", "epoch": 1, "loss": 1.0, "images_per_s": 10.0, "eta_s": 30.0}
    channels = ["DAPI", "Tubulin", "Actin"]
    # step 2 of 8, 30 s left for DAPI: 40 s a channel, two more channels: 30 + 80 s
    line = describe_step(Progress("train", 2, 8, "", info), 2, channels)
    assert line.endswith("(step 2/8, ETA 110 s for all 3 channels)")
    last = describe_step(Progress("train", 2, 8, "", {**info, "channel": "Actin"}), 2, channels)
    assert last.endswith("(step 2/8, ETA 30 s)")
