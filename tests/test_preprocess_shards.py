"""Preprocessing in shards by plate (``--shard I/N``) and their merge: the same cache as one run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.metadata import DataError, load_metadata
from napari_wsdino.core.preprocess import (
    PreprocessSettings,
    Shard,
    merge_shards,
    preprocess,
    split_plates,
)
from napari_wsdino.core.progress import run_to_end
from preprocess_data import write_screen

SHAPE = (32, 40)
# Per-plate normalisation: a shard must hold all of a plate's fields to get it right.
SETTINGS = PreprocessSettings(normalize="plate")


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """3 plates x 3 fields x 3 channels, 32 x 40, one truncated TIFF (a field left out)."""
    root = write_screen(tmp_path_factory.mktemp("screen"), n_plates=3, fields_per_plate=3,
                        shape=SHAPE, seed=21)
    meta = load_metadata(root)
    bad = Path(meta.table.loc[4, "path_Actin"])
    bad.write_bytes(bad.read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def reference(screen, tmp_path_factory) -> Path:
    """One unsharded run."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_to_end(preprocess(load_metadata(screen), out, SETTINGS, workers=1))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_cache(got: Path, want: Path) -> None:
    a, b = open_cache(got), open_cache(want)
    assert a.table.equals(b.table)
    for ch in b.channels:
        assert np.array_equal(a.images(ch), b.images(ch))
    assert a.settings == b.settings  # plates, failed, fingerprint, dataset identity ...
    assert a.settings["dataset_id"]["id"] == b.settings["dataset_id"]["id"]


def test_split_plates_whole_plates_balanced_and_deterministic():
    table = pd.DataFrame({"plate": list("aaaaabbbcccdde")})
    parts = split_plates(table, 3)
    assert sorted(p for part in parts for p in part) == list("abcde")
    assert parts == [["a"], ["b", "d"], ["c", "e"]]  # fields: 5, 5, 4
    assert split_plates(table, 1) == [list("abcde")]
    assert Shard(2, 3).plates(table) == ["b", "d"]
    with pytest.raises(DataError, match="6 shards but the dataset has 5 plates.*at most 5"):
        split_plates(table, 6)


def test_shard_spec_errors_name_the_fix():
    assert Shard.parse(" 2/4 ") == Shard(2, 4)
    with pytest.raises(ValueError, match=r"shard 3/2 does not exist.*numbered 1 to 2"):
        Shard.parse("3/2")
    with pytest.raises(ValueError, match=r"'x' is not of the form I/N.*--shard 1/4"):
        Shard.parse("x")
    with pytest.raises(ValueError, match="at least 1"):
        Shard.parse("0/0")
    with pytest.raises(ValueError, match="numbered 1 to 2"):
        Shard(0, 2)


def test_two_shards_in_one_folder_then_merge_equal_one_run(screen, reference, tmp_path):
    meta = load_metadata(screen)
    out = tmp_path / "cache"
    for i in (2, 1):  # any order, as a scheduler may run them
        part = run_to_end(preprocess(meta, out, SETTINGS, workers=1, shard=Shard(i, 2)))
        assert part.path == out / "shards" / f"{i}-of-2"
        assert part.settings["shard"]["plates"] == Shard(i, 2).plates(meta.table)
        assert set(part.table.plate) == set(Shard(i, 2).plates(meta.table))
    shard_ids = {json.loads((out / "shards" / f"{i}-of-2" / "cache.json").read_text())
                 ["dataset_id"]["id"] for i in (1, 2)}
    assert shard_ids == {open_cache(reference).settings["dataset_id"]["id"]}
    with pytest.raises(DataError, match="holds preprocessing shards.*--merge"):
        run_to_end(preprocess(meta, out, SETTINGS, workers=1))  # not unsharded on top

    gen = merge_shards(meta, out, SETTINGS)
    first = next(e for e in gen if e.info.get("phase") == "merge")
    gen.close()  # an interrupted merge: no complete cache, shards kept, resumes
    with pytest.raises(DataError, match="incomplete"):
        open_cache(out)
    assert (out / "shards" / "2-of-2" / "cache.json").exists()
    events = []
    cache = run_to_end(merge_shards(meta, out, SETTINGS), events.append)
    assert first.info["plate"] not in {e.info.get("plate") for e in events}
    assert [e.info["plate"] for e in events if e.info.get("phase") == "merge"] == \
        list(dict.fromkeys(meta.table.plate))[1:]
    assert len(cache) == len(meta.table) - 1 and len(cache.settings["failed"]) == 1
    _assert_same_cache(out, reference)
    assert _files(out) == _files(reference)  # file for file; the shards are gone
    # A shard rerun (a requeued array task) after the merge finds the cache complete.
    again = []
    run_to_end(preprocess(meta, out, SETTINGS, workers=1, shard="1/2"), again.append)
    assert len(again) == 1 and "already complete" in again[0].message
    assert _files(out) == _files(reference)


