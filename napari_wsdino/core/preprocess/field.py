"""One field of view: read, illumination-correct, resize, clip and normalise it.

The per-field steps of :mod:`napari_wsdino.core.preprocess` (see its docstring), plus
what a viewer needs to show a field as the cache holds it (:func:`plate_functions`)
and the per-plate normalisation applied to a plate's cached rows.

Example
-------
>>> raw = np.full((1, 8, 10), 20000, np.uint16)
>>> process_field(raw, None, PreprocessSettings(normalize="paper")).shape
(1, 4, 5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from napari_wsdino.core import illumination as illum
from napari_wsdino.core.cache import Cache
from napari_wsdino.core.imageio import ImageReadError, read_tiff
from napari_wsdino.core.metadata import DataError, Metadata
from napari_wsdino.core.preprocess.settings import (
    FLOAT16_MAX,
    NORMALIZATIONS,
    PreprocessSettings,
)

if TYPE_CHECKING:
    import pandas as pd

def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic, anti-aliased resize of ``(H, W)`` or ``(C, H, W)`` images (float32).

    Uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, about
    10x faster on a CPU than ``skimage.transform.resize(order=3, anti_aliasing=True)``
    (which blurs with a Gaussian first; torch widens the cubic kernel instead, as
    PIL does).
    """
    import torch

    arr = np.asarray(images, dtype=np.float32)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if tuple(arr.shape[-2:]) == tuple(size):
        out = arr.copy()
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr))[None]
        out = torch.nn.functional.interpolate(
            t, size=tuple(int(v) for v in size), mode="bicubic", antialias=True,
            align_corners=False,
        )[0].numpy()
    return out[0] if squeeze else out


def normalize(image: np.ndarray, method: str = "zscore", clip: float | None = None) -> np.ndarray:
    """Normalise one 2-D image (float32); see :class:`PreprocessSettings`.

    >>> z = normalize(np.array([[1.0, 3.0]]), "zscore")
    >>> z.tolist()
    [[-1.0, 1.0]]
    """
    image = np.asarray(image, dtype=np.float32)
    if method == "zscore":
        mean = float(image.mean(dtype=np.float64))
        std = float(image.std(dtype=np.float64))
        out = image - np.float32(mean)
        if std > 0:
            out /= np.float32(std)
        return out
    if method == "paper":
        if clip is None:
            raise ValueError("normalize='paper' needs the clip value")
        return image / np.float32(clip)
    if method in ("none", "plate"):  # "plate" is applied to the plate's rows afterwards
        return image
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {method!r}")


def normalise_plate_rows(array_files: Sequence[str], start: int, n: int,
                         controls: np.ndarray | None = None) -> None:
    """``normalize="plate"``: standardise one plate's cached rows, per channel, by the
    mean and standard deviation of the plate's control (DMSO) fields — of all its fields
    when it has none (``controls``: booleans over the ``n`` rows).

    Unlike a per-image z-score this keeps what differs between the fields of a plate
    (a treatment's brighter, larger or fewer nuclei) and removes what differs between
    plates (a week's stain level): the standard per-plate normalisation of profiling.
    Controls, not the whole plate, set the scale, so a plate's mix of treatments does not.
    """
    if n <= 0:
        return
    use = None if controls is None or not np.any(controls) else np.asarray(controls, bool)
    for path in array_files:
        arr = np.load(path, mmap_mode="r+")
        rows = np.asarray(arr[start:start + n], dtype=np.float64)
        ref = rows if use is None else rows[use]
        mean, std = ref.mean(), ref.std()
        arr[start:start + n] = ((rows - mean) / (std if std > 0 else 1.0)).astype(arr.dtype)
        arr.flush()
        del arr


def process_field(
    raw: np.ndarray,
    functions: Sequence[np.ndarray | None] | np.ndarray | None,
    settings: PreprocessSettings = PreprocessSettings(),
) -> np.ndarray:
    """Preprocess one field: correct, resize, clip, normalise.

    Parameters
    ----------
    raw
        ``(C, H, W)`` raw images of one field (any dtype; counts).
    functions
        The plate's illumination function per channel (``(C, H, W)`` or a list with
        ``None`` for no correction), or ``None``.
    settings
        :class:`PreprocessSettings`.

    Returns
    -------
    ``(C, h, w)`` float32, the values the cache stores (before float16).

    Example
    -------
    >>> raw = np.full((1, 8, 10), 20000, np.uint16)
    >>> out = process_field(raw, None, PreprocessSettings(normalize="paper"))
    >>> out.shape, float(out.max())
    ((1, 4, 5), 1.0)
    """
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = raw[None]
    if functions is None:
        functions = [None] * raw.shape[0]
    # illumination.correct, written into one (C, H, W) buffer (no temporaries).
    corrected = np.empty(raw.shape, dtype=np.float32)
    for c in range(raw.shape[0]):
        if functions[c] is None:
            corrected[c] = raw[c]
        else:
            if np.shape(functions[c]) != raw.shape[1:]:
                raise ValueError(f"illumination function shape {np.shape(functions[c])} "
                                 f"!= image shape {raw.shape[1:]}")
            np.divide(raw[c], np.asarray(functions[c], dtype=np.float32), out=corrected[c])
    small = resize(corrected, settings.output_size(raw.shape[-2:]))
    hi = settings.clip if settings.clip is not None else FLOAT16_MAX
    np.clip(small, 0.0, hi, out=small)
    return np.stack([normalize(im, settings.normalize, settings.clip) for im in small])


