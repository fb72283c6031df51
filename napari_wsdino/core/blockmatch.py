"""NSC / NSCB matching, k-NN accuracy and mAP in blocks of queries, with bounded memory.

The same rules, tie-break and numbers as :func:`napari_wsdino.core.metrics.match`
(see :mod:`~napari_wsdino.core.metrics` for the definitions), but the ``(n, n)``
similarity matrix is never formed beyond :data:`BLOCK_ELEMENTS` entries: queries
are taken ``block_rows`` at a time, each block's similarities to all treatments
are computed by one matrix product, every candidate of every query is ranked by
one sort, and the rules (NSC, NSCB) read their candidates, neighbours, k-NN votes
and average precision off that ranking. Memory is about 25 bytes per block entry
(some 100 MB per worker for the default block), whatever the number of treatments.
Blocks are shared among :func:`default_workers` threads (numpy's sorts, gathers
and ufuncs release the GIL; BLAS is held to one thread per worker meanwhile).

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
comes back from the key's low bits. A query's own compound gets a key past every
other, so NSC's candidates are a prefix of the ranking. One sort serves every
rule and every k.

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

import os
from concurrent.futures import ThreadPoolExecutor
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


def default_workers() -> int:
    """Threads for the blocks: the cores this process may use, at most
    ``OMP_NUM_THREADS`` when that is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(limit))) if limit.isdigit() and int(limit) > 0 else cores


class _Workspace:
    """One block's buffers, allocated once per worker: a fresh large array per block
    would cost its page faults again every block."""

    def __init__(self, rows: int, n: int, dtype):
        self.sim = np.empty((rows, n), dtype)
        self.key = np.empty((rows, n), np.int64)
        self.cols = np.empty((rows, n), np.int32)
        self.gathered = np.empty((rows, n), np.int32)
        self.same_label = np.empty((rows, n), bool)
        self.cand = np.empty((rows, n), bool)
        self.scratch = np.empty((rows, n), bool)

    def rows(self, m: int) -> "_Workspace":
        """The buffers' first ``m`` rows (the last block may be shorter)."""
        view = object.__new__(_Workspace)
        view.__dict__ = {k: v[:m] for k, v in self.__dict__.items()}
        return view


@dataclass
class _Data:
    """What every block reads: unit rows, integer codes, the rules, the settings."""

    unit: np.ndarray
    lab: np.ndarray
    comp: np.ndarray
    members: np.ndarray  # treatments sorted by compound
    comp_start: np.ndarray
    comp_size: np.ndarray
    rules: dict
    ks: list
    decimals: int
    bits: int

    @property
    def n_labels(self) -> int:
        return int(self.lab.max()) + 1 if len(self.lab) else 0


def _sorted_columns(data: _Data, rows: np.ndarray, ws: _Workspace) -> np.ndarray:
    """Rank every treatment for each query row: ``ws.cols`` gets the columns by decreasing
    rounded similarity, ties by index, the query's own compound last; ``ws.key`` the
    sorted keys ``-level << bits | column`` (level ``= rint(s * 10**decimals)``).
    Returns each row's number of other-compound treatments (NSC's candidate prefix)."""
    n, bits = len(data.lab), data.bits
    np.matmul(data.unit[rows[0]:rows[-1] + 1], data.unit.T, out=ws.sim)
    ws.sim *= -(10.0 ** data.decimals)
    np.rint(ws.sim, out=ws.sim)
    np.copyto(ws.key, ws.sim, casting="unsafe")
    ws.key <<= bits
    ws.key |= np.arange(n, dtype=np.int64)
    # The query's own compound (itself included) goes past every similarity level.
    size = data.comp_size[data.comp[rows]]
    r = np.repeat(np.arange(len(rows)), size)
    offset = np.arange(len(r)) - np.repeat(np.cumsum(size) - size, size)
    c = data.members[np.repeat(data.comp_start[data.comp[rows]], size) + offset]
    ws.key[r, c] = (np.int64(1) << np.int64(62)) | c
    ws.key.sort(axis=1)
    np.bitwise_and(ws.key, (1 << bits) - 1, out=ws.cols, casting="unsafe")
    return n - size


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


