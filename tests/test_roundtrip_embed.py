"""Round trip on a replica subset: train (tiny) -> wsdino embed -> wsdino evaluate (NSC / NSCB)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from napari_wsdino.cli import main
from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.imageio import read_field
from napari_wsdino.core.metadata import CONTROL, load_metadata, nscb_treatments
from napari_wsdino.core.model import read_checkpoint
from napari_wsdino.core import train
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.synth import make_replica

pytestmark = pytest.mark.slow


def _cache_from_replica(replica, out):
    """Stand-in preprocessing: per-channel 1-99.5 percentile scaling of the raw TIFFs."""
    meta = load_metadata(replica)
    cols = [f"path_{c}" for c in meta.channels]
    raw = np.stack([read_field(list(row)) for row in meta.table[cols].itertuples(index=False)])
    images = {}
    for i, channel in enumerate(meta.channels):
        a = raw[:, i].astype(np.float32)
        lo, hi = np.percentile(a, [1, 99.5])
        images[channel] = np.clip((a - lo) / (hi - lo), 0, None)
    return write_cache(out, meta.table, images, {"scaling": "percentile 1-99.5"})


def _nsc_by_hand(profiles: ProfileTable) -> float:
    """NSC without TVN, the slow obvious way: mean per (treatment, plate) over the treated
    fields, median across plates, then per treatment the cosine nearest treatment of
    another compound; the share whose neighbour has the same MoA."""
    meta = profiles.meta.reset_index(drop=True)
    treated = (meta["Metadata_MoA"] != CONTROL).to_numpy()
    feats = pd.DataFrame(profiles.features[treated])
    keys = [meta.loc[treated, "Metadata_Treatment"].to_numpy(),
            meta.loc[treated, "Metadata_Plate"].to_numpy()]
    per_plate = feats.groupby(keys).mean()
    per_treatment = per_plate.groupby(level=0).median()
    first = meta[treated].drop_duplicates("Metadata_Treatment").set_index("Metadata_Treatment")
    hits = 0
    for t, x in per_treatment.iterrows():
        best, best_sim = None, -np.inf
        for u, y in per_treatment.iterrows():
            if first.loc[u, "Metadata_Compound"] == first.loc[t, "Metadata_Compound"]:
                continue
            sim = float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
            if sim > best_sim:
                best, best_sim = u, sim
        hits += first.loc[best, "Metadata_MoA"] == first.loc[t, "Metadata_MoA"]
    return hits / len(per_treatment)


def test_train_embed_evaluate_round_trip(tmp_path, capsys):
    replica = make_replica(tmp_path / "mini", subset="mini", sites=1, size=(64, 80), seed=0, workers=1)
    cache = _cache_from_replica(replica, tmp_path / "cache")
    config = train.TrainConfig(arch="test_vit", weak_label="compound", epochs=1, batch_size=16,
                               local_crops=2, global_size=32, local_size=16, out_dim=128,
                               hidden_dim=64, bottleneck_dim=32, lr=5e-4, min_lr=1e-4,
                               warmup_epochs=0, device="cpu", checkpoint_every=1, seed=0)
    paths = run_to_end(train.train_channels(cache, config, tmp_path / "run"))
    assert set(paths) == set(cache.channels)
    assert read_checkpoint(paths["DAPI"])["channel"] == "DAPI"

    out = tmp_path / "profiles.parquet"
    assert main(["embed", str(cache.path), "--run", str(tmp_path / "run"), "--crop", "32",
                 "--out", str(out), "--quiet"]) == 0
    profiles = ProfileTable.read(out)
    assert profiles.features.shape == (len(cache), 3 * 64)
    np.testing.assert_allclose(np.linalg.norm(profiles.features, axis=1), 1.0, rtol=1e-5)
    # the trained teachers, not random weights, made these profiles
    from napari_wsdino.core.modelset import ModelSet

    random = ModelSet.random("test_vit", cache.channels, seed=0)
    assert ModelSet.from_run(tmp_path / "run").fingerprint() != random.fingerprint()
    capsys.readouterr()

    assert main(["evaluate", str(out), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = cache.table
    n_treatments = table.loc[table.moa != CONTROL, "treatment"].nunique()
    assert result["n_nsc"] == n_treatments
    assert result["n_nscb"] == len(nscb_treatments(table))
    # NSC is a fraction of the matched treatments
    assert result["nsc"] * result["n_nsc"] == pytest.approx(round(result["nsc"] * result["n_nsc"]))
    # and, without TVN, the one counted by hand on the embedded profiles
    assert main(["evaluate", str(out), "--tvn", "none", "--json", "--quiet"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["nsc"] == pytest.approx(_nsc_by_hand(profiles))
    assert torch.is_tensor(read_checkpoint(paths["Actin"])["teacher"]["backbone.cls_token"])
