"""Disk median filters: the exact reference and a fast sliding-histogram one.

:func:`median_filter_exact` is the reference (``scipy.ndimage.median_filter`` with a disk
footprint, or the median of the disk's in-image pixels). :func:`median_filter_fast` slides
a histogram of quantised values along the rows (Huang, Yang & Tang 1979, compiled with
numba) on every few rows and interpolates between them, checked and refined where the
interpolation misses. :mod:`napari_wsdino.core.illumination` smooths a plate's mean image
with them (its docstring explains the two ``borders`` definitions and the accuracy);
every name here is importable from there too.

Example
-------
>>> import numpy as np
>>> image = np.arange(36.0).reshape(6, 6)
>>> exact = median_filter_exact(image, 2)
>>> bool(np.allclose(median_filter_fast(image, 2, row_step=1), exact, atol=0.01))
True
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

#: Histogram levels of the fast median filter.
FAST_LEVELS = 16384
#: Relative interpolation error the fast filter accepts at its check rows.
FAST_TOLERANCE = 0.004
#: How the median filter treats the image edges: ``"reflect"`` mirrors the image (scipy's
#: ``mode="reflect"``); ``"in-image"`` takes the median of the disk's in-image pixels
#: only (CellProfiler's definition; see :mod:`napari_wsdino.core.illumination`).
BORDERS = ("reflect", "in-image")


def disk(radius: int) -> np.ndarray:
    """Boolean disk footprint ``x**2 + y**2 <= r**2`` (same as ``skimage.morphology.disk``)."""
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


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
    quantised = _quantise_padded(image, r, levels, borders)
    if quantised is None:
        return image.copy()  # constant image: the median is the image
    padded, lo, scale, levels = quantised
    task = partial(_median_rows, padded, r, w, int(levels))

    def filter_rows(which: np.ndarray) -> np.ndarray:
        n_bands = max(1, min(int(bands), len(which)))
        chunks = [c for c in np.array_split(which, n_bands) if len(c)]
        return lo + np.concatenate(list(mapper(task, chunks)), axis=0) * scale

    rows = grid_points(h, row_step)
    filtered = filter_rows(rows)
    # Errors below the 2nd percentile do not matter: the rescale clamps them.
    floor = max(abs(float(np.percentile(image, 2))), 1e-12)
    rows, filtered = _refine_rows(rows, filtered, h, filter_rows, tolerance, floor)
    if len(rows) == h:
        return filtered
    return _interp_matrix(rows, h) @ filtered


def _quantise_padded(image: np.ndarray, r: int, levels: int, borders: str):
    """``(padded, lo, scale, levels)``: the image as int32 levels ``lo + level * scale``,
    padded by ``r`` for the kernel; ``None`` for a constant image."""
    lo = float(image.min())
    hi = float(np.percentile(image, 99.99))
    if not hi > lo:
        hi = float(image.max())
    if not hi > lo:
        return None
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
    return padded, lo, scale, levels


def _refine_rows(
    rows: np.ndarray, filtered: np.ndarray, length: int,
    filter_rows: Callable[[np.ndarray], np.ndarray], tolerance: float, floor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Add exactly filtered rows until interpolating between ``rows`` misses the exact
    filter by at most ``tolerance`` (relative, errors below ``floor`` absolute) at check
    rows (every 4th midpoint and the last); each failed check halves the spacing.
    Returns the rows and their filtered values, sorted by row."""
    while len(rows) < length:
        gaps = np.diff(rows)
        mids = ((rows[:-1] + rows[1:]) // 2)[gaps > 1]
        probe = np.unique(np.r_[mids[::4], mids[-1]])
        exact = filter_rows(probe)
        guess = _interp_matrix(rows, length)[probe] @ filtered
        error = np.max(np.abs(guess - exact) / np.maximum(np.abs(exact), floor))
        rest = np.setdiff1d(mids, probe) if error > tolerance else np.empty(0, np.intp)
        extra_rows = np.r_[probe, rest].astype(np.intp)
        extra = exact if rest.size == 0 else np.concatenate([exact, filter_rows(rest)])
        order = np.argsort(np.r_[rows, extra_rows], kind="stable")
        rows = np.r_[rows, extra_rows][order]
        filtered = np.concatenate([filtered, extra])[order]
        if error <= tolerance:
            break
    return rows, filtered


__all__ = [
    "BORDERS",
    "FAST_LEVELS",
    "FAST_TOLERANCE",
    "default_row_step",
    "disk",
    "grid_points",
    "median_at",
    "median_filter_exact",
    "median_filter_fast",
]
