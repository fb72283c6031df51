"""npe2 reader: open a screen's dataset folder or its image CSV, in any registered layout.

The layout is detected (:func:`napari_wsdino.core.screens.detect_layout`): BBBC021's
official CSVs, or a JUMP-style Cell Painting ``load_data.csv``. The first field with
all its channel files present is shown as one additive layer per stain (BBBC021:
DAPI blue, Tubulin green, Actin red; Cell Painting: DNA blue, ER green, RNA cyan,
AGP red, Mito magenta; :mod:`napari_wsdino._napari.layers`); the field's plate, well,
site, compound, concentration, MoA and batch are in each ``layer.metadata``. Only
that field's files are read: the plate browser (Plugins > WS-DINO) moves between fields.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from napari_wsdino.core.metadata import DataError, detect_layout, load_metadata, locate
from napari_wsdino._napari.layers import field_layer_data

if TYPE_CHECKING:
    from napari.types import LayerDataTuple

def _looks_like_dataset(path: Path) -> bool:
    """Cheap check: an image CSV whose header has its detected layout's plate and well
    columns (plus an MoA CSV where the layout has one)."""
    try:
        layout = detect_layout(path)
        image_csv, _ = locate(path, layout)
        if image_csv.suffix.lower() != ".csv":
            return False
        with open(image_csv, "rb") as fh:
            raw = fh.read(65536)
        # A UTF-16 file of ours is still ours: reading it then says "save it as UTF-8".
        encoding = "utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8"
        text = raw.decode(encoding, errors="replace").splitlines()
        header = next(csv.reader(text[:1]), [])
    except (DataError, OSError, csv.Error, StopIteration):
        return False
    return layout.plate_column in header and layout.well_column in header


def get_reader(path: str | list[str]) -> Callable[[str], list["LayerDataTuple"]] | None:
    """Return :func:`read_dataset` if ``path`` is a dataset folder or image CSV of a
    registered layout (BBBC021, Cell Painting), else ``None``.

    Never raises: anything unexpected means "not ours".
    """
    try:
        if isinstance(path, (list, tuple)):
            if len(path) != 1:
                return None
            path = path[0]
        if not isinstance(path, (str, Path)):
            return None
        return read_dataset if _looks_like_dataset(Path(path)) else None
    except Exception:  # a reader must never raise during detection
        return None


def _no_field_reason(path, metadata) -> str:
    """Why a dataset shows nothing: no rows, no annotated rows, or no files."""
    if metadata.missing:
        return (f"{path}: none of the {len(metadata.missing)} image files the CSV names exist "
                f"under {metadata.root}. Unpack the plate folders next to the CSV.")
    if metadata.no_moa:
        layout = detect_layout(path)
        where = (f"the MoA CSV ({layout.moa_csv})" if layout.moa_csv
                 else f"the {layout.moa_column} column of {layout.image_csv}")
        return (f"{path}: all {metadata.no_moa} fields have treatments without an MoA. "
                f"Add them to {where}.")
    return (f"{path}: the image CSV lists no fields (a header without rows?). Use the "
            "complete image CSV (BBBC021: 'wsdino fetch DEST --metadata-only'; Cell "
            "Painting: load_data.csv with one row per field).")


def read_dataset(path: str | list[str]) -> list["LayerDataTuple"]:
    """Load the dataset's metadata (dropping fields with missing files) and its first field."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    metadata = load_metadata(path, drop_missing=True, unannotated="drop")
    if not len(metadata.table):
        raise DataError(_no_field_reason(path, metadata))
    return field_layer_data(metadata, 0, source=path)
