"""Download, verify and unpack the real BBBC021 plates (Caie et al. 2010).

The Broad Bioimage Benchmark Collection (Ljosa et al. 2012) publishes BBBC021 as
one zip per plate, ``BBBC021_v1_images_<plate>.zip`` (unpacking to
``<plate>/<file>.tif``), plus the metadata tables ``BBBC021_v1_image.csv``,
``BBBC021_v1_compound.csv`` and ``BBBC021_v1_moa.csv`` (Ljosa et al. 2013). This
module fetches them into a folder ``DEST`` laid out the way
:func:`napari_wsdino.core.metadata.load_metadata` reads it::

    DEST/BBBC021_v1_image.csv
    DEST/BBBC021_v1_moa.csv
    DEST/BBBC021_v1_compound.csv
    DEST/<plate>/<file>.tif         one folder per plate, with a .complete marker
    DEST/.downloads/                 partial (.part) and kept archives

What it guarantees:

- **Resumable.** Archives are written to ``.part`` files and resumed with HTTP
  ``Range`` requests, after a dropped connection or in a later run.
- **Verified.** Size against ``Content-Length``; SHA-256 where a hash is known
  (:data:`KNOWN_SHA256`, or a manifest read with :func:`load_manifest`);
  :meth:`zipfile.ZipFile.testzip` always.
- **Never half-complete.** A plate is unpacked into a temporary folder inside
  ``DEST``, given its ``.complete`` marker, and only then renamed to
  ``DEST/<plate>``; a rerun skips plates that have the marker.
- **Space checked first**, with :func:`shutil.disk_usage`.

Long work is a generator of :class:`~napari_wsdino.core.progress.Progress`
events (``stage="fetch"``; ``step``/``total`` are overall bytes, ``info`` holds
the current file's numbers) that returns a :class:`FetchResult`. The CLI drives it
with a progress bar; the napari edge runs it in a worker.

Example
-------
>>> from napari_wsdino.core.fetch import fetch_bbbc021, FetchOptions
>>> from napari_wsdino.core.progress import run_to_end
>>> result = run_to_end(fetch_bbbc021("BBBC021", plates=["Week1_22123"]))  # doctest: +SKIP
>>> result.completed  # doctest: +SKIP
['Week1_22123']
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Generator, Mapping, Sequence

import pandas as pd

from napari_wsdino import __version__
from napari_wsdino.core.fsio import describe_os_error
from napari_wsdino.core.metadata import (
    IMAGE_CSV,
    MOA_CSV,
    DataError,
    ScreenLayout,
    bundled_metadata_dir,
)
from napari_wsdino.core.progress import Progress

DEFAULT_BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC021/"
COMPOUND_CSV = "BBBC021_v1_compound.csv"
#: Metadata tables, fetched before any plate. The compound table (SMILES) is not
#: needed by the loader, so a mirror without it is accepted.
METADATA_FILES: tuple[str, ...] = (IMAGE_CSV, MOA_CSV, COMPOUND_CSV)
OPTIONAL_FILES: frozenset[str] = frozenset({COMPOUND_CSV})
SUBSETS = ("moa",)
COMPLETE_MARKER = ".complete"
DOWNLOAD_DIR = ".downloads"
#: Used when the server does not say how big an archive is: the full set is about
#: 40 GB zipped over 55 plates; rounded up so the space check errs on the safe side.
ESTIMATED_ZIP_BYTES = 800_000_000
#: Unpacked size / zipped size. A field's TIFF is 1024 x 1280 x 2 bytes = 2.6 MB and a
#: plate holds ~720 of them (1.9 GB) against ~0.73 GB zipped. The exact figure is
#: checked again from the archive's own table before each plate is unpacked.
UNPACK_RATIO = 2.8
#: SHA-256 of the official files, by file name. The Broad does not publish hashes, so
#: this starts empty; fill it (or pass ``FetchOptions(hashes=...)``) from a manifest
#: written on a machine with a verified copy (:func:`load_manifest`,
#: :func:`manifest_from_dest`).
KNOWN_SHA256: dict[str, str] = {}

_PLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_RESUME_HINT = "rerun the same command (or press Fetch again in the Data panel) to resume"


class FetchError(DataError):
    """A download, check or unpack failed. ``plate`` and ``url`` name what failed."""

    def __init__(self, message: str, plate: str | None = None, url: str | None = None):
        super().__init__(message)
        self.plate = plate
        self.url = url


@dataclass(frozen=True)
class FetchOptions:
    """How to download: where from, how patiently, what to keep.

    Parameters
    ----------
    base_url
        Folder URL holding the BBBC021 files (default: the Broad's; any mirror with
        the same file names works, including ``file://`` URLs).
    retries
        Extra attempts per file after a failed or short transfer; each resumes from
        the partial file.
    retry_wait
        Seconds before the first retry; doubled for each further one (capped at 60).
    timeout
        Seconds a connection may stay silent before it counts as dropped.
    chunk_size
        Bytes between two progress events of one file.
    keep_zips
        Keep the archives in ``DEST/.downloads`` after unpacking.
    hashes
        Known SHA-256 by file name, on top of :data:`KNOWN_SHA256`.
    """

    base_url: str = DEFAULT_BASE_URL
    retries: int = 5
    retry_wait: float = 2.0
    timeout: float = 60.0
    chunk_size: int = 1 << 20
    keep_zips: bool = False
    hashes: Mapping[str, str] = field(default_factory=dict)

    def url(self, name: str) -> str:
        """URL of one file of the set."""
        return self.base_url.rstrip("/") + "/" + name

    def sha256(self, name: str) -> str | None:
        """Known hash of a file, or ``None``."""
        known = self.hashes.get(name) or KNOWN_SHA256.get(name)
        return known.lower() if known else None


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


# --------------------------------------------------------------------------- names


def archive_name(plate: str) -> str:
    """Official archive of one plate: ``BBBC021_v1_images_<plate>.zip``."""
    return f"BBBC021_v1_images_{plate}.zip"


def format_bytes(n: int | float | None) -> str:
    """``1.2 GB`` style (decimal units, as the BBBC page quotes sizes)."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def plates_in_csv(image_csv: str | Path, layout: ScreenLayout = ScreenLayout()) -> list[str]:
    """Sorted plate names of an image CSV (its ``Image_Metadata_Plate_DAPI`` column)."""
    image_csv = Path(image_csv)
    try:
        table = pd.read_csv(image_csv, usecols=[layout.plate_column])
    except FileNotFoundError:
        raise FetchError(f"File not found: {image_csv}.") from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise FetchError(
            f"Cannot read the plate column {layout.plate_column!r} of {image_csv}: {exc}. "
            "Delete the file and fetch the metadata again."
        ) from None
    return sorted(table[layout.plate_column].dropna().astype(str).unique())


def bundled_plates() -> list[str]:
    """The 55 plates of the bundled WS-DINO (MoA-annotated + DMSO) field table."""
    return plates_in_csv(bundled_metadata_dir() / IMAGE_CSV)


def is_plate_complete(dest: str | Path, plate: str) -> bool:
    """Whether ``dest/<plate>`` was fully unpacked (has its ``.complete`` marker)."""
    return (Path(dest) / plate / COMPLETE_MARKER).is_file()


def select_plates(
    dest: str | Path,
    plates: Sequence[str] | None = None,
    subset: str | None = None,
    all_plates: bool = False,
) -> list[str]:
    """Resolve the plate choice into names.

    Parameters
    ----------
    dest
        Target folder; with ``all_plates`` its ``BBBC021_v1_image.csv`` (the official
        table, fetched first) lists the plates.
    plates
        Explicit plate names, checked against the known plates.
    subset
        ``"moa"``: the plates of the bundled MoA-annotated field table.
    all_plates
        Every plate of the official image CSV in ``dest``.

    Raises
    ------
    FetchError
        No choice, more than one choice, or an unknown plate name.
    """
    chosen = sum([bool(plates), subset is not None, bool(all_plates)])
    if chosen != 1:
        raise FetchError(
            "Choose the plates in exactly one way: a list of plates "
            "(CLI: --plates Week1_22123 ...), the MoA subset (--subset moa) or every "
            "plate (--all)."
        )
    dest = Path(dest)
    if subset is not None:
        if subset not in SUBSETS:
            raise FetchError(f"Unknown subset {subset!r}; known subsets: {list(SUBSETS)}.")
        return bundled_plates()
    official = dest / IMAGE_CSV
    if all_plates:
        if not official.exists():
            raise FetchError(
                f"{official} is missing: fetch the metadata first (it lists the plates)."
            )
        return plates_in_csv(official)
    known = set(bundled_plates())
    if official.exists():
        known |= set(plates_in_csv(official))
    out: list[str] = []
    for name in plates:
        name = str(name).strip()
        if name.startswith("BBBC021_v1_images_"):
            name = name[len("BBBC021_v1_images_"):]
        name = name.removesuffix(".zip")
        if not _PLATE_NAME.match(name) or name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise FetchError(
                f"Unknown plate {name!r}.{hint} Plate names look like Week1_22123; "
                "`wsdino info` on the bundled metadata lists them."
            )
        if name not in out:
            out.append(name)
    return out


# --------------------------------------------------------------------------- manifest


def load_manifest(path: str | Path) -> dict[str, str]:
    """Read known SHA-256 hashes: JSON ``{file name: hex}`` or ``sha256sum`` output.

    Example
    -------
    >>> hashes = load_manifest("BBBC021.sha256")  # doctest: +SKIP
    >>> options = FetchOptions(hashes=hashes)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FetchError(f"Cannot read manifest {path}: {exc}") from None
    hashes: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FetchError(f"Manifest {path} is not valid JSON: {exc}") from None
        items = data.items()
    else:
        items = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise FetchError(f"Manifest {path}: cannot read line {line!r}.")
            items.append((parts[1].lstrip("*").strip(), parts[0]))
    for name, digest in items:
        digest = str(digest).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise FetchError(f"Manifest {path}: {name!r} has no SHA-256 hex digest.")
        hashes[PurePosixPath(str(name)).name] = digest
    return hashes


def manifest_from_dest(dest: str | Path) -> dict[str, str]:
    """Hashes recorded in the ``.complete`` markers of ``dest``: archive -> SHA-256.

    Write them with ``json.dumps`` to share a manifest for later fetches.
    """
    out = {}
    for marker in sorted(Path(dest).glob(f"*/{COMPLETE_MARKER}")):
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("archive") and info.get("sha256"):
            out[info["archive"]] = info["sha256"]
    return out


# --------------------------------------------------------------------------- HTTP


def _request(url: str, method: str = "GET", headers: Mapping[str, str] | None = None):
    hdrs = {"User-Agent": f"napari-wsdino/{__version__}", "Accept-Encoding": "identity"}
    hdrs.update(headers or {})
    return urllib.request.Request(url, method=method, headers=hdrs)


def remote_size(url: str, timeout: float = 30.0) -> int | None:
    """Size of a remote file from a ``HEAD`` request, ``None`` if the server won't say.

    Raises
    ------
    FetchError
        The server answers 404 (the file is not there), or does not answer within
        ``timeout`` (a stalled server would stall the download too; guessing a size
        instead would hide it, once per plate).
    """
    try:
        with urllib.request.urlopen(_request(url, "HEAD"), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FetchError(
                f"{url} does not exist (HTTP 404). Check --base-url: it must be the "
                "folder holding the BBBC021 files.", url=url,
            ) from None
        return None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(
                reason, (TimeoutError, socket.timeout)):
            raise FetchError(
                f"The server did not answer a size request for {url} within {timeout:g} s "
                "(stalled or unreachable): check the connection and --base-url and rerun, "
                "or allow longer with --timeout.", url=url,
            ) from None
        return None
    try:
        return int(length) if length is not None else None
    except ValueError:
        return None


class _Retry(Exception):
    """One attempt of a transfer failed in a way a retry may mend."""


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    if not value:
        return None
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _transfer(
    url: str, part: Path, have: int, expected: int | None, options: FetchOptions,
    event: Callable[[int, int | None], Progress],
) -> Generator[Progress, None, int | None]:
    """One attempt: append from byte ``have`` of ``url`` to ``part``; return the total
    size the server announced (``None`` if it did not). Raises :class:`_Retry`."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(_request(url, headers=headers), timeout=options.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Range past the end: the partial file is already whole, or too long.
            span = exc.headers.get("Content-Range", "") if exc.headers else ""
            m = re.search(r"/(\d+)", span)
            total = int(m.group(1)) if m else expected
            if total is not None and have == total:
                return total
            part.unlink(missing_ok=True)
            raise _Retry(f"server refused to resume at byte {have} (HTTP 416)") from None
        if exc.code in (404, 403, 410):
            raise FetchError(f"HTTP {exc.code} {exc.reason}", url=url) from None
        raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
    with resp:
        status = getattr(resp, "status", 200)
        ctype = (resp.headers.get("Content-Type") or "").lower()
        if ctype.startswith("text/html") and not url.lower().endswith((".htm", ".html")):
            raise FetchError(
                "the server answered with a web page instead of the file (the download "
                "layout may have changed, or a login or error page is in the way)"
            )
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        mode = "ab"
        if have and status == 206:
            span = _content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != have:
                part.unlink(missing_ok=True)
                raise _Retry("server resumed at the wrong byte "
                             f"({resp.headers.get('Content-Range')})")
            total = span[1]
            if total is None and length is not None:
                total = have + length
        else:
            if have:
                # The server ignored the Range header and sends the whole file.
                have, mode = 0, "wb"
            total = length
        got = have
        last = have
        try:
            with open(part, mode) as fh:
                while True:
                    try:
                        chunk = resp.read1(options.chunk_size)
                    except (TimeoutError, socket.timeout) as exc:
                        raise _Retry(f"connection silent for {options.timeout:g} s ({exc})") from None
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Retry(f"connection dropped ({type(exc).__name__}: {exc})") from None
                    if not chunk:
                        break
                    fh.write(chunk)
                    got += len(chunk)
                    if got - last >= options.chunk_size:
                        last = got
                        fh.flush()
                        yield event(got, total)
        except OSError as exc:  # the disk, not the network: name the file (write() names none)
            if exc.filename is None and exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, str(part)) from None
            raise
        yield event(got, total)
        if total is not None and got < total:
            raise _Retry(f"connection closed after {got} of {total} bytes")
        if total is not None and got > total:
            part.unlink(missing_ok=True)
            raise _Retry(f"server sent {got} bytes, more than the announced {total}")
        return total


