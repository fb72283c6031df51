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

# Each job module's __all__ is its public API, re-exported here as one.
from napari_wsdino.core.fetch import archive, http, manifest, options, plan, selection
from napari_wsdino.core.fetch.options import *  # noqa: F401,F403
from napari_wsdino.core.fetch.selection import *  # noqa: F401,F403
from napari_wsdino.core.fetch.manifest import *  # noqa: F401,F403
from napari_wsdino.core.fetch.http import *  # noqa: F401,F403
from napari_wsdino.core.fetch.archive import *  # noqa: F401,F403
from napari_wsdino.core.fetch.plan import *  # noqa: F401,F403

# (`+=` of each module's __all__: the form static checkers follow.)
__all__: list[str] = []
__all__ += options.__all__
__all__ += selection.__all__
__all__ += manifest.__all__
__all__ += http.__all__
__all__ += archive.__all__
__all__ += plan.__all__
