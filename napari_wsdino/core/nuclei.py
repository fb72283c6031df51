"""Nuclei centres for cell-centred crops (as single-cell DINO works sample crops on cells).

Most of a high-content field is background, and the background carries the plate's
illumination and the week's stain level: random crops teach a model those instead of
the cells. Sampling crop centres on nuclei found in the DNA channel keeps nearly every
view on cells (DINO4Cells, Doron et al. 2023; scDINO, Pfaendler et al. 2023).

Nuclei are found by Otsu's threshold on a lightly smoothed field and connected
components; their centroids are the candidate centres. Fields without any object
(empty wells, blank images) get no centres and fall back to uniform crops.

Example
-------
>>> import numpy as np
>>> img = np.zeros((40, 40), np.float32); img[8:14, 8:14] = 1; img[25:31, 20:26] = 1
>>> find_nuclei(img).round().tolist()
[[10.0, 10.0], [28.0, 22.0]]
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: Most centres kept per field (an evenly spaced subset when there are more).
MAX_CENTRES = 128


def find_nuclei(image: np.ndarray, sigma: float = 1.0, min_area: int = 4) -> np.ndarray:
    """Centroids ``(N, 2)`` (row, col) of the bright objects of one DNA-stain field."""
    mask = foreground_mask(image, sigma)
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros((0, 2), np.float32)
    idx = np.arange(1, n + 1)
    area = ndi.sum_labels(np.ones(mask.shape, np.float32), labels, idx)
    keep = idx[area >= min_area]
    if len(keep) == 0:
        return np.zeros((0, 2), np.float32)
    return np.asarray(ndi.center_of_mass(mask, labels, keep), dtype=np.float32).reshape(-1, 2)


def foreground_mask(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Otsu foreground of one channel (the cells), as booleans."""
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float32)
    if not np.isfinite(img).all() or float(img.max() - img.min()) == 0.0:
        return np.zeros(img.shape, bool)
    smooth = ndi.gaussian_filter(img, sigma) if sigma > 0 else img
    return smooth > threshold_otsu(smooth)


def nuclei_centres(images, rows=None, max_centres: int = MAX_CENTRES) -> tuple[np.ndarray, np.ndarray]:
    """Candidate centres of many fields: ``yx`` ``(n, K, 2)`` and ``count`` ``(n,)``.

    Parameters
    ----------
    images
        ``(N, H, W)`` fields of the DNA channel (a cache's memory map is fine).
    rows
        Which fields (default: all); the output follows their order.
    """
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    found = [find_nuclei(images[int(r)]) for r in rows]
    k = max(1, min(max_centres, max((len(f) for f in found), default=1)))
    yx = np.zeros((len(rows), k, 2), np.float32)
    count = np.zeros(len(rows), np.int64)
    for i, f in enumerate(found):
        if len(f) > k:  # evenly spaced subset: deterministic, covers the field
            f = f[np.linspace(0, len(f) - 1, k).astype(int)]
        yx[i, :len(f)] = f
        count[i] = len(f)
    return yx, count
