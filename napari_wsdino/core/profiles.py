"""Profile tables: metadata and a float feature matrix, one row per profile.

A :class:`ProfileTable` is the hand-over format between embedding, evaluation,
plots and other tools. On disk (Parquet or CSV) it uses the naming that
pycytominer and copairs users expect, so files move between tools without
renaming::

    Metadata_Plate, Metadata_Batch, Metadata_Well, Metadata_Site,
    Metadata_Compound, Metadata_Concentration, Metadata_Treatment, Metadata_MoA,
    <feature columns ...>

Every column whose name starts with ``Metadata_`` is metadata (extra ones, such as
``Metadata_Replicate``, are kept as they are); every other column is a float feature.
Control (DMSO) rows have ``Metadata_MoA == "DMSO"``.

Example
-------
>>> import numpy as np
>>> from napari_wsdino.core.metadata import load_metadata, bundled_metadata_dir
>>> table = load_metadata(bundled_metadata_dir(), check_files=False).table
>>> profiles = ProfileTable.from_fields(table, np.zeros((len(table), 4)))
>>> profiles.features.shape, profiles.meta.columns[0]
((3848, 4), 'Metadata_Plate')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from napari_wsdino.core.fsio import atomic_path
from napari_wsdino.core.metadata import CONTROL, DataError, check_separator, treatment_name

if TYPE_CHECKING:
    import pandas as pd

PREFIX = "Metadata_"

#: Field-table column -> profile-table column, in the order they are written.
FIELD_TO_PROFILE: dict[str, str] = {
    "plate": "Metadata_Plate",
    "batch": "Metadata_Batch",
    "well": "Metadata_Well",
    "site": "Metadata_Site",
    "compound": "Metadata_Compound",
    "concentration": "Metadata_Concentration",
    "treatment": "Metadata_Treatment",
    "moa": "Metadata_MoA",
}
PLATE, BATCH, WELL, SITE = (FIELD_TO_PROFILE[k] for k in ("plate", "batch", "well", "site"))
COMPOUND, CONCENTRATION = FIELD_TO_PROFILE["compound"], FIELD_TO_PROFILE["concentration"]
TREATMENT, MOA = FIELD_TO_PROFILE["treatment"], FIELD_TO_PROFILE["moa"]
METADATA_COLUMNS: tuple[str, ...] = tuple(FIELD_TO_PROFILE.values())

# Columns read back as text whatever they look like (plate "22123" stays a string).
_TEXT_COLUMNS = (PLATE, BATCH, WELL, COMPOUND, TREATMENT, MOA)
SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")


def profile_column(field_column: str) -> str:
    """Profile-table name of a field-table column: ``moa`` -> ``Metadata_MoA``,
    ``replicate`` -> ``Metadata_Replicate``, ``path_DAPI`` -> ``Metadata_path_DAPI``."""
    if field_column in FIELD_TO_PROFILE:
        return FIELD_TO_PROFILE[field_column]
    if field_column.startswith(PREFIX):
        return field_column
    if field_column.islower() and "_" not in field_column:
        return PREFIX + field_column.capitalize()
    return PREFIX + field_column


def _default_names(n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"f{i:0{width}d}" for i in range(n)]


@dataclass
class ProfileTable:
    """Metadata and features of a set of profiles (fields, wells or treatments).

    Attributes
    ----------
    meta
        One row per profile; every column name starts with ``Metadata_``.
    features
        Float array ``(len(meta), n_features)``.
    feature_names
        Column names of the features (no ``Metadata_`` prefix).
    """

    meta: pd.DataFrame
    features: np.ndarray
    feature_names: list[str]

    def __post_init__(self):
        self.meta = self.meta.reset_index(drop=True)
        features = np.asarray(self.features)
        if features.ndim != 2:
            raise DataError(f"Features must be a 2-D array (profiles x features); got shape {features.shape}.")
        if not np.issubdtype(features.dtype, np.floating):
            try:
                features = features.astype(np.float64)
            except (TypeError, ValueError):
                raise DataError("Features must be numbers; cast them to float first.") from None
        self.features = features
        self.feature_names = [str(n) for n in self.feature_names]
        if len(self.meta) != features.shape[0]:
            raise DataError(
                f"{len(self.meta)} metadata rows but {features.shape[0]} feature rows; "
                "row i of the features must belong to row i of the metadata."
            )
        if len(self.feature_names) != features.shape[1]:
            raise DataError(
                f"{len(self.feature_names)} feature names for {features.shape[1]} feature columns."
            )
        bad = [c for c in self.meta.columns if not str(c).startswith(PREFIX)]
        if bad:
            raise DataError(f"Metadata columns must start with {PREFIX!r}; these do not: {bad[:5]}.")
        clash = [n for n in self.feature_names if n.startswith(PREFIX)]
        if clash or len(set(self.feature_names)) != len(self.feature_names):
            raise DataError("Feature names must be unique and must not start with 'Metadata_'.")

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_fields(
        cls,
        table: pd.DataFrame,
        features: np.ndarray,
        feature_names: Sequence[str] | None = None,
    ) -> "ProfileTable":
        """Profiles from a field table (``core.metadata``) and its embedding.

        Parameters
        ----------
        table
            Field table with columns ``plate, batch, well, site, compound,
            concentration, treatment, moa`` (more are kept as ``Metadata_<Name>``).
        features
            ``(len(table), n_features)``; row i is the embedding of field i.
        feature_names
            Default ``f0000, f0001, ...``.

        Example
        -------
        >>> ProfileTable.from_fields(table, embeddings)  # doctest: +SKIP
        """
        features = np.asarray(features)
        if features.ndim != 2:
            raise DataError(f"Features must be 2-D (fields x features); got shape {features.shape}.")
        missing = [c for c in ("plate", "batch", "compound", "moa") if c not in table.columns]
        if missing:
            raise DataError(
                f"The field table lacks {missing}; build it with core.metadata.load_metadata."
            )
        meta = table.rename(columns={c: profile_column(str(c)) for c in table.columns}).copy()
        if TREATMENT not in meta.columns and CONCENTRATION in meta.columns:
            meta[TREATMENT] = [treatment_name(c, x) for c, x in zip(meta[COMPOUND], meta[CONCENTRATION])]
        order = [c for c in METADATA_COLUMNS if c in meta.columns]
        meta = meta[order + [c for c in meta.columns if c not in order]]
        names = list(feature_names) if feature_names is not None else _default_names(features.shape[1])
        return cls(meta, features, names)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "ProfileTable":
        """Split a flat table: ``Metadata_*`` columns are metadata, the rest features."""
        import pandas as pd

        cols = [str(c) for c in frame.columns]
        frame = frame.set_axis(cols, axis=1)
        meta_cols = [c for c in cols if c.startswith(PREFIX)]
        feat_cols = [c for c in cols if not c.startswith(PREFIX)]
        if not feat_cols:
            raise DataError(
                "The table has no feature columns: every column not starting with "
                "'Metadata_' is a feature, and all columns here are metadata."
            )
        values = frame[feat_cols]
        non_numeric = [c for c in feat_cols if not pd.api.types.is_numeric_dtype(values[c])]
        if non_numeric:
            raise DataError(
                f"Feature column(s) {non_numeric[:5]} are not numeric. Metadata columns "
                "must be named 'Metadata_<Name>' (e.g. 'moa' -> 'Metadata_MoA')."
            )
        return cls(frame[meta_cols].copy(), values.to_numpy(dtype=float), feat_cols)

    # -- I/O -----------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path) -> "ProfileTable":
        """Read a Parquet (``.parquet``/``.pq``) or CSV (``.csv``, ``.csv.gz``, ``.tsv``) file."""
        import pandas as pd

        path = Path(path)
        if not path.exists():
            raise DataError(f"Profile file not found: {path}.")
        name = path.name.lower()
        try:
            if name.endswith((".parquet", ".pq")):
                frame = pd.read_parquet(path)
            elif name.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
                sep = "\t" if name.endswith(".tsv") else ","
                head = pd.read_csv(path, sep=sep, nrows=0)
                if sep == ",":  # a ';'- or tab-separated file read as one column
                    check_separator(head.columns, path, "by commas")
                dtype = {c: str for c in head.columns if c in _TEXT_COLUMNS}
                frame = pd.read_csv(path, sep=sep, dtype=dtype, keep_default_na=False,
                                    na_values={c: ["", "NaN", "nan", "NA"] for c in head.columns
                                               if c not in _TEXT_COLUMNS})
            else:
                raise DataError(
                    f"Unknown profile file type {path.name!r}; use one of {', '.join(SUFFIXES)}."
                )
        except DataError:
            raise
        except Exception as exc:  # pyarrow / parser errors: name the file
            raise DataError(f"Cannot read profiles from {path}: {exc}") from None
        if len(frame) == 0:  # else an empty CSV's columns read as text: "not numeric"
            raise DataError(
                f"{path} has column names but no profile rows (an interrupted or failed "
                "export?): write it again, e.g. with 'wsdino embed CACHE --out FILE'."
            )
        return cls.from_frame(frame)

    def write(self, path: str | Path) -> Path:
        """Write as Parquet or CSV, chosen by the file suffix, to a temporary file renamed
        over ``path`` (an interrupted write leaves the old file); returns the path."""
        path = Path(path)
        name = path.name.lower()
        if not name.endswith((".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".txt")):
            raise DataError(f"Unknown profile file type {path.name!r}; use one of {', '.join(SUFFIXES)}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = self.to_frame()
        with atomic_path(path) as tmp:
            if name.endswith((".parquet", ".pq")):
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False, sep="\t" if name.endswith(".tsv") else ",")
        return path

    def to_frame(self) -> pd.DataFrame:
        """One flat table: metadata columns, then feature columns."""
        import pandas as pd

        feats = pd.DataFrame(self.features, columns=self.feature_names)
        return pd.concat([self.meta.reset_index(drop=True), feats], axis=1)

    # -- views ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.meta)

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    def subset(self, rows) -> "ProfileTable":
        """Rows selected by a boolean mask or integer indices."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return ProfileTable(self.meta.iloc[rows].reset_index(drop=True),
                            self.features[rows], list(self.feature_names))

    def with_features(self, features: np.ndarray, feature_names: Sequence[str] | None = None) -> "ProfileTable":
        """Same metadata, new features (e.g. after normalisation)."""
        names = list(feature_names) if feature_names is not None else (
            list(self.feature_names) if np.shape(features)[1] == self.n_features
            else _default_names(np.shape(features)[1]))
        return ProfileTable(self.meta.copy(), features, names)

    def is_control(self, control: str = CONTROL) -> np.ndarray:
        """Boolean mask of control rows (``Metadata_MoA == control``)."""
        self.require([MOA])
        return (self.meta[MOA].astype(str) == control).to_numpy()

    def require(self, columns: Iterable[str]) -> None:
        """Raise :class:`DataError` unless every named metadata column is present."""
        missing = [c for c in columns if c not in self.meta.columns]
        if missing:
            raise DataError(
                f"The profile table lacks the metadata column(s) {missing}; it has "
                f"{list(self.meta.columns)}. Name them as pycytominer does "
                f"({', '.join(METADATA_COLUMNS)})."
            )

    def check_finite(self) -> None:
        """Raise :class:`DataError` naming the rows and features that hold NaN or inf."""
        bad = ~np.isfinite(self.features)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            cols = np.flatnonzero(bad.any(axis=0))
            names = [self.feature_names[i] for i in cols[:5]]
            raise DataError(
                f"{int(bad.sum())} feature value(s) are NaN or infinite, in {len(rows)} "
                f"profile(s) (first rows {rows[:5].tolist()}) and {len(cols)} feature(s) "
                f"(e.g. {names}). Drop those profiles or features, or impute them, first."
            )

    def constant_features(self, rows=None) -> list[str]:
        """Names of features that take a single value (over ``rows``, default all)."""
        x = self.features if rows is None else self.features[rows]
        if len(x) == 0:
            return []
        const = np.all(x == x[:1], axis=0)
        return [n for n, c in zip(self.feature_names, const) if c]

    def drop_features(self, names: Iterable[str]) -> "ProfileTable":
        """A copy without the named features."""
        drop = set(names)
        keep = [i for i, n in enumerate(self.feature_names) if n not in drop]
        return ProfileTable(self.meta.copy(), self.features[:, keep],
                            [self.feature_names[i] for i in keep])

    def drop_constant_features(self) -> "ProfileTable":
        """A copy without features that are constant over all profiles."""
        return self.drop_features(self.constant_features())


