"""NSC / NSCB matching, k-NN accuracy and mAP in blocks of queries, with bounded memory.

The same rules, tie-break and numbers as :func:`napari_wsdino.core.metrics.match`
(see :mod:`~napari_wsdino.core.metrics` for the definitions), but the ``(n, n)``
similarity matrix is never formed beyond :data:`BLOCK_ELEMENTS` entries: queries
are taken ``block_rows`` at a time, each block's similarities to all treatments
are computed by one matrix product, every candidate of every query is ranked by
one sort, and the rules (NSC, NSCB) read their candidates, neighbours, k-NN votes
and average precision off that ranking. Memory is about 30 bytes per block entry
(some 130 MB for the default block), whatever the number of treatments.

Precision. Up to :data:`EXACT_MAX` treatments the similarities are float64 and
rounded to :data:`~napari_wsdino.core.metrics.DECIMALS` (10) decimals, as in the
dense evaluation: on BBBC021-sized input the numbers are those of
:func:`~napari_wsdino.core.metrics.match`. Above it the matrix products are float32
(half the memory traffic and twice the speed of float64) and similarities are
rounded to :data:`FLOAT32_DECIMALS` (6) decimals, so equal profiles still tie
exactly; similarities closer than 1e-6 then count as ties (broken by treatment order).

Ranking. Similarities are turned into integer levels ``rint(s * 10**decimals)``
and each entry into one int64 key, ``(top - level) << bits | column``: sorting the
keys of a row orders its treatments by decreasing similarity with ties by
treatment order (the stable order of the dense version), and the column index
comes back from the key's low bits. One sort serves every rule and every k.

Example
-------
>>> import numpy as np
>>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
>>> out = match_blockwise(x, ["a", "b", "c", "d"], ["M1", "M1", "M2", "M2"],
...                       {"nsc": Rule()}, block_rows=1)
>>> out["nsc"].neighbour.tolist(), out["nsc"].accuracy
([1, 0, 3, 2], 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_wsdino.core.metrics import DECIMALS, MULTI_BATCH, MatchResult, unit_rows

#: Treatments up to which similarities are float64 rounded to 10 decimals (the dense numbers).
EXACT_MAX = 4096
#: Decimals of the float32 similarities used above :data:`EXACT_MAX` treatments.
FLOAT32_DECIMALS = 6
#: Largest number of similarities held at once (one block of queries x all treatments).
BLOCK_ELEMENTS = 2 ** 22


@dataclass(frozen=True)
class Rule:
    """Which treatments may be a query's neighbour under one matching rule.

    Candidates always have a different compound. ``batch_code`` (one number per
    treatment) adds the batch rule: not the same code unless the query's code is
    :data:`~napari_wsdino.core.metrics.MULTI_BATCH`. ``eligible`` restricts queries and
    candidates alike to the masked treatments (NSCB's MoAs seen in two batches).
    """

    batch_code: np.ndarray | None = None
    eligible: np.ndarray | None = None


def block_size(n: int, block_rows: int | None = None) -> int:
    """Queries per block: all ``n`` when ``n * n <= BLOCK_ELEMENTS``, else
    ``BLOCK_ELEMENTS // n`` (at least one); ``block_rows`` overrides."""
    if block_rows is not None:
        return max(1, int(block_rows))
    return n if n * n <= BLOCK_ELEMENTS else max(1, BLOCK_ELEMENTS // max(n, 1))


class _Workspace:
    """One block's buffers, allocated once: a fresh large array per block would cost its
    page faults again every block."""

    def __init__(self, rows: int, n: int, dtype):
        self.sim = np.empty((rows, n), dtype)
        self.key = np.empty((rows, n), np.int64)
        self.cols = np.empty((rows, n), np.int32)
        self.gathered = np.empty((rows, n), np.int32)
        self.same_label = np.empty((rows, n), bool)
        self.other = np.empty((rows, n), bool)
        self.cand = np.empty((rows, n), bool)
        self.scratch = np.empty((rows, n), bool)
        self.columns = np.arange(n, dtype=np.int64)

    def rows(self, m: int) -> "_Workspace":
        """The buffers' first ``m`` rows (the last block may be shorter)."""
        view = object.__new__(_Workspace)
        view.__dict__ = {k: (v if k == "columns" else v[:m]) for k, v in self.__dict__.items()}
        return view


def _sorted_columns(unit, rows: slice, decimals: int, bits: int, ws: _Workspace):
    """Columns of each query row by decreasing rounded similarity, ties by index, into
    ``ws.cols``; ``ws.key`` holds the sorted keys ``-level << bits | column`` (level
    ``= rint(s * 10**decimals)``)."""
    np.matmul(unit[rows], unit.T, out=ws.sim)
    ws.sim *= -(10.0 ** decimals)
    np.rint(ws.sim, out=ws.sim)
    np.copyto(ws.key, ws.sim, casting="unsafe")
    ws.key <<= bits
    ws.key |= ws.columns
    ws.key.sort(axis=1)
    np.bitwise_and(ws.key, (1 << bits) - 1, out=ws.cols, casting="unsafe")


class _Accumulator:
    """Per-rule outputs, filled block by block."""

    def __init__(self, n, ks):
        self.query = np.zeros(n, dtype=bool)
        self.neighbour = np.full(n, -1, dtype=np.int64)
        self.similarity = np.full(n, np.nan)
        self.correct = np.zeros(n, dtype=bool)
        self.ap = np.full(n, np.nan)
        self.hits = {k: 0 for k in ks}


def _top_positions(cand, n_cand, k):
    """``(b, k)`` ranked positions of each row's first k candidates (-1 past the last);
    only the first few columns are scanned, more for rows that need it."""
    b, n = cand.shape
    need = np.minimum(n_cand, k)
    width = min(n, 4 * k + 16)
    while True:
        rank = np.cumsum(cand[:, :width], axis=1, dtype=np.int32)
        if width == n or (rank[:, -1] >= need).all():
            break
        width = min(n, 8 * width)
    tr, tp = np.nonzero(cand[:, :width] & (rank <= k))
    top = np.full((b, k), -1, dtype=np.int64)
    top[tr, rank[tr, tp] - 1] = tp
    return top


def _knn_hits(top_lab, valid, lab_q, k, n_labels) -> np.ndarray:
    """k-NN vote of each row (as :func:`metrics.match`): most frequent MoA among the k
    nearest, a tie to the MoA whose nearest member ranks first."""
    b = len(top_lab)
    top_lab, valid = np.where(valid, top_lab, 0)[:, :k], valid[:, :k]
    counts = np.zeros((b, n_labels), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(b), k), top_lab.ravel()), valid.ravel())
    first = np.full((b, n_labels), k, dtype=np.int64)
    for j in range(k - 1, -1, -1):  # loop over ranks (k), not treatments
        r = np.flatnonzero(valid[:, j])
        first[r, top_lab[r, j]] = j
    return np.argmax(counts * (k + 1) - first, axis=1) == lab_q


