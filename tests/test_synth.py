"""Synthetic BBBC021 replica: design, layout, read-back, determinism, phenotypes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from napari_wsdino.cli import SUBCOMMANDS
from napari_wsdino.core.imageio import read_tiff
from napari_wsdino.core.metadata import CONTROL, IMAGE_CSV, MOA_CSV, DataError, load_metadata
from napari_wsdino.core.synth import (
    SUBSETS,
    SynthConfig,
    field_specs,
    make_replica,
    render_spec,
    select_subset,
    write_replica,
)
from napari_wsdino.core.synth.design import bundled_design
from napari_wsdino.core.synth.render import illumination
from napari_wsdino.core.synth.phenotypes import plate_nuisance


def cli(argv):
    """``wsdino`` with only the info and synth subcommands (skips importing torch)."""
    import argparse

    from napari_wsdino.cli import info, synth

    parser = argparse.ArgumentParser(prog="wsdino")
    sub = parser.add_subparsers(dest="command")
    info.add_parser(sub)
    synth.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def design():
    return bundled_design()


@pytest.mark.parametrize("subset", SUBSETS)
def test_subsets_keep_treatments_moas_and_batches(design, subset):
    _, _, table = design
    kept = table[select_subset(table, subset)]
    ann, full_ann = kept[kept.moa != CONTROL], table[table.moa != CONTROL]
    assert ann.treatment.nunique() == 103
    assert ann.moa.nunique() == 12
    # Every MoA keeps every batch it has in the full design (so NSCB stays defined).
    assert (ann.groupby("moa").batch.nunique() == full_ann.groupby("moa").batch.nunique()).all()
    # Every plate that is kept keeps DMSO wells (per-plate normalisation needs them).
    assert set(kept.plate) == set(kept.plate[kept.moa == CONTROL])


def test_subset_sizes_and_sites(design):
    _, _, table = design
    assert select_subset(table, "full").sum() == 3848
    r1 = table[select_subset(table, "replicate1")]
    assert 1300 <= len(r1) <= 1400 and (r1.replicate == 1).mean() > 0.95
    mini = table[select_subset(table, "mini", sites=1)]
    assert set(mini.site) == {1} and len(mini) < 200
    with pytest.raises(DataError, match="subset"):
        select_subset(table, "huge")
    with pytest.raises(DataError, match="sites"):
        select_subset(table, "mini", sites=5)


def test_layout_matches_the_shared_csv(mini_replica, design):
    raw, moa, table = design
    written = pd.read_csv(mini_replica / IMAGE_CSV)
    expected = raw[select_subset(table, "mini")].reset_index(drop=True)
    pd.testing.assert_frame_equal(written, expected)
    pd.testing.assert_frame_equal(pd.read_csv(mini_replica / MOA_CSV), moa)
    referenced = {
        str(Path(p) / f)
        for c in ("DAPI", "Tubulin", "Actin")
        for p, f in zip(written[f"Image_PathName_{c}"], written[f"Image_FileName_{c}"])
    }
    on_disk = {str(p.relative_to(mini_replica)) for p in mini_replica.rglob("*.tif")}
    assert on_disk == referenced
    # <Week>/<plate>/<official name>
    some = sorted(on_disk)[0].split("/")
    assert some[0].startswith("Week") and some[1].startswith(some[0] + "_")
    img = read_tiff(mini_replica / sorted(on_disk)[0])
    assert img.dtype == np.uint16 and img.shape == (64, 80)


def test_loader_and_info_read_it_back(mini_replica, capsys):
    meta = load_metadata(mini_replica)
    summary = meta.summary()
    assert summary["fields"] == len(pd.read_csv(mini_replica / IMAGE_CSV)) == 292
    assert summary["treatments"] == 103 and summary["moas"] == 12
    assert summary["batches"] == 10 and summary["nscb_treatments"] == 92
    assert summary["missing_files"] == 0
    assert cli(["info", str(mini_replica), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fields"] == 292 and info["treatments"] == 103
    assert info["unreadable_files"] == 0 and info["dmso_fields"] == summary["dmso_fields"]


def test_same_seed_byte_identical_across_workers_and_cli(mini_replica, tmp_path):
    """Site-1 fields written by the CLI with 2 processes equal the fixture's bytes."""
    out = tmp_path / "again"
    assert "synth" in SUBCOMMANDS
    assert cli(["synth", str(out), "--subset", "mini", "--sites", "1", "--size", "64", "80",
                 "--seed", "0", "--workers", "2", "--quiet"]) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*.tif"))
    assert len(files) == 3 * 146
    for rel in files:
        assert (out / rel).read_bytes() == (mini_replica / rel).read_bytes(), rel


