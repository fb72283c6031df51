"""Tiny caches and configs shared by the training tests (not a test module)."""

from __future__ import annotations

import numpy as np

from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.metadata import bundled_metadata_dir, load_metadata
from napari_wsdino.core.train import TrainConfig

COMPOUNDS = ("taxol", "ALLN", "AZ138", "DMSO")


def tiny_table(per_compound: int = 10):
    """Fields of a few compounds (several plates each) from the bundled BBBC021 table."""
    table = load_metadata(bundled_metadata_dir(), check_files=False).table
    parts = [table[table.compound == c].head(per_compound) for c in COMPOUNDS]
    import pandas as pd

    return pd.concat(parts).reset_index(drop=True)


def structured_images(table, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-compound stripe patterns plus noise, float in ~[0, 1], two channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = {c: 2 + 3 * i for i, c in enumerate(COMPOUNDS)}
    out = {}
    for ch, angle in (("DAPI", 0.0), ("Actin", 1.0)):
        imgs = []
        for c in table.compound:
            f = freq[c]
            base = 0.5 + 0.4 * np.sin(2 * np.pi * f * (np.cos(angle) * xx + np.sin(angle) * yy))
            imgs.append(base + 0.1 * rng.standard_normal((size, size)))
        out[ch] = np.stack(imgs).astype(np.float32)
    return out


def make_cache(path, per_compound: int = 10, size: int = 64, seed: int = 0):
    table = tiny_table(per_compound)
    return write_cache(path, table, structured_images(table, size, seed), {"test": True})


def tiny_config(**changes) -> TrainConfig:
    base = dict(arch="test_vit", weak_label="compound", epochs=2, batch_size=8,
                local_crops=4, global_size=32, local_size=16, out_dim=256, hidden_dim=64,
                bottleneck_dim=32, lr=5e-4, min_lr=1e-4, warmup_epochs=1,
                device="cpu", checkpoint_every=1, seed=0, input_mean=0.5, input_std=0.25)
    base.update(changes)
    return TrainConfig(**base)
