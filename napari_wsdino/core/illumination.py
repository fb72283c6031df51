"""Illumination correction the way CellProfiler computes it (Singh et al. 2014).

WS-DINO (Cross-Zamirski et al. 2022) corrects BBBC021 with CellProfiler's
``CorrectIlluminationCalculate`` (method *Regular*, *All* images of a plate,
median-filter smoothing of size 320 px on 1024 x 1280 images, function rescaled
by its robust minimum) and ``CorrectIlluminationApply`` (divide). One function is
made per (plate, channel):

1. the per-pixel mean of all the plate's images of that channel
   (:class:`MeanAccumulator`, :func:`mean_image`);
2. a median filter over a disk of radius ``max(1, int(filter_size / 2.35 + 0.5))``
   (:func:`disk_radius`; 136 px for 320). ``borders="reflect"`` (default) mirrors
   the image at its edges; ``borders="in-image"`` is CellProfiler's own definition
   (``skimage.filters.rank.median`` on the mean image scaled to uint16): the mean is
   floored to whole counts and, near an edge, the median is taken over the part of
   the disk inside the image only (for an even count, the upper of the two middle
   values, as skimage's rank median);
3. the robust-minimum rescale (:func:`robust_rescale`): sort the pixels > 0, take
   the value at index ``int(0.02 n)``, clamp the function below at it, divide by it.
   The function is then >= 1 everywhere.

Applying it (:func:`correct`) divides an image by the function. CellProfiler then
clips to [0, 1] of its rescaled intensity range; because the function is >= 1 and
raw pixels are >= 0 that clip never changes a value, so we only divide.

An exact 136 px disk median of a full 1024 x 1280 image takes about 20 minutes
with ``scipy.ndimage.median_filter`` (:func:`median_filter_exact`, the reference).
:func:`median_filter_fast` slides a histogram of quantised values along the rows
(Huang's algorithm, compiled with numba): every ``radius / 17``-th row is filtered
exactly (to 1/16384 of the intensity range) and the rows between are linearly
interpolated; extra exact rows check the interpolation and the spacing is halved
where it misses by more than 0.4 %. The result stays within 1 % of the exact
filter (0.2 % at full size; checked in ``tests/test_illumination.py``), in about
0.2-0.25 s of CPU per 1024 x 1280 function.

Filter sizes are given at the paper's 1024 x 1280 scale;
:func:`scaled_filter_size` scales them to other image sizes by
``sqrt(H * W / (1024 * 1280))`` so that the disk covers the same fraction of the
field (80 px on a 256 x 320 image).

Example
-------
>>> import numpy as np
>>> from napari_wsdino.core.illumination import illumination_function, correct
>>> rng = np.random.default_rng(0)
>>> yy, xx = np.mgrid[:64, :80]
>>> vignette = 1.0 - ((yy - 32) ** 2 + (xx - 40) ** 2) / 8000.0
>>> fields = [rng.poisson(500 * vignette).astype(np.uint16) for _ in range(4)]
>>> fn = illumination_function(np.mean(fields, axis=0), filter_size=20)
>>> float(fn.min()) >= 1.0
True
>>> correct(fields[0], fn).dtype
dtype('float32')
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import numpy as np

#: Image size (H, W) at which filter sizes are stated (BBBC021, the paper).
REFERENCE_SHAPE: tuple[int, int] = (1024, 1280)
#: CellProfiler's robust-minimum quantile.
ROBUST_FACTOR = 0.02
#: Histogram levels of the fast median filter.
FAST_LEVELS = 16384
#: Relative interpolation error the fast filter accepts at its check rows.
FAST_TOLERANCE = 0.004
METHODS = ("fast", "exact")
#: How the median filter treats the image edges (see the module docstring).
BORDERS = ("reflect", "in-image")
#: Relative interpolation error the fast filter accepts with ``borders="in-image"``
#: (CellProfiler's definition, which the paper-code recipe must meet to 0.1 %).
CELLPROFILER_TOLERANCE = 0.0003


def disk_radius(filter_size: float) -> int:
    """CellProfiler's median-filter radius for a smoothing filter size.

    ``sigma = filter_size / 2.35`` (the filter size is a FWHM), rounded to an
    integer radius of at least 1.

    >>> disk_radius(320)
    136
    """
    return max(1, int(filter_size / 2.35 + 0.5))


def scaled_filter_size(
    filter_size: float,
    shape: tuple[int, int],
    reference: tuple[int, int] = REFERENCE_SHAPE,
) -> float:
    """Filter size for images of ``shape``, given one at the ``reference`` scale.

    Scales by ``sqrt(H * W / (H_ref * W_ref))`` so the disk keeps the same
    fraction of the field of view.

    >>> scaled_filter_size(320, (256, 320))
    80.0
    """
    h, w = shape
    return float(filter_size) * float(np.sqrt((h * w) / (reference[0] * reference[1])))


def disk(radius: int) -> np.ndarray:
    """Boolean disk footprint ``x**2 + y**2 <= r**2`` (same as ``skimage.morphology.disk``)."""
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


class MeanAccumulator:
    """Running per-pixel mean of images of one shape (exact in float64).

    Sums of 16-bit integers stay exact in float64 for any realistic plate, so the
    mean does not depend on the order in which images (or partial sums) arrive.
    """

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, image: np.ndarray) -> None:
        """Add one image."""
        self.add_sum(np.asarray(image, dtype=np.float64), 1)

    def add_sum(self, total: np.ndarray, count: int) -> None:
        """Add the sum of ``count`` images (e.g. from a worker process)."""
        if count == 0:
            return
        if self.total is None:
            self.total = np.array(total, dtype=np.float64)
        else:
            if total.shape != self.total.shape:
                raise ValueError(f"image shape {total.shape} != {self.total.shape}")
            self.total += total
        self.count += count

    def mean(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            raise ValueError("no images were added")
        return self.total / self.count


def mean_image(images: Iterable[np.ndarray]) -> np.ndarray:
    """Per-pixel mean of 2-D images (float64): the average image of a plate.

    >>> float(mean_image([np.zeros((2, 2)), np.full((2, 2), 4)])[0, 0])
    2.0
    """
    acc = MeanAccumulator()
    for img in images:
        acc.add(img)
    return acc.mean()


def _check_borders(borders: str) -> str:
    if borders not in BORDERS:
        raise ValueError(f"borders must be one of {BORDERS}, not {borders!r}")
    return borders


def median_filter_exact(image: np.ndarray, radius: int, borders: str = "reflect") -> np.ndarray:
    """Exact median over a disk of ``radius`` at every pixel.

    The slow reference: ``borders="reflect"`` is ``scipy.ndimage.median_filter`` with
    a disk footprint and ``mode="reflect"``; ``borders="in-image"`` takes the median
    of the disk's in-image pixels only (:func:`median_at`). Cost grows with pixels x
    disk area: use it on small images or to check :func:`median_filter_fast`.
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    if _check_borders(borders) == "in-image":
        h, w = image.shape
        return median_at(image, radius, np.arange(h), np.arange(w), borders="in-image")
    return ndimage.median_filter(image, footprint=disk(radius), mode="reflect")


