"""From crops to profiles: each channel's backbone embeds the crops, the median (or the
cell mean) makes one vector per field, the channels are concatenated and L2-normalised.

Re-exported by :mod:`napari_wsdino.core.embed`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from napari_wsdino.core.embed.crops import (cell_crops, centre_crops, median_of_four,
                                            official_windows)
from napari_wsdino.core.embed.settings import DEFAULT_CROP, POOLINGS, WINDOWS
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.model import autocast_dtype, pos_embed_as
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.profiles import ProfileTable


def embed_autocast(device: torch.device | str, precision: str = "auto"):
    """The autocast context an embedding runs in (:func:`~napari_wsdino.core.model.autocast_dtype`):
    bf16 on CUDA under ``auto`` (this package's default, for speed and memory on
    tensor-core GPUs), none under ``fp32`` (the official code evaluates in fp32).

    Example
    -------
    >>> type(embed_autocast("cuda", "fp32")).__name__
    'nullcontext'
    """
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def pooled_features(model: torch.nn.Module, x: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """The embedding of each image of ``x``: ``model(x)`` (CLS) or CLS + mean patch token.

    Example
    -------
    >>> from napari_wsdino.core.model import create_backbone
    >>> vit = create_backbone("test_vit")
    >>> tuple(pooled_features(vit, torch.zeros(2, 1, 32, 32), "cls+mean").shape)
    (2, 128)
    """
    if pooling == "cls":
        return model(x)
    if pooling != "cls+mean":
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}.")
    tokens = model.forward_features(x)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls = model.forward_head(tokens, pre_logits=True)
    return torch.cat([cls, tokens[:, n_prefix:].mean(dim=1)], dim=1)


def _official_features(model, images, patch, device, normalise, pooling,
                       precision) -> torch.Tensor:
    """Embeddings of the four official windows, ``(B, 4, D)`` (two window shapes, so
    one forward pass per window)."""
    feats = []
    for top, left, h, w in official_windows(images.shape[-2:], patch):
        x = torch.from_numpy(np.ascontiguousarray(
            np.asarray(images[:, top:top + h, left:left + w], dtype=np.float32)))
        x = x[:, None].to(device, non_blocking=True)
        if normalise is not None:
            x = normalise(x)
        with embed_autocast(device, precision):
            feats.append(pooled_features(model, x, pooling).float())
    return torch.stack(feats, dim=1)


@torch.no_grad()
def embed_channel(model: torch.nn.Module, images: np.ndarray, crop: int = DEFAULT_CROP,
                  patch: int = 1, device: torch.device | str = "cpu", normalise=None,
                  pooling: str = "cls", windows: str = "centre",
                  median: str = "mean-middle", centres=None, precision: str = "auto",
                  pos_embed: str | None = None) -> np.ndarray:
    """One channel's field embeddings (median of the four centre crops), ``(B, D)``.

    Parameters
    ----------
    model
        A backbone whose ``model(x)`` is the CLS embedding of ``x`` ``(N, 1, c, c)``.
    images
        ``(B, H, W)`` preprocessed fields of that channel.
    normalise
        Training-time input normalisation (``ChannelModel.normalise``), if any.
    pooling
        ``"cls"`` (the paper) or ``"cls+mean"`` (see :data:`POOLINGS`).
    windows, median
        See :data:`~napari_wsdino.core.embed.crops.WINDOWS` and
        :data:`~napari_wsdino.core.embed.crops.MEDIANS` (``crop`` is unused with ``official``).
    centres
        With ``windows="cells"``: ``(yx, count)`` of the fields' nuclei
        (:func:`napari_wsdino.core.nuclei.nuclei_centres`); ``crop`` is the cell crop side.
    precision
        ``"auto"`` (bf16 autocast on CUDA), ``"fp32"`` or ``"bf16"`` (:func:`embed_autocast`).
    pos_embed
        ``"timm"`` or ``"dino"``: how the position embedding meets crops of another size
        (:data:`~napari_wsdino.core.model.POS_EMBED_MODES`), for this call only; ``None``
        (default): the model's own.
    """
    device = torch.device(device)
    with pos_embed_as(model, pos_embed):
        return _embed_windows(model, images, crop, patch, device, normalise, pooling, windows,
                              median, centres, precision)


def _embed_windows(model, images, crop, patch, device, normalise, pooling, windows, median,
                   centres, precision) -> np.ndarray:
    """:func:`embed_channel` once the model's position embedding is set."""
    if windows == "cells":
        return _cell_features(model, images, crop, patch, device, normalise, pooling, centres,
                              precision)
    if windows == "official":
        feats = _official_features(model, images, patch, device, normalise, pooling, precision)
        return median_of_four(feats, median).cpu().numpy()
    if windows != "centre":
        raise ValueError(f"windows must be one of {WINDOWS}, not {windows!r}")
    crops = torch.from_numpy(centre_crops(images, crop, patch))
    b, n, side, _ = crops.shape
    x = crops.reshape(b * n, 1, side, side).to(device, non_blocking=True)
    if normalise is not None:
        x = normalise(x)
    with embed_autocast(device, precision):
        feats = pooled_features(model, x, pooling)
    return median_of_four(feats.float().reshape(b, n, -1), median).cpu().numpy()


