"""Multi-crop views for DINO / WS-DINO, made for a whole batch at once on the device.

DINO (Caron et al. 2021) trains on 2 global and several local random-resized crops of
each image; WS-DINO (Cross-Zamirski et al. 2022) keeps DINO's crops but takes them
square, bicubic, from 10–20 % (global, 224 px) and 4–8 % (local, 96 px) of the field's
area, with random horizontal and vertical flips (p = 0.5) and no colour augmentation.

Instead of cropping each view of each image on the CPU (PIL / torchvision transforms per
sample), the crop boxes of a whole batch are drawn at once and all crops are resampled
in one :func:`torch.nn.functional.grid_sample` call per crop size: each image's crops are
stacked along the output grid's height, so the image is never copied. Flips are negative
scales in the same affine map. The random numbers come from a CPU
:class:`torch.Generator`, so the crops are identical on CPU and GPU and reproducible.

Resampling is bicubic (Keys, a = -0.75, as ``torch.nn.functional.interpolate``) without
anti-aliasing; at the paper's settings local crops shrink by at most ~1.6x.

Example
-------
>>> import torch
>>> from napari_wsdino.core.views import multi_crop
>>> imgs = torch.rand(4, 1, 128, 160)
>>> views = multi_crop(imgs, imgs, n_local=3, global_size=32, local_size=16,
...                    generator=torch.Generator().manual_seed(0))
>>> [tuple(v.shape) for v in views][:3]
[(4, 1, 32, 32), (4, 1, 32, 32), (4, 1, 16, 16)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GLOBAL_SCALE = (0.1, 0.2)
LOCAL_SCALE = (0.04, 0.08)


@dataclass(frozen=True)
class CropBoxes:
    """Square crop boxes in pixels, ``(B, n)`` each; flips as booleans; ``rot90`` the
    number of quarter turns (0-3, ``None`` = none)."""

    x0: torch.Tensor
    y0: torch.Tensor
    side: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    rot90: torch.Tensor | None = None


@dataclass(frozen=True)
class Centres:
    """Candidate crop centres per image (e.g. nuclei): ``yx`` ``(B, K, 2)`` pixels, of
    which the first ``count[b]`` are valid for image ``b``. Images with ``count == 0``
    get uniform crops."""

    yx: torch.Tensor
    count: torch.Tensor


def sample_boxes(
    batch: int,
    n_crops: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    flip_p: float = 0.5,
    rotate: bool = False,
    centres: Centres | None = None,
    jitter: float = 0.25,
) -> CropBoxes:
    """Draw square random-resized-crop boxes covering ``scale`` of the image area.

    The side is ``sqrt(u * H * W)`` with ``u ~ U(scale)``, capped at the shorter image
    side; the box lies wholly inside the image at a uniform position. With ``centres``
    (cell-centred crops, as single-cell DINO works do) each box is centred on one of its
    image's candidate centres, drawn uniformly, moved by up to ``jitter`` x side, then
    shifted inside the image. ``rotate`` adds random quarter turns (microscopy has no
    up). The draws without ``rotate`` / ``centres`` are unchanged.
    """
    shape = (batch, n_crops)
    u = torch.rand(shape, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u) * (height * width)
    side = area.sqrt().clamp(max=float(min(height, width)))
    x0 = torch.rand(shape, generator=generator) * (width - side)
    y0 = torch.rand(shape, generator=generator) * (height - side)
    hflip = torch.rand(shape, generator=generator) < flip_p
    vflip = torch.rand(shape, generator=generator) < flip_p
    rot = torch.randint(0, 4, shape, generator=generator) if rotate else None
    if centres is not None:
        count = centres.count.to(torch.int64).cpu()
        pick = (torch.rand(shape, generator=generator) * count.clamp(min=1)[:, None]).long()
        yx = centres.yx.cpu().float()
        chosen = torch.gather(yx, 1, pick[..., None].expand(*shape, 2))
        shift = (torch.rand((*shape, 2), generator=generator) * 2 - 1) * jitter * side[..., None]
        cy, cx = (chosen + shift).unbind(-1)
        has = (count > 0)[:, None]
        x0 = torch.where(has, (cx - side / 2).clamp(min=0).minimum(width - side), x0)
        y0 = torch.where(has, (cy - side / 2).clamp(min=0).minimum(height - side), y0)
    return CropBoxes(x0, y0, side, hflip, vflip, rot)


def crop_resize(images: torch.Tensor, boxes: CropBoxes, size: int) -> list[torch.Tensor]:
    """Resample every box of every image to ``size x size`` (bicubic, flips applied).

    Parameters
    ----------
    images
        ``(B, C, H, W)`` float tensor on any device.
    boxes
        From :func:`sample_boxes` with the same ``B``.

    Returns
    -------
    list of ``n`` tensors ``(B, C, size, size)``: crop ``k`` of each image.
    """
    b, c, h, w = images.shape
    n = boxes.side.shape[1]
    dev, dt = images.device, images.dtype
    if dt not in (torch.float32, torch.float64):
        images, dt = images.float(), torch.float32
    fx = 1 - 2 * boxes.hflip.to(torch.float32)
    fy = 1 - 2 * boxes.vflip.to(torch.float32)
    cx = 2 * (boxes.x0 + boxes.side / 2) / w - 1
    cy = 2 * (boxes.y0 + boxes.side / 2) / h - 1
    zero = torch.zeros_like(fx)
    # Output (u, v) -> input: flips, then quarter turns (a signed permutation), then the
    # box's scale; square boxes make every turn exact.
    m = [[fx, zero], [zero, fy]]
    if boxes.rot90 is not None:
        k = boxes.rot90.to(torch.int64)
        cos = torch.where(k == 0, 1.0, torch.where(k == 2, -1.0, 0.0))
        sin = torch.where(k == 1, 1.0, torch.where(k == 3, -1.0, 0.0))
        m = [[cos * fx, -sin * fy], [sin * fx, cos * fy]]
    ax, ay = boxes.side / w, boxes.side / h
    theta = torch.stack(
        [torch.stack([ax * m[0][0], ax * m[0][1], cx], -1),
         torch.stack([ay * m[1][0], ay * m[1][1], cy], -1)], -2
    ).reshape(b * n, 2, 3).to(device=dev, dtype=dt)
    grid = F.affine_grid(theta, [b * n, 1, size, size], align_corners=False)
    grid = grid.reshape(b, n * size, size, 2)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    out = out.reshape(b, c, n, size, size).permute(2, 0, 1, 3, 4)
    return list(out.unbind(0))


def multi_crop(
    global_images: torch.Tensor,
    local_images: torch.Tensor,
    *,
    n_global: int = 2,
    n_local: int = 8,
    global_size: int = 224,
    local_size: int = 96,
    global_scale: tuple[float, float] = GLOBAL_SCALE,
    local_scale: tuple[float, float] = LOCAL_SCALE,
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    rotate: bool = False,
    global_centres: Centres | None = None,
    local_centres: Centres | None = None,
) -> list[torch.Tensor]:
    """The DINO / WS-DINO view set of a batch: global crops, then local crops.

    For WS-DINO ``local_images[b]`` is another field with ``global_images[b]``'s weak
    label; for plain DINO pass the same tensor twice. ``rotate`` and the ``*_centres``
    (cell-centred crops) are passed to :func:`sample_boxes`.

    Returns
    -------
    list of ``n_global + n_local`` tensors ``(B, C, size, size)`` (crop-major, the order
    :class:`napari_wsdino.core.dino.MultiCropWrapper` and ``DINOLoss`` expect).
    """
    if global_images.shape != local_images.shape:
        raise ValueError("global and local source batches must have the same shape")
    b, _, h, w = global_images.shape
    gb = sample_boxes(b, n_global, h, w, global_scale, generator, flip_p, rotate,
                      global_centres)
    views = crop_resize(global_images, gb, global_size)
    if n_local:
        lb = sample_boxes(b, n_local, h, w, local_scale, generator, flip_p, rotate,
                          local_centres)
        views += crop_resize(local_images, lb, local_size)
    return views


def jitter_intensity(views: list[torch.Tensor], strength: float,
                     generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-view, per-image random gain ``exp(N(0, s))`` and offset ``N(0, s / 2)``.

    Stain intensity drifts between weeks and plates; jittering it in every view makes
    the learned profile lean on shapes and textures rather than on a plate's brightness.
    ``strength = 0`` returns the views unchanged.
    """
    if strength <= 0:
        return views
    out = []
    for v in views:
        shape = (v.shape[0],) + (1,) * (v.ndim - 1)
        gain = torch.exp(torch.randn(shape, generator=generator) * strength)
        offset = torch.randn(shape, generator=generator) * (strength / 2)
        out.append(v * gain.to(v.device, v.dtype) + offset.to(v.device, v.dtype))
    return out
