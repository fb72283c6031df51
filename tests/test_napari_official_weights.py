"""The Load models panel's "Official DINO ViT-S/8" (issue 29): consent, bytes on the bar,
Cancel without a partial file, the cache used with no network, one line offline. Never
the network: a locally made checkpoint for the tiny test ViT is served on 127.0.0.1, or
laid in a prepared cache folder."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QApplication, QMessageBox

from loopback import loopback

from napari_wsdino.core.model import create_backbone
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.pretrained import OFFICIAL, cached_official
from napari_wsdino._napari.state import TaskStatus, state_for

ARCH = "test_vit"
FULL = "dino-vits8-full"
FULL_FILE = "dino_deitsmall8_pretrain_full_checkpoint.pth"
CHANNELS = ("DAPI", "Tubulin", "Actin")


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Settings, torch.hub's and huggingface_hub's caches under tmp_path; the hub offline."""
    from huggingface_hub import constants

    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def _full_checkpoint(path, pad_mb=0):
    """DINO's full-checkpoint layout (``student`` under ``module.``, ``teacher``) for the
    tiny test ViT with RGB filters; ``pad_mb`` of optimiser state makes the download last."""
    torch.manual_seed(4)
    sd = create_backbone(ARCH, in_chans=3).state_dict()
    torch.save({"student": {f"module.backbone.{k}": v for k, v in sd.items()},
                "teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "optimizer": {"pad": torch.zeros(pad_mb * 262_144)}}, path)
    return path


def _official_for_test_vit(monkeypatch, name, **changes):
    """The official entry made for the tiny test ViT (the real files are ViT-S/8's)."""
    monkeypatch.setitem(OFFICIAL, name, dataclasses.replace(OFFICIAL[name], arch=ARCH,
                                                            **changes))


def _dead_url():
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/{FULL_FILE}"


def _loader(viewer, name):
    viewer.window._qt_window.resize(1280, 720)
    loader = viewer.window.add_plugin_dock_widget("napari-wsdino", "3b Load models")[1]
    loader.source_combo.setCurrentIndex(loader.source_combo.findData("official"))
    loader.official_combo.setCurrentIndex(loader.official_combo.findData(name))
    return loader


def _checkpoints(caches):
    folder = caches / "torch" / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _refuse_network(text):
    raise AssertionError(f"asked to download although cached: {text}")


def test_download_asks_first_shows_bytes_and_loads_every_channel(
        make_napari_viewer, qtbot, caches, monkeypatch):
    served = caches / "served"
    served.mkdir()
    size = _full_checkpoint(served / FULL_FILE, pad_mb=1).stat().st_size
    with loopback(served, delay=0.005) as (address, hits):
        _official_for_test_vit(monkeypatch, FULL, url=f"{address}/{FULL_FILE}", size=size)
        viewer = make_napari_viewer()
        state = state_for(viewer)
        loader = _loader(viewer, FULL)
        assert loader.official_combo.isVisibleTo(loader) and not loader.path_edit.isEnabled()
        assert "Not downloaded yet" in loader.official_label.toolTip()
        assert loader.load_button.text() == "Download and load…"
        assert not loader.cancel_button.isEnabled()

        # no consent, no download
        asked = []
        loader.ask_consent = lambda text: asked.append(text) or False
        qtbot.mouseClick(loader.load_button, Qt.LeftButton)
        assert "not started" in loader.status_label.text() and hits == []
        assert FULL_FILE in asked[0] and f"{address}/{FULL_FILE}" in asked[0]
        assert f"about {size / 1e6:.0f} MB" in asked[0]
        assert str(caches / "torch" / "hub" / "checkpoints") in asked[0]

        # consent: bytes on the bar while it downloads, then the model set
        loader.ask_consent = lambda text: True
        events, formats = [], []
        shown = loader._bytes_on_bar

        def _spy(event):
            shown(event)
            events.append(event)
            formats.append(loader.progress_bar.format())

        monkeypatch.setattr(loader, "_bytes_on_bar", _spy)
        qtbot.mouseClick(loader.load_button, Qt.LeftButton)
        assert loader.cancel_button.isEnabled()
        qtbot.waitUntil(lambda: state.models is not None, timeout=30_000)
    downloads = [e for e in events if e.stage == "download"]
    assert len(downloads) > 3 and downloads[-1].step == downloads[-1].total == size
    assert [e.step for e in downloads] == sorted(e.step for e in downloads)
    assert any(f.endswith(f"of {size / 1e6:.1f} MB") for f in formats)
    assert hits == [f"/{FULL_FILE}"] and _checkpoints(caches) == [FULL_FILE]
    # the same model set as choosing the file by hand for every channel
    by_hand = ModelSet.init_only(ARCH, cached_official(FULL), CHANNELS)
    assert state.models.channels == CHANNELS and state.models.kind == "init-only"
    assert state.models.fingerprint() == by_hand.fingerprint()
    assert loader.status == TaskStatus.DONE and "Loaded (init-only)" in loader.status_label.text()
    assert loader.official_label.toolTip().startswith("Cached:")
    assert loader.load_button.text() == "Load models"
    if shot := os.environ.get("WSDINO_OFFICIAL_SCREENSHOT"):  # a look at the panel
        viewer.window._qt_window.show()  # hidden, docks keep a stale width
        qtbot.wait(300)
        assert viewer.window._qt_window.grab().save(shot)


def test_cancel_stops_the_download_and_keeps_no_partial_file(
        make_napari_viewer, qtbot, caches, monkeypatch):
    served = caches / "served"
    served.mkdir()
    size = _full_checkpoint(served / FULL_FILE, pad_mb=4).stat().st_size  # ~1.3 s to serve
    with loopback(served, delay=0.02) as (address, _hits):
        _official_for_test_vit(monkeypatch, FULL, url=f"{address}/{FULL_FILE}", size=size)
        viewer = make_napari_viewer()
        state = state_for(viewer)
        loader = _loader(viewer, FULL)
        loader.ask_consent = lambda text: True
        qtbot.mouseClick(loader.load_button, Qt.LeftButton)
        qtbot.waitUntil(lambda: " of " in loader.status_label.text()
                        and any(n.endswith(".partial") for n in _checkpoints(caches)),
                        timeout=20_000)
        if shot := os.environ.get("WSDINO_OFFICIAL_DOWNLOAD_SCREENSHOT"):
            viewer.window._qt_window.show()
            qtbot.wait(300)
            assert viewer.window._qt_window.grab().save(shot)
        qtbot.mouseClick(loader.cancel_button, Qt.LeftButton)
        qtbot.waitUntil(lambda: loader.status == TaskStatus.STOPPED, timeout=20_000)
        qtbot.waitUntil(lambda: _checkpoints(caches) == [], timeout=20_000)
    assert state.models is None and cached_official(FULL) is None
    assert "Cancelled" in loader.status_label.text() and loader.load_button.isEnabled()
    assert loader.load_button.text() == "Download and load…"


def test_cached_weights_load_without_network_or_question(
        make_napari_viewer, qtbot, caches, monkeypatch):
    from safetensors.torch import save_file

    # the full checkpoint in torch.hub's cache; its address is dead
    _official_for_test_vit(monkeypatch, FULL, url=_dead_url())
    folder = caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    _full_checkpoint(folder / FULL_FILE)
    # the backbone in a prepared huggingface_hub cache folder (the hub is offline)
    torch.manual_seed(4)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = caches / "hf" / "models--timm--vit_small_patch8_224.dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in create_backbone(ARCH, in_chans=3).state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"), metadata={"format": "pt"})
    _official_for_test_vit(monkeypatch, "dino-vits8")

    viewer = make_napari_viewer()
    state = state_for(viewer)
    loader = _loader(viewer, FULL)
    loader.ask_consent = _refuse_network
    loaded = []
    for name in (FULL, "dino-vits8"):
        loader.official_combo.setCurrentIndex(loader.official_combo.findData(name))
        assert loader.official_label.toolTip().startswith("Cached:")
        assert loader.load_button.text() == "Load models"
        qtbot.mouseClick(loader.load_button, Qt.LeftButton)
        qtbot.waitUntil(lambda: state.models is not None and state.models not in loaded,
                        timeout=30_000)
        loaded.append(state.models)
        assert loader.status == TaskStatus.DONE and state.models.channels == CHANNELS
    # the same weights both ways (one RGB ViT, saved twice)
    assert loaded[0].fingerprint() == loaded[1].fingerprint()


