"""Opening the Train panel: no torch on the GUI thread, and every setting remembered.

Issue 28: the panel froze the window for 4-6 s while it opened, importing torch and timm.
The first test opens it in a fresh interpreter (torch is imported once per process, so only
a fresh one shows what the first opening costs) and checks what was imported (neither torch
nor pandas), not how long it took; benchmarks/train_panel_open.py times it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_wsdino._napari.train_widget import TrainWidget

SCRIPT = """
import json, sys, time
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
_dock, widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "3a Train")
heavy = ("torch", "timm", "matplotlib.figure", "pandas", "pyarrow")
out = {"constructed": sorted(m for m in heavy if m in sys.modules),
       "cuda_before": widget.device_combo.itemText(widget.device_combo.findData("cuda"))}
deadline = time.monotonic() + 240
while not widget.training_ready and time.monotonic() < deadline:
    QApplication.processEvents()
    time.sleep(0.02)
QApplication.processEvents()
out.update(ready=widget.training_ready, torch_after="torch" in sys.modules,
           cuda_after=widget.device_combo.itemText(widget.device_combo.findData("cuda")),
           plot=widget._plot is not None)
print(json.dumps(out))
viewer.close()
"""


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def test_train_panel_opens_without_importing_torch():
    """Constructed with no torch, timm, matplotlib figure, pandas or pyarrow imported
    (pandas alone held a cold viewer's opening over 300 ms); once shown, the training code
    is imported in the background and the device menu names the GPU (or says there is
    none)."""
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["constructed"] == [], out
    assert out["cuda_before"] == "CUDA"
    assert out["ready"] and out["torch_after"] and out["plot"], out
    assert out["cuda_after"].startswith(("CUDA: ", "CUDA (no GPU found)")), out


def test_every_setting_survives_a_restart(make_napari_viewer, tmp_path):
    """Each control is remembered when changed, without a Start: the next session's
    panel shows the same form."""
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    widget.preset_combo.setCurrentIndex(widget.preset_combo.findData("cpu"))
    widget.weak_combo.setCurrentIndex(widget.weak_combo.findData("moa"))
    widget.arch_combo.setCurrentIndex(widget.arch_combo.findText("wsdino_vit_nano_patch8"))
    widget.epochs_spin.setValue(17)
    widget.batch_spin.setValue(5)
    widget.lr_spin.setValue(3e-5)
    widget.global_spin.setValue(96)
    widget.local_spin.setValue(40)
    widget.crops_spin.setValue(3)
    widget.outdim_spin.setValue(512)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    widget.channel_boxes["Actin"].setChecked(False)
    for edit, text in ((widget.init_edit, ""), (widget.base_edit, str(tmp_path / "b.toml"))):
        edit.setText(text)
        edit.editingFinished.emit()
    values = widget.values()
    widget.close()

    again = TrainWidget(viewer)
    assert again.preset_combo.currentData() == "cpu"
    assert again.values() == values
    assert values["weak_label"] == "moa" and values["epochs"] == 17 and values["init"] == ""
    assert again.base_edit.text() == str(tmp_path / "b.toml")
    assert not again.channel_boxes["Actin"].isChecked()
    assert again.channel_boxes["DAPI"].isChecked()
