"""Time the evaluation on BBBC021's design: 3,848 fields x 1,152 features.

Compares our vectorised NSC + NSCB (one similarity matrix, masks, argmax) with a
straightforward per-treatment loop as research scripts write it (a pandas query
per treatment and plate to aggregate, then per query a mask and a scikit-learn
1-NN classifier, as in DeepProfiler's BBBC021 notebook), and times the whole
evaluation (TVN + aggregation + NSC + NSCB + k-NN + mAP).

Features are simulated (``core.profiles.simulate_profiles``) on the packaged
metadata; no images or weights are needed.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
import pandas as pd

from napari_wsdino.core.aggregate import aggregate_treatments
from napari_wsdino.core.evaluation import evaluate_profiles, evaluate_treatments
from napari_wsdino.core.metadata import bundled_metadata_dir, load_metadata
from napari_wsdino.core.profiles import simulate_profiles


def loop_aggregate(frame: pd.DataFrame, feature_ids: list[str]) -> pd.DataFrame:
    """Mean per (treatment, plate), median across plates, one treatment at a time."""
    rows = []
    treated = frame[frame.Metadata_MoA != "DMSO"]
    for treatment in treated.Metadata_Treatment.unique():
        sub = treated[treated.Metadata_Treatment == treatment]
        means = [sub[sub.Metadata_Plate == plate][feature_ids].mean() for plate in sub.Metadata_Plate.unique()]
        profile = pd.concat(means, axis=1).median(axis=1)
        first = sub.iloc[0]
        rows.append({"Compound": first.Metadata_Compound, "MoA": first.Metadata_MoA,
                     "Batch": ",".join(sorted(sub.Metadata_Batch.unique())), **profile.to_dict()})
    return pd.DataFrame(rows)


def loop_match(treatments: pd.DataFrame, feature_ids: list[str]) -> tuple[float, float]:
    """NSC and NSCB with a mask and a 1-NN classifier per query treatment."""
    from sklearn.neighbors import KNeighborsClassifier

    def knn(train, labels, query):
        model = KNeighborsClassifier(n_neighbors=1, algorithm="brute", metric="cosine")
        return model.fit(train, labels).predict(query)[0]

    correct = 0
    for i in treatments.index:
        train = treatments[treatments.Compound != treatments.loc[i, "Compound"]]
        query = treatments.loc[[i], feature_ids]
        correct += knn(train[feature_ids], train.MoA, query) == treatments.loc[i, "MoA"]
    nsc = correct / len(treatments)

    batches_per_moa = {m: set(",".join(g.Batch).split(",")) for m, g in treatments.groupby("MoA")}
    valid = treatments[[len(batches_per_moa[m]) >= 2 for m in treatments.MoA]]
    correct = 0
    for i in valid.index:
        same_batch = valid.Batch == valid.loc[i, "Batch"]  # taxol's "W1,...,W10" matches none
        train = valid[(valid.Compound != valid.loc[i, "Compound"]) & ~same_batch]
        query = valid.loc[[i], feature_ids]
        correct += knn(train[feature_ids], train.MoA, query) == valid.loc[i, "MoA"]
    return nsc, correct / len(valid)


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--features", type=int, default=1152)
    parser.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    args = parser.parse_args(argv)

    table = load_metadata(bundled_metadata_dir(), check_files=False).table
    profiles = simulate_profiles(table, args.features, moa_signal=0.2, seed=0)
    frame = profiles.to_frame()
    feature_ids = profiles.feature_names

    full = {m: best_of(lambda m=m: evaluate_profiles(profiles, m), args.repeats)
            for m in ("paper", "per-plate", "none")}
    ours_fields = best_of(lambda: evaluate_treatments(aggregate_treatments(profiles)), args.repeats)
    treatments = aggregate_treatments(profiles)
    ours_match = best_of(lambda: evaluate_treatments(treatments), args.repeats)

    loop_repeats = max(1, args.repeats // 2)
    loop_fields = best_of(lambda: loop_match(loop_aggregate(frame, feature_ids), feature_ids), loop_repeats)
    flat = loop_aggregate(frame, feature_ids)
    loop_only = best_of(lambda: loop_match(flat, feature_ids), loop_repeats)

    # Same answers, or the comparison means nothing.
    res = ours_fields[2]
    assert abs(loop_fields[2][0] - res["nsc_match"].accuracy) < 1e-12, (loop_fields[2], res["nsc_match"].accuracy)
    assert abs(loop_fields[2][1] - res["nscb_match"].accuracy) < 1e-12

    rows = [
        ("whole evaluation, TVN paper (TVN + aggregation + NSC + NSCB + k-NN + mAP)", full["paper"]),
        ("whole evaluation, TVN per-plate", full["per-plate"]),
        ("whole evaluation, no TVN", full["none"]),
        ("NSC + NSCB from fields (aggregation + matching), ours", ours_fields),
        ("NSC + NSCB from fields, per-treatment loop", loop_fields),
        ("NSC + NSCB from 103 treatment profiles, ours", ours_match),
        ("NSC + NSCB from 103 treatment profiles, per-treatment loop", loop_only),
    ]
    ratio_fields = loop_fields[0] / ours_fields[0]
    ratio_match = loop_only[0] / ours_match[0]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    if args.markdown:
        print(f"## Evaluation (issue 3) -- {datetime.date.today().isoformat()}\n")
        print(f"Machine: 2-core CPU dev box, no GPU (shared with other jobs); Python "
              f"{platform.python_version()}, OMP_NUM_THREADS={threads}. `python benchmarks/bench_evaluate.py "
              f"--repeats {args.repeats} --markdown`: {len(profiles):,} fields x {args.features:,} "
              "features (simulated on the BBBC021 design), best / median of the repeats. "
              f"Load average during the run: {os.getloadavg()[0]:.1f} (other helpers' jobs).\n")
        print("| what | best (s) | median (s) |\n| --- | ---: | ---: |")
        for name, (best, med, _) in rows:
            print(f"| {name} | {best:.3f} | {med:.3f} |")
        print(f"\nSpeed-up over the per-treatment loop: x{ratio_fields:.0f} from fields, "
              f"x{ratio_match:.0f} on treatment profiles; both give the same NSC "
              f"({res['nsc_match'].accuracy:.3f}) and NSCB ({res['nscb_match'].accuracy:.3f}).")
    else:
        for name, (best, med, _) in rows:
            print(f"{name:<80} best {best:7.3f} s  median {med:7.3f} s")
        print(f"speed-up: x{ratio_fields:.1f} from fields, x{ratio_match:.1f} on treatment profiles")


if __name__ == "__main__":
    main()
