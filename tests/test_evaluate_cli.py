"""``wsdino evaluate``: JSON output, written files, errors and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.cli import main
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.profiles import ProfileTable, simulate_profiles

KEYS = {"nsc", "nscb", "n_nsc", "n_nscb", "map_nsc", "map_nscb", "per_moa"}


@pytest.fixture(scope="module")
def profiles(bundled_dir):
    table = load_metadata(bundled_dir, check_files=False).table
    return simulate_profiles(table, 16, moa_signal=0.5, seed=4)


@pytest.fixture(scope="module")
def profile_file(profiles, tmp_path_factory):
    return profiles.write(tmp_path_factory.mktemp("profiles") / "fields.parquet")


def test_json_matches_the_core(profile_file, profiles, capsys):
    assert main(["evaluate", str(profile_file), "--json", "--tvn", "per-plate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert KEYS <= set(out)
    assert out["n_nsc"] == 103 and out["n_nscb"] == 92
    expected = evaluate_profiles(profiles, "per-plate")
    assert out["nsc"] == pytest.approx(expected.nsc)
    assert out["nscb"] == pytest.approx(expected.nscb)
    assert out["map_nscb"] == pytest.approx(expected.map_nscb)
    assert out["per_moa"]["Kinase inhibitors"]["nscb"] is None
    assert sum(m["n_nscb"] for m in out["per_moa"].values()) == 92
    assert out["tvn"] == "per-plate" and set(out["knn"]["nsc"]) == {"1", "3", "5"}


def test_out_writes_tables_and_png(profile_file, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(profile_file), "--out", str(out), "--quiet", "--k", "1", "7"]) == 0
    text = capsys.readouterr().out
    assert "NSC " in text and "NSCB" in text and "k=7" in text
    for name in ("treatment_profiles.csv", "neighbours.csv", "confusion_nsc.csv",
                 "confusion_nscb.csv", "confusion_nsc.png", "per_moa.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "confusion_nsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = pd.read_csv(out / "confusion_nsc.csv", index_col=0)
    assert confusion.to_numpy().sum() == 103 and confusion.shape == (12, 12)
    neighbours = pd.read_csv(out / "neighbours.csv")
    assert len(neighbours) == 103
    metrics = json.loads((out / "metrics.json").read_text())
    assert confusion.to_numpy().trace() / 103 == pytest.approx(metrics["nsc"])
    assert len(ProfileTable.read(out / "treatment_profiles.csv")) == 103


def test_bad_input_exits_2_with_a_message(profiles, tmp_path, capsys):
    feats = profiles.features.copy()
    feats[3, 1] = np.nan
    bad = profiles.with_features(feats).write(tmp_path / "nan.csv")
    assert main(["evaluate", str(bad), "--json"]) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.parquet")]) == 2
    assert "not found" in capsys.readouterr().err


def test_single_batch_needs_no_nscb(profiles, tmp_path, capsys):
    one = profiles.subset((profiles.meta.Metadata_Batch == "Week1").to_numpy())
    path = one.write(tmp_path / "week1.parquet")
    assert main(["evaluate", str(path), "--json"]) == 2
    assert "--no-nscb" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--json", "--no-nscb", "--tvn", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nscb"] is None and out["n_nscb"] == 0 and out["n_nsc"] > 0


def test_no_batch_column_is_fine_without_nscb(profiles):
    frame = profiles.to_frame().drop(columns=["Metadata_Batch"])
    result = evaluate_profiles(ProfileTable.from_frame(frame), nscb=False)
    assert result.nscb is None and result.n_nsc == 103
    with pytest.raises(Exception, match="Metadata_Batch"):
        evaluate_profiles(ProfileTable.from_frame(frame))


def test_drop_constant_also_drops_features_constant_on_dmso(profiles):
    x = profiles.features.copy()
    ctl = profiles.is_control()
    x[ctl, 0] = 1.0  # constant over DMSO only; TVN cannot whiten it
    odd = profiles.with_features(x)
    with pytest.raises(Exception, match="constant over the"):
        evaluate_profiles(odd)
    result = evaluate_profiles(odd, drop_constant=True)
    assert result.n_features == profiles.n_features - 1


def test_evaluate_command_loads_no_torch(profile_file):
    """`wsdino evaluate` builds only its own parser and never imports torch (issue 18: the
    evaluation's memory budget at JUMP scale leaves no room for an unused torch)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from napari_wsdino.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['evaluate', {str(profile_file)!r}, '--json']) == 0\n"
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_interrupted_write_over_an_earlier_set_keeps_it(profile_file, tmp_path, capsys,
                                                            monkeypatch):
    """Issue 30 g: Ctrl-C while writing --out over an earlier result leaves that result."""
    from napari_wsdino.core import figures
    from napari_wsdino.core.evaluate_workflow import evaluation_state

    out = tmp_path / "eval"
    assert main(["evaluate", str(profile_file), "--out", str(out), "--quiet"]) == 0
    assert evaluation_state(out) == "complete"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "complete.json" in before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "per_moa_figure", interrupted)  # after the CSVs are written
    assert main(["evaluate", str(profile_file), "--out", str(out), "--quiet", "--no-nscb",
                 "--tvn", "per-plate"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no debris, no mix
    assert evaluation_state(out) == "complete"
    monkeypatch.undo()
    # a finished rerun replaces the whole set, dropping files the new one lacks
    assert main(["evaluate", str(profile_file), "--out", str(out), "--quiet", "--no-nscb"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "confusion_nscb.csv" not in names and "complete.json" in names
    assert json.loads((out / "complete.json").read_text())["nscb"] is None


def test_an_incomplete_set_is_flagged(profile_file, tmp_path, capsys):
    from napari_wsdino.core.evaluate_workflow import evaluation_state

    out = tmp_path / "eval"
    assert evaluation_state(out) == "absent"
    out.mkdir()
    (out / "treatment_profiles.csv").write_text("Metadata_Treatment\n")  # cut short
    assert evaluation_state(out) == "incomplete"
    assert main(["evaluate", str(profile_file), "--out", str(out), "--quiet"]) == 0
    assert "held an incomplete result set" in capsys.readouterr().err
    assert evaluation_state(out) == "complete"


def test_k_above_the_treatments_warns(profile_file, capsys):
    """Issue 30 h: --k 1000 on 103 treatments is a number with a warning."""
    assert main(["evaluate", str(profile_file), "--quiet", "--k", "1", "1000"]) == 0
    err = capsys.readouterr().err
    (warning,) = [ln for ln in err.splitlines() if ln.startswith("warning: --k 1000")]
    assert "103 treatments" in warning and "use k below 103" in warning


def test_many_features_over_few_dmso_fields_warn(profiles, tmp_path, capsys, monkeypatch):
    """Issue 30 (weak): a wide table is whitened with a warning of its cost."""
    from napari_wsdino.cli import evaluate as cli_evaluate

    monkeypatch.setattr(cli_evaluate, "WIDE", 8)
    path = profiles.write(tmp_path / "wide.parquet")
    assert main(["evaluate", str(path), "--quiet", "--tvn", "paper"]) == 0
    err = capsys.readouterr().err
    (warning,) = [ln for ln in err.splitlines() if ln.startswith("warning: 16 features")]
    assert "16 x 16 covariance" in warning and "--tvn per-channel or none" in warning
    assert main(["evaluate", str(path), "--quiet", "--tvn", "none"]) == 0
    assert "warning: 16 features" not in capsys.readouterr().err
