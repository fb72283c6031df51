"""Calibrate the synthetic replica: NSC / NSCB of the ``classical`` profile.

Writes a replica (unless ``--data`` points to one), computes the classical profile of
every field (both cores), and evaluates it with ``core.evaluation.evaluate_profiles``
under each TVN mode. Numbers go to ``docs/replica.md`` (calibration table).

    python benchmarks/calibrate_replica.py --subset replicate1 --size 256 320 --seed 0 \
        --out /tmp/replica_r1 --json /tmp/calib.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from napari_wsdino.core.classical import dataset_features, feature_names
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.synth import SynthConfig, make_replica


def _features(table):
    return dataset_features(table)


def parallel_features(table, workers: int) -> np.ndarray:
    if workers <= 1:
        return dataset_features(table)
    parts = np.array_split(np.arange(len(table)), workers * 4)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        chunks = list(pool.map(_features, [table.iloc[p] for p in parts]))
    return np.concatenate(chunks)


def calibrate(data: Path, workers: int) -> dict:
    meta = load_metadata(data)
    cached = Path(data) / "classical_features.npy"
    t0 = time.perf_counter()
    if cached.exists():
        X = np.load(cached)
    else:
        X = parallel_features(meta.table, workers)
        np.save(cached, X)
    t_feat = time.perf_counter() - t0
    profiles = ProfileTable.from_fields(meta.table, X, feature_names(meta.channels))
    rows = {}
    for tvn in ("none", "paper", "per-plate"):
        r = evaluate_profiles(profiles, tvn=tvn, drop_constant=True)
        rows[tvn] = {"nsc": r.nsc, "nscb": r.nscb, "n_nsc": r.n_nsc, "n_nscb": r.n_nscb,
                     "map_nsc": r.map_nsc}
    return {"fields": len(meta.table), "features_s": round(t_feat, 1), "evaluation": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", default="replicate1")
    p.add_argument("--size", nargs=2, type=int, default=(256, 320))
    p.add_argument("--sites", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, help="where to write the replica (default: a temp folder)")
    p.add_argument("--data", type=Path, help="use an existing replica instead of writing one")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="SynthConfig knob, e.g. --knob batch_strength=0.5")
    args = p.parse_args(argv)
    knobs = {k: float(v) for k, v in (s.split("=", 1) for s in args.knob)}
    result = {"subset": args.subset, "size": list(args.size), "seed": args.seed, "knobs": knobs}
    data = args.data
    if data is None:
        import tempfile

        data = args.out or Path(tempfile.mkdtemp(prefix="replica_")) / "replica"
        t0 = time.perf_counter()
        make_replica(data, args.subset, args.sites, tuple(args.size), args.seed, args.workers,
                     SynthConfig(**knobs))
        result["synth_s"] = round(time.perf_counter() - t0, 1)
    result.update(calibrate(data, args.workers))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
