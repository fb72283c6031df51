"""``wsdino fetch-bbbc021 DEST``: download, verify and unpack the real BBBC021 plates."""

from __future__ import annotations

import sys
import time

from napari_wsdino.cli._common import LOG_INTERVAL, is_terminal
from napari_wsdino.core.fetch import (
    DEFAULT_BASE_URL,
    SUBSETS,
    FetchError,
    FetchOptions,
    check_space,
    fetch_metadata,
    fetch_plates,
    format_bytes,
    load_manifest,
    plan_fetch,
    select_plates,
)
from napari_wsdino.core.progress import Progress, run_to_end


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fetch-bbbc021",
        aliases=["fetch"],
        help="download, verify and unpack the real BBBC021 plates",
        description="Download the BBBC021 metadata tables and per-plate image archives "
        "(BBBC021_v1_images_<plate>.zip) from the Broad Bioimage Benchmark Collection, "
        "check each archive (size, SHA-256 when known, zip test), and unpack it to "
        "DEST/<plate>/ where `wsdino info DEST` and the loader find it. Partial downloads "
        "are resumed: after a failure, rerun the same command. The full set is about "
        "40 GB zipped (~105 GB unpacked).",
        epilog="Example: wsdino fetch-bbbc021 BBBC021 --plates Week1_22123 Week1_22141",
    )
    p.add_argument("dest", help="folder to fetch into (created); metadata CSVs go to its top")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--plates", nargs="+", metavar="PLATE",
                       help="plates to fetch, e.g. Week1_22123 Week10_40111")
    which.add_argument("--subset", choices=list(SUBSETS),
                       help="moa: the plates of the bundled MoA-annotated field table "
                       "(the 55 plates WS-DINO uses)")
    which.add_argument("--all", dest="all_plates", action="store_true",
                       help="every plate of the official image CSV")
    p.add_argument("--metadata-only", action="store_true",
                   help="fetch only the metadata CSVs")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="folder URL of the files, for mirrors: https://, http:// or file:// "
                   f"(default {DEFAULT_BASE_URL})")
    p.add_argument("--manifest", metavar="FILE",
                   help="known SHA-256 hashes: JSON {file: hex} or `sha256sum` output")
    p.add_argument("--keep-zips", action="store_true",
                   help="keep the archives in DEST/.downloads after unpacking")
    p.add_argument("--retries", type=int, default=FetchOptions.retries,
                   help="extra attempts per file, each resuming the partial file "
                   f"(default {FetchOptions.retries})")
    p.add_argument("--timeout", type=float, default=FetchOptions.timeout,
                   help="seconds a silent connection is waited on, above 0 "
                   f"(default {FetchOptions.timeout:g})")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do not ask before downloading (needed when not run interactively)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class FetchPrinter:
    """Overall and per-file progress bars on one self-overwriting line; in a log (not a
    terminal) a plain line per plate and phase, and at most every ``LOG_INTERVAL`` s."""

    def __init__(self, stream=None, quiet: bool = False, width: int = 20):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.width = width
        self._last = None
        self.terminal = is_terminal(self.stream)
        self._logged = (None, 0.0, False)

    def _bar(self, fraction: float) -> str:
        done = int(self.width * min(max(fraction, 0.0), 1.0))
        return "#" * done + "-" * (self.width - done)

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        info = event.info
        phase = info.get("phase")
        if event.stage == "metadata" or phase in ("failed", "plan"):
            self._newline()
            self.stream.write(f"{event.message}\n")
            self.stream.flush()
            return
        if event.stage != "fetch":
            return
        file_total = info.get("file_total") or 0
        file_frac = info.get("file_done", 0) / file_total if file_total else 0.0
        if not self.terminal:
            self._log_line(event, (info.get("plate"), phase), file_frac)
            return
        key = (info.get("plate"), phase, int(100 * event.fraction), int(100 * file_frac))
        if key == self._last:
            return
        self._last = key
        line = (f"\r overall [{self._bar(event.fraction)}] {format_bytes(event.step)}"
                f"/{format_bytes(event.total)}  {info.get('plate', '')} "
                f"({info.get('plate_index', '?')}/{info.get('plates', '?')}) {phase or ''} "
                f"[{self._bar(file_frac)}] {100 * file_frac:3.0f}%")
        self.stream.write(f"{line:<110}")
        self.stream.flush()

    def _log_line(self, event: Progress, what: tuple, file_frac: float) -> None:
        """A line when a plate's phase starts and ends, and at most every LOG_INTERVAL s."""
        now = time.monotonic()
        last_what, last_time, last_done = self._logged
        done = file_frac >= 1.0
        if what == last_what and (done == last_done) and now - last_time < LOG_INTERVAL:
            return
        self._logged = (what, now, done)
        info = event.info
        self.stream.write(f"overall [{self._bar(event.fraction)}] {format_bytes(event.step)}"
                          f"/{format_bytes(event.total)}  {info.get('plate', '')} "
                          f"({info.get('plate_index', '?')}/{info.get('plates', '?')}) "
                          f"{what[1] or ''} {100 * file_frac:.0f}%\n")
        self.stream.flush()

    def _newline(self) -> None:
        if self._last is not None:
            self.stream.write("\n")
            self._last = None

    def close(self) -> None:
        if not self.quiet:
            self._newline()


def _confirm(summary: str) -> bool:
    sys.stderr.write(summary + "\nDownload now? [y/N] ")
    sys.stderr.flush()
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run(args) -> int:
    if args.retries < 0:  # before any request
        raise FetchError(f"--retries is how many times to try again, 0 or more, not "
                         f"{args.retries}.")
    hashes = load_manifest(args.manifest) if args.manifest else {}
    options = FetchOptions(base_url=args.base_url, retries=args.retries,
                           timeout=args.timeout, keep_zips=args.keep_zips, hashes=hashes)
    printer = FetchPrinter(quiet=args.quiet)
    chosen = bool(args.plates) or args.subset is not None or args.all_plates
    if not chosen and not args.metadata_only:
        raise FetchError("Say which plates to fetch: --plates PLATE ..., --subset moa or "
                         "--all (or --metadata-only for the CSVs alone).")
    metadata = run_to_end(fetch_metadata(args.dest, options), printer)
    if args.metadata_only:
        print(f"Metadata in {args.dest}: " + ", ".join(p.name for p in metadata))
        return 0
    names = select_plates(args.dest, plates=args.plates, subset=args.subset,
                          all_plates=args.all_plates)
    plan = plan_fetch(args.dest, names, options)
    print(plan.summary())
    if not plan.pending:
        print("Nothing to do: every selected plate is complete.")
        return 0
    check_space(plan)
    if not args.yes:
        if not sys.stdin.isatty():
            raise FetchError("Not run interactively: add --yes to start the download.")
        if not _confirm("Continue with the download above?"):
            print("Nothing downloaded.")
            return 1
    try:
        result = run_to_end(fetch_plates(plan), printer)
    except FetchError:
        printer.close()
        raise
    printer.close()
    print(f"Done: {len(result.completed)} plate(s) fetched, {len(result.skipped)} already "
          f"complete, {format_bytes(result.bytes_downloaded)} downloaded into {args.dest}.")
    print(f"Next: wsdino info {args.dest}")
    return 0