def _cell_features(model, images, crop, patch, device, normalise, pooling, centres,
                   precision) -> np.ndarray:
    """Mean embedding of each field's nucleus-centred crops, ``(B, D)``."""
    if centres is None:
        raise ValueError("windows='cells' needs the fields' nuclei centres")
    side = min(int(crop), *images.shape[-2:])
    side -= side % max(int(patch), 1)
    if side <= 0:
        raise DataError(f"Cell crops of {crop} px are smaller than one {patch}-px patch.")
    crops, owner = cell_crops(images, centres[0], centres[1], side)
    x = torch.from_numpy(crops)[:, None].to(device, non_blocking=True)
    if normalise is not None:
        x = normalise(x)
    with embed_autocast(device, precision):
        feats = pooled_features(model, x, pooling).float().cpu()
    sums = torch.zeros((images.shape[0], feats.shape[1])).index_add_(0, torch.from_numpy(owner), feats)
    n = torch.bincount(torch.from_numpy(owner), minlength=images.shape[0]).clamp(min=1)
    return (sums / n[:, None]).numpy()


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def embed_fields(models: ModelSet, images: Mapping[str, np.ndarray], crop: int = DEFAULT_CROP,
                 device: torch.device | str = "cpu", pooling: str = "cls",
                 precision: str = "auto", pos_embed: str | None = None) -> np.ndarray:
    """Profiles of a batch of fields: channels concatenated, L2-normalised, ``(B, sum D)``.

    Parameters
    ----------
    models
        One backbone per channel; every channel must be in ``images``.
    images
        ``{channel: (B, H, W)}`` preprocessed fields.
    precision, pos_embed
        As in :func:`embed_channel`.

    Example
    -------
    >>> models = ModelSet.random("test_vit", ("DAPI", "Actin"), seed=0)
    >>> imgs = {c: np.random.default_rng(0).random((3, 64, 64)) for c in ("DAPI", "Actin")}
    >>> feats = embed_fields(models, imgs, crop=32)
    >>> feats.shape, np.allclose(np.linalg.norm(feats, axis=1), 1)
    ((3, 128), True)
    """
    models.check_channels(images)
    parts = [embed_channel(m.model, images[c], crop, m.patch_size, device, m.normalise, pooling,
                           precision=precision, pos_embed=pos_embed)
             for c, m in models.models.items()]
    return l2_normalise(np.concatenate(parts, axis=1))


def feature_names(models: ModelSet, pooling: str = "cls") -> list[str]:
    """``DAPI_000 … Actin_383``: channel and dimension of each profile column (with
    ``cls+mean`` pooling the mean-token dimensions follow the CLS ones per channel)."""
    width = 2 if pooling == "cls+mean" else 1
    return [f"{c}_{i:03d}" for c, m in models.models.items() for i in range(width * m.embed_dim)]


def profile_table(field_table: pd.DataFrame, features: np.ndarray, names: Sequence[str]) -> ProfileTable:
    """The profile table (``Metadata_*`` + feature columns) of these fields and features."""
    return ProfileTable.from_fields(field_table.reset_index(drop=True),
                                    np.asarray(features, dtype=np.float32), list(names))

