"""Issue 14: each element of the official WS-DINO code, re-derived from the published
code's facts (crosszamirski/WS-DINO, facebookresearch/dino) on small synthetic tensors,
against our implementation. The table in docs/fidelity.md points at these tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_wsdino.core import embed
from napari_wsdino.core.model import create_backbone


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_backbone("test_vit").eval()


def test_official_embedding_windows_and_lower_median(vit):
    """Eval_BBBC021.py crops x 64-320 / 320-544 and y 32-256 / 256-480 of the 512 x 640
    field (albumentations Crop, x_max/y_max exclusive) and takes ``torch.median`` over
    the four CLS vectors: the lower of the two middle values."""
    rng = np.random.default_rng(0)
    fields = rng.random((2, 512, 640)).astype(np.float32)
    boxes = [(64, 32, 320, 256), (320, 32, 544, 256), (64, 256, 320, 480), (320, 256, 544, 480)]
    with torch.no_grad():
        per_crop = torch.stack([vit(torch.from_numpy(fields[:, None, y0:y1, x0:x1].copy()))
                                for x0, y0, x1, y1 in boxes])
    expected = torch.median(per_crop, dim=0).values.numpy()
    ours = embed.embed_channel(vit, fields, patch=16, windows="official", median="lower")
    assert np.allclose(ours, expected, atol=1e-6)
    assert [(t, l, h, w) for t, l, h, w in embed.official_windows((512, 640), 8)] == [
        (y0, x0, y1 - y0, x1 - x0) for x0, y0, x1, y1 in boxes]
    # Our default differs on both counts: centred square quadrants, mean of the middle two.
    default = embed.embed_channel(vit, fields, crop=224, patch=16)
    assert not np.allclose(default, expected, atol=1e-3)
    mid = embed.median_of_four(per_crop.permute(1, 0, 2))
    assert not torch.allclose(mid, torch.from_numpy(expected))
    with pytest.raises(ValueError, match="windows"):
        embed.embed_channel(vit, fields, windows="corners")


def test_lower_median_hand_worked():
    x = torch.tensor([[[4.0], [1.0], [3.0], [2.0]]])  # one field, four crops, one dim
    assert embed.median_of_four(x, "lower").item() == 2.0
    assert embed.median_of_four(x).item() == 2.5


def _official_full_checkpoint(path, out_dim=65536):
    """A DINO full checkpoint laid out as facebookresearch/dino main_dino.py saves it, with
    random tensors of ViT-S/8 shapes: the student under DistributedDataParallel's
    ``module.``, RGB patch filters, weight-norm ``weight_g`` before ``weight_v``, AdamW
    state indexed by position in (weights, biases/norms) groups, the loss centre, the
    epoch and the run's argparse Namespace."""
    import argparse

    from napari_wsdino.core.dino import DINOHead

    gen = torch.Generator().manual_seed(1)

    with torch.device("meta"):  # shapes only, no initialisation cost
        vit = create_backbone("vit_small_patch8_224", in_chans=3).state_dict()
        head = DINOHead(384, out_dim, 2048, 256, use_bn=False, norm_last_layer=False).state_dict()

    def net(prefix):
        sd = {f"{prefix}backbone.{k}": torch.randn(v.shape, generator=gen) for k, v in vit.items()}
        for k in [k for k in head if not k.startswith("last_layer")] + ["last_layer.weight_g",
                                                                         "last_layer.weight_v"]:
            sd[f"{prefix}head.{k}"] = torch.randn(head[k].shape, generator=gen)
        return sd

    student, teacher = net("module."), net("")
    reg = [k for k, v in student.items() if not (k.endswith(".bias") or v.ndim == 1)]
    not_reg = [k for k, v in student.items() if k.endswith(".bias") or v.ndim == 1]
    state = {}
    for i, k in enumerate(reg + not_reg):  # moments: one value per tensor (stride-0, small file)
        shape = student[k].shape
        state[i] = {"step": torch.tensor(250000.0),
                    "exp_avg": torch.full((1,), float(i)).expand(shape),
                    "exp_avg_sq": torch.full((1,), float(i) + 0.5).expand(shape)}
    optimizer = {"state": state, "param_groups": [
        {"params": list(range(len(reg))), "lr": 1e-5, "weight_decay": 0.4},
        {"params": list(range(len(reg), len(reg) + len(not_reg))), "lr": 1e-5,
         "weight_decay": 0.0}]}
    centre = torch.randn(1, out_dim, generator=gen)
    torch.save({"student": student, "teacher": teacher, "optimizer": optimizer, "epoch": 800,
                "args": argparse.Namespace(arch="vit_small", patch_size=8),
                "dino_loss": {"center": centre}}, path)
    return student, teacher, reg + not_reg, centre


