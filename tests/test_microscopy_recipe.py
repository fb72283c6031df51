"""The microscopy parts of the CPU recipe: nuclei centres, cell-centred training, per-plate
normalisation, CLS + mean-token embeddings and the attention-on-cells score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wsdino.core.attention import AttentionMaps, attention_maps, attention_on_cells
from napari_wsdino.core.embed import embed_fields, feature_names, pooled_features
from napari_wsdino.core.model import create_backbone
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.nuclei import find_nuclei, foreground_mask, nuclei_centres
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.train import TrainConfig, TrainingError, train
from tests.train_helpers import make_cache, tiny_config


def _blobs(centres, shape=(64, 80), r=3):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img = np.zeros(shape, np.float32)
    for y, x in centres:
        img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1.0
    return img + 0.01 * np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_find_nuclei_returns_every_blob_centre():
    truth = [(10, 10), (30, 60), (50, 25)]
    found = find_nuclei(_blobs(truth))
    assert len(found) == 3
    for y, x in truth:
        assert np.min(np.hypot(found[:, 0] - y, found[:, 1] - x)) < 1.0


def test_nuclei_centres_pads_counts_and_handles_blank_fields():
    images = np.stack([_blobs([(10, 10), (40, 40)]), np.zeros((64, 80), np.float32),
                       _blobs([(20, 70)])])
    yx, count = nuclei_centres(images)
    assert yx.shape == (3, 2, 2) and count.tolist() == [2, 0, 1]
    yx, count = nuclei_centres(images, rows=[2, 0], max_centres=1)
    assert yx.shape == (2, 1, 2) and count.tolist() == [1, 1]
    assert not foreground_mask(np.zeros((8, 8))).any()


def _maps(patches: np.ndarray, patch: int = 8) -> AttentionMaps:
    h, w = patches.shape[1] * patch, patches.shape[2] * patch
    z = np.zeros((patches.shape[0], h, w), np.float32)
    return AttentionMaps(patches, z, z[0], z > 0, z[0] > 0, np.zeros(len(patches)),
                         np.zeros(4), patch, 0.6, "nearest")


def test_attention_on_cells_is_mass_over_area_share():
    fg = np.zeros((32, 32), bool)
    fg[:8] = True                                   # a quarter of the image: patch row 0
    on = np.zeros((2, 4, 4))
    on[0, 0, :] = 0.25                              # head 0: all attention on the cells
    on[1] = 1 / 16                                  # head 1: uniform
    res = attention_on_cells(_maps(on), np.zeros((32, 32)), fg)
    assert res.share == pytest.approx(0.25)
    assert res.per_head == pytest.approx((4.0, 1.0))
    assert res.score == pytest.approx(2.5)          # mean head's mass 0.625 / 0.25
    empty = attention_on_cells(_maps(on), np.zeros((32, 32)), np.zeros((32, 32), bool))
    assert empty.share == 0 and np.isnan(empty.score)


def test_attention_on_cells_of_a_real_vit_is_near_one_at_random_init():
    img = _blobs([(12, 12), (40, 60), (50, 20), (20, 50)], shape=(64, 64))
    res = attention_on_cells(attention_maps(create_backbone("test_vit"), img), img)
    assert 0.0 < res.share < 0.3
    assert 0.3 < res.score < 3.0 and len(res.per_head) == 2


def test_cls_mean_pooling_keeps_the_cls_part_and_adds_the_token_mean():
    vit = create_backbone("test_vit").eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        both = pooled_features(vit, x, "cls+mean")
        cls = pooled_features(vit, x, "cls")
        tokens = vit.forward_features(x)
    assert torch.allclose(both[:, :64], cls, atol=1e-6)
    assert torch.allclose(both[:, 64:], tokens[:, vit.num_prefix_tokens:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooled_features(vit, x, "max")
    models = ModelSet.random("test_vit", ("DAPI",), seed=0)
    feats = embed_fields(models, {"DAPI": np.random.default_rng(0).random((2, 64, 64))}, 32,
                         pooling="cls+mean")
    assert feats.shape == (2, 128) and len(feature_names(models, "cls+mean")) == 128


NUCLEI = ((12, 14), (16, 50), (46, 20), (50, 52))     # (y, x) of every field's nuclei


def _nuclei_cache(path):
    """Fields with the same four nuclei (DAPI) and a compound-dependent texture (Actin)."""
    from napari_wsdino.core.cache import write_cache
    from tests.train_helpers import structured_images, tiny_table

    table = tiny_table(6)
    rng = np.random.default_rng(1)
    dapi = np.stack([_blobs(NUCLEI, shape=(64, 64), r=3) * rng.uniform(0.6, 1.0)
                     for _ in range(len(table))])
    actin = structured_images(table, 64)["Actin"]
    return write_cache(path, table, {"DAPI": dapi, "Actin": actin}, {"test": True})


def _box_holds_a_nucleus(boxes) -> np.ndarray:
    """Per box: does it contain one of NUCLEI (with the jitter of 0.25 x side, it must)."""
    x0, y0, side = (t.numpy().ravel() for t in (boxes.x0, boxes.y0, boxes.side))
    inside = [(x0 <= x) & (x <= x0 + side) & (y0 <= y) & (y <= y0 + side) for y, x in NUCLEI]
    return np.any(inside, axis=0)


def test_training_with_cell_centred_rotated_jittered_views(tmp_path, monkeypatch):
    import napari_wsdino.core.train.loop as train_module  # the loop looks its helpers up there
    from napari_wsdino.core import views

    boxes, jittered = [], []
    real_boxes, real_jitter = views.sample_boxes, train_module.jitter_intensity

    def record_boxes(*args, **kwargs):
        boxes.append(real_boxes(*args, **kwargs))
        return boxes[-1]

    def record_jitter(vs, strength, generator=None):
        out = real_jitter(vs, strength, generator)
        jittered.append(([v.clone() for v in vs], out))
        return out

    monkeypatch.setattr(views, "sample_boxes", record_boxes)
    monkeypatch.setattr(train_module, "jitter_intensity", record_jitter)
    cache = _nuclei_cache(tmp_path / "cache")
    cfg = tiny_config(epochs=1, channel="Actin", nuclei_channel="DAPI", crop_centres="nuclei",
                      rotate90=True, intensity_jitter=0.2)
    path = run_to_end(train(cache, cfg, tmp_path / "run"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["finished"] and ckpt["config"]["crop_centres"] == "nuclei"
    monkeypatch.undo()

    # Cell-centred: every crop of the run (global and local) holds a nucleus of its
    # field; uniform crops of the same sizes often hold none.
    assert len(boxes) >= 2 and all(_box_holds_a_nucleus(b).all() for b in boxes)
    g = torch.Generator().manual_seed(0)
    uniform = views.sample_boxes(64, 8, 64, 64, (0.04, 0.08), g)
    assert _box_holds_a_nucleus(uniform).mean() < 0.8
    # Rotated: all four quarter turns are drawn, and a drawn turn turns the crop exactly.
    turns = torch.cat([b.rot90.ravel() for b in boxes])
    assert set(turns.tolist()) == {0, 1, 2, 3}
    img = torch.arange(36.0).reshape(1, 1, 6, 6)
    zero, no = torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool)
    for k in range(4):
        whole = views.CropBoxes(zero, zero, torch.full((1, 1), 6.0), no, no,
                                torch.full((1, 1), k))
        assert torch.allclose(views.crop_resize(img, whole, 6)[0][0, 0],
                              torch.rot90(img[0, 0], k), atol=1e-4)
    # Jittered: each view of each image gets its own gain exp(N(0, 0.2)) and offset —
    # an exact affine map of the un-jittered view, with gains spread as asked.
    gains = []
    for before, after in jittered:
        for v, w in zip(before, after):
            x, y = v.flatten(1).double(), w.flatten(1).double()
            xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
            gain = (xc * yc).sum(1) / (xc * xc).sum(1)
            assert torch.allclose(yc, gain[:, None] * xc, atol=1e-4)
            gains.append(gain)
    log_gain = torch.cat(gains).log()
    assert len(log_gain) >= 90 and 0.12 < float(log_gain.std()) < 0.28

    # A cache without the nuclear stain is refused with the setting to change.
    bad = cfg.replace(nuclei_channel="Hoechst")
    with pytest.raises(TrainingError, match="nuclei_channel"):
        run_to_end(train(cache, bad, tmp_path / "run2"))
    with pytest.raises(ValueError, match="crop_centres"):
        TrainConfig(crop_centres="cells")


def test_plate_normalisation_scales_by_the_plate_controls_and_keeps_field_differences(
        mini_replica, tmp_path):
    from napari_wsdino.core.metadata import load_metadata
    from napari_wsdino.core.preprocess import PreprocessSettings, preprocess

    import dataclasses

    meta = load_metadata(mini_replica)
    table = meta.table[meta.table.plate.isin(sorted(meta.table.plate.unique())[:2])]
    meta = dataclasses.replace(meta, table=table.reset_index(drop=True))
    cache = run_to_end(preprocess(meta, tmp_path / "plate", PreprocessSettings(
        size=(32, 40), normalize="plate", clip=10000.0), workers=1))
    z = run_to_end(preprocess(meta, tmp_path / "z", PreprocessSettings(
        size=(32, 40), normalize="zscore", clip=10000.0), workers=1))
    for plate, idx in cache.table.groupby("plate").indices.items():
        x = np.asarray(cache.images("DAPI")[idx], np.float64)
        dmso = (cache.table.compound.to_numpy()[idx] == "DMSO")
        assert dmso.any() and not dmso.all()
        # The plate's controls set the scale: mean 0 / std 1 over the DMSO fields.
        assert abs(x[dmso].mean()) < 1e-2 and abs(x[dmso].std() - 1) < 1e-2
        # Per-field means differ within a plate (a z-score would set each to 0).
        assert x.mean(axis=(1, 2)).std() > 0.01
        assert np.abs(np.asarray(z.images("DAPI")[idx], np.float64).mean(axis=(1, 2))).max() < 1e-2


def test_cell_windows_average_nucleus_centred_crops(tmp_path):
    from napari_wsdino.core.cache import write_cache
    from napari_wsdino.core.embed import cell_crops, embed_cache
    from tests.train_helpers import tiny_table

    table = tiny_table(2)
    dapi = np.stack([_blobs([(12, 12), (40, 50)], shape=(48, 64)) for _ in range(len(table))])
    cache = write_cache(tmp_path / "c", table, {"DAPI": dapi, "Actin": dapi * 2}, {"test": True})
    models = ModelSet.random("test_vit", ("DAPI", "Actin"), seed=0)
    prof = run_to_end(embed_cache(cache, models, None, crop=16, device="cpu", windows="cells"))
    assert prof.features.shape == (len(table), 128) and np.isfinite(prof.features).all()
    # By hand: the mean embedding of the two 16-px crops around the nuclei, per channel.
    cached = np.asarray(cache.images("DAPI")[:1], np.float32)
    crops, owner = cell_crops(cached, np.array([[[12.0, 12.0], [40.0, 50.0]]]), np.array([2]), 16)
    assert owner.tolist() == [0, 0] and crops.shape == (2, 16, 16)
    with torch.no_grad():
        ref = models.models["DAPI"].model(torch.from_numpy(crops)[:, None]).mean(0).numpy()
    raw = run_to_end(embed_cache(cache, models, None, crop=16, device="cpu", windows="cells",
                                 l2=False))
    assert np.allclose(raw.features[0, :64], ref, atol=1e-4)
    with pytest.raises(Exception, match="nuclear stain"):
        run_to_end(embed_cache(cache, models, None, crop=16, windows="cells",
                               nuclei_channel="Hoechst"))


def test_sinkhorn_centring_trains_and_balances_targets(tmp_path, monkeypatch):
    import json

    from napari_wsdino.core import dino

    targets = []
    real = dino.sinkhorn_knopp

    def record(logits, iterations=3):
        targets.append((logits.detach().clone(), real(logits, iterations)))
        return targets[-1][1]

    monkeypatch.setattr(dino, "sinkhorn_knopp", record)
    cache = make_cache(tmp_path / "cache")
    events = []
    path = run_to_end(train(cache, tiny_config(epochs=2, teacher_centering="sinkhorn"),
                            tmp_path / "run"), events.append)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["finished"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").open()]
    assert len(losses) == 2 and np.isfinite(losses).all()
    # The loss used Sinkhorn targets at every step, made from the teacher's real outputs.
    assert len(targets) == events[-1].total >= 4
    for logits, q in targets:
        n, k = q.shape
        assert (n, k) == (2 * 8, 256)
        assert torch.allclose(q.sum(1), torch.ones(n), atol=1e-4)      # one target per view
        # Balanced: every prototype gets between half and 1.5 times its n / k share of
        # the batch's mass (3 iterations, as DINOv2), while the plain softmax of the same
        # teacher outputs gives some prototype over 5 times its share (26-64 seen).
        mass = q.sum(0) / (n / k)
        soft = torch.softmax(logits, dim=1).sum(0) / (n / k)
        assert float((mass - 1).abs().max()) < 0.5 and float(soft.max()) > 5
        assert float(mass.std()) < 0.1 * float(soft.std())
