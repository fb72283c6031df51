"""Preprocessing in shards, split by plate, and their merge into one cache.

Shard ``I`` of ``N`` (numbered from 1) holds whole plates (:func:`split_plates`: the
plates dealt out so that the shards hold about as many fields each), so each plate's
illumination functions and its ``"plate"`` normalisation are made within one shard,
exactly as in one run. ``preprocess(..., shard=Shard(I, N))`` writes shard ``I`` into
``CACHE/shards/I-of-N/``: a resumable cache of its plates, recording the whole
dataset's field fingerprint and identity. Any scheduler can run the ``N`` shards side
by side (a SLURM array, Dask, a cluster's job runner; docs/cluster.md), into one cache
folder or separate ones; :func:`merge_shards` then copies the shards' rows into
``CACHE`` in the order of one run, and marks it complete last (one atomic write of
``cache.json``): the merged cache is the one an unsharded run makes, file for file.
An interrupted merge resumes, plate by plate, like preprocessing.

Example
-------
>>> Shard.parse("2/4")
Shard(index=2, count=4)
>>> for i in (1, 2):                                               # doctest: +SKIP
...     run_to_end(preprocess(meta, "cache/", shard=Shard(i, 2)))
>>> cache = run_to_end(merge_shards(meta, "cache/"))               # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Iterable

import numpy as np

from napari_wsdino.core.cache import (
    SETTINGS_FILE,
    Cache,
    illumination_file,
    image_file,
    open_cache,
)
from napari_wsdino.core.fsio import atomic_write, ensure_dir, first_missing_dir
from napari_wsdino.core.identity import dataset_identity
from napari_wsdino.core.metadata import DataError, Metadata
from napari_wsdino.core.preprocess.field import _probe_image
from napari_wsdino.core.preprocess.settings import STAGE, PreprocessSettings
from napari_wsdino.core.progress import Progress
from napari_wsdino.core.preprocess.state import (
    SHARDS_DIR,
    _check_files_unchanged,
    _create_state,
    _damage,
    _fingerprint,
    _finish,
    _fsync,
    _open_state,
    _repair,
    _settings_difference,
    _write_json,
)

if TYPE_CHECKING:
    import pandas as pd

_SPEC_HELP = "give I/N, shard I of N shards numbered from 1, e.g. --shard 1/4 ... --shard 4/4"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``1 <= index <= count``) of a screen's plates.

    Example
    -------
    >>> Shard(1, 2).folder("cache")
    PosixPath('cache/shards/1-of-2')
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard {self.index}/{self.count}: the number of shards N must "
                             f"be at least 1; {_SPEC_HELP}")
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count} does not exist: shards of "
                             f"{self.count} are numbered 1 to {self.count}; "
                             f"{_SPEC_HELP}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` as a :class:`Shard`; ``ValueError`` naming the problem and the fix."""
        parts = str(text).strip().split("/")
        try:
            index, count = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"shard {text!r} is not of the form I/N: {_SPEC_HELP}") from None
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def folder(self, out: str | Path) -> Path:
        """Where this shard is written inside cache folder ``out``."""
        return Path(out) / SHARDS_DIR / f"{self.index}-of-{self.count}"

    def plates(self, table: pd.DataFrame) -> list[str]:
        """This shard's plates, in the table's order."""
        return split_plates(table, self.count)[self.index - 1]

    def record(self, plates: list[str]) -> dict:
        """What a shard's ``cache.json`` records under ``"shard"``."""
        return {"index": self.index, "count": self.count, "plates": list(plates)}


def split_plates(table: pd.DataFrame, count: int) -> list[list[str]]:
    """The plates of each of ``count`` shards, each list in the table's order.

    Plates are dealt, most fields first, to the shard with the fewest fields so far
    (ties: the lowest shard), so shards hold about as many fields each; the split
    depends on the table alone, so every shard of a run computes the same one.

    Example
    -------
    >>> t = pd.DataFrame({"plate": ["a"] * 3 + ["b"] * 2 + ["c"] * 2})
    >>> split_plates(t, 2)
    [['a'], ['b', 'c']]
    """
    sizes = table.groupby("plate", sort=False).size()
    if count > len(sizes):
        raise DataError(
            f"{count} shards but the dataset has {len(sizes)} plates; shards split by "
            f"plate: use at most {len(sizes)} shards (--shard I/{len(sizes)})."
        )
    order = sorted(range(len(sizes)), key=lambda k: -int(sizes.iloc[k]))  # stable
    load, owner = [0] * count, {}
    for k in order:
        s = min(range(count), key=lambda j: (load[j], j))
        load[s] += int(sizes.iloc[k])
        owner[sizes.index[k]] = s
    return [[p for p in sizes.index if owner[p] == s] for s in range(count)]


