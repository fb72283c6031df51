"""the whole workflow on a synthetic replica (BBBC021 or Cell Painting), with a report

Generate a synthetic replica (BBBC021's three stains, or with --layout cellpainting a
JUMP-style five-stain Cell Painting screen), preprocess it, train one WS-DINO model per
channel, embed every field, evaluate NSC / NSCB / mAP against a random-init baseline and
write OUT/report.html. Rerunning with the same OUT skips finished stages. Results are on
synthetic data and labelled as such.

Examples: wsdino demo; wsdino demo cp_demo --layout cellpainting
"""

from __future__ import annotations

import json

from napari_wsdino.cli._common import command, drive
from napari_wsdino.core.pipeline import DEFAULT_LAYOUT, run_demo
from napari_wsdino.core.presets import DEFAULT_PRESET, PRESETS
from napari_wsdino.core.pretrained import DEFAULT_INIT
from napari_wsdino.core.recipes import DEFAULT_RECIPE
from napari_wsdino.core.sampler import DEFAULT_WEAK_LABEL, WEAK_LABELS, weak_label_help
from napari_wsdino.core.screens import LAYOUTS as SCREEN_LAYOUTS
from napari_wsdino.core.synth import LAYOUTS


def add_parser(sub) -> None:
    presets = "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
    p = command(sub, "demo", __doc__)
    p.add_argument("out", nargs="?", default="wsdino_demo", help="output folder (default: wsdino_demo)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET, help=f"run size ({presets})")
    p.add_argument("--gpu", action="store_const", const="gpu", dest="preset",
                   help="shorthand for --preset gpu (ViT-S/8, the paper's settings)")
    p.add_argument("--weak-label", default=DEFAULT_WEAK_LABEL, choices=WEAK_LABELS,
                   help=f"WS-DINO weak label (default: {DEFAULT_WEAK_LABEL}): {weak_label_help()}")
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help="screen layout of the replica (default: %(default)s): "
                   + "; ".join(f"{k}: {SCREEN_LAYOUTS[k].display_name}" for k in LAYOUTS))
    p.add_argument("--epochs", type=int, help="override the preset's training epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the replica and training")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--workers", type=int, default=2, help="processes for replica and preprocessing")
    from napari_wsdino.core.recipes import RECIPES

    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="bundle of preprocessing, training, embedding and evaluation settings "
                   "(paper-code: the official WS-DINO code; docs/fidelity.md)")
    p.add_argument("--init", metavar="PATH|random",
                   help="initial weights: a file, a bundled name, or 'random' (train from "
                   "random weights on purpose). Default: the cpu presets fine-tune the bundled "
                   f"{DEFAULT_INIT} weights (plain DINO pretrained on another replica "
                   "seed); --gpu and --recipe paper-code need one (the full ImageNet DINO "
                   "ViT-S/8 checkpoint)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    overrides = {"epochs": args.epochs} if args.epochs else {}
    if args.init:
        overrides["init"] = args.init
    summary = drive(run_demo(args.out, args.preset, weak_label=args.weak_label, seed=args.seed,
                             device=args.device, workers=args.workers, recipe=args.recipe,
                             layout=args.layout, **overrides))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print("\nResults on the synthetic replica (not BBBC021):")
    channels = [k[len("attention_"):] for k in summary["results"][0] if k.startswith("attention_")]
    width = max(34, *(len(r["model"]) + 1 for r in summary["results"]))
    print(f"  {'model':<{width}}{'NSC':>6}{'NSCB':>6}{'mAP':>6}   attention on cells "
          + " / ".join(channels))
    for r in summary["results"]:
        nscb = "  n/a" if r["nscb"] is None else f"{r['nscb']:.2f}"
        att = " / ".join(f"{r[f'attention_{c}']:.2f}" for c in channels if f"attention_{c}" in r)
        print(f"  {r['model']:<{width}}{r['nsc']:>6.2f}{nscb:>6}{r['map_nsc']:>6.2f}   {att}")
    print("  NSC / NSCB: share of treatments whose nearest other compound has the same MoA "
          "(NSCB: from another batch too); attention on cells: 1 = uniform, > 1 = on the cells.")
    if any(r["model"].startswith("init-only") for r in summary["results"]):
        print("  init-only: the initial weights the trained rows start from, before any "
              "fine-tuning (the gap to them is what this run's training added).")
    if summary.get("weak_label"):
        print(f"  weak label: {summary['weak_label']}")
    if summary["skipped"]:
        print(f"  (reused finished stages: {', '.join(summary['skipped'])})")
    print(f"Report: {summary['paths']['report']}")
    return 0
