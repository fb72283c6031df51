"""Which plates to fetch: names checked against the bundled and official tables."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import pandas as pd

from napari_wsdino.core.fetch.options import (
    _PLATE_NAME,
    COMPLETE_MARKER,
    SUBSETS,
    FetchError,
)
from napari_wsdino.core.metadata import IMAGE_CSV, ScreenLayout, bundled_metadata_dir


def plates_in_csv(image_csv: str | Path, layout: ScreenLayout = ScreenLayout()) -> list[str]:
    """Sorted plate names of an image CSV (its ``Image_Metadata_Plate_DAPI`` column)."""
    image_csv = Path(image_csv)
    try:
        table = pd.read_csv(image_csv, usecols=[layout.plate_column])
    except FileNotFoundError:
        raise FetchError(f"File not found: {image_csv}.") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise FetchError(
            f"Cannot read the plate column {layout.plate_column!r} of {image_csv}: {exc}. "
            "Delete the file and fetch the metadata again."
        ) from None
    return sorted(table[layout.plate_column].dropna().astype(str).unique())


def bundled_plates() -> list[str]:
    """The 55 plates of the bundled WS-DINO (MoA-annotated + DMSO) field table."""
    return plates_in_csv(bundled_metadata_dir() / IMAGE_CSV)


def is_plate_complete(dest: str | Path, plate: str) -> bool:
    """Whether ``dest/<plate>`` was fully unpacked (has its ``.complete`` marker)."""
    return (Path(dest) / plate / COMPLETE_MARKER).is_file()


def select_plates(
    dest: str | Path,
    plates: Sequence[str] | None = None,
    subset: str | None = None,
    all_plates: bool = False,
) -> list[str]:
    """Resolve the plate choice into names.

    Parameters
    ----------
    dest
        Target folder; with ``all_plates`` its ``BBBC021_v1_image.csv`` (the official
        table, fetched first) lists the plates.
    plates
        Explicit plate names, checked against the known plates.
    subset
        ``"moa"``: the plates of the bundled MoA-annotated field table.
    all_plates
        Every plate of the official image CSV in ``dest``.

    Raises
    ------
    FetchError
        No choice, more than one choice, or an unknown plate name.
    """
    chosen = sum([bool(plates), subset is not None, bool(all_plates)])
    if chosen != 1:
        raise FetchError(
            "Choose the plates in exactly one way: a list of plates "
            "(CLI: --plates Week1_22123 ...), the MoA subset (--subset moa) or every "
            "plate (--all)."
        )
    dest = Path(dest)
    if subset is not None:
        if subset not in SUBSETS:
            raise FetchError(f"Unknown subset {subset!r}; known subsets: {list(SUBSETS)}.")
        return bundled_plates()
    official = dest / IMAGE_CSV
    if all_plates:
        if not official.exists():
            raise FetchError(
                f"{official} is missing: fetch the metadata first (it lists the plates)."
            )
        return plates_in_csv(official)
    known = set(bundled_plates())
    if official.exists():
        known |= set(plates_in_csv(official))
    out: list[str] = []
    for name in plates:
        name = str(name).strip()
        if name.startswith("BBBC021_v1_images_"):
            name = name[len("BBBC021_v1_images_"):]
        name = name.removesuffix(".zip")
        if not _PLATE_NAME.match(name) or name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise FetchError(
                f"Unknown plate {name!r}.{hint} Plate names look like Week1_22123; "
                "`wsdino info` on the bundled metadata lists them."
            )
        if name not in out:
            out.append(name)
    return out


__all__ = ["bundled_plates", "is_plate_complete", "plates_in_csv", "select_plates"]
