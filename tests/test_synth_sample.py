"""napari sample data from the synthetic replica (no Qt, no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsdino._napari import sample_data


def test_sample_layers_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_data, "SAMPLE_SIZE", (48, 64))
    monkeypatch.setenv("WSDINO_CACHE", str(tmp_path))
    layers = sample_data.replica_taxol_field()
    assert [t for *_, t in layers] == ["image"] * 3
    assert [k["colormap"] for _, k, _ in layers] == ["blue", "green", "red"]
    for data, kwargs, _ in layers:
        assert data.shape == (48, 64) and data.dtype == np.uint16
        assert kwargs["blending"] == "additive"
        assert kwargs["metadata"]["compound"] == "taxol"
        assert "synthetic replica" in kwargs["name"]
    folder = sample_data.sample_replica()
    assert folder.parent == tmp_path and (folder / "BBBC021_v1_image.csv").exists()
    stamp = (folder / "BBBC021_v1_image.csv").stat().st_mtime_ns
    dmso = sample_data.replica_dmso_field()  # reuses the cached replica
    assert dmso[0][1]["metadata"]["moa"] == "DMSO"
    assert (folder / "BBBC021_v1_image.csv").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sample_")]


def test_sample_folder_that_is_a_file_is_named(tmp_path, monkeypatch):
    from napari_wsdino.core.metadata import DataError

    afile = tmp_path / "not_a_folder"
    afile.write_text("x")
    monkeypatch.setenv("WSDINO_CACHE", str(afile))
    with pytest.raises(DataError, match="is a file, not a folder.*WSDINO_CACHE"):
        sample_data.sample_replica()
    assert afile.read_text() == "x"  # nothing written over it


def test_manifest_lists_the_samples():
    from pathlib import Path

    import yaml

    manifest = yaml.safe_load((Path(sample_data.__file__).parents[1] / "napari.yaml").read_text())
    samples = {s["command"] for s in manifest["contributions"]["sample_data"]}
    assert len(samples) == 3  # BBBC021 DMSO and taxol fields, a Cell Painting field
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    for cmd in samples:
        module, func = commands[cmd].split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))
