"""DINO head, loss and wrapper: checked against plain, obviously-correct versions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_wsdino.core.dino import DINOHead, DINOLoss, MultiCropWrapper, ema_update


def reference_loss(student, teacher, center, n_crops, student_temp, teacher_temp):
    """The loop of facebookresearch/dino's DINOLoss.forward."""
    s = (student / student_temp).chunk(n_crops)
    t = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_loss_matches_reference_loop_and_updates_centre():
    g = torch.Generator().manual_seed(0)
    b, k, n_crops = 3, 32, 6
    student = torch.randn(n_crops * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    loss = DINOLoss(k, n_crops, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, k, generator=g))
    center0 = loss.center.clone()
    got = loss(student, teacher, teacher_temp=0.04)
    want = reference_loss(student, teacher, center0, n_crops, 0.1, 0.04)
    torch.testing.assert_close(got, want)
    expected_center = 0.9 * center0 + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss.center, expected_center)


def test_loss_defaults_are_ws_dino_code_values():
    loss = DINOLoss(16, 10)
    assert loss.student_temp == 0.07
    assert loss.center_momentum == 0.8


def test_loss_is_low_when_student_matches_sharp_teacher():
    k, b = 16, 4
    target = torch.arange(b) % k
    sharp = F.one_hot(target, k).float() * 20
    loss = DINOLoss(k, 4, student_temp=0.1)
    matched = loss(sharp.repeat(4, 1), sharp.repeat(2, 1), teacher_temp=0.04)
    loss.center.zero_()
    shuffled = loss(sharp.roll(1, 0).repeat(4, 1), sharp.repeat(2, 1), teacher_temp=0.04)
    assert float(matched) < 0.01 < float(shuffled)


def test_head_layout_and_weight_norm_match_torch():
    head = DINOHead(64, out_dim=128, hidden_dim=48, bottleneck_dim=16)
    keys = set(head.state_dict())
    assert keys == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
        "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v",
    }
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert head.last_layer.weight_g.requires_grad  # norm_last_layer=False
    torch.testing.assert_close(head.last_layer.weight_g, torch.ones(128, 1))
    # Same as torch's own weight norm with the same g and v.
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(16, 128, bias=False))
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head.last_layer(x), ref(x))
    frozen = DINOHead(64, out_dim=128, hidden_dim=48, bottleneck_dim=16, norm_last_layer=True)
    assert not frozen.last_layer.weight_g.requires_grad


def test_default_head_is_the_paper_head():
    head = DINOHead(384)
    assert head.mlp[0].out_features == 2048 and head.mlp[4].out_features == 256
    assert head.last_layer.weight_v.shape == (65536, 256)


def test_wrapper_keys_and_crop_grouping():
    from napari_wsdino.core.model import create_backbone

    torch.manual_seed(0)
    model = MultiCropWrapper(create_backbone("test_vit"), DINOHead(64, 32, 16, 8)).eval()
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(2, 1, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(2, 1, 16, 16, generator=g) for _ in range(3)]
    with torch.no_grad():
        out = model(crops)
        one_by_one = torch.cat([model.head(model.backbone(c)) for c in crops])
    assert out.shape == (10, 32)
    torch.testing.assert_close(out, one_by_one, atol=1e-5, rtol=1e-4)


def test_ema_update():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, 0.75)
    torch.testing.assert_close(a.weight, 0.75 * wa + 0.25 * wb)
