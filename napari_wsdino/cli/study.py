"""train and evaluate init-only, DINO and WS-DINO per weak label

Run the WS-DINO paper's protocol on a preprocessed cache: an init-only baseline, plain
DINO and WS-DINO with each weak label, one model per channel with the same budget. A
teacher snapshot is kept every --snapshot-every epochs (the paper: 5) and every one is
evaluated (NSC / NSCB / mAP). The table gives mean and spread over seeds and the last
--last snapshots, and the paper's two numbers: the best epoch by NSC (Table 1; marked:
selected with MoA labels, the labels it is scored with) and the mean over every evaluated
epoch (Table 2); the report plots NSC / NSCB against epoch. --holdout-folds K adds the
honest MoA variant (compound-fold cross-validation). Interrupted studies resume.
"""

from __future__ import annotations

import json

from napari_wsdino.cli._common import command, drive
from napari_wsdino.core.fsio import writing
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
    p.add_argument("--snapshot-every", "--eval-every", dest="eval_every", type=int,
                   metavar="N", help="keep a teacher snapshot every N epochs and evaluate "
                   "each one (the paper: 5; default a fifth of the epochs)")
    p.add_argument("--last", type=int, default=3,
                   help="the last K snapshots per run give the mean ± sd columns (default 3; "
                   "0: all); the best epoch and the mean over epochs take every snapshot")
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
    print_table(result.rows, args.data_label)
    print(f"Report: {paths['html']}")
    return 0


def _ms(r: dict, m: str) -> str:
    mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
    return "n/a" if mean is None else f"{mean:.2f}±{std:.2f}"


def _pair(a, b) -> str:
    return "" if a is None else f"{a:.2f} / " + ("n/a" if b is None else f"{b:.2f}")


def print_table(rows: list[dict], data_label: str) -> None:
    """NSC / NSCB per model: last snapshots (mean ± sd), best epoch*, mean over epochs."""
    print(f"\nStudy on: {data_label}")
    print(f"  {'model':<34}{'NSC':>12}{'NSCB':>12}{'best epoch*: NSC / NSCB':>32}"
          f"{'over epochs: NSC / NSCB':>26}")
    for r in rows:
        best = "" if "best_epoch" not in r else (
            f"{r['best_epoch'].split()[0]}: {_pair(r['best_epoch_nsc'], r['best_epoch_nscb'])}")
        over = _pair(r.get("nsc_over_epochs"), r.get("nscb_over_epochs"))
        print(f"  {r['model'] + ' / ' + r['weak_label']:<34}{_ms(r, 'nsc'):>12}"
              f"{_ms(r, 'nscb'):>12}{best:>32}{over:>26}")
    print("  * best epoch by NSC, selected with the MoA labels it is scored with (the paper's "
          "Table 1); over epochs: mean over every snapshot (its Table 2)")
