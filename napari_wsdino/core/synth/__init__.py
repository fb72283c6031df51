"""Synthetic replicas: BBBC021's real screen design with generated MCF-7 images, or a
small five-channel Cell Painting screen in the JUMP ``load_data.csv`` layout.

The replica follows the bundled BBBC021 design (plates, weeks, wells, sites,
treatments, DMSO and taxol controls, official file names) and draws every field of
view from a biology-grounded phenotype model (:mod:`.phenotypes`) with a camera and
nuisance model (:mod:`.render`). Everything computed on it is a *synthetic replica*
result, never a BBBC021 one. ``layout="cellpainting"`` writes the Cell Painting
replica instead (:mod:`.cellpainting`: sources as batches, five stains).

Example
-------
>>> from napari_wsdino.core.synth import make_replica
>>> from napari_wsdino.core.metadata import load_metadata
>>> out = make_replica("demo_data", subset="mini", size=(64, 80))  # doctest: +SKIP
>>> load_metadata(out).summary()["treatments"]  # doctest: +SKIP
103
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from dataclasses import asdict
from pathlib import Path
from typing import Generator

import numpy as np

from napari_wsdino.core.identity import REPLICA_FILE, read_replica_info
from napari_wsdino.core.imageio import write_tiff
from napari_wsdino.core.metadata import CHANNELS, DataError, load_metadata
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.progress import Progress, run_to_end
from napari_wsdino.core.synth.design import (
    DEFAULT_SITES,
    SUBSETS,
    bundled_design,
    select_subset,
    write_design,
)
from napari_wsdino.core.synth.phenotypes import (
    AXES,
    DEFAULT_REPLICA,
    MOA_PHENOTYPES,
    REPLICA_VERSIONS,
    V1_CONFIG,
    SynthConfig,
    batch_nuisance,
    batch_response,
    plate_nuisance,
    replica_config,
    stable_seed,
    treatment_vector,
)
from napari_wsdino.core.synth.render import (  # noqa: F401  (illumination, pixel_scale re-exported)
    cached_illumination,
    illumination,
    pixel_scale,
    render_field,
)
from napari_wsdino.core.synth import cellpainting
from napari_wsdino.core.synth.truth import TRUTH_FEATURES, TRUTH_FILE, truth_matrix

__all__ = [
    "AXES",
    "DEFAULT_REPLICA",
    "DEFAULT_SITES",
    "LAYOUTS",
    "MOA_PHENOTYPES",
    "REPLICA_FILE",
    "REPLICA_VERSIONS",
    "SUBSETS",
    "SynthConfig",
    "TRUTH_FEATURES",
    "TRUTH_FILE",
    "default_config",
    "field_specs",
    "make_replica",
    "read_replica_info",
    "render_spec",
    "replica_config",
    "select_subset",
    "write_replica",
]

DEFAULT_SIZE = (256, 320)
#: Replica layouts (the screen layouts of :mod:`napari_wsdino.core.metadata`).
LAYOUTS = ("bbbc021", "cellpainting")
#: Fields per task sent to a worker process.
CHUNK = 12


def default_config(layout: str = "bbbc021") -> SynthConfig:
    """The calibrated knobs of a layout's replica: ``v2`` for BBBC021; the Cell Painting
    replica exists in one version, calibrated on ``v1``'s knobs."""
    return SynthConfig() if layout == "bbbc021" else V1_CONFIG


def _write_record(out: Path, layout: str, subset: str, sites, size, seed: int,
                  config: SynthConfig) -> None:
    info = {"data": "synthetic replica", "replica": config.version, "layout": layout,
            "subset": subset, "sites": sites, "size": list(size), "seed": int(seed),
            "config": asdict(config)}
    (out / REPLICA_FILE).write_text(json.dumps(info, indent=1))


