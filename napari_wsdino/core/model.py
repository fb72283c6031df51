"""ViT backbones from timm, and weights from our, timm's or DINO's checkpoint files.

Backbones are ``timm.create_model(arch, num_classes=0, dynamic_img_size=True)``,
so the forward pass returns the CLS embedding at any input size the patch size
divides. Microscopy channels are greyscale: the backbone takes one input channel,
and RGB weights are folded into it by summing the patch-embedding filters over the
colour axis — the same output as feeding the grey image replicated to RGB.

Position embeddings at other input sizes: by default timm's ``resample_abs_pos_embed``
(bicubic to the exact grid, antialiased when shrinking); ``pos_embed="dino"``
(:func:`set_pos_embed`) uses DINO's ``interpolate_pos_encoding`` instead (bicubic by the
scale factor ``(n + 0.1) / sqrt(N)``, no antialiasing), as the official WS-DINO code does
for every 96 px local crop and every non-square embedding window. Those functions live in
:mod:`napari_wsdino.core.pos_embed` and are re-exported here.

Numerics: :func:`autocast_dtype` and :func:`allows_tf32` say what a ``precision``
(``auto``, ``fp32``, ``bf16``) means on a device, for training and embedding alike.

Checkpoint files are untrusted input: they are read with ``torch.load(weights_only=True)``
(``.safetensors`` files with safetensors, which holds tensors only).

Official DINO "full checkpoints" (facebookresearch/dino ``main_dino.py`` saves
``student``, ``teacher``, ``optimizer``, ``epoch``, ``args`` and ``dino_loss`` with the
centre; the student's keys carry DistributedDataParallel's ``module.`` prefix, both nets
``backbone.``/``head.``) are read part by part: :func:`backbone_state_dict` and
:func:`head_state_dict` for either net, :func:`dino_optimizer_state` for AdamW's moments
(mapped by parameter name), :func:`dino_centre` for the loss centre. The backbone-only
release (``dino_deitsmall8_pretrain.pth``) is read as before. A file made for another
architecture is refused with a :class:`CheckpointError` that names both shapes.

Example
-------
>>> from napari_wsdino.core.model import create_backbone
>>> vit = create_backbone("test_vit", in_chans=1)
>>> import torch; vit(torch.zeros(1, 1, 32, 32)).shape
torch.Size([1, 64])
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

# The architecture registry is torch-free (menus and settings read it); re-exported here.
from napari_wsdino.core.archs import (  # noqa: F401  (re-exported)
    ARCHITECTURES,
    CPU_ARCHS,
    DEFAULT_ARCH,
    RANDOM_INIT,
    Architecture,
    arch_patch_size,
)
from napari_wsdino.core.errors import CheckpointError  # noqa: F401  (re-exported)
from napari_wsdino.core.pos_embed import (  # noqa: F401  (re-exported)
    POS_EMBED_MODES,
    dino_pos_embed,
    pos_embed_as,
    pos_embed_mode,
    set_pos_embed,
)

CHECKPOINT_FORMAT = "napari-wsdino-checkpoint"


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


# -- numerics --------------------------------------------------------------------------
def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a ``precision`` on ``device`` (``None``: plain fp32).

    ``auto``: bf16 on CUDA (about twice as fast, half the activation memory), fp32
    elsewhere; ``bf16``: bf16 on any device; ``fp32``: never autocast (the official code).

    >>> autocast_dtype("cuda"), autocast_dtype("cuda", "fp32"), autocast_dtype("cpu")
    (torch.bfloat16, None, None)
    """
    kind = torch.device(device).type
    if precision == "bf16" or (precision == "auto" and kind == "cuda"):
        return torch.bfloat16
    if precision in ("auto", "fp32"):
        return None
    raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}.")


def allows_tf32(precision: str = "auto") -> bool:
    """Whether CUDA float32 matmuls and convolutions may use TF32 (10-bit mantissa).

    ``fp32`` means fp32 throughout, as the official code asks (``--use_fp16 False``);
    ``auto`` and ``bf16`` allow TF32 for the float32 work left outside autocast (speed).
    """
    return precision != "fp32"