def download(
    url: str,
    target: str | Path,
    *,
    expected_size: int | None = None,
    options: FetchOptions = FetchOptions(),
    plate: str | None = None,
    on_bytes: Callable[[int, int | None], Progress] | None = None,
) -> Generator[Progress, None, Path]:
    """Download ``url`` to ``target`` through ``target.part``, resuming with ``Range``.

    A partial ``.part`` file left by an earlier run or attempt is continued, not
    restarted. After ``options.retries`` failed attempts the ``.part`` file is kept
    and :class:`FetchError` says how to resume.

    Yields
    ------
    Progress
        ``stage="download"``, ``step``/``total`` the bytes of this file (or what
        ``on_bytes(done, total)`` makes of them).

    Returns
    -------
    Path
        ``target``, complete (size checked against the server's length).
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name

    def event(done: int, total: int | None) -> Progress:
        if on_bytes is not None:
            return on_bytes(done, total)
        return Progress("download", done, total or 0, f"{name} {format_bytes(done)}",
                        {"file": name, "plate": plate, "url": url})

    last_error = "no attempt made"
    attempts = options.retries + 1
    for attempt in range(attempts):
        if attempt:
            # Wait before a retry, yielding so that a stopped worker stops here too.
            have = part.stat().st_size if part.exists() else 0
            yield from _pause(min(options.retry_wait * 2 ** (attempt - 1), 60.0),
                              event(have, expected_size))
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        if expected_size is not None and have == expected_size and have > 0:
            break
        try:
            total = yield from _transfer(url, part, have, expected_size, options, event)
        except _Retry as exc:
            last_error = str(exc)
            continue
        except FetchError as exc:
            raise FetchError(
                f"{_who(plate)}cannot download {url}: {exc}. Check the URL and --base-url.",
                plate=plate, url=url,
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            disk = describe_os_error(exc) if isinstance(exc, OSError) and exc.filename else None
            if disk:  # our disk (full, read-only): retrying would not mend it
                raise FetchError(f"{_who(plate)}{disk}", plate=plate, url=url) from None
            if isinstance(reason, FileNotFoundError):  # file:// mirror without the file
                raise FetchError(f"{_who(plate)}{url} does not exist. Check --base-url.",
                                 plate=plate, url=url) from None
            last_error = f"{type(exc).__name__}: {reason}"
            continue
        if total is not None:
            expected_size = total
        break
    else:
        have = part.stat().st_size if part.exists() else 0
        of = f" of {expected_size}" if expected_size is not None else ""
        kept = (f"{have}{of} bytes are kept in {part}; {_RESUME_HINT}" if have
                else f"nothing was downloaded; check the connection and {_RESUME_HINT}")
        raise FetchError(
            f"{_who(plate)}download of {url} failed after {attempts} attempt(s): "
            f"{last_error}. {kept}.",
            plate=plate, url=url,
        )
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:  # pragma: no cover - guarded above
        raise FetchError(
            f"{_who(plate)}{url}: got {size} of {expected_size} bytes; {_RESUME_HINT}.",
            plate=plate, url=url)
    os.replace(part, target)
    return target


def _pause(seconds: float, event: Progress) -> Generator[Progress, None, None]:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
        yield event


def _who(plate: str | None) -> str:
    return f"Plate {plate}: " if plate else ""


# --------------------------------------------------------------------------- verify, unpack


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_archive(path: str | Path, sha256: str | None = None) -> str:
    """Check an archive: SHA-256 when known, and a full zip test always.

    Returns
    -------
    str
        The archive's SHA-256.

    Raises
    ------
    FetchError
        Hash mismatch, not a zip, or a member whose CRC does not match.
    """
    gen = iter_verify_archive(path, sha256)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def iter_verify_archive(
    path: str | Path, sha256: str | None = None, chunk: int = 1 << 24,
) -> Generator[tuple[int, int], None, str]:
    """:func:`verify_archive` as a generator of ``(done, total)`` steps (bytes hashed,
    then bytes tested), so that a worker can report it and stop between steps."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
            done += len(block)
            yield done, 2 * size
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise FetchError(f"{path.name}: SHA-256 {digest} does not match the known {sha256}")
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                # Reading a member to its end checks its CRC (what ZipFile.testzip does).
                try:
                    with zf.open(info) as member:
                        while member.read(chunk):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise FetchError(
                        f"{path.name} is damaged: member {info.filename} fails its CRC "
                        f"check ({exc})"
                    ) from None
                done = min(done + info.compress_size, 2 * size)
                yield done, 2 * size
        yield 2 * size, 2 * size
    except FetchError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise FetchError(f"{path.name} is not a readable zip archive ({exc})") from None
    return digest


