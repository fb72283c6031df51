"""Position embeddings at other input sizes: timm's way or DINO's.

By default a backbone uses timm's ``resample_abs_pos_embed`` (bicubic to the exact grid,
antialiased when shrinking); ``pos_embed="dino"`` (:func:`set_pos_embed`) uses DINO's
``interpolate_pos_encoding`` instead (bicubic by the scale factor ``(n + 0.1) / sqrt(N)``,
no antialiasing), as the official WS-DINO code does for every 96 px local crop and every
non-square embedding window.

Every name here is also importable from :mod:`napari_wsdino.core.model`.

Example
-------
>>> import torch
>>> from napari_wsdino.core.pos_embed import dino_pos_embed
>>> dino_pos_embed(torch.randn(1, 1 + 28 * 28, 6), (12, 12)).shape
torch.Size([1, 145, 6])
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
from torch import nn

#: How a backbone fits its position embedding to an input of another size.
POS_EMBED_MODES = {
    "timm": "timm's resample_abs_pos_embed: bicubic to the exact grid, antialiased when "
            "shrinking (this package's default)",
    "dino": "DINO's interpolate_pos_encoding: bicubic by the scale factor (n + 0.1) / sqrt(N), "
            "no antialiasing (the official WS-DINO and DINO code)",
}


def dino_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                   num_prefix_tokens: int = 1) -> torch.Tensor:
    """A square position embedding fitted to a ``(rows, cols)`` patch grid as DINO does.

    facebookresearch/dino ``VisionTransformer.interpolate_pos_encoding`` (Caron et al.
    2021, "Emerging Properties in Self-Supervised Vision Transformers"), which WS-DINO
    copies: the ``sqrt(N) x sqrt(N)`` grid is resized bicubically by the *scale factor*
    ``(n + 0.1) / sqrt(N)`` per axis, without antialiasing, and the class token's entry
    is kept. Giving the scale factor rather than the size moves where each output
    position samples the input (by about 0.1 / n of a patch); the 0.1 only keeps
    ``floor(sqrt(N) * scale)`` from rounding down to ``n - 1``. The grid the embedding
    was made for is returned unchanged, as DINO does.

    Example
    -------
    >>> pe = torch.randn(1, 1 + 28 * 28, 6)
    >>> dino_pos_embed(pe, (12, 12)).shape, dino_pos_embed(pe, (28, 28)) is pe
    (torch.Size([1, 145, 6]), True)
    """
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(n_grid)
    if side * side != n_grid:
        raise ValueError(f"DINO's interpolation needs a square position grid, not {n_grid} "
                         "entries.")
    rows, cols = int(grid[0]), int(grid[1])
    if (rows, cols) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, num_prefix_tokens:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = nn.functional.interpolate(
        patches, scale_factor=((rows + 0.1) / math.sqrt(n_grid), (cols + 0.1) / math.sqrt(n_grid)),
        mode="bicubic")
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise ValueError(f"DINO's interpolation gave a {tuple(resized.shape[-2:])} grid, not "
                         f"{(rows, cols)}.")
    resized = resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos_embed[:, :num_prefix_tokens], resized], dim=1)


def _dino_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` (class token first) with DINO's interpolation."""
    batch, rows, cols, dim = x.shape  # dynamic_img_size: patch tokens arrive as NHWC
    pos = dino_pos_embed(self.pos_embed, (rows, cols), self.num_prefix_tokens)
    x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
    return self.pos_drop(x + pos)


def set_pos_embed(model: nn.Module, mode: str = "timm") -> nn.Module:
    """Make ``model`` fit its position embedding the ``mode`` way (:data:`POS_EMBED_MODES`).

    ``"dino"`` replaces the instance's ``_pos_embed`` (timm's class method is left alone,
    so other models keep timm's); ``"timm"`` restores timm's. Needs a timm ViT with a
    class token, no register tokens and ``dynamic_img_size`` (as
    :func:`~napari_wsdino.core.model.create_backbone` builds).

    Example
    -------
    >>> from napari_wsdino.core.model import create_backbone
    >>> vit = set_pos_embed(create_backbone("test_vit"), "dino")
    >>> pos_embed_mode(vit), vit(torch.zeros(1, 1, 48, 64)).shape
    ('dino', torch.Size([1, 64]))
    """
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBED_MODES)}, not {mode!r}.")
    if mode == "timm":
        model.__dict__.pop("_pos_embed", None)
        return model
    fits = (getattr(model, "cls_token", None) is not None
            and getattr(model, "reg_token", None) is None
            and not getattr(model, "no_embed_class", True)
            and getattr(model, "dynamic_img_size", False)
            and isinstance(getattr(model, "pos_embed", None), torch.Tensor))
    if not fits:
        raise ValueError(f"DINO's position interpolation needs a timm ViT with a class token "
                         f"and dynamic image size, not {type(model).__name__}.")
    model._pos_embed = types.MethodType(_dino_pos_embed, model)
    return model


def pos_embed_mode(model: nn.Module) -> str:
    """``"dino"`` or ``"timm"``: how ``model`` fits its position embedding."""
    own = model.__dict__.get("_pos_embed")
    return "dino" if getattr(own, "__func__", None) is _dino_pos_embed else "timm"


@contextlib.contextmanager
def pos_embed_as(model: nn.Module, mode: str | None):
    """``model`` with ``mode``'s interpolation inside the block, its own after (``None``:
    leave it as it is)."""
    before = pos_embed_mode(model)
    if mode is not None:
        set_pos_embed(model, mode)
    try:
        yield model
    finally:
        set_pos_embed(model, before)