def create_backbone(
    arch: str = DEFAULT_ARCH,
    *,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
    weights: str | Path | None = None,
    pos_embed: str = "timm",
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
    pos_embed
        How the position embedding meets other input sizes (:data:`POS_EMBED_MODES`):
        ``"timm"`` (default) or ``"dino"`` (the official code, :func:`set_pos_embed`).
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
    set_pos_embed(model, pos_embed)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (tensors and plain Python types only); ``path`` may
    also name a bundled weights file or official weights, fetched on first use
    (:mod:`napari_wsdino.core.pretrained`)."""
    from napari_wsdino.core.pretrained import resolve_weights

    path = resolve_weights(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":  # timm's hub files (tensors only, nothing to run)
        return _read_safetensors(path)
    try:
        # DINO's full checkpoints also hold the run's argparse.Namespace ("args"): a plain
        # attribute bag, allowed; anything else needing code stays refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable_checkpoint(path, exc) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return dict(obj)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({exc}): "
                              "download or copy it again.") from None


def _unreadable_checkpoint(path: Path, exc: Exception) -> CheckpointError:
    """Tell an unsafe file (it names Python code to run) from a damaged one; PyTorch's
    own message would advise ``weights_only=False``, which is unsafe and wrong here."""
    text = str(exc)
    unsafe = [ln.strip() for ln in text.splitlines() if "unsupported global" in ln.lower()]
    if unsafe:
        return CheckpointError(
            f"{path} holds Python objects besides weights ({unsafe[0]}); such files could run "
            "code, so only weights-only files are read. If it is your own, re-save only the "
            "weights: torch.save(model.state_dict(), path).")
    reason = type(exc).__name__ + (": " + text.splitlines()[0][:80] if text.strip() and
                                   "Weights only load failed" not in text else "")
    return CheckpointError(
        f"{path} is damaged or not a PyTorch checkpoint ({reason}): download or copy it "
        "again (compare its size / SHA-256 with the source).")


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


def _describe_vit(sd: Mapping[str, torch.Tensor]) -> str:
    """``embed dim 384, 8-px patches, 12 blocks`` from a ViT state dict."""
    parts = []
    if "cls_token" in sd:
        parts.append(f"embed dim {sd['cls_token'].shape[-1]}")
    if "patch_embed.proj.weight" in sd:
        parts.append(f"{sd['patch_embed.proj.weight'].shape[-1]}-px patches")
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    if blocks:
        parts.append(f"{len(blocks)} blocks")
    return ", ".join(parts) or "unknown layout"


def _check_shapes(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights of another architecture with both shapes named (no traceback)."""
    target = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in sd.items()
             if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        key, theirs, ours = wrong[0]
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture",
                                                                    type(model).__name__)
        raise CheckpointError(
            f"The weights are for another architecture: {key} is {list(theirs)} in the file "
            f"but {list(ours)} in {arch} ({len(wrong)} tensor(s) differ). File: "
            f"{_describe_vit(sd)}; model: {_describe_vit(target)}. Choose the --arch the file "
            "was made for (vit_small_patch8_224 for the ViT-S/8 DINO files)."
        )


