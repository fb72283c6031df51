"""``wsdino synth OUT``: write a synthetic BBBC021 replica (napari sample data, tests, demos)."""

from __future__ import annotations

from napari_wsdino.cli._common import drive
from napari_wsdino.core.synth import DEFAULT_SIZE, SUBSETS, SynthConfig, write_replica


def add_parser(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic BBBC021 replica (no download needed)",
        description="Write a synthetic replica of BBBC021: the real plates, weeks, wells, "
        "sites, treatments and file names, with generated MCF-7 images (DAPI, Tubulin, "
        "Actin), MoA phenotypes with dose-response, and week/plate nuisance. Results on it "
        "are 'synthetic replica' results, never BBBC021 ones.",
        epilog="Example: wsdino synth demo_data --subset mini && napari demo_data",
    )
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--subset", choices=SUBSETS, default="mini",
                   help="full: 3,848 fields; replicate1: 1,368; mini: 292 (default)")
    p.add_argument("--sites", type=int, default=None, metavar="N",
                   help="sites per well, 1-4 (default 4; mini: 2)")
    p.add_argument("--size", type=int, nargs=2, default=DEFAULT_SIZE, metavar=("H", "W"),
                   help=f"image size in pixels (default {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}; "
                   "real camera 1024 1280)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: all cores for large subsets)")
    p.add_argument("--batch-strength", type=float, default=SynthConfig.batch_strength,
                   help="scale of week (batch) effects; 0 turns them off")
    p.add_argument("--phenotype-strength", type=float, default=SynthConfig.phenotype_strength,
                   help="scale of every MoA phenotype; lower is harder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    config = SynthConfig(batch_strength=args.batch_strength,
                         phenotype_strength=args.phenotype_strength)
    out = drive(write_replica(args.out, args.subset, args.sites, tuple(args.size), args.seed,
                              args.workers, config), quiet=args.quiet)
    print(f"Synthetic replica ({args.subset}, seed {args.seed}) written to {out}. "
          f"Open it with: napari {out}")
    return 0