def test_other_seed_differs(tmp_path):
    spec = field_specs("mini", 1, seed=0)[0]
    a = render_spec(spec, (64, 80), seed=0)
    b = render_spec(spec, (64, 80), seed=1)
    assert np.array_equal(a, render_spec(spec, (64, 80), seed=0))
    assert not np.array_equal(a, b)


def test_large_size_works():
    spec = field_specs("mini", 1, seed=0)[0]
    img = render_spec(spec, (1024, 1280), seed=0)
    assert img.shape == (3, 1024, 1280) and img.dtype == np.uint16
    assert img[0].max() > 4 * np.median(img[0])  # nuclei stand out of the background


def test_small_size_rejected(tmp_path):
    with pytest.raises(DataError, match="too small"):
        make_replica(tmp_path / "x", size=(16, 16))


def _top_dose(specs, moa):
    cands = [s for s in specs if s["moa"] == moa]
    top = max(s["dose"] for s in cands)
    return [s for s in cands if s["dose"] == top]


def _fields(spec, n=6, size=(128, 160)):
    """Render ``n`` fields of one treatment (sites 11.., same plate and well)."""
    return [render_spec({**spec, "site": 10 + k}, size, 0) for k in range(n)]


def _nuclear_areas(img):
    dapi = ndi.gaussian_filter(img[0].astype(float), 1)
    lab, n = ndi.label(dapi > threshold_otsu(dapi))
    area = np.bincount(lab.ravel())[1:]
    return area[area > 10]


@pytest.fixture(scope="module")
def specs():
    return field_specs("full", 1, seed=0)


def test_aurora_nuclei_larger_than_dmso(specs):
    dmso = [s for s in specs if s["moa"] == CONTROL][0]
    aurora = _top_dose(specs, "Aurora kinase inhibitors")[0]
    a_dmso = np.median(np.concatenate([_nuclear_areas(i) for i in _fields(dmso)]))
    a_aur = np.median(np.concatenate([_nuclear_areas(i) for i in _fields(aurora)]))
    assert a_aur > 1.4 * a_dmso


def _tubulin_texture(img):
    """Band-pass (sigma 1 - 4 px) energy of tubulin inside cells, relative to its mean."""
    t = img[1].astype(float)
    t -= np.percentile(t, 2)
    smooth = ndi.gaussian_filter(t, 3)
    cells = smooth > threshold_otsu(smooth)
    band = ndi.gaussian_filter(t, 1) - ndi.gaussian_filter(t, 4)
    return band[cells].std() / t[cells].mean()


def test_tubulin_texture_stabilisers_vs_destabilisers(specs):
    def texture(moa):
        vals = [_tubulin_texture(i) for s in _top_dose(specs, moa)[:3] for i in _fields(s, 2, (256, 320))]
        return np.mean(vals), np.std(vals)

    stab, destab = texture("Microtubule stabilizers"), texture("Microtubule destabilizers")
    # Destabilisers: rounded mitotic cells full of diffuse, bright tubulin (blob-like texture);
    # stabilisers: spread cells with bundled filaments.
    assert destab[0] > stab[0] + 2 * max(stab[1], destab[1])


def test_dose_response_is_monotone(specs):
    from napari_wsdino.core.synth import replica_config

    def doses(specs):
        return {s["concentration"]: s["dose"] for s in specs if s["compound"] == "AZ258"}

    v2 = doses(specs)
    conc = sorted(v2)
    assert len(conc) >= 3
    assert all(v2[a] < v2[b] for a, b in zip(conc, conc[1:]))
    # v1: the lowest doses are weak (EC50 30 % up the tested range); v2 moves every EC50
    # 0.3 log10 units down (dose_shift -0.3), so every dose acts more strongly.
    v1 = doses(field_specs("mini", 1, seed=0, config=replica_config("v1")))
    assert v1[conc[0]] < 0.6 < v1[conc[-1]]
    assert all(v2[c] > v1[c] for c in conc)


