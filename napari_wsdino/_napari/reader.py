"""npe2 reader: open a BBBC021-layout dataset folder or its image CSV.

The first field with all its channel files present is shown as three additive
layers (DAPI blue, Tubulin green, Actin red); the field's plate, well, site,
compound, concentration, MoA and batch are in each ``layer.metadata``. Only that
field's files are read: the plate browser (Plugins > WS-DINO) moves between fields.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from napari_wsdino.core.metadata import DataError, ScreenLayout, load_metadata, locate
from napari_wsdino._napari.layers import field_layer_data

if TYPE_CHECKING:
    from napari.types import LayerDataTuple

_LAYOUT = ScreenLayout()


def _looks_like_dataset(path: Path) -> bool:
    """Cheap check: an image CSV whose header has the BBBC021 columns, plus an MoA CSV."""
    try:
        image_csv, _ = locate(path, _LAYOUT)
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
    return _LAYOUT.plate_column in header and _LAYOUT.well_column in header


def get_reader(path: str | list[str]) -> Callable[[str], list["LayerDataTuple"]] | None:
    """Return :func:`read_dataset` if ``path`` is a BBBC021 folder or image CSV, else ``None``.

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
        return (f"{path}: all {metadata.no_moa} fields have treatments without an MoA row. "
                "Add them to the MoA CSV (BBBC021_v1_moa.csv).")
    return (f"{path}: the image CSV lists no fields (a header without rows?). Use the "
            "complete BBBC021_v1_image.csv, e.g. 'wsdino fetch DEST --metadata-only'.")


def read_dataset(path: str | list[str]) -> list["LayerDataTuple"]:
    """Load the dataset's metadata (dropping fields with missing files) and its first field."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    metadata = load_metadata(path, drop_missing=True, unannotated="drop")
    if not len(metadata.table):
        raise DataError(_no_field_reason(path, metadata))
    return field_layer_data(metadata, 0, source=path)
