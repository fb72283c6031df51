"""The ``classical`` baseline profile: per-channel intensity and texture statistics.

A deliberately simple hand-crafted profile (no segmentation model, no learning) in
the spirit of early CellProfiler whole-image measurements: intensity distribution,
foreground fraction (Otsu), edge and blob energy, grey-level co-occurrence (Haralick)
texture, nuclear object counts and sizes on the first channel (the DNA stain: DAPI in
BBBC021, DNA in Cell Painting), and inter-channel correlation, for any number of
channels (52 numbers for BBBC021's three, 89 for Cell Painting's five). It
is the reference any learned embedding should beat, and it calibrates the synthetic
replica (``docs/replica.md``).

Example
-------
>>> from napari_wsdino.core.metadata import load_metadata
>>> from napari_wsdino.core.classical import dataset_features
>>> meta = load_metadata("demo_data")                       # doctest: +SKIP
>>> X = dataset_features(meta.table, meta.channels)         # doctest: +SKIP
>>> X.shape == (len(meta.table), len(feature_names(meta.channels)))  # doctest: +SKIP
True
"""

from __future__ import annotations

from typing import Generator, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.feature import graycomatrix, graycoprops
from skimage.filters import threshold_otsu

from napari_wsdino.core.imageio import read_field
from napari_wsdino.core.metadata import CHANNELS
from napari_wsdino.core.progress import Progress, run_to_end

_CHANNEL_STATS = (
    "log_mean", "log_std", "log_q50", "log_q90", "log_q99", "skew", "fg_fraction", "fg_log_mean",
    "edge", "blob_fine", "blob_coarse", "glcm_contrast", "glcm_homogeneity",
    "glcm_correlation", "glcm_energy",
)
_OBJECT_STATS = ("obj_count_density", "obj_log_area", "obj_area_cv", "obj_log_intensity")
GLCM_LEVELS = 32


def feature_names(channels: Sequence[str] = CHANNELS) -> list[str]:
    """Names of :func:`classical_features`' outputs for these channels, in order."""
    names = [f"{c}_{s}" for c in channels for s in _CHANNEL_STATS]
    names += [f"{channels[0]}_{s}" for s in _OBJECT_STATS]
    names += [f"corr_{a}_{b}" for i, a in enumerate(channels) for b in channels[i + 1:]]
    return names


def _channel_stats(img: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Statistics of one channel (background-subtracted float image) and its Otsu mask."""
    lg = np.log1p(img)
    q50, q90, q99 = np.percentile(lg, (50, 90, 99))
    std = lg.std()
    skew = float(((lg - lg.mean()) ** 3).mean() / (std**3 + 1e-12))
    thr = threshold_otsu(lg) if np.ptp(lg) > 0 else lg.max() + 1
    fg = lg > thr
    fg_mean = float(lg[fg].mean()) if fg.any() else 0.0
    scale = img.mean() + 1e-6
    edge = float(np.hypot(ndi.sobel(img, 0), ndi.sobel(img, 1)).mean() / scale)
    blob_f = float(np.abs(ndi.gaussian_laplace(img, 1.0)).mean() / scale)
    blob_c = float(np.abs(ndi.gaussian_laplace(img, 3.0)).mean() / scale)
    hi = np.percentile(img, 99.5) + 1e-6
    q = np.clip(img / hi * (GLCM_LEVELS - 1), 0, GLCM_LEVELS - 1).astype(np.uint8)
    glcm = graycomatrix(q, [1, 2], [0, np.pi / 2], levels=GLCM_LEVELS, symmetric=True, normed=True)
    tex = [float(graycoprops(glcm, p).mean()) for p in ("contrast", "homogeneity", "correlation", "energy")]
    stats = [float(lg.mean()), float(std), float(q50), float(q90), float(q99), skew,
             float(fg.mean()), fg_mean, edge, blob_f, blob_c] + tex
    return stats, fg


def classical_features(image: np.ndarray) -> np.ndarray:
    """Classical profile of one field.

    Parameters
    ----------
    image
        ``(C, H, W)`` raw intensities, any ``C``; channel 0 is the nuclear stain
        (DAPI, or Cell Painting's DNA).

    Returns
    -------
    numpy.ndarray
        1-D float64 vector, ``len(feature_names(channels))`` long: per channel
        :data:`_CHANNEL_STATS`, then nuclear objects on channel 0
        (count per 10^4 px, log mean area, area CV, log mean intensity), then the
        Pearson correlation of every channel pair.

    Example
    -------
    >>> rng = np.random.default_rng(0)
    >>> classical_features(rng.poisson(100, (3, 64, 80)).astype(np.uint16)).shape
    (52,)
    >>> classical_features(rng.poisson(100, (5, 64, 80)).astype(np.uint16)).shape
    (89,)
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"classical_features expects (C, H, W); got shape {img.shape}")
    # Subtract a robust background so illumination offsets do not dominate everything.
    img = np.clip(img - np.percentile(img, 2, axis=(1, 2), keepdims=True), 0, None)
    out: list[float] = []
    masks = []
    for plane in img:
        stats, fg = _channel_stats(plane)
        out += stats
        masks.append(fg)
    lab, n = ndi.label(masks[0])
    if n:
        area = np.bincount(lab.ravel())[1:].astype(float)
        inten = ndi.sum(img[0], lab, np.arange(1, n + 1)) / area
        keep = area >= 3  # ignore speckle
        area, inten = (area[keep], inten[keep]) if keep.any() else (area, inten)
        obj = [len(area) / img[0].size * 1e4, float(np.log(area.mean())),
               float(area.std() / area.mean()), float(np.log1p(inten.mean()))]
    else:
        obj = [0.0, 0.0, 0.0, 0.0]
    out += obj
    flat = img.reshape(len(img), -1)
    corr = np.corrcoef(flat) if flat.std(axis=1).min() > 0 else np.zeros((len(img), len(img)))
    out += [float(corr[i, j]) for i in range(len(img)) for j in range(i + 1, len(img))]
    return np.asarray(out, dtype=np.float64)


def iter_dataset_features(table: pd.DataFrame, channels: Sequence[str] = CHANNELS,
                          every: int = 16) -> Generator[Progress, None, np.ndarray]:
    """:func:`dataset_features` as a generator of :class:`Progress` events."""
    cols = [f"path_{c}" for c in channels]
    paths = table[cols].to_numpy()
    n = len(paths)
    out = np.zeros((n, len(feature_names(channels))))
    yield Progress("classical", 0, n, "classical features")
    for i, row in enumerate(paths):
        out[i] = classical_features(read_field(list(row)))
        if (i + 1) % every == 0 or i + 1 == n:
            yield Progress("classical", i + 1, n, f"{i + 1} fields")
    return out


def dataset_features(table: pd.DataFrame, channels: Sequence[str] = CHANNELS,
                     callback=None) -> np.ndarray:
    """Classical features of every field of a field table, row-aligned with it.

    Parameters
    ----------
    table
        Field table from :func:`~napari_wsdino.core.metadata.load_metadata` (needs the
        ``path_<channel>`` columns).
    channels
        Channels to stack, nuclear stain first.
    callback
        Called with each :class:`Progress` event.

    Returns
    -------
    numpy.ndarray
        ``(len(table), len(feature_names(channels)))``.
    """
    return run_to_end(iter_dataset_features(table, channels), callback)
