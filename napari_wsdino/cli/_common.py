"""Helpers shared by the subcommands: progress printing and layout options."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from napari_wsdino.core.metadata import ScreenLayout
from napari_wsdino.core.screens import LAYOUTS, resolve_layout
from napari_wsdino.core.progress import Progress, run_to_end


def command(sub, name: str, doc: str | None, **kwargs):
    """Register subcommand ``name`` from its module docstring: the first paragraph is the
    one-line ``--help`` summary, the second the description, any further ones the epilog."""
    paragraphs = [" ".join(par.split()) for par in (doc or name).strip().split("\n\n")]
    return sub.add_parser(name, help=paragraphs[0],
                          description=paragraphs[1] if len(paragraphs) > 1 else None,
                          epilog=" ".join(paragraphs[2:]) or None, **kwargs)


def add_layout_option(parser) -> None:
    parser.add_argument(
        "--layout",
        metavar="NAME|JSON",
        help=f"screen layout: {', '.join(LAYOUTS)}, or a JSON file mapping ScreenLayout "
        "fields, e.g. {\"plate_column\": \"Plate\", \"file_columns\": "
        "{\"DNA\": [\"FileName_DNA\", \"PathName_DNA\"]}} (default: detected from "
        "the folder: BBBC021_v1_image.csv or a Cell Painting load_data.csv)",
    )


def layout_from_args(args) -> ScreenLayout | None:
    """The ``--layout`` asked for (a name or a JSON file), or None: ``load_metadata`` detects it."""
    return resolve_layout(args.layout) if getattr(args, "layout", None) else None


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (not a pipe or a log file)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


#: Seconds between progress lines when the output is a log, not a terminal.
LOG_INTERVAL = 30.0


class ProgressPrinter:
    """Prints progress events: on a terminal, one self-overwriting bar per stage; in a
    log (stderr redirected), a plain line when a stage starts and ends and at most
    every ``interval`` seconds in between, not one per step."""

    def __init__(self, stream=None, quiet: bool = False, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.terminal = is_terminal(self.stream)
        self.interval = LOG_INTERVAL if interval is None else interval
        self._last_stage = None
        self._last_time = 0.0

    def __call__(self, event: Progress) -> None:
        if event.info.get("warning"):  # even when quiet; a line of its own, never overwritten
            if self.terminal and self._last_stage is not None:
                self.stream.write("\n")
                self._last_stage = None
            self.stream.write(f"warning: {event.info['warning']}\n")
            self.stream.flush()
            return
        if self.quiet:
            return
        if not self.terminal:
            self._log_line(event)
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

    def close(self) -> None:
        """End an unfinished bar line, so that what follows (an error) starts a line."""
        if self.terminal and self._last_stage is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._last_stage = None

    def _log_line(self, event: Progress) -> None:
        now = time.monotonic()
        finished = bool(event.total) and event.step >= event.total
        new_stage = event.stage != self._last_stage
        if not (new_stage or finished or now - self._last_time >= self.interval):
            return
        self._last_stage = None if finished else event.stage
        self._last_time = now
        total = f"/{event.total} ({100 * event.fraction:.0f}%)" if event.total else ""
        self.stream.write(f"{event.stage}: {event.step}{total} {event.message}\n".replace(" \n", "\n"))
        self.stream.flush()


def drive(gen, quiet: bool = False):
    """Run a core generator to its end with a progress bar; return its result."""
    printer = ProgressPrinter(quiet=quiet)
    try:
        return run_to_end(gen, printer)
    finally:
        printer.close()


