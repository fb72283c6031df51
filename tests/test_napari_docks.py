"""Every panel: scrolls, explains each control (tooltip), shows a progress bar when busy;
the dock base class: one place for the task's status, stop and failure, and form helpers."""

from __future__ import annotations

import time

import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractSpinBox,
    QComboBox,
    QLineEdit,
    QScrollArea,
    QTabBar,
)

from napari_helpers import write_tiny_cache

from napari_wsdino.core.progress import Progress
from napari_wsdino._napari.dock import (
    WorkerDock, button, combo, data_combo, double_spin, hrow, spin,
)
from napari_wsdino._napari.state import TaskStatus, state_for

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


def test_tabbed_docks_show_whole_titles_at_1280_x_720(make_napari_viewer, qtbot):
    """Issue 28: tabbed at 1280 x 720 the tabs read "3a…"; now each shows a short whole
    title (never elided: the bar scrolls when they do not all fit)."""
    from qtpy.QtWidgets import QApplication

    from napari_wsdino._napari.dock import tab_title

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1280, 720)
    shown = PANELS[:1] + PANELS[2:]  # as the walkthrough opens them (fetch aside)
    for name in shown:
        viewer.window.add_plugin_dock_widget("napari-wsdino", name)
        QApplication.processEvents()
    titles = [tab_title(f"{name} (napari-wsdino)") for name in shown]
    assert titles == ["1 Data", "2 Preprocess", "3a Train", "3b Models", "4 Attention",
                      "5 Evaluate", "6 Compare"]

    def bar():
        bars = [b for b in window.findChildren(QTabBar) if b.parentWidget() is window
                and b.count() == len(shown)]
        return bars[0] if bars else None

    qtbot.waitUntil(lambda: bar() is not None and bar().elideMode() == Qt.ElideNone,
                    timeout=10_000)
    tabs = bar()
    assert [tabs.tabText(i) for i in range(tabs.count())] == titles
    assert tabs.usesScrollButtons()
    text = tabs.fontMetrics()
    assert all(tabs.tabRect(i).width() > text.horizontalAdvance(t) for i, t in enumerate(titles))


class _Dock(WorkerDock):
    """The smallest panel: one Start and one Stop button over the base's task handling."""

    failed_text = "Counting failed"
    stopping_text = "Stopping soon…"
    stopped_text = "Stopped; start again to count anew."

    def __init__(self, viewer):
        super().__init__(viewer)
        self.start_button = button("Start", "start", lambda: None)
        self.stop_button = button("Stop", "stop", self.stop_task)
        self.idle_controls, self.busy_controls = (self.start_button,), (self.stop_button,)
        self.stack(hrow(self.start_button, self.stop_button), self.status_label, 1)
        self.set_running(False)
        self.results = []


def _count(n, fail_at=None, pause=0.0):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"no {i}")
        yield Progress("count", i + 1, n, f"counted {i + 1}")
        time.sleep(pause)
    return n


def test_dock_base_handles_done_stop_and_failure(make_napari_viewer, qtbot):
    dock = _Dock(make_napari_viewer())
    assert dock.start_button.isEnabled() and not dock.stop_button.isEnabled()
    lines, seen = [], []
    dock.start_task(_count(10, pause=0.05), "Counting…", on_done=dock.results.append,
                    on_progress=lambda e: seen.append(e.step),
                    describe=lambda e: lines.append((e.message, dock.running)) or e.message)
    assert dock.running and dock.status_label.text() == "Counting…"
    assert not dock.start_button.isEnabled() and dock.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not dock.running, timeout=10_000)
    assert dock.status == TaskStatus.DONE and dock.results == [10]
    qtbot.waitUntil(lambda: len(seen) == 10, timeout=10_000)  # events may trail the result
    # the status line follows the events only while the task runs
    assert lines and all(running for _, running in lines)
    assert {m for m, _ in lines} <= {f"counted {i}" for i in range(1, 11)}
    assert dock.start_button.isEnabled() and not dock.stop_button.isEnabled()

    dock.start_task(_count(10_000, pause=0.01), "Counting…", on_done=dock.results.append,
                    describe=lambda e: e.message)
    qtbot.waitUntil(lambda: dock.status_label.text().startswith("counted"), timeout=10_000)
    qtbot.mouseClick(dock.stop_button, Qt.LeftButton)
    assert dock.stopping and dock.status_label.text() == "Stopping soon…"
    assert not dock.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not dock.running, timeout=10_000)
    assert dock.status == TaskStatus.STOPPED and dock.results == [10]
    assert dock.status_label.text() == "Stopped; start again to count anew."
    assert dock.start_button.isEnabled() and not dock.stop_button.isEnabled()

    dock.start_task(_count(5, fail_at=2), "Counting…", on_done=dock.results.append)
    qtbot.waitUntil(lambda: not dock.running, timeout=10_000)
    assert dock.status == TaskStatus.CRASHED and dock.results == [10]
    assert dock.status_label.text() == "Counting failed: no 2"
    assert dock.start_button.isEnabled() and not dock.stop_button.isEnabled()


