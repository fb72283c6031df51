"""Field profiles: per-channel ViT embeddings of the four centre crops, as in WS-DINO.

The WS-DINO paper (Methods, "Post-processing") embeds each field of view by "the
median feature embedding from four crops around the centre of each image
(equivalent to a pixel centre crop split into four non-overlapping crops)", one
model per channel, "then concatenated [...] followed by L2 normalization".

Here, for a crop size ``c`` (224 like the paper by default):

1. take the centre square of side ``2c`` of the preprocessed field and split it into
   its four ``c x c`` quadrants (top-left, top-right, bottom-left, bottom-right);
2. pass each quadrant through the channel's backbone (after the input normalisation
   it was trained with, ``(x - input_mean) / input_std``) and keep the CLS output;
3. take the per-dimension median of the four (for four values: the mean of the two
   middle ones, as :func:`numpy.median`);
4. concatenate the channels in the model set's order and L2-normalise.

When the field is smaller than ``2c`` the crop is clamped to ``min(H, W) // 2``, and
it is always rounded down to a multiple of the ViT patch size (see
:func:`crop_geometry`); the crop used is recorded with the result.

:func:`embed_cache` runs this over a preprocessed cache as a generator of
:class:`~napari_wsdino.core.progress.Progress` events that returns the profile
table. Closing the generator cancels it; with ``out`` set, finished chunks are kept
in ``OUT.parts/`` and a rerun skips them.

Example
-------
>>> from napari_wsdino.core.cache import open_cache               # doctest: +SKIP
>>> from napari_wsdino.core.modelset import ModelSet              # doctest: +SKIP
>>> from napari_wsdino.core.progress import run_to_end            # doctest: +SKIP
>>> models = ModelSet.from_run("runs/wsdino")                     # doctest: +SKIP
>>> profiles = run_to_end(embed_cache(open_cache("cache"), models, "profiles.parquet"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Generator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from napari_wsdino.core.cache import Cache
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.model import pick_device
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.progress import Progress

DEFAULT_CROP = 224
#: Where the four crops come from: ``centre`` (four quadrants of the centre square) or
#: ``official`` (the fixed windows of WS-DINO's published evaluation, ``Eval_BBBC021.py``).
#: ``cells``: one crop centred on every nucleus of the field (up to :data:`MAX_CELLS`, found
#: on the DNA channel), their embeddings averaged: a population profile, as single-cell
#: DINO works build theirs.
WINDOWS = ("centre", "official", "cells")
MAX_CELLS = 64
#: Median of the four crop embeddings: ``mean-middle`` (numpy's, the mean of the two
#: middle values) or ``lower`` (``torch.median``'s lower middle value, the published code's).
MEDIANS = ("mean-middle", "lower")
#: The official windows ``(top, left, height, width)`` on 512 x 640 fields: x 64-320 and
#: 320-544, y 32-256 and 256-480 (the left two are 256 px wide, the right two 224).
OFFICIAL_SHAPE = (512, 640)
OFFICIAL_WINDOWS = ((32, 64, 224, 256), (32, 320, 224, 224),
                    (256, 64, 224, 256), (256, 320, 224, 224))
DEFAULT_BATCH = 16
DEFAULT_CHUNK = 256
#: What a crop's embedding is: the CLS token (the paper), or the CLS token followed by
#: the mean of the patch tokens (richer for small models trained briefly).
POOLINGS = ("cls", "cls+mean")
PARTS_FORMAT = "napari-wsdino-embed-parts"

# -- geometry --------------------------------------------------------------------------


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


# -- embedding arrays ------------------------------------------------------------------


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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


def _official_features(model, images, patch, device, normalise, pooling) -> torch.Tensor:
    """Embeddings of the four official windows, ``(B, 4, D)`` (two window shapes, so
    one forward pass per window)."""
    feats = []
    for top, left, h, w in official_windows(images.shape[-2:], patch):
        x = torch.from_numpy(np.ascontiguousarray(
            np.asarray(images[:, top:top + h, left:left + w], dtype=np.float32)))
        x = x[:, None].to(device, non_blocking=True)
        if normalise is not None:
            x = normalise(x)
        with _autocast(device):
            feats.append(pooled_features(model, x, pooling).float())
    return torch.stack(feats, dim=1)


@torch.no_grad()
def embed_channel(model: torch.nn.Module, images: np.ndarray, crop: int = DEFAULT_CROP,
                  patch: int = 1, device: torch.device | str = "cpu", normalise=None,
                  pooling: str = "cls", windows: str = "centre",
                  median: str = "mean-middle", centres=None) -> np.ndarray:
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
        See :data:`WINDOWS` and :data:`MEDIANS` (``crop`` is unused with ``official``).
    centres
        With ``windows="cells"``: ``(yx, count)`` of the fields' nuclei
        (:func:`napari_wsdino.core.nuclei.nuclei_centres`); ``crop`` is the cell crop side.
    """
    device = torch.device(device)
    if windows == "cells":
        return _cell_features(model, images, crop, patch, device, normalise, pooling, centres)
    if windows == "official":
        feats = _official_features(model, images, patch, device, normalise, pooling)
        return median_of_four(feats, median).cpu().numpy()
    if windows != "centre":
        raise ValueError(f"windows must be one of {WINDOWS}, not {windows!r}")
    crops = torch.from_numpy(centre_crops(images, crop, patch))
    b, n, side, _ = crops.shape
    x = crops.reshape(b * n, 1, side, side).to(device, non_blocking=True)
    if normalise is not None:
        x = normalise(x)
    with _autocast(device):
        feats = pooled_features(model, x, pooling)
    return median_of_four(feats.float().reshape(b, n, -1), median).cpu().numpy()


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