def test_illumination_vignetting_is_per_plate_and_correctable():
    plate = plate_nuisance("Week1_22123", 0, SynthConfig())
    field = illumination((64, 80), plate)
    assert field.shape == (3, 64, 80)
    corner, centre = field[:, :4, :4].mean(), field[:, 28:36, 36:44].mean()
    assert centre > 1.1 * corner
    flat = illumination((64, 80), plate_nuisance("Week1_22123", 0, SynthConfig(illumination_strength=0)))
    assert np.allclose(flat, 1.0)
    # The mean of many fields of one plate recovers the field (what preprocessing estimates).
    spec = field_specs("mini", 1, seed=0)[0]
    mean = np.mean([render_spec({**spec, "site": 10 + k}, (64, 80), 0)[2].astype(float)
                    for k in range(24)], axis=0)
    est = ndi.gaussian_filter(mean, 8)
    assert np.corrcoef(est.ravel(), field[2].ravel())[0, 1] > 0.5


def test_batches_shift_intensity(specs):
    """DMSO stain intensity differs between weeks far more than between fields of a week."""
    dmso = [s for s in specs if s["moa"] == CONTROL and s["well"] == "B02"]
    by_week = {}
    for s in dmso:
        by_week.setdefault(s["batch"], s)
    means = {w: [np.log(render_spec({**s, "site": k}, (64, 80), 0)[1].mean()) for k in (1, 2, 3)]
             for w, s in list(by_week.items())[:5]}
    within = np.mean([np.var(v) for v in means.values()])
    between = np.var([np.mean(v) for v in means.values()])
    assert between > 3 * within


def test_generator_yields_progress(tmp_path):
    gen = write_replica(tmp_path / "r", "mini", sites=1, size=(32, 40), workers=1)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        out = stop.value
    assert out == tmp_path / "r"
    assert events[0].step == 0 and events[-1].step == events[-1].total == 146
    assert all(e.stage == "synth" for e in events)


def test_core_imports_no_gui():
    import subprocess
    import sys

    code = ("import sys, napari_wsdino.core.synth, napari_wsdino.core.classical, "
            "napari_wsdino._napari.sample_data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt5', 'magicgui', 'superqt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


#: sha256 over (relative path, pixel bytes) of every TIFF of the v1 replica (mini, 64 x 80,
#: seed 0), from the renderer before it was split into stages and given the Cell Painting
#: stains: refactors must not move a pixel of it, and ``--replica v1`` must keep
#: reproducing it after v2 became the default (issue 27).
MINI_V1_PIXELS_SHA256 = "4af241e2de9dbfe2ffc585726b80667cc2c9959074826424ed743e9e38b649d1"


def test_v1_replica_pixels_pinned(tmp_path):
    import hashlib

    from napari_wsdino.core.synth import replica_config

    out = make_replica(tmp_path / "v1", "mini", size=(64, 80), seed=0, workers=1,
                       config=replica_config("v1"))
    digest = hashlib.sha256()
    files = sorted(out.rglob("*.tif"))
    for f in files:
        digest.update(str(f.relative_to(out)).encode())
        digest.update(np.ascontiguousarray(read_tiff(f)).tobytes())
    assert len(files) == 3 * 292
    assert digest.hexdigest() == MINI_V1_PIXELS_SHA256
    assert json.loads((out / "replica.json").read_text())["replica"] == "v1"


def test_a_size_too_large_for_memory_is_refused_before_writing(tmp_path, monkeypatch):
    """``--size 10000 10000`` once got a worker killed at 5 GiB, leaving half a folder."""
    import napari_wsdino.core.synth as synth

    gib = 2 ** 30
    monkeypatch.setattr(synth, "available_memory", lambda: 4 * gib)
    out = tmp_path / "huge"
    with pytest.raises(DataError, match=r"10000 x 10000 field needs about 18\.6 GiB.*--size"):
        synth.make_replica(out, "mini", 1, (10000, 10000), workers=1)
    assert not out.exists()
    # Fewer processes when all of them would not fit; said in the first progress message.
    events = []
    one = synth.render_memory((512, 640))
    monkeypatch.setattr(synth, "available_memory", lambda: int(2.6 * one / 0.8))
    gen = synth.write_replica(tmp_path / "fits", "mini", 1, (512, 640), workers=8)
    events.append(next(gen))
    gen.close()
    assert "2 of 8 processes" in events[0].message
