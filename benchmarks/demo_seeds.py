"""Run ``wsdino demo`` on several replica seeds and summarise: mean and spread per model.

Every seed is a new replica (``--seed`` sets the data and training seeds), so the numbers
measure the recipe on data it was not tuned on. The summary table (NSC, NSCB, mAP and
attention on cells, mean ± standard deviation over seeds, and the worst single-seed gap
of WS-DINO over the random-init ViT) is printed as Markdown for benchmarks/RESULTS.md and
written to ``OUT/summary.json``. Numbers are *synthetic replica* numbers.

Usage::

    python benchmarks/demo_seeds.py /tmp/seeds --seeds 21 22 23            # cpu preset
    python benchmarks/demo_seeds.py /tmp/scratch --seeds 21 22 23 --init random  # from scratch
    python benchmarks/demo_seeds.py /tmp/seeds --seeds 21 22 23 --summary-only
    python benchmarks/demo_seeds.py /tmp/e20 --seeds 51 52 53 --preset cpu-hires --epochs 20
    python benchmarks/demo_seeds.py /tmp/dmso --seeds 71 72 73 --preset cpu-hires --dmso together
    OMP_NUM_THREADS=1 python benchmarks/demo_seeds.py /tmp/seeds --seeds 21 --preset cpu

Seeds run one after the other (each demo uses the machine's cores); a finished seed's
folder is reused (the demo skips finished stages).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

KEYS = ("nsc", "nscb", "map_nsc", "attention_DAPI", "attention_Tubulin", "attention_Actin")


def previous_cpu_preset():
    """The ``cpu`` preset before issue 13 (2026-11-25): per-image z-score, uniform crops,
    no quarter turns, random initial weights, CLS-only embedding of four 80-px centre crops;
    for A/B runs."""
    from dataclasses import replace

    from napari_wsdino.core.presets import PRESETS

    cpu = PRESETS["cpu"]
    train = {k: v for k, v in cpu.train.items() if k not in ("crop_centres", "rotate90", "init")}
    return replace(cpu, name="cpu-previous", train=train, embed_pooling="cls",
                   normalize="zscore", embed_windows="", embed_crop=80)


def run_seed(out: Path, seed: int, preset: str, init: str = "", epochs: int = 0,
             dmso: str = "") -> dict:
    from napari_wsdino.core.pipeline import run_demo
    from napari_wsdino.core.progress import run_to_end

    if preset == "cpu-previous":
        preset = previous_cpu_preset()

    t0 = time.perf_counter()
    overrides = {"init": init} if init else {}
    if epochs:
        overrides["epochs"] = epochs
    if dmso:
        overrides["dmso"] = dmso
    summary = run_to_end(run_demo(out / f"seed_{seed}", preset, seed=seed, device="cpu",
                                  **overrides))
    return {"seed": seed, "wall_s": round(time.perf_counter() - t0, 1), "skipped": summary["skipped"],
            "results": summary["results"]}


def summarise(runs: list[dict]) -> dict:
    """Per model: mean and sd of each key over seeds; WS-DINO minus random-init per seed."""
    models: dict[str, dict[str, list]] = {}
    for run in runs:
        for row in run["results"]:
            entry = models.setdefault(row["model"], {k: [] for k in KEYS})
            for k in KEYS:
                if row.get(k) is not None:
                    entry[k].append(float(row[k]))
    table = {m: {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in d.items() if v}
             for m, d in models.items()}
    gaps = []
    for run in runs:
        by = {r["model"]: r for r in run["results"]}
        ws = next((r for m, r in by.items() if m.startswith("WS-DINO")), None)
        rnd = next((r for m, r in by.items() if m.startswith("random-init")), None)
        if ws and rnd:
            gaps.append({"seed": run["seed"], "nsc": ws["nsc"] - rnd["nsc"],
                         "nscb": ws["nscb"] - rnd["nscb"]})
    return {"models": table, "gaps_vs_random": gaps}


def markdown(summary: dict, seeds: list[int]) -> str:
    cols = [k for k in KEYS if any(k in v for v in summary["models"].values())]
    lines = [f"| model (seeds {', '.join(map(str, seeds))}) | " + " | ".join(cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for m, d in summary["models"].items():
        cells = [f"{d[k][0]:.3f} ± {d[k][1]:.3f}" if k in d else "—" for k in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for g in summary["gaps_vs_random"]:
        lines.append(f"\nseed {g['seed']}: WS-DINO − random-init = {g['nsc']:+.3f} NSC, "
                     f"{g['nscb']:+.3f} NSCB")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23])
    ap.add_argument("--preset", default="cpu",
                    help="a demo preset, or cpu-previous (the cpu preset before issue 13)")
    ap.add_argument("--init", default="", help="initial weights (default: the preset's; "
                    "'random' for the cpu preset from scratch)")
    ap.add_argument("--epochs", type=int, default=0,
                    help="fine-tuning epochs (default: the preset's)")
    ap.add_argument("--dmso", default="", help="DMSO fields in WS-DINO's pairs: exclude (the "
                    "default), plate, or together (one cross-week group: the pairs that do "
                    "cross batches)")
    ap.add_argument("--summary-only", action="store_true",
                    help="summarise the seeds' finished folders, run nothing")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        if args.summary_only:
            res = json.loads((args.out / f"seed_{seed}" / "results.json").read_text())
            runs.append({"seed": seed, "results": res["results"]})
        else:
            runs.append(run_seed(args.out, seed, args.preset, args.init, args.epochs, args.dmso))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "results"}), flush=True)
    summary = summarise(runs)
    (args.out / "summary.json").write_text(json.dumps({"runs": runs, **summary}, indent=2))
    print(markdown(summary, args.seeds))


if __name__ == "__main__":
    main()
