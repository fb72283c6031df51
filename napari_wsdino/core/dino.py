"""DINO projection head, loss and multi-crop wrapper (Caron et al. 2021, "Emerging
Properties in Self-Supervised Vision Transformers"), as used by WS-DINO (Cross-Zamirski
et al. 2022).

* :class:`DINOHead` — 3-layer MLP (hidden 2048, GELU, bottleneck 256, no batch norm),
  L2-normalised bottleneck, weight-normalised last layer of 65,536 outputs. Parameter
  names match the official DINO files (``mlp.0``, ``mlp.2``, ``mlp.4``,
  ``last_layer.weight_g``, ``last_layer.weight_v``).
* :class:`DINOLoss` — cross-entropy between the teacher's centred, sharpened softmax over
  the global views and the student's softmax over all views, same-view pairs skipped;
  the centre is an EMA of the teacher outputs, all-reduced across processes.
* :class:`MultiCropWrapper` — ``backbone`` + ``head``; runs the backbone once per crop
  resolution, so state-dict keys are ``backbone.*`` and ``head.*``.

Example
-------
>>> import torch
>>> from napari_wsdino.core.dino import DINOHead, DINOLoss
>>> head = DINOHead(64, out_dim=256, hidden_dim=64, bottleneck_dim=32)
>>> loss = DINOLoss(256, n_crops=4)
>>> s = head(torch.randn(4 * 3, 64)); t = head(torch.randn(2 * 3, 64))
>>> float(loss(s, t, teacher_temp=0.04).detach()) > 0
True
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from napari_wsdino.core.archs import CENTERINGS  # noqa: F401  (re-exported; torch-free)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``W = g * v / ||v||`` (rows), as ``nn.utils.weight_norm``.

    Kept as plain ``weight_g``/``weight_v`` parameters so the keys equal the official
    DINO checkpoints' and no deprecated hook is involved.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias=False)  # DINO: default init of v
        self.weight_v = nn.Parameter(lin.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO projection head.

    Parameters
    ----------
    in_dim
        Backbone embedding size (384 for ViT-S).
    out_dim
        Prototype count (65,536 in DINO and WS-DINO).
    hidden_dim, bottleneck_dim, n_layers
        MLP shape (2048, 256, 3).
    use_bn
        Batch norm in the MLP (off in WS-DINO).
    norm_last_layer
        Freeze the weight-norm gain at 1 (DINO's option; off in WS-DINO).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = False,
    ):
        super().__init__()
        n_layers = max(n_layers, 1)
        if n_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(n_layers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of (possibly) different sizes.

    Consecutive crops of equal size are concatenated and run through the backbone in one
    pass; the head then runs once on all embeddings. Output rows are crop-major: the
    first ``B`` rows are crop 0 of each image, the next ``B`` crop 1, and so on.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats))




@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Teacher targets ``(N, K)`` whose rows sum to one and whose columns share the mass
    evenly (DINOv2's Sinkhorn-Knopp centring); sums run over every process.

    Example
    -------
    >>> q = sinkhorn_knopp(torch.randn(8, 4))
    >>> torch.allclose(q.sum(1), torch.ones(8), atol=1e-5), q.shape
    (True, torch.Size([8, 4]))
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    q = torch.exp(logits - logits.max()).t()            # (K, N)
    n = torch.tensor(float(q.shape[1]), device=q.device)
    if distributed:
        dist.all_reduce(n)
    k = q.shape[0]
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t()


class DINOLoss(nn.Module):
    """DINO / WS-DINO cross-entropy with teacher centring and sharpening.

    Parameters
    ----------
    out_dim
        Head output size.
    n_crops
        Views the student sees (2 global + local).
    n_global
        Views the teacher sees (2).
    student_temp
        0.07 in the WS-DINO code (DINO: 0.1).
    center_momentum
        0.8 in the WS-DINO code (DINO: 0.9).
    centering
        ``"centre"`` (DINO / WS-DINO: subtract an EMA of the teacher's mean output) or
        ``"sinkhorn"`` (DINOv2, Oquab et al. 2023: three Sinkhorn-Knopp iterations spread
        the batch's teacher targets evenly over the prototypes, which cannot collapse to
        the uniform or a one-hot output; the centre is still tracked, unused).

    The teacher temperature is passed per call, so its schedule lives with the others.
    """

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        n_global: int = 2,
        student_temp: float = 0.07,
        center_momentum: float = 0.8,
        centering: str = "centre",
    ):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {', '.join(CENTERINGS)}, not {centering!r}")
        self.centering = centering
        self.n_crops = n_crops
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Mean cross-entropy over all (teacher view, student view) pairs of different views.

        ``student_output`` is ``(n_crops * B, K)`` crop-major, ``teacher_output`` is
        ``(n_global * B, K)``. Updates the centre (no gradient) as a side effect.
        """
        b = teacher_output.shape[0] // self.n_global
        logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        logp = logp.view(self.n_crops, b, -1)
        if self.centering == "sinkhorn":
            q = sinkhorn_knopp(teacher_output.float().detach() / teacher_temp)
        else:
            q = F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)
        q = q.detach().view(self.n_global, b, -1)
        # ce[i, v] = mean over the batch of -sum_k q_i log p_v
        ce = -torch.einsum("ibk,vbk->iv", q, logp) / b
        mask = torch.ones_like(ce)
        idx = torch.arange(min(self.n_global, self.n_crops), device=ce.device)
        mask[idx, idx] = 0
        loss = (ce * mask).sum() / mask.sum()
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the mean teacher output over the global batch (all processes)."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        n = torch.tensor(float(teacher_output.shape[0]), device=batch_center.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(n)
        batch_center = batch_center / n
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student`` over all parameters (fused)."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)

