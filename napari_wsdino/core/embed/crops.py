"""Where a field's crops come from: the four centre quadrants, the published fixed
windows, or one crop per nucleus; and the median of the four crop embeddings.

The WS-DINO paper embeds each field by "the median feature embedding from four crops
around the centre of each image (equivalent to a pixel centre crop split into four
non-overlapping crops)"; :func:`crop_geometry` and :func:`centre_crops` cut those,
:func:`official_windows` the fixed windows of the published ``Eval_BBBC021.py`` and
:func:`cell_crops` nucleus-centred crops. Re-exported by :mod:`napari_wsdino.core.embed`.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_wsdino.core.embed.settings import (  # noqa: F401  (importable from here as before)
    DEFAULT_CROP, MAX_CELLS, MEDIANS, WINDOWS)
from napari_wsdino.core.metadata import DataError

#: The official windows ``(top, left, height, width)`` on 512 x 640 fields: x 64-320 and
#: 320-544, y 32-256 and 256-480 (the left two are 256 px wide, the right two 224).
OFFICIAL_SHAPE = (512, 640)
OFFICIAL_WINDOWS = ((32, 64, 224, 256), (32, 320, 224, 224),
                    (256, 64, 224, 256), (256, 320, 224, 224))


def crop_geometry(shape: tuple[int, int], crop: int = DEFAULT_CROP, patch: int = 1) -> tuple[int, list[tuple[int, int]]]:
    """Side and top-left corners of the four non-overlapping centre crops.

    Parameters
    ----------
    shape
        Field ``(H, W)``.
    crop
        Wanted crop side; clamped to ``min(H, W) // 2`` and rounded down to a
        multiple of ``patch``.
    patch
        ViT patch size.

    Returns
    -------
    side, corners
        ``corners`` in the order top-left, top-right, bottom-left, bottom-right.

    Example
    -------
    >>> crop_geometry((512, 640), 224, 8)
    (224, [(32, 96), (32, 320), (256, 96), (256, 320)])
    >>> crop_geometry((100, 120), 224, 16)
    (48, [(2, 12), (2, 60), (50, 12), (50, 60)])
    """
    h, w = int(shape[0]), int(shape[1])
    side = min(int(crop), h // 2, w // 2)
    side -= side % max(int(patch), 1)
    if side <= 0:
        raise DataError(
            f"Fields of {h}x{w} px are too small for four centre crops of a ViT with "
            f"{patch}-px patches (each crop needs at least {patch} px)."
        )
    cy, cx = h // 2, w // 2
    top, left = cy - side, cx - side
    corners = [(top, left), (top, left + side), (top + side, left), (top + side, left + side)]
    return side, corners


def centre_crops(images: np.ndarray, crop: int = DEFAULT_CROP, patch: int = 1) -> np.ndarray:
    """The four centre crops of a batch of fields, ``(B, H, W)`` → ``(B, 4, c, c)`` float32.

    Example
    -------
    >>> x = np.arange(2 * 8 * 8).reshape(2, 8, 8)
    >>> centre_crops(x, 2).shape
    (2, 4, 2, 2)
    """
    images = np.asarray(images) if not isinstance(images, np.memmap) else images
    side, corners = crop_geometry(images.shape[-2:], crop, patch)
    top, left = corners[0]
    square = np.asarray(images[:, top:top + 2 * side, left:left + 2 * side], dtype=np.float32)
    b = square.shape[0]
    # (B, 2c, 2c) -> (B, 2, c, 2, c) -> (B, 2, 2, c, c): quadrants in row-major order.
    quads = square.reshape(b, 2, side, 2, side).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(quads.reshape(b, 4, side, side))


def median_of_four(features: torch.Tensor, how: str = "mean-middle") -> torch.Tensor:
    """Per-dimension median over axis 1 (the crops).

    ``how="mean-middle"`` (default) averages the two middle values, the usual median
    (:func:`numpy.median`); ``how="lower"`` is ``torch.median``'s lower middle value, what
    the published evaluation code computes.
    """
    if how == "lower":
        return features.float().median(dim=1).values
    if how != "mean-middle":
        raise ValueError(f"median must be one of {MEDIANS}, not {how!r}")
    # Linear interpolation at q=0.5 is numpy's median for any count.
    return torch.quantile(features.float(), 0.5, dim=1)


def official_windows(shape: tuple[int, int], patch: int = 1) -> list[tuple[int, int, int, int]]:
    """The published evaluation's four fixed windows ``(top, left, height, width)``.

    Exact on 512 x 640 fields; on other sizes each edge is scaled by ``H / 512`` and
    ``W / 640`` and the sides rounded down to a multiple of ``patch``.

    Example
    -------
    >>> official_windows((512, 640), 8)[0]
    (32, 64, 224, 256)
    >>> official_windows((64, 80), 8)[1]
    (4, 40, 24, 24)
    """
    h, w = int(shape[0]), int(shape[1])
    sy, sx = h / OFFICIAL_SHAPE[0], w / OFFICIAL_SHAPE[1]
    patch = max(int(patch), 1)
    out = []
    for top, left, wh, ww in OFFICIAL_WINDOWS:
        t, lft = int(round(top * sy)), int(round(left * sx))
        hh = int(round(wh * sy)) // patch * patch
        wd = int(round(ww * sx)) // patch * patch
        if hh <= 0 or wd <= 0:
            raise DataError(f"Fields of {h}x{w} px are too small for the official windows "
                            f"of a ViT with {patch}-px patches.")
        out.append((t, lft, hh, wd))
    return out


def cell_crops(images: np.ndarray, yx: np.ndarray, count: np.ndarray, side: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Square crops of ``side`` px centred on each field's nuclei (shifted inside the field).

    Returns the crops ``(N, side, side)`` float32 and the field each belongs to ``(N,)``;
    a field without nuclei gives one crop at its centre.

    Example
    -------
    >>> imgs = np.zeros((2, 40, 40), np.float32)
    >>> yx = np.array([[[5.0, 5.0], [30.0, 20.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)
    >>> crops, owner = cell_crops(imgs, yx, np.array([2, 0]), 16)
    >>> crops.shape, owner.tolist()
    ((3, 16, 16), [0, 0, 1])
    """
    h, w = images.shape[-2:]
    side = int(min(side, h, w))
    out, owner = [], []
    for i in range(images.shape[0]):
        n = int(count[i])
        cs = yx[i, :n] if n else np.array([[h / 2, w / 2]], np.float32)
        y0 = np.clip(np.round(cs[:, 0] - side / 2).astype(int), 0, h - side)
        x0 = np.clip(np.round(cs[:, 1] - side / 2).astype(int), 0, w - side)
        img = np.asarray(images[i], dtype=np.float32)
        out.extend(img[a:a + side, b:b + side] for a, b in zip(y0, x0))
        owner.extend([i] * len(cs))
    return np.stack(out), np.asarray(owner, dtype=np.int64)


def crop_sides(models, shape: tuple[int, int], crop: int, windows: str) -> dict:
    """Each channel's crop as recorded with the profiles: the official windows, the cell
    crop side, or the centre crop side (clamped to the field and the model's patch)."""
    if windows == "official":
        return {c: official_windows(shape, m.patch_size) for c, m in models.models.items()}
    if windows == "cells":
        return {c: min(int(crop), *shape) // m.patch_size * m.patch_size
                for c, m in models.models.items()}
    return {c: crop_geometry(shape, crop, m.patch_size)[0] for c, m in models.models.items()}
