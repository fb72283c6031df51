"""Dataset identity (core.identity): a cache knows which dataset it was made from."""

from __future__ import annotations

import shutil

import pytest

from napari_wsdino.core.identity import check_dataset, dataset_identity
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.preprocess import PreprocessSettings, preprocess
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.synth import make_replica


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("ident")
    return {seed: make_replica(root / f"seed{seed}", subset="mini", sites=1, size=(32, 40),
                               seed=seed, workers=1) for seed in (0, 1)}


def test_identity_tells_replica_seeds_apart_and_survives_a_move(replicas, tmp_path):
    a, b = (load_metadata(replicas[s]) for s in (0, 1))
    ident = dataset_identity(a.table, a.channels)
    # same plates, wells, sites, compounds: only the pixels differ
    assert ident["table"] == dataset_identity(b.table, b.channels)["table"]
    assert len(ident["sample"]) == 4 * 3
    assert check_dataset(ident, a.table, a.channels).same is True
    other = check_dataset(ident, b.table, b.channels)
    assert other.same is False and "differs" in other.reason and not other
    moved = shutil.copytree(replicas[0], tmp_path / "moved")
    m = load_metadata(moved)
    assert check_dataset(ident, m.table, m.channels).same is True
    # a subset of the dataset (one plate) is checked on the sampled fields it holds
    plate = a.table.plate.iloc[0]
    assert check_dataset(ident, a.table[a.table.plate == plate], a.channels)
    assert check_dataset(None, a.table, a.channels).same is None


def test_preprocess_records_the_identity(replicas, tmp_path):
    meta = load_metadata(replicas[0])
    cache = run_to_end(preprocess(meta, tmp_path / "cache", PreprocessSettings(), workers=1))
    ident = cache.settings["dataset_id"]
    assert ident == dataset_identity(meta.table, meta.channels)
    other = load_metadata(replicas[1])
    assert check_dataset(ident, other.table, other.channels).same is False
