"""Evaluation at scale (issue 18): wall time and peak memory of ``wsdino evaluate``.

Generates a field-level profile table of N simulated treatments (one field each,
four concentrations per compound, 12 MoAs, 40 plates in 10 batches) plus DMSO
rows, with 1,920 float32 features (``core.profiles.simulate_profiles``: MoA,
compound, batch and plate effects plus noise), writes it as Parquet, then runs
``wsdino evaluate --tvn paper --json --quiet`` on it in a child process and reports
its wall time and peak resident memory (``/usr/bin/time -f %M``), with the load
average before the run; then the same evaluation through the core function alone
(``evaluate_profiles(ProfileTable.read(path))``, no CLI imports).

Run::

    python benchmarks/eval_scale.py                      # 20,000 treatments + 2,000 DMSO
    python benchmarks/eval_scale.py --treatments 100000  # memory stays bounded
    python benchmarks/eval_scale.py --markdown           # one row for RESULTS.md

Set ``OMP_NUM_THREADS`` (e.g. 2) to fix the number of cores the evaluation uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from napari_wsdino.core.profiles import simulate_profiles

N_MOAS = 12
N_PLATES = 40
N_BATCHES = 10
CONCENTRATIONS = (0.1, 0.3, 1.0, 3.0)


def field_table(n_treatments: int, n_dmso: int, seed: int = 0) -> pd.DataFrame:
    """Field table (``core.metadata`` column names): one field per treatment, DMSO spread
    over the plates."""
    rng = np.random.default_rng(seed)
    i = np.arange(n_treatments)
    compound = np.array([f"cpd{c:06d}" for c in i // len(CONCENTRATIONS)])
    conc = np.array(CONCENTRATIONS)[i % len(CONCENTRATIONS)]
    moa = np.array([f"MoA{m:02d}" for m in (i // len(CONCENTRATIONS)) % N_MOAS])
    plate = rng.integers(0, N_PLATES, n_treatments + n_dmso)
    treated = pd.DataFrame({
        "compound": compound, "concentration": conc, "moa": moa,
        "treatment": [f"{c}@{x}" for c, x in zip(compound, conc)],
    })
    dmso = pd.DataFrame({"compound": "DMSO", "concentration": 0.0, "moa": "DMSO",
                         "treatment": "DMSO@0.0"}, index=range(n_dmso))
    table = pd.concat([treated, dmso], ignore_index=True)
    table.insert(0, "plate", [f"P{p:03d}" for p in plate])
    table.insert(1, "batch", [f"Week{p % N_BATCHES + 1}" for p in plate])
    table.insert(2, "well", [f"W{w:05d}" for w in range(len(table))])
    table.insert(3, "site", 1)
    return table


CORE = ("import json, sys; from napari_wsdino.core.evaluation import evaluate_profiles; "
        "from napari_wsdino.core.profiles import ProfileTable; "
        "print(json.dumps(evaluate_profiles(ProfileTable.read(sys.argv[1]), sys.argv[2]).to_dict()))")


def run_child(path: Path, tvn: str, how: str) -> dict:
    """One evaluation in a fresh child process, timed: ``how="cli"`` runs ``wsdino
    evaluate --json``, ``how="core"`` reads the table and calls ``evaluate_profiles``.
    Returns wall seconds, the child's peak RSS (GB) and its metrics JSON."""
    if how == "cli":
        cmd = [sys.executable, "-m", "napari_wsdino.cli", "evaluate", str(path), "--tvn", tvn,
               "--json", "--quiet"]
    else:
        cmd = [sys.executable, "-c", CORE, str(path), tvn]
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M CPU_S %U %S"] + cmd
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{how} evaluation failed ({out.returncode}):\n{out.stderr}")
    peak_kb, user, system = out.stderr.rsplit("MAXRSS_KB", 1)[1].replace("CPU_S", "").split()[:3]
    return {"wall_s": wall, "peak_gb": int(peak_kb) / 1e6, "cpu_s": float(user) + float(system),
            "metrics": json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--treatments", type=int, default=20_000)
    ap.add_argument("--dmso", type=int, default=2_000)
    ap.add_argument("--features", type=int, default=1_920)
    ap.add_argument("--tvn", default="paper")
    ap.add_argument("--how", choices=["both", "cli", "core"], default="both",
                    help="time the CLI, the core function or both")
    ap.add_argument("--markdown", action="store_true", help="print RESULTS.md table rows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profiles.parquet"
        t0 = time.perf_counter()
        table = field_table(args.treatments, args.dmso)
        simulate_profiles(table, args.features, moa_signal=0.3, compound_signal=0.2,
                          batch_signal=0.3, plate_signal=0.1).write(path)
        gen = time.perf_counter() - t0
        runs = {}
        for how in (("cli", "core") if args.how == "both" else (args.how,)):
            load = os.getloadavg()[0]
            runs[how] = dict(run_child(path, args.tvn, how), load=load)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    for how, res in runs.items():
        m = res["metrics"]
        what = f"wsdino evaluate --tvn {args.tvn}" if how == "cli" else "evaluate_profiles"
        if args.markdown:
            print(f"| {datetime.date.today()} | {what} | {platform.machine()}, {os.cpu_count()} "
                  f"cores, OMP_NUM_THREADS={threads} | {args.treatments:,} + {args.dmso:,} x "
                  f"{args.features:,} | {res['load']:.1f} | {res['wall_s']:.1f} s | "
                  f"{res['cpu_s']:.0f} s | "
                  f"{res['peak_gb']:.2f} GB | {m['nsc']:.3f} / {m['nscb']:.3f} / "
                  f"{m['map_nsc']:.3f} |")
            continue
        print(f"{what}: {res['wall_s']:.1f} s ({res['cpu_s']:.0f} CPU s), peak RSS "
              f"{res['peak_gb']:.2f} GB "
              f"(OMP_NUM_THREADS={threads}, load average before {res['load']:.2f}); "
              f"NSC {m['nsc']:.3f}  NSCB {m['nscb']:.3f}  mAP(NSC) {m['map_nsc']:.3f}")
    if not args.markdown:
        print(f"table: {args.treatments:,} treatments + {args.dmso:,} DMSO x {args.features:,} "
              f"features (generated in {gen:.1f} s)")


if __name__ == "__main__":
    main()
