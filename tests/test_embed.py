"""Field embedding: four centre crops, median, concatenation, L2; cache runs, cancel, resume; CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from napari_wsdino.cli import main
from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.embed import (
    centre_crops,
    crop_geometry,
    embed_cache,
    embed_fields,
    parts_folder,
)
from napari_wsdino.core.metadata import DataError, treatment_name
from napari_wsdino.core.modelset import ChannelMismatchError, ChannelModel, ModelSet
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.progress import run_to_end

CHANNELS = ("DAPI", "Tubulin", "Actin")


def _field_table(n: int) -> pd.DataFrame:
    compounds = ["DMSO", "taxol", "AZ138"]
    rows = []
    for i in range(n):
        comp = compounds[i % 3]
        conc = 0.0 if comp == "DMSO" else 0.3
        rows.append({"plate": f"Week{1 + i // 4}_{100 + i // 4}", "batch": f"Week{1 + i // 4}",
                     "well": f"B{2 + i % 4:02d}", "site": 1 + i % 2, "replicate": 1,
                     "compound": comp, "concentration": conc,
                     "treatment": treatment_name(comp, conc),
                     "moa": "DMSO" if comp == "DMSO" else "Microtubule stabilizers"})
    return pd.DataFrame(rows)


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    n = 5
    images = {c: rng.random((n, 72, 80)).astype(np.float32) for c in CHANNELS}
    return write_cache(tmp_path / "cache", _field_table(n), images)


@pytest.fixture(scope="module")
def models():
    return ModelSet.random("test_vit", CHANNELS, seed=0)


class _Stats(nn.Module):
    """Stand-in backbone: mean, min and max of each crop."""

    num_features = 3

    def forward(self, x):
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat.min(1).values, flat.max(1).values], dim=1)


def test_crop_geometry_centres_four_quadrants_and_clamps():
    side, corners = crop_geometry((512, 640), 224, 8)
    assert side == 224
    assert corners == [(32, 96), (32, 320), (256, 96), (256, 320)]
    # smaller field than 2 x crop: clamped to half the short side, then to the patch size
    side, corners = crop_geometry((100, 130), 224, 16)
    assert side == 48 and corners[0] == (50 - 48, 65 - 48) and corners[3] == (50, 65)
    with pytest.raises(DataError, match="too small"):
        crop_geometry((20, 20), 224, 16)


def test_centre_crops_are_the_quadrants_of_the_centre_square():
    img = np.arange(2 * 11 * 14, dtype=np.float32).reshape(2, 11, 14)
    crops = centre_crops(img, 3)
    cy, cx = 5, 7
    for b in range(2):
        for q, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            y0, x0 = cy - 3 + 3 * dy, cx - 3 + 3 * dx
            np.testing.assert_array_equal(crops[b, q], img[b, y0:y0 + 3, x0:x0 + 3])


def test_median_of_four_centre_crops_on_a_constructed_field():
    # quadrants of the centre 2c x 2c square hold 1, 2, 3, 10; everything else 100
    c = 8
    img = np.full((1, 40, 50), 100.0, dtype=np.float32)
    top, left = 20 - c, 25 - c
    for value, (dy, dx) in zip((1, 2, 3, 10), [(0, 0), (0, 1), (1, 0), (1, 1)]):
        img[0, top + dy * c: top + (dy + 1) * c, left + dx * c: left + (dx + 1) * c] = value
    models = ModelSet({"DAPI": ChannelModel("DAPI", _Stats(), "stats", "test")})
    from napari_wsdino.core.embed import embed_channel

    mean, lo, hi = embed_channel(_Stats(), img, crop=c)[0]
    assert mean == pytest.approx(2.5)  # median of 1, 2, 3, 10 (the mean would be 4)
    # each crop is one constant quadrant: min == max, no border pixel leaked in
    assert lo == pytest.approx(2.5) and hi == pytest.approx(2.5)
    crops = centre_crops(img, c)[0]
    assert [float(q.min()) for q in crops] == [1, 2, 3, 10] == [float(q.max()) for q in crops]
    prof = embed_fields(models, {"DAPI": img}, crop=c)
    np.testing.assert_allclose(prof[0], np.full(3, 1 / np.sqrt(3)), rtol=1e-6)


def test_embedding_shape_normalisation_and_explicit_computation(models):
    rng = np.random.default_rng(1)
    imgs = {c: rng.random((3, 64, 70)).astype(np.float32) for c in CHANNELS}
    prof = embed_fields(models, imgs, crop=16)
    assert prof.shape == (3, 3 * 64) and prof.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(prof, axis=1), 1.0, rtol=1e-5)
    # slow, obvious version: each crop alone through the model, numpy median, concat, L2
    for b in range(3):
        parts = []
        for c in CHANNELS:
            crops = [imgs[c][b, 32 - 16 + dy: 32 + dy, 35 - 16 + dx: 35 + dx]
                     for dy in (0, 16) for dx in (0, 16)]
            with torch.no_grad():
                feats = [models[c].model(torch.from_numpy(np.ascontiguousarray(x))[None, None])[0].numpy()
                         for x in crops]
            parts.append(np.median(np.stack(feats), axis=0))
        v = np.concatenate(parts)
        np.testing.assert_allclose(prof[b], v / np.linalg.norm(v), atol=2e-5)


def test_embed_cache_writes_profiles_with_metadata(cache, models, tmp_path):
    out = tmp_path / "profiles.parquet"
    events = []
    table = run_to_end(embed_cache(cache, models, out, crop=16, batch_size=2, chunk_size=2),
                       events.append)
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] == 5 and all(e.total == 5 for e in events)
    back = ProfileTable.read(out)
    assert len(back) == 5 and back.n_features == 192
    assert back.feature_names[0] == "DAPI_000" and back.feature_names[-1] == "Actin_063"
    for col in ("Metadata_Plate", "Metadata_Batch", "Metadata_Well", "Metadata_Site",
                "Metadata_Compound", "Metadata_Concentration", "Metadata_Treatment", "Metadata_MoA"):
        assert col in back.meta.columns
    assert list(back.meta["Metadata_Plate"]) == list(cache.table.plate)
    expected = embed_fields(models, {c: np.asarray(cache.images(c), np.float32) for c in CHANNELS}, crop=16)
    np.testing.assert_allclose(back.features, expected, atol=1e-6)
    np.testing.assert_allclose(table.features, expected, atol=1e-6)
    assert not parts_folder(out).exists()
    prov = json.loads(out.with_suffix(".json").read_text())
    assert prov["crop"] == {c: 16 for c in CHANNELS} and prov["models"]["kind"] == "random"


def test_cancel_then_resume_reuses_finished_chunks(cache, models, tmp_path):
    out = tmp_path / "p.parquet"
    gen = embed_cache(cache, models, out, crop=16, batch_size=1, chunk_size=2)
    for event in gen:
        if event.step >= 3:  # chunk 0 (fields 0-1) is on disk, chunk 1 half done
            break
    gen.close()  # what a worker's quit() does
    parts = parts_folder(out)
    assert (parts / "chunk_00000.npy").exists() and not (parts / "chunk_00001.npy").exists()
    assert not out.exists()
    # mark the finished chunk: a resumed run must take it from disk, not recompute it
    marked = np.load(parts / "chunk_00000.npy")
    marked[:] = 0.5
    np.save(parts / "chunk_00000.npy", marked)
    events = []
    table = run_to_end(embed_cache(cache, models, out, crop=16, batch_size=1, chunk_size=2), events.append)
    assert any(e.info.get("resumed") for e in events)
    np.testing.assert_array_equal(table.features[:2], 0.5)
    fresh = run_to_end(embed_cache(cache, models, None, crop=16))
    np.testing.assert_allclose(table.features[2:], fresh.features[2:], atol=1e-6)


def test_resume_with_other_settings_is_refused_or_restarted(cache, models, tmp_path):
    out = tmp_path / "p.parquet"
    gen = embed_cache(cache, models, out, crop=16, batch_size=1, chunk_size=2)
    for event in gen:
        if event.step >= 2:
            break
    gen.close()
    with pytest.raises(DataError, match="crop"):
        run_to_end(embed_cache(cache, models, out, crop=32, chunk_size=2))
    # the paper-code numerics are part of what a chunk depends on; timm / auto are the default
    with pytest.raises(DataError, match=r"\(pos_embed, precision\)"):
        run_to_end(embed_cache(cache, models, out, crop=16, chunk_size=2, precision="fp32",
                               pos_embed="dino"))
    table = run_to_end(embed_cache(cache, models, out, crop=32, chunk_size=2, resume=False))
    assert len(table) == 5 and out.exists()


def test_models_of_other_channels_are_refused(cache):
    models = ModelSet.random("test_vit", ("DAPI", "Mito"), seed=0)
    with pytest.raises(ChannelMismatchError, match="Mito"):
        next(embed_cache(cache, models, None))


def test_cli_embed_random_and_checkpoint_channel_mismatch(cache, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    rc = main(["embed", str(cache.path), "--random", "--arch", "test_vit", "--crop", "16",
               "--out", str(out), "--quiet", "--export-safetensors", str(tmp_path / "st")])
    assert rc == 0
    back = ProfileTable.read(out)
    assert back.features.shape == (5, 192)
    # the exported models give the same profiles through --model CHANNEL=FILE
    out2 = tmp_path / "cli2.parquet"
    specs = [a for c in CHANNELS for a in ("--model", f"{c}={tmp_path / 'st' / (c + '.safetensors')}")]
    assert main(["embed", str(cache.path), *specs, "--crop", "16", "--out", str(out2), "--quiet"]) == 0
    np.testing.assert_allclose(ProfileTable.read(out2).features, back.features, atol=1e-6)
    # the init-only baseline: one weights file for every channel -> identical channel blocks
    torch.save(ModelSet.random("test_vit", ("DAPI",), seed=5)["DAPI"].model.state_dict(), tmp_path / "init.pth")
    out3 = tmp_path / "init.parquet"
    assert main(["embed", str(cache.path), "--init-only", str(tmp_path / "init.pth"), "--arch", "test_vit",
                 "--crop", "16", "--out", str(out3), "--quiet"]) == 0
    feats = ProfileTable.read(out3).features
    assert not np.allclose(feats[:, :64], feats[:, 64:128])  # same model, different channel images
    expected = embed_fields(ModelSet.init_only("test_vit", tmp_path / "init.pth", CHANNELS),
                            {c: np.asarray(cache.images(c), np.float32) for c in CHANNELS}, crop=16)
    np.testing.assert_allclose(feats, expected, atol=1e-6)
    # a DAPI model given as Actin: exit code 2 and a message naming both channels
    rc = main(["embed", str(cache.path), "--model", f"Actin={tmp_path / 'st' / 'DAPI.safetensors'}",
               "--out", str(tmp_path / "bad.parquet"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'DAPI', not 'Actin'" in err


def test_every_name_of_the_old_module_is_still_importable_from_core_embed():
    import napari_wsdino.core.embed as embed

    old = ("DEFAULT_CROP WINDOWS MAX_CELLS MEDIANS OFFICIAL_SHAPE OFFICIAL_WINDOWS DEFAULT_BATCH "
           "DEFAULT_CHUNK POOLINGS PARTS_FORMAT crop_geometry centre_crops median_of_four "
           "official_windows pooled_features embed_channel cell_crops l2_normalise embed_fields "
           "feature_names profile_table write_profiles parts_folder embed_cache").split()
    assert [name for name in old if not hasattr(embed, name)] == []
    assert sorted(embed.__all__) == sorted(old + ["EmbedSettings"])


def test_cli_embed_init_only_takes_official_names_and_says_where_the_file_goes(
        cache, tmp_path, monkeypatch, capsys):
    """``wsdino embed --init-only dino-vits8-full`` passes the name to the core, which
    fetches it; with no server (a closed loopback port) the one-line error names the
    file and torch.hub's folder to put it in (issue 29)."""
    import dataclasses
    import socket

    from napari_wsdino.core.pretrained import OFFICIAL

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full = OFFICIAL["dino-vits8-full"]
    monkeypatch.setitem(OFFICIAL, full.name, dataclasses.replace(
        full, url=f"http://127.0.0.1:{port}/{full.file}"))
    rc = main(["embed", str(cache.path), "--init-only", "dino-vits8-full", "--crop", "16",
               "--out", str(tmp_path / "x.parquet"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert full.file in err and str(tmp_path / "torch" / "hub" / "checkpoints") in err
