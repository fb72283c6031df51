"""Fetch BBBC021 dock: fetch, stop / resume and a failing mirror, against 127.0.0.1 only.

The server and the tiny official-layout plates come from ``test_fetch`` (two plates,
three fields each, zipped as ``BBBC021_v1_images_<plate>.zip``).
"""

from __future__ import annotations

import pytest
from qtpy.QtCore import Qt

from test_fetch import PLATES, Site, _damage, _rows, _zip_plate, serve  # noqa: F401

from napari_wsdino.core import fetch as F
from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV
from napari_wsdino._napari import settings
from napari_wsdino._napari.fetch_widget import FetchWidget, make_request
from napari_wsdino._napari.state import TaskStatus, state_for

WAIT_MS = 20_000


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def official(bundled_dir):
    """Metadata tables and two zipped plates; one field made unannotated (not in the
    MoA table), as the official image CSV has thousands of them."""
    rows = _rows(bundled_dir)
    rows.loc[0, "Image_Metadata_Compound"] = "not-in-the-moa-table"
    files = {
        IMAGE_CSV: rows.to_csv(index=False).encode(),
        MOA_CSV: (bundled_dir / MOA_CSV).read_bytes(),
        F.COMPOUND_CSV: b"compound,smiles\ntaxol,C\n",
    }
    for i, plate in enumerate(PLATES):
        files[F.archive_name(plate)] = _zip_plate(plate, rows, seed=i)
    return files


def _docks(viewer):
    browser = viewer.window.add_plugin_dock_widget("napari-wsdino", "1 Data - plate browser")[1]
    widget = viewer.window.add_plugin_dock_widget("napari-wsdino", "1b Data - fetch BBBC021")[1]
    assert isinstance(widget, FetchWidget)
    return browser, widget


def _fill(widget, dest, url, plates=", ".join(PLATES)):
    widget.dest_edit.setText(str(dest))
    widget.choice_combo.setCurrentText("These plates")
    widget.plates_edit.setText(plates)
    widget.url_edit.setText(url)


def _fetch(qtbot, widget):
    qtbot.mouseClick(widget.fetch_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=WAIT_MS)


def test_request_from_widget_values(tmp_path):
    r = make_request(str(tmp_path), "list", "Week1_22123, Week1_22141 Week1_22123", False, "")
    assert r.plates == ("Week1_22123", "Week1_22141") and r.base_url == F.DEFAULT_BASE_URL
    assert r.kwargs()["plates"] == ["Week1_22123", "Week1_22141"]
    assert make_request(str(tmp_path), "moa", "x", False, "file:///m").kwargs()["subset"] == "moa"
    assert make_request(str(tmp_path), "all", "", True, "http://m/").kwargs()["all_plates"]
    with pytest.raises(F.FetchError, match="destination"):
        make_request(" ", "moa", "", False, "")
    with pytest.raises(F.FetchError, match="at least one plate"):
        make_request(str(tmp_path), "list", " , ", False, "")
    with pytest.raises(F.FetchError, match="http://"):
        make_request(str(tmp_path), "moa", "", False, "ftp.example.org/BBBC021")


def test_fetch_opens_the_plates_in_the_browser(make_napari_viewer, qtbot, tmp_path, serve,
                                                official):
    url = serve(Site(official))
    dest = tmp_path / "BBBC021"
    viewer = make_napari_viewer()
    browser, widget = _docks(viewer)
    assert widget.url_edit.text() == F.DEFAULT_BASE_URL and not widget.stop_button.isEnabled()
    _fill(widget, dest, url)
    _fetch(qtbot, widget)

    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    assert widget.result.completed == list(PLATES)
    for plate in PLATES:
        assert F.is_plate_complete(dest, plate)
        assert len(list((dest / plate).glob("*.tif"))) == 9
    assert widget.file_bar.value() == widget.file_bar.maximum()
    # adopted by the shared state: the browser lists the plates and shows a field
    state = state_for(viewer)
    assert state.source == dest and set(state.metadata.table.plate) == set(PLATES)
    assert len(state.metadata.table) == 5  # 6 fields, one without a MoA left out
    combo = [browser.plate_combo.itemText(i) for i in range(browser.plate_combo.count())]
    assert combo == sorted(PLATES)
    assert {"DAPI", "Tubulin", "Actin"} <= {layer.name for layer in viewer.layers}
    assert "2 plate(s) fetched" in widget.status_label.text()
    assert "5 fields on 2 plate(s)" in widget.status_label.text()

    # destination and base URL persist; the plate browser proposes the folder next time
    saved = settings.load_settings()
    assert saved["browser.last_folder"] == str(dest)
    again = FetchWidget(viewer)
    assert again.dest_edit.text() == str(dest) and again.url_edit.text() == url
    assert again.choice_combo.currentText() == "These plates"
    again.deleteLater()

    # a rerun skips the complete plates
    _fetch(qtbot, widget)
    assert widget.status == TaskStatus.DONE and widget.result.skipped == list(PLATES)