def test_offline_one_line_names_the_file_and_where_to_put_it(
        make_napari_viewer, qtbot, caches, monkeypatch):
    _official_for_test_vit(monkeypatch, FULL, url=_dead_url())
    viewer = make_napari_viewer()
    loader = _loader(viewer, FULL)
    loader.ask_consent = lambda text: True
    qtbot.mouseClick(loader.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: loader.status == TaskStatus.CRASHED, timeout=20_000)
    message = loader.status_label.text()
    assert message.startswith("Could not load: Cannot download " + FULL_FILE)
    assert "\n" not in message and "--init" not in message
    assert str(caches / "torch" / "hub" / "checkpoints" / FULL_FILE) in message
    assert "Same initial weights for every channel" in message
    assert state_for(viewer).models is None and _checkpoints(caches) == []


def test_consent_is_a_question_that_defaults_to_no(make_napari_viewer, qtbot):
    loader = _loader(make_napari_viewer(), FULL)
    seen = []

    def answer(button):
        box = QApplication.activeModalWidget()
        if box is None:  # not shown yet
            QTimer.singleShot(50, lambda: answer(button))
            return
        seen.append((box.text(), box.defaultButton() is box.button(QMessageBox.No)))
        box.button(button).click()

    for button, agreed in ((QMessageBox.Yes, True), (QMessageBox.No, False)):
        QTimer.singleShot(50, lambda: answer(button))
        assert loader.ask_consent("Download it?") is agreed
    assert seen == [("Download it?", True)] * 2
