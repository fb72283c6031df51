"""``wsdino embed`` under torchrun: two CPU processes on gloo give the single process's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.cli import main
from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.embed import embed_cache, parts_folder
from napari_wsdino.core.embed.parts import shard_chunks
from napari_wsdino.core.metadata import treatment_name
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.progress import run_to_end

pytestmark = pytest.mark.slow

CHANNELS = ("DAPI", "Actin")
N_FIELDS = 36
CHUNK = 4  # 9 chunks: rank 0 gets 0, 2, 4, 6, 8 (20 fields), rank 1 gets 1, 3, 5, 7 (16)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(3)
    compounds = ["DMSO", "taxol", "AZ138"]
    rows = [{"plate": f"P{1 + i // 12}", "batch": f"B{1 + i // 12}", "well": f"B{2 + i % 12:02d}",
             "site": 1, "replicate": 1, "compound": compounds[i % 3],
             "concentration": 0.0 if i % 3 == 0 else 0.3,
             "treatment": treatment_name(compounds[i % 3], 0.0 if i % 3 == 0 else 0.3),
             "moa": "DMSO" if i % 3 == 0 else "Microtubule stabilizers"} for i in range(N_FIELDS)]
    images = {c: rng.random((N_FIELDS, 40, 48)).astype(np.float32) for c in CHANNELS}
    return write_cache(tmp_path_factory.mktemp("torchrun") / "cache", pd.DataFrame(rows), images)


def _args(cache, out) -> list[str]:
    return ["embed", str(cache.path), "--random", "--arch", "test_vit", "--crop", "16",
            "--chunk-size", str(CHUNK), "--batch-size", "3", "--device", "cpu", "--out", str(out)]


def _torchrun(args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 --no-python wsdino ARGS`` on gloo, on a free port
    (``-m napari_wsdino.cli``: the ``wsdino`` script's own entry point)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", "-m", "napari_wsdino.cli", *args, "--quiet"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _stopped_run(cache, out, chunks_done: int) -> None:
    """A single-process run of the same settings, stopped once ``chunks_done`` chunks are
    on disk (a chunk is saved after its last event)."""
    models = ModelSet.random("test_vit", cache.channels, seed=0)  # what --random builds
    gen = embed_cache(cache, models, out, crop=16, chunk_size=CHUNK, batch_size=3, device="cpu")
    for event in gen:
        if event.step >= (chunks_done + 1) * CHUNK:
            break
    gen.close()


def _single_process(cache, tmp_path) -> ProfileTable:
    out = tmp_path / "single.parquet"
    assert main([*_args(cache, out), "--quiet"]) == 0
    return ProfileTable.read(out)


def test_shards_are_dealt_round_robin():
    assert shard_chunks(9, 0, 2) == [0, 2, 4, 6, 8] and shard_chunks(9, 1, 2) == [1, 3, 5, 7]
    assert sorted(shard_chunks(7, 0, 3) + shard_chunks(7, 1, 3) + shard_chunks(7, 2, 3)) == list(range(7))
    assert shard_chunks(3) == [0, 1, 2]
    assert shard_chunks(2, 3, 4) == []  # more ranks than chunks: nothing to do, no error


def test_two_gloo_processes_give_the_single_process_table(cache, tmp_path):
    single = _single_process(cache, tmp_path)
    out = tmp_path / "two.parquet"
    proc = _torchrun(_args(cache, out))
    lines = proc.stdout.splitlines()
    assert "rank 0 embedded 20 fields" in lines and "rank 1 embedded 16 fields" in lines
    assert f"wrote {N_FIELDS} profiles x 128 features to {out}" in lines
    assert sum("wrote" in ln for ln in lines) == 1  # rank 0 alone reports
    two = ProfileTable.read(out)
    pd.testing.assert_frame_equal(two.meta, single.meta)  # same rows, same order
    assert two.feature_names == single.feature_names
    np.testing.assert_allclose(two.features, single.features, atol=1e-6)
    ranks = json.loads(out.with_suffix(".json").read_text())["ranks"]
    assert [(r["rank"], r["fields"], r["computed"], r["resumed"]) for r in ranks] == [
        (0, 20, 20, 0), (1, 16, 16, 0)]
    assert sum(r["fields"] for r in ranks) == N_FIELDS
    assert not parts_folder(out).exists()
    assert not list(tmp_path.glob(".tmp-*"))  # merged by renaming a finished file


def test_torchrun_resumes_the_chunks_of_a_stopped_run(cache, tmp_path):
    single = _single_process(cache, tmp_path)
    out = tmp_path / "resumed.parquet"
    _stopped_run(cache, out, 2)
    parts = parts_folder(out)
    assert sorted(p.name for p in parts.glob("chunk_*.npy")) == ["chunk_00000.npy", "chunk_00001.npy"]
    marked = np.full((CHUNK, 128), 0.5, np.float32)  # taken from disk, never recomputed
    np.save(parts / "chunk_00000.npy", marked)
    proc = _torchrun(_args(cache, out))
    lines = proc.stdout.splitlines()
    assert "rank 0 embedded 20 fields, 4 of them from an earlier run" in lines
    assert "rank 1 embedded 16 fields, 4 of them from an earlier run" in lines
    two = ProfileTable.read(out)
    np.testing.assert_array_equal(two.features[:CHUNK], 0.5)
    np.testing.assert_allclose(two.features[CHUNK:], single.features[CHUNK:], atol=1e-6)
    pd.testing.assert_frame_equal(two.meta, single.meta)
    assert not parts.exists()


def test_a_resume_with_other_settings_stops_every_rank(cache, tmp_path):
    out = tmp_path / "other.parquet"
    _stopped_run(cache, out, 1)
    proc = _torchrun([*_args(cache, out), "--pooling", "cls+mean"], ok=False)
    assert proc.returncode != 0 and not out.exists()
    assert "different settings (pooling)" in proc.stderr and "--overwrite" in proc.stderr
    assert "rank 0 could not prepare" in proc.stderr  # rank 1 stopped too, and said why
    assert (parts_folder(out) / "chunk_00000.npy").exists()  # the earlier work is kept