def _write_truth(out: Path, specs: list[dict], size, seed: int, config: SynthConfig) -> None:
    """``OUT/truth.parquet``: every field's ground-truth profile (:mod:`.truth`)."""
    table = load_metadata(out, check_files=False).table
    keys = [(s["plate"], s["well"], s["site"]) for s in specs]
    order = {k: i for i, k in enumerate(keys)}
    rows = [order[(p, w, int(si))] for p, w, si in zip(table.plate, table.well, table.site)]
    X = truth_matrix(specs, size, seed, config)[rows]
    ProfileTable.from_fields(table, X, list(TRUTH_FEATURES)).write(out / TRUTH_FILE)


def field_specs(subset: str = "mini", sites: int | None = None, seed: int = 0,
                config: SynthConfig | None = None) -> list[dict]:
    """One plain dict per field of a subset: where it goes and what it shows.

    Keys: ``plate, batch, well, site, compound, concentration, moa, files`` (the
    channel files relative to the replica root, DAPI/Tubulin/Actin order), ``vec``
    and ``dose`` (see :func:`.phenotypes.treatment_vector`).
    """
    config = default_config() if config is None else config
    raw, _, table = bundled_design()
    keep = select_subset(table, subset, sites)
    conc_by_compound = table.groupby("compound").concentration.unique().to_dict()
    treat_cache: dict = {}
    rows = table[keep]
    files = [
        (raw.loc[keep, f"Image_PathName_{c}"].astype(str) + "/"
         + raw.loc[keep, f"Image_FileName_{c}"].astype(str)).tolist()
        for c in CHANNELS
    ]
    specs = []
    for j, row in enumerate(rows.itertuples(index=False)):
        key = row.treatment
        if key not in treat_cache:
            moa = "" if row.moa == "DMSO" else row.moa
            treat_cache[key] = treatment_vector(moa, row.compound, row.concentration,
                                                conc_by_compound[row.compound], seed, config)
        vec, dose = treat_cache[key]
        if (key, row.batch) not in treat_cache:
            treat_cache[key, row.batch] = batch_response(vec, row.batch, row.moa, seed, config)
        vec = treat_cache[key, row.batch]
        specs.append({
            "plate": row.plate, "batch": row.batch, "well": row.well, "site": int(row.site),
            "compound": row.compound, "concentration": float(row.concentration),
            "moa": row.moa, "vec": vec, "dose": dose,
            "files": [f[j] for f in files],
        })
    return specs


def render_spec(spec: dict, size: tuple[int, int], seed: int,
                config: SynthConfig | None = None, _illum_cache: dict | None = None) -> np.ndarray:
    """Render the ``(C, H, W)`` uint16 image of one field spec (deterministic): three
    BBBC021 channels, or five stains for a ``layout="cellpainting"`` spec (``config``:
    the layout's :func:`default_config` when left out)."""
    size = (int(size[0]), int(size[1]))
    if config is None:
        config = default_config(spec.get("layout", "bbbc021"))
    if spec.get("layout") == "cellpainting":
        return cellpainting.render_cellpainting_spec(spec, size, seed, config, _illum_cache)
    plate = plate_nuisance(spec["plate"], seed, config)
    illum = cached_illumination(_illum_cache, spec["plate"], size, plate)
    rng = np.random.default_rng(stable_seed(seed, "field", spec["plate"], spec["well"], spec["site"]))
    return render_field(rng, size, spec["vec"], spec["dose"], batch_nuisance(spec["batch"], seed, config),
                        plate, illum, config)


def _write_chunk(out: str, specs: list[dict], size, seed: int, config: SynthConfig) -> int:
    cache: dict = {}
    for spec in specs:
        img = render_spec(spec, size, seed, config, cache)
        for plane, rel in zip(img, spec["files"]):
            write_tiff(Path(out) / rel, plane)
    return len(specs)


#: Below this many pixels in all, starting processes costs more than it saves.
PARALLEL_PIXELS = 20_000_000