def _average_precision(pr, pc, excluded_before, b) -> np.ndarray:
    """AP of each of ``b`` rows from its positives' row / ranked position (row-major) and
    the non-candidates ranked before each; NaN for a row without positive."""
    n_pos = np.bincount(pr, minlength=b)
    found = np.arange(1, len(pr) + 1) - np.repeat(np.cumsum(n_pos) - n_pos, n_pos)
    ap_sum = np.bincount(pr, weights=found / (pc + 1 - excluded_before), minlength=b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, ap_sum / n_pos, np.nan)


def _rule_ap(same_label, scratch, n_prefix, cand):
    """AP per row: positives are same-MoA candidates; a positive's rank among candidates
    is its position less the non-candidates before it (one sorted search)."""
    b, n = same_label.shape
    if cand is None:  # NSC: the candidates are a prefix of the ranking
        pr, pc = np.nonzero(same_label)
        keep = pc < n_prefix[pr]
        return _average_precision(pr[keep], pc[keep], 0, b)
    pr, pc = np.nonzero(np.logical_and(cand, same_label, out=scratch))
    nr, nc = np.nonzero(np.logical_not(cand, out=scratch))
    excluded = nr.astype(np.int64) * n + nc
    before = (np.searchsorted(excluded, pr.astype(np.int64) * n + pc)
              - np.searchsorted(excluded, pr.astype(np.int64) * n))
    return _average_precision(pr, pc, before, b)


def _rule_block(data: _Data, rows, ws, n_prefix, query_ok, cand=None) -> dict:
    """One rule on one block of queries; ``cand`` (ranked order) is ``None`` for NSC,
    whose candidates are the first ``n_prefix`` ranked treatments."""
    k_max, b = max(data.ks), len(rows)
    if cand is None:
        n_cand = n_prefix
        j = np.arange(k_max)
        top = np.where(j < n_prefix[:, None], j, -1)
    else:
        n_cand = np.count_nonzero(cand, axis=1)
        top = _top_positions(cand, n_cand, k_max)
    query = query_ok & (n_cand > 0)
    r, first = np.arange(b), np.maximum(top[:, 0], 0)
    nb, lab_q = ws.cols[r, first], data.lab[rows]
    q = np.flatnonzero(query)
    ap = np.full(b, np.nan)
    if len(q) == b:
        ap = _rule_ap(ws.same_label, ws.scratch, n_prefix, cand)
    elif len(q):
        ap[q] = _rule_ap(ws.same_label[q], ws.scratch[:len(q)], n_prefix[q],
                         None if cand is None else cand[q])
    valid = top >= 0
    top_lab = data.lab[np.take_along_axis(ws.cols, np.maximum(top, 0), axis=1)]
    return {
        "query": query,
        "neighbour": np.where(query, nb, -1),
        "similarity": np.where(query, -(ws.key[r, first] >> data.bits) / 10.0 ** data.decimals,
                               np.nan),
        "correct": query & (data.lab[nb] == lab_q),
        "ap": ap,
        "hits": {k: int(_knn_hits(top_lab, valid, lab_q, k, data.n_labels)[query].sum())
                 for k in data.ks},
    }


def _block(data: _Data, rows: np.ndarray, ws: _Workspace) -> dict:
    """Every rule on one block of query rows: ``{rule: outputs}``."""
    n_prefix = _sorted_columns(data, rows, ws)
    np.take(data.lab, ws.cols, out=ws.gathered)
    np.equal(ws.gathered, data.lab[rows][:, None], out=ws.same_label)
    out = {}
    for name, (code, elig) in data.rules.items():
        query_ok = np.ones(len(rows), dtype=bool) if elig is None else elig[rows]
        if code is None and elig is None:
            out[name] = _rule_block(data, rows, ws, n_prefix, query_ok)
            continue
        cand = ws.cand
        np.less(np.arange(cand.shape[1]), n_prefix[:, None], out=cand)
        cand &= query_ok[:, None]
        if code is not None:  # code -1: multi-batch, -2: not eligible (never a candidate)
            np.take(code, ws.cols, out=ws.gathered)
            np.not_equal(ws.gathered, -2, out=ws.scratch)
            cand &= ws.scratch
            np.not_equal(ws.gathered, np.where(code[rows] == -1, -3, code[rows])[:, None],
                         out=ws.scratch)
            cand &= ws.scratch
        elif elig is not None:
            np.take(elig, ws.cols, out=ws.scratch)
            cand &= ws.scratch
        out[name] = _rule_block(data, rows, ws, n_prefix, query_ok, cand)
    return out


