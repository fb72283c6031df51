"""The paper's epoch protocol in `wsdino study` (issue 29): a snapshot every N epochs, every
one evaluated, the best epoch by NSC (flagged: selected on the test labels, Table 1) and the
mean over epochs (Table 2), NSC / NSCB against epoch in the report."""

from __future__ import annotations

import json
import numpy as np
import pytest

from napari_wsdino.cli import build_parser, main
from napari_wsdino.core.study import SELECTED, _epoch_columns, snapshot_epochs


def test_snapshot_epochs_are_every_nth_and_the_last():
    assert snapshot_epochs(400, 5)[:3] == [5, 10, 15] and len(snapshot_epochs(400, 5)) == 80
    assert snapshot_epochs(12, 5) == [5, 10, 12]
    assert snapshot_epochs(3, 5) == [3]


def test_best_epoch_and_mean_over_epochs_hand_worked():
    curve = [{"epoch": 5, "nsc": 0.50, "nscb": 0.30}, {"epoch": 10, "nsc": 0.70, "nscb": 0.20},
             {"epoch": 15, "nsc": 0.70, "nscb": 0.40}, {"epoch": 20, "nsc": 0.60, "nscb": None}]
    cols = _epoch_columns(curve)
    # NSC ties (10 and 15) are broken by NSCB, as the paper ranks by NSC first
    assert cols["best_epoch"] == f"15 ({SELECTED})"
    assert (cols["best_epoch_nsc"], cols["best_epoch_nscb"]) == (0.70, 0.40)
    assert cols["nsc_over_epochs"] == pytest.approx(0.625)
    assert cols["nscb_over_epochs"] == pytest.approx(0.30)  # the missing NSCB left out
    assert cols["n_epochs"] == 4
    assert _epoch_columns([]) == {}


def test_train_keeps_a_snapshot_every_n_epochs_by_option(capsys):
    args = build_parser().parse_args(["train", "--print-config", "--snapshot-every", "5"])
    assert args.func(args) == 0
    assert "snapshot_every = 5" in capsys.readouterr().out


MOAS = ("Actin disruptors", "Aurora kinase inhibitors", "Eg5 inhibitors",
        "Cholesterol-lowering")


@pytest.fixture(scope="module")
def test_cache(tmp_path_factory):
    """A 48 x 64 px cache (the ``test`` preset's fields) of four MoAs of two or more
    compounds each and the DMSO fields of their plates: nuclei as blobs whose size and
    number follow the MoA. Small enough for a study of a few epochs in seconds."""
    import pandas as pd
    from scipy import ndimage

    from napari_wsdino.core.cache import write_cache
    from napari_wsdino.core.metadata import bundled_metadata_dir, load_metadata

    table = load_metadata(bundled_metadata_dir(), check_files=False).table
    treated = table[table.moa.isin(MOAS)].groupby("treatment").head(1)
    dmso = table[(table.moa == "DMSO") & table.plate.isin(treated.plate)].groupby("plate").head(2)
    table = pd.concat([treated, dmso]).reset_index(drop=True)
    rng = np.random.default_rng(0)
    images = {}
    for ch in ("DAPI", "Tubulin"):
        fields = []
        for moa in table.moa:
            k = MOAS.index(moa) + 1 if moa in MOAS else 0
            spots = np.zeros((48, 64))
            spots[rng.integers(4, 44, 4 + 2 * k), rng.integers(4, 60, 4 + 2 * k)] = 40.0
            fields.append(ndimage.gaussian_filter(spots, 1.5 + 0.3 * k)
                          + 0.05 * rng.standard_normal((48, 64)))
        images[ch] = np.stack(fields).astype(np.float32)
    return write_cache(tmp_path_factory.mktemp("c") / "cache", table, images, {"test": True})


def test_study_snapshot_every_reports_best_epoch_and_mean_over_epochs(test_cache, tmp_path,
                                                                      capsys):
    out = tmp_path / "study"
    assert main(["study", str(test_cache.path), "--out", str(out), "--labels", "compound",
                 "--preset", "test", "--epochs", "3", "--snapshot-every", "1", "--last", "2",
                 "--channels", "DAPI", "--device", "cpu", "--init", "random"]) == 0
    printed = capsys.readouterr().out
    assert "best epoch*" in printed and "over epochs" in printed and "Table 1" in printed
    run = out / "compound_seed0" / "DAPI"
    assert all((run / f"teacher_epoch{e:04d}.pth").exists() for e in (1, 2, 3))

    evals = [e for e in json.loads((out / "evaluations.json").read_text()) if e["epoch"]]
    assert [(e["epoch"], e["last"]) for e in evals] == [(1, False), (2, True), (3, True)]
    nsc = {e["epoch"]: e["nsc"] for e in evals}
    summary = json.loads((out / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["weak_label"] == "compound")
    assert row["n_evals"] == 2 and row["n_epochs"] == 3
    assert row["nsc_mean"] == pytest.approx(np.mean([nsc[2], nsc[3]]))  # the last 2
    assert row["nsc_over_epochs"] == pytest.approx(np.mean(list(nsc.values())))  # Table 2
    best = int(row["best_epoch"].split()[0])
    assert nsc[best] == max(nsc.values()) == row["best_epoch_nsc"]  # Table 1
    assert SELECTED in row["best_epoch"]
    baseline = next(r for r in summary["rows"] if r["model"] == "random-init ViT")
    assert "best_epoch" not in baseline  # no epochs to select from
    assert [(p["epoch"], p["nsc"]) for p in summary["per_epoch"]] == sorted(nsc.items())
    html = (out / "report.html").read_text()
    assert "NSC / NSCB against epoch (every snapshot)" in html
    assert "all evaluated: [1, 2, 3]" in html and "Table 2" in html