def _average_precision(cand, same_label, scratch):
    """AP of each row from its ranked candidate and same-MoA masks (NaN: no positive).

    A positive's rank among the candidates is its position less the non-candidates
    ranked before it; both are found with one sorted search, not a row-wise cumsum.
    """
    b, n = cand.shape
    pr, pc = np.nonzero(np.logical_and(cand, same_label, out=scratch))
    n_pos = np.bincount(pr, minlength=b)
    found = np.arange(1, len(pr) + 1) - np.repeat(np.cumsum(n_pos) - n_pos, n_pos)
    nr, nc = np.nonzero(np.logical_not(cand, out=scratch))
    excluded = nr.astype(np.int64) * n + nc
    flat = pr.astype(np.int64) * n + pc
    before = np.searchsorted(excluded, flat) - np.searchsorted(excluded, pr.astype(np.int64) * n)
    ap_sum = np.bincount(pr, weights=found / (pc + 1 - before), minlength=b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, ap_sum / n_pos, np.nan)


def _rule_block(acc, rows, ws, bits, scale, query_ok, lab, ks, n_labels):
    """One rule on one block of queries (``ws.cand`` and ``ws.same_label`` in ranked order)."""
    cand, cols = ws.cand, ws.cols
    n_cand = np.count_nonzero(cand, axis=1)
    query = query_ok & (n_cand > 0)
    top = _top_positions(cand, n_cand, max(ks))
    r = np.arange(len(rows))
    first = np.maximum(top[:, 0], 0)
    nb = cols[r, first]
    lab_q = lab[rows]
    acc.query[rows] = query
    acc.neighbour[rows] = np.where(query, nb, -1)
    acc.similarity[rows] = np.where(query, -(ws.key[r, first] >> bits) / scale, np.nan)
    acc.correct[rows] = query & (lab[nb] == lab_q)
    q = np.flatnonzero(query)
    ap = np.full(len(rows), np.nan)
    if len(q) == len(rows):
        ap = _average_precision(cand, ws.same_label, ws.scratch)
    elif len(q):
        ap[q] = _average_precision(cand[q], ws.same_label[q], ws.scratch[:len(q)])
    acc.ap[rows] = ap
    valid = top >= 0
    top_lab = lab[np.take_along_axis(cols, np.maximum(top, 0), axis=1)]
    for k in ks:
        acc.hits[k] += int(_knn_hits(top_lab, valid, lab_q, k, n_labels)[query].sum())


