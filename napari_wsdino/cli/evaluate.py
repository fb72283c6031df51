"""NSC / NSCB MoA matching, mAP and confusion matrices of a profile file

Evaluate field-level profiles (Parquet or CSV; Metadata_* columns, the rest features):
typical variation normalisation on the DMSO fields, mean per (treatment, plate), median
across plates, then not-same-compound (NSC) and not-same-compound-and-batch (NSCB) 1-NN MoA
matching by cosine similarity, k-NN accuracy and mAP, in blocks of queries with bounded
memory (hundreds of thousands of treatments fit). See docs/evaluation.md for the exact rules.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from napari_wsdino.cli._common import command, drive
from napari_wsdino.core.evaluate_workflow import evaluation_state
from napari_wsdino.core.fsio import output_lock
from napari_wsdino.core.evaluation import (DEFAULT_KS, UNANNOTATED, EvaluationResult,
                                           iter_evaluate)
from napari_wsdino.core.metadata import DataError
from napari_wsdino.core.profiles import ProfileTable
from napari_wsdino.core.tvn import METHODS, TVN_METHODS


def _shrinkage(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--shrinkage must be 'auto' or a number in [0, 1], not {text!r}") from None


def add_parser(sub) -> None:
    p = command(sub, "evaluate", __doc__)
    p.add_argument("profiles", help="field-level profile file (.parquet, .csv, .csv.gz, .tsv)")
    from napari_wsdino.core.metrics import NSCB_MULTIBATCH
    from napari_wsdino.core.recipes import DEFAULT_RECIPE, RECIPES

    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="defaults of --tvn/--nscb-multibatch: default (paper, exempt) or "
                   "paper-code (per-channel, official)")
    p.add_argument("--tvn", choices=METHODS, default=None,
                   help="typical variation normalisation: "
                   + "; ".join(f"'{m.name}': {m.help}" for m in TVN_METHODS.values())
                   + " (default: the recipe's)")
    p.add_argument("--nscb-multibatch", choices=NSCB_MULTIBATCH, default=None,
                   help="NSCB for a treatment seen in several batches (BBBC021's taxol): exempt "
                   "from the batch rule, or official (median batch code of its plates, rule "
                   "applied, as WS-DINO's Eval_BBBC021.py); default: the recipe's")
    p.add_argument("--shrinkage", default="auto", type=_shrinkage,
                   help="DMSO covariance shrinkage: 'auto' (Ledoit-Wolf, only when the "
                   "covariance is singular) or a number in [0, 1]")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), metavar="K",
                   help="k values for k-NN MoA accuracy (default: 1 3 5)")
    p.add_argument("--no-nscb", action="store_true",
                   help="NSC only (for data from a single batch)")
    p.add_argument("--unannotated", choices=UNANNOTATED, default=UNANNOTATED[0],
                   help="treated profiles with an empty Metadata_MoA (default: error)")
    p.add_argument("--drop-constant", action="store_true",
                   help="drop features that are constant over all profiles")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", metavar="DIR",
                   help="write treatment_profiles.csv, neighbours.csv, confusion_nsc[b].csv "
                   "and .png, per_moa.png and metrics.json here, then complete.json: an "
                   "interrupted run leaves an earlier set whole")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def write_outputs(result: EvaluationResult, out: str | Path) -> list[Path]:
    """Write an evaluation's tables, figures and JSON into a folder, as one set that an
    interruption cannot mix with an earlier one; returns the paths."""
    from napari_wsdino.core.evaluate_workflow import write_evaluation

    return write_evaluation(result, out)


#: Features above which a whitening TVN is warned about (its covariance is F x F).
WIDE = 2_000


def _size_warning(profiles: ProfileTable, tvn: str) -> str | None:
    """A warning when whitening ``profiles`` is slow and ill-posed: many more features
    than DMSO fields to estimate their F x F covariance from."""
    n, dmso = profiles.n_features, int(profiles.is_control().sum())
    if n <= WIDE or not TVN_METHODS[tvn].whiten or TVN_METHODS[tvn].per_channel:
        return None
    gb = 3 * 8 * n * n / 1e9  # covariance, its eigenvectors and the whitening matrix
    few = " (fewer fields than features: it is shrunk, not estimated)" if dmso < n else ""
    return (f"{n:,} features whitened from {dmso:,} DMSO fields (--tvn {tvn}): a {n:,} x {n:,} "
            f"covariance{few}, about {gb:.1f} GB and minutes of CPU; reduce the features "
            "first (e.g. PCA) or use --tvn per-channel or none.")


def _k_warnings(ks, n_treatments: int) -> list[str]:
    """k values with no meaning for ``n_treatments``: more neighbours than there are."""
    over = sorted(k for k in set(ks) if k >= n_treatments)
    if not over:
        return []
    return [f"--k {', '.join(map(str, over))}: at least as many neighbours as the "
            f"{n_treatments} treatments, so every treatment votes and k-NN accuracy is the "
            f"share of the commonest MoA; use k below {n_treatments} (e.g. 1 3 5)."]


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{x:6.1%}"


def run(args) -> int:
    from napari_wsdino.core.recipes import evaluate_settings

    given = {k: getattr(args, k) for k in ("tvn", "nscb_multibatch")
             if getattr(args, k, None) is not None}
    settings = evaluate_settings(args.recipe, **given)
    if min(args.k) < 1:  # before reading the profiles
        raise DataError(f"--k takes neighbour counts of at least 1 (e.g. --k 1 3 5), "
                        f"not {min(args.k)}.")
    if args.out:  # refused now, not after the evaluation, when another writer holds it
        with warnings.catch_warnings():  # a file system without locks: said once, at write
            warnings.simplefilter("ignore", RuntimeWarning)
            with output_lock(args.out, "this evaluation"):
                pass
    profiles = ProfileTable.read(args.profiles)
    warning = _size_warning(profiles, settings.tvn)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    result = drive(
        iter_evaluate(profiles, settings.tvn, shrinkage=args.shrinkage, ks=args.k,
                      nscb=not args.no_nscb, unannotated=args.unannotated,
                      drop_constant=args.drop_constant,
                      nscb_multibatch=settings.nscb_multibatch),
        quiet=args.quiet or args.json,
    )
    for warning in _k_warnings(args.k, len(result.treatments)):
        print(f"warning: {warning}", file=sys.stderr)
    if args.out and evaluation_state(args.out) == "incomplete":
        print(f"note: {args.out} held an incomplete result set (an interrupted run, or one "
              "written before sets were marked complete); it is replaced.", file=sys.stderr)
    written = write_outputs(result, args.out) if args.out else []
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"Profiles: {args.profiles}  ({result.n_fields:,} fields, {result.n_dmso_fields:,} DMSO, "
          f"{result.n_features:,} features, TVN {result.tvn})")
    print(f"  NSC   {_pct(result.nsc)}  ({result.n_nsc} treatments)   mAP {_pct(result.map_nsc)}")
    if result.nscb is not None:
        print(f"  NSCB  {_pct(result.nscb)}  ({result.n_nscb} treatments)   mAP {_pct(result.map_nscb)}")
    for rule, acc in result.knn.items():
        ks = "  ".join(f"k={k}: {_pct(v).strip()}" for k, v in acc.items())
        print(f"  {rule.upper()} k-NN  {ks}")
    for note in result.notes:
        print(f"  note: {note}")
    if written:
        print(f"Wrote {len(written)} files to {args.out}")
    return 0
