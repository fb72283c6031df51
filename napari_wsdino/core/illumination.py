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

from typing import Callable, Iterable

import numpy as np

# The disk median filters live in their own module; their names stay importable here.
from napari_wsdino.core.median_filter import (
    BORDERS,
    FAST_LEVELS,
    FAST_TOLERANCE,
    _check_borders,
    default_row_step,
    disk,
    grid_points,
    median_at,
    median_filter_exact,
    median_filter_fast,
)

#: Image size (H, W) at which filter sizes are stated (BBBC021, the paper).
REFERENCE_SHAPE: tuple[int, int] = (1024, 1280)
#: CellProfiler's robust-minimum quantile.
ROBUST_FACTOR = 0.02
METHODS = ("fast", "exact")
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


__all__ = [
    "BORDERS",
    "CELLPROFILER_TOLERANCE",
    "FAST_LEVELS",
    "FAST_TOLERANCE",
    "METHODS",
    "REFERENCE_SHAPE",
    "ROBUST_FACTOR",
    "MeanAccumulator",
    "correct",
    "default_row_step",
    "disk",
    "disk_radius",
    "grid_points",
    "illumination_function",
    "mean_image",
    "median_at",
    "median_filter_exact",
    "median_filter_fast",
    "robust_rescale",
    "scaled_filter_size",
]