def test_full_dino_checkpoint_loads_every_part_where_the_official_code_puts_it(tmp_path):
    """Issue 14: DINO's restart_from_checkpoint fills the student from ``student``, the
    teacher from ``teacher``, the loss centre and AdamW's moments; ours does the same
    with ``init_parts="full"`` (RGB patch filters folded to one grey channel)."""
    from napari_wsdino.core import train as tr
    from napari_wsdino.core.dino import DINOLoss

    path = tmp_path / "dino_deitsmall8_pretrain_full_checkpoint.pth"
    student_sd, teacher_sd, opt_order, centre = _official_full_checkpoint(path)
    config = tr.TrainConfig(init=str(path), init_parts="full")
    student, teacher = tr.build_models(config)
    for net, saved, prefix in ((student, student_sd, "module."), (teacher, teacher_sd, "")):
        ours = net.state_dict()
        for key, value in saved.items():
            mine = ours[key[len(prefix):]]
            if key.endswith("patch_embed.proj.weight"):
                value = value.sum(dim=1, keepdim=True)  # grey = RGB replicated
            assert torch.equal(mine, value), key
    assert not torch.equal(student.head.mlp[0].weight, teacher.head.mlp[0].weight)

    loss = DINOLoss(config.out_dim, 10, 2)
    optimizer = torch.optim.AdamW(tr._params_groups(student), lr=0.0)
    tr._load_init_state(config, student, optimizer, loss)
    assert torch.equal(loss.center, centre)
    names = {id(p): n for n, p in student.named_parameters()}
    index = {k[len("module."):]: i for i, k in enumerate(opt_order)}
    for group in optimizer.param_groups:
        assert group["lr"] == 0.0  # our groups' hyper-parameters stay
        for p in group["params"]:
            st = optimizer.state[p]
            i = index[names[id(p)]]
            assert float(st["step"]) == 250000.0
            assert torch.all(st["exp_avg"] == float(i)), names[id(p)]
            assert torch.all(st["exp_avg_sq"] == float(i) + 0.5)
            assert st["exp_avg"].shape == p.shape