def grid_points(length: int, step: float) -> np.ndarray:
    """Integer positions from 0 to ``length - 1`` (both ends included), about ``step`` apart."""
    if length <= 1:
        return np.zeros(1, dtype=np.intp)
    n = int(np.ceil((length - 1) / max(step, 1.0))) + 1
    return np.unique(np.round(np.linspace(0, length - 1, n)).astype(np.intp))


def median_at(
    image: np.ndarray, radius: int, ys: np.ndarray, xs: np.ndarray, batch: int = 8,
    borders: str = "reflect",
) -> np.ndarray:
    """Exact disk medians at the grid points ``ys x xs``.

    Returns a ``(len(ys), len(xs))`` array equal to
    ``median_filter_exact(image, radius, borders)[np.ix_(ys, xs)]``.
    """
    r = int(radius)
    if _check_borders(borders) == "in-image":
        return _median_at_in_image(np.asarray(image, dtype=np.float64), r, ys, xs, batch)
    image = np.asarray(image, dtype=np.float32)
    # numpy "symmetric" padding is scipy's "reflect" (edge pixel repeated).
    padded = np.pad(image, r, mode="symmetric")
    flat = padded.ravel()
    dy, dx = np.nonzero(disk(r))
    offsets = (dy * padded.shape[1] + dx).astype(np.intp)
    base = (np.asarray(ys)[:, None] * padded.shape[1] + np.asarray(xs)[None, :]).ravel()
    # A disk holds an odd number of pixels: its median is one element, found by
    # partitioning (O(K)) rather than sorting.
    k = offsets.size // 2
    out = np.empty(base.size, dtype=np.float64)
    for i in range(0, base.size, batch):
        window = flat[base[i : i + batch, None] + offsets[None, :]]
        window.partition(k, axis=1)
        out[i : i + batch] = window[:, k]
    return out.reshape(len(ys), len(xs))


