"""Preprocess dock widget: run, cancel, resume, and the raw / illumination / corrected view."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_helpers import write_tiny_dataset

from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.metadata import DataError
from napari_wsdino._napari.preprocess_widget import PreprocessWidget, make_settings
from napari_wsdino._napari.state import TaskStatus, state_for


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def test_settings_from_widget_values():
    s = make_settings(0, 0, 0, 320, "zscore", "none")
    assert s.size is None and s.clip is None and s.illumination == "none"
    with pytest.raises(ValueError, match="set clip"):
        make_settings(0, 0, 0, 320, "paper", "fast")
    assert make_settings(24, 32, 5000, 40, "zscore", "fast").size == (24, 32)


def test_preprocess_cancel_resume_and_compare(make_napari_viewer, qtbot, tmp_path):
    data = write_tiny_dataset(tmp_path / "bbbc", plates=2, wells=2, sites=1, shape=(48, 64))
    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")[1]
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "2 Preprocess")[1]
    assert isinstance(widget, PreprocessWidget)
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert "Open a dataset" in widget.status_label.text()

    browser.open(data)
    assert "4 fields on 2 plates" in widget.dataset_label.text()
    assert widget.out_edit.text() == str(tmp_path / "bbbc_cache")
    widget.height_spin.setValue(24)
    widget.width_spin.setValue(32)
    widget.filter_spin.setValue(320)
    widget.workers_spin.setValue(1)

    # Cancel right away: no complete cache, nothing adopted
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    assert widget.cancel_button.isEnabled() and not widget.run_button.isEnabled()
    qtbot.mouseClick(widget.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=30_000)
    assert widget.status == TaskStatus.STOPPED and state.cache_path is None
    with pytest.raises(DataError):
        open_cache(widget.out_edit.text())

    # Run again: resumes / completes, and the cache becomes everyone's cache
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    cache = open_cache(tmp_path / "bbbc_cache")
    assert state.cache_path == cache.path and len(cache) == 4 and cache.shape == (24, 32)
    assert "Cache ready: 4 fields" in widget.status_label.text()

    widget.channel_combo.setCurrentText("Actin")
    qtbot.mouseClick(widget.compare_button, Qt.LeftButton)
    raw = viewer.layers["raw [Actin]"]
    fn = viewer.layers["illumination [Actin]"]
    corrected = viewer.layers["corrected [Actin]"]
    np.testing.assert_array_equal(raw.data, viewer.layers["Actin"].data)
    assert fn.data.shape == (48, 64) and float(fn.data.min()) >= 1.0
    np.testing.assert_array_equal(fn.data, cache.illumination("Week10_40111", "Actin"))
    assert corrected.data.shape == (24, 32)
    np.testing.assert_allclose(corrected.data, cache.images("Actin")[0].astype("f4"))
    np.testing.assert_allclose(corrected.scale, (2.0, 2.0))
    # side by side, right of the field, none overlapping
    lefts = [layer.extent.world[0][1] for layer in (raw, fn, corrected)]
    rights = [layer.extent.world[1][1] for layer in (raw, fn, corrected)]
    assert lefts[0] > viewer.layers["Actin"].extent.world[1][1]
    assert rights[0] < lefts[1] and rights[1] < lefts[2]

    # following the browser: another plate's field and function
    browser.plate_combo.setCurrentText("Week10_40115")
    assert raw.metadata["plate"] == "Week10_40115" and raw.data.mean() > 2500
    np.testing.assert_array_equal(fn.data, cache.illumination("Week10_40115", "Actin"))
    np.testing.assert_allclose(corrected.data, cache.images("Actin")[2].astype("f4"))

    # a new widget reuses the existing cache without running
    other = PreprocessWidget(viewer)
    assert other.out_edit.text() == str(tmp_path / "bbbc_cache")
    state.cache_path = None
    qtbot.mouseClick(other.use_button, Qt.LeftButton)
    assert state.cache_path == cache.path


def test_compare_layers_leave_with_their_field_or_dataset(make_napari_viewer, qtbot, tmp_path):
    """The comparison records its dataset and field; Next with Follow unchecked and another
    dataset opened both remove it: never a comparison of another field on the canvas."""
    from napari_wsdino.core.metadata import load_metadata
    from napari_wsdino.core.preprocess import preprocess
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino._napari.preprocess_widget import ROLE

    first = write_tiny_dataset(tmp_path / "first", plates=1, wells=2, sites=1, shape=(32, 40))
    second = write_tiny_dataset(tmp_path / "second", plates=1, wells=2, sites=1,
                                shape=(32, 40), seed=3)
    cache = run_to_end(preprocess(load_metadata(first), tmp_path / "cache",
                                  make_settings(16, 20, 0, 40, "zscore", "fast"), workers=1))
    viewer = make_napari_viewer()
    state = state_for(viewer)
    browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")[1]
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "2 Preprocess")[1]
    browser.open(first)
    widget.out_edit.setText(str(cache.path))
    qtbot.mouseClick(widget.use_button, Qt.LeftButton)

    def compared():
        return [layer for layer in viewer.layers if layer.metadata.get("wsdino_role") == ROLE]

    qtbot.mouseClick(widget.compare_button, Qt.LeftButton)
    assert len(compared()) == 3
    key = state.metadata.field_key(0)
    assert {(l.metadata["source"], l.metadata["field"]) for l in compared()} == {(str(first), key)}
    # Follow checked: Next moves the comparison to the next field
    qtbot.mouseClick(browser.next_button, Qt.LeftButton)
    assert {l.metadata["field"] for l in compared()} == {state.metadata.field_key(1)} != {key}
    # Follow unchecked: Next removes it
    widget.follow_check.setChecked(False)
    qtbot.mouseClick(browser.prev_button, Qt.LeftButton)
    assert state.field_index == 0 and compared() == []

    # another dataset opened: the first one's comparison leaves (Follow on or off)
    for follow in (False, True):
        browser.open(first)
        widget.follow_check.setChecked(follow)
        qtbot.mouseClick(widget.compare_button, Qt.LeftButton)
        assert len(compared()) == 3
        browser.open(second)
        assert state.source == second and compared() == [], follow


def test_panel_is_refused_while_another_process_writes_the_cache(make_napari_viewer, qtbot,
                                                                  tmp_path):
    """The panel takes the lock `wsdino preprocess` takes: while another process holds it,
    Run fails with one line naming that process, and writes nothing into the cache."""
    import subprocess
    import sys

    data = write_tiny_dataset(tmp_path / "bbbc", plates=1, wells=2, sites=1, shape=(48, 64))
    viewer = make_napari_viewer()
    browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")[1]
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "2 Preprocess")[1]
    browser.open(data)
    widget.height_spin.setValue(24)
    widget.width_spin.setValue(32)
    widget.workers_spin.setValue(1)
    out = tmp_path / "bbbc_cache"
    assert widget.out_edit.text() == str(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from napari_wsdino.core.fsio import writing\n"
         "with writing(sys.argv[1], 'this cache'):\n print('held', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        qtbot.mouseClick(widget.run_button, Qt.LeftButton)
        qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=30_000)
        text = widget.status_label.text()
        assert widget.status == TaskStatus.CRASHED
        assert f"is being written by process {holder.pid}" in text and "\n" not in text
        assert not out.exists()  # nothing written beside the holder
    finally:
        holder.kill()
        holder.wait()
    qtbot.mouseClick(widget.run_button, Qt.LeftButton)  # the holder gone: the panel runs
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=60_000)
    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    assert len(open_cache(out)) == 2
