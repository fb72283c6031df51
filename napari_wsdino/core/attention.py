"""Self-attention maps of a ViT: where the CLS token looks, per head (DINO, Caron et al. 2021).

The WS-DINO paper (Figure 1, "Self-attention maps") shows the last block's
attention from the [CLS] token to every patch, per head, laid over the cells. timm's
fused attention (``scaled_dot_product_attention``) never forms the attention
matrix, so it is recomputed here from the last block's own weights:

    a = softmax(q_cls · K^T * scale),   q, k = qkv(norm1(x)) split per head,

with ``x`` the last block's input captured by a forward pre-hook on its attention
module, timm's ``q_norm``/``k_norm`` applied, and ``scale = head_dim ** -0.5``. The
hook only reads, so the model's output is exactly what it is without it; only
the CLS row is formed, so any field size the ViT accepts works (dynamic image size).

What :func:`attention_maps` returns for an image:

* ``patches``: per head, the CLS→patch attention on the patch grid, renormalised
  to sum to one over the patches (the attention the CLS token pays to itself and
  to other prefix tokens is reported as ``prefix_mass``);
* ``heads``: those maps upsampled to the image (nearest or bilinear), ``mean`` their
  head mean;
* ``threshold`` / ``mean_threshold``: DINO's thresholded maps — the smallest set of
  patches holding at least ``keep`` (60 %) of the attention mass.

Image sides that are not a multiple of the patch size are cropped to one (from the
top-left, like DINO's ``visualize_attention.py``); the maps are zero on the strip
the model did not see, so they stay aligned with the input image.

Example
-------
>>> import numpy as np
>>> from napari_wsdino.core.model import create_backbone
>>> vit = create_backbone("test_vit")
>>> maps = attention_maps(vit, np.random.default_rng(0).random((48, 80)))
>>> maps.patches.shape, maps.heads.shape, np.allclose(maps.patches.sum(axis=(1, 2)), 1)
((2, 3, 5), (2, 48, 80), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_wsdino.core.fsio import atomic_path

DEFAULT_KEEP = 0.6
MODES = ("nearest", "bilinear")
#: How the Attention panel shows maps on screen (files keep ``nearest``: exact patch values).
DISPLAY_MODE = "bilinear"


@dataclass
class AttentionMaps:
    """The last block's CLS attention of one image.

    Attributes
    ----------
    patches
        ``(heads, gh, gw)``: attention to each patch, summing to one per head.
    heads
        ``(heads, H, W)``: ``patches`` upsampled to the image (zero outside the seen area).
    mean
        ``(H, W)``: head mean of ``heads``.
    threshold
        ``(heads, H, W)`` bool: DINO's map, the top patches holding ``keep`` of the mass.
    mean_threshold
        ``(H, W)`` bool: the same on the head mean.
    prefix_mass
        ``(heads,)``: share of the CLS attention spent on the CLS (and register) tokens.
    embedding
        ``(D,)``: the model's output (CLS embedding) for the image, unchanged by the hook.
    patch_size, keep, mode
        Settings used.
    """

    patches: np.ndarray
    heads: np.ndarray
    mean: np.ndarray
    threshold: np.ndarray
    mean_threshold: np.ndarray
    prefix_mass: np.ndarray
    embedding: np.ndarray
    patch_size: int
    keep: float
    mode: str

    @property
    def n_heads(self) -> int:
        return int(self.patches.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patches.shape[1:])


def _last_attention(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise TypeError(
            "Attention maps need a timm VisionTransformer (blocks[-1].attn with qkv); "
            f"got {type(model).__name__}."
        )
    return attn


def cls_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS-row attention weights of a timm ``Attention`` module for its input ``x``.

    Parameters
    ----------
    attn
        The module (``qkv``, ``num_heads``, ``q_norm``, ``k_norm``, ``scale``).
    x
        Its input ``(B, N, C)`` — the block's ``norm1`` output.

    Returns
    -------
    ``(B, heads, N)``: ``softmax(q_0 k^T * scale)`` for token 0 (CLS), each row sums to 1.
    """
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
    k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)
    return logits.softmax(dim=-1)[:, :, 0]


@torch.no_grad()
def last_block_cls_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model(x)`` and return ``(output, attention)``; the output is untouched.

    ``attention`` is ``(B, heads, N_tokens)``: the last block's CLS row, computed
    from the input its attention module received (captured by a read-only hook).
    """
    attn = _last_attention(model)
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, cls_attention(attn, captured[-1])


def threshold_mass(attention: np.ndarray, keep: float = DEFAULT_KEEP) -> np.ndarray:
    """DINO's thresholded attention: per row, the top entries holding ``keep`` of the mass.

    As in DINO's ``visualize_attention.py``: sort ascending, normalise, and keep the
    entries whose cumulative mass exceeds ``1 - keep``.

    Example
    -------
    >>> threshold_mass(np.array([[0.5, 0.3, 0.15, 0.05]]), 0.6)
    array([[ True,  True, False, False]])
    """
    a = np.asarray(attention, dtype=np.float64)
    flat = a.reshape(a.shape[0], -1)
    order = np.argsort(flat, axis=1, kind="stable")
    val = np.take_along_axis(flat, order, axis=1)
    val = val / np.maximum(val.sum(axis=1, keepdims=True), 1e-30)
    kept_sorted = np.cumsum(val, axis=1) > (1.0 - keep)
    kept = np.empty_like(kept_sorted)
    np.put_along_axis(kept, order, kept_sorted, axis=1)
    return kept.reshape(a.shape)


def upsample(maps: np.ndarray, patch: int, mode: str = "nearest") -> np.ndarray:
    """``(heads, gh, gw)`` patch-grid maps → ``(heads, gh*patch, gw*patch)`` pixels."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t, scale_factor=patch, mode=mode, **kwargs)[0].numpy()


