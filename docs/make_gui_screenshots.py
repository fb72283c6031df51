"""Regenerate the GUI screenshots of docs/gui.md (run under a display or xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_gui_screenshots.py [WORKDIR]

Runs the README's workflow through the panels' buttons (as the walkthrough test does):
the synthetic sample, preprocessing, a tiny Tubulin model trained for a few epochs on the
CPU, loading it, attention and evaluation; and saves what the user sees: the plate
browser, the preprocessing comparison, the Train panel after training, and the attention
overlay with the Evaluate map.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
WORK = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/wsdino_screens")


def wait(app, predicate, timeout=900):
    t0 = time.time()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError
    for _ in range(20):
        app.processEvents()


def grab(viewer, app, name, width=1400):
    """Save the whole window as a PNG under 400 KB (palette-quantised)."""
    from PIL import Image

    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. the PyQt5 deprecation warning
    for _ in range(30):
        app.processEvents()
    tmp = WORK / f"{name}.full.png"
    viewer.window._qt_window.grab().save(str(tmp))
    img = Image.open(tmp).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    out = DOCS / f"{name}.png"
    img.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(out, out.stat().st_size // 1024, "KB")


def main():
    """The walkthrough (tests/test_napari_walkthrough.py) with a larger replica, through
    the panels' buttons, each panel opened when its step comes."""
    import os

    os.environ.setdefault("NAPARI_WSDINO_CONFIG_DIR", str(WORK / "config"))
    os.environ.setdefault("WSDINO_CACHE", str(WORK / "samples"))
    # torch's triton before the canvas, as tests/conftest.py does (Mesa's LLVM clash)
    import timm  # noqa: F401
    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_wsdino._napari.dock import dock_of
    from napari_wsdino._napari.state import state_for
    from napari_wsdino.core import layout

    WORK.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(1600, 980)
    state = state_for(viewer)

    def add(name, **kwargs):
        return viewer.window.add_plugin_dock_widget("napari-wsdino", name, **kwargs)[1]

    def close(dock):
        viewer.window.remove_dock_widget(dock.parent() if dock.parent() else dock)

    browser = add("1 Data - plate browser")
    browser.open_sample()  # the 256 x 320 px synthetic sample (written once)
    wait(app, lambda: state.metadata is not None)
    meta = state.metadata
    state.field_index = int(np.flatnonzero(meta.table.compound.values == "taxol")[-1])
    grab(viewer, app, "gui_plate_browser")

    prep = add("2 Preprocess")  # the recipe proposed for 256 x 320 fields: the cpu preset
    prep.workers_spin.setValue(2)
    prep.run()
    wait(app, lambda: prep.status.value != "running")
    prep.channel_combo.setCurrentText("Tubulin")
    prep.compare()
    grab(viewer, app, "gui_preprocess")
    for layer in [l for l in viewer.layers if l.metadata.get("wsdino_role") == "preprocess-compare"]:
        viewer.layers.remove(layer)
    close(prep)
    close(browser)

    train = add("3a Train")  # opened now: cache, run folder and the workflow's recipe
    for channel, box in train.channel_boxes.items():
        box.setChecked(channel == "Tubulin")
    train.epochs_spin.setValue(4)
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    if not layout.checkpoint_path(train.run_edit.text(), "Tubulin").exists():
        train.start()
        wait(app, lambda: train.status.value != "running")
    print(train.status_label.text())
    viewer.reset_view()
    grab(viewer, app, "gui_train")
    loader = add("3b Load models")  # opened now: it points at the run
    loader.load()
    wait(app, lambda: loader.status.value != "running")
    close(train)
    close(loader)

    attention = add("4 Attention")
    attention.channel_combo.setCurrentText("Tubulin")
    attention.compute()
    wait(app, lambda: attention.status.value != "running")
    evaluate = add("5 Evaluate")  # joins Attention as a tab; split them for the picture
    for _ in range(10):
        app.processEvents()
    viewer.window._qt_window.splitDockWidget(dock_of(attention), dock_of(evaluate),
                                             Qt.Vertical)
    evaluate.device_combo.setCurrentText("cpu")
    evaluate.method_combo.setCurrentText("umap")
    evaluate.run()
    wait(app, lambda: evaluate.status.value != "running")
    print(evaluate.status_label.text())
    viewer.reset_view()
    grab(viewer, app, "gui_attention_umap")
    viewer.close()


if __name__ == "__main__":
    main()