def _members(zf: zipfile.ZipFile, plate: str) -> tuple[list[zipfile.ZipInfo], str]:
    """Files of the archive and the prefix to strip (``<plate>/`` in the official zips)."""
    files = [m for m in zf.infolist() if not m.is_dir()]
    for m in files:
        p = PurePosixPath(m.filename.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts:
            raise FetchError(f"archive member {m.filename!r} points outside the plate folder")
    if not files:
        raise FetchError("archive holds no files")
    prefix = f"{plate}/"
    if all(m.filename.replace("\\", "/").startswith(prefix) for m in files):
        return files, prefix
    tops = {m.filename.replace("\\", "/").split("/")[0] for m in files}
    if len(tops) == 1 and all("/" in m.filename.replace("\\", "/") for m in files):
        return files, tops.pop() + "/"
    return files, ""


def unpack_plate(
    archive: str | Path,
    dest: str | Path,
    plate: str,
    *,
    record: Mapping | None = None,
    disk_usage: Callable = shutil.disk_usage,
) -> Generator[Progress, None, Path]:
    """Unpack one plate archive to ``dest/<plate>``, atomically.

    Members go to a temporary folder inside ``dest``; the ``.complete`` marker
    (JSON: ``record`` plus the file count) is written last, and the folder is then
    renamed to ``dest/<plate>``. An interrupted unpack leaves only the temporary
    folder, which is removed. An existing ``dest/<plate>`` without a marker is
    replaced.

    Yields
    ------
    Progress
        ``stage="unpack"``, one event per member.
    """
    archive, dest = Path(archive), Path(dest)
    final = dest / plate
    for stale in [*dest.glob(f".{plate}.unpacking-*"), *dest.glob(f".{plate}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a run that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{plate}.unpacking-", dir=dest))
    try:
        with zipfile.ZipFile(archive) as zf:
            files, prefix = _members(zf, plate)
            need = sum(m.file_size for m in files)
            free = disk_usage(dest).free
            if need > free:
                raise FetchError(
                    f"unpacking needs {format_bytes(need)} but {dest} has "
                    f"{format_bytes(free)} free. Free some space; {_RESUME_HINT}."
                )
            out = tmp / plate
            out.mkdir()
            for i, m in enumerate(files, 1):
                rel = m.filename.replace("\\", "/")[len(prefix):]
                target = out.joinpath(*PurePosixPath(rel).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                yield Progress("unpack", i, len(files), f"{plate}: {rel}",
                               {"plate": plate, "file": rel})
        info = dict(record or {})
        info.update(plate=plate, files=len(files),
                    finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (out / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{plate}.old-", dir=dest))
            os.replace(final, trash / plate)
            os.replace(out, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(out, final)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FetchError(f"{archive.name} cannot be unpacked ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def adopt_existing(dest: str | Path, plate: str, image_csv: str | Path | None = None) -> bool:
    """Mark ``dest/<plate>`` complete if it already holds every file the image CSV
    lists for that plate (e.g. unpacked by hand); return whether it did."""
    dest = Path(dest)
    folder = dest / plate
    if is_plate_complete(dest, plate):
        return True
    if not folder.is_dir():
        return False
    image_csv = Path(image_csv) if image_csv is not None else dest / IMAGE_CSV
    if not image_csv.exists():
        return False
    layout = ScreenLayout()
    cols = [layout.plate_column] + [layout.file_columns[c][0] for c in layout.channels]
    try:
        table = pd.read_csv(image_csv, usecols=cols)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return False
    rows = table[table[layout.plate_column].astype(str) == plate]
    if rows.empty:
        return False
    names = pd.unique(rows[cols[1:]].astype(str).to_numpy().ravel())
    if not all((folder / n).is_file() and (folder / n).stat().st_size > 0 for n in names):
        return False
    info = {"plate": plate, "source": "existing copy", "files": int(len(names)),
            "checked_against": image_csv.name,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (folder / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
    return True


# --------------------------------------------------------------------------- plan and run


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
            yield from (
                _wrap_unpack(ev, info, base + job.expected_size, overall_total)
                for ev in unpack_plate(downloads / job.archive, dest, job.plate, record=record)
            )
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
    "COMPLETE_MARKER",
    "DEFAULT_BASE_URL",
    "KNOWN_SHA256",
    "METADATA_FILES",
    "FetchError",
    "FetchOptions",
    "FetchPlan",
    "FetchResult",
    "PlateJob",
    "adopt_existing",
    "archive_name",
    "bundled_plates",
    "check_space",
    "download",
    "fetch_bbbc021",
    "fetch_metadata",
    "fetch_plates",
    "format_bytes",
    "is_plate_complete",
    "load_manifest",
    "manifest_from_dest",
    "plan_fetch",
    "plates_in_csv",
    "remote_size",
    "select_plates",
    "iter_verify_archive",
    "unpack_plate",
    "verify_archive",
]
