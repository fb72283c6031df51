"""On disk: the ``OUT.parts/`` folder of finished chunks (what makes an embedding
resumable, and what the ranks of a ``torchrun`` job share), and the final profile file.

``OUT.parts/manifest.json`` records the settings; ``chunk_KKKKK.npy`` holds the features of
fields ``K * chunk_size`` to ``(K + 1) * chunk_size``, each written to a temporary file and
renamed. A rerun with the same manifest skips the chunks that exist, whichever process
wrote them. Re-exported by :mod:`napari_wsdino.core.embed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_wsdino.core.fsio import atomic_write, atomic_write_text, remove_on_failure, unique_temp_path
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.profiles import SUFFIXES, ProfileTable

if TYPE_CHECKING:
    import pandas as pd

PARTS_FORMAT = "napari-wsdino-embed-parts"


def parts_folder(out: str | Path) -> Path:
    """Where :func:`~napari_wsdino.core.embed.embed_cache` keeps finished chunks of ``out``
    until it is written."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def check_profiles_out(out: str | Path) -> Path:
    """``out`` if the profile writer can write it; else a :class:`DataError` naming the
    accepted suffixes. Called before any field is embedded: a name the writer refuses
    would otherwise be found only at the end, hours later.

    >>> check_profiles_out("profiles.parquet").name
    'profiles.parquet'
    >>> check_profiles_out("profiles")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_wsdino.core.errors.DataError: --out profiles is not a profile file name: end it ...
    """
    out = Path(out)
    accepted = ", ".join(SUFFIXES)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: give a profile file to write in it, ending "
                        f"in one of {accepted}, e.g. --out {out / 'profiles.parquet'}.")
    if not out.name.lower().endswith(SUFFIXES + (".txt",)):
        raise DataError(f"--out {out} is not a profile file name: end it in one of {accepted}, "
                        f"e.g. --out {out.with_name(out.name + '.parquet')}.")
    return out


def _table_hash(table: pd.DataFrame) -> str:
    import pandas as pd

    cols = [c for c in ("plate", "well", "site") if c in table.columns]
    keys = table[cols].astype(str).agg("/".join, axis=1) if cols else pd.Series(range(len(table)))
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


def parts_manifest(models, crops: dict, table: pd.DataFrame, rows: np.ndarray, *, pooling: str,
                   windows: str, median: str, l2: bool, chunk_size: int,
                   precision: str = "auto", pos_embed: str | None = None) -> dict:
    """What a chunk depends on; a resume is refused when any of it changed."""
    return {
        "format": PARTS_FORMAT,
        "models": models.fingerprint(),
        "channels": list(models.channels),
        "crop": crops,
        "pooling": pooling,
        "windows": windows,
        "median": median,
        "l2": bool(l2),
        "chunk_size": chunk_size,
        **({"precision": precision} if precision != "auto" else {}),
        **({"pos_embed": pos_embed} if pos_embed not in (None, "timm") else {}),
        "n_fields": len(rows),
        "fields": _table_hash(table),
        "rows": hashlib.sha1(rows.tobytes()).hexdigest(),
    }


def _prepare_parts(parts: Path, manifest: dict, resume: bool) -> None:
    mfile = parts / "manifest.json"
    if parts.exists():
        old = json.loads(mfile.read_text()) if mfile.exists() else None
        if resume and old == manifest:
            return
        if resume and old is not None:
            changed = sorted(k for k in manifest.keys() | old.keys()
                             if old.get(k) != manifest.get(k))
            raise DataError(
                f"{parts} holds an unfinished embedding with different settings "
                f"({', '.join(changed)}). Delete it, or rerun without resuming "
                "(--overwrite) to start again."
            )
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    atomic_write_text(mfile, json.dumps(manifest, indent=2))


def chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk_{k:05d}.npy"


def load_chunk(parts: Path | None, k: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Chunk ``k`` from an earlier run or another rank, or ``None`` when it is not there
    (or is of another shape)."""
    if parts is None:
        return None
    path = chunk_path(parts, k)
    if not path.exists():
        return None
    feats = np.load(path)
    return feats if feats.shape == tuple(shape) else None


def save_chunk(parts: Path, k: int, feats: np.ndarray) -> None:
    """Write chunk ``k`` atomically: a crash leaves it whole or absent."""
    path = chunk_path(parts, k)
    tmp = unique_temp_path(path, suffix=".tmp.npy")  # two writers never share a temp file
    with remove_on_failure(tmp):
        np.save(tmp, feats)
        os.replace(tmp, path)


def _profile_suffix(path: Path) -> str:
    name = path.name.lower()
    return next(s for s in sorted(SUFFIXES + (".txt",), key=len, reverse=True)
                if name.endswith(s))


def shard_chunks(n_chunks: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The chunks rank ``rank`` of ``world_size`` embeds: every ``world_size``-th.

    Dealt round robin, so the ranks' shares differ by at most one chunk, and a resumed
    run may use another number of processes (the chunks, not the ranks, are on disk).

    Example
    -------
    >>> shard_chunks(5, 0, 2), shard_chunks(5, 1, 2)
    ([0, 2, 4], [1, 3])
    """
    return list(range(int(rank), int(n_chunks), max(int(world_size), 1)))


def write_profiles(table: ProfileTable, path: str | Path, provenance: dict | None = None) -> Path:
    """Write a profile table as Parquet, plus ``<stem>.json`` provenance, each to a
    temporary file renamed over the target (removed if writing fails)."""
    path = check_profiles_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique, hidden, and ending as ``path`` does (the writer picks the format by suffix)
    tmp = unique_temp_path(path, suffix=_profile_suffix(path))
    with remove_on_failure(tmp):
        table.write(tmp)
        os.replace(tmp, path)
    if provenance is not None:
        with atomic_write(path.with_suffix(".json"), "w") as fh:
            fh.write(json.dumps(provenance, indent=2))
    return path