def load_backbone_weights(model: nn.Module, path_or_sd, which: str = "teacher") -> nn.Module:
    """Load ours / timm / official-DINO weights into a timm ViT backbone (strict)."""
    ckpt = read_checkpoint(path_or_sd) if isinstance(path_or_sd, (str, Path)) else path_or_sd
    sd = adapt_state_dict(backbone_state_dict(ckpt, which), model)
    _check_shapes(model, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise CheckpointError(
            f"Weights do not fit this architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Check --arch matches the checkpoint (e.g. ViT-S/8 for "
            "dino_deitsmall8_pretrain.pth)."
        )
    return model


def is_full_checkpoint(ckpt: Mapping) -> bool:
    """A training checkpoint holding both nets (DINO's full checkpoint, or ours)."""
    return all(isinstance(ckpt.get(k), Mapping) for k in ("student", "teacher"))


def _strip_ddp(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def head_state_dict(ckpt: Mapping, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The DINO head of ``ckpt[which]`` (keys without ``module.``/``head.``); ``{}`` if none."""
    sd = ckpt.get(which)
    if not isinstance(sd, Mapping):
        return {}
    return {_strip_ddp(k)[len("head."):]: v for k, v in sd.items()
            if isinstance(v, torch.Tensor) and _strip_ddp(k).startswith("head.")}


def dino_centre(ckpt: Mapping) -> torch.Tensor | None:
    """The DINO loss centre ``(1, out_dim)`` of a full checkpoint, or ``None``."""
    loss = ckpt.get("dino_loss")
    centre = loss.get("center") if isinstance(loss, Mapping) else None
    return centre if isinstance(centre, torch.Tensor) else None


def dino_optimizer_state(ckpt: Mapping, optimizer: torch.optim.Optimizer,
                         names: list[str]) -> dict | None:
    """The checkpoint's AdamW state re-keyed for ``optimizer`` (``None`` if it has none).

    DINO's ``get_params_groups`` puts the student's parameters, in ``named_parameters``
    order, into a regularised group (weights) and a not-regularised one (biases and 1-D
    tensors); the saved state is indexed by position in those groups. Positions are
    mapped back to names (the state dict's key order), then to ``optimizer``'s
    parameters, whose names are ``names`` in the optimizer's own order. Our param
    groups' hyper-parameters are kept (the schedules set lr and weight decay every step,
    as DINO's loop does). A frozen ``head.last_layer.weight_g`` (``norm_last_layer``) is
    not in DINO's optimizer. The moments of RGB patch filters are averaged over colour
    for a one-channel model (the one tensor that cannot be carried over exactly).
    """
    saved, student = ckpt.get("optimizer"), ckpt.get("student")
    if not isinstance(saved, Mapping) or not isinstance(student, Mapping):
        return None
    keys = [(_strip_ddp(k), v) for k, v in student.items() if isinstance(v, torch.Tensor)]
    reg = [k for k, v in keys if not (k.endswith(".bias") or v.ndim == 1)]
    not_reg = [k for k, v in keys if k.endswith(".bias") or v.ndim == 1]
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(reg), len(not_reg)]:
        frozen = [k for k in reg if k != "head.last_layer.weight_g"]
        if sizes != [len(frozen), len(not_reg)]:
            raise CheckpointError(
                f"The checkpoint's optimizer has parameter groups of {sizes} tensors; its "
                f"student has {len(reg)} weights and {len(not_reg)} biases/norms. It does not "
                "come from DINO's training script."
            )
        reg = frozen
    by_name = {}
    for group, group_names in zip(saved["param_groups"], (reg, not_reg)):
        for pid, name in zip(group["params"], group_names):
            if pid in saved["state"]:
                by_name[name] = saved["state"][pid]
    ours = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for index, (name, param) in enumerate(zip(names, params)):
        entry = by_name.get(name)
        if entry is None:
            continue
        entry = dict(entry)
        for moment in ("exp_avg", "exp_avg_sq"):
            t = entry.get(moment)
            if t is None or t.shape == param.shape:
                continue
            if t.ndim == 4 and param.ndim == 4 and param.shape[1] == 1:
                entry[moment] = t.mean(dim=1, keepdim=True)
            else:
                raise CheckpointError(
                    f"The optimizer state of {name} is {list(t.shape)}, the parameter "
                    f"{list(param.shape)}: the checkpoint is for another architecture."
                )
        if "step" in entry and not isinstance(entry["step"], torch.Tensor):
            entry["step"] = torch.tensor(float(entry["step"]))
        state[index] = entry
    return {"state": state, "param_groups": ours["param_groups"]}


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but no GPU is visible; use --device cpu or auto.")
    return torch.device(device)
