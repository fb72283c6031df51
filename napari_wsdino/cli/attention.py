"""self-attention maps of one field for one channel model (PNG or TIFF)

The last block's attention from the CLS token to every patch, per head, upsampled to the
field; plus the head mean and DINO's thresholded map (the patches holding the top --keep
of the attention mass). PNG: an overlay figure. TIFF: a float32 stack, one page per head,
then the mean, then the thresholded mean (0/1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from napari_wsdino.cli._common import add_layout_option, command, layout_from_args
from napari_wsdino.core.attention import (DEFAULT_KEEP, MODES, channel_attention_maps, field_index,
                                          save_overlay_png, save_tiff)
from napari_wsdino.core.cache import SETTINGS_FILE, open_cache
from napari_wsdino.core.imageio import read_tiff
from napari_wsdino.core.metadata import DataError, load_metadata
from napari_wsdino.core.model import DEFAULT_ARCH, CheckpointError, pick_device
from napari_wsdino.core.modelset import load_channel_model


def add_parser(sub) -> None:
    p = command(sub, "attention", __doc__)
    p.add_argument("data", help="preprocessed cache folder, or a dataset folder / image CSV "
                   "(a raw TIFF is only z-scored: no illumination correction or resizing, so the cache "
                   "is preferred)")
    p.add_argument("--model", required=True, metavar="RUN_OR_FILE",
                   help="run folder (uses RUN/<channel>/checkpoint.pth), our checkpoint, "
                   "a timm or official DINO file, or a .safetensors export")
    p.add_argument("--channel", help="channel of the model and image (default: the data's first "
                   "channel, the nuclear stain in BBBC021 and Cell Painting layouts)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--field", metavar="PLATE/WELL/SITE", help="e.g. Week1_22123/B02/s1")
    where.add_argument("--index", type=int, help="row of the field table instead of --field")
    p.add_argument("--region", metavar="Y,X,H,W", help="only this crop of the field (px)")
    p.add_argument("--out", required=True, help="output .png (overlay) or .tif/.tiff (stack)")
    p.add_argument("--mode", choices=MODES, default=MODES[0], help=f"upsampling (default {MODES[0]})")
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help=f"attention mass of the thresholded map (default {DEFAULT_KEEP})")
    p.add_argument("--arch", default=None,
                   help=f"architecture for files that do not record one (default {DEFAULT_ARCH})")
    p.add_argument("--student", action="store_true", help="student weights (default teacher)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:0 ...")
    add_layout_option(p)
    p.set_defaults(func=run)


def _load_image(args) -> tuple[np.ndarray, str]:
    data = Path(args.data)
    if (data / SETTINGS_FILE).exists():
        cache = open_cache(data)
        idx = field_index(cache.table, args.field) if args.field else args.index
        if not 0 <= idx < len(cache):
            raise DataError(f"--index {idx} is outside 0..{len(cache) - 1}.")
        row = cache.table.iloc[idx]
        return np.asarray(cache.images(args.channel)[idx], dtype=np.float32), _label(row)
    meta = load_metadata(data, layout_from_args(args), check_files=False)
    idx = field_index(meta.table, args.field) if args.field else args.index
    if not 0 <= idx < len(meta.table):
        raise DataError(f"--index {idx} is outside 0..{len(meta.table) - 1}.")
    raw = read_tiff(meta.paths(args.channel).iloc[idx]).astype(np.float32)
    # the cache's default normalisation, without illumination correction or resizing
    return (raw - raw.mean()) / max(float(raw.std()), 1e-6), _label(meta.table.iloc[idx])


def _data_channels(data: Path, args) -> tuple[str, ...]:
    if (data / SETTINGS_FILE).exists():
        return tuple(open_cache(data).channels)
    return tuple(load_metadata(data, layout_from_args(args), check_files=False).channels)


def _check_channel(channel: str, channels: tuple[str, ...], data) -> None:
    """Refuse a channel the data lacks, before any model is loaded, suggesting the
    data's own spelling (``dapi`` -> ``DAPI``)."""
    if channel in channels:
        return
    same = [c for c in channels if c.lower() == channel.lower()]
    hint = f"use --channel {same[0]}" if same else "give one of them with --channel"
    raise DataError(f"--channel {channel!r} is not a channel of {data} ({', '.join(channels)}): "
                    f"{hint} (channel names are case-sensitive).")


def _label(row) -> str:
    return f"{row.plate}/{row.well}/s{row.site}  {row.get('treatment', '')}  {row.get('moa', '')}"


def _region(image: np.ndarray, spec: str | None) -> np.ndarray:
    if not spec:
        return image
    try:
        y, x, h, w = (int(v) for v in spec.split(","))
    except ValueError:
        raise DataError(f"--region is Y,X,H,W in pixels, not {spec!r}.") from None
    crop = image[max(y, 0):y + h, max(x, 0):x + w]
    if crop.size == 0:
        raise DataError(f"--region {spec} lies outside the {image.shape[0]}x{image.shape[1]} field.")
    return crop


def run(args) -> int:
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise DataError(f"--out must end in .png, .tif or .tiff, not {out.name!r}.")
    if not 0 < args.keep <= 1:
        raise DataError("--keep is a fraction of the attention mass, in (0, 1].")
    channels = _data_channels(Path(args.data), args)
    if not args.channel:
        args.channel = channels[0]
    _check_channel(args.channel, channels, args.data)
    try:
        entry = load_channel_model(args.channel, args.model, arch=args.arch,
                                   which="student" if args.student else "teacher")
    except CheckpointError as exc:
        print(f"wsdino attention: error: {exc}", file=sys.stderr)
        return 2
    image, label = _load_image(args)
    image = _region(image, args.region)
    try:
        maps = channel_attention_maps(entry, image, mode=args.mode, keep=args.keep,
                                      device=pick_device(args.device))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        save_overlay_png(out, image, maps, title=f"{args.channel}  {label}")
    else:
        save_tiff(out, maps)
    print(f"wrote {maps.n_heads} heads on a {maps.grid[0]}x{maps.grid[1]} patch grid "
          f"({entry.arch}, {entry.source}) to {out}")
    return 0
