"""embed every field of a preprocessed cache into a profile table

Field profiles as in WS-DINO: each channel's model embeds the four non-overlapping centre
crops of the field (a centre square of twice --crop, split in four); the per-dimension
median of the four CLS embeddings is taken, the channels are concatenated and
L2-normalised. Writes a Parquet profile table for 'wsdino evaluate'. An interrupted run
resumes from OUT.parts/.

Models: --model CHANNEL=PATH per channel (PATH: a 'wsdino train' run folder, a channel
folder, our checkpoint, a timm or official DINO file, or a .safetensors export), or --run
RUN (RUN/<channel>/checkpoint.pth for every channel), or the paper's baselines --init-only
FILE (the same ImageNet weights for every channel, no fine-tuning) and --random. Several
processes: 'torchrun --nproc_per_node N --no-python wsdino embed ...' deals the chunks out
to the N processes (one GPU each, or gloo on CPUs); rank 0 alone prints and merges them into
--out (which all must see), saying how many fields each embedded; a stopped job resumes
from OUT.parts/ with any N.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

from napari_wsdino.cli._common import command, drive
from napari_wsdino.core.fsio import writing
from napari_wsdino.core import distributed
from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.embed import (DEFAULT_BATCH, DEFAULT_CHUNK, DEFAULT_CROP, MEDIANS,
                                      POOLINGS, WINDOWS, embed_cache)
from napari_wsdino.core.embed.parts import check_profiles_out
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.model import DEFAULT_ARCH, CheckpointError
from napari_wsdino.core.modelset import ModelSet, describe, parse_model_specs
from napari_wsdino.core.recipes import DEFAULT_RECIPE


def add_parser(sub) -> None:
    p = command(sub, "embed", __doc__)
    p.add_argument("cache", help="preprocessed cache folder ('wsdino preprocess --out CACHE')")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", action="append", metavar="CHANNEL=RUN_OR_FILE",
                     help="one channel's model; repeat for each channel")
    src.add_argument("--run", metavar="RUN", help="run folder holding <channel>/checkpoint.pth")
    src.add_argument("--init-only", metavar="FILE",
                     help="baseline: the same pretrained weights for every channel")
    src.add_argument("--random", action="store_true", help="baseline: randomly initialised models")
    p.add_argument("--out", required=True,
                   help="profile table to write: a file name ending in .parquet, .pq, .csv, "
                   ".csv.gz or .tsv (checked before any field is embedded)")
    p.add_argument("--arch", default=None,
                   help=f"timm architecture for files that do not record one (default {DEFAULT_ARCH}); "
                   "our checkpoints record theirs")
    p.add_argument("--channels", nargs="+", metavar="CH",
                   help="channels to embed with --run/--init-only/--random (default: all of the cache's)")
    p.add_argument("--student", action="store_true",
                   help="use the student weights of our checkpoints (default: teacher)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    p.add_argument("--crop", type=int,
                   help=f"side of each of the four centre crops, px (default {DEFAULT_CROP}, "
                   "as the paper; with --preset, the preset's), or of each cell crop with "
                   "--windows cells; clamped to the field and to a multiple of the patch size")
    from napari_wsdino.core.presets import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="embed as 'wsdino demo --preset' does (its --crop, --pooling and "
                   "--windows; cpu, cpu-hires: one crop per nucleus, CLS+mean), so the "
                   "profiles equal the demo's and the napari Evaluate panel's with that "
                   "recipe; options given explicitly win")
    from napari_wsdino.core.recipes import RECIPES

    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="defaults of --windows/--median/--l2: default (centred quadrants, "
                   "numpy median, L2) or paper-code (the official fixed windows, torch.median, "
                   "raw CLS for per-channel TVN)")
    p.add_argument("--windows", choices=WINDOWS,
                   help="centre: four quadrants of the centre square of 2 x --crop; official: "
                   "WS-DINO's fixed windows (x 64-320 / 320-544, y 32-256 / 256-480 on 512 x 640); "
                   "cells: one --crop px crop per nucleus (DAPI), averaged (the cpu demo's choice)")
    p.add_argument("--median", choices=MEDIANS,
                   help="median of the four crops: mean-middle (numpy) or lower (torch.median)")
    p.add_argument("--l2", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise each profile (default recipe: yes; paper-code: no)")
    p.add_argument("--pooling", choices=POOLINGS,
                   help="each crop's embedding: cls (the CLS token, the paper; default) or "
                   "cls+mean (CLS followed by the mean patch token; the cpu demo's choice)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"fields per forward pass (default {DEFAULT_BATCH}; four crops each)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help=f"fields per resumable chunk (default {DEFAULT_CHUNK})")
    p.add_argument("--device", default="auto", help="auto (CUDA + bf16 when present), cpu, cuda:0 ...")
    p.add_argument("--overwrite", action="store_true",
                   help="start over instead of resuming an unfinished run")
    p.add_argument("--export-safetensors", metavar="DIR",
                   help="also write the models as DIR/<channel>.safetensors")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_models(args, cache_channels) -> ModelSet:
    which = "student" if args.student else "teacher"
    channels = tuple(args.channels) if args.channels else tuple(cache_channels)
    if args.model:
        if args.channels:
            raise DataError("--channels goes with --run/--init-only/--random; --model names its channels.")
        return ModelSet.from_files(parse_model_specs(args.model), arch=args.arch, which=which)
    if args.run:
        return ModelSet.from_run(args.run, channels, which=which)
    arch = args.arch or DEFAULT_ARCH
    if args.init_only:
        return ModelSet.init_only(arch, args.init_only, channels)
    return ModelSet.random(arch, channels, seed=args.seed)


def embed_settings(args):
    """The recipe's embedding settings with this command's options on top."""
    from napari_wsdino.core.recipes import resolve

    given = {k: getattr(args, k) for k in ("windows", "median", "l2")
             if getattr(args, k, None) is not None}
    crop = args.crop if args.crop is not None else DEFAULT_CROP
    return resolve(getattr(args, "recipe", DEFAULT_RECIPE), embed={"crop": crop, **given}).embed


def embed_kwargs(args) -> dict:
    """``embed_cache`` keyword arguments: a ``--preset``'s embedding (the demo's and the
    Evaluate panel's, ``core.presets.embed_settings``) or the recipe's, with the options
    given on top."""
    from napari_wsdino.core.presets import preset_embedding

    if getattr(args, "preset", ""):
        out = preset_embedding(args.preset, recipe=getattr(args, "recipe", DEFAULT_RECIPE))
        out.update({k: getattr(args, k) for k in ("crop", "windows", "median", "l2", "pooling")
                    if getattr(args, k, None) is not None})
        return out
    s = embed_settings(args)
    return {"crop": s.crop, "windows": s.windows, "median": s.median, "l2": s.l2,
            "precision": s.precision, "pos_embed": s.pos_embed,
            "pooling": args.pooling or POOLINGS[0]}


def _noting_ranks(gen, seen: dict):
    """Pass ``gen``'s events on, keeping the per-rank counts of its ``merge`` event."""
    try:
        while True:
            event = next(gen)
            if "ranks" in event.info:
                seen["ranks"] = event.info["ranks"]
            yield event
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()


