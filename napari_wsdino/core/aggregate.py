"""Aggregation of field-level profiles to wells and treatments.

Treatment profiles follow the WS-DINO paper (after Ando et al. 2017): the mean
of the field-level profiles of each (treatment, plate), then the median of those
plate means across plates -- 103 treatment profiles on BBBC021. Well profiles
(the mean of a well's fields) are for plots.

Treatments are ordered by compound, then concentration (numerically), then
label; this order is also the tie-break order of the NSC / NSCB matching.

Example
-------
>>> treatments = aggregate_treatments(field_profiles)          # doctest: +SKIP
>>> len(treatments)                                             # doctest: +SKIP
103
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_wsdino.core.metadata import CONTROL, DataError
from napari_wsdino.core.profiles import (
    BATCH, COMPOUND, CONCENTRATION, MOA, PLATE, SITE, TREATMENT, WELL, ProfileTable,
)

N_PLATES = "Metadata_Plates"
N_FIELDS = "Metadata_Fields"
BATCH_SEP = ","


def _one_value_per_group(meta: pd.DataFrame, key: str, columns: list[str]) -> None:
    """Raise if any column takes several values within one group of ``key``."""
    for col in columns:
        counts = meta.groupby(key, sort=False)[col].nunique(dropna=False)
        bad = counts.index[counts > 1]
        if len(bad):
            raise DataError(
                f"{len(bad)} {key} group(s) have several values of {col}, e.g. {list(bad[:3])}; "
                f"each {key} must have one {col}."
            )


def treatment_order(meta: pd.DataFrame) -> pd.DataFrame:
    """Unique treatments with compound / concentration / MoA, in the canonical order."""
    cols = [c for c in (TREATMENT, COMPOUND, CONCENTRATION, MOA) if c in meta.columns]
    first = meta.drop_duplicates(TREATMENT)[cols]
    keys = [c for c in (COMPOUND, CONCENTRATION, TREATMENT) if c in first.columns]
    return first.sort_values(keys, kind="stable").reset_index(drop=True)


def _copy_rows(out: np.ndarray, out_rows, features: np.ndarray, rows, chunk: int = 4096) -> None:
    """``out[out_rows] = features[rows]`` a chunk at a time (no full-size temporary)."""
    for i in range(0, len(rows), chunk):
        out[out_rows[i:i + chunk]] = features[rows[i:i + chunk]]


def _group_mean(features: np.ndarray, rows: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of ``features[rows]`` per group (``group`` codes ``0 .. n_groups - 1``).

    A group of one row is that row (copied, no arithmetic); larger groups go through
    pandas' groupby mean, as before, so their numbers are unchanged.
    """
    out = np.empty((n_groups, features.shape[1]), dtype=np.float64)
    size = np.bincount(group, minlength=n_groups)
    single = size[group] == 1
    _copy_rows(out, group[single], features, rows[single])
    if not single.all():
        many = ~single
        means = pd.DataFrame(features[rows[many]], dtype=np.float64).groupby(group[many]).mean()
        out[means.index.to_numpy()] = means.to_numpy(dtype=np.float64)
    return out