def plate_functions(
    metadata: Metadata,
    plate: str,
    settings: PreprocessSettings = PreprocessSettings(),
    cache: Cache | None = None,
) -> dict[str, np.ndarray | None]:
    """Illumination function of each channel of one plate, for display or
    :func:`process_field`.

    Taken from ``cache`` when it holds them, else computed from the plate's TIFFs
    (unreadable files skipped), exactly as :func:`preprocess` does.

    Example
    -------
    >>> fns = plate_functions(meta, meta.table.plate.iloc[0])        # doctest: +SKIP
    >>> raw = read_field([meta.table.loc[0, f"path_{c}"] for c in meta.channels])  # doctest: +SKIP
    >>> shown = process_field(raw, list(fns.values()), PreprocessSettings())  # doctest: +SKIP
    """
    channels = list(metadata.channels)
    if cache is not None:
        stored = {c: cache.illumination(plate, c) for c in channels}
        if all(v is not None for v in stored.values()):
            return stored
    if settings.illumination == "none":
        return {c: None for c in channels}
    rows = metadata.table[metadata.table["plate"] == plate]
    if rows.empty:
        raise DataError(f"No fields of plate {plate!r} in this dataset.")
    # As in preprocess: a field counts only if all its channels read, at the screen's size.
    expect = _probe_image(metadata.table, channels)
    shape = expect[0]
    acc = illum.MeanAccumulator()
    for paths in rows[[f"path_{c}" for c in channels]].astype(str).to_numpy():
        try:
            acc.add(_read_field(list(paths), expect))
        except ImageReadError:
            continue
    if acc.count == 0:
        return {c: None for c in channels}
    mean = acc.mean()
    size = settings.scaled_filter_size(shape)
    return {c: illum.illumination_function(mean[k], size, method=settings.illumination,
                                           borders=settings.borders)
            for k, c in enumerate(channels)}



def _read_field(paths: Sequence[str], expect: tuple) -> np.ndarray:
    """Read one field's channels; each must have the screen's ``(shape, dtype)``
    (``expect``, from :func:`_probe_image`): a float or 8-bit file among 16-bit ones
    would skew its whole plate's illumination function."""
    shape, dtype = expect
    planes = []
    for p in paths:
        img = read_tiff(p)
        if img.shape != tuple(shape):
            raise ImageReadError(p, f"image is {img.shape[0]}x{img.shape[1]}, "
                                    f"the screen's images are {shape[0]}x{shape[1]}")
        if dtype is not None and img.dtype != np.dtype(dtype):
            raise ImageReadError(p, f"pixels are {img.dtype}, the screen's images are "
                                    f"{np.dtype(dtype)}; re-export it as {np.dtype(dtype)}")
        planes.append(img)
    return np.stack(planes)



def _probe_image(table: pd.DataFrame, channels: Sequence[str]) -> tuple:
    """The screen's image ``(shape, dtype name)``: the commonest among the first
    TIFF headers (of every channel) that can be read, so one odd file among them
    does not set the standard."""
    import tifffile
    from collections import Counter

    tried, seen = [], Counter()
    heads = [p for col in (f"path_{c}" for c in channels) for p in table[col].head(7)]
    for path in heads:
        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                shape, dtype = tuple(int(v) for v in page.shape), np.dtype(page.dtype).name
        except Exception as exc:  # noqa: BLE001 - any unreadable header: try the next
            tried.append(f"{path} ({type(exc).__name__})")
            continue
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) == 2:
            seen[(shape, dtype)] += 1
        else:
            tried.append(f"{path} (shape {shape})")
    if seen:
        return seen.most_common(1)[0][0]
    raise DataError(
        "Cannot find the image size: none of the first images could be read, e.g. "
        + "; ".join(tried[:3]) + ". Check the dataset with 'wsdino info DATA'."
    )

