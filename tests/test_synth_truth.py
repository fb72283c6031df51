"""The replica's ground truth (truth.parquet) and its version (replica.json, identity)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_wsdino.cli import main
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.identity import check_dataset, dataset_identity
from napari_wsdino.core.metadata import DataError, load_metadata
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.synth import (TRUTH_FEATURES, TRUTH_FILE, field_specs, make_replica,
                                      read_replica_info, replica_config)
from napari_wsdino.core.synth.truth import field_truth


def test_truth_profile_ranks_the_moas_of_a_tiny_replica(mini_replica):
    truth = ProfileTable.read(mini_replica / TRUTH_FILE)
    meta = load_metadata(mini_replica)
    assert len(truth) == len(meta.table) == 292
    assert truth.feature_names == list(TRUTH_FEATURES)
    assert set(truth.meta["Metadata_Plate"] + truth.meta["Metadata_Well"]) == set(
        meta.table.plate + meta.table.well)
    result = evaluate_profiles(truth, tvn="paper", drop_constant=True)
    assert result.n_nsc == 103 and result.n_nscb == 92
    assert result.nsc >= 0.9, result.nsc


def test_truth_is_the_cells_biology_not_the_imaging():
    spec = next(s for s in field_specs("mini", 1, seed=0) if s["moa"] == "Aurora kinase inhibitors"
                and s["dose"] > 0.8)
    base = field_truth(spec, (64, 80), 0, replica_config("v2"))
    # Imaging knobs change the pixels, never the truth.
    imaging = replica_config("v2", noise=3.0, illumination_strength=0.0, stain_sd=1.0,
                             background_sd=1.0, focus=5.0, exposure_sd=1.0)
    assert np.array_equal(base, field_truth(spec, (64, 80), 0, imaging))
    # The phenotype is in it: polyploid, lobed nuclei and large cells.
    ix = {name: i for i, name in enumerate(TRUTH_FEATURES)}
    dmso = next(s for s in field_specs("mini", 1, seed=0) if s["compound"] == "DMSO")
    control = field_truth(dmso, (64, 80), 0, replica_config("v2"))
    for feature in ("truth_lobed_fraction", "truth_nuc_size", "truth_lobes"):
        assert base[ix[feature]] > control[ix[feature]] + 0.2, feature


def test_evaluate_cli_scores_truth_parquet(mini_replica, tmp_path, capsys):
    assert main(["evaluate", str(mini_replica / TRUTH_FILE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nsc"] >= 0.9


def test_replica_version_is_recorded_and_part_of_the_identity(tmp_path):
    v1 = make_replica(tmp_path / "v1", "mini", 1, (32, 40), seed=5, config=replica_config("v1"))
    v2 = make_replica(tmp_path / "v2", "mini", 1, (32, 40), seed=5)
    assert read_replica_info(v1)["replica"] == "v1"
    info = read_replica_info(v2)
    assert info["replica"] == "v2" and info["seed"] == 5 and info["size"] == [32, 40]
    m1, m2 = load_metadata(v1), load_metadata(v2)
    id1 = dataset_identity(m1.table, m1.channels)
    id2 = dataset_identity(m2.table, m2.channels)
    assert (id1["replica"], id2["replica"]) == ("v1", "v2")
    check = check_dataset(id1, m2.table, m2.channels)
    assert check.same is False and "replica v1" in check.reason
    assert check_dataset(id2, m2.table, m2.channels).same is True


def test_synth_cli_writes_the_chosen_version(tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["synth", str(out), "--replica", "v1", "--sites", "1", "--size", "32", "40",
                 "--quiet"]) == 0
    assert "replica v1" in capsys.readouterr().out
    assert read_replica_info(out)["replica"] == "v1"
    assert (out / TRUTH_FILE).exists()


def test_cellpainting_replica_has_one_version(tmp_path):
    with pytest.raises(DataError, match="one version"):
        make_replica(tmp_path / "cp", layout="cellpainting", size=(32, 40), sites=1,
                     config=replica_config("v2"))
    out = make_replica(tmp_path / "cp", layout="cellpainting", size=(32, 40), sites=1)
    assert read_replica_info(out)["replica"] == "v1"
    assert not (out / TRUTH_FILE).exists()
