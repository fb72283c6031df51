"""Typical variation normalisation (TVN; Ando et al. 2017, as used by WS-DINO).

TVN is PCA whitening without dimensionality reduction, fitted on the control
(DMSO) fields only and applied to every field: after it, the controls have zero
mean and identity covariance, so directions in which untreated cells vary
anyway are scaled down and the rest scaled up.

Variants (``method``):

``"paper"``
    One whitening fitted on all DMSO fields (the WS-DINO paper).
``"per-plate"``
    Each plate is first centred and scaled, feature by feature, on its own DMSO
    fields (removes plate offsets), then one whitening is fitted on all DMSO fields.
``"per-channel"``
    The published evaluation code's variant (crosszamirski/WS-DINO, ``Eval_BBBC021.py``):
    one whitening per channel (scikit-learn ``PCA(whiten=True)`` with all components),
    fitted on that channel's raw CLS features of the DMSO fields; the whitened channels
    are then concatenated. Channels are the feature-name prefixes (``DAPI_000`` and
    ``DAPI_log_mean`` -> ``DAPI``). Embed with ``l2=False`` to whiten raw CLS features as that code does.
``"none"``
    Features are left as they are.

Regularisation. The DMSO covariance ``C`` is singular when there are no more
DMSO fields than features (``n_dmso <= n_features``) or the features are
collinear. Whitening then divides by zero, so the covariance is shrunk towards a
scaled identity, ``(1 - a) C + a * mean(eig(C)) * I``, with the Ledoit-Wolf
coefficient ``a`` (:func:`sklearn.covariance.ledoit_wolf_shrinkage`).
``shrinkage="auto"`` (default) does this only when ``C`` is singular
(``n_dmso <= n_features`` or smallest eigenvalue below ``1e-10`` x largest) and
uses exact whitening otherwise; a number in ``[0, 1]`` fixes ``a``. With ``a > 0``
the DMSO covariance after TVN has eigenvalues ``s / ((1 - a) s + a mean(s))``
instead of exactly one.

Every whitening ``W`` with ``W W^T = C^-1`` gives the same field-level dot
products ``x C^-1 y``; the per-feature median across plates that follows does
depend on the axes, and these are the principal axes, as in the paper.

Example
-------
>>> tvn = TypicalVariationNormalizer().fit(X, is_control)      # doctest: +SKIP
>>> Z = tvn.transform(X)                                       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.profiles import PLATE, ProfileTable

_SINGULAR = 1e-10
_ROWS = 4096  # rows transformed at a time (up to this many: one product, as before)


@dataclass(frozen=True)
class TVNMethod:
    """One registered TVN variant: its name, display name and help, and what it does.

    ``whiten``: fit a whitening (else features pass through); ``plate_scaling``: centre
    and scale each plate on its own DMSO first; ``per_channel``: one whitening per
    channel (feature-name prefix), concatenated.
    """

    name: str
    display: str
    help: str
    whiten: bool = True
    plate_scaling: bool = False
    per_channel: bool = False


#: The registered TVN methods by name, in display order (see :func:`register_tvn`).
TVN_METHODS: dict[str, TVNMethod] = {}


def register_tvn(method: TVNMethod) -> TVNMethod:
    """Add a TVN method to :data:`TVN_METHODS` (and so to the CLI's and panel's choices)."""
    TVN_METHODS[method.name] = method
    return method


register_tvn(TVNMethod(
    "paper", "Paper (all DMSO fields)",
    "one whitening fitted on all DMSO fields (the WS-DINO paper); when there are too few DMSO "
    "fields, the covariance is shrunk (Ledoit-Wolf shrinkage: blended with a scaled identity "
    "so it can be inverted)"))
register_tvn(TVNMethod(
    "per-plate", "Per plate, then paper",
    "each plate centred and scaled on its own DMSO fields first, then the paper's whitening",
    plate_scaling=True))
register_tvn(TVNMethod(
    "per-channel", "Per channel (published code)",
    "one whitening per channel (the published evaluation code's variant), concatenated",
    per_channel=True))
register_tvn(TVNMethod("none", "None", "features left as they are", whiten=False))

#: The default TVN method, written once: use it wherever a default ``tvn`` is needed.
DEFAULT_TVN = "paper"
#: Names of the registered methods (kept for ``from napari_wsdino.core.tvn import METHODS``).
METHODS = tuple(TVN_METHODS)


def get_tvn(method: str) -> TVNMethod:
    """The registered :class:`TVNMethod` called ``method``; a :class:`DataError` naming the
    choices otherwise."""
    if method not in TVN_METHODS:
        raise DataError(f"Unknown TVN method {method!r}; choose one of {', '.join(TVN_METHODS)}.")
    return TVN_METHODS[method]


def _check_method(method: str) -> str:
    return get_tvn(method).name


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        cols = np.flatnonzero(bad.any(axis=0))
        raise DataError(
            f"{int(bad.sum())} {what} value(s) are NaN or infinite (rows {rows[:5].tolist()}, "
            f"feature columns {cols[:5].tolist()}). TVN cannot use them: drop those "
            "profiles or features, or impute them, first."
        )


@dataclass
class TypicalVariationNormalizer:
    """TVN as a scikit-learn-style transformer: ``fit`` on controls, ``transform`` all.

    Parameters
    ----------
    method
        A name in :data:`TVN_METHODS` (``"paper"``, ``"per-plate"``, ``"per-channel"``,
        ``"none"``; see the module docstring).
    shrinkage
        ``"auto"`` or a Ledoit-Wolf-style coefficient in ``[0, 1]``.
    groups
        ``"per-channel"`` only: the group (channel) of each feature column, e.g.
        ``channel_groups(feature_names)``.

    Attributes (after ``fit``)
    --------------------------
    mean_
        DMSO mean ``(d,)`` (after per-plate scaling, for ``"per-plate"``).
    components_
        Eigenvectors of the DMSO covariance, one per column ``(d, d)``.
    explained_variance_
        Its eigenvalues ``(d,)``, largest first.
    shrinkage_
        Coefficient actually used.
    plate_mean_, plate_scale_
        ``"per-plate"`` only: ``{plate: (d,)}`` DMSO mean and standard deviation.
    """

    method: str = DEFAULT_TVN
    shrinkage: str | float = "auto"
    groups: tuple | None = None

    @property
    def spec(self) -> TVNMethod:
        """The registered method."""
        return get_tvn(self.method)

    def __post_init__(self):
        _check_method(self.method)
        if self.spec.per_channel:
            if self.groups is None:
                raise DataError("Per-channel TVN needs the channel of every feature (groups).")
            self.groups = tuple(str(g) for g in self.groups)
        if not (self.shrinkage == "auto" or (isinstance(self.shrinkage, (int, float))
                                             and 0.0 <= float(self.shrinkage) <= 1.0)):
            raise DataError(f"shrinkage must be 'auto' or a number in [0, 1]; got {self.shrinkage!r}.")

    # -- per-plate scaling ----------------------------------------------------------
    def _fit_plates(self, x, is_control, plates):
        pooled = x[is_control].std(axis=0)
        self.plate_mean_, self.plate_scale_ = {}, {}
        for plate in np.unique(plates):
            ctl = x[(plates == plate) & is_control]
            if len(ctl) == 0:
                raise DataError(
                    f"Plate {plate!r} has no DMSO fields; per-plate TVN needs controls on every "
                    "plate. Use the 'paper' variant (one whitening over all DMSO fields)."
                )
            sd = ctl.std(axis=0)
            # A feature constant on one plate's few controls: fall back to the pooled spread.
            sd = np.where(sd > 0, sd, pooled)
            self.plate_mean_[plate] = ctl.mean(axis=0)
            self.plate_scale_[plate] = sd

    def _scale_plates(self, x, plates):
        out = np.empty_like(x, dtype=np.float64)
        for plate in np.unique(plates):
            if plate not in self.plate_mean_:
                raise DataError(f"Plate {plate!r} was not seen when TVN was fitted.")
            rows = plates == plate
            out[rows] = (x[rows] - self.plate_mean_[plate]) / self.plate_scale_[plate]
        return out

    # -- transformer API -----------------------------------------------------------
    def fit(self, X, is_control, plates=None) -> "TypicalVariationNormalizer":
        """Fit on the rows of ``X`` where ``is_control`` is true.

        Parameters
        ----------
        X
            ``(n, d)`` features of all profiles.
        is_control
            ``(n,)`` boolean mask of DMSO rows.
        plates
            ``(n,)`` plate of each row; needed for ``"per-plate"``.
        """
        x = np.asarray(X, dtype=np.float64)
        is_control = np.asarray(is_control, dtype=bool)
        _check_finite(x, "feature")
        n_ctl, d = int(is_control.sum()), x.shape[1]
        self.n_features_in_ = d
        if not self.spec.whiten:
            return self
        if self.spec.per_channel:
            return self._fit_groups(x, is_control)
        if n_ctl < 2:
            raise DataError(
                f"TVN needs at least two DMSO fields to fit on; found {n_ctl}. Label the "
                "control rows Metadata_MoA (or Metadata_Compound) 'DMSO', or use tvn='none' "
                "(CLI: --tvn none)."
            )
        ctl = x[is_control]
        const = np.flatnonzero(np.all(ctl == ctl[:1], axis=0))
        if len(const):
            raise DataError(
                f"{len(const)} feature(s) are constant over the {n_ctl} DMSO fields (columns "
                f"{const[:5].tolist()}): whitening cannot scale a feature with no typical "
                "variation. Drop them (ProfileTable.drop_features / drop_constant_features; "
                "CLI: --drop-constant) or use tvn='none'."
            )
        if self.spec.plate_scaling:
            if plates is None:
                raise DataError("Per-plate TVN needs the plate of every row (Metadata_Plate).")
            plates = np.asarray(plates)
            self._fit_plates(x, is_control, plates)
            ctl = self._scale_plates(ctl, plates[is_control])
        self.mean_ = ctl.mean(axis=0)
        centred = ctl - self.mean_
        cov = centred.T @ centred / (n_ctl - 1)
        # numpy's eigh (LAPACK's syevd, as scipy's driver="evd": the same values bit for bit)
        # lets go of the GIL while it runs; scipy's holds it, which froze napari's window
        # for 0.1-1.6 s per fit on a busy 2-core machine (tests/test_napari_latency.py).
        s, v = np.linalg.eigh(cov)
        s, v = np.clip(s[::-1], 0.0, None), v[:, ::-1]  # PCA order: largest variance first
        singular = n_ctl <= d or s[-1] <= _SINGULAR * s[0]
        if self.shrinkage == "auto":
            a = 0.0
            if singular:
                from sklearn.covariance import ledoit_wolf_shrinkage

                a = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
                a = min(max(a, 1e-6), 1.0)  # never exactly 0: C is singular here
        else:
            a = float(self.shrinkage)
            if a == 0.0 and singular:
                raise DataError(
                    f"The DMSO covariance is singular ({n_ctl} DMSO fields, {d} features); "
                    "exact whitening is impossible. Use shrinkage='auto' or a value > 0."
                )
        self.shrinkage_ = a
        self.components_ = v
        self.explained_variance_ = s
        self.scale_ = 1.0 / np.sqrt((1.0 - a) * s + a * s.mean())
        self.n_controls_ = n_ctl
        return self

    def transform(self, X, plates=None) -> np.ndarray:
        """Whiten ``X`` (``(n, d)``) with the fitted controls; returns float64 ``(n, d)``."""
        x = np.asarray(X, dtype=np.float64)
        _check_finite(x, "feature")
        if not self.spec.whiten:
            return x.copy()
        if not hasattr(self, "components_"):
            raise RuntimeError("TypicalVariationNormalizer is not fitted; call fit first.")
        if x.shape[1] != self.n_features_in_:
            raise DataError(f"TVN was fitted on {self.n_features_in_} features, got {x.shape[1]}.")
        if self.spec.plate_scaling:
            if plates is None:
                raise DataError("Per-plate TVN needs the plate of every row (Metadata_Plate).")
            x = self._scale_plates(x, np.asarray(plates))
        if self.spec.per_channel:
            return np.concatenate([tvn.transform(x[:, cols]) for cols, tvn in self.parts_], axis=1)
        z = np.empty((len(x), self.components_.shape[1]), dtype=np.float64)
        for i in range(0, len(x), _ROWS):  # row chunks: no (n, d) temporary at screen scale
            z[i:i + _ROWS] = (x[i:i + _ROWS] - self.mean_) @ self.components_
        z *= self.scale_
        return z

    def _fit_groups(self, x, is_control) -> "TypicalVariationNormalizer":
        groups = np.asarray(self.groups, dtype=object)
        if len(groups) != x.shape[1]:
            raise DataError(f"{len(groups)} feature groups given for {x.shape[1]} features.")
        names = list(dict.fromkeys(groups))  # first-seen order = column order
        self.parts_ = []
        for name in names:
            cols = np.flatnonzero(groups == name)
            self.parts_.append((cols, TypicalVariationNormalizer("paper", self.shrinkage)
                                .fit(x[:, cols], is_control)))
        self.shrinkage_ = max(t.shrinkage_ for _, t in self.parts_)
        self.components_ = None  # marks the normaliser as fitted
        return self

    def fit_transform(self, X, is_control, plates=None) -> np.ndarray:
        return self.fit(X, is_control, plates).transform(X, plates)


def apply_tvn(profiles: ProfileTable, method: str = DEFAULT_TVN, shrinkage: str | float = "auto",
              control: str = "DMSO") -> tuple[ProfileTable, TypicalVariationNormalizer]:
    """Fit TVN on the control rows of a field-level profile table and apply it to all rows.

    Returns the normalised table (features renamed ``pc0000...`` unless ``method="none"``,
    since they are principal axes, not the input features) and the fitted normaliser.

    Example
    -------
    >>> normalised, tvn = apply_tvn(profiles, "per-plate")      # doctest: +SKIP
    """
    tvn = make_tvn(method, profiles.feature_names, shrinkage)
    plates = None
    if tvn.spec.plate_scaling:
        profiles.require([PLATE])
        plates = profiles.meta[PLATE].astype(str).to_numpy()
    is_control = profiles.is_control(control)
    z = tvn.fit_transform(profiles.features, is_control, plates)
    return profiles.with_features(z, output_names(method, profiles.feature_names)), tvn


def make_tvn(method: str, feature_names, shrinkage: str | float = "auto") -> TypicalVariationNormalizer:
    """An unfitted normaliser for ``method`` on these features (channel groups where the
    method whitens per channel)."""
    groups = channel_groups(feature_names) if get_tvn(method).per_channel else None
    return TypicalVariationNormalizer(method, shrinkage, groups)


def channel_groups(names) -> list[str]:
    """The channel of each feature name: the part before the first ``_`` (``DAPI_007``,
    ``DAPI_log_mean``)."""
    return [str(n).split("_", 1)[0] for n in names]


def output_names(method: str, names: list[str]) -> list[str]:
    """Feature names after TVN: unchanged for ``"none"``, else principal axes ``pc0000...``
    (``DAPI_pc000...`` per channel for ``"per-channel"``)."""
    spec = get_tvn(method)
    if not spec.whiten:
        return list(names)
    if spec.per_channel:
        groups = channel_groups(names)
        out, seen = [], {}
        for g in groups:
            seen[g] = seen.get(g, -1) + 1
            out.append(f"{g}_pc{seen[g]:04d}")
        return out
    width = max(4, len(str(len(names) - 1)))
    return [f"pc{i:0{width}d}" for i in range(len(names))]
