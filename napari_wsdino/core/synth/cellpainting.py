"""A small five-channel Cell Painting replica in the JUMP ``load_data.csv`` layout.

The design: a few sources (the batch: each with its own stain gains, backgrounds,
focus and illumination shifts per stain), two plates per source, one compound of
every MoA per source, in one well of each of its source's plates (so a compound is
seen in one batch, as most BBBC021 treatments are, and every MoA in every batch:
NSCB is defined and differs from NSC), DMSO wells (the negative control, JUMP's
``JCP2022_033924``) on every plate, and a few sites per well. Compounds get made-up ``JCP2022_9xxxxx`` identifiers and
InChIKey-shaped keys (clearly not real molecules); each belongs to one of the MoAs of
:data:`.phenotypes.MOA_PHENOTYPES` and is rendered by
:func:`.render.render_cellpainting` at a single dose (JUMP's 10 µM).

Example
-------
>>> specs, rows = cellpainting_specs(seed=0)
>>> len(specs), sorted(rows.Metadata_Source.unique())
(192, ['source_1', 'source_2', 'source_3'])
>>> int(rows.Metadata_JCP2022.nunique()) - 1  # compounds, DMSO aside
36
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from napari_wsdino.core.metadata import (
    CELLPAINTING_CHANNELS,
    CONTROL,
    JUMP_DMSO,
    LOAD_DATA_CSV,
    DataError,
    get_layout,
)
from napari_wsdino.core.synth.phenotypes import (MOA_PHENOTYPES, V1_CONFIG, SynthConfig,
                                                 batch_nuisance,
                                                 batch_response, plate_nuisance, stable_seed,
                                                 treatment_vector)
from napari_wsdino.core.synth.render import cached_illumination, render_cellpainting

#: The design's size: sources (batches; one compound of each MoA per source), plates
#: per source (each holds all of its source's compounds), DMSO wells per plate, sites.
SOURCES = 3
PLATES_PER_SOURCE = 2
DMSO_WELLS = 4
DEFAULT_SITES = 2
#: JUMP's compound dose (µM); the control is at 0.
DOSE = 10.0
#: The file that tells other tools the layout (``wsdino ... --layout OUT/layout.json``).
LAYOUT_JSON = "layout.json"
DMSO_INCHIKEY = "IAZDPXIOMUYVGZ-UHFFFAOYSA-N"  # dimethyl sulfoxide


def _fake_inchikey(name: str) -> str:
    """A made-up key in InChIKey shape (14-10-1 capitals) for a synthetic compound."""
    digits = hashlib.sha256(name.encode()).digest()
    letters = "".join(chr(65 + b % 26) for b in digits)
    return f"{letters[:14]}-{letters[14:22]}SA-N"


def compounds() -> pd.DataFrame:
    """The synthetic compounds: ``Metadata_JCP2022``, ``Metadata_InChIKey``, ``moa`` and
    ``source`` (1-based: the one source that tests it)."""
    rows = []
    for m, moa in enumerate(MOA_PHENOTYPES):
        for k in range(SOURCES):
            jcp = f"JCP2022_9{m * SOURCES + k + 1:05d}"
            rows.append({"Metadata_JCP2022": jcp, "Metadata_InChIKey": _fake_inchikey(jcp),
                         "moa": moa, "source": k + 1})
    return pd.DataFrame(rows)


def _plate_wells(treated: list[int]) -> list[tuple[str, int | None]]:
    """(well, compound row or ``None`` for DMSO): compounds from B02 on, DMSO in column 23."""
    wells = [(f"{chr(66 + i // 22)}{i % 22 + 2:02d}", j) for i, j in enumerate(treated)]
    return wells + [(f"{chr(65 + 2 * i)}23", None) for i in range(DMSO_WELLS)]


def _file_name(well: str, site: int, stain: int) -> str:
    """A Phenix-style name, as in JUMP: ``r02c05f01p01-ch3sk1fk1fl1.tiff``."""
    return f"r{ord(well[0]) - 64:02d}c{int(well[1:]):02d}f{site:02d}p01-ch{stain + 1}sk1fk1fl1.tiff"


def load_data(sites: int | None = None) -> pd.DataFrame:
    """The replica's ``load_data.csv`` rows (one per field) in the cellpainting layout."""
    sites = DEFAULT_SITES if sites is None else int(sites)
    if not 1 <= sites <= 9:
        raise DataError(f"sites must be 1 to 9 for the cellpainting replica, not {sites}.")
    comp = compounds()
    rows = []
    for s in range(1, SOURCES + 1):
        for p in range(PLATES_PER_SOURCE):
            plate = f"S{s}P{p + 1:02d}"
            treated = [int(j) for j in np.flatnonzero(comp.source == s)]
            for well, j in _plate_wells(treated):
                meta = ({"Metadata_JCP2022": JUMP_DMSO, "Metadata_InChIKey": DMSO_INCHIKEY,
                         "Metadata_pert_type": "negcon", "Metadata_MoA": CONTROL} if j is None
                        else {"Metadata_JCP2022": comp.Metadata_JCP2022[j],
                              "Metadata_InChIKey": comp.Metadata_InChIKey[j],
                              "Metadata_pert_type": "trt", "Metadata_MoA": comp.moa[j]})
                for site in range(1, sites + 1):
                    row = {"Metadata_Source": f"source_{s}", "Metadata_Batch": f"source_{s}_b1",
                           "Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                           **meta}
                    for k, stain in enumerate(CELLPAINTING_CHANNELS):
                        row[f"FileName_Orig{stain}"] = _file_name(well, site, k)
                        row[f"PathName_Orig{stain}"] = f"images/source_{s}/{plate}"
                    rows.append(row)
    return pd.DataFrame(rows)


def cellpainting_specs(sites: int | None = None, seed: int = 0,
                       config: SynthConfig = V1_CONFIG) -> tuple[list[dict], pd.DataFrame]:
    """One spec per field (as :func:`napari_wsdino.core.synth.field_specs`) and the CSV rows."""
    rows = load_data(sites)
    cache: dict = {}
    specs = []
    for r in rows.itertuples(index=False):
        control = r.Metadata_JCP2022 == JUMP_DMSO
        moa = "" if control else r.Metadata_MoA
        key = (r.Metadata_JCP2022, r.Metadata_Source)
        if key not in cache:
            vec, dose = treatment_vector(moa, r.Metadata_JCP2022, 0.0 if control else DOSE,
                                         np.array([DOSE]), seed, config)
            cache[key] = batch_response(vec, r.Metadata_Source, r.Metadata_MoA, seed, config), dose
        vec, dose = cache[key]
        specs.append({
            "layout": "cellpainting", "plate": r.Metadata_Plate, "batch": r.Metadata_Source,
            "well": r.Metadata_Well, "site": int(r.Metadata_Site),
            "compound": r.Metadata_JCP2022, "moa": r.Metadata_MoA, "vec": vec, "dose": dose,
            "files": [f"{getattr(r, 'PathName_Orig' + c)}/{getattr(r, 'FileName_Orig' + c)}"
                      for c in CELLPAINTING_CHANNELS],
        })
    return specs, rows


def source_plate_nuisance(source: str, plate: str, seed: int, config: SynthConfig) -> dict:
    """A plate's five-stain illumination and gain, shifted by its source's microscope."""
    plate_n = plate_nuisance(plate, seed, config, channels=len(CELLPAINTING_CHANNELS))
    rng = np.random.default_rng(stable_seed(seed, "source-optics", source))
    k, s = len(CELLPAINTING_CHANNELS), config.illumination_strength * config.batch_strength
    plate_n["vignette"] = np.clip(plate_n["vignette"] + s * rng.normal(0.0, 0.1, k), 0.0, 0.8)
    plate_n["gradient"] = plate_n["gradient"] + s * rng.normal(0.0, 0.1, (k, 2))
    return plate_n


def render_cellpainting_spec(spec: dict, size: tuple[int, int], seed: int,
                             config: SynthConfig = V1_CONFIG,
                             _illum_cache: dict | None = None) -> np.ndarray:
    """Render the ``(5, H, W)`` uint16 image of one Cell Painting field spec."""
    plate = source_plate_nuisance(spec["batch"], spec["plate"], seed, config)
    illum = cached_illumination(_illum_cache, spec["plate"], size, plate)
    rng = np.random.default_rng(stable_seed(seed, "field", spec["plate"], spec["well"], spec["site"]))
    batch = batch_nuisance(spec["batch"], seed, config, channels=len(CELLPAINTING_CHANNELS))
    return render_cellpainting(rng, size, spec["vec"], spec["dose"], batch, plate, illum, config)


def write_load_data(out: Path, rows: pd.DataFrame) -> None:
    """Write ``load_data.csv`` and ``layout.json`` (the cellpainting layout's fields)."""
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / LOAD_DATA_CSV, index=False)
    (out / LAYOUT_JSON).write_text(json.dumps(get_layout("cellpainting").to_mapping(), indent=1))
