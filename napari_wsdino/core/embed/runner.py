"""A whole cache: :func:`embed_cache`, a generator of progress events that returns the
profile table; setup (:class:`_Plan`) apart from the chunk loop and the final merge.

Under ``torchrun`` the chunks are dealt out to the ranks
(:func:`~napari_wsdino.core.embed.parts.shard_chunks`), each rank writes its chunks to
``OUT.parts/``, and after a barrier rank 0 alone merges them and writes ``OUT`` (a
temporary file renamed), so a stopped job resumes like a single process.

Re-exported by :mod:`napari_wsdino.core.embed`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Sequence

import numpy as np
import pandas as pd
import torch

from napari_wsdino.core import distributed
from napari_wsdino.core.cache import Cache
from napari_wsdino.core.embed.crops import crop_sides
from napari_wsdino.core.embed.features import (embed_channel, feature_names, l2_normalise,
                                               profile_table)
from napari_wsdino.core.embed.parts import (_prepare_parts, check_profiles_out, load_chunk,
                                            parts_folder, parts_manifest, save_chunk, shard_chunks,
                                            write_profiles)
from napari_wsdino.core.embed.settings import (DEFAULT_BATCH, DEFAULT_CHUNK, DEFAULT_CROP,
                                               MAX_CELLS, MEDIANS, POOLINGS, WINDOWS)
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.model import pick_device
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.progress import Progress


@dataclass
class _Plan:
    """One embedding's settings, resolved and checked once."""

    cache: Cache
    models: ModelSet
    table: pd.DataFrame  # the fields to embed, in output order
    rows: np.ndarray  # their rows in the cache
    crops: dict  # per channel, as recorded with the profiles
    names: list
    device: torch.device
    crop: int
    batch_size: int
    chunk_size: int
    pooling: str
    windows: str
    median: str
    l2: bool
    precision: str = "auto"
    pos_embed: str | None = None
    nuclei: object = None  # the nuclear stain's images, for cell crops
    parts: Path | None = None

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk_size - 1) // self.chunk_size

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.chunk_size, min((k + 1) * self.chunk_size, self.n)

    def size(self, k: int) -> int:
        lo, hi = self.bounds(k)
        return hi - lo

    def manifest(self) -> dict:
        return parts_manifest(self.models, self.crops, self.table, self.rows, pooling=self.pooling,
                              windows=self.windows, median=self.median, l2=self.l2,
                              chunk_size=self.chunk_size, precision=self.precision,
                              pos_embed=self.pos_embed)


def _check_settings(cache: Cache, windows: str, median: str, pooling: str, nuclei_channel: str) -> None:
    if windows not in WINDOWS or median not in MEDIANS:
        raise DataError(f"windows must be one of {', '.join(WINDOWS)} and median one of "
                        f"{', '.join(MEDIANS)}; got {windows!r}, {median!r}.")
    if windows == "cells" and nuclei_channel not in cache.channels:
        raise DataError(f"Cell crops need the nuclear stain {nuclei_channel!r}, which this "
                        f"cache lacks (it has {', '.join(cache.channels)}); name your DNA "
                        "channel (empty: the cache's first), or use the centre windows.")
    if pooling not in POOLINGS:
        raise DataError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}.")


def _make_plan(cache, models, out, indices, *, crop, batch_size, chunk_size, device, pooling,
               windows, median, l2, nuclei_channel, precision="auto", pos_embed=None) -> _Plan:
    dev = torch.device(device)
    models.to(dev)
    table = cache.table if indices is None else cache.table.iloc[list(indices)]
    rows = np.arange(len(cache)) if indices is None else np.asarray(list(indices), dtype=int)
    nuclei_channel = nuclei_channel or cache.channels[0]
    _check_settings(cache, windows, median, pooling, nuclei_channel)
    crops = crop_sides(models, tuple(cache.shape), crop, windows)
    return _Plan(cache, models, table, rows, crops, feature_names(models, pooling), dev, crop,
                 max(int(batch_size), 1), max(int(chunk_size), 1), pooling, windows, median,
                 bool(l2), precision, pos_embed,
                 nuclei=cache.images(nuclei_channel) if windows == "cells" else None,
                 parts=parts_folder(out) if out is not None else None)


class _Meter:
    """Fields per second over the fields computed (not those resumed)."""

    def __init__(self):
        self.start, self.computed = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.computed += n
        return self.computed / max(time.perf_counter() - self.start, 1e-9)


