"""The compute core of napari-wsdino: plain Python, no Qt or napari imports."""
