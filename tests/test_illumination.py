"""CellProfiler-equivalent illumination functions: definition, fast vs exact, flat result."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsdino.core import illumination as il
from preprocess_data import field, plate_mean, tile_background_cv, vignette


def test_disk_radius_and_footprint_follow_cellprofiler():
    from skimage.morphology import disk as sk_disk

    assert il.disk_radius(320) == 136  # int(320 / 2.35 + 0.5)
    assert il.disk_radius(1) == 1  # never below 1
    assert il.disk_radius(80) == 34
    assert np.array_equal(il.disk(9), sk_disk(9).astype(bool))
    assert il.scaled_filter_size(320, (1024, 1280)) == pytest.approx(320)
    assert il.scaled_filter_size(320, (256, 320)) == pytest.approx(80)


def test_robust_rescale_hand_worked():
    # 100 positive pixels 1..100 plus zeros: index int(0.02 * 100) = 2 -> value 3.
    f = np.concatenate([np.zeros(20), np.arange(1, 101, dtype=float)]).reshape(10, 12)
    out, robust_min = il.robust_rescale(f)
    assert robust_min == 3.0
    expected = np.maximum(f, 3.0) / 3.0
    assert np.array_equal(out, expected)
    assert out.min() == 1.0 and out.max() == pytest.approx(100 / 3)
    # Nothing positive: no correction.
    ones, m = il.robust_rescale(np.zeros((3, 3)))
    assert m == 1.0 and np.array_equal(ones, np.ones((3, 3)))


def test_mean_accumulator_matches_numpy_and_any_order():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 65535, (5, 7), dtype=np.uint16) for _ in range(6)]
    a, b = il.MeanAccumulator(), il.MeanAccumulator()
    a.add_sum(np.sum(imgs[:4], axis=0, dtype=np.float64), 4)
    a.add_sum(np.sum(imgs[4:], axis=0, dtype=np.float64), 2)
    for img in reversed(imgs):
        b.add(img)
    assert np.array_equal(a.mean(), b.mean())
    assert np.allclose(a.mean(), np.mean(imgs, axis=0))


def test_median_at_is_the_exact_filter_at_those_points():
    rng = np.random.default_rng(1)
    img = rng.random((40, 50)).astype(np.float32)
    exact = il.median_filter_exact(img, 7)
    ys, xs = il.grid_points(40, 3), il.grid_points(50, 3)
    assert ys[0] == 0 and ys[-1] == 39 and xs[-1] == 49  # edges included
    assert np.array_equal(il.median_at(img, 7, ys, xs), exact[np.ix_(ys, xs)])


def test_fast_filter_every_row_is_exact_up_to_quantisation():
    rng = np.random.default_rng(2)
    shape = (96, 120)
    mean = plate_mean(rng, 16, shape, vignette(shape))
    exact = il.median_filter_exact(mean, 13)
    fast = il.median_filter_fast(mean, 13, row_step=1)
    level = (np.percentile(mean, 99.99) - mean.min()) / (il.FAST_LEVELS - 1)
    assert np.abs(fast - exact).max() <= 0.5 * level + 1e-9
    # Rows handed out in bands (as to a process pool) give the same result.
    banded = il.median_filter_fast(mean, 13, row_step=1, bands=5)
    assert np.array_equal(banded, fast)


def test_fast_function_within_one_percent_of_exact():
    """The claim of the module: on a plate-like mean image (48 fields, the smallest
    BBBC021 plate) the fast function is within 1 % of CellProfiler's exact one.
    256 x 320 with the paper's filter scaled to 80 px (r = 34)."""
    rng = np.random.default_rng(3)
    shape = (256, 320)
    mean = plate_mean(rng, 48, shape, vignette(shape))
    size = il.scaled_filter_size(320, shape)
    exact = il.illumination_function(mean, size, method="exact")
    fast = il.illumination_function(mean, size, method="fast")
    assert il.default_row_step(il.disk_radius(size)) == 2  # interpolation is exercised
    rel = np.abs(fast - exact) / exact
    assert rel.max() < 0.01
    # With twice the production row step (r / 8.5) the bound still holds.
    radius = il.disk_radius(size)
    coarse, _ = il.robust_rescale(il.median_filter_fast(mean, radius, row_step=4))
    assert (np.abs(coarse - exact) / exact).max() < 0.01
    # The function follows the vignette (same shape up to a constant).
    ratio = exact / vignette(shape)
    assert ratio.std() / ratio.mean() < 0.1


def test_fast_filter_refines_where_interpolation_misses():
    """One raw, high-contrast field (no plate averaging): interpolating between
    rows alone is several % off; the midpoint check halves the spacing until the
    result is within 1 % of the exact filter again."""
    rng = np.random.default_rng(7)
    shape = (192, 240)
    img = field(rng, shape, vignette(shape), contrast=(5, 20), sigma=5, n_cells=60)[0]
    radius = il.disk_radius(il.scaled_filter_size(320, shape))
    exact, _ = il.robust_rescale(il.median_filter_exact(img, radius))
    unchecked, _ = il.robust_rescale(il.median_filter_fast(img, radius, tolerance=np.inf))
    checked, _ = il.robust_rescale(il.median_filter_fast(img, radius))
    assert (np.abs(unchecked - exact) / exact).max() > 0.02
    assert (np.abs(checked - exact) / exact).max() < 0.01