def merge_shards(
    metadata: Metadata,
    out: str | Path,
    settings: PreprocessSettings = PreprocessSettings(),
    sources: Iterable[str | Path] = (),
) -> Generator[Progress, None, Cache]:
    """Merge the ``N`` finished shards of a screen into the cache ``out``.

    Parameters
    ----------
    metadata
        The screen the shards were made from (checked: fields, identity, files).
    out
        The cache folder to make; its ``shards/`` are removed once it is complete.
    settings
        The settings the shards were run with (checked against each shard).
    sources
        Where the shards are, when not in ``out/shards/``: shard folders, or folders
        holding a ``shards/`` folder (those are kept).

    Returns
    -------
    Cache
        The merged cache: the same files as one unsharded :func:`preprocess` run.

    Raises
    ------
    DataError
        A shard missing, unfinished or made otherwise (settings, fields, dataset).

    Example
    -------
    >>> cache = run_to_end(merge_shards(meta, "cache/"), print)     # doctest: +SKIP
    """
    out, sources = Path(out), [Path(s) for s in sources]
    table = metadata.table.reset_index(drop=True)
    channels = list(metadata.channels)
    record = settings.record(_probe_image(table, channels)[0])
    fingerprint = _fingerprint(table, channels)
    state = _open_state(out, record, channels, fingerprint, merging=True)
    if state is not None:  # a damaged merged cache is merged again from its shards
        _check_files_unchanged(out, state, table, channels)
        damage = _damage(out, state, channels)
        if damage and not sources and not (out / SHARDS_DIR).is_dir():
            raise DataError(
                f"Cache {out} is damaged ({'; '.join(f'{k} {v}' for k, v in damage.items())}) "
                f"and its shards were removed once merged: rerun them ('wsdino preprocess "
                f"DATA --out {out} --shard I/N' for I = 1 ... N) and merge again, or run "
                f"'wsdino preprocess DATA --out {out}' without --shard, to repair it.")
        state, repair = _repair(out, state, table, channels, fresh=lambda: _create_state(
            out, record, channels, fingerprint, len(table)))
        if repair:
            yield Progress(STAGE, 0, 1, repair, {"phase": "repair", "repair": repair})
    if state is not None and state.get("complete"):
        yield Progress(STAGE, 1, 1, f"{out} is already complete", {"phase": "done"})
        return open_cache(out)
    identity = dataset_identity(table, channels)
    shards = _find_shards(out, sources)
    owner = _owners(shards, table, channels, record, fingerprint, identity)
    if state is None:
        made = first_missing_dir(out)
        ensure_dir(out)
        state = _create_state(out, record, channels, fingerprint, len(table), made)
    state.setdefault("dataset_id", identity)
    _check_files_unchanged(out, state, table, channels)
    plates = list(dict.fromkeys(table["plate"]))
    next_row = sum(len(p["fields"]) for p in state["plates"].values())
    for k, plate in enumerate(plates):
        if plate not in state["plates"]:
            entry = shards[owner[plate]]["plates"][plate]
            next_row = _merge_plate(out, state, plate, owner[plate], entry, channels, next_row)
            yield Progress(STAGE, k + 1, len(plates), f"{plate}: merged from {owner[plate]}",
                           {"plate": plate, "phase": "merge"})
    cache = _finish(out, state, table, channels)
    if not sources:  # the shards made inside out/ are spent; others are not ours
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    yield Progress(STAGE, len(plates), len(plates),
                   f"{len(cache)} fields merged into {out}, "
                   f"{len(cache.settings['failed'])} left out", {"phase": "done"})
    return cache