def test_backbone_only_release_and_wrong_architecture(tmp_path):
    """The backbone-only release still initialises both nets; a file of another
    architecture is refused with both shapes named (a CheckpointError, no traceback
    from load_state_dict)."""
    from napari_wsdino.core import train as tr
    from napari_wsdino.core.model import CheckpointError

    vit = create_backbone("vit_small_patch8_224", in_chans=3)
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(vit.state_dict(), path)
    config = tr.TrainConfig(init=str(path), init_parts="full", out_dim=256, hidden_dim=64,
                            bottleneck_dim=32)
    student, teacher = tr.build_models(config)
    assert torch.equal(student.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert torch.equal(teacher.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)

    other = tmp_path / "vit_tiny16.pth"
    torch.save(create_backbone("test_vit", in_chans=3).state_dict(), other)
    with pytest.raises(CheckpointError) as err:
        tr.build_models(config.replace(init=str(other)))
    message = str(err.value)
    assert "[1, 1, 64]" in message and "[1, 1, 384]" in message  # both shapes
    assert "embed dim 64" in message and "embed dim 384" in message
    assert tr.build_models(config.replace(init="random"))  # random weights, said out loud


def test_embed_and_evaluate_cli_follow_the_recipe(tmp_path, capsys):
    """``--recipe paper-code`` on embed gives raw (not L2) medians of the official windows;
    on evaluate, per-channel TVN; a flag overrides one element."""
    import json

    from train_helpers import make_cache

    from napari_wsdino.cli import main
    from napari_wsdino.core.modelset import ModelSet
    from napari_wsdino.core.profiles import ProfileTable

    cache = make_cache(tmp_path / "cache", per_compound=6, size=64)
    out = tmp_path / "p.parquet"
    assert main(["embed", str(cache.path), "--random", "--arch", "test_vit", "--recipe",
                 "paper-code", "--out", str(out), "--quiet"]) == 0
    profiles = ProfileTable.read(out)
    models = ModelSet.random("test_vit", cache.channels, seed=0)
    expected = np.concatenate(
        [embed.embed_channel(m.model, cache.images(c)[:], patch=m.patch_size,
                             normalise=m.normalise, windows="official", median="lower",
                             pos_embed="dino")
         for c, m in models.models.items()], axis=1)
    assert np.allclose(profiles.features, expected, atol=1e-5)
    assert not np.allclose(np.linalg.norm(profiles.features, axis=1), 1.0)  # raw CLS

    capsys.readouterr()
    assert main(["evaluate", str(out), "--recipe", "paper-code", "--no-nscb", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tvn"] == "per-channel"
    assert main(["evaluate", str(out), "--recipe", "paper-code", "--tvn", "paper", "--no-nscb",
                 "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tvn"] == "paper"


def test_paper_code_min_lr_reproduces_the_published_log():
    """The published training log's lr at epoch 281 (the epoch mean DINO's MetricLogger
    records) is 3.211e-6: DINO's cosine schedule from 4e-6 with 10 warm-up epochs over 400
    epochs of 158 steps (2,528 fields / 16) gives it only with min_lr 3e-6."""
    from napari_wsdino.core.recipes import resolve
    from napari_wsdino.core.schedules import Schedules

    def epoch_lr(config, epoch=281, steps=158):
        lr = Schedules.from_config(config, steps).lr
        return float(lr[epoch * steps:(epoch + 1) * steps].mean())

    assert round(epoch_lr(resolve("paper-code").train), 9) == 3.211e-6
    assert round(epoch_lr(resolve("default").train), 9) != 3.211e-6


def test_paper_code_input_scaling_is_clip_then_divide():
    """WS-DINO_BBBC021.py sets pixels above 10,000 to 10,000, then albumentations
    Normalize(mean=0, std=1, max_pixel_value=10000) divides by 10,000."""
    from napari_wsdino.core.preprocess import process_field
    from napari_wsdino.core.recipes import resolve

    settings = resolve("paper-code").preprocess
    raw = np.random.default_rng(0).integers(0, 30000, (1, 16, 20)).astype(np.uint16)
    official = np.minimum(raw[0].astype(np.float32), 10000) / 10000
    ours = process_field(raw, [None], dataclasses.replace(settings, size=(16, 20)))
    assert np.allclose(ours[0], official, atol=1e-6)


# -- position embeddings at other sizes (issue 29) --------------------------------------
def _dino_reference_pos_encoding(pos_embed, npatch, w, h, patch):
    """DINO's ``interpolate_pos_encoding`` restated from facebookresearch/dino (and
    WS-DINO's copy): ``w``, ``h`` are the input's dims 2 and 3; early exit on the trained
    grid of a square input; otherwise bicubic by the scale factor ``(w // p + 0.1) /
    sqrt(N)``, no antialiasing, the class entry kept in front."""
    import math

    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim)
    out = torch.nn.functional.interpolate(grid.permute(0, 3, 1, 2), mode="bicubic",
                                          scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)))
    assert (int(w0), int(h0)) == tuple(out.shape[-2:])
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], out], dim=1)


def _reference_cls(model, x, pos_fn):
    """A timm ViT's CLS output with the position embedding from ``pos_fn``, by hand."""
    b, _, w, h = x.shape
    tokens = model.patch_embed(x).reshape(b, -1, model.embed_dim)  # NHWC -> tokens
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1)
    tokens = tokens + pos_fn(model.pos_embed, tokens.shape[1] - 1, w, h)
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 0]


