"""ViT backbones from timm, and weights from our, timm's or DINO's checkpoint files.

Backbones are ``timm.create_model(arch, num_classes=0, dynamic_img_size=True)``,
so the forward pass returns the CLS embedding at any input size the patch size
divides. Microscopy channels are greyscale: the backbone takes one input channel,
and RGB weights are folded into it by summing the patch-embedding filters over the
colour axis — the same output as feeding the grey image replicated to RGB.

Checkpoint files are untrusted input: they are read with ``torch.load(weights_only=True)``.

Example
-------
>>> from napari_wsdino.core.model import create_backbone
>>> vit = create_backbone("test_vit", in_chans=1)
>>> import torch; vit(torch.zeros(1, 1, 32, 32)).shape
torch.Size([1, 64])
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

DEFAULT_ARCH = "vit_small_patch8_224"
CHECKPOINT_FORMAT = "napari-wsdino-checkpoint"
#: Small ViTs for CPU demos and tests, registered with timm under these names.
CPU_ARCHS = {
    # name: (patch size, width, depth, heads)
    "wsdino_vit_pico_patch8": (8, 96, 4, 3),
    "wsdino_vit_nano_patch8": (8, 192, 6, 3),
}


def _register_cpu_archs() -> None:
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    for name, (patch, dim, depth, heads) in CPU_ARCHS.items():
        if timm.is_model(name):
            continue

        def factory(pretrained=False, _cfg=(patch, dim, depth, heads), **kwargs):
            p, d, n, h = _cfg
            kwargs.setdefault("img_size", 64)
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            return VisionTransformer(patch_size=p, embed_dim=d, depth=n, num_heads=h,
                                     mlp_ratio=4.0, **kwargs)

        factory.__name__ = name
        factory.__module__ = __name__
        register_model(factory)


_register_cpu_archs()


class CheckpointError(ValueError):
    """A weights file cannot be used; the message says why and what to do."""


def create_backbone(
    arch: str = DEFAULT_ARCH,
    *,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
    weights: str | Path | None = None,
) -> nn.Module:
    """A timm ViT returning its CLS embedding (``num_classes=0``), dynamic image size.

    Parameters
    ----------
    arch
        Any timm ViT name (``vit_small_patch8_224`` in the paper, ``test_vit`` in tests).
    in_chans
        1 for greyscale channels (default), 3 for RGB input.
    drop_path_rate
        Stochastic depth (0.1 on the DINO student).
    weights
        Optional local checkpoint: ours, timm's, or an official DINO file.
    """
    import timm

    try:
        model = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
        )
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"timm cannot build {arch!r} as a ViT with dynamic image size: {exc}. "
            "Use a timm VisionTransformer name such as vit_small_patch8_224 or test_vit."
        ) from None
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (tensors and plain Python types only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read {path} as a weights-only PyTorch checkpoint ({exc}). "
            "Files that need arbitrary pickled code are refused on purpose; "
            "re-save the state dict with torch.save(model.state_dict(), path)."
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return dict(obj)


def backbone_state_dict(checkpoint: Mapping, which: str = "teacher") -> dict[str, torch.Tensor]:
    """Extract the backbone's weights from any supported checkpoint layout.

    Handles: our checkpoints and DINO training checkpoints (``{"teacher": ...,
    "student": ...}`` with ``module.``/``backbone.`` prefixes and a ``head.``), official
    DINO pretrained files (the bare backbone state dict), and timm/other files that
    wrap the state dict in ``state_dict`` or ``model``.
    """
    sd = checkpoint
    if which in sd and isinstance(sd[which], Mapping):
        sd = sd[which]
    else:
        for key in ("state_dict", "model"):
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head.") or k.startswith("fc.") or k.startswith("last_layer"):
            continue
        out[k] = v
    if not out:
        raise CheckpointError("The checkpoint holds no backbone tensors.")
    return out


def adapt_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a backbone state dict to ``model``: fold RGB patch filters into grey
    (sum over colour), and resample position embeddings to the model's grid."""
    sd = dict(sd)
    key = "patch_embed.proj.weight"
    target = model.state_dict()
    if key in sd and key in target:
        w, t = sd[key], target[key]
        if w.shape[1] != t.shape[1]:
            if t.shape[1] == 1:
                sd[key] = w.sum(dim=1, keepdim=True)
            elif w.shape[1] == 1:
                sd[key] = w.repeat(1, t.shape[1], 1, 1) / t.shape[1]
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=list(grid), num_prefix_tokens=n_prefix
        )
    return sd


def load_backbone_weights(model: nn.Module, path_or_sd, which: str = "teacher") -> nn.Module:
    """Load ours / timm / official-DINO weights into a timm ViT backbone (strict)."""
    ckpt = read_checkpoint(path_or_sd) if isinstance(path_or_sd, (str, Path)) else path_or_sd
    sd = adapt_state_dict(backbone_state_dict(ckpt, which), model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise CheckpointError(
            f"Weights do not fit this architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Check --arch matches the checkpoint (e.g. ViT-S/8 for "
            "dino_deitsmall8_pretrain.pth)."
        )
    return model


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but no GPU is visible; use --device cpu or auto.")
    return torch.device(device)
