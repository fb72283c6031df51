"""Issue 13 probe: which of the replica's week effects costs the profiles their NSCB?

Writes the ``cpu`` preset's replica (``mini``, 2 sites, 160 x 200) for one seed once per
variant, with one group of week effects switched off, preprocesses it as the demo does, and
evaluates three profiles on it: the bundled init alone (``--init``, no fine-tuning), a
random-init ViT and the classical profile. One JSON line per variant on stdout (and in
``OUT/ablation.jsonl``)::

    python benchmarks/nuisance_ablation.py /tmp/abl --seed 21 --variants base noresp nobatch

Variants: ``base`` (the calibrated replica), ``noresp`` (``batch_response=0``: no week change
of the drug response), ``halfresp`` (``batch_response=0.5``: half of it), ``noblur`` / ``nogain`` / ``nobio`` (the week's focus; stain gain and
background; cell size, shape, fibre, density and texture drifts set to their no-effect
values), ``nobatch`` (``batch_strength=0``: no week effects at all).

``--size 320 400 --cell-crop 64`` does the same at twice the preset's resolution (nuclei about
12 px across instead of 6; the cell crops twice as wide, so they hold the same cells).

A diagnostic on data built to be easier, never a result: docs/replica.md keeps the calibrated
replica. Results: benchmarks/RESULTS.md, "Issue 13: where NSCB is lost".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import napari_wsdino.core.synth as synth
from napari_wsdino.core.cache import open_cache
from napari_wsdino.core.embed import embed_cache
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.modelset import ModelSet
from napari_wsdino.core.pipeline import classical_profiles
from napari_wsdino.core.preprocess import preprocess
from napari_wsdino.core.presets import embed_settings, headline, resolve_preset
from napari_wsdino.core.pretrained import DEFAULT_INIT
from napari_wsdino.core.progress import run_to_end
from napari_wsdino.core.recipes import resolve
from napari_wsdino.core.synth import SynthConfig, write_replica
from napari_wsdino.core.synth.phenotypes import batch_nuisance

#: variant -> (SynthConfig overrides, week-nuisance keys reset to the no-effect draw)
VARIANTS = {
    "base": ({}, ()),
    "noresp": ({"batch_response": 0.0}, ()),
    "halfresp": ({"batch_response": 0.5}, ()),
    "noblur": ({}, ("blur",)),
    "nogain": ({}, ("gain", "background")),
    "nobio": ({}, ("cell_size", "nuc_size", "tub_fibre", "act_fibre", "density", "texture")),
    "nobatch": ({"batch_strength": 0.0}, ()),
}


def _nuisance_without(keys):
    """``batch_nuisance`` with ``keys`` taken from the no-batch-effect draw."""
    def nuisance(batch, seed, config, channels=3):
        out = batch_nuisance(batch, seed, config, channels)
        neutral = batch_nuisance(batch, seed, replace(config, batch_strength=0.0), channels)
        return {**out, **{k: neutral[k] for k in keys}}
    return nuisance


def _data(root: Path, seed: int, variant: str, size: tuple[int, int]):
    overrides, keys = VARIANTS[variant]
    p, stages = resolve_preset("cpu"), resolve("default")
    if not (root / "cache" / "cache.json").exists():
        # The renderer looks batch_nuisance up in its module: one process (workers=1) sees this.
        synth.batch_nuisance = _nuisance_without(keys) if keys else batch_nuisance
        try:
            run_to_end(write_replica(root / "data", p.subset, p.sites, size, seed=seed,
                                     workers=1, config=SynthConfig(**overrides)))
        finally:
            synth.batch_nuisance = batch_nuisance
        settings = replace(stages.preprocess, size=size, clip=10000.0,
                           normalize=p.normalize)
        run_to_end(preprocess(load_metadata(root / "data"), root / "cache", settings, workers=1))
    return load_metadata(root / "data"), open_cache(root / "cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--variants", nargs="+", default=["base", "noresp"], choices=list(VARIANTS))
    ap.add_argument("--init", default=DEFAULT_INIT, help="weights of the init-only profile")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="replica and cache size (default: the preset's, 160 x 200)")
    ap.add_argument("--cell-crop", type=int, default=None,
                    help="side of the per-nucleus embedding crop (default: the preset's, 32)")
    args = ap.parse_args()
    p, stages = resolve_preset("cpu"), resolve("default")
    size = tuple(args.size) if args.size else p.cache_size
    embed = {**embed_settings(p, stages), **({"crop": args.cell_crop} if args.cell_crop else {})}
    for variant in args.variants:
        tag = "" if size == p.cache_size else f"_{size[0]}x{size[1]}"
        root = args.out / f"seed{args.seed}_{variant}{tag}"
        meta, cache = _data(root, args.seed, variant, size)
        row = {"seed": args.seed, "variant": variant, "size": list(size), "cell_crop": embed["crop"]}
        models = {"init-only": ModelSet.init_only(p.train["arch"], args.init, cache.channels),
                  "random-init": ModelSet.random(p.train["arch"], cache.channels, seed=args.seed),
                  "classical": None}
        for name, ms in models.items():
            out = root / f"profiles_{name}.parquet"
            prof = run_to_end(classical_profiles(meta, cache, out) if ms is None else
                              embed_cache(cache, ms, out, device="cpu", **embed))
            r = headline(evaluate_profiles(prof, tvn="paper", drop_constant=True,
                                           nscb_multibatch="exempt"))
            row[name] = [round(r["nsc"], 3), round(r["nscb"], 3)]
        print(json.dumps(row), flush=True)
        with open(args.out / "ablation.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
