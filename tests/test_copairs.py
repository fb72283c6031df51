"""Our average precision agrees with copairs' on the same profiles and grouping.

copairs (the cytomining mAP package) is optional: ``pip install copairs`` or the
``scale`` extra. Skipped cleanly where it is absent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wsdino.core.evaluation import evaluate_treatments
from napari_wsdino.core.profiles import ProfileTable

copairs_ap = pytest.importorskip("copairs.map").average_precision


def treatments(seed: int = 0) -> ProfileTable:
    """60 treatments: 30 compounds x 2 doses, 5 MoAs, each compound in one of 3 batches."""
    rng = np.random.default_rng(seed)
    compound = np.repeat(np.arange(30), 2)
    moa = compound % 5
    batch = rng.integers(0, 3, 30)[compound]
    x = rng.normal(size=(60, 24)) + 0.8 * rng.normal(size=(5, 24))[moa]
    meta = pd.DataFrame({
        "Metadata_Treatment": [f"c{c:02d}@{d}" for c, d in zip(compound, np.tile([1, 3], 30))],
        "Metadata_Compound": [f"c{c:02d}" for c in compound],
        "Metadata_MoA": [f"M{m}" for m in moa],
        "Metadata_Batch": [f"W{b}" for b in batch],
    })
    return ProfileTable(meta, x, [f"f{i}" for i in range(24)])


def ours_and_theirs(table: ProfileTable, pos_diffby, neg_diffby):
    ap = copairs_ap(table.meta, table.features, pos_sameby=["Metadata_MoA"], pos_diffby=pos_diffby,
                    neg_sameby=[], neg_diffby=neg_diffby)
    return ap.set_index("Metadata_Treatment")["average_precision"]


def test_nsc_average_precision_agrees_with_copairs():
    table = treatments()
    out = evaluate_treatments(table, nscb=False)
    ours = out["neighbours"].set_index("treatment")["nsc_ap"]
    # NSC: positives share the MoA, not the compound; negatives have another MoA.
    theirs = ours_and_theirs(table, ["Metadata_Compound"], ["Metadata_MoA"])
    both = ours.notna() & theirs.reindex(ours.index).notna()
    assert both.sum() == 60
    np.testing.assert_allclose(ours[both], theirs.reindex(ours.index)[both], atol=1e-6)
    assert out["nsc_match"].map == pytest.approx(theirs.mean(), abs=1e-6)


def test_nscb_average_precision_agrees_with_copairs():
    table = treatments(1)
    out = evaluate_treatments(table)
    assert out["eligible"].all()  # every MoA in two or more batches: copairs' grouping applies
    ours = out["neighbours"].set_index("treatment")["nscb_ap"]
    # NSCB: also another batch, for positives and negatives alike.
    theirs = ours_and_theirs(table, ["Metadata_Compound", "Metadata_Batch"],
                             ["Metadata_MoA", "Metadata_Batch"]).reindex(ours.index)
    both = ours.notna() & theirs.notna()
    assert both.sum() >= 50
    np.testing.assert_allclose(ours[both], theirs[both], atol=1e-6)
    assert out["nscb_match"].map == pytest.approx(theirs[both].mean(), abs=1e-6)
