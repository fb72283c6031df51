"""ProfileTable construction and round trips; aggregation to treatments and wells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core.aggregate import aggregate_treatments, aggregate_wells
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.metadata import DataError, load_metadata
from napari_wsdino.core.profiles import METADATA_COLUMNS, ProfileTable, simulate_profiles


@pytest.fixture(scope="module")
def bundled_table(bundled_dir):
    return load_metadata(bundled_dir, check_files=False).table


def test_from_fields_uses_pycytominer_names(bundled_table):
    feats = np.random.default_rng(0).normal(size=(len(bundled_table), 5)).astype(np.float32)
    p = ProfileTable.from_fields(bundled_table, feats)
    assert tuple(p.meta.columns[:8]) == METADATA_COLUMNS
    assert {"Metadata_Replicate", "Metadata_path_DAPI"} <= set(p.meta.columns)
    assert p.feature_names == ["f0000", "f0001", "f0002", "f0003", "f0004"]
    assert (p.meta.Metadata_MoA == bundled_table.moa).all()
    assert p.is_control().sum() == 1320
    with pytest.raises(DataError, match="3848 metadata rows but 10 feature rows"):
        ProfileTable.from_fields(bundled_table, feats[:10])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".csv.gz"])
def test_round_trip_keeps_every_column(tmp_path, suffix):
    meta = pd.DataFrame({
        "Metadata_Plate": ["22123", "22123", "Week2_1"],  # looks numeric: must stay text
        "Metadata_Batch": ["Week1", "Week1", "Week2"],
        "Metadata_Well": ["B02", "B03", "C04"],
        "Metadata_Site": [1, 2, 3],
        "Metadata_Compound": ["DMSO", "taxol", "ALLN"],
        "Metadata_Concentration": [0.0, 0.3, 3.0],
        "Metadata_Treatment": ["DMSO@0", "taxol@0.3", "ALLN@3"],
        "Metadata_MoA": ["DMSO", "Microtubule stabilizers", ""],
        "Metadata_Replicate": [1, 2, 3],
        "Metadata_Note": ["a", "b b", "c,d"],
    })
    feats = np.array([[0.1, -2.5, 1e-7], [3.0, 0.0, 2.0], [1.0, 1.0, -1.0]])
    p = ProfileTable(meta, feats, ["DAPI_0", "Tubulin_0", "Actin_0"])
    back = ProfileTable.read(p.write(tmp_path / f"profiles{suffix}"))
    pd.testing.assert_frame_equal(back.meta, p.meta)
    assert back.feature_names == p.feature_names
    assert np.array_equal(back.features, p.features)
    assert list(back.to_frame().columns) == list(p.to_frame().columns)


def test_read_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ProfileTable.read(tmp_path / "none.parquet")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="Unknown profile file type"):
        ProfileTable.read(tmp_path / "x.json")
    pd.DataFrame({"moa": ["a"], "f1": [1.0]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"not numeric.*'moa' -> 'Metadata_MoA'"):
        ProfileTable.read(tmp_path / "bad.csv")
    pd.DataFrame({"Metadata_MoA": ["a"]}).to_csv(tmp_path / "nofeat.csv", index=False)
    with pytest.raises(DataError, match="no feature columns"):
        ProfileTable.read(tmp_path / "nofeat.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="Cannot read profiles"):
        ProfileTable.read(tmp_path / "broken.parquet")


def test_check_finite_and_constant_features():
    meta = pd.DataFrame({"Metadata_MoA": ["DMSO", "A", "B"]})
    p = ProfileTable(meta, np.array([[1.0, 2.0, np.nan], [1.0, 3.0, 0.0], [1.0, 4.0, np.inf]]),
                     ["c", "v", "bad"])
    with pytest.raises(DataError, match=r"2 feature value\(s\) are NaN or infinite.*\['bad'\]"):
        p.check_finite()
    assert p.constant_features() == ["c"]
    assert p.drop_constant_features().feature_names == ["v", "bad"]


def field_rows(spec):
    """Field-level profiles from (treatment, plate, value) rows; one feature."""
    rows = [{"Metadata_Plate": pl, "Metadata_Batch": pl[:2], "Metadata_Well": f"W{i}",
             "Metadata_Site": 1, "Metadata_Compound": t.split("@")[0],
             "Metadata_Concentration": float(t.split("@")[1]), "Metadata_Treatment": t,
             "Metadata_MoA": "DMSO" if t.startswith("DMSO") else "M"}
            for i, (t, pl, _) in enumerate(spec)]
    return ProfileTable(pd.DataFrame(rows), np.array([[v, -v] for *_, v in spec], float), ["a", "b"])


def test_treatment_profile_is_median_of_plate_means():
    spec = [
        # t@1 on three plates: plate means 2, 4 and 30 -> median 4 (the mean would be 12).
        ("t@1", "B1_p1", 1.0), ("t@1", "B1_p1", 3.0),
        ("t@1", "B1_p2", 4.0),
        ("t@1", "B2_p3", 20.0), ("t@1", "B2_p3", 40.0),
        # s@10 on two plates: means 1 and 2 -> median 1.5; s@2 sorts before s@10.
        ("s@10", "B1_p1", 1.0), ("s@10", "B2_p3", 2.0),
        ("s@2", "B1_p2", 7.0), ("s@2", "B1_p2", 9.0),
        ("DMSO@0", "B1_p1", 100.0),
    ]
    t = aggregate_treatments(field_rows(spec))
    assert t.meta.Metadata_Treatment.tolist() == ["s@2", "s@10", "t@1"]
    assert t.features[:, 0].tolist() == [8.0, 1.5, 4.0]
    assert t.features[:, 1].tolist() == [-8.0, -1.5, -4.0]
    assert t.meta.Metadata_Batch.tolist() == ["B1", "B1,B2", "B1,B2"]
    assert t.meta.Metadata_Plates.tolist() == [1, 2, 3]
    assert t.meta.Metadata_Fields.tolist() == [2, 2, 5]


def test_treatment_with_two_moas_is_an_error():
    p = field_rows([("t@1", "B1_p1", 1.0), ("t@1", "B1_p2", 2.0), ("u@1", "B1_p1", 0.0)])
    p.meta.loc[1, "Metadata_MoA"] = "other"
    with pytest.raises(DataError, match="several values of Metadata_MoA"):
        aggregate_treatments(p)


def test_bbbc021_aggregates_to_103_treatments_and_wells(bundled_table):
    p = simulate_profiles(bundled_table, 4)
    t = aggregate_treatments(p)
    assert len(t) == 103 and t.meta.Metadata_Treatment.is_unique
    taxol = t.meta.set_index("Metadata_Treatment").loc["taxol@0.3"]
    assert taxol.Metadata_Plates == 55 and len(taxol.Metadata_Batch.split(",")) == 10
    assert t.meta.Metadata_Fields.sum() == 2528
    w = aggregate_wells(p)
    n_wells = bundled_table.groupby(["plate", "well"]).ngroups
    assert len(w) == n_wells and "Metadata_Site" not in w.meta
    assert w.meta.Metadata_Fields.sum() == 3848
    first = w.meta.iloc[0]
    rows = (p.meta.Metadata_Plate == first.Metadata_Plate) & (p.meta.Metadata_Well == first.Metadata_Well)
    assert np.allclose(w.features[0], p.features[rows.to_numpy()].astype(float).mean(axis=0))


def test_evaluate_reports_missing_moa_and_nan(bundled_table):
    p = simulate_profiles(bundled_table, 4)
    unlabelled = p.with_features(p.features)
    unlabelled.meta.loc[unlabelled.meta.Metadata_Treatment == "ALLN@3", "Metadata_MoA"] = ""
    with pytest.raises(DataError, match=r"1 treatment\(s\) .* have no MoA.*\['ALLN@3'\].*--unannotated drop"):
        evaluate_profiles(unlabelled, "none")
    dropped = evaluate_profiles(unlabelled, "none", unannotated="drop")
    assert dropped.n_treatments == 102 and "without MoA" in dropped.notes[0]
    nan = p.features.copy()
    nan[7, 2] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        evaluate_profiles(p.with_features(nan))
    no_moa = ProfileTable(p.meta.drop(columns="Metadata_MoA"), p.features, p.feature_names)
    with pytest.raises(DataError, match=r"lacks the metadata column\(s\) \['Metadata_MoA'\]"):
        evaluate_profiles(no_moa)


def test_evaluation_core_imports_no_qt_or_napari(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import napari_wsdino.core.evaluation, napari_wsdino.core.figures as plots\n"
        "import pandas as pd\n"
        "fig = plots.confusion_figure(pd.DataFrame(np.eye(2, dtype=int), index=['a','b'], columns=['a','b']))\n"
        f"fig.savefig({str(tmp_path / 'c.png')!r})\n"
        "bad = [m for m in ('qtpy', 'PyQt5', 'napari', 'magicgui', 'superqt') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
