"""Preprocessing speed at full size (1024 x 1280): ours vs a straightforward version.

    python benchmarks/bench_preprocess.py                 # 2 plates x 24 fields, 2 workers
    python benchmarks/bench_preprocess.py --plates 2 --fields 48 --workers 2

Writes replica images (``core.synth``, the real BBBC021 design and file names) for
the first fields of a few plates into a temporary folder, then times

* ours: ``core.preprocess.preprocess`` (fast illumination function, torch resize,
  process pool), split into the per-plate illumination cost and the per-field cost
  from its progress events;
* a straightforward per-image implementation, one process: read every TIFF of the
  plate for the mean image; the *exact* CellProfiler function
  (``scipy.ndimage.median_filter`` with a 136-px disk) -- far too slow to run at full
  size, so its cost is measured per pixel on a small image and scaled to 1024 x 1280;
  then per image: read the TIFF, divide, ``scipy.ndimage.zoom(order=3)`` to half size,
  clip, normalise;

and extrapolates both to the 3,848-field, 55-plate, 3-channel screen. It also checks
the fast function against the exact disk median at random points of a full-size
plate mean (the exact value at a point is cheap: :func:`illumination.median_at`).

Run this when the machine is otherwise idle if you can: wall times on a shared box
grow with its load, which is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

FULL_FIELDS, FULL_PLATES = 3848, 55


def make_data(out: Path, plates: int, fields: int, size) -> Path:
    from napari_wsdino.core.imageio import write_tiff
    from napari_wsdino.core.synth import field_specs, render_spec
    from napari_wsdino.core.synth.design import bundled_design, write_design

    raw, moa, table = bundled_design()
    chosen = list(dict.fromkeys(table.plate))[:plates]
    keep = np.zeros(len(table), dtype=bool)
    for p in chosen:
        keep[np.flatnonzero(table.plate.to_numpy() == p)[:fields]] = True
    write_design(out, raw, moa, keep)
    wanted = set(raw.loc[keep, "Image_FileName_DAPI"])
    cache: dict = {}
    for spec in field_specs("full", 4, 0):
        if Path(spec["files"][0]).name not in wanted:
            continue
        img = render_spec(spec, size, 0, _illum_cache=cache)
        for plane, rel in zip(img, spec["files"]):
            write_tiff(out / rel, plane)
    return out


def run_ours(meta, out: Path, workers: int) -> dict:
    from napari_wsdino.core.preprocess import preprocess
    from napari_wsdino.core.progress import run_to_end

    stamps = []
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    cache = run_to_end(preprocess(meta, out, workers=workers),
                       lambda e: stamps.append((time.perf_counter(), e)))
    wall = time.perf_counter() - t0
    # The pool is shut down (its workers reaped) when preprocess returns, so their
    # CPU time is in RUSAGE_CHILDREN now.
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (time.process_time() - cpu0 + children1.ru_utime - children0.ru_utime
           + children1.ru_stime - children0.ru_stime)
    # Illumination phase of a plate: from its last "mean" event to its last
    # "illumination" event.
    illum = 0.0
    for plate in dict.fromkeys(meta.table.plate):
        mean_t = [t for t, e in stamps if e.info.get("plate") == plate and e.info["phase"] == "mean"]
        ill_t = [t for t, e in stamps
                 if e.info.get("plate") == plate and e.info["phase"] == "illumination"]
        if mean_t and ill_t:
            illum += ill_t[-1] - mean_t[-1]
    n = len(cache)
    n_plates = meta.table.plate.nunique()
    # Start-up (spawning workers, importing torch there) happens once per run:
    # up to the first event (which also reads the first few fields).
    startup = stamps[0][0] - t0
    return {"wall": wall, "fields": n, "illum_per_plate": illum / n_plates, "cpu": cpu,
            "startup": startup, "per_field": (wall - illum - startup) / n}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def illumination_cpu(meta, size) -> float:
    """CPU seconds of the three fast functions of one plate, in one process."""
    from napari_wsdino.core import illumination as il
    from napari_wsdino.core.imageio import read_tiff

    plate = meta.table.plate.iloc[0]
    rows = meta.table[meta.table.plate == plate]
    means = [il.mean_image(read_tiff(p) for p in rows[f"path_{c}"]) for c in meta.channels]
    il.illumination_function(means[0][:64, :64], 20)  # compile / load the kernel first
    cpu0 = time.process_time()
    for m in means:
        il.illumination_function(m, il.scaled_filter_size(320, size))
    return time.process_time() - cpu0


def run_baseline(meta, size, radius: int) -> dict:
    """Straightforward version on the first plate (one process)."""
    from scipy import ndimage

    from napari_wsdino.core import illumination as il
    from napari_wsdino.core.imageio import read_tiff

    plate = meta.table.plate.iloc[0]
    rows = meta.table[meta.table.plate == plate]
    channels = meta.channels
    t0 = time.perf_counter()
    means = []
    for c in channels:
        means.append(il.mean_image(read_tiff(p) for p in rows[f"path_{c}"]))
    t_mean = time.perf_counter() - t0

    # Exact median filter: per-pixel cost on a small image, scaled to full size.
    small = means[0][:24, :30]
    t0 = time.perf_counter()
    il.median_filter_exact(small, radius)
    per_pixel = (time.perf_counter() - t0) / small.size
    t_exact_fn = per_pixel * size[0] * size[1]

    fns = [il.illumination_function(m, il.scaled_filter_size(320, size)) for m in means]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _, row in rows.iterrows():
        for c, fn in zip(channels, fns):
            img = read_tiff(row[f"path_{c}"]).astype(np.float32) / fn
            small_img = ndimage.zoom(img, 0.5, order=3)
            np.clip(small_img, 0, 10000, out=small_img)
            small_img = (small_img - small_img.mean()) / small_img.std()
            small_img.astype(np.float16)
    t_apply = time.perf_counter() - t0
    cpu_apply = time.process_time() - cpu0
    n = len(rows)
    return {"fields": n, "per_field": (t_mean + t_apply) / n, "cpu_apply": cpu_apply / n,
            "exact_fn": t_exact_fn, "illum_per_plate": 3 * t_exact_fn}


def check_fast_vs_exact(meta, cache_path: Path, size, n_points: int = 40) -> float:
    """Largest relative difference of the cached (fast) function from the exact disk
    median (same robust minimum) at random points of the first plate's DAPI mean."""
    from napari_wsdino.core import illumination as il
    from napari_wsdino.core.cache import illumination_file
    from napari_wsdino.core.imageio import read_tiff

    plate = meta.table.plate.iloc[0]
    mean = il.mean_image(read_tiff(p) for p in meta.table.loc[meta.table.plate == plate, "path_DAPI"])
    radius = il.disk_radius(il.scaled_filter_size(320, size))
    smooth = il.median_filter_fast(mean, radius)
    _, robust_min = il.robust_rescale(smooth)
    rng = np.random.default_rng(0)
    ys = np.sort(rng.choice(size[0], n_points // 4, replace=False))
    xs = np.sort(rng.choice(size[1], 4, replace=False))
    ys[0], xs[-1] = 0, size[1] - 1  # include an edge
    exact = np.maximum(il.median_at(mean, radius, ys, xs), robust_min) / robust_min
    fast = np.load(illumination_file(cache_path, plate, "DAPI"))[np.ix_(ys, xs)]
    return float(np.max(np.abs(fast - exact) / exact))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plates", type=int, default=2)
    ap.add_argument("--fields", type=int, default=24, help="fields per plate")
    ap.add_argument("--size", type=int, nargs=2, default=(1024, 1280))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="folder to keep the data and cache in (default: temporary)")
    args = ap.parse_args()
    size = tuple(args.size)

    from napari_wsdino.core import illumination as il
    from napari_wsdino.core.metadata import load_metadata

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_pre_"))
    try:
        t0 = time.perf_counter()
        make_data(tmp / "data", args.plates, args.fields, size)
        print(f"data: {args.plates} plates x {args.fields} fields at {size}, "
              f"written in {time.perf_counter() - t0:.0f} s")
        meta = load_metadata(tmp / "data")
        load0 = os.getloadavg()[0]
        # One plate, then all: the difference is the cost of the extra plates without
        # the once-per-run start-up (spawning workers, importing torch and numba there).
        first = meta.table.plate.iloc[0]
        one = load_metadata(tmp / "data")
        one.table = one.table[one.table.plate == first].reset_index(drop=True)
        ours1 = run_ours(one, tmp / "cache1", args.workers)
        ours = run_ours(meta, tmp / "cache", args.workers)
        illum_cpu = illumination_cpu(meta, size)
        radius = il.disk_radius(il.scaled_filter_size(320, size))
        base = run_baseline(meta, size, radius)
        err = check_fast_vs_exact(meta, tmp / "cache", size)
        load1 = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    full_ours = (ours["startup"] + FULL_PLATES * ours["illum_per_plate"]
                 + FULL_FIELDS * ours["per_field"])
    full_base = FULL_PLATES * base["illum_per_plate"] + FULL_FIELDS * base["per_field"]
    print(f"\n## Preprocessing (`benchmarks/bench_preprocess.py`, issue 5) -- {date.today()}\n")
    print(f"Machine: 2-core CPU dev box, no GPU; load average {load0:.1f} -> {load1:.1f} "
          f"(other jobs). {ours['fields']} replica fields at {size[0]} x {size[1]}, "
          f"3 channels, {meta.table.plate.nunique()} plates; disk radius {radius} px.\n")
    print("| implementation | fields/s | illumination function, per plate (3 ch) | "
          "3,848 fields / 55 plates, extrapolated |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| ours ({args.workers} workers), measured wall {ours['wall']:.1f} s | "
          f"{ours['fields'] / ours['wall']:.2f} | {ours['illum_per_plate']:.1f} s | "
          f"{full_ours / 60:.1f} min |")
    print(f"| straightforward, 1 process (exact function extrapolated) | "
          f"{1 / (base['per_field'] + base['illum_per_plate'] / base['fields']):.3f} | "
          f"{base['illum_per_plate']:.0f} s | {full_base / 3600:.1f} h |")
    n_plates = meta.table.plate.nunique()
    extra_fields = ours["fields"] - ours1["fields"]
    field_cpu = (ours["cpu"] - ours1["cpu"] - (n_plates - 1) * illum_cpu) / extra_fields
    start_cpu = ours1["cpu"] - illum_cpu - ours1["fields"] * field_cpu
    cpu_full = start_cpu + FULL_PLATES * illum_cpu + FULL_FIELDS * field_cpu
    print(f"\nCPU time of ours, all processes: {ours['cpu']:.1f} s (one plate alone: "
          f"{ours1['cpu']:.1f} s) = start-up {start_cpu:.1f} s "
          f"(pool, torch, numba kernel) + {illum_cpu:.2f} s per plate "
          f"for its 3 functions + {field_cpu * 1000:.0f} ms per field. The 3,848 fields and 55 "
          f"plates are then {cpu_full / 60:.1f} CPU-min: about {cpu_full / 60 / args.workers:.1f} "
          f"min on {args.workers} otherwise idle cores. The straightforward version spends "
          f"{base['cpu_apply'] * 1000:.0f} ms CPU per field on reading, dividing and resizing "
          f"alone (ours {field_cpu * 1000:.0f} ms including the mean-image pass).")
    print(f"\nPer field without the function: ours {ours['per_field'] * 1000:.0f} ms (wall, "
          f"{args.workers} workers, after {ours['startup']:.1f} s start-up), "
          f"straightforward {base['per_field'] * 1000:.0f} ms. "
          f"Exact function {base['exact_fn']:.0f} s per (plate, channel) (scipy disk "
          f"median, per-pixel cost measured on 24 x 30 px). Fast vs exact function at 40 "
          f"points of a full-size plate mean: max relative difference {err:.2e}.")


if __name__ == "__main__":
    main()
