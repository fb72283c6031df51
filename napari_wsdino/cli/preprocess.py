"""illumination-correct, resize, clip and normalise a dataset into a cache

Preprocess a screen (BBBC021 layout or a Cell Painting load_data.csv) as WS-DINO does: per
(plate, channel) CellProfiler illumination function (mean image, median filter,
robust-minimum rescale), divide, bicubic anti-aliased resize, clip, normalise. Writes a
cache folder (images_<channel>.npy float16, index.parquet, cache.json, illumination/) that
'wsdino train' and 'wsdino embed' read. Interrupted runs resume with the same --out; a
cache made with other settings is refused. Unreadable images are reported and their
fields left out. On a cluster, run '--shard I/N' for I = 1 ... N side by side (whole
plates each, into CACHE/shards/I-of-N/), then '--merge' (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
import sys

from napari_wsdino.cli._common import (add_layout_option, command, drive, is_terminal,
                                       layout_from_args)
from napari_wsdino.core.fsio import writing
from napari_wsdino.core.metadata import UNANNOTATED, DataError, load_metadata
from napari_wsdino.core.presets import PRESETS, preprocess_settings
from napari_wsdino.core.preprocess import (
    DEFAULT_WORKERS,
    ILLUMINATION_METHODS,
    NORMALIZATIONS,
    PreprocessSettings,
    Shard,
    merge_shards,
    preprocess,
)


def add_parser(sub) -> None:
    p = command(sub, "preprocess", __doc__)
    p.add_argument("data", help="dataset folder (holding BBBC021_v1_image.csv) or image CSV")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder to write")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="output size, at least 16 px a side (default: half the input size, "
                   "as the paper; with --preset, the preset's cache size)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="take --size and --normalize from a preset's recipe, as 'wsdino demo' "
                   "does (" + "; ".join(_preset_line(v) for v in PRESETS.values())
                   + "); options given explicitly win. 'wsdino embed --preset' and the napari "
                   "panels take the same preset's embedding")
    d = PreprocessSettings()
    p.add_argument("--clip", type=float, default=d.clip, metavar="V",
                   help="clip at V raw 16-bit counts after illumination correction "
                   f"(default {d.clip:g}, the paper's code; 0: no clip)")
    p.add_argument("--filter-size", type=float, default=d.filter_size, metavar="F",
                   help="illumination median-filter size at the 1024x1280 scale "
                   f"(default {d.filter_size:g}, the paper's; scaled to the image size)")
    p.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="zscore: each image to mean 0 / std 1 (default; with --preset, the "
                   "preset's); paper: "
                   "divide by the clip value; plate: each plate's fields to mean 0 / std 1 "
                   "together, per channel (keeps treatment differences within a plate); "
                   "none: keep counts")
    p.add_argument("--illumination", choices=ILLUMINATION_METHODS, default=d.illumination,
                   help="fast (within 1%% of CellProfiler's exact function, default), "
                   "exact (slow), or none")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"processes (default {DEFAULT_WORKERS}; 1: no subprocesses; at most "
                   "the usable cores)")
    p.add_argument("--drop-missing", action="store_true",
                   help="leave out fields whose image files are missing instead of failing")
    p.add_argument("--unannotated", choices=UNANNOTATED, default=UNANNOTATED[0],
                   help="treatments with no MoA row (default: error)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--shard", type=_shard_arg, metavar="I/N",
                       help="only shard I of N (numbered 1 ... N; whole plates, with their "
                       "illumination functions), into CACHE/shards/I-of-N/; run all N, side "
                       "by side if you like (a SLURM array, Dask), then --merge; a shard "
                       "resumes like a run")
    split.add_argument("--merge", nargs="*", metavar="SHARDS",
                       help="merge the N finished shards into CACHE, the cache one run makes "
                       "(give the options the shards had); shards are taken from "
                       "CACHE/shards/ (removed once merged) or from the SHARDS folders given "
                       "(kept; put --merge after DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_layout_option(p)
    p.set_defaults(func=run)


def _preset_line(preset) -> str:
    ps = preprocess_settings(preset)
    return f"{preset.name}: {ps.size[0]} x {ps.size[1]}, {ps.normalize}"


def _shard_arg(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _warn_unreadable(gen, stream):
    """Pass events through, printing each unreadable file, and what was repaired in a
    damaged cache, on a line of its own (the progress bar would overwrite and cut it)."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        kind = "warning" if event.info.get("failed_path") else "note" \
            if event.info.get("repair") else None
        if kind:
            lead = "\n" if is_terminal(stream) else ""  # end the bar's line first
            stream.write(f"{lead}{kind}: {event.message}\n")
            stream.flush()
        yield event