def evaluation_warnings(profiles: ProfileTable, control: str = CONTROL) -> list[str]:
    """What makes an evaluation of ``profiles`` trivial or skewed, one line each (empty
    when nothing does): fewer than two MoAs besides ``control`` (every match is right),
    profiles of one field given more than once (they count twice, controls included).

    >>> meta = pd.DataFrame({MOA: ["DMSO", "Actin disruptors"], PLATE: ["p", "p"],
    ...                      WELL: ["B02", "B03"], SITE: [1, 1]})
    >>> evaluation_warnings(ProfileTable(meta, np.eye(2), ["a", "b"]))[0][:40]
    'Only one MoA (Actin disruptors) besides '
    """
    out = []
    moas = sorted(set(profiles.meta[MOA].astype(str)) - {control}) if MOA in profiles.meta else []
    if len(moas) < 2:
        which = f"one MoA ({moas[0]})" if moas else "no MoA"
        out.append(f"Only {which} besides {control}: NSC, NSCB and mAP are trivially "
                   "100 % or undefined; evaluate profiles of at least two MoAs.")
    keys = [c for c in (PLATE, WELL, SITE) if c in profiles.meta]
    if len(keys) == 3:
        dup = profiles.meta.duplicated(subset=keys).to_numpy()
    else:  # no field identity: identical metadata and features
        dup = profiles.to_frame().duplicated().to_numpy()
    if dup.any():
        first = profiles.meta.loc[dup].iloc[0]
        where = "/".join(str(first[c]) for c in keys) if keys else f"row {int(np.argmax(dup))}"
        out.append(f"{int(dup.sum())} profile(s) repeat a field given before (e.g. {where}), "
                   "so they count twice (DMSO too): remove the duplicates (a table "
                   "concatenated twice?) and evaluate again.")
    return out


