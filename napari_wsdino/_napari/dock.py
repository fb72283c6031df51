"""The base of the panels that run a background task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import QWidget

from napari_wsdino._napari.state import TaskStatus, state_for

if TYPE_CHECKING:
    import napari


class WorkerDock(QWidget):
    """A dock panel with the viewer's shared state, a task status and at most one worker."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.status = TaskStatus.IDLE
        self.worker = None
