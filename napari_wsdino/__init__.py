"""napari-wsdino: WS-DINO phenotypic representations of cell screens, in napari and on the CLI."""

__version__ = "0.1.0"
