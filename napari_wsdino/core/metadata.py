"""Plate metadata: one typed table for every field of view of a screen.

The loader reads the official BBBC021 files (``BBBC021_v1_image.csv`` and
``BBBC021_v1_moa.csv``; Ljosa et al. 2013), a JUMP-style Cell Painting
``load_data.csv`` (five stains, MoA column in the same file), or any screen laid out
like either, given a :class:`ScreenLayout` that maps its CSV columns and channel
names. Named layouts live in a small registry (:data:`LAYOUTS`: ``"bbbc021"``,
``"cellpainting"``); :func:`detect_layout` picks one from a folder or CSV header.

The result is a :class:`pandas.DataFrame` with one row per field and the columns
in :data:`FIELD_COLUMNS` plus ``path_<channel>`` for each channel. Every later
stage (replica, preprocessing, training, embedding, evaluation) reads this table.
Control rows have ``compound == moa == "DMSO"`` whatever the screen calls them.

Example
-------
>>> from napari_wsdino.core.metadata import load_metadata, bundled_metadata_dir
>>> meta = load_metadata(bundled_metadata_dir(), check_files=False)
>>> len(meta.table), meta.table.plate.nunique(), meta.channels
(3848, 55, ('DAPI', 'Tubulin', 'Actin'))
>>> get_layout("cellpainting").channels
('DNA', 'ER', 'RNA', 'AGP', 'Mito')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_wsdino.core.errors import DataError
from napari_wsdino.core.screens import (  # noqa: F401  (re-exported: the public layout API)
    CELLPAINTING_CHANNELS,
    CHANNELS,
    CONTROL,
    IMAGE_CSV,
    JUMP_DMSO,
    LAYOUTS,
    LOAD_DATA_CSV,
    MOA_CSV,
    LayoutPreset,
    ScreenLayout,
    detect_layout,
    get_layout,
    register_layout,
    resolve_layout,
)

if TYPE_CHECKING:
    import pandas as pd

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


def treatment_name(compound: str, concentration: float) -> str:
    """Canonical treatment label: ``"taxol@0.3"`` (concentration in µM, ``%g``)."""
    return f"{compound}@{float(concentration):g}"


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


def check_separator(columns, what, expected: str = "by commas as the BBBC021 CSVs are") -> None:
    """A CSV read as one column whose name holds the others (``a;b;c``) was written with
    another separator: a :class:`DataError` naming it and the one-line fix."""
    if len(columns) != 1:
        return
    header = str(columns[0])
    sep = next((s for s in (";", "\t", "|") if s in header), None)
    if sep is not None:
        raise DataError(
            f"{what} is separated by {sep!r} (its header reads one column, "
            f"{header[:80]!r}...), not {expected}. Save it "
            "comma-separated (a spreadsheet's 'CSV (comma delimited)', or "
            f"python -c \"import pandas as pd; pd.read_csv('{what}', "
            f"sep={sep!r}).to_csv('{what}', index=False)\") and retry.")


def _require_columns(df: pd.DataFrame, needed: list[str], what: Path) -> None:
    absent = [c for c in needed if c not in df.columns]
    if absent:
        check_separator(df.columns, what)
    if absent:
        raise DataError(
            f"{what} lacks the column(s) {absent}. It has {list(df.columns)}. "
            "Point to the official BBBC021 file, or pass a ScreenLayout "
            f"(CLI: --layout layout.json, or one of {list(LAYOUTS)}) that maps your column names."
        )


#: How to fix a CSV in another text encoding (spreadsheets often save Latin-1 or UTF-16).
SAVE_AS_UTF8 = ("save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet's Save As, or "
                "'iconv -f LATIN1 -t UTF-8') and retry")


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

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


def locate(source: str | Path, layout: ScreenLayout | None = None) -> tuple[Path, Path | None]:
    """Find the image CSV and MoA CSV (``None`` for a layout without one) of a dataset
    folder or an image CSV path; ``layout=None`` detects it (:func:`detect_layout`)."""
    source = Path(source)
    layout = detect_layout(source) if layout is None else layout
    if source.is_dir():
        image_csv = source / layout.image_csv
        if not image_csv.exists():
            candidates = sorted(source.glob(layout.image_glob))
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
    if layout.moa_csv is None:
        return image_csv, None
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


#: What ``load_metadata`` does with treatments that have no MoA: refuse, drop them, or keep
#: them unlabelled (``""``).
UNANNOTATED = ("error", "drop", "keep")


def load_metadata(
    source: str | Path,
    layout: ScreenLayout | str | None = None,
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
        Dataset folder (holding ``BBBC021_v1_image.csv`` and ``BBBC021_v1_moa.csv``,
        or a Cell Painting ``load_data.csv``) or the image CSV itself.
    layout
        A :class:`ScreenLayout`, a registered name (``"bbbc021"``, ``"cellpainting"``)
        or a JSON file of layout fields; ``None`` detects it (:func:`detect_layout`).
        The channels (three for BBBC021, five for Cell Painting) come from it.
    image_root
        Folder the CSV's path columns are relative to (default: the CSV's folder).
    check_files
        Check that every referenced image exists.
    drop_missing
        With ``check_files``: drop fields with a missing image instead of raising.
    unannotated
        Treatments (other than the control) without an MoA: ``"error"``,
        ``"drop"`` them, or ``"keep"`` them with an empty MoA.

    Returns
    -------
    Metadata

    Raises
    ------
    DataError
        Missing columns, missing files (count and first few paths), treatments with
        no MoA, duplicate fields.

    Example
    -------
    >>> meta = load_metadata("BBBC021/", drop_missing=True)  # doctest: +SKIP
    >>> load_metadata("jump_replica/", "cellpainting").channels  # doctest: +SKIP
    ('DNA', 'ER', 'RNA', 'AGP', 'Mito')
    """
    if unannotated not in UNANNOTATED:
        raise ValueError(f"unannotated must be one of {', '.join(UNANNOTATED)}")
    layout = resolve_layout(layout) or detect_layout(source)
    image_csv, moa_csv = locate(source, layout)
    root = Path(image_root) if image_root is not None else image_csv.parent
    images = _read_csv(image_csv)
    _require_columns(images, layout.required_columns(), image_csv)
    table = _field_columns(images, layout, image_csv)
    moa = _moa_of_rows(images, table, layout, moa_csv)
    table, images, n_no_moa = _apply_moa(table, images, moa, unannotated, moa_csv or image_csv)
    for ch in layout.channels:
        fcol, pcol = layout.file_columns[ch]
        table[f"path_{ch}"] = [
            str(resolve_image_path(root, p, f, pl)) if check_files
            else str(root / str(p) / str(f))
            for p, f, pl in zip(images[pcol], images[fcol], table.plate)
        ]
    _refuse_duplicates(table)
    missing: list[Path] = []
    dropped = 0
    if check_files:
        table, missing, dropped = _check_files(table, layout.channels, drop_missing, image_csv, root)
    return Metadata(table=table.reset_index(drop=True), root=root, channels=tuple(layout.channels),
                    missing=missing, dropped=dropped, no_moa=n_no_moa)


