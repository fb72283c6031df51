"""napari sample data: a small synthetic replica (File > Open Sample).

The BBBC021 replica (``mini`` subset, one site per well, 256 x 320 px, seed 0) is
written once into the user cache (``$WSDINO_CACHE`` or ``~/.cache/napari-wsdino``) and
reused; the sample opens one of its fields as three additive layers (DAPI blue, Tubulin
green, Actin red) whose metadata names the field and the dataset folder, so the plate
browser can move on to the other fields. ``sample_replica(layout="cellpainting")`` and
:func:`replica_cellpainting_field` do the same with the five-stain Cell Painting
replica (DNA, ER, RNA, AGP, Mito).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from napari_wsdino._napari.layers import field_layer_data
from napari_wsdino.core.metadata import DataError, load_metadata
from napari_wsdino.core.synth import default_config, make_replica

if TYPE_CHECKING:
    from napari.types import LayerDataTuple

SAMPLE_SUBSET = "mini"
SAMPLE_SITES = 1
SAMPLE_SIZE = (256, 320)
SAMPLE_SEED = 0
_DONE = ".complete"


def cache_dir() -> Path:
    """Where generated sample data lives (``$WSDINO_CACHE`` overrides)."""
    root = os.environ.get("WSDINO_CACHE") or Path.home() / ".cache" / "napari-wsdino"
    return Path(root)


def sample_replica(root: str | Path | None = None, layout: str = "bbbc021") -> Path:
    """Path of the cached sample replica of ``layout`` (``"bbbc021"`` or
    ``"cellpainting"``), writing it first if needed (a few seconds)."""
    root = Path(root) if root is not None else cache_dir()
    if root.exists() and not root.is_dir():
        raise DataError(
            f"The sample data folder {root} is a file, not a folder"
            + (" ($WSDINO_CACHE names it)" if os.environ.get("WSDINO_CACHE") else "")
            + ": point WSDINO_CACHE at a folder (or unset it to use ~/.cache/napari-wsdino).")
    h, w = SAMPLE_SIZE
    name = SAMPLE_SUBSET if layout == "bbbc021" else layout  # old folder names stay valid
    version = default_config(layout).version
    suffix = "" if version == "v1" else f"_{version}"  # a v1 sample is never shown as v2
    target = root / f"sample_replica_{name}_s{SAMPLE_SITES}_{h}x{w}_seed{SAMPLE_SEED}{suffix}"
    if (target / _DONE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run never leaves half a replica.
    tmp = Path(tempfile.mkdtemp(prefix=".sample_", dir=root))
    try:
        make_replica(tmp, SAMPLE_SUBSET, SAMPLE_SITES, SAMPLE_SIZE, SAMPLE_SEED, layout=layout)
        (tmp / _DONE).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _field_sample(compound: str | None, root: str | Path | None = None,
                  layout: str = "bbbc021") -> list["LayerDataTuple"]:
    data = sample_replica(root, layout)
    metadata = load_metadata(data)
    table = metadata.table
    # The highest dose shows the phenotype best.
    rows = table[table.compound == compound].sort_values("concentration", ascending=False).index
    index = int(rows[0]) if len(rows) else 0
    layers = field_layer_data(metadata, index, source=data)
    for _, kwargs, _ in layers:
        kwargs["name"] = f"{kwargs['name']} (synthetic replica)"
    return layers


def replica_dmso_field(root: str | Path | None = None) -> list["LayerDataTuple"]:
    """A DMSO (untreated MCF-7) field of the synthetic replica, as three layers."""
    return _field_sample("DMSO", root)


def replica_taxol_field(root: str | Path | None = None) -> list["LayerDataTuple"]:
    """A taxol (microtubule stabiliser, positive control) field of the synthetic replica."""
    return _field_sample("taxol", root)


def replica_cellpainting_field(root: str | Path | None = None) -> list["LayerDataTuple"]:
    """A DMSO field of the synthetic Cell Painting replica, as five layers (DNA blue,
    ER green, RNA cyan, AGP red, Mito magenta)."""
    return _field_sample("DMSO", root, layout="cellpainting")
