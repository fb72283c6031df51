"""Which dataset a cache was made from: a fingerprint of the image table and a few files.

Plate, well and site names do not identify a dataset: two synthetic replicas of different
seeds, or two copies of a screen processed differently, share them. The identity a cache
records (``cache.json`` key ``dataset_id``) is therefore a digest of the field table
(metadata columns and image file names) plus the digests of a few sampled image files
(their first MiB and their size). :func:`check_dataset` tells whether an open dataset is
the one a cache was made from, reading only those few files; it does not depend on where
the data lives (a moved folder is the same dataset) nor on which fields were opened (a
subset of the screen is checked on the sampled fields it holds).

Example
-------
>>> ident = dataset_identity(metadata.table, metadata.channels)      # doctest: +SKIP
>>> check_dataset(ident, other.table, other.channels).same            # doctest: +SKIP
False
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import json

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

IDENTITY_VERSION = 1
#: Fields whose files are sampled, spread evenly over the table.
SAMPLE_FIELDS = 4
#: Bytes of each sampled file that are hashed (with its size).
SAMPLE_BYTES = 1 << 20
KEY_COLUMNS = ("plate", "well", "site", "compound", "concentration")
#: What a synthetic replica folder says about itself (``core.synth`` writes it): version,
#: layout, subset, size, seed and knobs.
REPLICA_FILE = "replica.json"


def read_replica_info(root: str | Path) -> dict | None:
    """The :data:`REPLICA_FILE` record of a replica folder; ``None`` for other data (a real
    screen) or a replica written before records existed (``v1``)."""
    path = Path(root) / REPLICA_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def file_digest(path: str | Path, nbytes: int = SAMPLE_BYTES) -> str | None:
    """SHA-256 (16 hex digits) of a file's size and first ``nbytes``; ``None`` if unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(nbytes)
            size = fh.seek(0, 2)
    except OSError:
        return None
    return hashlib.sha256(f"{size}|".encode() + head).hexdigest()[:16]


def table_digest(table: pd.DataFrame, channels: Sequence[str]) -> str:
    """Digest of the field table: metadata columns and image file *names* (not folders)."""
    cols = [c for c in KEY_COLUMNS if c in table]
    names = [table[f"path_{c}"].astype(str).map(lambda p: Path(p).name) for c in channels
             if f"path_{c}" in table]
    text = table[cols].astype(str).to_csv(index=False) + "|" + ",".join(channels)
    for series in names:
        text += "|" + ",".join(series)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def replica_version(table: pd.DataFrame, channels: Sequence[str]) -> str | None:
    """The synthetic replica version of a field table's data (its ``replica.json``, found
    a few folders above the first image), or ``None`` for other data."""
    for channel in channels:
        column = f"path_{channel}"
        if column in table and len(table):
            for folder in list(Path(str(table[column].iloc[0])).parents)[:4]:
                info = read_replica_info(folder)
                if info is not None:
                    return str(info.get("replica"))
            return None
    return None


def dataset_identity(table: pd.DataFrame, channels: Sequence[str],
                     n_fields: int = SAMPLE_FIELDS) -> dict:
    """The identity a cache records for the dataset (table) it was made from.

    Returns ``{"version", "id", "table", "sample"}``: ``id`` a short digest of the whole,
    ``sample`` one entry per sampled field and channel (plate, well, site, channel, file
    name, digest). Files that cannot be read are left out of the sample. A synthetic
    replica adds ``"replica"``: its version (``v1``, ``v2``), part of the ``id`` too.

    Example
    -------
    >>> dataset_identity(meta.table, meta.channels)["id"]              # doctest: +SKIP
    '3f9c0a1e77b2d145'
    """
    table = table.reset_index(drop=True)
    rows = np.unique(np.linspace(0, len(table) - 1, num=min(n_fields, len(table))).round()
                     .astype(int)) if len(table) else []
    sample = []
    for i in rows:
        row = table.iloc[int(i)]
        for channel in channels:
            path = row.get(f"path_{channel}")
            digest = file_digest(path) if path is not None else None
            if digest is not None:
                sample.append({"plate": str(row.plate), "well": str(row.well),
                               "site": int(row.site), "channel": channel,
                               "file": Path(str(path)).name, "digest": digest})
    tdigest = table_digest(table, channels)
    whole = tdigest + "|" + ",".join(s["digest"] for s in sample)
    replica = replica_version(table, channels)
    if replica is not None:
        whole += f"|replica {replica}"
    ident = {"version": IDENTITY_VERSION, "id": hashlib.sha256(whole.encode()).hexdigest()[:16],
             "table": tdigest, "sample": sample}
    return ident if replica is None else {**ident, "replica": replica}


@dataclass(frozen=True)
class DatasetCheck:
    """Outcome of :func:`check_dataset`: ``same`` is True, False, or None (not recorded)."""

    same: bool | None
    reason: str

    def __bool__(self) -> bool:
        return self.same is not False


def check_dataset(identity: dict | None, table: pd.DataFrame,
                  channels: Sequence[str]) -> DatasetCheck:
    """Is ``table`` (an open dataset) the dataset ``identity`` (a cache's record) was made of?

    Each sampled file of the identity that the open dataset also holds (same plate, well,
    site and channel) must have the same name and digest. None held: another dataset.
    No identity recorded (a cache written before identities existed): ``same is None``.
    """
    if not identity or not identity.get("sample"):
        return DatasetCheck(None, "the cache records no dataset identity (matched by plate, "
                                  "well and site only)")
    t = table.reset_index(drop=True)
    recorded = identity.get("replica")
    if recorded is not None:
        here = replica_version(t, channels)
        if here != recorded:
            return DatasetCheck(False, f"the cache was made from synthetic replica {recorded}, "
                                       f"this dataset is {'replica ' + here if here else 'not that replica'}")
    where = {(str(p), str(w), int(s)): i for i, (p, w, s) in
             enumerate(zip(t.plate, t.well, t.site))}
    checked = 0
    for entry in identity["sample"]:
        i = where.get((entry["plate"], entry["well"], int(entry["site"])))
        column = f"path_{entry['channel']}"
        if i is None or column not in t:
            continue
        path = str(t[column].iloc[i])
        field = f"{entry['plate']} {entry['well']} site {entry['site']} ({entry['channel']})"
        if Path(path).name != entry["file"]:
            return DatasetCheck(False, f"field {field} is file {entry['file']} in the cache's "
                                       f"dataset but {Path(path).name} here")
        digest = file_digest(path)
        if digest is None:
            continue
        if digest != entry["digest"]:
            return DatasetCheck(False, f"the image of field {field} differs from the one "
                                       "the cache was made from")
        checked += 1
    if not checked:
        return DatasetCheck(False, "none of the fields the cache sampled is in this dataset")
    return DatasetCheck(True, f"same dataset ({checked} sampled files match)")