def _from_pattern(values: pd.Series, pattern: str | None, images: pd.DataFrame,
                  column: str | None) -> pd.Series:
    """A regex group of ``values`` where it matches, else the CSV ``column``."""
    import pandas as pd

    out = (values.str.extract(pattern, expand=False) if pattern is not None
           else pd.Series(np.nan, index=values.index, dtype=object))
    if column is not None and column in images.columns:
        out = out.fillna(images[column].astype(str))
    return out


def _field_columns(images: pd.DataFrame, layout: ScreenLayout, image_csv: Path) -> pd.DataFrame:
    """plate, batch, well, site, replicate, compound, concentration and treatment."""
    import pandas as pd

    plate = images[layout.plate_column].astype(str)
    table = pd.DataFrame({"plate": plate})
    batch = _from_pattern(plate, layout.batch_pattern, images, layout.batch_column)
    if batch.isna().any():
        bad = plate[batch.isna()].unique()[:3].tolist()
        raise DataError(
            f"Cannot derive the batch of plates {bad} with pattern {layout.batch_pattern!r}. "
            "Set ScreenLayout.batch_pattern, or batch_column to a CSV column."
        )
    table["batch"] = batch
    table["well"] = images[layout.well_column].astype(str)
    fname_col, _ = layout.file_columns[layout.channels[0]]
    site = _from_pattern(images[fname_col].astype(str), layout.site_pattern, images,
                         layout.site_column)
    if site.isna().any():
        # No site in the name: number fields within each well in CSV order.
        site = table.groupby(["plate", "well"]).cumcount() + 1
    table["site"] = site.astype(int)
    if layout.replicate_column and layout.replicate_column in images.columns:
        table["replicate"] = images[layout.replicate_column].fillna(0).astype(int)
    else:
        table["replicate"] = 0
    compound = images[layout.compound_column].astype(str)
    control = compound == layout.control_compound
    if layout.control_column is not None and layout.control_column in images.columns:
        control |= images[layout.control_column].astype(str) == layout.control_value
    table["compound"] = compound.where(~control, CONTROL)
    if layout.concentration_column is None:
        conc = pd.Series(np.where(control, 0.0, layout.default_concentration), index=images.index)
    else:
        conc = pd.to_numeric(images[layout.concentration_column], errors="coerce")
    table["concentration"] = conc.astype(float)
    if table["concentration"].isna().any():
        n = int(table["concentration"].isna().sum())
        raise DataError(f"{n} rows of {image_csv} have a non-numeric concentration.")
    table["treatment"] = [
        treatment_name(c, x) for c, x in zip(table.compound, table.concentration)
    ]
    return table


