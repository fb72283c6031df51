"""summarise a dataset folder or image CSV

Summarise a screen (a BBBC021-layout folder or a Cell Painting load_data.csv): fields,
plates, batches, treatments, compounds, compounds imaged in two or more batches (the only
ones whose WS-DINO pairs can cross a batch), MoAs, DMSO fields, treatments eligible for NSCB
(MoA seen in at least two batches), missing and unreadable image files.
"""

from __future__ import annotations

import json

from napari_wsdino.cli._common import add_layout_option, command, layout_from_args
from napari_wsdino.core.imageio import image_problems
from napari_wsdino.core.metadata import UNANNOTATED, load_metadata, summarise

LABELS = {
    "fields": "fields of view",
    "plates": "plates",
    "batches": "batches",
    "treatments": "treatments with MoA",
    "compounds": "compounds with MoA",
    "compounds_multi_batch": "compounds in 2+ batches",
    "moas": "MoAs",
    "dmso_fields": "DMSO fields",
    "nscb_treatments": "NSCB treatments",
    "missing_files": "missing files",
    "unreadable_files": "unreadable files",
    "unannotated_fields": "fields without MoA",
}


def add_parser(sub) -> None:
    p = command(sub, "info", __doc__)
    p.add_argument("data", help="dataset folder (holding BBBC021_v1_image.csv) or image CSV")
    p.add_argument("--no-check", action="store_true",
                   help="metadata only: do not look for the image files")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--unannotated", choices=UNANNOTATED, default="drop",
                   help="treatments with no MoA row (default: drop, and count the rest)")
    add_layout_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check = not args.no_check
    meta = load_metadata(args.data, layout_from_args(args), check_files=check,
                         drop_missing=True, unannotated=args.unannotated)
    table = meta.table
    problems = []
    if check and len(table):
        # What preprocess would leave out: unreadable, RGB, other size or pixel type.
        paths = [p for ch in meta.channels for p in table[f"path_{ch}"]]
        problems = image_problems(paths)
    unreadable = [p for p, _ in problems]
    # Count fields over the whole CSV, including those whose files are missing.
    if meta.dropped:
        full = load_metadata(args.data, layout_from_args(args), check_files=False,
                             unannotated=args.unannotated).table
    else:
        full = table
    summary = summarise(full, meta.missing, unreadable)
    summary["unannotated_fields"] = meta.no_moa
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"Dataset: {args.data}")
    for key, label in LABELS.items():
        print(f"  {label:<24}{summary[key]:>8,}")
    if meta.missing:
        print("  first missing: " + ", ".join(str(p) for p in meta.missing[:3]))
    for path, reason in problems[:3]:
        print(f"  unreadable: {path} ({reason})")
    if meta.no_moa:
        kept = "kept unlabelled" if args.unannotated == "keep" else "left out of the counts"
        print(f"  {meta.no_moa} field(s) have a treatment with no MoA row ({kept}); "
              "'wsdino preprocess' refuses them unless given --unannotated drop or keep")
    return 0
