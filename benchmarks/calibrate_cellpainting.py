"""Calibrate the Cell Painting replica with the classical profile (docs/replica.md).

Writes ``wsdino synth --layout cellpainting`` at a size and seed, computes the 89
classical features of every field and prints NSC / NSCB / mAP under each TVN.

    python benchmarks/calibrate_cellpainting.py OUT --size 128 160 --seed 0 [--batch-strength 0]
"""

from __future__ import annotations

import argparse
import time

from napari_wsdino.core.classical import dataset_features, feature_names
from napari_wsdino.core.evaluation import evaluate_profiles
from napari_wsdino.core.metadata import load_metadata
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.synth import SynthConfig, make_replica


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--size", type=int, nargs=2, default=(128, 160))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-strength", type=float, default=1.0)
    args = p.parse_args()
    t0 = time.time()
    out = make_replica(args.out, size=tuple(args.size), seed=args.seed, layout="cellpainting",
                       config=SynthConfig(batch_strength=args.batch_strength))
    meta = load_metadata(out)
    X = dataset_features(meta.table, list(meta.channels))
    profiles = ProfileTable.from_fields(meta.table, X, feature_names(list(meta.channels)))
    print(f"{len(meta.table)} fields, {X.shape[1]} features, {time.time() - t0:.1f} s")
    for tvn in ("none", "paper", "per-plate"):
        r = evaluate_profiles(profiles, tvn=tvn)
        print(f"{tvn:10s} NSC {r.nsc:6.1%}  NSCB {r.nscb:6.1%}  mAP(NSC) {r.map_nsc:.3f}")


if __name__ == "__main__":
    main()
