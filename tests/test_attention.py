"""Self-attention maps: explicit computation, sums, placement, thresholds, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from napari_wsdino.cli import main
from napari_wsdino.core.attention import (
    attention_maps,
    field_index,
    last_block_cls_attention,
    threshold_mass,
)
from napari_wsdino.core.cache import write_cache
from napari_wsdino.core.model import CHECKPOINT_FORMAT, create_backbone
from napari_wsdino.core.metadata import DataError


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return create_backbone("test_vit").eval()


def _timm_attention_matrix(model, x):
    """timm's own non-fused path, its softmax output captured at attn_drop."""
    attn = model.blocks[-1].attn
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model(x)
    finally:
        attn.fused_attn = True
        handle.remove()
    return seen[-1]


def _explicit_attention_matrix(model, x):
    """softmax(Q K^T / sqrt(d)) written out from the weights, token by token."""
    with torch.no_grad():
        t = model.patch_embed(x)
        t = model._pos_embed(t)
        t = model.norm_pre(t)
        for blk in model.blocks[:-1]:
            t = blk(t)
        blk = model.blocks[-1]
        y = blk.norm1(t)[0]                              # (N, C)
        heads = blk.attn.num_heads
        d = y.shape[1] // heads
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        q = y @ w[:heads * d].T + b[:heads * d]
        k = y @ w[heads * d: 2 * heads * d].T + b[heads * d: 2 * heads * d]
        out = []
        for h in range(heads):
            qh, kh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d]
            out.append(torch.softmax(qh @ kh.T / np.sqrt(d), dim=-1))
        return torch.stack(out)                          # (heads, N, N)