def _default_workers(n_fields: int, size: tuple[int, int]) -> int:
    if n_fields < 4 * CHUNK or n_fields * size[0] * size[1] < PARALLEL_PIXELS:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


#: Peak memory of rendering one field, per pixel of it (tracemalloc on three-stain fields
#: of 128 x 160 to 1024 x 1280 px: 162-165 bytes; 2026-12-07), with room for the
#: plate's illumination kept between fields; Cell Painting's five stains scale it by 5/3.
RENDER_BYTES_PER_PIXEL = 200


def available_memory() -> int | None:
    """Bytes of memory free for new work (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def render_memory(size: tuple[int, int], layout: str = "bbbc021") -> int:
    """Estimated peak bytes one worker needs to render a field of ``size``."""
    stains = 5 if layout == "cellpainting" else 3
    return int(RENDER_BYTES_PER_PIXEL * size[0] * size[1] * stains / 3)


def _fit_memory(size: tuple[int, int], layout: str, workers: int,
                free: int | None) -> int:
    """Workers that fit in ``free`` bytes (at most ``workers``); a clear error when not
    even one does, before anything is written."""
    need = render_memory(size, layout)
    if free is None:
        return workers
    gib = 2.0 ** 30
    if need > 0.8 * free:
        raise DataError(
            f"Rendering one {size[0]} x {size[1]} field needs about {need / gib:.1f} GiB of "
            f"memory, more than the {0.8 * free / gib:.1f} GiB this machine can spare (80 % "
            f"of the {free / gib:.1f} GiB free): use a smaller --size (BBBC021's camera is "
            "1024 x 1280, the demo's replica 320 x 400).")
    return max(1, min(workers, int(0.8 * free // need)))


def _write_design(out: Path, layout: str, subset: str, sites: int | None, seed: int,
                  config: SynthConfig) -> list[dict]:
    """Write the replica's CSV files; returns the field specs to render."""
    if layout == "cellpainting":
        if subset != "mini":
            raise DataError(f"The cellpainting replica has one design; --subset {subset} "
                            "applies to the bbbc021 layout only. Leave --subset out.")
        specs, rows = cellpainting.cellpainting_specs(sites, seed, config)
        cellpainting.write_load_data(out, rows)
        return specs
    if layout != "bbbc021":
        raise DataError(f"Unknown replica layout {layout!r}; choose one of {list(LAYOUTS)}.")
    raw, moa, table = bundled_design()
    keep = select_subset(table, subset, sites)
    specs = field_specs(subset, sites, seed, config)
    write_design(out, raw, moa, keep)
    return specs


def _write_fields(out: Path, specs: list[dict], size, seed: int, config: SynthConfig,
                  workers: int) -> Generator[Progress, None, None]:
    """Render and write every field, in chunks, in this process or in ``workers``."""
    total, done = len(specs), 0
    chunks = [specs[i:i + CHUNK] for i in range(0, total, CHUNK)]
    if workers == 1:
        for chunk in chunks:
            done += _write_chunk(str(out), chunk, size, seed, config)
            yield Progress("synth", done, total, f"{chunk[-1]['plate']} {chunk[-1]['well']}")
        return
    # spawn: safe from GUI threads, and results never depend on the start method.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_write_chunk, str(out), c, size, seed, config) for c in chunks]
        try:
            for fut in as_completed(futures):
                done += fut.result()
                yield Progress("synth", done, total, f"{done} fields written")
        finally:
            for fut in futures:
                fut.cancel()


