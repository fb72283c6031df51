"""Blockwise matching (core.blockmatch) gives the dense evaluation's numbers, ties included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core import blockmatch, metrics
from napari_wsdino.core.aggregate import aggregate_treatments
from napari_wsdino.core.blockmatch import Rule, block_size, match_blockwise
from napari_wsdino.core.evaluation import evaluate_treatments
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.profiles import simulate_profiles

KS = (1, 3, 5)


def tied_table(seed: int = 1, n: int = 120):
    """Random profiles with exact ties: a copy, a scaled copy, a pair, a zero row;
    compounds of several treatments, multi-batch (-1) codes and ineligible rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    x[10] = x[3]
    x[20] = 2 * x[3]  # same direction: cosine ties with x[3] and x[10]
    x[40] = x[41]
    x[50] = 0.0  # similarity 0 to everything
    compounds = rng.integers(0, 30, n).astype(str)
    labels = rng.integers(0, 4, n).astype(str)
    codes = rng.integers(-1, 3, n)
    eligible = rng.random(n) < 0.8
    return x, compounds, labels, codes, eligible


def dense(x, compounds, labels, codes, eligible):
    sim = metrics.cosine_similarity(x)
    return {
        "nsc": metrics.match(sim, metrics.candidate_mask(compounds), labels, ks=KS, rule="nsc"),
        "nscb": metrics.match(sim, metrics.candidate_mask(compounds, codes, eligible), labels,
                              queries=eligible, ks=KS, rule="nscb"),
    }


def assert_same(a: metrics.MatchResult, b: metrics.MatchResult):
    np.testing.assert_array_equal(a.query, b.query)
    np.testing.assert_array_equal(a.neighbour, b.neighbour)
    np.testing.assert_array_equal(a.correct, b.correct)
    np.testing.assert_array_equal(a.similarity, b.similarity)  # NaN where no query
    # AP sums the same terms in another order: equal to the last bits.
    np.testing.assert_allclose(a.average_precision, b.average_precision, rtol=1e-12)
    assert a.knn == b.knn
    assert a.accuracy == b.accuracy and a.map == pytest.approx(b.map, rel=1e-12)


@pytest.mark.parametrize("block_rows, workers", [(None, 1), (1, 1), (7, 1), (7, 2), (64, 3)])
def test_blockwise_equals_dense_ties_included(block_rows, workers):
    x, compounds, labels, codes, eligible = tied_table()
    ref = dense(x, compounds, labels, codes, eligible)
    assert ref["nsc"].similarity[3] == ref["nsc"].similarity[10]  # the tie is real
    out = match_blockwise(x, compounds, labels, {"nsc": Rule(), "nscb": Rule(codes, eligible)},
                          ks=KS, block_rows=block_rows, workers=workers)
    for rule in ("nsc", "nscb"):
        assert_same(ref[rule], out[rule])
    assert 0 < ref["nscb"].n < ref["nsc"].n


def test_small_blocks_never_form_the_full_matrix(monkeypatch):
    shapes = []
    original = blockmatch._Workspace.__init__

    def spy(self, rows, n, dtype):
        shapes.append((rows, n))
        original(self, rows, n, dtype)

    monkeypatch.setattr(blockmatch._Workspace, "__init__", spy)
    monkeypatch.setattr(blockmatch, "BLOCK_ELEMENTS", 1000)
    x, compounds, labels, codes, eligible = tied_table(n=200)
    out = match_blockwise(x, compounds, labels, {"nsc": Rule()}, ks=KS, workers=1)
    assert shapes == [(5, 200)]  # 1000 // 200 queries at a time
    assert_same(dense(x, compounds, labels, codes, eligible)["nsc"], out["nsc"])


def test_block_size_is_bounded():
    assert block_size(103) == 103  # BBBC021: one dense block
    for n in (5_000, 20_000, 100_000):
        assert block_size(n) * n <= blockmatch.BLOCK_ELEMENTS
    assert block_size(10**9) == 1 and block_size(50, block_rows=3) == 3


@pytest.fixture(scope="module")
def bbbc021_treatments(bundled_dir):
    """BBBC021-sized treatment profiles (103 treatments, 64 features), simulated."""
    table = load_metadata(bundled_dir, check_files=False).table
    profiles = simulate_profiles(table, 64, moa_signal=0.3, seed=3, dtype=np.float64)
    return aggregate_treatments(profiles)


def test_evaluation_in_small_blocks_equals_one_block(bbbc021_treatments):
    whole = evaluate_treatments(bbbc021_treatments)
    blocks = evaluate_treatments(bbbc021_treatments, block_rows=4)
    for rule in ("nsc_match", "nscb_match"):
        assert_same(whole[rule], blocks[rule])
    pd.testing.assert_frame_equal(whole["neighbours"], blocks["neighbours"], rtol=1e-12)
    assert 0.2 < whole["nsc_match"].accuracy < 1 and whole["nscb_match"].n == 92


def test_float32_gives_the_float64_numbers_on_bbbc021_sized_input(bbbc021_treatments):
    meta, x = bbbc021_treatments.meta, bbbc021_treatments.features
    args = (x, meta.Metadata_Compound, meta.Metadata_MoA, {"nsc": Rule()})
    f64 = match_blockwise(*args, ks=KS, dtype=np.float64)["nsc"]
    f32 = match_blockwise(*args, ks=KS, dtype=np.float32, block_rows=10)["nsc"]
    np.testing.assert_array_equal(f64.neighbour, f32.neighbour)
    assert f64.accuracy == f32.accuracy and f64.knn == f32.knn
    assert f32.map == pytest.approx(f64.map, abs=1e-6)
    np.testing.assert_allclose(f32.similarity, f64.similarity, atol=1e-6)


def test_few_candidates_far_down_the_ranking():
    """NSCB with 8 % eligible treatments: a query's k nearest candidates lie past the first
    columns scanned, so the scan widens; queries with fewer than k candidates vote with all."""
    rng = np.random.default_rng(5)
    x, compounds = rng.normal(size=(300, 5)), rng.integers(0, 100, 300).astype(str)
    labels, codes = rng.integers(0, 3, 300).astype(str), rng.integers(0, 2, 300)
    eligible = rng.random(300) < 0.08
    cand = metrics.candidate_mask(compounds, codes, eligible)
    ref = metrics.match(metrics.cosine_similarity(x), cand, labels, queries=eligible, ks=(1, 3, 5, 9))
    for block_rows in (3, None):
        out = match_blockwise(x, compounds, labels, {"nscb": Rule(codes, eligible)}, ks=(1, 3, 5, 9),
                              block_rows=block_rows)
        assert_same(ref, out["nscb"])
    assert 10 < ref.n < 40