def _group_median(features: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``features`` per group, as pandas' groupby median (the mean of the two
    middle values for an even count): groups of equal size are stacked and reduced at
    once, so many small groups cost no per-group Python."""
    out = np.empty((n_groups, features.shape[1]), dtype=np.float64)
    size = np.bincount(group, minlength=n_groups)
    order = np.argsort(group, kind="stable")
    start = np.cumsum(size) - size
    for k in np.unique(size[size > 0]):
        groups = np.flatnonzero(size == k)
        rows = order[(start[groups][:, None] + np.arange(k)).ravel()]
        if k == 1:
            _copy_rows(out, groups, features, rows)
        else:
            block = features[rows].astype(np.float64, copy=False).reshape(len(groups), k, -1)
            out[groups] = np.median(block, axis=1)
    return out


def plate_means(profiles: ProfileTable, control: str = CONTROL,
                include_control: bool = False) -> ProfileTable:
    """First step of :func:`aggregate_treatments`: the mean profile of each (treatment, plate).

    Rows are ordered by treatment (canonical order), then plate. Metadata:
    ``Metadata_Treatment, Metadata_Compound, Metadata_Concentration, Metadata_MoA,
    Metadata_Plate, Metadata_Batch`` (where present) and ``Metadata_Fields``.
    Because the mean commutes with any affine map, TVN may be applied to these rows
    instead of to every field, with the same result (and far less work).
    """
    profiles.require([TREATMENT, PLATE, COMPOUND, MOA])
    keep = np.ones(len(profiles), dtype=bool) if include_control else ~profiles.is_control(control)
    if not keep.any():
        raise DataError("No treated (non-control) profiles to aggregate.")
    meta = profiles.meta.loc[keep].reset_index(drop=True)
    meta[TREATMENT] = meta[TREATMENT].astype(str)
    meta[PLATE] = meta[PLATE].astype(str)
    _one_value_per_group(meta, TREATMENT, [c for c in (COMPOUND, CONCENTRATION, MOA) if c in meta])
    order = treatment_order(meta)
    code = pd.Categorical(meta[TREATMENT], categories=order[TREATMENT]).codes
    key = [code, meta[PLATE].to_numpy()]
    group, pairs = pd.factorize(pd.MultiIndex.from_arrays(key), sort=True)
    means = _group_mean(profiles.features, np.flatnonzero(keep), group, len(pairs))
    out = order.iloc[pairs.get_level_values(0).to_numpy()].reset_index(drop=True)
    out[PLATE] = pairs.get_level_values(1).to_numpy()
    if BATCH in meta.columns:
        batch = meta.groupby(key, sort=True)[BATCH].first()
        out[BATCH] = batch.astype(str).to_numpy()
    out[N_FIELDS] = meta.groupby(key, sort=True).size().to_numpy()
    return ProfileTable(out, means, list(profiles.feature_names))


def _joined_batches(code: np.ndarray, batch: pd.Series) -> np.ndarray:
    """Per group code (0, 1, ...), its distinct batches sorted and joined by ``","``;
    only groups seen in several batches are joined in Python."""
    pairs = pd.DataFrame({"c": code, "b": batch.astype(str).to_numpy()})
    pairs = pairs.drop_duplicates().sort_values(["c", "b"], kind="stable")
    several = pairs["c"].duplicated(keep=False).to_numpy()
    joined = pairs[~several].set_index("c")["b"]
    if several.any():
        joined = pd.concat([joined, pairs[several].groupby("c")["b"].agg(BATCH_SEP.join)])
    return joined.sort_index().to_numpy()


def median_across_plates(means: ProfileTable) -> ProfileTable:
    """Second step of :func:`aggregate_treatments`: per treatment, the median of its
    plate means (rows as :func:`plate_means` orders them)."""
    means.require([TREATMENT, PLATE])
    meta = means.meta
    code, names = pd.factorize(meta[TREATMENT].astype(str), sort=False)
    medians = _group_median(means.features, code, len(names))
    first = np.unique(code, return_index=True)[1]
    cols = [c for c in (TREATMENT, COMPOUND, CONCENTRATION, MOA) if c in meta.columns]
    out = meta.iloc[first][cols].reset_index(drop=True)
    if BATCH in meta.columns:
        out[BATCH] = _joined_batches(code, meta[BATCH])
    out[N_PLATES] = np.bincount(code)
    if N_FIELDS in meta.columns:
        out[N_FIELDS] = np.bincount(code, weights=meta[N_FIELDS].to_numpy()).astype(np.int64)
    return ProfileTable(out, medians, list(means.feature_names))


def aggregate_treatments(profiles: ProfileTable, control: str = CONTROL,
                         include_control: bool = False) -> ProfileTable:
    """Treatment profiles: mean per (treatment, plate), then median across plates.

    Parameters
    ----------
    profiles
        Field-level (or well-level) profiles with ``Metadata_Treatment``,
        ``Metadata_Plate``, ``Metadata_Compound``, ``Metadata_MoA`` (``Metadata_Batch``
        optional).
    control
        MoA label of control rows; they are left out unless ``include_control``.

    Returns
    -------
    ProfileTable
        One row per treatment, in canonical order, with ``Metadata_Treatment,
        Metadata_Compound, Metadata_Concentration, Metadata_MoA``, ``Metadata_Batch``
        (the sorted batches it was seen in, joined by ``","``), ``Metadata_Plates``
        and ``Metadata_Fields`` (counts).

    Example
    -------
    >>> aggregate_treatments(profiles).meta.Metadata_Treatment.head(1)  # doctest: +SKIP
    """
    return median_across_plates(plate_means(profiles, control, include_control))


def treatment_batches(batch_column: pd.Series) -> list[tuple[str, ...]]:
    """Split a treatment table's ``Metadata_Batch`` (``"Week1,Week2"``) into tuples."""
    return [tuple(str(b).split(BATCH_SEP)) if str(b) else () for b in batch_column]


def aggregate_wells(profiles: ProfileTable) -> ProfileTable:
    """Well profiles: the mean of each (plate, well)'s fields.

    Metadata that is constant within every well is kept (``Metadata_Site`` is
    dropped); ``Metadata_Fields`` counts the fields averaged.
    """
    profiles.require([PLATE, WELL])
    meta = profiles.meta
    key = meta[PLATE].astype(str) + "\x00" + meta[WELL].astype(str)
    codes, uniques = pd.factorize(key, sort=True)
    feats = pd.DataFrame(profiles.features, dtype=np.float64).groupby(codes, sort=True).mean()
    cols = [c for c in meta.columns if c != SITE]
    per_well = meta[cols].groupby(codes, sort=True).nunique(dropna=False)
    constant = [c for c in cols if (per_well[c] <= 1).all()]
    out = meta[constant].groupby(codes, sort=True).first().reset_index(drop=True)
    out[N_FIELDS] = np.bincount(codes, minlength=len(uniques))
    return ProfileTable(out, feats.to_numpy(dtype=np.float64), list(profiles.feature_names))
