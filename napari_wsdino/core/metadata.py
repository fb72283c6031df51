"""Plate metadata: one typed table for every field of view of a screen.

The loader reads the official BBBC021 files (``BBBC021_v1_image.csv`` and
``BBBC021_v1_moa.csv``; Ljosa et al. 2013) or any screen laid out the same way,
given a :class:`ScreenLayout` that maps its CSV columns and channel names.

The result is a :class:`pandas.DataFrame` with one row per field and the columns
in :data:`FIELD_COLUMNS` plus ``path_<channel>`` for each channel. Every later
stage (replica, preprocessing, training, embedding, evaluation) reads this table.

Example
-------
>>> from napari_wsdino.core.metadata import load_metadata, bundled_metadata_dir
>>> meta = load_metadata(bundled_metadata_dir(), check_files=False)
>>> len(meta.table), meta.table.plate.nunique()
(3848, 55)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

IMAGE_CSV = "BBBC021_v1_image.csv"
MOA_CSV = "BBBC021_v1_moa.csv"
CHANNELS: tuple[str, ...] = ("DAPI", "Tubulin", "Actin")
CONTROL = "DMSO"
FIELD_COLUMNS: tuple[str, ...] = (
    "plate",
    "batch",
    "well",
    "site",
    "replicate",
    "compound",
    "concentration",
    "treatment",
    "moa",
)


class DataError(ValueError):
    """Input data is unusable; the message names the problem and the fix."""


def treatment_name(compound: str, concentration: float) -> str:
    """Canonical treatment label: ``"taxol@0.3"`` (concentration in µM, ``%g``)."""
    return f"{compound}@{float(concentration):g}"


@dataclass(frozen=True)
class ScreenLayout:
    """How a screen's CSV files name things. Defaults are BBBC021's official names.

    Parameters
    ----------
    channels
        Channel names, in the order images are stacked.
    file_columns
        For each channel, the (file name column, path column) of the image CSV.
    batch_pattern
        Regular expression with one group, applied to the plate name, giving the batch
        (BBBC021: the ``WeekN`` prefix). If it does not match, ``batch_column`` is used.
    site_pattern
        Regular expression with one group, applied to the first channel's file name,
        giving the site (BBBC021: ``_s3_``). If it does not match, ``site_column`` is used.
    """

    channels: tuple[str, ...] = CHANNELS
    file_columns: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            c: (f"Image_FileName_{c}", f"Image_PathName_{c}") for c in CHANNELS
        }
    )
    plate_column: str = "Image_Metadata_Plate_DAPI"
    well_column: str = "Image_Metadata_Well_DAPI"
    compound_column: str = "Image_Metadata_Compound"
    concentration_column: str = "Image_Metadata_Concentration"
    replicate_column: str | None = "Replicate"
    batch_column: str | None = None
    site_column: str | None = None
    batch_pattern: str = r"^(Week\d+)_"
    site_pattern: str = r"_s(\d+)_"
    moa_compound_column: str = "compound"
    moa_concentration_column: str = "concentration"
    moa_column: str = "moa"
    control_compound: str = CONTROL
    image_csv: str = IMAGE_CSV
    moa_csv: str = MOA_CSV

    @classmethod
    def from_mapping(cls, mapping: dict) -> "ScreenLayout":
        """Build a layout from a plain dict (e.g. parsed from JSON/TOML).

        ``file_columns`` may be given as ``{"DNA": ["FileName_DNA", "PathName_DNA"], ...}``;
        ``channels`` defaults to its keys.
        """
        mapping = dict(mapping)
        if "file_columns" in mapping:
            mapping["file_columns"] = {
                k: tuple(v) for k, v in mapping["file_columns"].items()
            }
            mapping.setdefault("channels", tuple(mapping["file_columns"]))
        if "channels" in mapping:
            mapping["channels"] = tuple(mapping["channels"])
        unknown = set(mapping) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(
                f"Unknown screen-layout keys {sorted(unknown)}; "
                f"valid keys are {sorted(cls.__dataclass_fields__)}."
            )
        return cls(**mapping)


@dataclass
class Metadata:
    """The field table of a screen and where its images live.

    Attributes
    ----------
    table
        One row per field of view (see module docstring for the columns).
    root
        Folder the image paths were resolved against (``None``: metadata only).
    channels
        Channel names; ``table`` has a ``path_<channel>`` column for each.
    missing
        Paths referenced by the CSV that do not exist (empty if not checked).
    dropped
        Number of fields removed because ``drop_missing`` was set.
    no_moa
        Number of fields whose treatment has no MoA row (left out with
        ``unannotated="drop"``, kept unlabelled with ``"keep"``).
    """

    table: pd.DataFrame
    root: Path | None
    channels: tuple[str, ...]
    missing: list[Path] = field(default_factory=list)
    dropped: int = 0
    no_moa: int = 0

    def paths(self, channel: str) -> pd.Series:
        """File path of each field's image for one channel."""
        if channel not in self.channels:
            raise DataError(
                f"Unknown channel {channel!r}; this screen has {list(self.channels)}."
            )
        return self.table[f"path_{channel}"]

    def field_key(self, index: int) -> str:
        """Human-readable key of one field: ``PLATE/WELL/sSITE``."""
        row = self.table.iloc[index]
        return f"{row.plate}/{row.well}/s{row.site}"

    def summary(self) -> dict:
        """Counts a user checks first; see :func:`summarise`."""
        return summarise(self.table, self.missing)


