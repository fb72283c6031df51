"""Batched multi-crop views against exact slices and torchvision's per-sample crop."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from napari_wsdino.core.views import (
    Centres,
    CropBoxes,
    crop_resize,
    jitter_intensity,
    multi_crop,
    sample_boxes,
)


def _boxes(x0, y0, side, hflip=False, vflip=False):
    t = lambda v: torch.tensor([[float(v)]])  # noqa: E731
    return CropBoxes(t(x0), t(y0), t(side), torch.tensor([[hflip]]), torch.tensor([[vflip]]))


def test_unscaled_crop_is_the_exact_slice_with_flips():
    img = torch.rand(1, 1, 40, 50, generator=torch.Generator().manual_seed(0))
    piece = img[0, 0, 7:23, 11:27]
    for hf in (False, True):
        for vf in (False, True):
            (out,) = crop_resize(img, _boxes(11, 7, 16, hf, vf), 16)
            want = piece
            if hf:
                want = want.flip(-1)
            if vf:
                want = want.flip(-2)
            torch.testing.assert_close(out[0, 0], want, atol=1e-5, rtol=1e-5)


def test_scaled_crop_matches_torchvision_bicubic_inside():
    img = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    (ours,) = crop_resize(img, _boxes(8, 12, 32, False, False), 20)
    theirs = TF.resized_crop(img, 12, 8, 32, 32, [20, 20], InterpolationMode.BICUBIC,
                             antialias=False)
    # Borders differ on purpose: we read real neighbours, torchvision clamps at the crop.
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], theirs[..., 2:-2, 2:-2],
                               atol=1e-4, rtol=1e-4)


def test_boxes_cover_the_requested_area_and_flip_half_the_time():
    g = torch.Generator().manual_seed(2)
    boxes = sample_boxes(500, 8, 120, 160, (0.04, 0.08), g)
    frac = boxes.side**2 / (120 * 160)
    assert frac.min() >= 0.04 - 1e-6 and frac.max() <= 0.08 + 1e-6
    assert (boxes.x0 >= 0).all() and (boxes.x0 + boxes.side <= 160 + 1e-4).all()
    assert (boxes.y0 >= 0).all() and (boxes.y0 + boxes.side <= 120 + 1e-4).all()
    for f in (boxes.hflip, boxes.vflip):
        assert 0.45 < f.float().mean() < 0.55
    big = sample_boxes(10, 2, 30, 300, (0.5, 0.6), g)
    assert (big.side <= 30).all()  # capped at the short side


def test_multi_crop_shapes_sources_and_determinism():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 1, 64, 80, generator=g)
    zeros = torch.zeros_like(a)
    run = lambda seed: multi_crop(a, zeros, n_local=4, global_size=32, local_size=16,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    v1, v2, v3 = run(0), run(0), run(1)
    assert [tuple(v.shape) for v in v1] == [(3, 1, 32, 32)] * 2 + [(3, 1, 16, 16)] * 4
    for x, y in zip(v1, v2):
        assert torch.equal(x, y)
    assert not torch.equal(v1[0], v3[0])
    # Global views come from the first batch, local views from the second.
    assert all(v.abs().sum() > 0 for v in v1[:2])
    assert all(v.abs().sum() == 0 for v in v1[2:])


def test_quarter_turns_are_exact_rotations():
    img = torch.arange(64.0).reshape(1, 1, 8, 8)
    for k in range(4):
        boxes = CropBoxes(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 8.0),
                          torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool),
                          torch.full((1, 1), k))
        out = crop_resize(img, boxes, 8)[0]
        assert torch.allclose(out, torch.rot90(img, k, (2, 3)), atol=1e-3)


def test_centred_boxes_contain_a_candidate_centre_and_fall_back_when_none():
    g = torch.Generator().manual_seed(0)
    yx = torch.zeros(3, 2, 2)
    yx[0] = torch.tensor([[10.0, 12.0], [90.0, 140.0]])
    yx[1, 0] = torch.tensor([50.0, 20.0])
    centres = Centres(yx, torch.tensor([2, 1, 0]))
    boxes = sample_boxes(3, 200, 120, 160, (0.02, 0.05), g, centres=centres, jitter=0.25)
    side, x0, y0 = boxes.side, boxes.x0, boxes.y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + side <= 160).all() and (y0 + side <= 120).all()
    # Image 1 has one nucleus at (50, 20): every box holds it.
    assert ((y0[1] <= 50) & (50 <= y0[1] + side[1]) & (x0[1] <= 20) & (20 <= x0[1] + side[1])).all()
    # Image 0: each box holds one of its two nuclei; both are used.
    near_first = (y0[0] <= 10) & (10 <= y0[0] + side[0]) & (x0[0] <= 12) & (12 <= x0[0] + side[0])
    near_second = (y0[0] <= 90) & (90 <= y0[0] + side[0]) & (x0[0] <= 140) & (140 <= x0[0] + side[0])
    assert (near_first | near_second).all() and near_first.any() and near_second.any()
    # Image 2 has none: uniform positions spread over the image.
    assert x0[2].std() > 20


def test_intensity_jitter_changes_gain_per_image_and_zero_is_identity():
    views = [torch.ones(4, 1, 8, 8), torch.ones(4, 1, 4, 4)]
    assert jitter_intensity(views, 0.0) is views
    out = jitter_intensity(views, 0.3, torch.Generator().manual_seed(1))
    assert out[0].shape == views[0].shape
    per_image = out[0].flatten(1)
    assert torch.allclose(per_image.std(1), torch.zeros(4), atol=1e-6)  # one gain per image
    assert per_image[:, 0].std() > 0.05                                 # differing between images
