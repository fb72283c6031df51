"""Which fields of the real BBBC021 design a replica subset holds, and where they go.

The design is the bundled 3,848-field table (``napari_wsdino/data``); a subset is a
boolean selection of its rows, so file names, plates, wells, batches and treatments
are always the official ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from napari_wsdino.core.metadata import (
    CONTROL,
    IMAGE_CSV,
    MOA_CSV,
    DataError,
    bundled_metadata_dir,
    load_metadata,
)

SUBSETS = ("full", "replicate1", "mini")
#: Sites per well a subset keeps unless ``sites`` is given.
DEFAULT_SITES = {"full": 4, "replicate1": 4, "mini": 2}
#: DMSO wells kept per plate in the ``mini`` subset.
MINI_DMSO_WELLS = 2


def bundled_design() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The raw image CSV, the MoA CSV and the field table, rows aligned."""
    root = bundled_metadata_dir()
    raw = pd.read_csv(root / IMAGE_CSV)
    moa = pd.read_csv(root / MOA_CSV)
    table = load_metadata(root, check_files=False).table
    if len(raw) != len(table):  # pragma: no cover - guards the packaged files
        raise DataError("Bundled image CSV and field table disagree in length.")
    return raw, moa, table


def _first_replicate(table: pd.DataFrame) -> np.ndarray:
    """Replicate 1, plus the lowest replicate of treatments that replicate 1 lacks."""
    keep = (table.replicate == 1).to_numpy().copy()
    ann = table[table.moa != CONTROL]
    have = set(ann.treatment[ann.replicate == 1])
    lacking = ann[~ann.treatment.isin(have)]
    if len(lacking):
        lowest = lacking.groupby("treatment").replicate.transform("min")
        rows = lacking.index[lacking.replicate == lowest]
        # Their plates bring their DMSO wells, so per-plate normalisation works.
        new_plates = set(table.plate[rows]) - set(table.plate[keep])
        keep[rows] = True
        keep |= (table.plate.isin(new_plates) & (table.moa == CONTROL)).to_numpy()
    return keep


def _mini(table: pd.DataFrame) -> np.ndarray:
    """One well per (treatment, batch), on the lowest replicate's plate, plus
    ``MINI_DMSO_WELLS`` DMSO wells on every plate used."""
    ann = table[table.moa != CONTROL]
    wells = (
        ann[["treatment", "batch", "replicate", "plate", "well"]]
        .drop_duplicates()
        .sort_values(["treatment", "batch", "replicate", "plate", "well"])
        .drop_duplicates(["treatment", "batch"])
    )
    key = table.plate + "/" + table.well
    keep = key.isin(wells.plate + "/" + wells.well).to_numpy().copy()
    dmso = (
        table.loc[(table.moa == CONTROL) & table.plate.isin(wells.plate), ["plate", "well"]]
        .drop_duplicates()
        .sort_values(["plate", "well"])
        .groupby("plate")
        .head(MINI_DMSO_WELLS)
    )
    keep |= key.isin(dmso.plate + "/" + dmso.well).to_numpy()
    return keep


def select_subset(table: pd.DataFrame, subset: str = "mini", sites: int | None = None) -> np.ndarray:
    """Boolean mask over the field table for a replica subset.

    Parameters
    ----------
    table
        Field table of the bundled design (``bundled_design()[2]``).
    subset
        ``"full"`` (all 3,848 fields), ``"replicate1"`` (replicate 1 of every plate
        set, plus the lowest replicate of the few treatments replicate 1 lacks) or
        ``"mini"`` (one well per treatment and batch, two DMSO wells per plate).
        All keep the 103 treatments, 12 MoAs and every batch of each MoA.
    sites
        Keep sites ``1..sites`` of each well (default: :data:`DEFAULT_SITES`).

    Example
    -------
    >>> raw, moa, table = bundled_design()
    >>> int(select_subset(table, "full").sum())
    3848
    """
    if subset not in SUBSETS:
        raise DataError(f"Unknown replica subset {subset!r}; choose one of {list(SUBSETS)}.")
    if sites is None:
        sites = DEFAULT_SITES[subset]
    if not 1 <= int(sites) <= 4:
        raise DataError(f"sites must be 1 to 4 (BBBC021 has 4 sites per well), not {sites}.")
    if subset == "full":
        keep = np.ones(len(table), dtype=bool)
    elif subset == "replicate1":
        keep = _first_replicate(table)
    else:
        keep = _mini(table)
    return keep & (table.site <= int(sites)).to_numpy()


def write_design(out: Path, raw: pd.DataFrame, moa: pd.DataFrame, keep: np.ndarray) -> None:
    """Write the subset's image CSV and the MoA CSV in the official format."""
    out.mkdir(parents=True, exist_ok=True)
    raw[keep].to_csv(out / IMAGE_CSV, index=False)
    moa.to_csv(out / MOA_CSV, index=False)