def test_attention_matches_explicit_and_timm_and_leaves_output_unchanged(vit):
    x = torch.rand(1, 1, 48, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = vit(x)
    out, attn = last_block_cls_attention(vit, x)
    assert torch.equal(out, before)
    assert len(vit.blocks[-1].attn._forward_pre_hooks) == 0  # hook removed
    with torch.no_grad():
        assert torch.equal(vit(x), before)
    assert attn.shape == (1, 2, 1 + 3 * 5)
    explicit = _explicit_attention_matrix(vit, x)
    torch.testing.assert_close(attn[0], explicit[:, 0], atol=1e-6, rtol=1e-5)
    timm_matrix = _timm_attention_matrix(vit, x)
    torch.testing.assert_close(attn[0], timm_matrix[0, :, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2))


def test_maps_sum_to_one_per_head_and_embedding_is_the_models(vit):
    img = np.random.default_rng(2).random((64, 96)).astype(np.float32)
    maps = attention_maps(vit, img)
    assert maps.patches.shape == (2, 4, 6) and maps.heads.shape == (2, 64, 96)
    np.testing.assert_allclose(maps.patches.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.all((maps.prefix_mass > 0) & (maps.prefix_mass < 1))
    with torch.no_grad():
        np.testing.assert_array_equal(maps.embedding, vit(torch.from_numpy(img)[None, None])[0].numpy())
    np.testing.assert_allclose(maps.mean, maps.heads.mean(axis=0), rtol=1e-6)


def test_one_unique_patch_is_placed_where_it_is(vit):
    # Without position embeddings, identical patches get identical attention; only the
    # one unique patch (grid row 1, column 3 of a 3 x 5 grid) differs. A transposed or
    # shifted reshape/upsampling would put it elsewhere.
    with torch.no_grad():
        vit.pos_embed.zero_()
    img = np.full((48, 80), 0.5, dtype=np.float32)
    img[16:32, 48:64] = np.random.default_rng(3).random((16, 16))
    maps = attention_maps(vit, img, mode="nearest")
    assert maps.grid == (3, 5)
    for h in range(maps.n_heads):
        grid = maps.patches[h]
        others = np.delete(grid.ravel(), 1 * 5 + 3)
        np.testing.assert_allclose(others, others[0], rtol=1e-5)
        assert abs(grid[1, 3] - others[0]) > 1e-3 * others[0]
        # upsampled: the 16 x 16 block of the unique patch holds its value, and only it
        np.testing.assert_allclose(maps.heads[h, 16:32, 48:64], grid[1, 3], rtol=1e-6)
        rest = maps.heads[h].copy()
        rest[16:32, 48:64] = others[0]
        np.testing.assert_allclose(rest, others[0], rtol=1e-5)


def test_any_size_bilinear_and_non_multiple_sides(vit):
    img = np.random.default_rng(4).random((50, 84)).astype(np.float32)
    maps = attention_maps(vit, img, mode="bilinear")
    assert maps.grid == (3, 5) and maps.heads.shape == (2, 50, 84)
    assert np.all(maps.heads[:, 48:, :] == 0) and np.all(maps.heads[:, :, 80:] == 0)
    seen = maps.heads[:, :48, :80]
    assert seen.min() >= maps.patches.min() - 1e-7 and seen.max() <= maps.patches.max() + 1e-7
    with pytest.raises(ValueError, match="smaller than one"):
        attention_maps(vit, img[:10])


def _slow_threshold(row, keep):
    kept = np.zeros(len(row), bool)
    mass = 0.0
    total = row.sum()
    for i in np.argsort(-row, kind="stable"):
        if mass >= keep * total:
            break
        kept[i] = True
        mass += row[i]
    return kept


def test_threshold_keeps_the_top_patches_holding_the_mass(vit):
    np.testing.assert_array_equal(threshold_mass(np.array([[0.5, 0.3, 0.15, 0.05]]), 0.6),
                                  [[True, True, False, False]])
    rows = np.random.default_rng(5).random((20, 30))
    got = threshold_mass(rows, 0.6)
    for r, k in zip(rows, got):
        np.testing.assert_array_equal(k, _slow_threshold(r, 0.6))
        assert r[k].sum() >= 0.6 * r.sum() and r[k].sum() - r[k].min() < 0.6 * r.sum()
    maps = attention_maps(vit, np.random.default_rng(6).random((48, 48)))
    for h in range(maps.n_heads):
        kept_patches = threshold_mass(maps.patches[h][None], 0.6)[0]
        np.testing.assert_array_equal(maps.threshold[h, ::16, ::16], kept_patches)


def test_field_index():
    t = pd.DataFrame({"plate": ["P1", "P1", "P2"], "well": ["B02", "B02", "B02"], "site": [1, 2, 1]})
    assert field_index(t, "P1/B02/s2") == 1 and field_index(t, "P2/B02/1") == 2
    with pytest.raises(DataError, match="No field"):
        field_index(t, "P3/B02/s1")
    with pytest.raises(DataError, match="PLATE/WELL/SITE"):
        field_index(t, "P1-B02")


def test_cli_attention_png_and_tiff(vit, tmp_path, capsys):
    table = pd.DataFrame({"plate": ["P1", "P1"], "batch": ["Week1"] * 2, "well": ["B02", "B03"],
                          "site": [1, 1], "replicate": [1, 1], "compound": ["DMSO", "taxol"],
                          "concentration": [0.0, 0.3], "treatment": ["DMSO@0", "taxol@0.3"],
                          "moa": ["DMSO", "Microtubule stabilizers"]})
    rng = np.random.default_rng(7)
    cache = write_cache(tmp_path / "cache", table, {c: rng.random((2, 48, 64)) for c in ("DAPI", "Actin")})
    ckpt = tmp_path / "run" / "Actin" / "checkpoint.pth"
    ckpt.parent.mkdir(parents=True)
    sd = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "channel": "Actin", "config": {"arch": "test_vit"},
                "teacher": sd, "student": sd}, ckpt)
    tif = tmp_path / "maps.tif"
    assert main(["attention", str(cache.path), "--model", str(tmp_path / "run"), "--channel", "Actin",
                 "--field", "P1/B03/s1", "--out", str(tif), "--device", "cpu"]) == 0
    stack = tifffile.imread(tif)
    assert stack.shape == (2 + 2, 48, 64)
    expected = attention_maps(vit, np.asarray(cache.images("Actin")[1], np.float32))
    np.testing.assert_allclose(stack[:2], expected.heads, rtol=1e-5)
    np.testing.assert_allclose(stack[2], expected.mean, rtol=1e-5)
    png = tmp_path / "maps.png"
    assert main(["attention", str(cache.path), "--model", str(ckpt), "--channel", "Actin",
                 "--index", "0", "--region", "0,0,32,48", "--out", str(png), "--mode", "bilinear"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Actin model refused for DAPI images
    assert main(["attention", str(cache.path), "--model", str(ckpt), "--channel", "DAPI",
                 "--index", "0", "--out", str(png)]) == 2
    assert "not 'DAPI'" in capsys.readouterr().err


def test_cli_attention_on_a_raw_dataset_folder(vit, tmp_path):
    from napari_wsdino.core.imageio import write_tiff
    from napari_wsdino.core.metadata import bundled_metadata_dir

    src = bundled_metadata_dir()
    rows = pd.read_csv(src / "BBBC021_v1_image.csv").head(1)
    rows.to_csv(tmp_path / "BBBC021_v1_image.csv", index=False)
    (tmp_path / "BBBC021_v1_moa.csv").write_bytes((src / "BBBC021_v1_moa.csv").read_bytes())
    row = rows.iloc[0]
    raw = (np.random.default_rng(8).random((48, 64)) * 4000).astype(np.uint16)
    write_tiff(tmp_path / row.Image_PathName_Tubulin / row.Image_FileName_Tubulin, raw)
    weights = tmp_path / "timm_style.pth"
    torch.save(vit.state_dict(), weights)
    out = tmp_path / "raw.tif"
    site = row.Image_FileName_DAPI.split("_s")[1][0]
    key = f"{row.Image_Metadata_Plate_DAPI}/{row.Image_Metadata_Well_DAPI}/s{site}"
    assert main(["attention", str(tmp_path), "--model", str(weights), "--arch", "test_vit",
                 "--channel", "Tubulin", "--field", key, "--out", str(out)]) == 0
    z = (raw - raw.mean()) / raw.std()
    expected = attention_maps(vit, z.astype(np.float32))
    np.testing.assert_allclose(tifffile.imread(out)[:2], expected.heads, rtol=1e-4)
