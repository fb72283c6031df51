"""train and evaluate init-only, DINO and WS-DINO per weak label

Run the WS-DINO paper's protocol on a preprocessed cache: an init-only baseline, plain
DINO and WS-DINO with each weak label, one model per channel with the same budget; teacher
snapshots are evaluated (NSC / NSCB / mAP) and the table gives mean and spread over seeds
and the last evaluated epochs, plus the paper's best-epoch number (marked: selected with
MoA labels). --holdout-folds K adds the honest MoA variant (compound-fold
cross-validation). Interrupted studies resume.
"""

from __future__ import annotations

import json

from napari_wsdino.cli._common import command, drive, writing
from napari_wsdino.core.presets import PRESETS
from napari_wsdino.core.pretrained import DEFAULT_INIT
from napari_wsdino.core.report import SYNTHETIC_LABEL
from napari_wsdino.core.study import run_study, study_report


def add_parser(sub) -> None:
    p = command(sub, "study", __doc__)
    p.add_argument("cache", help="preprocessed cache folder (wsdino preprocess --out)")
    p.add_argument("--out", default="wsdino_study", help="study folder (default: wsdino_study)")
    p.add_argument("--labels", default="none,treatment,compound,moa",
                   help="comma-separated weak labels (default: none,treatment,compound,moa)")
    from napari_wsdino.core.recipes import DEFAULT_RECIPE, RECIPES

    p.add_argument("--init", default="", help="initial weights for every model (ours, timm or "
                   "official DINO file, or a bundled name), or 'random'. Default: the preset's "
                   f"(cpu, cpu-hires: the bundled {DEFAULT_INIT}). Required with preset gpu or "
                   "--recipe paper-code (say 'random' to train from random weights on purpose)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="bundle of training, embedding and evaluation settings (docs/fidelity.md)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per label (default 1)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="",
                   help="model and training size (default: the one whose views fit the "
                   "cache's fields: cpu-hires from 320 px, as the default demo's 320 x 400 "
                   "cache; cpu from 64 px, as the 160 x 200 one of --preset cpu; gpu from "
                   "448 px, which needs --init; test below 64 px)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--eval-every", type=int, help="epochs between evaluated snapshots")
    p.add_argument("--last", type=int, default=3, help="evaluated epochs averaged per run (default 3)")
    p.add_argument("--holdout-folds", type=int, default=0,
                   help="K > 1: also train with the MoA labels of 1/K of the compounds hidden, "
                   "scoring only those compounds (honest MoA weak label)")
    p.add_argument("--channels", help="comma-separated channels (default: all in the cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--data-label", default=SYNTHETIC_LABEL,
                   help=f"what the cache holds, shown in the report (default: {SYNTHETIC_LABEL})")
    p.add_argument("--json", action="store_true", help="print the summary table as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    overrides = {"epochs": args.epochs} if args.epochs else {}
    with writing(args.out, "this study"):  # a second study on --out is refused
        result = drive(run_study(args.cache, args.out, labels, seeds=args.seeds, init=args.init,
                                 preset=args.preset, eval_every=args.eval_every,
                                 last_k=args.last, holdout_folds=args.holdout_folds,
                                 device=args.device, recipe=args.recipe,
                                 channels=args.channels.split(",") if args.channels else None,
                                 **overrides))
        paths = study_report(result, args.data_label)
    if args.json:
        print(json.dumps(result.rows, indent=2))
        return 0
    print(f"\nStudy on: {args.data_label}")
    print(f"  {'model':<34}{'NSC':>14}{'NSCB':>14}")
    for r in result.rows:
        def ms(m):
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            return "n/a" if mean is None else f"{mean:.2f}±{std:.2f}"
        print(f"  {r['model'] + ' / ' + r['weak_label']:<34}{ms('nsc'):>14}{ms('nscb'):>14}")
    print(f"Report: {paths['html']}")
    return 0
