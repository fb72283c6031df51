"""How long opening the Train panel holds napari's window (issue 28: < 300 ms).

Each measurement is a fresh interpreter (the first opening is the one that pays for
imports: torch and timm are imported once per process): it opens a napari viewer, lets it
settle, then times ``viewer.window.add_plugin_dock_widget("napari-wsdino", "3a Train")``:
the plugin's modules imported by npe2 and the panel constructed and docked, all on the GUI
thread. It also records the first paint after it (the panel's ``showEvent``), whether torch
was imported by then, when the background import of the training code had finished, and
the longest stall of the event loop meanwhile (a 10 ms loop of ``processEvents``: GUI work
and waits for the GIL held by the importing worker).

``--after "1 Data - plate browser"`` opens that panel first (as the workflow does), so the
plugin's shared modules and pandas are already imported when Train opens.

Run under a display (``xvfb-run -a``) with the Qt binding napari uses::

    QT_API=pyqt6 xvfb-run -a python benchmarks/train_panel_open.py --repeats 5

Settings are read from an empty folder (``NAPARI_WSDINO_CONFIG_DIR``), so every run opens
the panel with its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PLUGIN, PANEL = "napari-wsdino", "3a Train"


def measure(after: str = "") -> dict:
    """One opening, in this (fresh) interpreter: times in ms."""
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    if after:
        viewer.window.add_plugin_dock_widget(PLUGIN, after)
    for _ in range(20):  # let the window settle
        app.processEvents()
        time.sleep(0.01)
    start = time.perf_counter()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, PANEL)
    constructed = time.perf_counter()
    torch_at_construction = "torch" in sys.modules
    app.processEvents()
    painted = time.perf_counter()
    deadline = time.perf_counter() + 120
    stall, last = 0.0, time.perf_counter()
    while not getattr(widget, "training_ready", True) and time.perf_counter() < deadline:
        app.processEvents()
        time.sleep(0.01)
        now = time.perf_counter()
        stall, last = max(stall, now - last - 0.01), now
    ready = time.perf_counter()
    out = {
        "construct_ms": 1000 * (constructed - start),
        "first_paint_ms": 1000 * (painted - start),
        "background_ready_ms": 1000 * (ready - start),
        "max_stall_ms": 1000 * stall,
        "torch_at_construction": torch_at_construction,
        "devices": [widget.device_combo.itemText(i) for i in range(widget.device_combo.count())],
    }
    viewer.close()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--after", default="", help="a panel opened before Train")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.after)))
        return
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as config:
            env = {**os.environ, "NAPARI_WSDINO_CONFIG_DIR": config}
            done = subprocess.run([sys.executable, __file__, "--child", "--after", args.after],
                                  env=env,
                                  capture_output=True, text=True, check=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"run {i + 1}: construct {run['construct_ms']:.0f} ms, first paint "
              f"{run['first_paint_ms']:.0f} ms, torch imported at construction: "
              f"{run['torch_at_construction']}, training code ready after "
              f"{run['background_ready_ms']:.0f} ms (longest stall meanwhile "
              f"{run['max_stall_ms']:.0f} ms); devices {run['devices']}", flush=True)
    for key in ("construct_ms", "first_paint_ms", "background_ready_ms", "max_stall_ms"):
        values = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(values):.0f}, max {max(values):.0f} "
              f"(n={len(values)})")
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