def write_replica(out: str | Path, subset: str = "mini", sites: int | None = None,
                  size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0, workers: int | None = None,
                  config: SynthConfig | None = None, layout: str = "bbbc021",
                  ) -> Generator[Progress, None, Path]:
    """Write a synthetic replica; a generator of progress events.

    BBBC021 (``layout="bbbc021"``): writes ``OUT/BBBC021_v1_image.csv``,
    ``OUT/BBBC021_v1_moa.csv`` and ``OUT/<Week>/<plate>/<official file name>.tif``
    (uint16, one file per channel). Cell Painting (``layout="cellpainting"``):
    ``OUT/load_data.csv``, ``OUT/layout.json`` and
    ``OUT/images/<source>/<plate>/<Phenix name>.tiff``, one file per stain (DNA, ER,
    RNA, AGP, Mito); 3 sources x 2 plates x 16 wells x ``sites`` (default 2).
    Both write ``OUT/replica.json`` (version, layout, subset, size, seed, knobs); BBBC021
    also ``OUT/truth.parquet``, every field's ground-truth profile (:mod:`.truth`).
    The files depend only on ``(layout, subset, sites, size, seed, config)``:
    byte-identical across runs and worker counts.

    Parameters
    ----------
    out
        Output folder (created; existing replica files are overwritten).
    subset
        ``"full"`` (3,848 fields), ``"replicate1"`` (1,368) or ``"mini"`` (292 at
        2 sites); see :func:`select_subset`. The cellpainting replica has one
        design (``"mini"``).
    sites
        Sites per well, 1–4 (default 4; ``mini``: 2); cellpainting 1–9 (default 2).
    size
        ``(H, W)`` of each image; 1024 x 1280 is the real camera.
    seed
        Seed of everything random (compound twists, weeks, plates, fields).
    workers
        Processes (default: 1 below :data:`PARALLEL_PIXELS` pixels in all, else every
        core up to 8).
    config
        Version and difficulty knobs (:class:`SynthConfig`; default
        :func:`default_config` of the layout: ``v2`` for BBBC021;
        ``replica_config("v1")`` writes the first replica's files).
    layout
        ``"bbbc021"`` or ``"cellpainting"`` (:data:`LAYOUTS`).

    Yields
    ------
    Progress
        ``stage="synth"``, one event per written chunk of fields.

    Returns
    -------
    Path
        ``out``.

    Example
    -------
    >>> from napari_wsdino.core.progress import run_to_end
    >>> out = run_to_end(write_replica("demo", "mini", size=(64, 80)))  # doctest: +SKIP
    """
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    if min(size) < 32:
        raise DataError(f"Image size {size} is too small; use at least 32 x 32 pixels.")
    config = default_config(layout) if config is None else config
    if layout == "cellpainting" and config.version != "v1":
        raise DataError("The Cell Painting replica exists in one version (v1); leave the "
                        "replica version out with --layout cellpainting.")
    free = available_memory()
    _fit_memory(size, layout, 1, free)  # not even one field fits: say so before writing
    specs = _write_design(out, layout, subset, sites, seed, config)
    _write_record(out, layout, subset, sites, size, seed, config)
    total = len(specs)
    asked = _default_workers(total, size) if workers is None else max(1, int(workers))
    workers = _fit_memory(size, layout, asked, free)
    name = subset if layout == "bbbc021" else layout
    fewer = (f"; {workers} of {asked} processes, as many as the free memory holds"
             if workers < asked else "")
    yield Progress("synth", 0, total, f"{name}: {total} fields at {size[0]}x{size[1]}{fewer}")
    yield from _write_fields(out, specs, size, seed, config, workers)
    if layout == "bbbc021":
        _write_truth(out, specs, size, seed, config)
    return out


def make_replica(out: str | Path, subset: str = "mini", sites: int | None = None,
                 size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0, workers: int | None = None,
                 config: SynthConfig | None = None, callback=None,
                 layout: str = "bbbc021") -> Path:
    """Run :func:`write_replica` to its end and return the output folder.

    Example
    -------
    >>> make_replica("demo_data", "mini", size=(64, 80))  # doctest: +SKIP
    PosixPath('demo_data')
    """
    return run_to_end(write_replica(out, subset, sites, size, seed, workers, config, layout),
                      callback)