def _embed_batch(plan: _Plan, arrays: dict, sel: np.ndarray) -> np.ndarray:
    contiguous = bool(np.all(np.diff(sel) == 1))
    batch = {c: (a[sel[0]:sel[-1] + 1] if contiguous else a[sel]) for c, a in arrays.items()}
    centres = None
    if plan.windows == "cells":
        from napari_wsdino.core.nuclei import nuclei_centres

        centres = nuclei_centres(plan.nuclei, sel, max_centres=MAX_CELLS)
    feats = np.concatenate(
        [embed_channel(m.model, batch[c], plan.crop, m.patch_size, plan.device, m.normalise,
                       plan.pooling, plan.windows, plan.median, centres, plan.precision,
                       plan.pos_embed)
         for c, m in plan.models.models.items()], axis=1)
    return l2_normalise(feats) if plan.l2 else feats


def _embed_chunk(plan: _Plan, arrays: dict, k: int, meter: _Meter, done: int, total: int):
    """Chunk ``k`` batch by batch; yields progress (``done`` fields before it of ``total``)."""
    lo, hi = plan.bounds(k)
    out = np.empty((hi - lo, len(plan.names)), dtype=np.float32)
    for b0 in range(lo, hi, plan.batch_size):
        b1 = min(b0 + plan.batch_size, hi)
        out[b0 - lo:b1 - lo] = _embed_batch(plan, arrays, plan.rows[b0:b1])
        rate = meter.add(b1 - b0)
        step = done + b1 - lo
        yield Progress("embed", step, total, f"{rate:.1f} fields/s",
                       {"fields_per_s": rate, "eta_s": (total - step) / rate if rate else float("nan")})
    return out


def _embed_chunks(plan: _Plan, mine: Sequence[int]):
    """Embed (or take from ``OUT.parts/``) the chunks ``mine``; returns them by index and
    the counts ``{"fields", "computed", "resumed"}``."""
    arrays = {c: plan.cache.images(c) for c in plan.models.channels}
    sizes = {k: plan.size(k) for k in mine}
    total = sum(sizes.values())
    counts = {"fields": total, "computed": 0, "resumed": 0}
    chunks, done, meter = {}, 0, _Meter()
    for k in mine:
        feats = load_chunk(plan.parts, k, (sizes[k], len(plan.names)))
        if feats is not None:
            counts["resumed"] += sizes[k]
            yield Progress("embed", done + sizes[k], total,
                           f"chunk {k + 1}/{plan.n_chunks} already done", {"resumed": True})
        else:
            feats = yield from _embed_chunk(plan, arrays, k, meter, done, total)
            counts["computed"] += sizes[k]
            if plan.parts is not None:
                save_chunk(plan.parts, k, feats)
        chunks[k] = feats
        done += sizes[k]
    return chunks, counts


def _provenance(plan: _Plan) -> dict:
    return {"models": plan.models.summary(), "crop": plan.crops, "pooling": plan.pooling,
            "windows": plan.windows, "median": plan.median, "l2": plan.l2, "n_fields": plan.n,
            "precision": plan.precision,
            **({"pos_embed": plan.pos_embed} if plan.pos_embed is not None else {}),
            "cache": str(plan.cache.path),
            "method": ("mean over nucleus-centred cell crops" if plan.windows == "cells"
                       else "median of four crops")
            + ", channels concatenated" + (", L2-normalised" if plan.l2 else "")}