def test_separate_folders_interrupted_shard_resumes_then_merge(screen, reference, tmp_path):
    meta = load_metadata(screen)
    shard1 = Shard(1, 2)
    assert len(shard1.plates(meta.table)) == 2
    gen = preprocess(meta, tmp_path / "node1", SETTINGS, workers=1, shard=shard1)
    for event in gen:
        if event.info.get("phase") == "plate done":
            break
    gen.close()  # killed after its first plate
    folder = shard1.folder(tmp_path / "node1")
    assert len(json.loads((folder / "cache.json").read_text())["plates"]) == 1
    with pytest.raises(DataError, match=r"Shard .*1-of-2 is unfinished: rerun"):
        run_to_end(merge_shards(meta, tmp_path / "final", SETTINGS, sources=[tmp_path / "node1"]))
    with pytest.raises(DataError, match=r"node2 holds no preprocessing shards.*--out \S*node2"):
        run_to_end(merge_shards(meta, tmp_path / "final", SETTINGS, sources=[tmp_path / "node2"]))
    assert not (tmp_path / "final").exists()  # nothing begun on a refused merge

    events = []
    run_to_end(preprocess(meta, tmp_path / "node1", SETTINGS, workers=1, shard=shard1),
               events.append)
    done = [e.info["plate"] for e in events if e.info.get("phase") == "plate done"]
    assert done == shard1.plates(meta.table)[1:]  # resumed: the first plate not redone
    run_to_end(preprocess(meta, tmp_path / "node2", SETTINGS, workers=2, shard="2/2"))
    # A folder holding shards/, and a shard folder itself.
    sources = [tmp_path / "node1", Shard(2, 2).folder(tmp_path / "node2")]
    cache = run_to_end(merge_shards(meta, tmp_path / "final", SETTINGS, sources=sources))
    _assert_same_cache(cache.path, reference)
    assert _files(tmp_path / "final") == _files(reference)
    assert open_cache(folder).settings["complete"]  # shards given as sources are kept


def test_shards_at_the_same_time_into_one_folder(screen, reference, tmp_path):
    """As a Dask client.map or a SLURM array runs them: side by side, same --out."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "cache"

    def run_shard(index: int) -> int:
        cache = run_to_end(preprocess(load_metadata(screen), out, SETTINGS, workers=1,
                                      shard=Shard(index, 3)))
        return len(cache)

    with ThreadPoolExecutor(3) as pool:
        assert sum(pool.map(run_shard, [1, 2, 3])) == len(load_metadata(screen).table) - 1
    run_to_end(merge_shards(load_metadata(screen), out, SETTINGS))
    assert _files(out) == _files(reference)


def test_merge_refuses_missing_unmatched_or_mixed_shards(screen, tmp_path):
    meta = load_metadata(screen)
    out = tmp_path / "cache"
    with pytest.raises(DataError, match="holds no preprocessing shards.*--shard I/N"):
        run_to_end(merge_shards(meta, out, SETTINGS))
    run_to_end(preprocess(meta, out, SETTINGS, workers=1, shard="1/2"))
    with pytest.raises(DataError, match=r"Shard\(s\) 2/2 not found.*--shard 2/2"):
        run_to_end(merge_shards(meta, out, SETTINGS))
    with pytest.raises(DataError, match=r"different settings \(normalize: 'plate' in the cache"):
        run_to_end(merge_shards(meta, out, PreprocessSettings()))
    run_to_end(preprocess(meta, out, SETTINGS, workers=1, shard="3/3"))
    with pytest.raises(DataError, match="different splits"):
        run_to_end(merge_shards(meta, out, SETTINGS))
    with pytest.raises(DataError, match="at most 3 shards"):
        run_to_end(preprocess(meta, out, SETTINGS, workers=1, shard="4/4"))
    fewer = load_metadata(screen)
    fewer.table = fewer.table[fewer.table.plate != fewer.table.plate.iloc[0]]
    with pytest.raises(DataError, match="different set of fields"):
        run_to_end(merge_shards(fewer, out, SETTINGS, sources=[Shard(1, 2).folder(out)]))
    assert not (out / "cache.json").exists()


def _cli(argv):
    import argparse

    from napari_wsdino.cli import preprocess as cli_preprocess

    parser = argparse.ArgumentParser(prog="wsdino")
    cli_preprocess.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_shards_and_merge(screen, reference, tmp_path, capsys):
    out = tmp_path / "cache"
    base = ["preprocess", screen, "--out", out, "--normalize", "plate", "--workers", "1",
            "--quiet"]
    for spec in ("1/2", "2/2"):
        assert _cli(base + ["--shard", spec]) == 0
    said = capsys.readouterr().out
    assert "Shard 2/2 done" in said and "--merge" in said
    assert _cli(base + ["--merge"]) == 0
    assert "8 fields x 3 channels" in capsys.readouterr().out
    _assert_same_cache(out, reference)
    for bad, words in (("3/2", "shard 3/2 does not exist"), ("x", "not of the form I/N")):
        with pytest.raises(SystemExit) as info:
            _cli(base + ["--shard", bad])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --shard" in err and words in err and "--shard 1/4" in err
    with pytest.raises(SystemExit):
        _cli(base + ["--shard", "1/2", "--merge"])
    assert "not allowed with argument" in capsys.readouterr().err
