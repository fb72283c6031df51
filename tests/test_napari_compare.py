"""Compare dock widget: rows named by run folder, weak label and time; numbers in view."""

from __future__ import annotations

import json
import os
from datetime import datetime

import pytest
from napari_helpers import write_tiny_cache, write_tiny_run

from napari_wsdino.core.evaluate_workflow import evaluate_job
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.progress import run_to_end
from napari_wsdino._napari.compare_widget import TITLES
from napari_wsdino._napari.state import state_for

COMPOUNDS = ("taxol", "docetaxel", "ALLN", "MG-132", "DMSO")


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def _evaluate(cache, run):
    return run_to_end(evaluate_job(cache, ModelSet.from_run(run), tvn="paper", crop=16,
                                   device="cpu", level="treatments", method="pca"))


def test_compare_names_rows_by_run_weak_label_and_time_with_numbers_in_view(
        make_napari_viewer, qtbot, tmp_path):
    cache = write_tiny_cache(tmp_path / "cache", per_compound=4, size=32, compounds=COMPOUNDS)
    runs = tmp_path / "runs"
    runs_made = [write_tiny_run(runs / "wsdino_compound_vit_pico_e30_lr5e-4", "compound", seed=0),
                 write_tiny_run(runs / "plain_dino_vit_pico_e30", "none", seed=1)]
    evaluations = [_evaluate(cache, run) for run in runs_made]

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1280, 720)
    state = state_for(viewer)
    state.results = evaluations[0]  # before the dock opens: read from the state
    compare = viewer.window.add_plugin_dock_widget("napari-wsdino", "6 Compare model sets")[1]
    state.results = evaluations[1]  # after: added by the signal
    qtbot.waitUntil(lambda: compare.table.rowCount() == 2)
    # the dock's layout settles: its body as wide as the scroll area shows (no clipped edge)
    qtbot.waitUntil(lambda: compare.body.width() <= compare.scroll.viewport().width(),
                    timeout=5000)
    assert window.width() == 1280 and window.height() == 720

    # each row named by its run folder, its weak label and when it was evaluated
    table = compare.table
    names = [table.item(i, 0).text() for i in range(2)]
    for name, run, label, ev in zip(names, runs_made, ("compound", "none (plain DINO)"),
                                    evaluations):
        when = datetime.fromisoformat(ev.evaluated_at)
        assert name == f"{run.name} · weak label {label} · {when:%H:%M}"
        assert ev.label in table.item(names.index(name), 0).toolTip()  # the identity, on hover
    # the numbers come first after the name ...
    headers = [table.horizontalHeaderItem(j).text() for j in range(table.columnCount())]
    assert [h.replace("\n", " ") for h in headers] == \
        ["model set", "NSC", "NSCB", "mAP NSC", "mAP NSCB", "n"]
    assert table.item(1, 1).text() == f"{evaluations[1].result.nsc:.1%}"
    # ... and are in view in the dock of a 1280 x 720 window: inside the table's viewport,
    # and the table inside the dock's visible area (no horizontal scrolling)
    header, viewport = table.horizontalHeader(), table.viewport()
    for j in range(len(headers)):
        left = header.sectionViewportPosition(j)
        assert 0 <= left and left + header.sectionSize(j) <= viewport.width(), (
            headers[j], left, header.sectionSize(j), viewport.width())
    seen = compare.scroll.viewport()
    right = table.mapToGlobal(table.rect().topRight()).x()
    assert right <= seen.mapToGlobal(seen.rect().topRight()).x()
    assert table.horizontalScrollBar().value() == 0
    # names wrap into rows high enough for them
    assert all(table.rowHeight(i) >= table.sizeHintForRow(i) for i in range(2))

    # the legend holds every name whole (wrapped, never cut), below the bars, in the figure
    compare.canvas.draw()
    legend = compare.figure.legends[0]
    assert [t.get_text().replace("\n", " ") for t in legend.get_texts()] == names
    box, fig_box = legend.get_window_extent(), compare.figure.bbox
    ax_box = compare.figure.axes[0].get_window_extent()
    assert box.y1 <= ax_box.y0 and box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1
    assert [t.get_text() for t in compare.figure.axes[0].get_xticklabels()] == list(TITLES.values())
    # a look at it: WSDINO_COMPARE_SCREENSHOT=/tmp/compare_check.png pytest ...
    shot = os.environ.get("WSDINO_COMPARE_SCREENSHOT") or str(tmp_path / "compare.png")
    assert window.grab().save(shot)

    # the same evaluation again replaces its row (the identity label, not the name, decides)
    state.results = evaluations[0]
    assert table.rowCount() == 2


