"""Regenerate the GUI screenshots of docs/gui.md (run under a display or xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_gui_screenshots.py [WORKDIR]

Writes a small synthetic replica, preprocesses it, trains a tiny Tubulin model for
a few epochs on the CPU, and saves what the user sees: the plate browser, the
attention overlay with the Evaluate map, and the preprocessing comparison.
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
    import os

    os.environ.setdefault("NAPARI_WSDINO_CONFIG_DIR", str(WORK / "config"))
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_wsdino.core.metadata import load_metadata
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.preprocess import PreprocessSettings, preprocess
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.synth import make_replica
    from napari_wsdino.core.train import TrainConfig, train_channels

    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "replica"
    if not (data / "BBBC021_v1_image.csv").exists():
        make_replica(data, "mini", sites=1, size=(256, 320), seed=0, workers=2)
    meta = load_metadata(data)
    cache_dir = WORK / "cache"
    cache = run_to_end(preprocess(meta, cache_dir, PreprocessSettings(size=(128, 160)), workers=2))
    run = WORK / "run"
    if not (run / "Tubulin" / "checkpoint.pth").exists():
        cfg = TrainConfig(arch="wsdino_vit_pico_patch8", weak_label="compound", epochs=4,
                          batch_size=16, global_size=64, local_size=32, local_crops=4,
                          out_dim=1024, hidden_dim=256, bottleneck_dim=64, lr=5e-4,
                          min_lr=1e-5, warmup_epochs=1, device="cpu", checkpoint_every=1)
        run_to_end(train_channels(cache, cfg, run, ["Tubulin"]))
    trained = ModelSet.from_run(run)
    others = ModelSet.random("wsdino_vit_pico_patch8", ("DAPI", "Actin"), seed=0)
    models = ModelSet({"DAPI": others["DAPI"], "Tubulin": trained["Tubulin"],
                       "Actin": others["Actin"]}, kind="trained")

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(1600, 980)
    add = viewer.window.add_plugin_dock_widget
    browser = add("napari-wsdino", "1 Data - plate browser")[1]
    browser.open(data)
    taxol = int(np.flatnonzero(meta.table.compound.values == "taxol")[-1])
    from napari_wsdino._napari.state import state_for

    state = state_for(viewer)
    state.field_index = taxol
    grab(viewer, app, "gui_plate_browser")

    prep = add("napari-wsdino", "2 Preprocess")[1]
    prep._adopt(cache)
    prep.channel_combo.setCurrentText("Tubulin")
    prep.compare()
    grab(viewer, app, "gui_preprocess")
    for layer in [l for l in viewer.layers if l.metadata.get("wsdino_role") == "preprocess-compare"]:
        viewer.layers.remove(layer)
    viewer.window.remove_dock_widget(prep.parent() if prep.parent() else prep)

    state.models = models
    viewer.window.remove_dock_widget(browser.parent() if browser.parent() else browser)
    attention = add("napari-wsdino", "4 Attention")[1]
    attention.channel_combo.setCurrentText("Tubulin")
    attention.opacity_spin.setValue(0.45)
    attention.compute()
    wait(app, lambda: attention.status.value != "running")
    evaluate = add("napari-wsdino", "5 Evaluate", tabify=False)[1]
    evaluate.crop_spin.setValue(64)
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
