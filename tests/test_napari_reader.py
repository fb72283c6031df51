"""The npe2 manifest and the BBBC021 reader, through napari itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_helpers import write_tiny_dataset

from napari_wsdino._napari.reader import get_reader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_dataset(tmp_path / "bbbc", plates=1, wells=2, sites=1)


def test_manifest_validates_and_is_the_packaged_one():
    import npe2

    link = ROOT / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "napari_wsdino" / "napari.yaml").resolve()
    manifest = npe2.PluginManifest.from_file(ROOT / "napari.yaml")
    ids = {c.id for c in manifest.contributions.commands}
    assert "napari-wsdino.get_reader" in ids
    assert manifest.contributions.readers[0].accepts_directories
    for cmd in manifest.contributions.commands:
        assert cmd.python_name.startswith("napari_wsdino._napari."), cmd.python_name
    cli = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-wsdino"],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "valid" in cli.stdout, cli.stdout + cli.stderr


def test_every_manifest_command_imports():
    import importlib

    import npe2

    manifest = npe2.PluginManifest.from_file(ROOT / "napari.yaml")
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name


def test_reader_declines_junk(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    other_csv = tmp_path / "table.csv"
    other_csv.write_text("a,b\n1,2\n")
    binary_csv = tmp_path / "bin.csv"
    binary_csv.write_bytes(bytes(range(256)) * 4)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for path in (tmp_path / "nope", str(junk), str(other_csv), str(binary_csv),
                 str(empty_dir), [str(junk), str(other_csv)], None, 42):
        assert get_reader(path) is None, path


def test_reader_opens_folder_and_csv(tiny):
    for path in (str(tiny), str(tiny / "BBBC021_v1_image.csv"), [str(tiny)]):
        reader = get_reader(path)
        assert reader is not None
        layers = reader(path)
        assert [kw["name"] for _, kw, _ in layers] == ["DAPI", "Tubulin", "Actin"]
        assert [kw["colormap"] for _, kw, _ in layers] == ["blue", "green", "red"]
        for c, (data, kw, kind) in enumerate(layers):
            assert kind == "image" and kw["blending"] == "additive"
            assert data.dtype == np.uint16 and data.shape == (48, 64)
            assert abs(data.mean() - (1000 + 100 * c)) < 20  # field 0 of the CSV
            meta = kw["metadata"]
            assert meta["plate"] == "Week10_40111" and meta["site"] == 1
            assert meta["compound"] == "taxol" and meta["moa"] == "Microtubule stabilizers"
            assert meta["batch"] == "Week10" and meta["channel"] == kw["name"]
            lo, hi = kw["contrast_limits"]
            assert lo < data.mean() < hi


def test_reader_skips_fields_with_missing_files(tiny):
    first_dapi = sorted(tiny.rglob("*_s1_w1*.tif"))
    # delete the first CSV row's DAPI file: the reader must show the next complete field
    import pandas as pd

    row = pd.read_csv(tiny / "BBBC021_v1_image.csv").iloc[0]
    (tiny / row.Image_PathName_DAPI / row.Image_FileName_DAPI).unlink()
    assert len(first_dapi) == 2
    layers = get_reader(str(tiny))(str(tiny))
    assert abs(layers[0][0].mean() - 2000) < 20
    assert layers[0][1]["metadata"]["well"] != row.Image_Metadata_Well_DAPI


def test_reader_opens_official_csv_with_unannotated_compounds(tiny):
    """The full official image CSV lists compounds without an MoA row: they are left out,
    the annotated fields still open."""
    import pandas as pd

    moa = pd.read_csv(tiny / "BBBC021_v1_moa.csv")
    moa[moa.compound != "taxol"].to_csv(tiny / "BBBC021_v1_moa.csv", index=False)
    layers = get_reader(str(tiny))(str(tiny))
    assert layers[0][1]["metadata"]["compound"] != "taxol"
    assert abs(layers[0][0].mean() - 2000) < 20


def test_viewer_opens_dataset_with_plugin(make_napari_viewer, tiny):
    viewer = make_napari_viewer()
    viewer.open(str(tiny), plugin="napari-wsdino")
    assert [layer.name for layer in viewer.layers] == ["DAPI", "Tubulin", "Actin"]
    assert all(layer.blending == "additive" for layer in viewer.layers)
    assert viewer.layers["DAPI"].metadata["treatment"] == "taxol@" + \
        format(viewer.layers["DAPI"].metadata["concentration"], "g")