def _finish(plan: _Plan, chunks: dict, out, extra: dict | None = None):
    """Concatenate the chunks in order, warn about NaN rows, write ``out``; returns the table."""
    n, width = plan.n, len(plan.names)
    parts = [chunks[k] for k in range(plan.n_chunks)]
    features = np.concatenate(parts, axis=0) if parts else np.zeros((0, width), np.float32)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:  # kept (rows stay aligned with the cache), but said out loud
        first = plan.table.iloc[int(bad[0])]
        warning = (f"{bad.size} of {n} fields have NaN/inf features: cache {plan.cache.path} holds "
                   f"NaN/inf pixels (e.g. {first['plate']}/{first['well']}/s{first['site']}); "
                   "rebuild the cache with 'wsdino preprocess' or leave those fields out.")
        yield Progress("embed", n, n, warning, {"warning": warning, "nan_rows": bad.tolist()})
    result = profile_table(plan.table, features, plan.names)
    if out is not None:
        write_profiles(result, out, {**_provenance(plan), **(extra or {})})
        shutil.rmtree(plan.parts, ignore_errors=True)
    return result


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
    nuclei_channel: str = "",
    precision: str = "auto",
    pos_embed: str | None = None,
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
        (``crop`` is then the cell crop's side); empty (default) = the cache's first
        channel, the DNA stain in BBBC021 (DAPI) and Cell Painting (DNA) alike.
    precision, pos_embed
        ``"auto"`` (bf16 autocast on CUDA) or ``"fp32"``; ``"timm"`` or ``"dino"`` position
        interpolation (``None``: the models' own). See :func:`embed_channel`.

    Returns
    -------
    ProfileTable
        ``Metadata_*`` columns + one float column per feature (``DAPI_000`` ...).
        With ``out``, also written there (Parquet) with ``OUT.json`` beside it
        (models, crops, cache). Under ``torchrun`` (``WORLD_SIZE`` > 1; ``out`` needed,
        on a file system all ranks share) each rank embeds every ``WORLD_SIZE``-th chunk;
        rank 0 merges them and returns the table, the other ranks return ``None``, and
        a ``"merge"`` event's ``info["ranks"]`` says how many fields each rank embedded.
        Each rank then uses ``cuda:LOCAL_RANK`` when ``device`` is CUDA.

    Example
    -------
    >>> gen = embed_cache(cache, models, "profiles.parquet", crop=224)  # doctest: +SKIP
    >>> for event in gen: print(event.message)                          # doctest: +SKIP
    """
    if out is not None:
        out = check_profiles_out(out)  # before any field: a name the writer refuses
    models.check_channels(cache.channels)
    return (yield from _embed_in_job(
        cache, models, out, indices, device, resume, crop=crop, batch_size=batch_size,
        chunk_size=chunk_size, pooling=pooling, windows=windows, median=median, l2=l2,
        nuclei_channel=nuclei_channel, precision=precision, pos_embed=pos_embed))


def _embed_in_job(cache, models, out, indices, device: str, resume: bool, **settings):
    """Join the ``torchrun`` job (if any) on ``device``, plan this embedding with the
    settings of :func:`embed_cache` and run it; leave the job however it ends."""
    dev, info = _join(device)
    try:
        plan = _make_plan(cache, models, out, indices, device=dev, **settings)
        return (yield from _run(plan, info, out, resume))
    finally:
        distributed.teardown(info)


def _join(device: str) -> tuple[torch.device, distributed.DistInfo]:
    """This process's device and its place in a ``torchrun`` job (one GPU per rank)."""
    dev = pick_device(device)
    info = distributed.setup(dev.type)
    if dev.type == "cuda" and info.distributed:
        dev = torch.device("cuda", info.local_rank)
    return dev, info


def _run(plan: _Plan, info: distributed.DistInfo, out, resume: bool):
    """Prepare ``OUT.parts/`` (rank 0), embed this rank's chunks, merge them on rank 0."""
    if info.distributed and out is None:
        raise DataError("Embedding under torchrun merges the ranks' parts beside the output "
                        "file: give one (--out PROFILES.parquet).")
    if plan.parts is not None:
        _share_parts(plan, info, resume)
    mine = shard_chunks(plan.n_chunks, info.rank, info.world_size)
    yield _start_event(plan, info, mine)
    chunks, counts = yield from _embed_chunks(plan, mine)
    distributed.barrier(info)  # every rank's chunks are on disk
    ranks = distributed.gather_objects(info, {"rank": info.rank, **counts})
    if info.distributed:
        yield Progress("merge", plan.n, plan.n, "; ".join(
            f"rank {r['rank']}: {r['fields']} fields ({r['resumed']} resumed)" for r in ranks),
            {"ranks": ranks})
    result = None
    if info.is_main:
        if info.distributed:
            _load_other_chunks(plan, chunks, out)
        result = yield from _finish(plan, chunks, out, {"ranks": ranks} if info.distributed else None)
    distributed.barrier(info)  # no rank returns before the profile file is there
    return result


def _share_parts(plan: _Plan, info: distributed.DistInfo, resume: bool) -> None:
    """Rank 0 checks or (re)creates ``OUT.parts/``; its refusal stops every rank."""
    failure = None
    if info.is_main:
        try:
            _prepare_parts(plan.parts, plan.manifest(), resume)
        except Exception as exc:  # noqa: BLE001 - passed on to the other ranks, then raised
            failure = exc
    message = distributed.broadcast_object(info, None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise DataError(f"rank 0 could not prepare {plan.parts}: {message}")


def _start_event(plan: _Plan, info: distributed.DistInfo, mine: Sequence[int]) -> Progress:
    how = f"with crops {plan.crops} on {plan.device}"
    info_ = {"crop": plan.crops, "device": str(plan.device)}
    if not info.distributed:
        return Progress("embed", 0, plan.n, f"embedding {plan.n} fields {how}", info_)
    total = sum(plan.size(k) for k in mine)
    return Progress("embed", 0, total, f"rank {info.rank}/{info.world_size}: embedding {total} "
                    f"of {plan.n} fields {how}",
                    {**info_, "rank": info.rank, "world_size": info.world_size})


def _load_other_chunks(plan: _Plan, chunks: dict, out) -> None:
    """Rank 0 reads the chunks the other ranks wrote to ``OUT.parts/``."""
    for k in range(plan.n_chunks):
        if k in chunks:
            continue
        feats = load_chunk(plan.parts, k, (plan.size(k), len(plan.names)))
        if feats is None:
            raise DataError(
                f"Chunk {k} is missing from {plan.parts} after every rank finished: the ranks "
                f"must share the file system of {out}. Write the output to a shared folder, "
                "or run on one node.")
        chunks[k] = feats
