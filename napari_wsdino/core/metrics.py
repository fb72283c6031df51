"""MoA matching metrics on treatment profiles: NSC, NSCB, k-NN accuracy and mAP.

Written the copairs way: metadata apart from features, one cosine-similarity
matrix, boolean candidate masks and an ``argmax`` -- no loops over treatments.

Rules (Ljosa et al. 2013; Ando et al. 2017; WS-DINO paper)
---------------------------------------------------------
NSC (not-same-compound)
    Every treatment is a query; its candidates are all treatments of a
    *different compound*. Controls are never in the table (never candidates).
NSCB (not-same-compound-and-batch)
    Only treatments whose MoA occurs in at least two batches take part, as
    queries *and* as candidates (on BBBC021: 92 of 103; Cholesterol-lowering and
    Kinase inhibitors are each in one batch only). Candidates must be of a
    different compound and, if both query and candidate were each seen in a
    single batch, of a different batch. A treatment seen in several batches
    (BBBC021's positive control taxol 0.3 uM is on every plate, so in all ten
    batches) is not subject to the batch rule, as in the published evaluation
    code (DeepProfiler's BBBC021 notebook), which would otherwise leave it with
    no candidates and no candidate batch to compare to (``multibatch="exempt"``,
    the default). WS-DINO's own evaluation (crosszamirski/WS-DINO,
    ``Eval_BBBC021.py``) instead gives every treatment the median, over its plates,
    of the plates' numeric batch codes (taxol: 4.0) and applies the batch rule to
    all, comparing codes for equality (``multibatch="official"``,
    :func:`median_batch_codes`).

The *neighbour* of a query is its candidate with the highest cosine similarity;
the match is correct when the neighbour has the query's MoA. Accuracy is the
share of correct queries; a query with no candidate is not counted.

Ties. Similarities are rounded to 10 decimals (so equal profiles tie exactly,
whatever the floating-point summation order), and ties go to the candidate
that comes first in the treatment order (compound, then concentration; see
:func:`napari_wsdino.core.aggregate.treatment_order`). The same order ranks
candidates for k-NN and mAP, so the 1-NN of k-NN is always the NSC neighbour.

k-NN accuracy (k > 1)
    The MoA most frequent among the k nearest candidates is the prediction;
    a tie between MoAs goes to the one whose nearest member ranks first.
mAP
    For a query, rank its candidates by similarity; positives are candidates of
    the query's MoA. Average precision is the mean, over the positives, of the
    precision at each positive's rank: ``AP = (1/P) sum_k prec@k * rel_k``. mAP is the
    mean AP over queries with at least one positive candidate (others are
    skipped and not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DECIMALS = 10
MULTI_BATCH = -1
#: How NSCB treats a treatment seen in several batches (see the module docstring).
NSCB_MULTIBATCH = ("exempt", "official")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); a row of zeros stays zero."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows, rounded to :data:`DECIMALS`.

    A row of zeros has similarity 0 to everything. This is the dense ``(n, n)``
    reference; the evaluation computes the same numbers block by block
    (:func:`napari_wsdino.core.blockmatch.match_blockwise`).
    """
    unit = unit_rows(x)
    return np.round(unit @ unit.T, DECIMALS)


def batch_codes(batches) -> np.ndarray:
    """Integer code of each treatment's batch; :data:`MULTI_BATCH` (-1) if it was
    seen in several batches (exempt from the batch rule).

    Parameters
    ----------
    batches
        One collection of batch names per treatment (e.g. ``("Week1",)``).
    """
    sets = [tuple(sorted(set(b))) for b in batches]
    singles = sorted({s[0] for s in sets if len(s) == 1})
    index = {b: i for i, b in enumerate(singles)}
    return np.array([index[s[0]] if len(s) == 1 else MULTI_BATCH for s in sets], dtype=np.int64)


def _natural_key(name: str) -> tuple:
    """``Week2`` before ``Week10``: digit runs compare as numbers."""
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name)))


def median_batch_codes(plate_treatments, plate_batches, treatments) -> np.ndarray:
    """The published WS-DINO evaluation's batch of each treatment: batches numbered
    0, 1, ... in natural order (``Week1`` = 0 ... ``Week10`` = 9), each (treatment,
    plate) row given its plate's number, then the median over the treatment's plates
    (the mean of the two middle ones for an even count, as pandas' ``median``).

    Parameters
    ----------
    plate_treatments, plate_batches
        Treatment and batch of each (treatment, plate) row (:func:`~napari_wsdino.core
        .aggregate.plate_means`).
    treatments
        The treatments to return codes for, in order.

    Example
    -------
    >>> median_batch_codes(["t", "t", "t", "u"], ["Week1", "Week2", "Week10", "Week2"],
    ...                    ["t", "u"]).tolist()
    [1.0, 1.0]
    """
    import pandas as pd

    batches = pd.Series(plate_batches, dtype=str).to_numpy()
    number = {b: i for i, b in enumerate(sorted(set(batches), key=_natural_key))}
    codes = pd.Series([number[b] for b in batches], dtype=np.float64)
    medians = codes.groupby(pd.Series(plate_treatments, dtype=str).to_numpy()).median()
    return medians.reindex(pd.Series(treatments, dtype=str).to_numpy()).to_numpy(np.float64)


def nscb_eligible(moas, batches) -> np.ndarray:
    """Treatments whose MoA occurs in at least two batches (all treatments of that MoA
    together), as a boolean mask. Derived from the data, never from fixed indices."""
    moas = np.asarray(moas, dtype=object)
    seen: dict[str, set] = {}
    for m, b in zip(moas, batches):
        seen.setdefault(m, set()).update(b)
    return np.array([len(seen[m]) >= 2 for m in moas], dtype=bool)


