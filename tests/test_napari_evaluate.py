"""Evaluate dock widget: one click to numbers, confusion matrix and a clickable map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qtpy.QtCore import QEvent, QPoint, QPointF, Qt
from qtpy.QtGui import QMouseEvent
from qtpy.QtWidgets import QApplication, QFileDialog

from napari_helpers import write_tiny_cache

from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino._napari.evaluate_widget import EvaluateWidget, profiles_path_for
from napari_wsdino._napari.state import TaskStatus, state_for

COMPOUNDS = ("taxol", "docetaxel", "ALLN", "MG-132", "DMSO")


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def _qt_pos(scatter, i):
    """Where point ``i`` of the map is, in the canvas widget's (logical) pixels."""
    x, y = scatter.ax.transData.transform(scatter.collection.get_offsets()[i])
    dpr = scatter.canvas.device_pixel_ratio
    return QPoint(int(round(x / dpr)), int(round(scatter.figure.bbox.height / dpr - y / dpr)))


def test_evaluate_cancel_then_results_map_and_exports(make_napari_viewer, qtbot, tmp_path,
                                                     monkeypatch):
    cache = write_tiny_cache(tmp_path / "cache", per_compound=8, size=32, compounds=COMPOUNDS,
                             dataset=tmp_path / "bbbc")
    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")[1]
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "5 Evaluate")[1]
    compare = viewer.window.add_plugin_dock_widget("napari-wsdino", "6 Compare model sets")[1]
    assert isinstance(widget, EvaluateWidget) and compare.table.rowCount() == 0
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert "Load a model set" in widget.status_label.text()
    assert not widget.export_results_button.isEnabled()

    browser.open(tmp_path / "bbbc")
    state.cache_path = cache.path
    state.models = ModelSet.random("test_vit", ("DAPI", "Tubulin", "Actin"), seed=0)
    assert "random" in widget.inputs_label.text()
    widget.method_combo.setCurrentText("pca")  # UMAP's first-call JIT is too slow for CI
    widget.crop_spin.setValue(16)
    widget.device_combo.setCurrentText("cpu")

    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.mouseClick(widget.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=30_000)
    assert widget.status == TaskStatus.STOPPED and state.results is None

    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    ev = widget.evaluation
    assert state.results is ev and len(ev.profiles) == 40

    # the numbers are the core's numbers on the written profiles
    ref = evaluate_profiles(ProfileTable.read(profiles_path_for(cache, state.models)), "paper")
    numbers = {widget.numbers.item(i, 0).text(): widget.numbers.item(i, 1).text()
               for i in range(widget.numbers.rowCount())}
    assert numbers["NSC"] == f"{ref.nsc:.1%}" and numbers["fields"] == "40"
    assert numbers["treatments (NSC)"] == str(ref.n_nsc)
    assert compare.table.rowCount() == 1 and compare.table.item(0, 1).text() == f"{ref.nsc:.1%}"
    assert compare.table.item(0, 0).text().startswith("random (seed 0) · ")
    moas = {widget.per_moa.item(i, 0).text() for i in range(widget.per_moa.rowCount())}
    assert moas == set(ref.per_moa) and "Protein degradation" in moas

    # one map point per treatment profile, named on hover
    scatter = widget.map
    n = len(ev.result.treatments)
    assert len(scatter.collection.get_offsets()) == n == ev.xy.shape[0] >= 6
    far = int(np.argmax(np.linalg.norm(ev.xy - ev.xy.mean(0), axis=1)))  # a point nobody hides
    pos = _qt_pos(scatter, far)
    QApplication.sendEvent(scatter.canvas, QMouseEvent(
        QEvent.MouseMove, QPointF(pos), Qt.NoButton, Qt.NoButton, Qt.NoModifier))
    treatment = ev.result.treatments.meta["Metadata_Treatment"].iloc[far]
    assert scatter.annotation.get_visible() and scatter.annotation.get_text().startswith(treatment)
    # hovering never re-lays out the map (the label is outside the layout)
    box = scatter.ax.get_position().bounds
    scatter.canvas.draw()
    assert scatter.ax.get_position().bounds == pytest.approx(box, abs=1e-3)
    assert not scatter.annotation.get_in_layout()
    legend = scatter.ax.get_legend()  # every MoA, beside the map, inside the figure
    moas = set(ev.result.treatments.meta["Metadata_MoA"])
    assert {t.get_text() for t in legend.get_texts()} == moas
    fig_box = scatter.figure.bbox
    leg_box = legend.get_window_extent()
    assert leg_box.x1 <= fig_box.x1 + 1 and leg_box.y0 >= fig_box.y0 - 1

    # the confusion matrix names its axes: true MoA rows, predicted MoA columns
    widget.tabs.setCurrentWidget(widget.confusion_tab)
    ax = widget.confusion_figure.axes[0]
    assert ax.get_ylabel() == "true MoA" and ax.get_xlabel().startswith("predicted MoA")
    assert "MoA confusion (NSC)" in ax.get_title()
    widget.tabs.setCurrentIndex(0)
    # every number has a "what this means" line
    meaning = {widget.numbers.item(i, 0).text(): widget.numbers.item(i, 2).text()
               for i in range(widget.numbers.rowCount())}
    assert "another compound" in meaning["NSC"] and "batch" in meaning["NSCB"]
    assert "precision" in meaning["mAP (NSC)"] and "Ledoit-Wolf" in meaning["TVN"]

    # clicking it opens a field of that treatment in the viewer, from a field of another
    import tifffile

    table = state.metadata.table
    before = int(np.flatnonzero(table.treatment.to_numpy() != treatment)[0])
    state.field_index = before
    assert viewer.layers["DAPI"].metadata["treatment"] != treatment
    qtbot.mouseClick(scatter.canvas, Qt.LeftButton, pos=pos)
    shown = state.field_index
    assert shown != before and table.treatment[shown] == treatment
    assert viewer.layers["DAPI"].metadata["treatment"] == treatment
    np.testing.assert_array_equal(np.asarray(viewer.layers["DAPI"].data, np.float64),
                                  tifffile.imread(table.path_DAPI[shown]).astype(np.float64))

    widget.colour_combo.setCurrentText("compound")
    legend = [t.get_text() for t in scatter.ax.get_legend().get_texts()]
    assert set(legend) == set(ev.result.treatments.meta["Metadata_Compound"])
    widget.colour_combo.setCurrentText("concentration")
    assert scatter.colorbar is not None and "(µM)" in scatter.colorbar.ax.get_ylabel()

    # well profiles instead of treatments: one point per well, a click opens that well
    widget.level_combo.setCurrentText("wells")
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    ev = widget.evaluation
    wells = cache.table.groupby(["plate", "well"]).ngroups
    assert ev.level == "wells" and len(scatter.collection.get_offsets()) == wells
    far = int(np.argmax(np.linalg.norm(ev.xy - ev.xy.mean(0), axis=1)))
    qtbot.mouseClick(scatter.canvas, Qt.LeftButton, pos=_qt_pos(scatter, far))
    row = ev.points.meta.iloc[far]
    assert (viewer.layers["DAPI"].metadata["plate"], viewer.layers["DAPI"].metadata["well"]) == \
        (str(row["Metadata_Plate"]), str(row["Metadata_Well"]))
    assert compare.table.rowCount() == 1  # same model set: its row is replaced

    # exports, through the buttons and the save dialogs
    chosen = {}
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(chosen["path"]), chosen.get("filter", ""))))
    chosen["path"] = tmp_path / "out" / "results.json"
    (tmp_path / "out").mkdir()
    qtbot.mouseClick(widget.export_results_button, Qt.LeftButton)
    data = json.loads(chosen["path"].read_text())
    assert data["nsc"] == pytest.approx(ref.nsc) and data["model_set"].startswith("random")
    # ... with what 6 Compare names a row by: run (here the seed), weak label, when
    assert (data["run"], data["weak_label"]) == ("random (seed 0)", "")
    assert data["evaluated_at"] == ev.evaluated_at != ""
    chosen["path"] = tmp_path / "out" / "profiles.csv"
    qtbot.mouseClick(widget.export_profiles_button, Qt.LeftButton)
    assert len(ProfileTable.read(chosen["path"])) == 40
    chosen["path"], chosen["filter"] = tmp_path / "out" / "figs.svg", "SVG (*.svg)"
    qtbot.mouseClick(widget.export_figures_button, Qt.LeftButton)
    svgs = sorted(p.name for p in (tmp_path / "out" / "figs").iterdir())
    assert "confusion_nsc.svg" in svgs and "map_wells.svg" in svgs and "per_moa.svg" in svgs