def print_ranks(ranks) -> None:
    """One line per rank: how many fields it embedded, how many it took from OUT.parts/."""
    for r in ranks:
        resumed = f", {r['resumed']} of them from an earlier run" if r["resumed"] else ""
        print(f"rank {r['rank']} embedded {r['fields']} fields{resumed}")


def run(args) -> int:
    single = distributed.env_world_size() <= 1
    main = single or int(os.environ.get("RANK", "0")) == 0
    seen: dict = {}
    try:
        settings = embed_kwargs(args)
        check_profiles_out(args.out)
        if args.crop is not None and args.crop < 1:
            raise DataError(f"--crop is a side in pixels, at least 1 (default {DEFAULT_CROP}), "
                            f"not {args.crop}.")  # before the cache, the models and hours of embedding
        for flag, value in (("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
            if value < 1:
                raise DataError(f"{flag} is a number of fields, at least 1, not {value}.")
        cache = open_cache(args.cache)
        if args.crop is not None and args.crop > min(cache.shape) and main:
            print(f"note: --crop {args.crop} is larger than the cache's {cache.shape[0]} x "
                  f"{cache.shape[1]} px fields: crops are cut to fit (the side used is "
                  "recorded with the profiles).", file=sys.stderr)
        models = build_models(args, cache.channels)
        if main and not args.quiet:
            print(f"Models ({models.kind}):\n{describe(models)}", file=sys.stderr)
        if args.export_safetensors and main:
            for path in models.export_safetensors(args.export_safetensors):
                print(f"exported {path}", file=sys.stderr)
        # one writer per --out and its OUT.parts/ (a torchrun job's ranks share it)
        with writing(args.out, "these profiles") if single else nullcontext():
            profiles = drive(_noting_ranks(
                embed_cache(cache, models, args.out, batch_size=args.batch_size,
                            chunk_size=args.chunk_size, device=args.device,
                            resume=not args.overwrite, **settings), seen),
                quiet=args.quiet or not main,
            )
    except CheckpointError as exc:
        print(f"wsdino embed: error: {exc}", file=sys.stderr)
        return 2
    if profiles is None:  # another rank of a torchrun job: rank 0 reports
        return 0
    print_ranks(seen.get("ranks", ()))
    print(f"wrote {len(profiles)} profiles x {profiles.n_features} features to {args.out}")
    print(f"next: wsdino evaluate {args.out}")
    return 0