def simulate_profiles(table: pd.DataFrame, n_features: int = 32, *, moa_signal: float = 1.0,
                      compound_signal: float = 0.3, batch_signal: float = 0.5,
                      plate_signal: float = 0.2, seed: int = 0,
                      dtype=np.float32) -> ProfileTable:
    """Random field profiles with a known structure, for tests, demos and benchmarks.

    Each field is Gaussian noise plus a vector per MoA (zero for DMSO), per
    compound, per batch and per plate, scaled by the ``*_signal`` arguments, so a
    good evaluation finds the MoAs and TVN / NSCB have batch effects to remove.

    Example
    -------
    >>> from napari_wsdino.core.metadata import load_metadata, bundled_metadata_dir
    >>> t = load_metadata(bundled_metadata_dir(), check_files=False).table
    >>> simulate_profiles(t, 8).features.shape
    (3848, 8)
    """
    rng = np.random.default_rng(seed)

    def effect(column: str, scale: float, zero: str | None = None) -> np.ndarray:
        import pandas as pd

        codes, names = pd.factorize(table[column].astype(str), sort=True)
        vectors = rng.normal(size=(len(names), n_features)) * scale
        if zero is not None and zero in set(names):
            vectors[list(names).index(zero)] = 0.0
        return vectors[codes]

    x = rng.normal(size=(len(table), n_features))
    x += effect("moa", moa_signal, zero=CONTROL)
    x += effect("compound", compound_signal, zero=CONTROL)
    x += effect("batch", batch_signal)
    x += effect("plate", plate_signal)
    return ProfileTable.from_fields(table, x.astype(dtype))