def test_stop_keeps_the_partial_download_and_fetch_resumes(make_napari_viewer, qtbot, tmp_path,
                                                            serve, official):
    site = Site(official)
    archive = F.archive_name(PLATES[0])
    site.faults[archive] = {"mode": "stall", "times": 1, "at": 1000}
    url = serve(site)
    dest = tmp_path / "d"
    viewer = make_napari_viewer()
    _, widget = _docks(viewer)
    _fill(widget, dest, url, plates=PLATES[0])

    qtbot.mouseClick(widget.fetch_button, Qt.LeftButton)
    assert widget.status == TaskStatus.RUNNING and not widget.fetch_button.isEnabled()
    qtbot.waitUntil(lambda: bool(site.gets(archive)), timeout=WAIT_MS)  # the archive is stalling
    qtbot.mouseClick(widget.stop_button, Qt.LeftButton)
    assert "Stopping" in widget.status_label.text()
    site.stop.set()  # end the stall now: the connection closes after 1000 bytes
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=WAIT_MS)
    assert widget.status == TaskStatus.STOPPED, widget.status_label.text()
    assert "press Fetch to resume" in widget.status_label.text()
    assert (dest / F.DOWNLOAD_DIR / (archive + ".part")).stat().st_size == 1000
    assert not (dest / PLATES[0]).exists() and state_for(viewer).metadata is None
    assert widget.fetch_button.isEnabled() and not widget.stop_button.isEnabled()

    _fetch(qtbot, widget)
    assert widget.status == TaskStatus.DONE, widget.status_label.text()
    assert site.gets(archive)[-1] == "bytes=1000-"  # resumed, not restarted
    assert F.is_plate_complete(dest, PLATES[0])
    assert set(state_for(viewer).metadata.table.plate) == {PLATES[0]}


def test_missing_files_show_an_error_naming_the_url(make_napari_viewer, qtbot, tmp_path, serve,
                                                    official):
    from napari.utils.notifications import notification_manager

    url = serve(Site({}))  # every file answers 404
    viewer = make_napari_viewer()
    _, widget = _docks(viewer)
    _fill(widget, tmp_path / "d", url)
    before = len(notification_manager.records)
    qtbot.mouseClick(widget.fetch_button, Qt.LeftButton)
    assert widget.status == TaskStatus.RUNNING  # the click returned: the work is in a worker
    qtbot.waitUntil(lambda: widget.status != TaskStatus.RUNNING, timeout=WAIT_MS)

    assert widget.status == TaskStatus.CRASHED
    text = widget.status_label.text()
    assert text.startswith("Fetch failed") and url + IMAGE_CSV in text and "404" in text
    notes = [str(r.message) for r in notification_manager.records[before:]]
    assert any(url + IMAGE_CSV in n for n in notes), notes
    assert widget.fetch_button.isEnabled() and state_for(viewer).metadata is None

    # a plate missing on the mirror: named with its URL before anything is downloaded
    files = dict(official)
    del files[F.archive_name(PLATES[1])]
    url = serve(Site(files))
    _fill(widget, tmp_path / "e", url)
    _fetch(qtbot, widget)
    assert widget.status == TaskStatus.CRASHED
    text = widget.status_label.text()
    assert f"plate {PLATES[1]}" in text and url + F.archive_name(PLATES[1]) in text

    # a plate damaged on the mirror: it fails with its URL, the finished one is opened
    files = dict(official)
    files[F.archive_name(PLATES[1])] = _damage(official[F.archive_name(PLATES[1])])
    url = serve(Site(files))
    _fill(widget, tmp_path / "f", url)
    _fetch(qtbot, widget)
    assert widget.status == TaskStatus.CRASHED
    text = widget.status_label.text()
    assert f"plate {PLATES[1]}" in text and url + F.archive_name(PLATES[1]) in text
    qtbot.waitUntil(lambda: state_for(viewer).metadata is not None, timeout=WAIT_MS)
    assert set(state_for(viewer).metadata.table.plate) == {PLATES[0]}
    assert "Opened in the plate browser" in widget.status_label.text()
