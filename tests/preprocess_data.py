"""Small 16-bit screens with a known vignette, in the official BBBC021 layout.

Used by tests/test_illumination.py and tests/test_preprocess.py. Fields are a
flat background plus Gaussian "cells", times a per-channel vignette, with
Poisson noise; rows come from the bundled BBBC021 metadata.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from napari_wsdino.core.imageio import write_tiff
from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV, bundled_metadata_dir

CHANNELS = ("DAPI", "Tubulin", "Actin")


def vignette(shape: tuple[int, int], centre=(0.45, 0.55), edge: float = 0.45) -> np.ndarray:
    """Multiplicative vignette: 1 at ``centre`` (fractions of H, W), falling
    quadratically to about ``edge`` at the far corner."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    d2 = ((yy - centre[0] * (h - 1)) / h) ** 2 + ((xx - centre[1] * (w - 1)) / w) ** 2
    return 1.0 - (1.0 - edge) * d2 / d2.max()


def field(rng, shape, vig, background=1500.0, n_cells=None, sigma=None, contrast=(1.0, 4.0)):
    """One raw field (uint16) and its cell mask (True where cells add > 2 % signal)."""
    h, w = shape
    if sigma is None:
        sigma = max(1.0, h / 85.0)  # ~12 px nuclei on 1024-px-high images
    if n_cells is None:
        n_cells = max(4, int(h * w / 1400))
    pts = np.zeros(shape)
    pts[rng.integers(0, h, n_cells), rng.integers(0, w, n_cells)] = (
        rng.uniform(*contrast, n_cells) * background * 2 * np.pi * sigma**2
    )
    cells = ndimage.gaussian_filter(pts, sigma)
    clean = (background + cells) * vig
    img = rng.poisson(clean).clip(0, 65535).astype(np.uint16)
    return img, cells > 0.02 * background


def plate_mean(rng, n_fields, shape, vig, **kw) -> np.ndarray:
    """Per-pixel mean of ``n_fields`` synthetic fields (a plate's average image)."""
    total = np.zeros(shape)
    for _ in range(n_fields):
        total += field(rng, shape, vig, **kw)[0]
    return total / n_fields


def write_screen(
    root: Path,
    n_plates: int = 2,
    fields_per_plate: int = 6,
    shape: tuple[int, int] = (64, 80),
    seed: int = 0,
) -> Path:
    """Write a small screen in the official layout and return its folder.

    The first ``fields_per_plate`` rows of the first ``n_plates`` plates of the
    bundled BBBC021 CSV, with their file names; one vignette per channel (stored
    as ``vignette_<channel>.npy`` for the tests).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    src = bundled_metadata_dir()
    images = pd.read_csv(src / IMAGE_CSV)
    plates = list(dict.fromkeys(images["Image_Metadata_Plate_DAPI"]))[:n_plates]
    rows = (
        images[images["Image_Metadata_Plate_DAPI"].isin(plates)]
        .groupby("Image_Metadata_Plate_DAPI", sort=False)
        .head(fields_per_plate)
    )
    rows.to_csv(root / IMAGE_CSV, index=False)
    shutil.copy(src / MOA_CSV, root / MOA_CSV)
    rng = np.random.default_rng(seed)
    centres = {"DAPI": (0.45, 0.55), "Tubulin": (0.55, 0.4), "Actin": (0.5, 0.5)}
    vigs = {c: vignette(shape, centres[c]) for c in CHANNELS}
    for c in CHANNELS:
        np.save(root / f"vignette_{c}.npy", vigs[c])
    for _, row in rows.iterrows():
        for c in CHANNELS:
            img, _ = field(rng, shape, vigs[c])
            path = root / row[f"Image_PathName_{c}"] / row[f"Image_FileName_{c}"]
            write_tiff(path, img)
    return root


def tile_background_cv(image: np.ndarray, mask: np.ndarray, tile: int = 8) -> float:
    """Coefficient of variation, across tiles, of each tile's median background
    pixel (Poisson noise averages out; what is left is the illumination)."""
    h, w = image.shape
    levels = []
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            bg = image[y : y + tile, x : x + tile][~mask[y : y + tile, x : x + tile]]
            if bg.size >= tile * tile // 2:
                levels.append(np.median(bg))
    levels = np.asarray(levels)
    return float(levels.std() / levels.mean())
