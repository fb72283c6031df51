"""The base of the WS-DINO panels: shared state, status, a worker, and form helpers.

Every panel builds its controls on ``self.body`` (inside a scroll area, so a short
window never hides a control); the base keeps the progress bar under it, shows input
errors as a napari notification as well as in the dock, and runs one core generator at
a time through :func:`napari_wsdino._napari.workers.start_worker`.

The task's life is handled here once: :meth:`WorkerDock.start_task` marks the dock
running, :meth:`WorkerDock.stop_task` asks the task to stop, and the base's handlers
set :class:`~napari_wsdino._napari.state.TaskStatus` (done / stopped / crashed), turn
the panel's controls on and off and write the status line. A panel names its controls
(``idle_controls``: Start, Run, its inputs; ``busy_controls``: Stop, Cancel) and its words
(``failed_text``, ``stopping_text``, ``stopped_text``); the helpers at the end of the
module (:func:`spin`, :func:`combo`, :func:`button`, :func:`hrow`, ...) build its form.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLayout,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabBar,
    QVBoxLayout,
    QWidget,
)

from napari.utils.notifications import show_warning

from napari_wsdino.core.progress import Progress
from napari_wsdino._napari import settings
from napari_wsdino._napari.state import TaskStatus, state_for
from napari_wsdino._napari.workers import start_worker

if TYPE_CHECKING:
    import napari

DOCS = "https://github.com/napari-wsdino/napari-wsdino/blob/main/docs/"
#: napari names a plugin's dock "NAME (napari-wsdino)"; tabbed at 1280 px, that is cut to
#: "3a…". A tab shows the manifest's display name, shortened here (the dock's own title bar
#: keeps the whole name; Qt gives each tab its title as tooltip).
PLUGIN_SUFFIX = " (napari-wsdino)"
TAB_TITLES = {"1 Data - plate browser": "1 Data", "1b Data - fetch BBBC021": "1b Fetch",
              "3b Load models": "3b Models", "6 Compare model sets": "6 Compare"}


def tab_title(name: str) -> str:
    """A dock's tab title from its napari name (``"3b Load models (napari-wsdino)"`` ->
    ``"3b Models"``)."""
    base = name.removesuffix(PLUGIN_SUFFIX)
    return TAB_TITLES.get(base, base)


class WorkerDock(QWidget):
    """A dock panel with the viewer's shared state, a task status and at most one worker.

    Class attributes a panel sets: ``settings_prefix`` (its remembered values' keys),
    ``failed_text`` ("Training failed" -> "Training failed: <why>"), ``stopping_text``
    and ``stopped_text`` (the status line after Stop / Cancel and once it took effect).
    """

    settings_prefix = ""
    failed_text = "Failed"
    stopping_text = "Stopping…"
    stopped_text = "Stopped."

    def __init__(self, napari_viewer: "napari.viewer.Viewer", status_text: str = "Idle."):
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.status = TaskStatus.IDLE
        self.worker = None
        #: Enabled while no task runs (Start, Run, inputs) / while one runs (Stop, Cancel).
        self.idle_controls: tuple[QWidget, ...] = ()
        self.busy_controls: tuple[QWidget, ...] = ()
        self._stopping = False
        self._request_stop: Callable[[], None] | None = None
        self._saved = settings.load_settings()
        self.status_label = QLabel(status_text)
        self.status_label.setWordWrap(True)
        # Two lines kept for the status, and the progress bar's room kept while it is hidden:
        # a changing message or the bar appearing never resizes the panel's canvases, whose
        # every resize is a full matplotlib redraw on the GUI thread.
        self.status_label.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        self.status_label.setMinimumHeight(2 * self.status_label.fontMetrics().lineSpacing())
        self.body = QWidget()
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(self.body)
        self.scroll = scroll
        self.progress_bar = QProgressBar()
        self.progress_bar.setToolTip("Progress of the task this panel is running")
        self.progress_bar.setTextVisible(True)
        policy = self.progress_bar.sizePolicy()
        policy.setRetainSizeWhenHidden(True)
        self.progress_bar.setSizePolicy(policy)
        self.progress_bar.hide()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll, 1)
        outer.addWidget(self.progress_bar)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        """Scroll vertically only: the dock is never narrower than its controls. The first
        time, join the other WS-DINO panels as a tab (deferred until napari has docked it)."""
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        self.scroll.setMinimumWidth(self.body.minimumSizeHint().width() + bar)
        super().showEvent(event)
        if not getattr(self, "_tab_joined", False):
            self._tab_joined = True
            QTimer.singleShot(0, self._join_tabs)

    def _join_tabs(self) -> None:
        """Tab this panel's dock with the first other WS-DINO dock in the same area, so that
        all panels together fit a 1280 x 720 window (stacked, they need 950 px of height)."""
        try:
            mine = dock_of(self)
            window = mine.parentWidget() if mine is not None else None
        except RuntimeError:  # closed meanwhile
            return
        if mine is None or mine.isFloating() or not isinstance(window, QMainWindow):
            return
        mine.setWindowTitle(tab_title(mine.windowTitle()))  # the text of its tab
        # Once Qt has made the tab bar; through a weak reference, so that a window closed
        # before the timer fires is not kept alive by it (napari's leak check sees that).
        QTimer.singleShot(0, partial(_readable_tabs, weakref.ref(window)))
        area = window.dockWidgetArea(mine)
        for other in window.findChildren(QDockWidget):
            if (other is not mine and other.isVisible() and not other.isFloating()
                    and window.dockWidgetArea(other) == area
                    and other.findChild(WorkerDock) is not None):
                window.tabifyDockWidget(other, mine)
                mine.show()
                mine.raise_()
                return

    # -- layout and settings ---------------------------------------------------------
    def stack(self, *items: QWidget | QLayout | int) -> QVBoxLayout:
        """Lay widgets and layouts out top to bottom on the body; an int is a stretch.

        A ``(widget, stretch)`` tuple gives that widget the extra height.
        """
        layout = QVBoxLayout(self.body)
        for item in items:
            item, stretch = item if isinstance(item, tuple) else (item, 0)
            if isinstance(item, int):
                layout.addStretch(item)
            elif isinstance(item, QLayout):
                layout.addLayout(item, stretch)
            else:
                layout.addWidget(item, stretch)
        return layout

    def saved(self, key: str, default: Any = None) -> Any:
        """The value this panel remembered for ``key`` (``settings_prefix`` + key)."""
        return self._saved.get(self.settings_prefix + key, default)

    def remember(self, values: dict[str, Any]) -> None:
        """Remember the panel's values for the next session (keys without the prefix)."""
        settings.remember_many({self.settings_prefix + k: v for k, v in values.items()})

    def input_error(self, label: QLabel, message: str) -> None:
        """A problem with the user's input: in the dock and as a napari notification."""
        label.setText(message)
        show_warning(message)

    # -- the task --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """The dock's task is running (a stop may have been asked for)."""
        return self.status == TaskStatus.RUNNING

    def set_running(self, running: bool) -> None:
        """Idle controls on while idle, busy controls (Stop) while running; panels add more."""
        for b in self.idle_controls:
            b.setEnabled(not running)
        for b in self.busy_controls:
            b.setEnabled(running)

    def start_task(self, gen: Generator[Progress, Any, Any], message: str, *,
                   on_done: Callable[[Any], None],
                   describe: Callable[[Progress], str | None] | None = None,
                   on_progress: Callable[[Progress], None] | None = None,
                   stop: Callable[[], None] | None = None, desc: str = "WS-DINO") -> Any:
        """Mark the dock running and run ``gen`` in a worker.

        ``on_done`` gets the result after the status is DONE and the buttons are reset.
        ``describe`` turns an event into the status line (None keeps it), only while the
        task runs and no stop was asked for; ``on_progress`` sees every event. ``stop``
        asks the task to stop (default: ``worker.quit()``, at the core's next yield).
        """
        self.status = TaskStatus.RUNNING
        self._stopping = False
        self.set_running(True)
        self.status_label.setText(message)

        def _progress(event: Progress) -> None:
            if on_progress is not None:
                on_progress(event)
            if describe is not None and self.running and not self._stopping:
                text = describe(event)
                if text is not None:
                    self.status_label.setText(text)

        def _done(result: Any) -> None:
            self.status = TaskStatus.DONE
            self.set_running(False)
            on_done(result)

        worker = self.run_task(gen, on_progress=_progress, on_done=_done,
                               on_error=self.task_failed, on_stopped=self.task_stopped,
                               desc=desc)
        self._request_stop = stop or worker.quit
        return worker

    def stop_task(self) -> None:
        """Ask the running task to stop at its next step."""
        if self.worker is None or not self.running or self._stopping:
            return
        self._stopping = True
        self._request_stop()
        for b in self.busy_controls:
            b.setEnabled(False)
        self.status_label.setText(self.stopping_text)

    @property
    def stopping(self) -> bool:
        """A stop was asked for while the task runs."""
        return self._stopping

    def task_stopped(self) -> None:
        """The worker quit at the user's request."""
        self.status = TaskStatus.STOPPED
        self.set_running(False)
        self.status_label.setText(self.stopped_text)

    def task_failed(self, exc: BaseException) -> None:
        """The task raised (the notification came from ``start_worker``)."""
        self.status = TaskStatus.CRASHED
        self.set_running(False)
        self.status_label.setText(f"{self.failed_text}: {exc}")

    def run_task(self, gen: Generator[Progress, Any, Any], *,
                 on_progress: Callable[[Progress], None] | None = None, **kwargs) -> Any:
        """Start ``gen`` in a worker (``start_worker`` arguments) with the dock's progress bar."""
        bar = self.progress_bar

        def _progress(event):
            # Through start_worker's own callback: not called once the dock is closed.
            if event.total:
                bar.setRange(0, int(event.total))
                bar.setValue(min(int(event.step), int(event.total)))
                bar.setFormat(f"%p%  {event.step}/{event.total}")
            if on_progress is not None:
                on_progress(event)

        self.worker = start_worker(gen, owner=self, on_progress=_progress, **kwargs)
        bar.setRange(0, 0)  # busy until the first event says how much there is
        bar.setFormat("starting…")
        bar.show()
        self.worker.finished.connect(bar.hide)
        return self.worker


def _readable_tabs(window_ref: Callable[[], QMainWindow | None]) -> None:
    """The main window's dock tab bars show whole titles (with scroll arrows when they do
    not all fit), never "3a…"; nothing once the window is gone."""
    window = window_ref()
    try:
        bars = window.findChildren(QTabBar) if window is not None else []
    except RuntimeError:  # its C++ object deleted
        return
    for bar in bars:
        if bar.parentWidget() is window:  # a panel's own tabs (Evaluate's) stay as they are
            bar.setElideMode(Qt.ElideNone)
            bar.setUsesScrollButtons(True)


# -- form helpers ----------------------------------------------------------------------
def dock_of(widget: QWidget):
    """The ``QDockWidget`` holding ``widget`` (napari's dock of a plugin panel), or None."""
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def tip(widget: QWidget, text: str) -> QWidget:
    """Set a tooltip and return the widget (for building forms inline)."""
    widget.setToolTip(text)
    return widget


def button(text: str, tooltip: str, on_click: Callable[[], Any] | None = None) -> QPushButton:
    """A push button with its tooltip, calling ``on_click()`` when clicked."""
    b = QPushButton(text)
    b.setToolTip(tooltip)
    if on_click is not None:
        b.clicked.connect(lambda _checked=False: on_click())
    return b


def spin(lo: int, hi: int, value) -> QSpinBox:
    """An integer spin box from ``lo`` to ``hi`` showing ``value``."""
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setValue(int(value))
    return box


def double_spin(lo: float, hi: float, value, *, step: float | None = None,
                decimals: int | None = None) -> QDoubleSpinBox:
    """A decimal spin box from ``lo`` to ``hi`` showing ``value``."""
    box = QDoubleSpinBox()
    if decimals is not None:
        box.setDecimals(decimals)  # before the range and value, which it rounds
    box.setRange(lo, hi)
    if step is not None:
        box.setSingleStep(step)
    box.setValue(float(value))
    return box


def combo(items: Iterable[str], current: str | None = None, *,
          editable: bool = False) -> QComboBox:
    """A combo box of ``items`` showing ``current`` (when given)."""
    box = QComboBox()
    box.setEditable(editable)
    box.addItems(list(items))
    if current is not None:
        select_text(box, str(current))
    return box


def select_text(box: QComboBox, text: str) -> None:
    """Show ``text``: its item when the box has one, else (an editable box) as typed.

    An editable box's ``setCurrentText`` only sets the edit text and leaves the current
    item where it was (the first), so the next change to that item's data puts the
    item's text back over the user's choice.
    """
    index = box.findText(text)
    if index >= 0:
        box.setCurrentIndex(index)
    box.setCurrentText(text)


def item_tips(box: QComboBox, tips: Iterable[str]) -> None:
    """A tooltip per item of a combo box, in item order (an editable box keeps its text).

    Qt rewrites an editable box's text from its current item whenever that item's data
    changes: without the restore, a remembered name that is not an item (or not the
    current one) would be replaced by the first item's.
    """
    text = box.currentText()
    for i, tip_text in enumerate(tips):
        box.setItemData(i, tip_text, Qt.ToolTipRole)
    if box.isEditable() and box.currentText() != text:
        box.setCurrentText(text)


def data_combo(items: Iterable[tuple[str, Any]], current: Any = None) -> QComboBox:
    """A combo box of ``(title, value)`` pairs showing the item whose value is ``current``."""
    box = QComboBox()
    for title, value in items:
        box.addItem(title, value)
    box.setCurrentIndex(max(box.findData(current), 0))
    return box


def hrow(*widgets: QWidget) -> QHBoxLayout:
    """Widgets side by side (a row of buttons)."""
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    return row


def edit_row(edit: QWidget, *buttons: QWidget) -> QHBoxLayout:
    """An edit that takes the spare width, and its buttons ("…", "Open") beside it."""
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    for b in buttons:
        row.addWidget(b)
    return row


def add_row(form: QFormLayout, title: str, field, text: str) -> None:
    """A form row whose label and field (widget or layout) both carry the tooltip."""
    label = QLabel(title)
    label.setToolTip(text)
    if isinstance(field, QWidget):
        field.setToolTip(text)
    else:
        for i in range(field.count()):
            w = field.itemAt(i).widget()
            if w is not None and not w.toolTip():
                w.setToolTip(text)
    form.addRow(label, field)