#: The smallest side ``--size`` accepts: a crop of two patches of the smallest ViTs.
MIN_SIDE = 16


def usable_cores() -> int:
    """Cores this process may run on (its affinity, e.g. a batch job's share)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _workers(asked: int) -> int:
    """``--workers``, at least 1 and at most the usable cores (with a note): more
    processes than cores only add memory, one copy of the worker state each."""
    if asked < 1:
        raise DataError(f"--workers must be at least 1 (1: no subprocesses), not {asked}.")
    cores = usable_cores()
    if asked > cores:
        print(f"note: --workers {asked} is more than the {cores} usable cores; using {cores}.",
              file=sys.stderr)
        return cores
    return asked


def run(args) -> int:
    args.workers = _workers(args.workers)
    try:
        settings = PreprocessSettings(
            size=tuple(args.size) if args.size else None,
            clip=args.clip if args.clip and args.clip > 0 else None,
            filter_size=args.filter_size,
            normalize=args.normalize or PreprocessSettings().normalize,
            illumination=args.illumination,
        )
        if args.preset:  # the preset's size and normalisation unless given
            recipe = preprocess_settings(PRESETS[args.preset])
            settings = replace(settings, size=tuple(args.size) if args.size else recipe.size,
                               normalize=args.normalize or recipe.normalize)
        if args.size and min(args.size) < MIN_SIDE and min(args.size) > 0:
            raise ValueError(
                f"--size {args.size[0]} {args.size[1]} is too small to learn from: each side "
                f"must be at least {MIN_SIDE} px (two 8-px ViT patches), e.g. --size 256 320")
    except ValueError as exc:
        raise DataError(f"Invalid preprocessing option: {exc}") from None
    meta = load_metadata(args.data, layout_from_args(args), drop_missing=args.drop_missing,
                         unannotated=args.unannotated)
    if meta.dropped:
        print(f"left out {meta.dropped} field(s) with missing files", file=sys.stderr)
    if args.merge is not None:
        gen = merge_shards(meta, args.out, settings, sources=args.merge)
    else:
        gen = preprocess(meta, args.out, settings, workers=args.workers, shard=args.shard)
    shard = f"shard-{args.shard.index}-of-{args.shard.count}" if args.shard else ""
    with writing(args.out, "this cache", shard):  # shards of one cache run side by side
        cache = drive(_warn_unreadable(gen, sys.stderr), quiet=args.quiet)
    failed = cache.settings.get("failed", [])
    h, w = cache.shape
    print(f"Cache: {cache.path}  {len(cache)} fields x {len(cache.channels)} channels "
          f"({', '.join(cache.channels)}), {h}x{w} float16")
    if failed:
        print(f"{len(failed)} field(s) left out, unreadable:")
        for f in failed[:20]:
            print(f"  {f['plate']}/{f['well']}/s{f['site']}: {f['path']} ({f['reason']})")
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more (cache.json, key 'failed')")
    if "shard" in cache.settings:
        n = cache.settings["shard"]["count"]
        print(f"Shard {args.shard} done. Once all {n} are: wsdino preprocess "
              f"{args.data} --out {args.out} --merge (with the same options)")
    return 0
