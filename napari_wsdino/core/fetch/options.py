"""What every step of a fetch shares: the set's file names and sizes, :class:`FetchError`
and :class:`FetchOptions` (where from, how patiently, what to keep)."""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Mapping

from napari_wsdino.core.metadata import IMAGE_CSV, MOA_CSV, DataError

DEFAULT_BASE_URL = "https://data.broadinstitute.org/bbbc/BBBC021/"
#: The URL schemes a ``base_url`` may use (``file`` for a mirror on a local disk).
URL_SCHEMES = ("https", "http", "file")
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

    def __post_init__(self):
        problems = []
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout)
                and self.timeout > 0):
            problems.append(f"--timeout must be a number of seconds above 0, not "
                            f"{self.timeout!r} (e.g. --timeout {FetchOptions.timeout:g})")
        if not (isinstance(self.retry_wait, (int, float)) and self.retry_wait >= 0):
            problems.append(f"retry_wait must be 0 or more seconds, not {self.retry_wait!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            problems.append(f"--retries must be 0 or more, not {self.retries!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            problems.append(f"chunk_size must be at least 1 byte, not {self.chunk_size!r}")
        url = urllib.parse.urlparse(str(self.base_url))
        if url.scheme not in URL_SCHEMES or (url.scheme != "file" and not url.netloc):
            problems.append(
                f"--base-url {self.base_url!r} is not a folder URL: give an "
                f"{' / '.join(s + '://' for s in URL_SCHEMES)} URL, e.g. {DEFAULT_BASE_URL} "
                "or file:///data/bbbc021/ for a local mirror")
        if problems:
            raise FetchError("; ".join(problems) + ".")

    def url(self, name: str) -> str:
        """URL of one file of the set."""
        return self.base_url.rstrip("/") + "/" + name

    def sha256(self, name: str) -> str | None:
        """Known hash of a file, or ``None``."""
        known = self.hashes.get(name) or KNOWN_SHA256.get(name)
        return known.lower() if known else None



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


__all__ = [
    "COMPLETE_MARKER",
    "COMPOUND_CSV",
    "DEFAULT_BASE_URL",
    "DOWNLOAD_DIR",
    "ESTIMATED_ZIP_BYTES",
    "KNOWN_SHA256",
    "METADATA_FILES",
    "OPTIONAL_FILES",
    "SUBSETS",
    "UNPACK_RATIO",
    "URL_SCHEMES",
    "FetchError",
    "FetchOptions",
    "archive_name",
    "format_bytes",
]