def bundled_metadata_dir() -> Path:
    """Folder holding the packaged copy of the 3,848-field WS-DINO metadata."""
    return Path(__file__).resolve().parent.parent / "data"


def _require_columns(df: pd.DataFrame, needed: list[str], what: Path) -> None:
    absent = [c for c in needed if c not in df.columns]
    if absent:
        raise DataError(
            f"{what} lacks the column(s) {absent}. It has {list(df.columns)}. "
            "Point to the official BBBC021 file, or pass a ScreenLayout "
            "(CLI: --layout layout.json) that maps your column names."
        )


#: How to fix a CSV in another text encoding (spreadsheets often save Latin-1 or UTF-16).
SAVE_AS_UTF8 = ("save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet's Save As, or "
                "'iconv -f LATIN1 -t UTF-8') and retry")


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except FileNotFoundError:
        raise DataError(f"File not found: {path}.") from None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise DataError(f"{path} is UTF-16 (or binary), not UTF-8 text: {SAVE_AS_UTF8}.")
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"File not found: {path}.") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason}; Latin-1 / Windows-1252?): {SAVE_AS_UTF8}."
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"Cannot parse {path} as CSV: {exc}") from None


def locate(source: str | Path, layout: ScreenLayout = ScreenLayout()) -> tuple[Path, Path]:
    """Find the image CSV and MoA CSV for a dataset folder or an image CSV path."""
    source = Path(source)
    if source.is_dir():
        image_csv = source / layout.image_csv
        if not image_csv.exists():
            candidates = sorted(source.glob("*image*.csv"))
            if len(candidates) != 1:
                raise DataError(
                    f"No {layout.image_csv} in {source}. Give the folder that holds the "
                    "image CSV (and the per-plate image folders), or the CSV itself."
                )
            image_csv = candidates[0]
    elif source.exists():
        image_csv = source
    else:
        raise DataError(f"{source} does not exist.")
    moa_csv = image_csv.parent / layout.moa_csv
    if not moa_csv.exists():
        candidates = sorted(image_csv.parent.glob("*moa*.csv"))
        if len(candidates) != 1:
            raise DataError(
                f"No {layout.moa_csv} beside {image_csv}. The MoA table "
                "(columns compound, concentration, moa) must sit next to the image CSV."
            )
        moa_csv = candidates[0]
    return image_csv, moa_csv


def resolve_image_path(root: Path, path_name: str, file_name: str, plate: str) -> Path:
    """Where one image lives: ``root/PathName/file`` (BBBC021 CSV) or ``root/plate/file``
    (the official zips unpack to ``<plate>/<file>``)."""
    primary = root / str(path_name) / str(file_name)
    if primary.exists():
        return primary
    alt = root / str(plate) / str(file_name)
    if alt.exists():
        return alt
    return primary