def test_form_helpers_build_what_they_say(qtbot):
    assert (spin(1, 10, 99).value(), spin(1, 10, "4").value()) == (10, 4)
    lr = double_spin(1e-8, 1.0, 4e-6, step=1e-6, decimals=8)
    assert (lr.value(), lr.decimals(), lr.singleStep()) == (4e-6, 8, 1e-6)
    assert combo(("a", "b"), "b").currentText() == "b"
    assert combo(("a", "b"), "zz").currentText() == "a"  # an unknown saved value: the first
    assert data_combo((("A", 1), ("B", 2)), 2).currentData() == 2
    assert data_combo((("A", 1), ("B", 2)), 7).currentData() == 1
    clicks = []
    b = button("Go", "go now", lambda: clicks.append(1))
    qtbot.addWidget(b)
    qtbot.mouseClick(b, Qt.LeftButton)
    assert clicks == [1] and b.toolTip() == "go now"


def test_panel_defaults_and_choices_are_the_cores(make_napari_viewer):
    """Each default and list a panel offers is read from core (one place to change it)."""
    from napari_wsdino.core.model import ARCHITECTURES
    from napari_wsdino.core.preprocess import ILLUMINATION_METHODS, NORMALIZATIONS, PreprocessSettings
    from napari_wsdino.core.sampler import WEAK_LABEL_INFO
    from napari_wsdino.core.train import TrainConfig
    from napari_wsdino.core.attention import DEFAULT_KEEP, DISPLAY_MODE, MODES
    from napari_wsdino.core.presets import DEFAULT_PRESET, PRESETS
    from napari_wsdino.core.projection import METHODS as PROJECTIONS
    from napari_wsdino.core.train import DEVICES
    from napari_wsdino.core.tvn import DEFAULT_TVN, METHODS

    viewer = make_napari_viewer()
    dock = lambda name: viewer.window.add_plugin_dock_widget("napari-wsdino", name)[1]  # noqa: E731
    items = lambda box: [box.itemText(i) for i in range(box.count())]  # noqa: E731
    data = lambda box: [box.itemData(i) for i in range(box.count())]  # noqa: E731

    from napari_wsdino._napari.train_widget import preset_config
    from napari_wsdino.core.presets import DEFAULT_PRESET

    # A fresh panel shows the default preset's settings (TrainConfig's, with its overrides).
    train, cfg = dock("3a Train"), preset_config(DEFAULT_PRESET)
    assert data(train.weak_combo) == list(WEAK_LABEL_INFO)
    assert items(train.weak_combo) == [w.title for w in WEAK_LABEL_INFO.values()]
    assert train.weak_combo.itemData(0, Qt.ToolTipRole) == WEAK_LABEL_INFO["none"].help
    assert items(train.arch_combo) == list(ARCHITECTURES)
    from napari_wsdino.core.presets import PRESET_TITLES

    assert data(train.preset_combo) == list(PRESET_TITLES)
    assert items(train.preset_combo) == list(PRESET_TITLES.values())
    assert train.values() == {k: getattr(cfg, k) for k in train.values()}  # every widget
    assert items(dock("3b Load models").arch_combo) == list(ARCHITECTURES)

    prep, settings = dock("2 Preprocess"), PreprocessSettings()
    assert items(prep.norm_combo) == list(NORMALIZATIONS)
    assert items(prep.illum_combo) == list(ILLUMINATION_METHODS)
    assert prep.prep_settings() == settings

    evaluate = dock("5 Evaluate")
    assert items(evaluate.tvn_combo) == list(METHODS)
    assert evaluate.tvn_combo.currentText() == DEFAULT_TVN
    # no cache and no recipe chosen: the default preset's crop (core.presets)
    assert evaluate.crop_spin.value() == PRESETS[DEFAULT_PRESET].embed_crop
    assert items(evaluate.device_combo) == list(DEVICES) and items(evaluate.method_combo) == list(
        PROJECTIONS)
    assert (evaluate.device_combo.currentText(), evaluate.method_combo.currentText()) == (
        DEVICES[0], PROJECTIONS[0])

    attention = dock("4 Attention")
    assert items(attention.mode_combo) == list(MODES)
    assert attention.mode_combo.currentText() == DISPLAY_MODE
    assert attention.keep_spin.value() == DEFAULT_KEEP