def _cell_features(model, images, crop, patch, device, normalise, pooling, centres) -> np.ndarray:
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
    with _autocast(device):
        feats = pooled_features(model, x, pooling).float().cpu()
    sums = torch.zeros((images.shape[0], feats.shape[1])).index_add_(0, torch.from_numpy(owner), feats)
    n = torch.bincount(torch.from_numpy(owner), minlength=images.shape[0]).clamp(min=1)
    return (sums / n[:, None]).numpy()


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def embed_fields(models: ModelSet, images: Mapping[str, np.ndarray], crop: int = DEFAULT_CROP,
                 device: torch.device | str = "cpu", pooling: str = "cls") -> np.ndarray:
    """Profiles of a batch of fields: channels concatenated, L2-normalised, ``(B, sum D)``.

    Parameters
    ----------
    models
        One backbone per channel; every channel must be in ``images``.
    images
        ``{channel: (B, H, W)}`` preprocessed fields.

    Example
    -------
    >>> models = ModelSet.random("test_vit", ("DAPI", "Actin"), seed=0)
    >>> imgs = {c: np.random.default_rng(0).random((3, 64, 64)) for c in ("DAPI", "Actin")}
    >>> feats = embed_fields(models, imgs, crop=32)
    >>> feats.shape, np.allclose(np.linalg.norm(feats, axis=1), 1)
    ((3, 128), True)
    """
    models.check_channels(images)
    parts = [embed_channel(m.model, images[c], crop, m.patch_size, device, m.normalise, pooling)
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


def write_profiles(table: ProfileTable, path: str | Path, provenance: dict | None = None) -> Path:
    """Write a profile table as Parquet (atomically), plus ``<stem>.json`` provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    table.write(tmp)
    os.replace(tmp, path)
    if provenance is not None:
        path.with_suffix(".json").write_text(json.dumps(provenance, indent=2))
    return path


# -- a whole cache ---------------------------------------------------------------------


def parts_folder(out: str | Path) -> Path:
    """Where :func:`embed_cache` keeps finished chunks of ``out`` until it is written."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _table_hash(table: pd.DataFrame) -> str:
    cols = [c for c in ("plate", "well", "site") if c in table.columns]
    keys = table[cols].astype(str).agg("/".join, axis=1) if cols else pd.Series(range(len(table)))
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


def _prepare_parts(parts: Path, manifest: dict, resume: bool) -> None:
    mfile = parts / "manifest.json"
    if parts.exists():
        old = json.loads(mfile.read_text()) if mfile.exists() else None
        if resume and old == manifest:
            return
        if resume and old is not None:
            changed = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise DataError(
                f"{parts} holds an unfinished embedding with different settings "
                f"({', '.join(changed)}). Delete it, or rerun without resuming "
                "(--overwrite) to start again."
            )
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    mfile.write_text(json.dumps(manifest, indent=2))


def embed_cache(
    cache: Cache,
    models: ModelSet,
    out: str | Path | None = None,
    *,
    crop: int = DEFAULT_CROP,
    batch_size: int = DEFAULT_BATCH,
    chunk_size: int = DEFAULT_CHUNK,
    device: str = "auto",
    indices: Sequence[int] | None = None,
    resume: bool = True,
    pooling: str = "cls",
    windows: str = "centre",
    median: str = "mean-middle",
    l2: bool = True,
    nuclei_channel: str = "DAPI",
) -> Generator[Progress, None, object]:
    """Embed every field of a preprocessed cache; yields progress, returns the profiles.

    Parameters
    ----------
    cache
        From :func:`napari_wsdino.core.cache.open_cache`.
    models
        One backbone per channel (:class:`~napari_wsdino.core.modelset.ModelSet`);
        each channel must be in the cache.
    out
        Parquet file to write. Chunks of ``chunk_size`` fields are kept in
        ``OUT.parts/`` until the end, so an interrupted run resumes where it stopped.
    crop
        Side of each of the four centre crops (paper: 224); clamped to the field.
    batch_size
        Fields per forward pass (each gives four crops).
    device
        ``"auto"`` (CUDA with bf16 autocast when present), ``"cpu"``, ``"cuda:0"``...
    indices
        Rows of the cache to embed (default all).
    resume
        Reuse finished chunks of an earlier run with the same settings (else start over).
    pooling
        ``"cls"`` (the paper) or ``"cls+mean"``: CLS and mean patch token per crop.
    windows, median
        ``"centre"`` / ``"mean-middle"`` (default) or the published code's
        ``"official"`` windows / ``"lower"`` median (:data:`WINDOWS`, :data:`MEDIANS`).
    l2
        L2-normalise each field's concatenated profile (default; the paper's text). The
        published code keeps raw CLS features for its per-channel TVN (``l2=False``).
    nuclei_channel
        With ``windows="cells"``: the DNA channel whose nuclei centre the cell crops
        (``crop`` is then the cell crop's side).

    Returns
    -------
    ProfileTable
        ``Metadata_*`` columns + one float column per feature (``DAPI_000`` ...).
        With ``out``, also written there (Parquet) with ``OUT.json`` beside it
        (models, crops, cache).

    Example
    -------
    >>> gen = embed_cache(cache, models, "profiles.parquet", crop=224)  # doctest: +SKIP
    >>> for event in gen: print(event.message)                          # doctest: +SKIP
    """
    models.check_channels(cache.channels)
    dev = pick_device(device)
    models.to(dev)
    table = cache.table if indices is None else cache.table.iloc[list(indices)]
    rows = np.arange(len(cache)) if indices is None else np.asarray(list(indices), dtype=int)
    n = len(rows)
    shape = tuple(cache.shape)
    if windows not in WINDOWS or median not in MEDIANS:
        raise DataError(f"windows must be one of {', '.join(WINDOWS)} and median one of "
                        f"{', '.join(MEDIANS)}; got {windows!r}, {median!r}.")
    if windows == "official":
        crops = {c: official_windows(shape, m.patch_size) for c, m in models.models.items()}
    elif windows == "cells":
        if nuclei_channel not in cache.channels:
            raise DataError(f"Cell crops need the nuclear stain {nuclei_channel!r}, which this "
                            f"cache lacks (it has {', '.join(cache.channels)}); name your DNA "
                            "channel, or use the centre windows.")
        crops = {c: min(int(crop), *shape) // m.patch_size * m.patch_size
                 for c, m in models.models.items()}
        nuclei = cache.images(nuclei_channel)
    else:
        crops = {c: crop_geometry(shape, crop, m.patch_size)[0] for c, m in models.models.items()}
    if pooling not in POOLINGS:
        raise DataError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}.")
    names = feature_names(models, pooling)
    chunk_size = max(int(chunk_size), 1)
    batch_size = max(int(batch_size), 1)
    n_chunks = (n + chunk_size - 1) // chunk_size

    parts = parts_folder(out) if out is not None else None
    if parts is not None:
        manifest = {
            "format": PARTS_FORMAT,
            "models": models.fingerprint(),
            "channels": list(models.channels),
            "crop": crops,
            "pooling": pooling,
            "windows": windows,
            "median": median,
            "l2": bool(l2),
            "chunk_size": chunk_size,
            "n_fields": n,
            "fields": _table_hash(table),
            "rows": hashlib.sha1(rows.tobytes()).hexdigest(),
        }
        _prepare_parts(parts, manifest, resume)

    arrays = {c: cache.images(c) for c in models.channels}
    chunks: list[np.ndarray] = []
    done = 0
    start = time.perf_counter()
    computed = 0
    yield Progress("embed", 0, n, f"embedding {n} fields with crops {crops} on {dev}",
                   {"crop": crops, "device": str(dev)})
    for k in range(n_chunks):
        lo, hi = k * chunk_size, min((k + 1) * chunk_size, n)
        chunk_file = parts / f"chunk_{k:05d}.npy" if parts is not None else None
        if chunk_file is not None and chunk_file.exists():
            feats = np.load(chunk_file)
            if feats.shape == (hi - lo, len(names)):
                chunks.append(feats)
                done = hi
                yield Progress("embed", done, n, f"chunk {k + 1}/{n_chunks} already done",
                               {"resumed": True})
                continue
        out_chunk = np.empty((hi - lo, len(names)), dtype=np.float32)
        for b0 in range(lo, hi, batch_size):
            b1 = min(b0 + batch_size, hi)
            sel = rows[b0:b1]
            contiguous = bool(np.all(np.diff(sel) == 1))
            batch = {c: (a[sel[0]:sel[-1] + 1] if contiguous else a[sel]) for c, a in arrays.items()}
            centres = None
            if windows == "cells":
                from napari_wsdino.core.nuclei import nuclei_centres

                centres = nuclei_centres(nuclei, sel, max_centres=MAX_CELLS)
            feats = np.concatenate(
                [embed_channel(m.model, batch[c], crop, m.patch_size, dev, m.normalise, pooling,
                               windows, median, centres)
                 for c, m in models.models.items()], axis=1)
            out_chunk[b0 - lo:b1 - lo] = l2_normalise(feats) if l2 else feats
            done = b1
            computed += b1 - b0
            rate = computed / max(time.perf_counter() - start, 1e-9)
            yield Progress("embed", done, n, f"{rate:.1f} fields/s",
                           {"fields_per_s": rate, "eta_s": (n - done) / rate if rate else float("nan")})
        if chunk_file is not None:
            tmp = chunk_file.with_name(chunk_file.stem + ".tmp.npy")
            np.save(tmp, out_chunk)
            os.replace(tmp, chunk_file)
        chunks.append(out_chunk)

    features = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, len(names)), np.float32)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:  # kept (rows stay aligned with the cache), but said out loud
        first = table.iloc[int(bad[0])]
        warning = (f"{bad.size} of {n} fields have NaN/inf features: cache {cache.path} holds "
                   f"NaN/inf pixels (e.g. {first['plate']}/{first['well']}/s{first['site']}); "
                   "rebuild the cache with 'wsdino preprocess' or leave those fields out.")
        yield Progress("embed", n, n, warning, {"warning": warning, "nan_rows": bad.tolist()})
    result = profile_table(table, features, names)
    if out is not None:
        provenance = {"models": models.summary(), "crop": crops, "pooling": pooling,
                      "windows": windows, "median": median, "l2": bool(l2), "n_fields": n,
                      "cache": str(cache.path),
                      "method": ("mean over nucleus-centred cell crops" if windows == "cells"
                                 else "median of four crops")
                      + ", channels concatenated" + (", L2-normalised" if l2 else "")}
        write_profiles(result, out, provenance)
        shutil.rmtree(parts, ignore_errors=True)
    return result