def test_compare_table_chart_and_persistence(qtbot, tmp_path, monkeypatch):
    from napari_wsdino._napari.compare_widget import CompareWidget

    class Viewer:  # the compare panel only needs the shared state of some viewer
        pass

    viewer = Viewer()
    widget = CompareWidget(viewer)
    qtbot.addWidget(widget)
    for name, nsc, nscb in (("init-only", 0.5, 0.4), ("WS-DINO compound", 0.9, None)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"model_set": name, "nsc": nsc, "nscb": nscb, "map_nsc": 0.3, "map_nscb": None,
             "n_nsc": 92}))
    monkeypatch.setattr(QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "init-only.json"), "")))
    qtbot.mouseClick(widget.add_button, Qt.LeftButton)
    widget.add_file(tmp_path / "WS-DINO compound.json")
    widget.add_file(tmp_path / "init-only.json")  # same label: replaced, not duplicated
    # named by the file's model set and its time (files that do not say when: their mtime)
    names = [widget.table.item(i, 0).text() for i in range(2)]
    assert [n.split(" · ")[0] for n in names] == ["WS-DINO compound", "init-only"]
    assert widget.table.item(0, 1).text() == "90.0%" and widget.table.item(0, 2).text() == "–"
    ax = widget.figure.axes[0]
    assert len(ax.patches) == 2 * 4
    assert [t.get_text().replace("\n", " ") for t in widget.figure.legends[0].get_texts()] == names
    # rows survive a restart; removing and clearing work
    again = CompareWidget(Viewer())
    qtbot.addWidget(again)
    assert again.table.rowCount() == 2
    again.table.selectRow(0)
    qtbot.mouseClick(again.remove_button, Qt.LeftButton)
    assert list(again.frame()["model set"]) == ["init-only"]
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "cmp.csv"), "")))
    qtbot.mouseClick(again.export_button, Qt.LeftButton)
    assert (tmp_path / "cmp.csv").read_text().splitlines()[1].startswith("init-only,0.5")
    qtbot.mouseClick(again.clear_button, Qt.LeftButton)
    assert again.table.rowCount() == 0


