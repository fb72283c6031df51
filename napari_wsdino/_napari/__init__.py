"""The napari edge of napari-wsdino: reader, widgets, workers and shared state.

Nothing in :mod:`napari_wsdino.core` imports this package; only the npe2 manifest
(``napari.yaml``) points into it.
"""