def load_metadata(
    source: str | Path,
    layout: ScreenLayout = ScreenLayout(),
    *,
    image_root: str | Path | None = None,
    check_files: bool = True,
    drop_missing: bool = False,
    unannotated: str = "error",
) -> Metadata:
    """Read a screen's image and MoA tables into one field table.

    Parameters
    ----------
    source
        Dataset folder (holding ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv``)
        or the image CSV itself.
    layout
        Column mapping for screens other than BBBC021.
    image_root
        Folder the CSV's path columns are relative to (default: the CSV's folder).
    check_files
        Check that every referenced image exists.
    drop_missing
        With ``check_files``: drop fields with a missing image instead of raising.
    unannotated
        Treatments (other than the control) without an MoA row: ``"error"``,
        ``"drop"`` them, or ``"keep"`` them with an empty MoA.

    Returns
    -------
    Metadata

    Raises
    ------
    DataError
        Missing columns, missing files (count and first few paths), treatments with
        no MoA row, duplicate fields.

    Example
    -------
    >>> meta = load_metadata("BBBC021/", drop_missing=True)  # doctest: +SKIP
    """
    if unannotated not in ("error", "drop", "keep"):
        raise ValueError("unannotated must be 'error', 'drop' or 'keep'")
    image_csv, moa_csv = locate(source, layout)
    root = Path(image_root) if image_root is not None else image_csv.parent
    images = _read_csv(image_csv)
    moas = _read_csv(moa_csv)

    needed = [layout.plate_column, layout.well_column, layout.compound_column,
              layout.concentration_column]
    for ch in layout.channels:
        if ch not in layout.file_columns:
            raise DataError(f"Layout names channel {ch!r} but gives no file columns for it.")
        needed += list(layout.file_columns[ch])
    needed += [c for c in (layout.batch_column, layout.site_column) if c is not None]
    _require_columns(images, needed, image_csv)
    _require_columns(
        moas,
        [layout.moa_compound_column, layout.moa_concentration_column, layout.moa_column],
        moa_csv,
    )

    plate = images[layout.plate_column].astype(str)
    table = pd.DataFrame({"plate": plate})
    batch = plate.str.extract(layout.batch_pattern, expand=False)
    if layout.batch_column is not None and layout.batch_column in images.columns:
        batch = batch.fillna(images[layout.batch_column].astype(str))
    if batch.isna().any():
        bad = plate[batch.isna()].unique()[:3].tolist()
        raise DataError(
            f"Cannot derive the batch of plates {bad} with pattern {layout.batch_pattern!r}. "
            "Set ScreenLayout.batch_pattern, or batch_column to a CSV column."
        )
    table["batch"] = batch
    table["well"] = images[layout.well_column].astype(str)
    first = layout.channels[0]
    fname_col, _ = layout.file_columns[first]
    site = images[fname_col].astype(str).str.extract(layout.site_pattern, expand=False)
    if layout.site_column is not None and layout.site_column in images.columns:
        site = site.fillna(images[layout.site_column].astype(str))
    if site.isna().any():
        # No site in the name: number fields within each well in CSV order.
        site = table.groupby(["plate", "well"]).cumcount() + 1
    table["site"] = site.astype(int)
    if layout.replicate_column and layout.replicate_column in images.columns:
        table["replicate"] = images[layout.replicate_column].fillna(0).astype(int)
    else:
        table["replicate"] = 0
    table["compound"] = images[layout.compound_column].astype(str)
    table["concentration"] = pd.to_numeric(
        images[layout.concentration_column], errors="coerce"
    ).astype(float)
    if table["concentration"].isna().any():
        n = int(table["concentration"].isna().sum())
        raise DataError(f"{n} rows of {image_csv} have a non-numeric concentration.")
    table["treatment"] = [
        treatment_name(c, x) for c, x in zip(table.compound, table.concentration)
    ]

    moa_key = [
        treatment_name(c, x)
        for c, x in zip(
            moas[layout.moa_compound_column].astype(str),
            pd.to_numeric(moas[layout.moa_concentration_column], errors="coerce"),
        )
    ]
    moa_map = dict(zip(moa_key, moas[layout.moa_column].astype(str)))
    table["moa"] = table["treatment"].map(moa_map)
    is_control = table.compound == layout.control_compound
    table.loc[is_control, "moa"] = CONTROL
    no_moa = table.moa.isna()
    n_no_moa = int(no_moa.sum())
    if no_moa.any():
        missing_t = sorted(table.loc[no_moa, "treatment"].unique())
        if unannotated == "error":
            raise DataError(
                f"{len(missing_t)} treatment(s) ({int(no_moa.sum())} fields) have no row in "
                f"{moa_csv}: {missing_t[:5]}{' ...' if len(missing_t) > 5 else ''}. "
                "Add them to the MoA table, or drop them (CLI: --unannotated drop; "
                "Python: unannotated='drop'), or keep them unlabelled (unannotated='keep')."
            )
        if unannotated == "drop":
            table = table[~no_moa]
            images = images[~no_moa]
        else:
            table.loc[no_moa, "moa"] = ""

    for ch in layout.channels:
        fcol, pcol = layout.file_columns[ch]
        table[f"path_{ch}"] = [
            str(resolve_image_path(root, p, f, pl)) if check_files
            else str(root / str(p) / str(f))
            for p, f, pl in zip(images[pcol], images[fcol], table.plate)
        ]

    dup = table.duplicated(["plate", "well", "site"], keep=False)
    if dup.any():
        keys = table.loc[dup, ["plate", "well", "site"]].head(3).values.tolist()
        raise DataError(
            f"{int(dup.sum())} rows share a (plate, well, site), e.g. {keys}. "
            "Each field of view must appear once in the image CSV."
        )

    missing: list[Path] = []
    dropped = 0
    if check_files:
        path_cols = [f"path_{c}" for c in layout.channels]
        exists = np.ones(len(table), dtype=bool)
        for col in path_cols:
            ok = np.array([Path(p).exists() for p in table[col]], dtype=bool)
            missing += [Path(p) for p in table.loc[~ok, col]]
            exists &= ok
        if missing and drop_missing:
            dropped = int((~exists).sum())
            table = table[exists]
        elif missing and not drop_missing:
            shown = "\n  ".join(str(p) for p in missing[:5])
            raise DataError(
                f"{len(missing)} image file(s) referenced by {image_csv} are missing "
                f"under {root}, e.g.\n  {shown}\n"
                "Unpack the missing plates, or drop those fields and go on "
                "(CLI: --drop-missing; Python: drop_missing=True)."
            )
    table = table.reset_index(drop=True)
    return Metadata(table=table, root=root, channels=tuple(layout.channels),
                    missing=missing, dropped=dropped, no_moa=n_no_moa)


def nscb_treatments(table: pd.DataFrame) -> list[str]:
    """Treatments whose MoA is seen in at least two batches (eligible for NSCB)."""
    annotated = table[(table.moa != CONTROL) & (table.moa != "")]
    batches_per_moa = annotated.groupby("moa")["batch"].nunique()
    ok = batches_per_moa.index[batches_per_moa >= 2]
    return sorted(annotated.loc[annotated.moa.isin(ok), "treatment"].unique())


def summarise(table: pd.DataFrame, missing: list | None = None,
              unreadable: list | None = None) -> dict:
    """Counts of a field table, as ``wsdino info`` prints them."""
    annotated = table[(table.moa != CONTROL) & (table.moa != "")]
    return {
        "fields": int(len(table)),
        "plates": int(table.plate.nunique()),
        "batches": int(table.batch.nunique()),
        "treatments": int(annotated.treatment.nunique()),
        "compounds": int(annotated.compound.nunique()),
        "moas": int(annotated.moa.nunique()),
        "dmso_fields": int((table.moa == CONTROL).sum()),
        "nscb_treatments": len(nscb_treatments(table)),
        "missing_files": len(missing or []),
        "unreadable_files": len(unreadable or []),
    }
