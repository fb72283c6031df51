"""`wsdino demo` end to end (test-sized preset), its resume, and `wsdino study` on its cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.cli import main
from napari_wsdino.core.pipeline import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", str(out), "--preset", "test", "--workers", "1", "--device", "cpu",
                 "--init", "replica-dino-pico8-cells"]) == 0
    return out


def test_demo_report_holds_table_figures_and_json(demo_dir):
    html = (demo_dir / "report.html").read_text()
    assert "synthetic replica" in html
    for caption in ("MoA confusion matrix (NSC)", "UMAP of treatment profiles by MoA",
                    "UMAP of treatment profiles by batch", "Training curves",
                    "Self-attention, one field per MoA"):
        assert caption in html
    assert len(re.findall(r"data:image/png;base64,", html)) >= 6
    results = json.loads((demo_dir / "results.json").read_text())
    assert results["data"] == "synthetic replica"
    rows = {r["model"]: r for r in results["results"]}
    names = list(rows)
    # WS-DINO, plain DINO at the same budget, the initial weights alone, the random-init ViT,
    # the classical profile and the replica's ground truth (its cells' biology: the ceiling).
    for part in ("WS-DINO", "DINO (none)", "init-only", "random-init", "classical",
                 "ground truth"):
        assert sum(part in n for n in names) == 1, (part, names)
    assert results["replica"] == "v2" and "synthetic replica v2 of BBBC021" in html
    truth = next(r for n, r in rows.items() if "ground truth" in n)
    assert truth["nsc"] >= 0.85 and truth["nsc"] > max(r["nsc"] for n, r in rows.items()
                                                         if "ground truth" not in n)
    assert "fine-tuned from the initial weights replica-dino-pico8-cells" in html
    init_only = pd.read_parquet(demo_dir / "profiles_init_only.parquet")
    random_init = pd.read_parquet(demo_dir / "profiles_random_init.parquet")
    features = [c for c in init_only.columns if not c.startswith("Metadata_")]
    assert features and not np.allclose(init_only[features].to_numpy(float),
                                         random_init[features].to_numpy(float))
    for r in rows.values():
        assert 0.0 <= r["nsc"] <= 1.0 and 0.0 <= r["nscb"] <= 1.0
        # The mini replica keeps all 103 treatments, 92 of them NSCB-eligible.
        assert r["n_nsc"] == 103 and r["n_nscb"] == 92
    for name, r in rows.items():  # attention on cells for every ViT, none for the others
        has = all(f"attention_{ch}" in r for ch in ("DAPI", "Tubulin", "Actin"))
        assert has == ("classical" not in name and "ground truth" not in name)
        if has:
            assert 0.0 < r["attention_DAPI"] < 20.0
    assert set(results["metrics"]) >= {"nsc", "nscb", "map_nsc", "attention_on_cells"}
    assert "NSCB (not-same-compound-or-batch)" in html
    # How to compare rows: the seed-to-seed spread, said in the report and in results.json.
    assert "as ties" in results["reading"] and "as ties" in html
    # What the weak label can teach about batches, counted on the demo's fields: in
    # BBBC021's design only taxol spans weeks.
    assert results["weak_label"].startswith("Weak label 'compound': 37 of the 38 compounds")
    assert "(taxol)" in results["weak_label"] and "37 of the 38 compounds" in html
    assert (demo_dir / "report.csv").read_text().startswith("model,")
    for ch in ("DAPI", "Tubulin", "Actin"):
        assert (demo_dir / "run" / ch / "checkpoint.pth").exists()
        assert (demo_dir / "run_dino" / ch / "checkpoint.pth").exists()


def test_demo_rerun_skips_finished_stages(demo_dir, capsys):
    before = (demo_dir / "profiles.parquet").stat().st_mtime_ns
    assert main(["demo", str(demo_dir), "--preset", "test", "--device", "cpu", "--json",
                 "--init", "replica-dino-pico8-cells"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == ["replica", "preprocess", "train", "embed", "evaluate", "report"]
    assert summary["weak_label"].startswith("37 of 38 compounds sit in one batch")
    assert (demo_dir / "profiles.parquet").stat().st_mtime_ns == before
    # The printed summary says it too.
    assert main(["demo", str(demo_dir), "--preset", "test", "--device", "cpu",
                 "--init", "replica-dino-pico8-cells"]) == 0
    printed = capsys.readouterr().out
    assert "weak label: 37 of 38 compounds sit in one batch (only taxol spans several)" in printed


def test_demo_resumes_a_folder_whose_preset_text_was_reworded(demo_dir, capsys):
    """A preset's description is help text, not a setting: rewording it in a new version
    keeps earlier demo folders resumable (every stage skipped)."""
    path = demo_dir / "stages.json"
    original = path.read_text()
    stages = json.loads(original)
    stages["settings"]["preset"]["description"] = "an older wording of the test preset"
    path.write_text(json.dumps(stages))
    try:
        capsys.readouterr()
        assert main(["demo", str(demo_dir), "--preset", "test", "--device", "cpu", "--json",
                     "--init", "replica-dino-pico8-cells"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["skipped"] == list(STAGES)
    finally:
        path.write_text(original)


def test_demo_refuses_other_settings_in_same_folder(demo_dir, capsys):
    stages = (demo_dir / "stages.json").read_text()
    capsys.readouterr()
    assert main(["demo", str(demo_dir), "--preset", "test", "--weak-label", "moa"]) == 2
    err = capsys.readouterr().err
    assert f"wsdino demo: error: {demo_dir} holds a demo run with other settings (" in err
    assert "'weak_label': 'compound'" in err                    # what the folder was made with
    assert "Use a new output folder, or delete this one to start over." in err
    assert (demo_dir / "stages.json").read_text() == stages     # the folder left as it was


def test_study_two_labels_table(demo_dir, tmp_path, capsys):
    out = tmp_path / "study"
    # No --preset: the one whose views fit the cache's 48 x 64 px fields, "test".
    args = ["study", str(demo_dir / "cache"), "--out", str(out), "--labels", "none,compound",
            "--epochs", "2", "--eval-every", "1", "--last", "2",
            "--channels", "DAPI", "--device", "cpu", "--json", "--init", "replica-dino-pico8-cells"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["weak_label"]) for r in rows] == [
        ("random-init ViT", "none"), ("init-only (no fine-tuning)", "none"),
        ("DINO (none)", "none"), ("WS-DINO (compound)", "compound")]
    assert rows[0]["nsc_mean"] != rows[1]["nsc_mean"] or rows[0]["map_nsc_mean"] != rows[1]["map_nsc_mean"]
    for r in rows[2:]:
        assert r["n_evals"] == 2 and 0 <= r["nsc_mean"] <= 1 and r["nsc_std"] >= 0
        assert "selected with MoA labels" in r["best_epoch"]
    evals = json.loads((out / "evaluations.json").read_text())
    assert sorted({e["epoch"] for e in evals if e["epoch"]}) == [1, 2]
    assert (out / "report.html").exists()
    # Beside the table: what the compound label can teach about batches on these fields.
    html = (out / "report.html").read_text()
    assert "37 of the 38 compounds were imaged in a single batch" in html
    assert "preset test: " in html
    # Resume: a second run reuses every profile file and gives the same table.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("profiles*.parquet")}
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_study_moa_holdout_folds_cover_every_treatment_once(demo_dir, tmp_path, capsys):
    out = tmp_path / "holdout"
    assert main(["study", str(demo_dir / "cache"), "--out", str(out), "--labels", "none",
                 "--preset", "test", "--epochs", "1", "--holdout-folds", "2",
                 "--channels", "DAPI", "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    held = [r for r in rows if r["weak_label"] == "moa (held out)"]
    assert [r["model"] for r in held] == ["WS-DINO (MoA, held-out folds)"]
    assert 0.0 <= held[0]["nsc_mean"] <= 1.0
    evals = [e for e in json.loads((out / "evaluations.json").read_text())
             if e["label"] == "moa (held out)"]
    assert sorted(e["fold"] for e in evals) == [0, 1]
    # Each fold scores only its own compounds; together the folds score all 103 treatments.
    assert sum(e["n_nsc"] for e in evals) == 103
    assert all(0 < e["n_nsc"] < 103 for e in evals)


@pytest.fixture(scope="module")
def cellpainting_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_demo")
    assert main(["demo", str(out), "--preset", "test", "--layout", "cellpainting",
                 "--device", "cpu", "--workers", "1"]) == 0
    return out


def test_demo_on_five_channel_cell_painting_layout(cellpainting_demo):
    """`wsdino demo --layout cellpainting`: five models per run, five attention columns,
    the classical row named by its feature count on five stains, a labelled report."""
    from napari_wsdino.core.classical import feature_names
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.screens import CELLPAINTING_CHANNELS
    from napari_wsdino.core.train import load_checkpoint

    out = cellpainting_demo
    assert (out / "data" / "load_data.csv").exists()
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["results"]}
    assert not any("init-only" in name for name in rows)   # no initial weights, no such row
    n_classical = len(feature_names(CELLPAINTING_CHANNELS))
    assert n_classical != 52  # BBBC021's three stains give 52
    assert f"classical profile ({n_classical} features)" in rows
    for name, r in rows.items():
        attention = sorted(k for k in r if k.startswith("attention_"))
        if "classical" in name:
            assert attention == []
        else:
            assert attention == sorted(f"attention_{c}" for c in CELLPAINTING_CHANNELS)
            assert all(0.0 < r[k] < 20.0 for k in attention)
        # 36 compounds (one per MoA and source) at one dose; each source is a batch.
        assert r["n_nsc"] == 36 and r["n_nscb"] == 36
        assert 0.0 <= r["nsc"] <= 1.0 and 0.0 <= r["nscb"] <= 1.0
    for run in ("run", "run_dino"):
        assert ModelSet.from_run(out / run).channels == CELLPAINTING_CHANNELS
        for ch in CELLPAINTING_CHANNELS:
            ckpt = load_checkpoint(out / run / ch / "checkpoint.pth")
            # The test preset centres crops on nuclei: the cache's first stain, DNA.
            assert ckpt["channel"] == ckpt["config"]["channel"] == ch
            assert ckpt["config"]["nuclei_channel"] == "DNA"
    html = (out / "report.html").read_text()
    assert "synthetic replica" in html and "Cell Painting" in html
    assert "Training curves" in html and "Self-attention, one field per MoA" in html
    assert "attention_Mito" in (out / "report.csv").read_text().splitlines()[0]
    assert json.loads((out / "stages.json").read_text())["settings"]["layout"] == "cellpainting"


def test_demo_refuses_another_layout_in_the_same_folder(cellpainting_demo, capsys):
    stages = (cellpainting_demo / "stages.json").read_text()
    capsys.readouterr()
    assert main(["demo", str(cellpainting_demo), "--preset", "test", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{cellpainting_demo} holds a demo run with other settings (" in err
    assert "'layout': 'cellpainting'" in err
    assert "Use a new output folder, or delete this one to start over." in err
    assert (cellpainting_demo / "stages.json").read_text() == stages