def test_vignette_corrected_background_is_flat():
    """Background CV (across 8x8 tiles) of vignetted fields falls >= 4x over the whole
    field and >= 7x away from the border (measured: 5.3x and 10.5x). Within about
    half a disk radius of the border the mirrored median filter flattens the
    function (as CellProfiler's does), which leaves the rest."""
    rng = np.random.default_rng(4)
    shape = (128, 160)
    vig = vignette(shape)  # centre 1, far corner 0.45
    fields = [field(rng, shape, vig) for _ in range(24)]
    size = il.scaled_filter_size(320, shape)
    fn = il.illumination_function(il.mean_image(f for f, _ in fields), size)
    assert fn.dtype == np.float32 and fn.min() == 1.0
    raw_cv = np.mean([tile_background_cv(f.astype(float), m) for f, m in fields])
    cor_cv = np.mean([tile_background_cv(il.correct(f, fn), m) for f, m in fields])
    assert raw_cv > 0.1
    assert cor_cv < raw_cv / 4
    inner = (slice(8, -8), slice(8, -8))
    raw_in = np.mean([tile_background_cv(f[inner].astype(float), m[inner]) for f, m in fields])
    cor_in = np.mean([tile_background_cv(il.correct(f, fn)[inner], m[inner]) for f, m in fields])
    assert cor_in < raw_in / 7
    # A disk radius from the border the function is the vignette up to a constant.
    r = il.disk_radius(size)
    ratio = (fn / vig)[r:-r, r:-r]
    assert np.abs(ratio / np.median(ratio) - 1).max() < 0.03


def test_correct_divides_and_checks_shape():
    img = np.full((4, 5), 300, np.uint16)
    fn = np.full((4, 5), 1.5, np.float32)
    assert np.allclose(il.correct(img, fn), 200.0)
    assert np.array_equal(il.correct(img, None), img.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        il.correct(img, np.ones((5, 4)))
    with pytest.raises(ValueError, match="method"):
        il.illumination_function(np.ones((8, 8)), 4, method="spline")


def _cellprofiler_function(mean: np.ndarray, filter_size: float) -> np.ndarray:
    """CellProfiler's CorrectIlluminationCalculate (median filter, robust-minimum rescale),
    written from its definition with skimage: the mean image scaled to uint16, a rank
    median over a disk (only in-image pixels count at the borders), the 2 % robust
    minimum of the positive pixels, clamp and divide. Independent of our filters."""
    from skimage.filters.rank import median as rank_median
    from skimage.morphology import disk as sk_disk

    scaled = (mean / 65535.0 * 65535.0).astype(np.uint16)
    smooth = rank_median(scaled, sk_disk(max(1, int(filter_size / 2.35 + 0.5)))).astype(float)
    positive = np.sort(smooth[smooth > 0])
    robust_min = positive[int(positive.size * 0.02)]
    return np.maximum(smooth, robust_min) / robust_min


@pytest.mark.filterwarnings("ignore:Bad rank filter performance")
def test_in_image_borders_match_cellprofiler_everywhere():
    """Issue 14: with ``borders="in-image"`` both filters are within 0.1 % of
    CellProfiler's function at every pixel, corners included, on a 256 x 320 plate
    (filter 80, r = 34); the mirrored default is not (the robust minimum sits at the
    borders, so the whole function moves)."""
    rng = np.random.default_rng(11)
    shape = (256, 320)
    mean = plate_mean(rng, 48, shape, vignette(shape))
    size = il.scaled_filter_size(320, shape)
    reference = _cellprofiler_function(mean, size)
    for method in ("exact", "fast"):
        ours = il.illumination_function(mean, size, method=method, borders="in-image")
        rel = np.abs(ours - reference) / reference
        assert rel.max() < 0.001, (method, rel.max())
    mirrored = il.illumination_function(mean, size, method="exact")
    off = np.abs(mirrored - reference) / reference
    assert off.max() > 0.005  # the difference the option exists for


def test_in_image_median_even_count_takes_the_upper_middle():
    # A corner pixel of a 3x3 image with r = 1 sees 3 pixels; an edge pixel 4
    # (odd / even counts). skimage's rank median takes sorted element n // 2.
    img = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    out = il.median_filter_exact(img, 1, borders="in-image")
    assert out[0, 0] == 2.0  # {1, 2, 4} -> 2
    assert out[0, 1] == 3.0  # {1, 2, 3, 5} -> 3 (upper middle)
    assert out[1, 1] == 5.0
    fast = il.median_filter_fast(img, 1, row_step=1, borders="in-image")
    assert np.array_equal(fast, out)
    with pytest.raises(ValueError, match="borders"):
        il.median_filter_exact(img, 1, borders="wrap")
