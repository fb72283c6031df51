"""Plan a fetch (sizes, partial files, free space) and run it: metadata, then each plate
downloaded, verified and unpacked; :func:`fetch_bbbc021` does it all in one go."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Sequence

from napari_wsdino.core.fetch.archive import (IncompleteArchiveError, adopt_existing,
                                             iter_verify_archive, plate_files, unpack_plate)
from napari_wsdino.core.fetch.http import download, remote_size
from napari_wsdino.core.fetch.options import (
    _PLATE_NAME,
    _RESUME_HINT,
    DOWNLOAD_DIR,
    ESTIMATED_ZIP_BYTES,
    METADATA_FILES,
    OPTIONAL_FILES,
    UNPACK_RATIO,
    FetchError,
    FetchOptions,
    archive_name,
    format_bytes,
)
from napari_wsdino.core.fetch.selection import select_plates
from napari_wsdino.core.metadata import IMAGE_CSV
from napari_wsdino.core.progress import Progress


@dataclass(frozen=True)
class PlateJob:
    """One plate of a plan: its archive, its size, what is already on disk."""

    plate: str
    archive: str
    url: str
    size: int | None
    have: int = 0
    complete: bool = False

    @property
    def expected_size(self) -> int:
        """Archive size in bytes; :data:`ESTIMATED_ZIP_BYTES` when the server did not say."""
        return self.size if self.size is not None else ESTIMATED_ZIP_BYTES


@dataclass(frozen=True)
class FetchPlan:
    """Which plates to fetch into ``dest``, how many bytes, how much space.

    Built by :func:`plan_fetch`; run by :func:`fetch_plates`.
    """

    dest: Path
    jobs: tuple[PlateJob, ...]
    options: FetchOptions = FetchOptions()
    free_bytes: int | None = None

    @property
    def pending(self) -> tuple[PlateJob, ...]:
        return tuple(j for j in self.jobs if not j.complete)

    @property
    def download_bytes(self) -> int:
        """Bytes still to download (partial files already on disk subtracted)."""
        return sum(max(j.expected_size - j.have, 0) for j in self.pending)

    @property
    def sizes_estimated(self) -> bool:
        return any(j.size is None for j in self.pending)

    @property
    def disk_needed(self) -> int:
        """Peak bytes needed in ``dest``: the unpacked plates plus the archives that
        are on disk at the same time (all of them with ``keep_zips``, else the largest)."""
        pending = self.pending
        if not pending:
            return 0
        unpacked = sum(int(j.expected_size * UNPACK_RATIO) for j in pending)
        remaining = [max(j.expected_size - j.have, 0) for j in pending]
        archives = sum(remaining) if self.options.keep_zips else max(remaining)
        return unpacked + archives

    def summary(self) -> str:
        """A few lines a user reads before saying yes."""
        done = len(self.jobs) - len(self.pending)
        approx = " (estimated: the server gave no sizes)" if self.sizes_estimated else ""
        lines = [
            f"BBBC021 into {self.dest} from {self.options.base_url}",
            f"  plates: {len(self.jobs)} selected, {done} already complete, "
            f"{len(self.pending)} to fetch",
            f"  download: {format_bytes(self.download_bytes)}{approx}",
            f"  disk needed: {format_bytes(self.disk_needed)}"
            + (f", free: {format_bytes(self.free_bytes)}" if self.free_bytes is not None else ""),
        ]
        return "\n".join(lines)


@dataclass
class FetchResult:
    """What a fetch did. ``failed`` maps plate -> error message."""

    dest: Path
    metadata: list[Path] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes_downloaded: int = 0


def fetch_metadata(
    dest: str | Path, options: FetchOptions = FetchOptions(), *, overwrite: bool = False,
) -> Generator[Progress, None, list[Path]]:
    """Fetch the metadata tables into ``dest`` (those already present are kept).

    Returns the paths present afterwards. A missing optional table (the compound
    list) is reported in an event and skipped.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    present: list[Path] = []
    n = len(METADATA_FILES)
    for i, name in enumerate(METADATA_FILES, 1):
        target = dest / name
        if target.exists() and not overwrite:
            present.append(target)
            yield Progress("metadata", i, n, f"{name} already present", {"file": name})
            continue
        url = options.url(name)
        try:
            yield from download(url, target, options=options)
        except FetchError as exc:
            if name in OPTIONAL_FILES:
                yield Progress("metadata", i, n, f"{name} skipped: {exc}", {"file": name})
                continue
            raise FetchError(
                f"Metadata {name}: {exc}", url=url) from None
        present.append(target)
        yield Progress("metadata", i, n, f"{name} fetched", {"file": name, "url": url})
    return present