def _prepared(rule: Rule, n: int):
    """A rule's batch codes as int32 indices (-1: multi-batch) and its eligible mask."""
    code = None
    if rule.batch_code is not None:
        raw = np.asarray(rule.batch_code)
        code = np.unique(raw, return_inverse=True)[1].reshape(-1).astype(np.int32)
        code[raw == MULTI_BATCH] = -1
    elig = None if rule.eligible is None else np.asarray(rule.eligible, dtype=bool).reshape(n)
    return code, elig


def match_blockwise(features, compounds, labels, rules: dict[str, Rule], ks=(1,), *,
                    block_rows: int | None = None, dtype=None) -> dict[str, MatchResult]:
    """NSC / NSCB neighbours, k-NN accuracy and AP of every treatment, block by block.

    Parameters
    ----------
    features
        ``(n, d)`` treatment profiles (cosine similarity is taken on them).
    compounds, labels
        ``(n,)`` compound and MoA of each treatment.
    rules
        ``{name: Rule}``, e.g. ``{"nsc": Rule(), "nscb": Rule(codes, eligible)}``.
    ks
        k values for k-NN accuracy.
    block_rows
        Queries per block (default :func:`block_size`); results do not depend on it.
    dtype
        ``np.float64`` or ``np.float32``; default float64 up to :data:`EXACT_MAX`
        treatments, float32 above.

    Returns
    -------
    dict
        ``{name: MatchResult}``, equal to :func:`metrics.match` on the same rule.
    """
    x = np.asarray(features)
    n = len(x)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError("k must be at least 1")
    dtype = np.dtype(dtype or (np.float64 if n <= EXACT_MAX else np.float32))
    decimals = DECIMALS if dtype == np.float64 else FLOAT32_DECIMALS
    unit = unit_rows(x).astype(dtype, copy=False)
    _, lab = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    _, comp = np.unique(np.asarray(compounds).astype(str), return_inverse=True)
    lab, comp = lab.astype(np.int32), comp.astype(np.int32)
    n_labels = int(lab.max()) + 1 if n else 0
    bits = max(1, int(n).bit_length())
    rules = {name: _prepared(rule, n) for name, rule in rules.items()}
    accs = {name: _Accumulator(n, ks) for name in rules}
    step = block_size(n, block_rows)
    workspace = _Workspace(min(step, n), n, dtype)
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        ws = workspace.rows(len(rows))
        _sorted_columns(unit, slice(rows[0], rows[-1] + 1), decimals, bits, ws)
        np.take(lab, ws.cols, out=ws.gathered)
        np.equal(ws.gathered, lab[rows][:, None], out=ws.same_label)
        np.take(comp, ws.cols, out=ws.gathered)
        np.not_equal(ws.gathered, comp[rows][:, None], out=ws.other)
        for name, (code, elig) in rules.items():
            query_ok = np.ones(len(rows), dtype=bool) if elig is None else elig[rows]
            if code is None:
                np.copyto(ws.cand, ws.other)
            else:  # a multi-batch query (code -1) has no batch to avoid
                np.take(code, ws.cols, out=ws.gathered)
                np.not_equal(ws.gathered, np.where(code[rows] < 0, -2, code[rows])[:, None],
                             out=ws.cand)
                ws.cand &= ws.other
            if elig is not None:
                np.take(elig, ws.cols, out=ws.scratch)
                ws.cand &= ws.scratch
                ws.cand &= query_ok[:, None]
            _rule_block(accs[name], rows, ws, bits, 10.0 ** decimals, query_ok, lab, ks, n_labels)
    out = {}
    for name, a in accs.items():
        n_q = int(a.query.sum())
        knn = {k: (a.hits[k] / n_q if n_q else float("nan")) for k in ks}
        out[name] = MatchResult(name, a.query, a.neighbour, a.similarity, a.correct, a.ap, knn)
    return out
