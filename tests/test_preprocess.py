"""Preprocessing into a cache: contents, alignment, resume, bad files, settings, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsdino.core import illumination as il
from napari_wsdino.core import preprocess as pp
from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.imageio import ImageReadError, read_tiff
from napari_wsdino.core.metadata import DataError, load_metadata
from napari_wsdino.core.preprocess import (
    PreprocessSettings,
    plate_functions,
    preprocess,
    process_field,
)
from napari_wsdino.core.progress import run_to_end
from preprocess_data import tile_background_cv, write_screen

SHAPE = (64, 80)


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """3 plates x 4 fields x 3 channels, 64 x 80, vignetted."""
    return write_screen(tmp_path_factory.mktemp("screen"), n_plates=3, fields_per_plate=4,
                        shape=SHAPE, seed=11)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _raw(row, channels) -> np.ndarray:
    return np.stack([read_tiff(row[f"path_{c}"]) for c in channels])


def test_cache_contents_and_alignment_with_metadata(screen, tmp_path):
    meta = load_metadata(screen)
    settings = PreprocessSettings(size=SHAPE, clip=None, normalize="none")
    cache = run_to_end(preprocess(meta, tmp_path / "cache", settings, workers=1))

    reopened = open_cache(tmp_path / "cache")
    assert len(reopened) == len(meta.table) == 12
    assert reopened.channels == meta.channels
    assert reopened.shape == SHAPE
    assert reopened.settings["settings"]["disk_radius"] == il.disk_radius(20)  # 320 at 64x80
    cols = ["plate", "well", "site", "compound", "concentration", "moa"]
    assert reopened.table[cols].equals(meta.table[cols])
    size = il.scaled_filter_size(320, SHAPE)
    for plate, rows in meta.table.groupby("plate", sort=False):
        raws = [_raw(r, meta.channels) for _, r in rows.iterrows()]
        for c, ch in enumerate(meta.channels):
            # The stored function is CellProfiler's, from this plate's images only.
            expected = il.illumination_function(il.mean_image(r[c] for r in raws), size)
            assert np.array_equal(cache.illumination(plate, ch), expected)
        functions = [cache.illumination(plate, ch) for ch in meta.channels]
        for i, raw in zip(rows.index, raws):
            stored = cache.images("DAPI")[i]
            assert stored.dtype == np.float16
            want = process_field(raw, functions, settings).astype(np.float16)
            assert np.array_equal(cache.field(i), want.astype(np.float32))
            assert np.array_equal(stored, want[0])

    # The vignette is gone from the cached (corrected) images: background CV falls.
    vig = np.load(screen / "vignette_DAPI.npy")
    fields = [(_raw(r, ["DAPI"])[0].astype(float), cache.images("DAPI")[i].astype(float))
              for i, r in meta.table.iterrows()]
    masks = [raw > np.median(raw) * 1.3 * vig / vig.max() for raw, _ in fields]
    raw_cv = np.mean([tile_background_cv(raw, m) for (raw, _), m in zip(fields, masks)])
    cor_cv = np.mean([tile_background_cv(cor, m) for (_, cor), m in zip(fields, masks)])
    assert cor_cv < raw_cv / 2.5


def test_default_settings_half_size_zscore(screen, tmp_path):
    meta = load_metadata(screen)
    cache = run_to_end(preprocess(meta, tmp_path / "cache", workers=1))
    assert cache.shape == (32, 40)
    x = np.asarray(cache.images("Actin"), dtype=np.float64)
    assert np.allclose(x.mean(axis=(1, 2)), 0, atol=2e-3)
    assert np.allclose(x.std(axis=(1, 2)), 1, atol=2e-3)
    rec = cache.settings["settings"]
    assert rec["clip"] == 10000.0 and rec["input_shape"] == list(SHAPE)
    assert PreprocessSettings.from_record(rec) == PreprocessSettings(size=(32, 40))


def test_resume_after_interruption_is_byte_identical(screen, tmp_path):
    meta = load_metadata(screen)
    # Reference: uninterrupted, two worker processes.
    run_to_end(preprocess(meta, tmp_path / "ref", workers=2))

    # Stop in the middle of the second plate, after some of its rows are written
    # (chunks of 2 fields here, 4 in the reference: chunking must not matter either).
    gen = preprocess(meta, tmp_path / "cut", workers=1, chunk_size=2)
    first = None
    for event in gen:
        if event.info.get("phase") == "plate done":
            first = event.info["plate"]
        if first and event.info.get("phase") == "correct" and event.info["plate"] != first:
            break
    gen.close()  # as napari's worker.quit() or Ctrl-C would
    state = json.loads((tmp_path / "cut" / "cache.json").read_text())
    assert state["complete"] is False and list(state["plates"]) == [first]
    with pytest.raises(DataError, match="incomplete"):
        open_cache(tmp_path / "cut")
    done_fn = tmp_path / "cut" / "illumination" / f"{first}_DAPI.npy"
    stamp = done_fn.stat().st_mtime_ns

    events = []
    cache = run_to_end(preprocess(meta, tmp_path / "cut", workers=1), events.append)
    assert len(cache) == len(meta.table)
    assert first not in {e.info.get("plate") for e in events}  # not redone
    assert done_fn.stat().st_mtime_ns == stamp
    ref, cut = _files(tmp_path / "ref"), _files(tmp_path / "cut")
    assert sorted(ref) == sorted(cut)
    for name in ref:
        assert ref[name] == cut[name], name


def test_corrupt_tiff_reported_and_rest_of_plate_processed(tmp_path):
    root = write_screen(tmp_path / "data", n_plates=1, fields_per_plate=5, shape=SHAPE, seed=5)
    meta = load_metadata(root)
    bad = Path(meta.table.loc[2, "path_Tubulin"])
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: header intact, pixels gone
    events = []
    cache = run_to_end(preprocess(meta, tmp_path / "cache", workers=1), events.append)

    reported = [e for e in events if e.info.get("failed_path")]
    assert [e.info["failed_path"] for e in reported] == [str(bad)]
    assert str(bad) in reported[0].message
    assert len(cache) == 4
    keep = meta.table.drop(index=2).reset_index(drop=True)
    assert cache.table[["well", "site"]].equals(keep[["well", "site"]])
    (failed,) = cache.settings["failed"]
    assert failed["path"] == str(bad)
    assert (failed["well"], failed["site"]) == (meta.table.loc[2, "well"], int(meta.table.loc[2, "site"]))
    # The plate's function comes from the 4 readable fields; every kept row is theirs.
    raws = [_raw(r, meta.channels) for _, r in keep.iterrows()]
    size = il.scaled_filter_size(320, SHAPE)
    fns = [il.illumination_function(il.mean_image(r[c] for r in raws), size) for c in range(3)]
    for i, raw in enumerate(raws):
        want = process_field(raw, fns, PreprocessSettings()).astype(np.float16)
        assert np.array_equal(cache.images("Tubulin")[i], want[1])
    # What a viewer shows for this plate: the same functions, from TIFFs or cache.
    plate = meta.table.plate.iloc[0]
    from_tiffs = plate_functions(meta, plate)
    from_cache = plate_functions(meta, plate, cache=cache)
    for c, ch in enumerate(meta.channels):
        assert np.array_equal(from_tiffs[ch], fns[c])
        assert np.array_equal(from_cache[ch], fns[c])


def test_file_failing_on_second_read_keeps_the_other_rows(tmp_path, monkeypatch):
    root = write_screen(tmp_path / "data", n_plates=1, fields_per_plate=5, shape=SHAPE, seed=6)
    meta = load_metadata(root)
    ref = run_to_end(preprocess(meta, tmp_path / "ref", PreprocessSettings(illumination="none"),
                                workers=1))
    flaky = meta.table.loc[1, "path_DAPI"]
    reads = {"n": 0}
    original = pp.workers._read_field  # what the worker tasks read fields with

    def read(paths, shape):
        if flaky in paths:
            reads["n"] += 1
            if reads["n"] == 2:
                raise ImageReadError(flaky, "vanished")
        return original(paths, shape)

    monkeypatch.setattr(pp.workers, "_read_field", read)
    cache = run_to_end(preprocess(meta, tmp_path / "cache",
                                  PreprocessSettings(illumination="none"), workers=1))
    assert len(cache) == 4 and cache.settings["failed"][0]["path"] == flaky
    kept = [0, 2, 3, 4]
    assert cache.images("DAPI").shape[0] == 4
    assert np.array_equal(cache.images("DAPI")[:], ref.images("DAPI")[kept])
    assert np.array_equal(cache.images("Actin")[:], ref.images("Actin")[kept])


def test_settings_mismatch_and_foreign_folders_refused(screen, tmp_path):
    meta = load_metadata(screen)
    out = tmp_path / "cache"
    run_to_end(preprocess(meta, out, workers=1))
    with pytest.raises(DataError, match=r"different settings \(clip: 10000.0 in the cache, 5000.0"):
        run_to_end(preprocess(meta, out, PreprocessSettings(clip=5000), workers=1))
    with pytest.raises(DataError, match="size"):
        run_to_end(preprocess(meta, out, PreprocessSettings(size=(16, 20)), workers=1))
    fewer = load_metadata(screen)
    fewer.table = fewer.table[fewer.table.plate != fewer.table.plate.iloc[0]]
    with pytest.raises(DataError, match="different set of fields"):
        run_to_end(preprocess(fewer, out, workers=1))
    # Same settings on a complete cache: nothing is redone.
    before = _files(out)
    events = []
    run_to_end(preprocess(meta, out, workers=1), events.append)
    assert len(events) == 1 and "already complete" in events[0].message
    assert _files(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a preprocessed cache"):
        run_to_end(preprocess(meta, other, workers=1))


def test_settings_validation_and_record():
    with pytest.raises(ValueError, match="size"):
        PreprocessSettings(size=(0, 5))
    with pytest.raises(ValueError, match="normalize"):
        PreprocessSettings(normalize="minmax")
    with pytest.raises(ValueError, match="clip"):
        PreprocessSettings(normalize="paper", clip=None)
    s = PreprocessSettings(size=[100, 120], clip=5000, filter_size=160)
    assert s.size == (100, 120)
    rec = s.record((1024, 1280))
    assert rec["disk_radius"] == il.disk_radius(160) and rec["size"] == [100, 120]
    assert PreprocessSettings.from_record(json.loads(json.dumps(rec))) == s
    assert PreprocessSettings().record((256, 320))["filter_size_scaled"] == 80.0


def test_process_field_clip_and_paper_normalisation():
    raw = np.zeros((1, 16, 20), np.uint16)
    raw[0, :8] = 30000  # above the clip
    raw[0, 8:] = 2000
    fn = np.full((16, 20), 2.0, np.float32)
    out = process_field(raw, [fn], PreprocessSettings(size=(16, 20), normalize="paper"))
    assert out.max() == 1.0  # clipped at 10000 counts after correction, / 10000
    assert np.allclose(out[0, 12:], 1000 / 10000)
    counts = process_field(raw, [fn], PreprocessSettings(size=(8, 10), normalize="none"))
    assert counts.shape == (1, 8, 10) and counts.min() >= 0 and counts.max() <= 10000


def _cli(argv):
    """Parse with the preprocess subcommand alone (importing every subcommand is slow)."""
    import argparse

    from napari_wsdino.cli import preprocess as cli_preprocess

    parser = argparse.ArgumentParser(prog="wsdino")
    cli_preprocess.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_preprocess(screen, tmp_path, capsys):
    out = tmp_path / "cache"
    code = _cli(["preprocess", str(screen), "--out", str(out), "--size", "16", "20",
                 "--workers", "1", "--quiet"])
    assert code == 0
    assert "12 fields x 3 channels" in capsys.readouterr().out
    assert open_cache(out).shape == (16, 20)
    # DataError is what `wsdino` turns into exit code 2 with the message.
    with pytest.raises(DataError, match="different settings"):
        _cli(["preprocess", str(screen), "--out", str(out), "--clip", "0", "--quiet"])
    with pytest.raises(DataError, match="Invalid preprocessing option"):
        _cli(["preprocess", str(screen), "--out", str(tmp_path / "x"), "--size", "0", "5"])
