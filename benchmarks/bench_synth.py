"""Speed of the synthetic replica: fields per second by subset, size and workers.

    python benchmarks/bench_synth.py            # mini at 64x80 and 256x320, 1 and 2 workers
    python benchmarks/bench_synth.py --replicate1   # also replicate1 at 256x320 (both cores)

Prints wall time and CPU time of the main process plus per-field CPU of the renderer;
wall times on a shared machine vary with load, so the per-field CPU time is the number
to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from napari_wsdino.core.synth import field_specs, make_replica, render_spec


def render_cpu(size, n=20) -> float:
    specs = field_specs("mini", 1, 0)[:n]
    t = time.process_time()
    for s in specs:
        render_spec(s, size, 0)
    return (time.process_time() - t) / n


def run(subset, size, workers, sites=None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        make_replica(tmp / "r", subset, sites, size, 0, workers)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = sum(1 for _ in (tmp / "r").rglob("*.tif")) // 3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"subset": subset, "size": size, "workers": workers, "fields": n,
            "wall_s": round(wall, 2), "fields_per_s": round(n / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicate1", action="store_true")
    args = p.parse_args()
    for size in ((64, 80), (256, 320), (1024, 1280)):
        print(f"render CPU per field at {size}: {render_cpu(size, 5 if size[0] > 512 else 20):.3f} s")
    cores = os.cpu_count() or 1
    for size in ((64, 80), (256, 320)):
        for workers in sorted({1, cores}):
            print(run("mini", size, workers))
    if args.replicate1:
        print(run("replicate1", (256, 320), cores))


if __name__ == "__main__":
    main()
