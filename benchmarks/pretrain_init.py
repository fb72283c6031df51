"""Issue 13 probe: a long plain-DINO pretraining on another replica seed, as ``--init``.

Writes the ``cpu`` preset's replica for ``--seed`` (not a seed that is evaluated), preprocesses
it as the demo does (per-plate normalisation), and trains one plain-DINO model (weak label
``none``, the ``cpu`` preset's model and loss) for ``--epochs`` epochs per channel, chained
DAPI -> Tubulin -> Actin (each channel starts from the previous one's full checkpoint), so
the last checkpoint has seen every stain. Then run the demo on other seeds from it::

    python benchmarks/pretrain_init.py /tmp/pre101 --seed 101 --epochs 300     # 15-30 min, 2 cores
    wsdino demo /tmp/d31 --seed 31 --init /tmp/pre101/run/Actin/checkpoint.pth

The package's bundled ``replica-dino-pico8-cells`` weights (the ``cpu`` preset's default init,
``core/pretrained.py``) are the first command's result, written with
``--export napari_wsdino/weights/replica_dino_pico8_cells.pth``.

``--start CKPT`` continues an earlier pretraining (a full checkpoint: weights, DINO centre and
optimiser state) on this replica, for example a larger subset of another seed::

    python benchmarks/pretrain_init.py /tmp/pre102 --seed 102 --subset full --sites 2 \
        --epochs 40 --start /tmp/pre101/run/Actin/checkpoint.pth

The views are the preset's: cell-scale since 2026-12-01 (the earlier, field-scale
``replica-dino-pico8`` used ``--set global_scale=[0.5,1.0] --set local_scale=[0.2,0.5]``).

Results: benchmarks/RESULTS.md, "Issue 13: a pretrained init" and "Issue 13: cell-scale views".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.layout import checkpoint_path
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.preprocess import PreprocessSettings, preprocess
from napari_wsdino.core.presets import resolve_preset
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.synth import write_replica
from napari_wsdino.core.train import TrainConfig, train_channels


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=101, help="replica seed (not one you evaluate)")
    ap.add_argument("--epochs", type=int, default=300, help="epochs per channel")
    ap.add_argument("--subset", default=None, help="replica subset (default: the preset's, mini)")
    ap.add_argument("--sites", type=int, default=None, help="sites per well (default: the preset's)")
    ap.add_argument("--export", type=Path, default=None,
                    help="also write the last checkpoint as a bundled-weights file (teacher "
                    "only, float16), e.g. napari_wsdino/weights/replica_dino_pico8_cells.pth")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig override for the pretraining (JSON value), e.g. "
                    "--set local_crops=6")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="replica and cache size (default: the preset's, 160 x 200)")
    ap.add_argument("--start", default="",
                    help="init of the first stain (a full checkpoint continues that "
                    "pretraining, e.g. an earlier run's Actin/checkpoint.pth; default: random)")
    args = ap.parse_args()
    extra = {k: _value(v) for k, _, v in (s.partition("=") for s in args.set)}
    p = resolve_preset("cpu")
    subset, sites = args.subset or p.subset, args.sites or p.sites
    image_size, cache_size = (tuple(args.size),) * 2 if args.size else (p.image_size,
                                                                        p.cache_size)
    if not (args.out / "cache" / "cache.json").exists():
        run_to_end(write_replica(args.out / "data", subset, sites, image_size,
                                 seed=args.seed, workers=2))
        settings = PreprocessSettings(size=cache_size, clip=10000.0, normalize=p.normalize)
        run_to_end(preprocess(load_metadata(args.out / "data"), args.out / "cache", settings,
                              workers=2))
    cache = open_cache(args.out / "cache")
    init, t0 = args.start, time.time()
    for ch in cache.channels:
        config = TrainConfig(**{**p.train, "epochs": args.epochs, "weak_label": "none",
                                "seed": args.seed, "init": init, "init_parts": "full",
                                "channel": ch, "checkpoint_every": 50, **extra})
        run_to_end(train_channels(cache, config, args.out / "run", [ch], resume=True))
        init = str(checkpoint_path(args.out / "run", ch))
        print(f"{ch}: {args.epochs} epochs done after {time.time() - t0:.0f} s", flush=True)
    print(f"pretrained init (all stains): {init}")
    if args.export:
        import torch

        from napari_wsdino.core.model import read_checkpoint
        from napari_wsdino.core.pretrained import slim_init

        scales = {k: list(getattr(config, k)) for k in ("global_scale", "local_scale")}
        start = f", continuing {args.start}" if args.start else ""
        about = (f"plain DINO (no labels), {p.train['arch']}, {args.epochs} epochs per stain "
                 f"({', '.join(cache.channels)} in turn) on the synthetic replica of seed "
                 f"{args.seed} ({subset}, {sites} sites), views {scales}{start}: "
                 "benchmarks/pretrain_init.py")
        torch.save(slim_init(read_checkpoint(init), about, p.train["arch"]), args.export)
        print(f"bundled-weights file (teacher only, float16): {args.export}")


if __name__ == "__main__":
    main()