def _median_at_in_image(image, r, ys, xs, batch) -> np.ndarray:
    """Disk medians over in-image pixels only; for an even count the upper middle value
    (element ``n // 2`` of the sorted window, skimage's rank-median convention)."""
    padded = np.pad(image, r, mode="constant", constant_values=np.nan)
    flat = padded.ravel()
    dy, dx = np.nonzero(disk(r))
    offsets = (dy * padded.shape[1] + dx).astype(np.intp)
    base = (np.asarray(ys)[:, None] * padded.shape[1] + np.asarray(xs)[None, :]).ravel()
    out = np.empty(base.size, dtype=np.float64)
    for i in range(0, base.size, batch):
        window = np.sort(flat[base[i : i + batch, None] + offsets[None, :]], axis=1)  # NaN last
        k = np.isfinite(window).sum(axis=1) // 2
        out[i : i + batch] = window[np.arange(len(window)), k]
    return out.reshape(len(ys), len(xs))


def _interp_matrix(points: np.ndarray, length: int) -> np.ndarray:
    """``(length, len(points))`` linear-interpolation weights from ``points`` to ``0..length-1``."""
    m = np.zeros((length, len(points)), dtype=np.float64)
    if len(points) == 1:
        m[:, 0] = 1.0
        return m
    x = np.arange(length, dtype=np.float64)
    j = np.clip(np.searchsorted(points, x, side="right") - 1, 0, len(points) - 2)
    x0, x1 = points[j].astype(np.float64), points[j + 1].astype(np.float64)
    t = (x - x0) / (x1 - x0)
    rows = np.arange(length)
    m[rows, j] = 1.0 - t
    m[rows, j + 1] = t
    return m


_KERNEL = None


