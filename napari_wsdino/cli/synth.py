"""write a synthetic BBBC021 or Cell Painting replica (no download needed)

Write a synthetic replica of BBBC021: the real plates, weeks, wells, sites, treatments and
file names, with generated MCF-7 images (DAPI, Tubulin, Actin), MoA phenotypes with
dose-response, and week/plate nuisance, plus truth.parquet: every field's ground-truth
profile (the cells' biology before imaging; `wsdino evaluate DATA/truth.parquet` scores
the ceiling). --replica v1 writes the first replica's files (numbers made before
2026-12-07); the version is recorded in DATA/replica.json. With --layout cellpainting: a small JUMP-style
Cell Painting screen instead (load_data.csv, five stains DNA/ER/RNA/AGP/Mito, 3 sources as
batches with their own stain and illumination shifts, 2 plates each, one compound of each
of 12 MoAs per source plus DMSO, 192 fields at 2 sites). Results on it are 'synthetic
replica' results, never BBBC021 or JUMP ones.

Examples: wsdino synth demo_data --subset mini && napari demo_data; wsdino synth cp_data
--layout cellpainting --size 128 160
"""

from __future__ import annotations

import inspect

from napari_wsdino.cli._common import command, drive
from napari_wsdino.core.metadata import LAYOUTS as SCREEN_LAYOUTS, DataError
from napari_wsdino.core.synth import (DEFAULT_REPLICA, DEFAULT_SIZE, LAYOUTS, REPLICA_VERSIONS,
                                      SUBSETS, SynthConfig, replica_config, write_replica)


def _default(name: str):
    return inspect.signature(write_replica).parameters[name].default


def add_parser(sub) -> None:
    p = command(sub, "synth", __doc__)
    p.add_argument("out", help="output folder (created)")
    layout, subset, seed = (_default(k) for k in ("layout", "subset", "seed"))
    p.add_argument("--layout", choices=LAYOUTS, default=layout,
                   help="; ".join(f"{name}: {SCREEN_LAYOUTS[name].display_name}" for name in LAYOUTS)
                   + f" (default {layout})")
    p.add_argument("--replica", choices=REPLICA_VERSIONS, default=None,
                   help=f"replica version (default {DEFAULT_REPLICA}; v1: the first replica, "
                   "whose week effect is mostly a change of drug response; bbbc021 layout "
                   "only, the cellpainting replica has one version)")
    p.add_argument("--subset", choices=SUBSETS, default=subset,
                   help="full: 3,848 fields; replicate1: 1,368; mini: 292 (default); "
                   "bbbc021 layout only")
    p.add_argument("--sites", type=int, default=None, metavar="N",
                   help="sites per well, 1-4 (default 4; mini: 2); cellpainting 1-9 (default 2)")
    p.add_argument("--size", type=int, nargs=2, default=DEFAULT_SIZE, metavar=("H", "W"),
                   help=f"image size in pixels (default {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}; "
                   "real camera 1024 1280)")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: all cores for large subsets)")
    p.add_argument("--batch-strength", type=float, default=None,
                   help="scale of batch effects (BBBC021 weeks, Cell Painting sources); "
                   f"0 turns them off (default {SynthConfig.batch_strength})")
    p.add_argument("--phenotype-strength", type=float, default=None,
                   help="scale of every MoA phenotype; lower is harder (default: the "
                   "version's calibrated value)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.layout == "cellpainting" and args.replica not in (None, "v1"):
        raise DataError("The Cell Painting replica has one version (v1); leave --replica out "
                        "with --layout cellpainting.")
    version = args.replica or (DEFAULT_REPLICA if args.layout == "bbbc021" else "v1")
    knobs = {k: v for k, v in (("batch_strength", args.batch_strength),
                               ("phenotype_strength", args.phenotype_strength)) if v is not None}
    config = replica_config(version, **knobs)
    out = drive(write_replica(args.out, args.subset, args.sites, tuple(args.size), args.seed,
                              args.workers, config, args.layout), quiet=args.quiet)
    what = args.subset if args.layout == "bbbc021" else args.layout
    print(f"Synthetic replica {version} ({what}, seed {args.seed}) written to {out}. "
          f"Open it with: napari {out}")
    return 0