def test_loaded_results_show_their_run_weak_label_and_date(qtbot, tmp_path):
    from napari_wsdino._napari.compare_widget import CompareWidget

    class Viewer:  # the compare panel only needs the shared state of some viewer
        pass

    widget = CompareWidget(Viewer())
    qtbot.addWidget(widget)
    exported = tmp_path / "results.json"  # Evaluate's Results… export
    exported.write_text(json.dumps({"model_set": "trained (a, b) 123abc", "run": "moa_run",
                                    "weak_label": "moa", "evaluated_at": "2025-05-04T10:11:12",
                                    "nsc": 0.8, "nscb": 0.7, "map_nsc": 0.5, "map_nscb": 0.4}))
    cli = tmp_path / "baseline.json"  # wsdino evaluate --json: numbers only
    cli.write_text(json.dumps({"nsc": 0.5, "nscb": None, "map_nsc": 0.3, "map_nscb": None}))
    widget.add_file(exported)
    widget.add_file(cli)
    mtime = datetime.fromtimestamp(cli.stat().st_mtime)
    assert widget.names() == ["moa_run · weak label MoA · 2025-05-04",
                              f"baseline · {mtime:%H:%M}"]
    assert list(widget.frame().columns[-3:]) == ["run", "weak_label", "evaluated_at"]
    assert widget.frame()["evaluated_at"][0] == "2025-05-04T10:11:12"


def test_an_incomplete_evaluation_folder_is_flagged_not_shown(qtbot, tmp_path):
    """A results set cut short (no complete.json, or a file of it missing) is not added
    as if finished: the hint names the folder and the fix; a complete one is added."""
    from napari_wsdino._napari.compare_widget import CompareWidget
    from napari_wsdino.core.fsio import write_file_set

    class Viewer:
        pass

    widget = CompareWidget(Viewer())
    qtbot.addWidget(widget)
    numbers = json.dumps({"nsc": 0.6, "nscb": 0.5, "map_nsc": 0.4, "map_nscb": 0.3})
    ev = tmp_path / "EV"
    write_file_set(ev, {"treatment_profiles.csv": lambda p: p.write_text("Metadata_Treatment\n"),
                        "metrics.json": lambda p: p.write_text(numbers)})
    (ev / "complete.json").unlink()  # cut short before the set was marked
    assert not widget.add_path(ev / "metrics.json")
    assert widget.table.rowCount() == 0
    hint = widget.hint.text()
    assert f"{ev} holds an incomplete evaluation" in hint and "rerun 'wsdino evaluate" in hint
    write_file_set(ev, {"treatment_profiles.csv": lambda p: p.write_text("Metadata_Treatment\n"),
                        "metrics.json": lambda p: p.write_text(numbers)})
    (ev / "treatment_profiles.csv").unlink()  # marked, but a file of the set is gone
    assert not widget.add_path(ev) and widget.table.rowCount() == 0
    write_file_set(ev, {"treatment_profiles.csv": lambda p: p.write_text("Metadata_Treatment\n"),
                        "metrics.json": lambda p: p.write_text(numbers)})
    assert widget.add_path(ev / "metrics.json") and widget.add_path(ev)
    assert widget.table.rowCount() == 1 and widget.frame()["nsc"][0] == 0.6
    assert widget.names()[0].startswith("EV")
