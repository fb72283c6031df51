"""The five-channel Cell Painting replica (JUMP load_data layout): design, read-back,
determinism, per-source batch effects and MoA phenotypes in the five stains."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from napari_wsdino.core.imageio import read_tiff
from napari_wsdino.core.metadata import (
    CELLPAINTING_CHANNELS,
    CONTROL,
    JUMP_DMSO,
    LOAD_DATA_CSV,
    DataError,
    load_metadata,
)
from napari_wsdino.core.synth import SynthConfig, make_replica, render_spec
from napari_wsdino.core.synth.cellpainting import cellpainting_specs
from test_synth import cli  # wsdino with info and synth only (no torch import)

DNA, ER, RNA, AGP, MITO = range(5)


@pytest.fixture(scope="module")
def cp_replica(tmp_path_factory):
    """A cellpainting replica at one site per well, 48 x 64 px, seed 0 (96 fields)."""
    out = tmp_path_factory.mktemp("cp") / "cp"
    assert cli(["synth", str(out), "--layout", "cellpainting", "--sites", "1",
                "--size", "48", "64", "--seed", "0", "--quiet"]) == 0
    return out


def test_written_in_the_load_data_layout(cp_replica):
    rows = pd.read_csv(cp_replica / LOAD_DATA_CSV)
    for c in CELLPAINTING_CHANNELS:
        assert {f"FileName_Orig{c}", f"PathName_Orig{c}"} <= set(rows.columns)
    assert {"Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_Site",
            "Metadata_JCP2022", "Metadata_InChIKey", "Metadata_MoA"} <= set(rows.columns)
    referenced = {f"{p}/{f}" for c in CELLPAINTING_CHANNELS
                  for p, f in zip(rows[f"PathName_Orig{c}"], rows[f"FileName_Orig{c}"])}
    on_disk = {str(p.relative_to(cp_replica)) for p in cp_replica.rglob("*.tiff")}
    assert on_disk == referenced and len(on_disk) == 5 * 96
    img = read_tiff(cp_replica / sorted(on_disk)[0])
    assert img.dtype == np.uint16 and img.shape == (48, 64)
    assert (rows.Metadata_JCP2022 == JUMP_DMSO).sum() == 3 * 2 * 4  # DMSO on every plate


def test_load_metadata_reads_five_channels(cp_replica, capsys):
    meta = load_metadata(cp_replica)  # layout detected from load_data.csv
    assert meta.channels == CELLPAINTING_CHANNELS
    s = meta.summary()
    assert s["fields"] == 96 and s["plates"] == 6 and s["batches"] == 3
    assert s["treatments"] == s["compounds"] == 36 and s["moas"] == 12 and s["dmso_fields"] == 24
    assert s["nscb_treatments"] == 36 and s["missing_files"] == 0  # every MoA in every source
    t = meta.table
    treated = t[t.moa != CONTROL]
    assert (treated.groupby("compound").batch.nunique() == 1).all()  # a compound: one source
    assert set(t.batch) == {"source_1", "source_2", "source_3"}
    assert (t.loc[t.moa == CONTROL, "compound"] == CONTROL).all()
    assert (t.loc[t.moa != CONTROL, "concentration"] == 10.0).all()
    same = load_metadata(cp_replica, str(cp_replica / "layout.json"))
    pd.testing.assert_frame_equal(same.table, t)
    # The CLI reads it through the layout file the replica writes.
    assert cli(["info", str(cp_replica), "--layout", str(cp_replica / "layout.json"),
                "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fields"] == 96


def test_deterministic_and_seeded(cp_replica):
    spec = cellpainting_specs(1, seed=0)[0][0]
    a = render_spec(spec, (48, 64), 0)
    assert a.shape == (5, 48, 64) and a.dtype == np.uint16
    assert np.array_equal(a, render_spec(spec, (48, 64), 0))
    assert not np.array_equal(a, render_spec(spec, (48, 64), 1))
    written = [read_tiff(cp_replica / f) for f in spec["files"]]
    assert np.array_equal(np.stack(written), a)


def test_subset_is_bbbc021_only(tmp_path):
    with pytest.raises(DataError, match="--subset full applies to the bbbc021 layout"):
        make_replica(tmp_path / "x", subset="full", layout="cellpainting")
    with pytest.raises(DataError, match="Unknown replica layout"):
        make_replica(tmp_path / "y", layout="jump")


@pytest.fixture(scope="module")
def specs():
    return cellpainting_specs(1, seed=0)[0]


def _fields(spec, n=4, size=(128, 160), config=SynthConfig(batch_strength=0)):
    return [render_spec({**spec, "site": 10 + k}, size, 0, config).astype(float)
            for k in range(n)]


def _first(specs, moa):
    return next(s for s in specs if s["moa"] == moa)


def _nuclear_areas(img):
    dna = ndi.gaussian_filter(img[DNA], 1)
    lab, _ = ndi.label(dna > threshold_otsu(dna))
    area = np.bincount(lab.ravel())[1:]
    return area[area > 10]


def _cell_mean(img, stain):
    """Mean of one stain inside cells (Otsu on the smoothed stain), background removed."""
    x = img[stain] - np.percentile(img[stain], 2)
    smooth = ndi.gaussian_filter(x, 3)
    return x[smooth > threshold_otsu(smooth)].mean()


def test_moa_phenotypes_visible_in_the_stains(specs):
    dmso, aurora = _first(specs, CONTROL), _first(specs, "Aurora kinase inhibitors")
    a_dmso = np.median(np.concatenate([_nuclear_areas(i) for i in _fields(dmso)]))
    a_aur = np.median(np.concatenate([_nuclear_areas(i) for i in _fields(aurora)]))
    assert a_aur > 1.4 * a_dmso  # DNA: large polyploid nuclei
    # RNA: dimmer cells under translation inhibitors (both compounds, every source).
    synth = [s for s in specs if s["moa"] == "Protein synthesis"]
    rna_dmso = np.mean([_cell_mean(i, RNA) for i in _fields(dmso, 6)])
    rna_synth = np.mean([_cell_mean(i, RNA) for s in synth for i in _fields(s, 1)])
    assert len(synth) == 6 and rna_synth < 0.9 * rna_dmso  # 0.83 at seed 0


def test_sources_shift_each_stain_differently(specs):
    """DMSO intensity per stain moves between sources far more than between fields,
    and not by one common factor (per-stain gains)."""
    dmso = {}
    for s in specs:
        if s["moa"] == CONTROL:
            dmso.setdefault(s["batch"], s)
    logs = {src: np.array([[np.log(i[c].mean()) for c in range(5)]
                           for i in _fields(s, 3, (64, 80), SynthConfig())])
            for src, s in dmso.items()}
    within = np.mean([v.var(axis=0).mean() for v in logs.values()])
    means = np.array([v.mean(axis=0) for v in logs.values()])  # sources x stains
    assert means.var(axis=0).mean() > 3 * within
    relative = means - means.mean(axis=1, keepdims=True)  # remove a common factor per source
    assert relative.var(axis=0).mean() > within