def candidate_mask(compounds, batch_code=None, eligible=None) -> np.ndarray:
    """``(n, n)`` mask: ``mask[q, c]`` is true when c may be q's neighbour.

    ``batch_code=None`` gives the NSC rule (different compound); with batch
    codes the NSCB rule (also different batch unless either is multi-batch),
    restricted to ``eligible`` treatments.
    """
    compounds = np.asarray(compounds, dtype=object)
    _, comp = np.unique(compounds.astype(str), return_inverse=True)
    mask = comp[:, None] != comp[None, :]
    if batch_code is not None:
        b = np.asarray(batch_code)
        same_batch = (b[:, None] == b[None, :]) & (b[:, None] != MULTI_BATCH)
        mask &= ~same_batch
    if eligible is not None:
        e = np.asarray(eligible, dtype=bool)
        mask &= e[:, None] & e[None, :]
    return mask


@dataclass
class MatchResult:
    """Outcome of one matching rule (NSC or NSCB) on n treatments.

    Arrays are ``(n,)``; rows that are not evaluated queries hold -1 / NaN / False.
    """

    rule: str
    query: np.ndarray
    neighbour: np.ndarray
    similarity: np.ndarray
    correct: np.ndarray
    average_precision: np.ndarray
    knn: dict[int, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of queries evaluated."""
        return int(self.query.sum())

    @property
    def accuracy(self) -> float:
        return float(self.correct[self.query].mean()) if self.n else float("nan")

    @property
    def n_map(self) -> int:
        return int(np.isfinite(self.average_precision).sum())

    @property
    def map(self) -> float:
        ap = self.average_precision[np.isfinite(self.average_precision)]
        return float(ap.mean()) if len(ap) else float("nan")


def _rank(sim: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Candidates of each row by decreasing similarity, ties by index; non-candidates last."""
    masked = np.where(cand, sim, -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")


def match(sim: np.ndarray, cand: np.ndarray, labels, queries=None, ks=(1,),
          rule: str = "") -> MatchResult:
    """Nearest-candidate MoA matching, k-NN accuracy and AP, fully vectorised.

    Parameters
    ----------
    sim
        ``(n, n)`` similarity matrix (see :func:`cosine_similarity`).
    cand
        ``(n, n)`` candidate mask (see :func:`candidate_mask`); the diagonal is ignored.
    labels
        ``(n,)`` MoA of each treatment.
    queries
        ``(n,)`` mask of treatments to evaluate (default: all); those without any
        candidate are dropped.
    ks
        k values for k-NN accuracy (1 is the NSC / NSCB accuracy itself).
    """
    n = len(sim)
    labels = np.asarray(labels).astype(str)
    _, lab = np.unique(labels, return_inverse=True)
    cand = np.asarray(cand, dtype=bool) & ~np.eye(n, dtype=bool)
    queries = np.ones(n, dtype=bool) if queries is None else np.asarray(queries, dtype=bool)
    queries = queries & cand.any(axis=1)
    rows = np.arange(n)

    order = _rank(sim, cand)
    neighbour = np.where(queries, order[:, 0], -1)
    similarity = np.where(queries, sim[rows, order[:, 0]], np.nan)
    correct = queries & (lab[order[:, 0]] == lab)

    # AP: precision at each positive's rank, averaged over positives.
    ranked_cand = np.take_along_axis(cand, order, axis=1)
    positive = (lab[order] == lab[:, None]) & ranked_cand
    n_pos = positive.sum(axis=1)
    precision = np.cumsum(positive, axis=1) / np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * positive).sum(axis=1) / n_pos
    ap = np.where(queries & (n_pos > 0), ap, np.nan)

    knn = {}
    n_labels = lab.max() + 1 if n else 0
    for k in sorted(set(int(k) for k in ks)):
        if k < 1:
            raise ValueError("k must be at least 1")
        top = order[:, :k]
        valid = ranked_cand[:, :k]
        top_lab = lab[top]
        counts = np.zeros((n, n_labels), dtype=np.int64)
        np.add.at(counts, (np.repeat(rows, top.shape[1]), top_lab.ravel()), valid.ravel())
        first = np.full((n, n_labels), k, dtype=np.int64)
        for j in range(top.shape[1] - 1, -1, -1):  # loop over ranks (k), not treatments
            r = rows[valid[:, j]]
            first[r, top_lab[valid[:, j], j]] = j
        predicted = np.argmax(counts * (k + 1) - first, axis=1)
        hit = (predicted == lab)[queries]
        knn[k] = float(hit.mean()) if len(hit) else float("nan")
    return MatchResult(rule, queries, neighbour, similarity, correct, ap, knn)


def per_label_accuracy(result: MatchResult, labels) -> dict[str, tuple[float, int]]:
    """``{moa: (accuracy, n_queries)}`` over the evaluated queries of each MoA."""
    labels = np.asarray(labels).astype(str)
    out = {}
    q = result.query
    for m in sorted(set(labels[q])):
        rows = q & (labels == m)
        out[m] = (float(result.correct[rows].mean()), int(rows.sum()))
    return out


def confusion(result: MatchResult, labels, classes=None):
    """MoA confusion matrix (pandas DataFrame): rows true MoA, columns neighbour's MoA,
    counts over evaluated queries."""
    import pandas as pd

    labels = np.asarray(labels).astype(str)
    classes = sorted(set(labels)) if classes is None else list(classes)
    q = result.query
    true = pd.Categorical(labels[q], categories=classes)
    pred = pd.Categorical(labels[result.neighbour[q]], categories=classes)
    table = pd.crosstab(true, pred, dropna=False).reindex(index=classes, columns=classes, fill_value=0)
    table.index.name, table.columns.name = "true MoA", "neighbour MoA"
    return table.astype(np.int64)
