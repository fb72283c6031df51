"""WS-DINO pairing, group balance, DMSO handling and sharding of the field sampler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.sampler import PairSampler, weak_labels


@pytest.fixture(scope="module")
def table(bundled_dir):
    from napari_wsdino.core.metadata import load_metadata

    full = load_metadata(bundled_dir, check_files=False).table
    plates = sorted(full.plate.unique())[:6]
    return full[full.plate.isin(plates)].reset_index(drop=True)


@pytest.mark.parametrize("label", ["treatment", "compound", "moa"])
def test_local_crops_come_from_another_field_of_the_same_label(table, label):
    labels = weak_labels(table, label)
    assert not (table.loc[labels.index, "moa"] == "DMSO").any()
    sampler = PairSampler(labels, batch_size=8, seed=1)
    sizes = labels.value_counts()
    seen_pairs = 0
    for epoch in range(3):
        plan = sampler.epoch(epoch)
        g, loc = plan.global_rows.ravel(), plan.local_rows.ravel()
        assert (table.loc[g, label].to_numpy() == table.loc[loc, label].to_numpy()).all()
        single = sizes[table.loc[g, label]].to_numpy() == 1
        assert (g[~single] != loc[~single]).all()
        assert (g[single] == loc[single]).all()
        assert (plan.singleton.ravel() == single).all()
        seen_pairs += (~single).sum()
    assert seen_pairs > 0
    assert set(sampler.singleton_groups) == set(sizes[sizes == 1].index)


def test_singleton_groups_are_reported():
    t = pd.DataFrame({"compound": ["a", "a", "a", "b"], "moa": ["X"] * 4,
                      "treatment": ["a", "a", "a", "b"], "plate": ["p"] * 4})
    sampler = PairSampler(weak_labels(t, "compound"), batch_size=2, seed=0)
    assert sampler.singleton_groups == ["b"]
    plans = [sampler.epoch(e) for e in range(20)]
    flagged = np.concatenate([p.singleton.ravel() for p in plans])
    rows = np.concatenate([p.global_rows.ravel() for p in plans])
    assert (flagged == (rows == 3)).all() and flagged.any()


def test_groups_are_drawn_equally_often():
    # One group of 2 fields and one of 38: the paper's 1 / group size weighting.
    t = pd.DataFrame({"compound": ["rare"] * 2 + ["common"] * 38, "moa": ["X"] * 40,
                      "treatment": ["x"] * 40, "plate": ["p"] * 40})
    sampler = PairSampler(weak_labels(t, "compound"), batch_size=4, seed=0)
    rows = np.concatenate([sampler.epoch(e).global_rows.ravel() for e in range(50)])
    rare = np.isin(rows, [0, 1]).mean()
    assert 0.45 < rare < 0.55
    plain = PairSampler(weak_labels(t, "compound"), batch_size=4, seed=0, balance=False)
    rows = np.concatenate([plain.epoch(e).global_rows.ravel() for e in range(5)])
    assert np.isin(rows, [0, 1]).mean() == pytest.approx(2 / 40)


def test_plain_dino_uses_one_field_per_view_set(table):
    labels = weak_labels(table, "none")
    sampler = PairSampler(labels, batch_size=4, seed=0)
    assert not sampler.pair and not sampler.balance and sampler.singleton_groups == []
    plan = sampler.epoch(0)
    assert (plan.global_rows == plan.local_rows).all()
    assert not plan.singleton.any()
    used = plan.global_rows.ravel()
    assert len(set(used)) == len(used)  # a permutation: no field twice in an epoch
    assert not (table.loc[used, "moa"] == "DMSO").any()


def test_dmso_grouped_by_plate(table):
    labels = weak_labels(table, "compound", dmso="plate")
    ctrl = table.loc[labels.index, "moa"].to_numpy() == "DMSO"
    assert ctrl.sum() == (table.moa == "DMSO").sum() > 0
    assert set(labels[ctrl]) == {f"DMSO@{p}" for p in table.plate.unique()}
    plan = PairSampler(labels, batch_size=8, seed=0).epoch(0)
    g, loc = plan.global_rows.ravel(), plan.local_rows.ravel()
    dm = table.loc[g, "moa"].to_numpy() == "DMSO"
    assert dm.any()
    assert (table.loc[g[dm], "plate"].to_numpy() == table.loc[loc[dm], "plate"].to_numpy()).all()
    assert set(weak_labels(table, "compound", dmso="together")[ctrl]) == {"DMSO"}


def test_moa_or_compound_falls_back_to_the_compound():
    t = pd.DataFrame({"compound": ["a", "b", "c", "c"], "moa": ["X", "X", None, None],
                      "treatment": list("abcd"), "plate": ["p"] * 4})
    assert weak_labels(t, "moa_or_compound").tolist() == ["moa:X", "moa:X", "compound:c",
                                                          "compound:c"]
    with pytest.raises(DataError, match="moa_or_compound"):
        weak_labels(t, "moa")
    with pytest.raises(DataError, match="weak label"):
        weak_labels(t, "plate")


def test_shards_split_one_epoch_between_processes(table):
    labels = weak_labels(table, "compound")
    one = PairSampler(labels, batch_size=4, seed=3)
    shards = [PairSampler(labels, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    plans = [s.epoch(2) for s in shards]
    assert plans[0].steps == plans[1].steps == shards[0].per_rank // 4
    assert not np.array_equal(plans[0].global_rows, plans[1].global_rows)
    # Interleaved, the shards are the single-process draw sequence.
    both = np.stack([p.global_rows.ravel() for p in plans], 1).ravel()
    n = len(both)
    ref = PairSampler(labels, batch_size=1, seed=3).epoch(2).global_rows.ravel()
    assert np.array_equal(both, ref[:n])
    assert np.array_equal(one.epoch(2).global_rows, PairSampler(labels, 4, seed=3).epoch(2).global_rows)


def test_blank_weak_labels_are_refused_not_grouped():
    """MoA '' (unannotated, kept) is no label: it must not become one pseudo-MoA group."""
    table = pd.DataFrame({"moa": ["X", "X", "", " "], "compound": ["a", "b", "c", "d"],
                          "plate": ["p"] * 4, "treatment": ["a@1", "b@1", "c@1", "d@1"]})
    with pytest.raises(DataError, match="2 fields have no moa.*moa_or_compound"):
        weak_labels(table, "moa")
    labels = weak_labels(table, "moa_or_compound")
    assert list(labels) == ["moa:X", "moa:X", "compound:c", "compound:d"]