def test_why_line_when_a_fine_tune_scored_as_its_initial_weights(make_napari_viewer, tmp_path):
    """Issue 28: a trained run whose NSC / NSCB equal its initial weights' says why (the
    decision is core.why's; the panel shows it under the numbers)."""
    import dataclasses

    from napari_wsdino.core import layout
    from napari_wsdino.core.evaluate_workflow import evaluate_job
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.train.settings import TrainConfig

    cache = write_tiny_cache(tmp_path / "cache", per_compound=4, size=32, compounds=COMPOUNDS)
    models = ModelSet.random("test_vit", ("DAPI", "Tubulin", "Actin"), seed=0)
    ev = run_to_end(evaluate_job(cache, models, tvn="paper", crop=16, device="cpu",
                                 level="treatments", method="pca"))
    run = tmp_path / "runs" / "compound_e2"
    layout.channel_dir(run, "DAPI").mkdir(parents=True)
    TrainConfig(epochs=2, warmup_epochs=3, lr=1e-4, init="replica-dino-pico8-cells").save(
        layout.config_path(run, "DAPI"))
    layout.log_path(run, "DAPI").write_text('{"epoch": 2, "step": 6, "loss": 1, "lr": 1e-5}\n')
    init = dataclasses.replace(ev, label="init-only (test_vit) 111111",
                               run="init-only replica-dino-pico8-cells")
    trained = dataclasses.replace(ev, label="trained (test_vit) 222222", run="compound_e2")

    viewer = make_napari_viewer()
    state = state_for(viewer)
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "5 Evaluate")[1]
    state.model_path = run
    state.results = init
    assert "Why the same as the initial weights" not in widget.status_label.text()
    state.results = trained
    widget._show(trained)
    text = widget.status_label.text()
    assert "Why the same as the initial weights" in text and "only 6 steps" in text
    assert "warm-up (3 epochs)" in text and "Try more epochs" in text
