"""The base of the WS-DINO panels: shared state, a scrolling body, a progress bar, a worker.

Every panel builds its controls on ``self.body`` (inside a scroll area, so a short
window never hides a control); the base keeps the progress bar under it, shows input
errors as a napari notification as well as in the dock, and runs one core generator at
a time through :func:`napari_wsdino._napari.workers.start_worker`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QFrame,
    QLabel,
    QProgressBar,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari.utils.notifications import show_warning

from napari_wsdino.core.progress import Progress
from napari_wsdino._napari.state import TaskStatus, state_for
from napari_wsdino._napari.workers import start_worker

if TYPE_CHECKING:
    import napari

DOCS = "https://github.com/napari-wsdino/napari-wsdino/blob/main/docs/"


class WorkerDock(QWidget):
    """A dock panel with the viewer's shared state, a task status and at most one worker."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.status = TaskStatus.IDLE
        self.worker = None
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
        self.progress_bar.hide()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll, 1)
        outer.addWidget(self.progress_bar)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        """Scroll vertically only: the dock is never narrower than its controls."""
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        self.scroll.setMinimumWidth(self.body.minimumSizeHint().width() + bar)
        super().showEvent(event)

    # -- helpers for panels ----------------------------------------------------------
    def input_error(self, label: QLabel, message: str) -> None:
        """A problem with the user's input: in the dock and as a napari notification."""
        label.setText(message)
        show_warning(message)

    def run_task(self, gen: Generator[Progress, Any, Any], **kwargs) -> Any:
        """Start ``gen`` in a worker (``start_worker`` arguments) with the dock's progress bar."""
        self.worker = start_worker(gen, owner=self, **kwargs)
        bar = self.progress_bar
        bar.setRange(0, 0)  # busy until the first event says how much there is
        bar.setFormat("starting…")
        bar.show()

        def _progress(event):
            if isinstance(event, Progress) and event.total:
                bar.setRange(0, int(event.total))
                bar.setValue(min(int(event.step), int(event.total)))
                bar.setFormat(f"%p%  {event.step}/{event.total}")

        self.worker.yielded.connect(_progress)
        self.worker.finished.connect(bar.hide)
        return self.worker


def tip(widget: QWidget, text: str) -> QWidget:
    """Set a tooltip and return the widget (for building forms inline)."""
    widget.setToolTip(text)
    return widget


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
