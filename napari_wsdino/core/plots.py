"""Moved to :mod:`napari_wsdino.core.figures` (one module for every figure); kept while
the last importers move."""

from napari_wsdino.core.figures import confusion_figure, per_moa_figure, save_figure  # noqa: F401