def attention_maps(
    model: nn.Module,
    image: np.ndarray,
    *,
    mode: str = "nearest",
    keep: float = DEFAULT_KEEP,
    device: str | torch.device = "cpu",
) -> AttentionMaps:
    """Last-block CLS self-attention of ``model`` on one greyscale image.

    Parameters
    ----------
    model
        A timm ViT backbone (``create_backbone``; ``dynamic_img_size=True``).
    image
        ``(H, W)`` preprocessed field or any crop of it, at least one patch per side.
    mode
        Upsampling to pixels: ``"nearest"`` (patch blocks) or ``"bilinear"``.
    keep
        Mass kept by the thresholded maps (DINO: 0.6).
    device
        Where to run the model.

    Example
    -------
    >>> from napari_wsdino.core.model import create_backbone
    >>> maps = attention_maps(create_backbone("test_vit"), np.ones((64, 64)), mode="bilinear")
    >>> maps.mean.shape, maps.threshold.dtype
    ((64, 64), dtype('bool'))
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"attention_maps takes one (H, W) image, got shape {image.shape}.")
    pe = getattr(model, "patch_embed", None)
    p = getattr(pe, "patch_size", (1, 1))
    p = int(p[0] if isinstance(p, (tuple, list)) else p)
    h, w = image.shape
    gh, gw = h // p, w // p
    if gh < 1 or gw < 1:
        raise ValueError(f"A {h}x{w} image is smaller than one {p}x{p} patch.")
    dev = torch.device(device)
    model.eval().to(dev)
    x = torch.from_numpy(np.ascontiguousarray(image[: gh * p, : gw * p]))[None, None].to(dev)
    out, attn = last_block_cls_attention(model, x)
    attn = attn[0].cpu().numpy().astype(np.float64)          # (heads, N)
    n_prefix = attn.shape[1] - gh * gw
    prefix_mass = attn[:, :n_prefix].sum(axis=1)
    patches = attn[:, n_prefix:]
    patches = patches / patches.sum(axis=1, keepdims=True)
    patches = patches.reshape(-1, gh, gw)
    kept = threshold_mass(patches, keep)
    mean_patches = patches.mean(axis=0, keepdims=True)
    mean_kept = threshold_mass(mean_patches, keep)

    def to_image(m: np.ndarray, how: str) -> np.ndarray:
        full = np.zeros((m.shape[0], h, w), dtype=np.float32)
        full[:, : gh * p, : gw * p] = upsample(m, p, how)
        return full

    heads = to_image(patches, mode)
    return AttentionMaps(
        patches=patches.astype(np.float32),
        heads=heads,
        mean=to_image(mean_patches, mode)[0],
        threshold=to_image(kept.astype(np.float32), "nearest") > 0.5,
        mean_threshold=to_image(mean_kept.astype(np.float32), "nearest")[0] > 0.5,
        prefix_mass=prefix_mass.astype(np.float32),
        embedding=out[0].float().cpu().numpy(),
        patch_size=p,
        keep=float(keep),
        mode=mode,
    )


def channel_attention_maps(entry, image: np.ndarray, **kwargs) -> AttentionMaps:
    """:func:`attention_maps` for a :class:`~napari_wsdino.core.modelset.ChannelModel`,
    with the input normalisation that model was trained with."""
    return attention_maps(entry.model, entry.normalise(np.asarray(image, dtype=np.float32)), **kwargs)


@dataclass(frozen=True)
class CellAttention:
    """How much of the CLS attention falls on the cells, relative to their area.

    ``score`` is the attention mass on the channel's foreground (Otsu) divided by the
    foreground's share of the image: 1 is what attention spread uniformly gets, above 1
    means the model looks at the cells, below 1 at the background. ``per_head`` holds
    the same ratio for every head; ``score`` is that of the head mean (= the mean of the
    heads' masses over the share). ``share`` is the foreground's area fraction.
    """

    score: float
    per_head: tuple[float, ...]
    share: float


def attention_on_cells(maps: AttentionMaps, image: np.ndarray,
                       foreground: np.ndarray | None = None) -> CellAttention:
    """Attention-on-cells score of one field's maps (see :class:`CellAttention`).

    Parameters
    ----------
    maps
        :func:`attention_maps` of ``image``.
    image
        The ``(H, W)`` field the maps were computed on (its Otsu foreground is the cells).
    foreground
        A boolean cell mask instead of Otsu's.

    Example
    -------
    >>> from napari_wsdino.core.model import create_backbone
    >>> img = np.zeros((64, 64), np.float32); img[:32] = 1
    >>> res = attention_on_cells(attention_maps(create_backbone("test_vit"), img), img, img > 0)
    >>> round(res.share, 2), len(res.per_head)
    (0.5, 2)
    """
    from napari_wsdino.core.nuclei import foreground_mask

    fg = foreground_mask(image) if foreground is None else np.asarray(foreground, bool)
    p = maps.patch_size
    gh, gw = maps.grid
    # The foreground fraction of every patch, on the grid the model saw.
    frac = fg[: gh * p, : gw * p].reshape(gh, p, gw, p).mean(axis=(1, 3))
    share = float(frac.mean())
    if share <= 0.0:
        return CellAttention(float("nan"), tuple(float("nan") for _ in range(maps.n_heads)), 0.0)
    mass = (maps.patches * frac[None]).sum(axis=(1, 2))
    per_head = tuple(float(m / share) for m in mass)
    return CellAttention(float(np.mean(mass) / share), per_head, share)


def mean_attention_on_cells(entry, images) -> CellAttention:
    """:func:`attention_on_cells` averaged over several fields of one channel model.

    ``entry`` is a :class:`~napari_wsdino.core.modelset.ChannelModel`; fields without
    foreground are skipped.
    """
    scores = [attention_on_cells(channel_attention_maps(entry, img), np.asarray(img, np.float32))
              for img in images]
    scores = [s for s in scores if s.share > 0]
    if not scores:
        return CellAttention(float("nan"), (), 0.0)
    heads = np.mean([s.per_head for s in scores], axis=0)
    return CellAttention(float(np.mean([s.score for s in scores])),
                         tuple(float(h) for h in heads),
                         float(np.mean([s.share for s in scores])))


def cache_attention_on_cells(cache, models, n_fields: int = 24) -> dict[str, float]:
    """Attention-on-cells score per channel of a model set, mean over ``n_fields`` evenly
    spaced fields of a preprocessed cache (what the demo reports)."""
    idx = np.linspace(0, len(cache.table) - 1, min(n_fields, len(cache.table))).astype(int)
    return {ch: mean_attention_on_cells(
        models.models[ch], [np.asarray(cache.images(ch)[i], np.float32) for i in idx]).score
        for ch in models.channels}


# -- fields and files ------------------------------------------------------------------


def field_index(table, key: str) -> int:
    """Row of the field ``PLATE/WELL/SITE`` (site as ``3`` or ``s3``) in a field table.

    Example
    -------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"plate": ["P1", "P1"], "well": ["B02", "B02"], "site": [1, 2]})
    >>> field_index(t, "P1/B02/s2")
    1
    """
    from napari_wsdino.core.metadata import DataError

    parts = str(key).strip("/").split("/")
    if len(parts) != 3:
        raise DataError(f"A field is PLATE/WELL/SITE (e.g. Week1_22123/B02/s1), not {key!r}.")
    plate, well, site = parts
    site = site[1:] if site[:1].lower() == "s" else site
    hit = ((table["plate"].astype(str) == plate) & (table["well"].astype(str) == well)
           & (table["site"].astype(str) == site))
    rows = np.flatnonzero(hit.to_numpy())
    if len(rows) == 0:
        example = f"{table['plate'].iloc[0]}/{table['well'].iloc[0]}/s{table['site'].iloc[0]}" if len(table) else "-"
        raise DataError(f"No field {key!r} in this dataset (fields look like {example}).")
    return int(rows[0])


def save_overlay_png(path, image: np.ndarray, maps: AttentionMaps, title: str = "") -> None:
    """PNG: the image, the head-mean attention over it with DINO's 60 % contour, each head."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = 2 + maps.n_heads
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    h, w = image.shape
    fig = Figure(figsize=(3.2 * cols, rows * (3.2 * h / max(w, 1) + 0.3) + 0.4))  # + panel titles
    lo, hi = np.percentile(image, [1, 99.5])
    panels = [("image", None), (f"head mean, top {maps.keep:.0%} mass", maps.mean)]
    panels += [(f"head {i}", maps.heads[i]) for i in range(maps.n_heads)]
    for k, (label, amap) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if amap is not None:
            ax.imshow(amap, cmap="inferno", alpha=0.55)
        if k == 1 and maps.mean_threshold.any():
            ax.contour(maps.mean_threshold.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


def save_tiff(path, maps: AttentionMaps) -> list[str]:
    """float32 TIFF stack: one page per head, then the head mean, then the thresholded mean.

    Returns the page labels (also stored as ImageJ labels).
    """
    import tifffile

    labels = [f"head{i}" for i in range(maps.n_heads)] + ["mean", f"mean_top{int(round(maps.keep * 100))}"]
    stack = np.concatenate([maps.heads, maps.mean[None], maps.mean_threshold[None].astype(np.float32)])
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack.astype(np.float32), imagej=True,
                         metadata={"axes": "ZYX", "Labels": labels})
    return labels
