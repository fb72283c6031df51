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

The package is split by job; every name is importable from here:

- :mod:`~napari_wsdino.core.fetch.options`: file names, sizes, :class:`FetchError`,
  :class:`FetchOptions`;
- :mod:`~napari_wsdino.core.fetch.selection`: which plates (:func:`select_plates`);
- :mod:`~napari_wsdino.core.fetch.manifest`: known hashes (:func:`load_manifest`);
- :mod:`~napari_wsdino.core.fetch.http`: resumable, retried downloads (:func:`download`);
- :mod:`~napari_wsdino.core.fetch.archive`: verify and unpack (:func:`unpack_plate`);
- :mod:`~napari_wsdino.core.fetch.plan`: plan and run (:func:`plan_fetch`,
  :func:`fetch_plates`, :func:`fetch_bbbc021`).

Example
-------
>>> from napari_wsdino.core.fetch import fetch_bbbc021, FetchOptions
>>> from napari_wsdino.core.progress import run_to_end
>>> result = run_to_end(fetch_bbbc021("BBBC021", plates=["Week1_22123"]))  # doctest: +SKIP
>>> result.completed  # doctest: +SKIP
['Week1_22123']
"""

from napari_wsdino.core.fetch.options import (
    COMPLETE_MARKER,
    COMPOUND_CSV,
    DEFAULT_BASE_URL,
    DOWNLOAD_DIR,
    ESTIMATED_ZIP_BYTES,
    KNOWN_SHA256,
    METADATA_FILES,
    OPTIONAL_FILES,
    SUBSETS,
    UNPACK_RATIO,
    FetchError,
    FetchOptions,
    archive_name,
    format_bytes,
)
from napari_wsdino.core.fetch.selection import (
    bundled_plates,
    is_plate_complete,
    plates_in_csv,
    select_plates,
)
from napari_wsdino.core.fetch.manifest import load_manifest, manifest_from_dest
from napari_wsdino.core.fetch.http import download, remote_size
from napari_wsdino.core.fetch.archive import (
    adopt_existing,
    iter_verify_archive,
    sha256_file,
    unpack_plate,
    verify_archive,
)
from napari_wsdino.core.fetch.plan import (
    FetchPlan,
    FetchResult,
    PlateJob,
    check_space,
    fetch_bbbc021,
    fetch_metadata,
    fetch_plates,
    plan_fetch,
)

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
    "iter_verify_archive",
    "load_manifest",
    "manifest_from_dest",
    "plan_fetch",
    "plates_in_csv",
    "remote_size",
    "select_plates",
    "sha256_file",
    "unpack_plate",
    "verify_archive",
]
