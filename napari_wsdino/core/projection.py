"""2-D maps of profiles (UMAP, with a PCA fallback for tiny sets) for plots.

Example
-------
>>> import numpy as np
>>> xy = project_2d(np.random.default_rng(0).normal(size=(50, 8)))
>>> xy.shape
(50, 2)
"""

from __future__ import annotations

import warnings

import numpy as np

#: 2-D maps of profiles: UMAP (the default) or PCA.
METHODS = ("umap", "pca")


def project_2d(features: np.ndarray, *, method: str = METHODS[0], n_neighbors: int = 15,
               seed: int = 0, metric: str = "cosine") -> np.ndarray:
    """Embed rows of ``features`` in 2-D.

    Parameters
    ----------
    features
        ``(n, d)`` profiles (treatment or well level).
    method
        ``"umap"`` (umap-learn; McInnes et al. 2018) or ``"pca"``. UMAP needs at least
        4 points; with fewer, PCA is used.
    n_neighbors
        UMAP neighbourhood, clipped to ``n - 1``.
    seed
        Makes UMAP deterministic (single-threaded).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D, got shape {x.shape}")
    n = len(x)
    if n == 0:
        return np.zeros((0, 2))
    if method == "pca" or n < 4:
        xc = x - x.mean(0)
        if n < 2:
            return np.zeros((n, 2))
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        out = u[:, :2] * s[:2]
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    if method != "umap":
        raise ValueError("method must be 'umap' or 'pca'")
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_neighbors=max(2, min(n_neighbors, n - 1)), min_dist=0.3,
                            metric=metric, random_state=seed, init="spectral" if n > 10 else "random")
        return reducer.fit_transform(x)