def _huang_kernel():
    """Compile (once per process; cached on disk by numba) the sliding-histogram kernel."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import numba

    @numba.njit(cache=True, nogil=True)
    def huang_rows(q, r, rows, width, levels):  # pragma: no cover - compiled
        # Huang, Yang & Tang (1979): slide a disk along each row, keeping a histogram
        # of quantised levels and the median level m with `below` = count(< m).
        # Level `levels` marks pixels outside the image: counted in its own bin, never
        # part of the median, so the rank k follows the number of in-image pixels.
        half = np.empty(2 * r + 1, np.int64)
        n = 0
        for i in range(2 * r + 1):
            dy = i - r
            a = int(np.sqrt(float(r * r - dy * dy)))
            while (a + 1) * (a + 1) + dy * dy <= r * r:
                a += 1
            while a * a + dy * dy > r * r:
                a -= 1
            half[i] = a
            n += 2 * a + 1
        out = np.empty((rows.size, width), np.int64)
        hist = np.zeros(levels + 1, np.int32)
        for j in range(rows.size):
            y0 = rows[j]
            hist[:] = 0
            for i in range(2 * r + 1):
                for xx in range(r - half[i], r + half[i] + 1):
                    hist[q[y0 + i, xx]] += 1
            k = (n - hist[levels]) // 2
            m = 0
            below = 0
            while below + hist[m] <= k:
                below += hist[m]
                m += 1
            out[j, 0] = m
            for x in range(1, width):
                for i in range(2 * r + 1):
                    left = q[y0 + i, x - 1 + r - half[i]]
                    right = q[y0 + i, x + r + half[i]]
                    hist[left] -= 1
                    hist[right] += 1
                    below += (right < m) - (left < m)
                k = (n - hist[levels]) // 2
                while below > k:
                    m -= 1
                    below -= hist[m]
                while below + hist[m] <= k:
                    below += hist[m]
                    m += 1
                out[j, x] = m
        return out

    _KERNEL = huang_rows
    return _KERNEL


def _median_rows(padded: np.ndarray, radius: int, width: int, levels: int,
                 rows: np.ndarray) -> np.ndarray:
    """Worker task: quantised disk medians of some rows (levels, int64)."""
    return _huang_kernel()(padded, int(radius), np.asarray(rows, np.int64), int(width),
                           int(levels))


def default_row_step(radius: int) -> int:
    """Rows between exactly filtered rows in :func:`median_filter_fast`: ``radius / 17``
    rounded (8 for r = 136; every row for r < 26)."""
    return max(1, int(round(radius / 17)))


def median_filter_fast(
    image: np.ndarray,
    radius: int,
    row_step: int | None = None,
    levels: int = FAST_LEVELS,
    tolerance: float = FAST_TOLERANCE,
    mapper: Callable = map,
    bands: int = 1,
    borders: str = "reflect",
) -> np.ndarray:
    """Disk median filter, fast: exact sliding-histogram medians on every
    ``row_step``-th row, linear interpolation between those rows, refined where
    a check says interpolation is not accurate enough.

    Values are quantised to ``levels`` levels between the image minimum and its
    99.99th percentile (brighter pixels count in the top level), so each filtered
    row equals the exact filter to within half a level (< 0.01 % of the range).
    A large disk changes little from row to row, so interpolating between rows
    ``radius / 17`` apart is accurate on plate averages (0.2 % on a 48-field
    synthetic plate at 1024 x 1280, r = 136). To hold on noisier images too, the
    exact filter is also computed on every 4th midpoint row; if interpolation
    misses it there by more than ``tolerance`` (relative), the row spacing is
    halved, and so on (down to every row, which is exact).

    Parameters
    ----------
    image
        2-D image (a plate's mean image).
    radius
        Disk radius in pixels.
    row_step
        Initial spacing, default :func:`default_row_step`; 1 gives the exact filter
        (up to quantisation).
    levels
        Histogram levels (<= 65536).
    tolerance
        Largest relative interpolation error accepted at the check rows.
    mapper, bands
        A ``map``-like callable (e.g. ``ProcessPoolExecutor.map``) and the number of
        row bands to hand it, to spread the rows over processes.
    borders
        ``"reflect"`` (mirrored edges) or ``"in-image"`` (the disk's in-image pixels
        only). With ``"in-image"``, an image of whole numbers spanning fewer than
        65,536 values is not quantised: each filtered row is then exact.

    Returns
    -------
    float64 array of ``image.shape``.
    """
    borders = _check_borders(borders)
    image = np.asarray(image, dtype=np.float64)
    h, w = image.shape
    r = int(radius)
    if row_step is None:
        row_step = default_row_step(r)
    lo = float(image.min())
    hi = float(np.percentile(image, 99.99))
    if not hi > lo:
        hi = float(image.max())
    if not hi > lo:
        return image.copy()  # constant image: the median is the image
    top = float(image.max())
    if borders == "in-image" and top - lo < 65536 and np.array_equal(image, np.floor(image)):
        levels, scale = int(top - lo) + 1, 1.0  # whole counts: one level per count
        q = (image - lo).astype(np.int32)
    else:
        scale = (hi - lo) / (levels - 1)
        q = np.clip(np.round((image - lo) / scale), 0, levels - 1).astype(np.int32)
    if borders == "in-image":
        # Level `levels` marks outside pixels; the kernel leaves them out of the median.
        padded = np.pad(q, r, mode="constant", constant_values=int(levels))
    else:
        # numpy "symmetric" padding is scipy's "reflect" (edge pixel repeated).
        padded = np.pad(q, r, mode="symmetric")
    task = partial(_median_rows, padded, r, w, int(levels))

    def filter_rows(which: np.ndarray) -> np.ndarray:
        n_bands = max(1, min(int(bands), len(which)))
        chunks = [c for c in np.array_split(which, n_bands) if len(c)]
        return lo + np.concatenate(list(mapper(task, chunks)), axis=0) * scale

    rows = grid_points(h, row_step)
    filtered = filter_rows(rows)
    # Errors below the 2nd percentile do not matter: the rescale clamps them.
    floor = max(abs(float(np.percentile(image, 2))), 1e-12)
    while len(rows) < h:
        gaps = np.diff(rows)
        mids = ((rows[:-1] + rows[1:]) // 2)[gaps > 1]
        probe = np.unique(np.r_[mids[::4], mids[-1]])
        exact = filter_rows(probe)
        guess = _interp_matrix(rows, h)[probe] @ filtered
        error = np.max(np.abs(guess - exact) / np.maximum(np.abs(exact), floor))
        rest = np.setdiff1d(mids, probe) if error > tolerance else np.empty(0, np.intp)
        extra_rows = np.r_[probe, rest].astype(np.intp)
        extra = exact if rest.size == 0 else np.concatenate([exact, filter_rows(rest)])
        order = np.argsort(np.r_[rows, extra_rows], kind="stable")
        rows = np.r_[rows, extra_rows][order]
        filtered = np.concatenate([filtered, extra])[order]
        if error <= tolerance:
            break
    if len(rows) == h:
        return filtered
    return _interp_matrix(rows, h) @ filtered


def robust_rescale(function: np.ndarray) -> tuple[np.ndarray, float]:
    """CellProfiler's robust-minimum rescale; returns ``(rescaled, robust_min)``.

    The pixels > 0 are sorted; the value at index ``int(0.02 * n)`` is the robust
    minimum; the function is clamped below at it and divided by it (>= 1 after).
    A function with no positive pixel is returned as ones (no correction).
    """
    function = np.asarray(function, dtype=np.float64)
    positive = function[function > 0]
    if positive.size == 0:
        return np.ones_like(function), 1.0
    k = int(positive.size * ROBUST_FACTOR)
    # np.partition puts the k-th smallest at k: the same value sorting gives.
    robust_min = float(np.partition(positive, k)[k])
    return np.maximum(function, robust_min) / robust_min, robust_min


def illumination_function(
    mean: np.ndarray,
    filter_size: float = 320.0,
    method: str = "fast",
    mapper: Callable = map,
    bands: int = 1,
    borders: str = "reflect",
) -> np.ndarray:
    """Illumination function of one (plate, channel) from its mean image.

    Parameters
    ----------
    mean
        Per-pixel mean of all the plate's images of the channel (:func:`mean_image`).
    filter_size
        Smoothing filter size in pixels *of this image* (see :func:`scaled_filter_size`).
    method
        ``"fast"`` (:func:`median_filter_fast`) or ``"exact"`` (:func:`median_filter_exact`).
    mapper, bands
        Spread the fast filter's rows over processes (see :func:`median_filter_fast`).
    borders
        ``"reflect"`` (default) or ``"in-image"``: CellProfiler's definition — the mean
        floored to whole 16-bit counts (CellProfiler scales it to uint16), the median over
        in-image pixels only, the fast filter held to :data:`CELLPROFILER_TOLERANCE`.

    Returns
    -------
    float32 array of ``mean.shape``, >= 1, that raw images are divided by.

    Example
    -------
    >>> fn = illumination_function(np.full((16, 16), 7.0), filter_size=4)
    >>> float(fn.max())
    1.0
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    radius = disk_radius(filter_size)
    if _check_borders(borders) == "in-image":
        mean = np.floor(np.clip(np.asarray(mean, dtype=np.float64), 0, 65535))
    if method == "exact":
        smooth = median_filter_exact(mean, radius, borders)
    else:
        tolerance = CELLPROFILER_TOLERANCE if borders == "in-image" else FAST_TOLERANCE
        smooth = median_filter_fast(mean, radius, mapper=mapper, bands=bands,
                                    borders=borders, tolerance=tolerance)
    return robust_rescale(smooth)[0].astype(np.float32)


def correct(image: np.ndarray, function: np.ndarray | None) -> np.ndarray:
    """Divide an image by its illumination function (float32; ``None``: no correction).

    >>> correct(np.full((2, 2), 10, np.uint16), np.full((2, 2), 2.0)).tolist()
    [[5.0, 5.0], [5.0, 5.0]]
    """
    image = np.asarray(image, dtype=np.float32)
    if function is None:
        return image
    if np.shape(function) != image.shape:
        raise ValueError(
            f"illumination function shape {np.shape(function)} != image shape {image.shape}"
        )
    return image / np.asarray(function, dtype=np.float32)