def _prepared(rule: Rule, n: int):
    """A rule as int32 batch indices (-1: multi-batch, -2: not eligible) and its eligible
    mask."""
    elig = None if rule.eligible is None else np.asarray(rule.eligible, dtype=bool).reshape(n)
    code = None
    if rule.batch_code is not None:
        raw = np.asarray(rule.batch_code)
        code = np.unique(raw, return_inverse=True)[1].reshape(-1).astype(np.int32)
        code[raw == MULTI_BATCH] = -1
        if elig is not None:
            code[~elig] = -2
    return code, elig


def _unit(x: np.ndarray, dtype, chunk: int = 4096) -> np.ndarray:
    """:func:`metrics.unit_rows` in ``dtype``; float32 is made chunk by chunk, without a
    float64 copy of the whole table."""
    if dtype == np.float64:
        return unit_rows(x)
    out = np.empty(x.shape, dtype=dtype)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = unit_rows(x[i:i + chunk])
    return out


def match_blockwise(features, compounds, labels, rules: dict[str, Rule], ks=(1,), *,
                    block_rows: int | None = None, dtype=None,
                    workers: int | None = None) -> dict[str, MatchResult]:
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
    workers
        Threads sharing the blocks (default :func:`default_workers`); results do not
        depend on it.

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
    _, lab = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    _, comp = np.unique(np.asarray(compounds).astype(str), return_inverse=True)
    comp = comp.reshape(-1).astype(np.int32)
    comp_size = np.bincount(comp, minlength=comp.max() + 1 if n else 0)
    data = _Data(_unit(x, dtype), lab.reshape(-1).astype(np.int32), comp,
                 np.argsort(comp, kind="stable"), np.cumsum(comp_size) - comp_size, comp_size,
                 {name: _prepared(rule, n) for name, rule in rules.items()}, ks,
                 DECIMALS if dtype == np.float64 else FLOAT32_DECIMALS,
                 max(1, int(n).bit_length()))
    step = block_size(n, block_rows)
    blocks = [np.arange(s, min(s + step, n)) for s in range(0, n, step)]
    workers = max(1, min(workers or default_workers(), len(blocks)))

    def run(part: int) -> list:
        workspace = _Workspace(min(step, n), n, dtype)
        return [(rows, _block(data, rows, workspace.rows(len(rows))))
                for rows in blocks[part::workers]]

    if workers == 1:
        done = run(0)
    else:  # one BLAS thread per worker: the workers are the parallelism
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
            done = [b for part in pool.map(run, range(workers)) for b in part]
    return {name: _collect(name, n, ks, [(rows, out[name]) for rows, out in done])
            for name in rules}


def _collect(name: str, n: int, ks, parts) -> MatchResult:
    """One rule's block outputs joined into a :class:`MatchResult`."""
    query = np.zeros(n, dtype=bool)
    neighbour = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan)
    correct = np.zeros(n, dtype=bool)
    ap = np.full(n, np.nan)
    hits = dict.fromkeys(ks, 0)
    for rows, out in parts:
        query[rows], neighbour[rows], similarity[rows] = out["query"], out["neighbour"], out["similarity"]
        correct[rows], ap[rows] = out["correct"], out["ap"]
        for k in ks:
            hits[k] += out["hits"][k]
    n_q = int(query.sum())
    knn = {k: (hits[k] / n_q if n_q else float("nan")) for k in ks}
    return MatchResult(name, query, neighbour, similarity, correct, ap, knn)
