"""Every panel: scrolls, explains each control (tooltip), shows a progress bar when busy."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QScrollArea,
    QTabBar,
)

from napari_helpers import write_tiny_cache

from napari_wsdino._napari.state import state_for

PANELS = ("1 Data - plate browser", "1b Data - fetch BBBC021", "2 Preprocess", "3a Train",
          "3b Load models", "4 Attention", "5 Evaluate", "6 Compare model sets")
CONTROLS = (QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit)


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_WSDINO_CONFIG_DIR", str(tmp_path / "config"))


def test_every_control_has_a_tooltip_and_docks_scroll(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    cache = write_tiny_cache(tmp_path / "cache")
    state_for(viewer).cache_path = cache.path  # Train's channel boxes exist
    missing = []
    for name in PANELS:
        dock = viewer.window.add_plugin_dock_widget("napari-wsdino", name)[1]
        assert isinstance(dock.scroll, QScrollArea) and dock.scroll.widget() is dock.body
        assert dock.progress_bar.isHidden()
        for control in dock.findChildren(CONTROLS):
            if isinstance(control, QLineEdit) and isinstance(control.parent(), (QComboBox,
                                                                                 QAbstractSpinBox)):
                continue  # the editor inside an editable combo box / spin box
            if type(control) is QAbstractButton or isinstance(control.parent(), QTabBar):
                continue  # Qt's own: a table's corner button, a tab bar's scroll arrows
            if not control.toolTip():
                missing.append(f"{name}: {type(control).__name__} "
                               f"{getattr(control, 'text', lambda: '')()!r}")
    assert not missing, missing
