"""Plate metadata: counts on the real WS-DINO metadata, the official layout, bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.cli import main
from napari_wsdino.core.imageio import ImageReadError, iter_fields, read_tiff, write_tiff, ReadReport
from napari_wsdino.core.metadata import (
    IMAGE_CSV,
    MOA_CSV,
    DataError,
    ScreenLayout,
    groups_across_batches,
    load_metadata,
    nscb_treatments,
    summarise,
)
from napari_wsdino.core.sampler import weak_label_note


def _write_dataset(root, bundled_dir, plates=2, per_plate=6, size=(16, 20), seed=0):
    """A dataset in the official layout: real rows, small random 16-bit TIFFs."""
    images = pd.read_csv(bundled_dir / IMAGE_CSV)
    keep = images.Image_Metadata_Plate_DAPI.drop_duplicates().iloc[:plates]
    rows = images[images.Image_Metadata_Plate_DAPI.isin(keep)]
    rows = rows.groupby("Image_Metadata_Plate_DAPI").head(per_plate)
    rng = np.random.default_rng(seed)
    for _, r in rows.iterrows():
        for ch in ("DAPI", "Tubulin", "Actin"):
            path = root / r[f"Image_PathName_{ch}"] / r[f"Image_FileName_{ch}"]
            write_tiff(path, rng.integers(0, 4000, size, dtype=np.uint16))
    rows.to_csv(root / IMAGE_CSV, index=False)
    shutil.copy(bundled_dir / MOA_CSV, root / MOA_CSV)
    return rows


def test_bundled_metadata_counts(bundled_dir):
    meta = load_metadata(bundled_dir, check_files=False)
    s = summarise(meta.table)
    assert s == {
        "fields": 3848, "plates": 55, "batches": 10, "treatments": 103, "compounds": 38,
        "compounds_multi_batch": 1, "moas": 12, "dmso_fields": 1320, "nscb_treatments": 92, "missing_files": 0,
        "unreadable_files": 0,
    }
    t = meta.table
    assert set(t.batch) == {f"Week{i}" for i in range(1, 11)}
    assert sorted(t.site.unique()) == [1, 2, 3, 4]
    assert (t.plate.str.split("_").str[0] == t.batch).all()
    # The two single-batch MoAs are what NSCB leaves out.
    excluded = set(t[t.moa != "DMSO"].treatment) - set(nscb_treatments(t))
    assert set(t[t.treatment.isin(excluded)].moa) == {"Cholesterol-lowering", "Kinase inhibitors"}
    assert t.loc[t.treatment == "taxol@0.3", "batch"].nunique() == 10
    # Only taxol's WS-DINO pairs can cross a week, with either weak label.
    treated = t[t.moa != "DMSO"]
    assert groups_across_batches(treated, "compound") == (38, ["taxol"])
    assert groups_across_batches(treated, "treatment") == (103, ["taxol@0.3"])
    n, moas = groups_across_batches(treated, "moa")
    assert (n, len(moas)) == (12, 10)  # the two NSCB-excluded MoAs: one week each


def test_weak_label_note_counts_groups_across_batches(bundled_dir):
    t = load_metadata(bundled_dir, check_files=False).table
    note = weak_label_note(t, "compound")
    assert note.startswith("Weak label 'compound': 37 of the 38 compounds were imaged in a "
                           "single batch, 1 in several (taxol), so almost every pair")
    assert "not expected to beat plain DINO on NSCB" in note
    assert weak_label_note(t, "compound", brief=True) == (
        "37 of 38 compounds sit in one batch (only taxol spans several): pairs rarely cross "
        "batches, so expect WS-DINO and plain DINO to tie on NSCB.")
    assert weak_label_note(t, "none") == ""
    assert "cannot be considered a weak label" in weak_label_note(t, "moa")
    # A design where compounds span batches says the opposite.
    spread = t.assign(batch=[f"B{i % 2}" for i in range(len(t))])
    assert weak_label_note(spread, "compound").startswith(
        "Weak label 'compound': all 38 compounds were imaged in several batches, so "
        "WS-DINO's pairs cross batches")
    assert weak_label_note(spread, "compound", brief=True).startswith(
        "All 38 compounds span several batches")
    assert weak_label_note(t[t.moa == "DMSO"], "compound") == ""  # controls only
    # No group across batches at all.
    one = t[t.compound != "taxol"]
    assert weak_label_note(one, "compound").startswith(
        "Weak label 'compound': all 37 compounds were imaged in a single batch, so every pair")


def test_info_json_on_bundled(bundled_dir, capsys):
    assert main(["info", str(bundled_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fields"] == 3848 and out["nscb_treatments"] == 92
    assert out["dmso_fields"] == 1320
    # No images beside the bundled CSVs: every referenced file is reported missing.
    assert out["missing_files"] == 3 * 3848


def test_official_layout_round_trip(tmp_path, bundled_dir, capsys):
    rows = _write_dataset(tmp_path, bundled_dir)
    meta = load_metadata(tmp_path)
    assert len(meta.table) == len(rows) == 12
    assert meta.missing == []
    img = read_tiff(meta.paths("Actin").iloc[0])
    assert img.dtype == np.uint16 and img.shape == (16, 20)
    # Same through the image CSV path and through the CLI.
    assert len(load_metadata(tmp_path / IMAGE_CSV).table) == 12
    assert main(["info", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fields"] == 12 and out["plates"] == 2 and out["missing_files"] == 0
    assert out["unreadable_files"] == 0


def test_unpacked_zip_layout_is_found(tmp_path, bundled_dir):
    """Official zips unpack to <plate>/<file>, not <Week>/<plate>/<file>."""
    rows = _write_dataset(tmp_path, bundled_dir, plates=1, per_plate=2)
    week = rows.Image_PathName_DAPI.iloc[0].split("/")[0]
    plate = rows.Image_Metadata_Plate_DAPI.iloc[0]
    shutil.move(tmp_path / week / plate, tmp_path / plate)
    meta = load_metadata(tmp_path)
    assert all(str(tmp_path / plate) in p for p in meta.paths("DAPI"))


def test_missing_files_error_and_drop(tmp_path, bundled_dir):
    rows = _write_dataset(tmp_path, bundled_dir)
    r = rows.iloc[3]
    (tmp_path / r.Image_PathName_Tubulin / r.Image_FileName_Tubulin).unlink()
    with pytest.raises(DataError, match=r"(?s)1 image file\(s\).*missing.*--drop-missing"):
        load_metadata(tmp_path)
    meta = load_metadata(tmp_path, drop_missing=True)
    assert len(meta.table) == 11 and meta.dropped == 1 and len(meta.missing) == 1
    assert r.Image_FileName_Tubulin in str(meta.missing[0])


def test_missing_columns_named(tmp_path, bundled_dir):
    _write_dataset(tmp_path, bundled_dir, plates=1, per_plate=2)
    df = pd.read_csv(tmp_path / IMAGE_CSV).drop(columns=["Image_Metadata_Compound"])
    df.to_csv(tmp_path / IMAGE_CSV, index=False)
    with pytest.raises(DataError, match="Image_Metadata_Compound"):
        load_metadata(tmp_path)
    moa = pd.read_csv(tmp_path / MOA_CSV).rename(columns={"moa": "mechanism"})
    moa.to_csv(tmp_path / MOA_CSV, index=False)
    with pytest.raises(DataError, match="moa"):
        load_metadata(tmp_path, layout=ScreenLayout(compound_column="Replicate"))


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_or_tab_separated_csv_is_named_with_the_fix(tmp_path, bundled_dir, sep):
    _write_dataset(tmp_path, bundled_dir, plates=1, per_plate=2)
    pd.read_csv(tmp_path / IMAGE_CSV).to_csv(tmp_path / IMAGE_CSV, sep=sep, index=False)
    with pytest.raises(DataError, match=re.escape(f"separated by {sep!r}")) as err:
        load_metadata(tmp_path)
    assert "comma" in str(err.value) and "lacks the column" not in str(err.value)
    # the fix the message gives works
    pd.read_csv(tmp_path / IMAGE_CSV, sep=sep).to_csv(tmp_path / IMAGE_CSV, index=False)
    assert len(load_metadata(tmp_path).table) == 2


def test_treatment_without_moa(tmp_path, bundled_dir):
    _write_dataset(tmp_path, bundled_dir, plates=1, per_plate=24)
    images = pd.read_csv(tmp_path / IMAGE_CSV)
    target = images.loc[images.Image_Metadata_Compound != "DMSO"].iloc[0]
    moa = pd.read_csv(tmp_path / MOA_CSV)
    moa = moa[~((moa.compound == target.Image_Metadata_Compound)
                & (moa.concentration == target.Image_Metadata_Concentration))]
    moa.to_csv(tmp_path / MOA_CSV, index=False)
    with pytest.raises(DataError, match="no row in"):
        load_metadata(tmp_path)
    n_target = ((images.Image_Metadata_Compound == target.Image_Metadata_Compound)
                & (images.Image_Metadata_Concentration == target.Image_Metadata_Concentration)).sum()
    dropped = load_metadata(tmp_path, unannotated="drop")
    assert len(dropped.table) == len(images) - n_target
    kept = load_metadata(tmp_path, unannotated="keep")
    assert (kept.table.moa == "").sum() == n_target


def test_other_screen_layout(tmp_path):
    """A screen with other column and channel names, mapped by a layout file."""
    rng = np.random.default_rng(1)
    rows = []
    for plate in ("P1", "P2"):
        for well in ("A01", "A02"):
            names = {}
            for ch in ("DNA", "ER"):
                name = f"{plate}_{well}_{ch}.tif"
                write_tiff(tmp_path / "imgs" / plate / name, rng.integers(0, 100, (8, 8), dtype=np.uint16))
                names[ch] = name
            rows.append({"Plate": plate, "Well": well, "Drug": "DMSO" if well == "A01" else "x",
                         "Dose": 0.0 if well == "A01" else 1.0, "Batch": "B" + plate[-1],
                         "F_DNA": names["DNA"], "P_DNA": f"imgs/{plate}",
                         "F_ER": names["ER"], "P_ER": f"imgs/{plate}"})
    pd.DataFrame(rows).to_csv(tmp_path / "screen_image.csv", index=False)
    pd.DataFrame({"compound": ["x"], "concentration": [1.0], "moa": ["m"]}).to_csv(
        tmp_path / "screen_moa.csv", index=False)
    mapping = {"file_columns": {"DNA": ["F_DNA", "P_DNA"], "ER": ["F_ER", "P_ER"]},
               "plate_column": "Plate", "well_column": "Well", "compound_column": "Drug",
               "concentration_column": "Dose", "batch_column": "Batch", "replicate_column": None,
               "image_csv": "screen_image.csv", "moa_csv": "screen_moa.csv"}
    meta = load_metadata(tmp_path, ScreenLayout.from_mapping(mapping))
    assert meta.channels == ("DNA", "ER")
    assert list(meta.table.batch) == ["B1", "B1", "B2", "B2"]
    assert list(meta.table.moa) == ["DMSO", "m", "DMSO", "m"]
    assert (meta.table.site == 1).all()
    (tmp_path / "layout.json").write_text(json.dumps(mapping))
    assert main(["info", str(tmp_path), "--layout", str(tmp_path / "layout.json"), "--json"]) == 0
    with pytest.raises(DataError, match="Unknown screen-layout keys"):
        ScreenLayout.from_mapping({"plate_col": "x"})


def test_corrupt_and_truncated_tiffs(tmp_path, bundled_dir, capsys):
    _write_dataset(tmp_path, bundled_dir, plates=1, per_plate=4)
    meta = load_metadata(tmp_path)
    garbage = meta.paths("DAPI").iloc[1]
    with open(garbage, "wb") as fh:
        fh.write(b"not a tiff at all")
    truncated = meta.paths("Actin").iloc[2]
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=garbage.split("/")[-1]):
        read_tiff(garbage)
    with pytest.raises(ImageReadError, match="Cannot read image"):
        read_tiff(truncated)
    report = ReadReport()
    fields = [[meta.paths(c).iloc[i] for c in meta.channels] for i in range(len(meta.table))]
    got = [i for i, _ in iter_fields(fields, report)]
    assert got == [0, 3]
    assert {str(p) for p in report.unreadable} == {garbage, truncated}
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unreadable_files"] == 2


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / IMAGE_CSV).write_text("a,b\n1,2\n")
    (tmp_path / MOA_CSV).write_text("compound,concentration,moa\n")
    assert main(["info", str(tmp_path)]) == 2
    assert "lacks the column(s)" in capsys.readouterr().err


def test_layout_registry_and_round_trip(tmp_path):
    from napari_wsdino.core.metadata import LAYOUTS, get_layout, resolve_layout

    assert list(LAYOUTS) == ["bbbc021", "cellpainting"]
    assert all(p.display_name for p in LAYOUTS.values())
    assert get_layout("bbbc021") == ScreenLayout()
    cp = get_layout("cellpainting")
    assert cp.channels == ("DNA", "ER", "RNA", "AGP", "Mito")
    assert cp.file_columns["Mito"] == ("FileName_OrigMito", "PathName_OrigMito")
    for layout in (ScreenLayout(), cp):
        (tmp_path / "l.json").write_text(json.dumps(layout.to_mapping()))
        assert resolve_layout(str(tmp_path / "l.json")) == layout
    assert resolve_layout("cellpainting") is cp and resolve_layout(None) is None
    with pytest.raises(DataError, match="choose one of"):
        get_layout("jump")
    with pytest.raises(DataError, match="Cannot read layout file"):
        resolve_layout(tmp_path / "nowhere.json")


def _load_data(root, rows):
    """A JUMP-style load_data.csv (five stains) with tiny TIFFs for each row."""
    rng = np.random.default_rng(2)
    out = []
    for src, plate, well, site, jcp, pert, moa in rows:
        row = {"Metadata_Source": src, "Metadata_Plate": plate, "Metadata_Well": well,
               "Metadata_Site": site, "Metadata_JCP2022": jcp, "Metadata_pert_type": pert,
               "Metadata_MoA": moa}
        for stain in ("DNA", "ER", "RNA", "AGP", "Mito"):
            name = f"{well}_f{site}_{stain}.tiff"
            write_tiff(root / "img" / plate / name, rng.integers(0, 99, (8, 8), dtype=np.uint16))
            row[f"FileName_Orig{stain}"], row[f"PathName_Orig{stain}"] = name, f"img/{plate}"
        out.append(row)
    pd.DataFrame(out).to_csv(root / "load_data.csv", index=False)


def test_cellpainting_load_data(tmp_path):
    from napari_wsdino.core.metadata import JUMP_DMSO, detect_layout, get_layout

    _load_data(tmp_path, [
        ("src_a", "P1", "A01", 1, JUMP_DMSO, "negcon", ""),
        ("src_a", "P1", "A01", 2, JUMP_DMSO, "negcon", ""),
        ("src_a", "P1", "B02", 1, "JCP2022_000042", "trt", "tubulin"),
        ("src_b", "P2", "A01", 1, "JCP2022_099999", "negcon", None),  # control by pert_type
        ("src_b", "P2", "B02", 1, "JCP2022_000042", "trt", "tubulin"),
        ("src_b", "P2", "C03", 1, "JCP2022_000007", "trt", None),  # not annotated
    ])
    assert detect_layout(tmp_path) == detect_layout(tmp_path / "load_data.csv") \
        == get_layout("cellpainting")
    with pytest.raises(DataError, match=r"1 treatment\(s\) \(1 fields\) have no row"):
        load_metadata(tmp_path)
    meta = load_metadata(tmp_path, "cellpainting", unannotated="drop")
    t = meta.table
    assert meta.channels == ("DNA", "ER", "RNA", "AGP", "Mito") and meta.no_moa == 1
    assert list(t.batch) == ["src_a"] * 3 + ["src_b"] * 2
    assert list(t.site) == [1, 2, 1, 1, 1]
    assert list(t.moa) == ["DMSO", "DMSO", "tubulin", "DMSO", "tubulin"]
    assert list(t.compound) == ["DMSO", "DMSO", "JCP2022_000042", "DMSO", "JCP2022_000042"]
    assert list(t.treatment) == ["DMSO@0", "DMSO@0", "JCP2022_000042@10", "DMSO@0",
                                 "JCP2022_000042@10"]
    assert read_tiff(meta.paths("Mito").iloc[2]).shape == (8, 8)
    assert summarise(t)["nscb_treatments"] == 1
    pd.read_csv(tmp_path / "load_data.csv").drop(columns=["Metadata_MoA"]).to_csv(
        tmp_path / "load_data.csv", index=False)
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['Metadata_MoA'\]"):
        load_metadata(tmp_path, "cellpainting")