def plan_fetch(
    dest: str | Path,
    plates: Sequence[str],
    options: FetchOptions = FetchOptions(),
    *,
    probe: bool = True,
    disk_usage: Callable = shutil.disk_usage,
) -> FetchPlan:
    """Work out what to download: skip complete plates, ask the server for sizes
    (``HEAD``; estimates where it won't say), note partial files, read free space.

    Plates found unpacked by hand with every file the image CSV lists are marked
    complete (:func:`adopt_existing`) instead of being downloaded again.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    downloads = dest / DOWNLOAD_DIR
    jobs = []
    for plate in plates:
        if not _PLATE_NAME.match(plate):
            raise FetchError(f"{plate!r} is not a plate name.", plate=plate)
        name = archive_name(plate)
        url = options.url(name)
        if adopt_existing(dest, plate):
            jobs.append(PlateJob(plate, name, url, None, complete=True))
            continue
        whole, part = downloads / name, downloads / (name + ".part")
        size = remote_size(url, options.timeout) if probe else None
        if whole.exists():
            have = whole.stat().st_size
            size = have if size is None else size
        else:
            have = part.stat().st_size if part.exists() else 0
        jobs.append(PlateJob(plate, name, url, size, have=have))
    free = disk_usage(dest).free
    return FetchPlan(dest=dest, jobs=tuple(jobs), options=options, free_bytes=free)


def check_space(plan: FetchPlan) -> None:
    """Raise :class:`FetchError` if ``plan.dest`` has too little free space."""
    if plan.free_bytes is not None and plan.disk_needed > plan.free_bytes:
        approx = " (sizes estimated)" if plan.sizes_estimated else ""
        raise FetchError(
            f"Not enough disk space in {plan.dest}: fetching {len(plan.pending)} plate(s) "
            f"needs about {format_bytes(plan.disk_needed)}{approx} "
            f"(archives plus unpacked images), {format_bytes(plan.free_bytes)} is free. "
            "Free some space, choose fewer plates (--plates), or pick another folder."
        )


def fetch_plates(plan: FetchPlan) -> Generator[Progress, None, FetchResult]:
    """Download, verify and unpack the plates of a plan, one after the other.

    A plate that fails is reported, left incomplete (its ``.part`` kept for resuming
    when the transfer failed) and the next plate is fetched; at the end
    :class:`FetchError` lists every failed plate. Events: ``stage="fetch"`` with
    ``step``/``total`` the overall bytes and ``info`` = ``plate, file, phase``
    (``download``/``verify``/``unpack``), ``file_done``, ``file_total``,
    ``plate_index``, ``plates``.
    """
    dest, options = plan.dest, plan.options
    result = FetchResult(dest=dest)
    downloads = dest / DOWNLOAD_DIR
    pending = plan.pending
    result.skipped = [j.plate for j in plan.jobs if j.complete]
    overall_total = sum(j.expected_size for j in pending)
    base = 0  # bytes of the plates already handled in this run

    for index, job in enumerate(pending, 1):
        info = {"plate": job.plate, "file": job.archive, "url": job.url,
                "plate_index": index, "plates": len(pending)}

        def on_bytes(done, total, _info=info, _base=base):
            file_total = total or 0
            return Progress(
                "fetch", _base + done, max(overall_total, _base + done),
                f"{_info['plate']} ({_info['plate_index']}/{_info['plates']}): "
                f"{format_bytes(done)} of {format_bytes(total)}",
                dict(_info, phase="download", file_done=done, file_total=file_total),
            )

        try:
            record = yield from _fetch_one(job, downloads, options, on_bytes, info,
                                           lambda: base + job.expected_size, overall_total)
            try:
                yield from (
                    _wrap_unpack(ev, info, base + job.expected_size, overall_total)
                    for ev in unpack_plate(downloads / job.archive, dest, job.plate,
                                           record=record,
                                           expected=plate_files(dest / IMAGE_CSV, job.plate))
                )
            except IncompleteArchiveError:
                (downloads / job.archive).unlink(missing_ok=True)  # a rerun fetches it anew
                raise
        except FetchError as exc:
            msg = str(exc)
            if job.plate not in msg:
                msg = f"Plate {job.plate} ({job.url}): {msg}"
            elif job.url not in msg:
                msg = f"{msg} [{job.url}]"
            result.failed[job.plate] = msg
            yield Progress("fetch", base + job.expected_size, overall_total,
                           f"{job.plate} FAILED: {msg}", dict(info, phase="failed", error=msg))
        else:
            if not options.keep_zips:
                (downloads / job.archive).unlink(missing_ok=True)
            result.completed.append(job.plate)
            result.bytes_downloaded += max(job.expected_size - job.have, 0)
        base += job.expected_size

    if downloads.exists() and not any(downloads.iterdir()):
        downloads.rmdir()
    if result.failed:
        lines = "\n  ".join(result.failed.values())
        raise FetchError(
            f"{len(result.failed)} of {len(pending)} plate(s) failed "
            f"({len(result.completed)} fetched, {len(result.skipped)} already complete):\n  "
            f"{lines}\nFinished plates are kept; {_RESUME_HINT}.",
            plate=next(iter(result.failed)),
            url=next(j.url for j in pending if j.plate in result.failed),
        )
    return result


def _wrap_unpack(ev: Progress, info: dict, step: int, total: int) -> Progress:
    return Progress("fetch", step, max(total, step), f"unpacking {ev.message}",
                    dict(info, phase="unpack", file_done=ev.step, file_total=ev.total))


def _fetch_one(job: PlateJob, downloads: Path, options: FetchOptions, on_bytes, info,
               step_after, overall_total) -> Generator[Progress, None, dict]:
    """Download and verify one archive; a damaged one is fetched once more from scratch."""
    target = downloads / job.archive
    sha = options.sha256(job.archive)
    for fresh in (False, True):
        if not target.exists():
            yield from download(job.url, target, expected_size=job.size, options=options,
                                plate=job.plate, on_bytes=on_bytes)
        try:
            checks = iter_verify_archive(target, sha)
            while True:
                try:
                    done, total = next(checks)
                except StopIteration as stop:
                    digest = stop.value
                    break
                yield Progress("fetch", step_after(), max(overall_total, step_after()),
                               f"{job.plate}: verifying {job.archive}",
                               dict(info, phase="verify", file_done=done, file_total=total))
        except FetchError as exc:
            target.unlink(missing_ok=True)
            if not fresh:
                continue
            raise FetchError(
                f"Plate {job.plate}: {exc}, also after a fresh download of {job.url}. "
                f"The damaged archive was deleted and nothing was unpacked; plate "
                f"{job.plate} is not marked complete. {_RESUME_HINT[0].upper()}{_RESUME_HINT[1:]}, "
                "or use a mirror (--base-url).",
                plate=job.plate, url=job.url,
            ) from None
        return {"archive": job.archive, "url": job.url, "bytes": target.stat().st_size,
                "sha256": digest}
    raise AssertionError("unreachable")  # pragma: no cover


def fetch_bbbc021(
    dest: str | Path,
    *,
    plates: Sequence[str] | None = None,
    subset: str | None = None,
    all_plates: bool = False,
    metadata_only: bool = False,
    options: FetchOptions = FetchOptions(),
    disk_usage: Callable = shutil.disk_usage,
) -> Generator[Progress, None, FetchResult]:
    """Fetch BBBC021 into ``dest`` in one go: metadata, plan, space check, plates.

    This is what the Data panel runs in a worker (stop it between two events with
    the worker's ``quit()``; a rerun resumes). The CLI runs the same steps one by
    one so that it can ask before a large download.

    Parameters
    ----------
    dest
        Target folder (created).
    plates, subset, all_plates
        The plate choice, see :func:`select_plates`.
    metadata_only
        Fetch the metadata tables and stop.
    options
        Base URL, retries, timeouts, hashes: :class:`FetchOptions`.
    disk_usage
        ``shutil.disk_usage`` or a stand-in (tests).

    Returns
    -------
    FetchResult

    Raises
    ------
    FetchError
        Unknown plates, too little space, or plates that failed (each named with
        its URL); finished plates are kept and a rerun resumes the rest.

    Example
    -------
    >>> gen = fetch_bbbc021("BBBC021", subset="moa")  # doctest: +SKIP
    >>> result = run_to_end(gen, print)  # doctest: +SKIP
    """
    dest = Path(dest)
    metadata = yield from fetch_metadata(dest, options)
    if metadata_only:
        return FetchResult(dest=dest, metadata=metadata)
    names = select_plates(dest, plates=plates, subset=subset, all_plates=all_plates)
    yield Progress("fetch", 0, 0, f"asking {options.base_url} for the sizes of "
                   f"{len(names)} archive(s)", {"phase": "plan"})
    plan = plan_fetch(dest, names, options, disk_usage=disk_usage)
    check_space(plan)
    result = yield from fetch_plates(plan)
    result.metadata = metadata
    return result


__all__ = [
    "FetchPlan",
    "FetchResult",
    "PlateJob",
    "check_space",
    "fetch_bbbc021",
    "fetch_metadata",
    "fetch_plates",
    "plan_fetch",
]
