"""One call from field-level profiles to NSC / NSCB, mAP, k-NN and confusion matrices.

``evaluate_profiles`` is what the GUI, the CLI (``wsdino evaluate``) and the demo
call; ``iter_evaluate`` is the same work as a progress generator (for a napari
``thread_worker``); ``evaluate_treatments`` starts from treatment profiles that
are already aggregated.

Steps: validate -> TVN on the fields (:mod:`~napari_wsdino.core.tvn`) -> mean
per (treatment, plate), median across plates (:mod:`~napari_wsdino.core.aggregate`)
-> matching (:mod:`~napari_wsdino.core.metrics`, where the rules, tie-break and
mAP are defined).

Example
-------
>>> from napari_wsdino.core.evaluation import evaluate_profiles
>>> result = evaluate_profiles(ProfileTable.read("profiles.parquet"))  # doctest: +SKIP
>>> result.nsc, result.nscb, result.to_dict()["n_nscb"]                 # doctest: +SKIP
(0.92, 0.9, 92)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generator

import numpy as np
import pandas as pd

from napari_wsdino.core import metrics
from napari_wsdino.core.aggregate import median_across_plates, plate_means, treatment_batches
from napari_wsdino.core.blockmatch import Rule, match_blockwise
from napari_wsdino.core.metadata import CONTROL, DataError, treatment_name
from napari_wsdino.core.profiles import (
    BATCH, COMPOUND, CONCENTRATION, MOA, PLATE, TREATMENT, ProfileTable, evaluation_warnings,
)
from napari_wsdino.core.progress import Progress, run_to_end
from napari_wsdino.core.tvn import DEFAULT_TVN, get_tvn, make_tvn, output_names

DEFAULT_KS = (1, 3, 5)


def _num(x):
    """JSON-safe float: NaN -> None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class EvaluationResult:
    """Everything an evaluation produces.

    ``to_dict()`` gives the JSON of ``wsdino evaluate --json``: keys ``nsc, nscb,
    n_nsc, n_nscb, map_nsc, map_nscb, per_moa`` plus extras (``knn``, ``tvn``,
    ``shrinkage``, counts, ``notes``).

    Attributes
    ----------
    treatments
        Treatment profiles that were matched (after TVN and aggregation).
    neighbours
        One row per treatment: its NSC / NSCB neighbour, MoA, similarity, correctness, AP.
    confusion_nsc, confusion_nscb
        MoA confusion matrices (rows true MoA, columns neighbour's MoA).
    nsc_match, nscb_match
        The raw :class:`~napari_wsdino.core.metrics.MatchResult` objects.
    """

    nsc: float
    nscb: float | None
    n_nsc: int
    n_nscb: int
    map_nsc: float
    map_nscb: float | None
    per_moa: dict
    knn: dict
    tvn: str
    shrinkage: float | None
    n_fields: int
    n_dmso_fields: int
    n_treatments: int
    n_features: int
    treatments: ProfileTable
    neighbours: pd.DataFrame
    confusion_nsc: pd.DataFrame
    confusion_nscb: pd.DataFrame | None
    nsc_match: metrics.MatchResult
    nscb_match: metrics.MatchResult | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (NaN written as ``null``)."""
        return {
            "nsc": _num(self.nsc),
            "nscb": _num(self.nscb),
            "n_nsc": self.n_nsc,
            "n_nscb": self.n_nscb,
            "map_nsc": _num(self.map_nsc),
            "map_nscb": _num(self.map_nscb),
            "per_moa": {m: {k: (_num(v) if isinstance(v, float) else v) for k, v in d.items()}
                        for m, d in self.per_moa.items()},
            "knn": {rule: {str(k): _num(v) for k, v in acc.items()} for rule, acc in self.knn.items()},
            "tvn": self.tvn,
            "shrinkage": _num(self.shrinkage),
            "n_fields": self.n_fields,
            "n_dmso_fields": self.n_dmso_fields,
            "n_treatments": self.n_treatments,
            "n_features": self.n_features,
            "notes": list(self.notes),
        }


#: Treated profiles without a MoA: refuse (default) or leave them out.
UNANNOTATED = ("error", "drop")


def prepare_profiles(profiles: ProfileTable, *, control: str = CONTROL, unannotated: str = "error",
                     drop_constant: bool = False, notes: list | None = None,
                     nscb: bool = True) -> ProfileTable:
    """Check a field-level table for evaluation; returns a cleaned copy.

    Raises :class:`DataError` for missing columns, NaN / infinite features, treatments
    without MoA (unless ``unannotated="drop"``), a treatment with several MoAs. Rows of
    the ``control`` compound with an empty MoA are controls (a note says so).
    """
    if unannotated not in UNANNOTATED:
        raise ValueError(f"unannotated must be one of {', '.join(UNANNOTATED)}")
    notes = notes if notes is not None else []
    if TREATMENT not in profiles.meta.columns and {COMPOUND, CONCENTRATION} <= set(profiles.meta):
        profiles = profiles.with_features(profiles.features)
        profiles.meta[TREATMENT] = [treatment_name(c, x) for c, x in
                                    zip(profiles.meta[COMPOUND], profiles.meta[CONCENTRATION])]
    profiles.require([PLATE, COMPOUND, TREATMENT, MOA] + ([BATCH] if nscb else []))
    if len(profiles) == 0:
        raise DataError("The profile table is empty.")
    profiles.check_finite()
    moa = profiles.meta[MOA]
    missing = moa.isna() | (moa.astype(str).str.strip() == "")
    # Controls are known by their compound too (load_metadata labels them so): a DMSO
    # row with an empty MoA cell is a control, not a treatment to drop.
    named = profiles.meta[COMPOUND].astype(str).str.strip().str.casefold() == control.casefold()
    if (missing & named).any():
        profiles = profiles.with_features(profiles.features)
        profiles.meta[MOA] = profiles.meta[MOA].astype(object)
        profiles.meta.loc[(missing & named).to_numpy(), MOA] = control
        notes.append(f"{int((missing & named).sum())} profile(s) of compound {control} with an "
                     f"empty Metadata_MoA taken as {control} controls")
        missing = missing & ~named
    if missing.any():
        names = sorted(profiles.meta.loc[missing, TREATMENT].astype(str).unique())
        if unannotated == "error":
            raise DataError(
                f"{len(names)} treatment(s) ({int(missing.sum())} profiles) have no MoA "
                f"(empty Metadata_MoA): {names[:5]}{' ...' if len(names) > 5 else ''}. "
                "Label them, or leave them out (Python: unannotated='drop'; "
                "CLI: --unannotated drop)."
            )
        profiles = profiles.subset(~missing.to_numpy())
        notes.append(f"left out {len(names)} treatment(s) without MoA ({int(missing.sum())} profiles)")
    if drop_constant:
        # Constant over all rows, or over the controls alone (TVN cannot whiten those).
        ctl = profiles.is_control(control)
        const = sorted(set(profiles.constant_features())
                       | set(profiles.constant_features(rows=ctl) if ctl.sum() > 1 else []),
                       key=profiles.feature_names.index)
        if const:
            if len(const) == profiles.n_features:
                raise DataError("Every feature is constant; there is nothing to evaluate.")
            profiles = profiles.drop_features(const)
            notes.append(f"dropped {len(const)} constant feature(s): {const[:5]}")
    return profiles


def _nscb_rule(meta: pd.DataFrame, moas: np.ndarray, batch_code=None) -> Rule:
    """The NSCB rule of a treatment table (eligible MoAs, batch codes), checked."""
    batches = treatment_batches(meta[BATCH])
    all_batches = sorted({b for bs in batches for b in bs})
    if len(all_batches) < 2:
        raise DataError(
            f"All profiles are in one batch ({all_batches[0] if all_batches else 'none'}); "
            "NSCB needs at least two. Evaluate NSC only (Python: nscb=False; CLI: --no-nscb)."
        )
    eligible = metrics.nscb_eligible(moas, batches)
    if not eligible.any():
        raise DataError(
            "No MoA occurs in two or more batches, so no treatment can be NSCB-matched. "
            "Evaluate NSC only (Python: nscb=False; CLI: --no-nscb)."
        )
    codes = metrics.batch_codes(batches) if batch_code is None else np.asarray(batch_code)
    return Rule(codes, eligible)


def _neighbour_table(meta: pd.DataFrame, eligible, matches) -> pd.DataFrame:
    """One row per treatment: its neighbour, neighbour's MoA, similarity, correctness and
    AP under each rule."""
    names = meta[TREATMENT].astype(str).to_numpy()
    moas = meta[MOA].astype(str).to_numpy()
    rows = {"treatment": names, "compound": meta[COMPOUND].astype(str).to_numpy()}
    if CONCENTRATION in meta:
        rows["concentration"] = meta[CONCENTRATION].to_numpy()
    rows["moa"] = moas
    if BATCH in meta:
        rows["batch"] = meta[BATCH].astype(str).to_numpy()
    rows["nscb_eligible"] = eligible
    for m in matches:
        nb = m.neighbour
        rows[f"{m.rule}_neighbour"] = np.where(nb >= 0, names[nb], "")
        rows[f"{m.rule}_neighbour_moa"] = np.where(nb >= 0, moas[nb], "")
        rows[f"{m.rule}_similarity"] = m.similarity
        rows[f"{m.rule}_correct"] = np.where(m.query, m.correct, None)
        rows[f"{m.rule}_ap"] = m.average_precision
    return pd.DataFrame(rows)


def _per_moa(moas, nsc_match, nscb_match) -> dict:
    """``{moa: {nsc, n_nsc, nscb, n_nscb}}`` accuracy and query count per MoA."""
    acc_nsc = metrics.per_label_accuracy(nsc_match, moas)
    acc_nscb = metrics.per_label_accuracy(nscb_match, moas) if nscb_match else {}
    per_moa = {}
    for m in sorted(set(moas)):
        a, n = acc_nsc.get(m, (float("nan"), 0))
        b, nb_ = acc_nscb.get(m, (float("nan"), 0))
        per_moa[m] = {"nsc": a, "n_nsc": n, "nscb": b if nb_ else None, "n_nscb": nb_}
    return per_moa


def evaluate_treatments(treatments: ProfileTable, *, ks=DEFAULT_KS, nscb: bool = True,
                        control: str = CONTROL, batch_code=None, block_rows=None) -> dict:
    """NSC / NSCB matching on treatment profiles (one row per treatment, canonical order).

    Needs ``Metadata_Treatment, Metadata_Compound, Metadata_MoA`` and, for NSCB,
    ``Metadata_Batch`` (batches joined by ``","``, as :func:`aggregate_treatments`
    writes it). Control rows (MoA ``control``) are left out. Returns a dict with
    ``nsc_match``, ``nscb_match`` (or ``None``), ``eligible``, ``neighbours``,
    ``per_moa``, ``confusion_nsc``, ``confusion_nscb``. ``batch_code`` (one number per
    row) replaces the batch codes of the NSCB rule, e.g.
    :func:`~napari_wsdino.core.metrics.median_batch_codes` (the ``official`` rule).
    Matching runs in blocks of ``block_rows`` queries with bounded memory
    (:func:`~napari_wsdino.core.blockmatch.match_blockwise`; default: its block size);
    above :data:`~napari_wsdino.core.blockmatch.EXACT_MAX` treatments similarities are
    float32, rounded to 6 decimals.
    """
    treatments.require([TREATMENT, COMPOUND, MOA])
    is_control = treatments.is_control(control)
    if is_control.any():  # controls are never queries nor candidates
        treatments = treatments.subset(~is_control)
        if batch_code is not None:
            batch_code = np.asarray(batch_code)[~is_control]
    meta = treatments.meta
    moas = meta[MOA].astype(str).to_numpy()
    compounds = meta[COMPOUND].astype(str).to_numpy()
    if len(set(compounds)) < 2:
        raise DataError(
            f"NSC needs treatments of at least two compounds; found {sorted(set(compounds))}."
        )
    ks = tuple(sorted(set([1, *map(int, ks)])))
    if ks[0] < 1:
        raise DataError(f"k-NN needs k >= 1; got {ks[0]}.")
    rules = {"nsc": Rule()}
    if nscb:
        treatments.require([BATCH])
        rules["nscb"] = _nscb_rule(meta, moas, batch_code)
    matches = match_blockwise(treatments.features, compounds, moas, rules, ks=ks,
                              block_rows=block_rows)
    nsc_match, nscb_match = matches["nsc"], matches.get("nscb")
    eligible = rules["nscb"].eligible if nscb else np.zeros(len(meta), dtype=bool)
    return {
        "nsc_match": nsc_match,
        "nscb_match": nscb_match,
        "eligible": eligible,
        "neighbours": _neighbour_table(meta, eligible, list(matches.values())),
        "per_moa": _per_moa(moas, nsc_match, nscb_match),
        "confusion_nsc": metrics.confusion(nsc_match, moas, sorted(set(moas))),
        "confusion_nscb": (metrics.confusion(nscb_match, moas, sorted(set(moas[eligible])))
                           if nscb_match else None),
    }


def iter_evaluate(profiles: ProfileTable, tvn: str = DEFAULT_TVN, *, shrinkage="auto", ks=DEFAULT_KS,
                  nscb: bool = True, unannotated: str = "error", drop_constant: bool = False,
                  control: str = CONTROL, nscb_multibatch: str = "exempt",
                  ) -> Generator[Progress, None, EvaluationResult]:
    """:func:`evaluate_profiles` as a generator of :class:`Progress` events."""
    get_tvn(tvn)  # a clear error for an unknown method, before any work
    if nscb_multibatch not in metrics.NSCB_MULTIBATCH:
        raise DataError(f"Unknown NSCB multi-batch rule {nscb_multibatch!r}; choose one of "
                        f"{', '.join(metrics.NSCB_MULTIBATCH)}.")
    total = 4
    notes: list[str] = []
    yield Progress("evaluate", 0, total, "checking profiles")
    profiles = prepare_profiles(profiles, control=control, unannotated=unannotated,
                                drop_constant=drop_constant, notes=notes, nscb=nscb)
    is_control = profiles.is_control(control)
    for warning in evaluation_warnings(profiles, control):  # one MoA, duplicated rows
        notes.append(warning)
        yield Progress("evaluate", 0, total, warning, {"warning": warning})
    yield Progress("evaluate", 1, total, f"TVN ({tvn})")
    fitted = make_tvn(tvn, profiles.feature_names, shrinkage)
    plates = profiles.meta[PLATE].astype(str).to_numpy() if fitted.spec.plate_scaling else None
    fitted.fit(profiles.features, is_control, plates)
    shrink = getattr(fitted, "shrinkage_", None)
    if shrink:
        notes.append(
            f"DMSO covariance regularised: Ledoit-Wolf shrinkage {shrink:.3g} "
            f"({int(is_control.sum())} DMSO fields, {profiles.n_features} features)"
        )
    yield Progress("evaluate", 2, total, "aggregating treatments")
    # TVN is affine and plate-wise, so it commutes with the (treatment, plate) mean:
    # whitening the ~350 plate means equals whitening all fields first, at a tenth of the cost.
    means = plate_means(profiles, control)
    means = means.with_features(fitted.transform(means.features, means.meta[PLATE].to_numpy()),
                                output_names(tvn, means.feature_names))  # raw means freed
    treatments = median_across_plates(means)
    codes = None
    if nscb and nscb_multibatch == "official" and BATCH in means.meta:
        codes = metrics.median_batch_codes(means.meta[TREATMENT], means.meta[BATCH],
                                           treatments.meta[TREATMENT])
    del means  # at screen scale, one (treatments x features) array less while matching
    yield Progress("evaluate", 3, total, "matching")
    out = evaluate_treatments(treatments, ks=ks, nscb=nscb, batch_code=codes)
    nsc_m, nscb_m = out["nsc_match"], out["nscb_match"]
    n_queries = len(treatments)
    if nsc_m.n < n_queries:
        notes.append(f"{n_queries - nsc_m.n} treatment(s) had no NSC candidate and were not counted")
    knn = {"nsc": nsc_m.knn}
    if nscb_m is not None:
        knn["nscb"] = nscb_m.knn
    result = EvaluationResult(
        nsc=nsc_m.accuracy,
        nscb=nscb_m.accuracy if nscb_m else None,
        n_nsc=nsc_m.n,
        n_nscb=nscb_m.n if nscb_m else 0,
        map_nsc=nsc_m.map,
        map_nscb=nscb_m.map if nscb_m else None,
        per_moa=out["per_moa"],
        knn=knn,
        tvn=tvn,
        shrinkage=shrink,
        n_fields=len(profiles),
        n_dmso_fields=int(is_control.sum()),
        n_treatments=len(treatments),
        n_features=profiles.n_features,
        treatments=treatments,
        neighbours=out["neighbours"],
        confusion_nsc=out["confusion_nsc"],
        confusion_nscb=out["confusion_nscb"],
        nsc_match=nsc_m,
        nscb_match=nscb_m,
        notes=notes,
    )
    yield Progress("evaluate", total, total, f"NSC {result.nsc:.1%}")
    return result


def evaluate_profiles(profiles: ProfileTable, tvn: str = DEFAULT_TVN, **kwargs) -> EvaluationResult:
    """TVN, aggregation and NSC / NSCB / k-NN / mAP on field-level profiles.

    Parameters
    ----------
    profiles
        Field-level :class:`ProfileTable` (controls with ``Metadata_MoA == "DMSO"``).
    tvn
        A TVN method of :data:`~napari_wsdino.core.tvn.TVN_METHODS` (``"paper"``, the
        default :data:`~napari_wsdino.core.tvn.DEFAULT_TVN`, ``"per-plate"``,
        ``"per-channel"`` or ``"none"``).
    nscb_multibatch
        ``"exempt"`` (default: treatments seen in several batches skip the batch rule)
        or ``"official"`` (WS-DINO's code: median batch code, rule applied).
    shrinkage
        TVN covariance shrinkage: ``"auto"`` or a number in [0, 1].
    ks
        k values for k-NN accuracy (default 1, 3, 5).
    nscb
        Compute NSCB (needs at least two batches).
    unannotated
        Non-control profiles without MoA: ``"error"`` or ``"drop"``.
    drop_constant
        Drop features that are constant over all profiles instead of failing in TVN.

    Returns
    -------
    EvaluationResult

    Example
    -------
    >>> evaluate_profiles(profiles, tvn="per-plate").to_dict()["nsc"]  # doctest: +SKIP
    """
    return run_to_end(iter_evaluate(profiles, tvn, **kwargs))
