"""Helpers shared by the subcommands: progress printing and layout options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from napari_wsdino.core.metadata import DataError, ScreenLayout
from napari_wsdino.core.progress import Progress, run_to_end


def add_layout_option(parser) -> None:
    parser.add_argument(
        "--layout",
        metavar="JSON",
        help="screen layout for non-BBBC021 CSVs: a JSON file mapping ScreenLayout "
        "fields, e.g. {\"plate_column\": \"Plate\", \"file_columns\": "
        "{\"DNA\": [\"FileName_DNA\", \"PathName_DNA\"]}}",
    )


def layout_from_args(args) -> ScreenLayout:
    if not getattr(args, "layout", None):
        return ScreenLayout()
    try:
        mapping = json.loads(Path(args.layout).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read layout file {args.layout}: {exc}") from None
    return ScreenLayout.from_mapping(mapping)


class ProgressPrinter:
    """Prints progress events as one self-overwriting line per stage."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._last_stage = None

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        if self._last_stage not in (None, event.stage):
            self.stream.write("\n")
        self._last_stage = event.stage
        width = 30
        done = int(width * event.fraction)
        bar = "#" * done + "-" * (width - done)
        total = f"/{event.total}" if event.total else ""
        self.stream.write(f"\r{event.stage:>10} [{bar}] {event.step}{total} {event.message[:60]:<60}")
        if event.total and event.step >= event.total:
            self.stream.write("\n")
            self._last_stage = None
        self.stream.flush()


def drive(gen, quiet: bool = False):
    """Run a core generator to its end with a progress bar; return its result."""
    return run_to_end(gen, ProgressPrinter(quiet=quiet))