def _vits8_two_blocks():
    """ViT-S/8's 28 x 28 position grid and width with two blocks (fast on a CPU)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch8_224", depth=2, num_classes=0, in_chans=1,
                             dynamic_img_size=True).eval()


@pytest.fixture(scope="module")
def vits8():
    from napari_wsdino.core.model import set_pos_embed

    return set_pos_embed(_vits8_two_blocks(), "dino")


@pytest.mark.parametrize("size", [(96, 96), (224, 256), (224, 224)])
def test_dino_position_interpolation_equals_dinos_formula(vits8, size):
    """Issue 29: under ``pos_embed="dino"`` (the paper-code recipe) a ViT-S/8 fits its
    28 x 28 position grid to a 96 px local crop (12 x 12) and to a 224 x 256 official
    embedding window (28 x 32) exactly as DINO's interpolate_pos_encoding; the CLS token
    of the whole forward pass equals one built by hand on the reference."""
    from napari_wsdino.core.model import dino_pos_embed, pos_embed_mode

    assert pos_embed_mode(create_backbone("test_vit", pos_embed="dino")) == "dino"
    rows, cols = size[0] // 8, size[1] // 8
    pe = vits8.pos_embed.detach()
    ref = _dino_reference_pos_encoding(pe, rows * cols, *size, 8)
    assert torch.equal(dino_pos_embed(pe, (rows, cols)), ref)
    x = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(3))
    pos_fn = lambda p, n, w, h: _dino_reference_pos_encoding(p, n, w, h, 8)  # noqa: E731
    with torch.no_grad():
        ours, theirs = vits8(x), _reference_cls(vits8, x, pos_fn)
    assert pos_embed_mode(vits8) == "dino"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_timm_interpolation_stays_the_default_and_differs_from_dinos(vits8):
    """Other recipes keep timm's antialiased resize: a backbone made without
    ``pos_embed`` has no instance override (so the default numbers cannot move), and at
    96 px the two interpolations differ; at the trained 224 x 224 they agree."""
    from timm.layers import resample_abs_pos_embed

    from napari_wsdino.core.model import pos_embed_as, pos_embed_mode, set_pos_embed

    made = create_backbone("test_vit")
    assert pos_embed_mode(made) == "timm" and "_pos_embed" not in made.__dict__
    plain = _vits8_two_blocks()
    timm_fn = lambda p, n, w, h: resample_abs_pos_embed(p, [w // 8, h // 8])  # noqa: E731
    x = torch.randn(2, 1, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), _reference_cls(plain, x, timm_fn), rtol=0, atol=1e-6)
        dino = vits8(x)
        assert torch.equal(plain.pos_embed, vits8.pos_embed)  # same weights, seed 0
        rel = (plain(x) - dino).norm() / dino.norm()
        assert rel > 1e-3
        full = torch.randn(1, 1, 224, 224)
        torch.testing.assert_close(plain(full), vits8(full), rtol=0, atol=0)
    with pos_embed_as(plain, "dino"):
        assert pos_embed_mode(plain) == "dino"
    assert pos_embed_mode(plain) == "timm"
    assert pos_embed_mode(set_pos_embed(plain, "timm")) == "timm"
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        set_pos_embed(plain, "nearest")


def test_embed_channel_takes_the_position_interpolation_for_the_call(vit):
    """``embed_channel(pos_embed="dino")`` embeds the official (non-square) windows with
    DINO's interpolation and leaves the model as it was."""
    from napari_wsdino.core.model import pos_embed_mode, set_pos_embed

    images = np.random.default_rng(2).random((2, 100, 120)).astype(np.float32)
    args = dict(patch=16, windows="official", median="lower")
    timm_feats = embed.embed_channel(vit, images, **args)
    dino_feats = embed.embed_channel(vit, images, pos_embed="dino", **args)
    assert pos_embed_mode(vit) == "timm"
    set_pos_embed(vit, "dino")
    try:
        np.testing.assert_array_equal(dino_feats, embed.embed_channel(vit, images, **args))
    finally:
        set_pos_embed(vit, "timm")
    assert not np.allclose(timm_feats, dino_feats)