def _moa_of_rows(images: pd.DataFrame, table: pd.DataFrame, layout: ScreenLayout,
                 moa_csv: Path | None) -> pd.Series:
    """Each row's MoA (NaN: none), from the MoA CSV or the image CSV's MoA column."""
    import pandas as pd

    if moa_csv is None:
        moa = images[layout.moa_column].where(images[layout.moa_column].notna(), None)
        moa = moa.astype(object).where(moa.astype(str).str.strip() != "", None)
    else:
        moas = _read_csv(moa_csv)
        _require_columns(moas, [layout.moa_compound_column, layout.moa_concentration_column,
                                layout.moa_column], moa_csv)
        moa_key = [
            treatment_name(c, x)
            for c, x in zip(moas[layout.moa_compound_column].astype(str),
                            pd.to_numeric(moas[layout.moa_concentration_column], errors="coerce"))
        ]
        moa = table["treatment"].map(dict(zip(moa_key, moas[layout.moa_column].astype(str))))
    moa = moa.astype(object)
    moa[table.compound == CONTROL] = CONTROL
    return moa


def _apply_moa(table: pd.DataFrame, images: pd.DataFrame, moa: pd.Series, unannotated: str,
               moa_source: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Set ``moa``; treatments without one raise, are dropped or kept with ``""``."""
    table["moa"] = moa
    no_moa = table.moa.isna()
    n_no_moa = int(no_moa.sum())
    if no_moa.any():
        missing_t = sorted(table.loc[no_moa, "treatment"].unique())
        if unannotated == "error":
            raise DataError(
                f"{len(missing_t)} treatment(s) ({n_no_moa} fields) have no row in "
                f"{moa_source}: {missing_t[:5]}{' ...' if len(missing_t) > 5 else ''}. "
                "Add them to the MoA table, or drop them (CLI: --unannotated drop; "
                "Python: unannotated='drop'), or keep them unlabelled (unannotated='keep')."
            )
        if unannotated == "drop":
            table, images = table[~no_moa], images[~no_moa]
        else:
            table.loc[no_moa, "moa"] = ""
    table["moa"] = table["moa"].astype(str)  # every row has one now; the text dtype, as cached
    return table, images, n_no_moa


def _refuse_duplicates(table: pd.DataFrame) -> None:
    dup = table.duplicated(["plate", "well", "site"], keep=False)
    if dup.any():
        keys = table.loc[dup, ["plate", "well", "site"]].head(3).values.tolist()
        raise DataError(
            f"{int(dup.sum())} rows share a (plate, well, site), e.g. {keys}. "
            "Each field of view must appear once in the image CSV."
        )


def _check_files(table: pd.DataFrame, channels, drop_missing: bool, image_csv: Path,
                 root: Path) -> tuple[pd.DataFrame, list[Path], int]:
    """Missing image files: drop their fields (``drop_missing``) or raise."""
    missing: list[Path] = []
    exists = np.ones(len(table), dtype=bool)
    for col in [f"path_{c}" for c in channels]:
        ok = np.array([Path(p).exists() for p in table[col]], dtype=bool)
        missing += [Path(p) for p in table.loc[~ok, col]]
        exists &= ok
    if missing and not drop_missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        raise DataError(
            f"{len(missing)} image file(s) referenced by {image_csv} are missing "
            f"under {root}, e.g.\n  {shown}\n"
            "Unpack the missing plates, or drop those fields and go on "
            "(CLI: --drop-missing; Python: drop_missing=True)."
        )
    return table[exists], missing, int((~exists).sum()) if missing else 0


def nscb_treatments(table: pd.DataFrame) -> list[str]:
    """Treatments whose MoA is seen in at least two batches (eligible for NSCB)."""
    annotated = table[(table.moa != CONTROL) & (table.moa != "")]
    batches_per_moa = annotated.groupby("moa")["batch"].nunique()
    ok = batches_per_moa.index[batches_per_moa >= 2]
    return sorted(annotated.loc[annotated.moa.isin(ok), "treatment"].unique())


def groups_across_batches(table: pd.DataFrame, groups="compound") -> tuple[int, list[str]]:
    """How many groups the fields of ``table`` fall into, and those imaged in at least two
    batches (sorted). ``groups``: a column name, or one group per row.

    Only those groups give WS-DINO pairs that cross a batch: among BBBC021's annotated
    compounds, taxol alone (tested on the bundled metadata)."""
    import pandas as pd

    keys = table[groups] if isinstance(groups, str) else pd.Series(list(groups), index=table.index)
    batches = table["batch"].groupby(keys).nunique()
    return len(batches), sorted(batches.index[batches >= 2])


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
        "compounds_multi_batch": len(groups_across_batches(annotated, "compound")[1]),
        "moas": int(annotated.moa.nunique()),
        "dmso_fields": int((table.moa == CONTROL).sum()),
        "nscb_treatments": len(nscb_treatments(table)),
        "missing_files": len(missing or []),
        "unreadable_files": len(unreadable or []),
    }