def _merge_plate(out: Path, state: dict, plate: str, folder: Path, entry: dict,
                 channels: list[str], row: int) -> int:
    """Copy one plate's rows (its shard state ``entry``) and illumination functions from
    shard ``folder`` to rows ``row...`` of ``out``, and record the plate; the next row."""
    n, start = len(entry["fields"]), entry["start"]
    for ch in channels:
        src = np.load(image_file(folder, ch), mmap_mode="r")
        dst = np.load(image_file(out, ch), mmap_mode="r+")
        dst[row:row + n] = src[start:start + n]
        dst.flush()
        del src, dst
        fn = illumination_file(folder, plate, ch)
        if fn.exists():
            with atomic_write(illumination_file(out, plate, ch)) as fh:
                fh.write(fn.read_bytes())
    _fsync([str(image_file(out, ch)) for ch in channels])  # rows on disk before the record
    state["plates"][plate] = dict(entry, start=row)
    _write_json(out / SETTINGS_FILE, state)
    return row + n


def _find_shards(out: Path, sources: Iterable[str | Path]) -> dict[Path, dict | None]:
    """Shard folders (of ``out/shards/`` or of ``sources``) and their states (``None``:
    begun, nothing recorded yet)."""
    found: dict[Path, dict | None] = {}
    for root in [Path(s) for s in sources] or [out]:
        if (root / SHARDS_DIR).is_dir():  # (a merge begun there has a cache.json too)
            folders = sorted(p for p in (root / SHARDS_DIR).iterdir() if p.is_dir())
        elif (root / SETTINGS_FILE).exists():
            folders = [root]
        else:
            folders = []
        if not folders:
            raise DataError(
                f"{root} holds no preprocessing shards (no {SHARDS_DIR}/ folder): run "
                f"'wsdino preprocess DATA --out {root} --shard I/N' for I = 1 ... N first."
            )
        for folder in folders:
            path = folder / SETTINGS_FILE
            found[folder] = json.loads(path.read_text()) if path.exists() else None
    return found


def _owners(shards: dict[Path, dict | None], table: pd.DataFrame, channels: list[str],
            record: dict, fingerprint: str, identity: dict) -> dict[str, Path]:
    """The shard folder holding each plate, after checking that the shards are the
    ``N`` finished shards of this screen, made with these settings."""
    by_index: dict[Shard, Path] = {}
    for folder, state in shards.items():
        if state is None or not state.get("complete"):
            raise DataError(f"Shard {folder} is unfinished: rerun its 'wsdino preprocess "
                            "... --shard I/N' command (it resumes), then merge.")
        if "shard" not in state:
            raise DataError(f"{folder} is a cache, not a preprocessing shard; leave it out.")
        _check_shard(folder, state, channels, record, fingerprint, identity)
        shard = Shard(state["shard"]["index"], state["shard"]["count"])
        if shard in by_index:
            raise DataError(f"Shard {shard} is in both {by_index[shard]} and {folder}: "
                            "keep one of them.")
        by_index[shard] = folder
        _check_files_unchanged(folder, state, table, channels)
    counts = sorted({s.count for s in by_index})
    if len(counts) > 1:
        raise DataError(f"Shards of different splits ({' and '.join(map(str, counts))} "
                        "shards): delete the folders of the split you do not want.")
    missing = [str(Shard(i, counts[0])) for i in range(1, counts[0] + 1)
               if Shard(i, counts[0]) not in by_index]
    if missing:
        raise DataError(f"Shard(s) {', '.join(missing)} not found: run them "
                        f"('wsdino preprocess DATA --out CACHE --shard {missing[0]}'), "
                        "then merge.")
    owner = {plate: folder for folder in by_index.values() for plate in shards[folder]["plates"]}
    lacking = [p for p in dict.fromkeys(table["plate"]) if p not in owner]
    if lacking:
        raise DataError(f"No shard holds plate(s) {', '.join(map(str, lacking[:5]))}: the "
                        "shards were made from other fields; rerun them.")
    return owner


def _check_shard(folder: Path, state: dict, channels: list[str], record: dict,
                 fingerprint: str, identity: dict) -> None:
    """Refuse a shard made with other settings, of other fields or of another dataset."""
    diff = _settings_difference(state, record, channels)
    if diff:
        raise DataError(f"Shard {folder} was made with different settings ({diff}): "
                        "merge with the options the shards were run with.")
    if state.get("fingerprint") != fingerprint:
        raise DataError(f"Shard {folder} was made from a different set of fields (another "
                        "dataset, or other plates / --drop-missing): merge with the data "
                        "the shards were run on, or rerun the shard.")
    if state.get("dataset_id", {}).get("id") != identity["id"]:
        raise DataError(f"Shard {folder} was made from another copy of the dataset (its "
                        "sampled image files differ): rerun the shard on this data.")
