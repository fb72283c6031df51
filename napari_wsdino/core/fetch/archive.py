"""Check a plate archive (SHA-256, zip CRCs) and unpack it atomically to ``DEST/<plate>``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Generator, Iterable, Mapping

import pandas as pd

from napari_wsdino.core.fetch.options import (
    _RESUME_HINT,
    COMPLETE_MARKER,
    FetchError,
    format_bytes,
)
from napari_wsdino.core.fetch.selection import is_plate_complete
from napari_wsdino.core.fsio import atomic_write_text
from napari_wsdino.core.metadata import IMAGE_CSV, ScreenLayout
from napari_wsdino.core.progress import Progress


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
    expected: Iterable[str] | None = None,
) -> Generator[Progress, None, Path]:
    """Unpack one plate archive to ``dest/<plate>``, atomically.

    ``expected``: the image files the image CSV lists for the plate
    (:func:`plate_files`); an archive lacking any of them is refused before anything
    is unpacked, and the plate is not marked complete.

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
            _check_expected(files, prefix, expected, archive.name)
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
        atomic_write_text(out / COMPLETE_MARKER, json.dumps(info, indent=1))
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


def plate_files(image_csv: str | Path, plate: str) -> list[str] | None:
    """The image file names the (BBBC021) image CSV lists for ``plate``; ``None`` when
    the CSV is missing, unreadable or does not name the plate (nothing to check against)."""
    image_csv = Path(image_csv)
    if not image_csv.exists():
        return None
    layout = ScreenLayout()
    cols = [layout.plate_column] + [layout.file_columns[c][0] for c in layout.channels]
    try:
        table = pd.read_csv(image_csv, usecols=cols)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    rows = table[table[layout.plate_column].astype(str) == plate]
    if rows.empty:
        return None
    return list(pd.unique(rows[cols[1:]].astype(str).to_numpy().ravel()))


class IncompleteArchiveError(FetchError):
    """A whole, readable archive that lacks files its plate should hold: downloading it
    again (from the same or another mirror) is the repair, so it is deleted."""


def _check_expected(files, prefix: str, expected: Iterable[str] | None, name: str) -> None:
    """Refuse an archive that lacks image files the image CSV lists for its plate."""
    if expected is None:
        return
    expected = list(expected)
    have = {PurePosixPath(m.filename.replace("\\", "/")[len(prefix):]).name for m in files}
    missing = [n for n in expected if PurePosixPath(n).name not in have]
    if missing:
        raise IncompleteArchiveError(
            f"{name} holds {len(expected) - len(missing)} of the {len(expected)} image files "
            f"the image CSV lists for this plate (missing e.g. {missing[0]}): an incomplete "
            "archive, from a cut download or a partial mirror. Nothing was unpacked and the "
            f"plate is not marked complete; the archive was deleted, so {_RESUME_HINT} "
            "(or use another mirror, --base-url)."
        )


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
    names = plate_files(image_csv, plate)
    if names is None:
        return False
    if not all((folder / n).is_file() and (folder / n).stat().st_size > 0 for n in names):
        return False
    info = {"plate": plate, "source": "existing copy", "files": int(len(names)),
            "checked_against": image_csv.name,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps(info, indent=1))
    return True


__all__ = ["IncompleteArchiveError", "adopt_existing", "iter_verify_archive", "plate_files", "sha256_file",
           "unpack_plate", "verify_archive"]
