"""``wsdino info DATA``: what a dataset holds, and what is missing or unreadable."""

from __future__ import annotations

import json

from napari_wsdino.cli._common import add_layout_option, layout_from_args
from napari_wsdino.core.imageio import check_readable
from napari_wsdino.core.metadata import load_metadata, summarise

LABELS = {
    "fields": "fields of view",
    "plates": "plates",
    "batches": "batches",
    "treatments": "treatments with MoA",
    "compounds": "compounds with MoA",
    "moas": "MoAs",
    "dmso_fields": "DMSO fields",
    "nscb_treatments": "NSCB treatments",
    "missing_files": "missing files",
    "unreadable_files": "unreadable files",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a dataset folder or image CSV",
        description="Summarise a BBBC021-layout dataset: fields, plates, batches, "
        "treatments, compounds, MoAs, DMSO fields, treatments eligible for NSCB "
        "(MoA seen in at least two batches), missing and unreadable image files.",
    )
    p.add_argument("data", help="dataset folder (holding BBBC021_v1_image.csv) or image CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-check", action="store_true",
                   help="metadata only: do not look for the image files")
    p.add_argument("--unannotated", choices=["error", "drop", "keep"], default="drop",
                   help="treatments with no MoA row (default: drop, and count the rest)")
    add_layout_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check = not args.no_check
    meta = load_metadata(args.data, layout_from_args(args), check_files=check,
                         drop_missing=True, unannotated=args.unannotated)
    table = meta.table
    unreadable = []
    if check and len(table):
        paths = [p for ch in meta.channels for p in table[f"path_{ch}"]]
        unreadable = check_readable(paths)
    # Count fields over the whole CSV, including those whose files are missing.
    if meta.dropped:
        full = load_metadata(args.data, layout_from_args(args), check_files=False,
                             unannotated=args.unannotated).table
    else:
        full = table
    summary = summarise(full, meta.missing, unreadable)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"Dataset: {args.data}")
    for key, label in LABELS.items():
        print(f"  {label:<22}{summary[key]:>8,}")
    for kind, paths in (("missing", meta.missing), ("unreadable", unreadable)):
        if paths:
            print(f"  first {kind}: " + ", ".join(str(p) for p in paths[:3]))
    return 0
