"""The ``wsdino`` command: parses arguments, calls the core, prints progress.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers itself with ``func=run``. Every name in
:data:`SUBCOMMANDS` must have its module: a missing one raises :class:`ImportError`
(a packaging bug) instead of dropping the command from ``wsdino --help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from napari_wsdino import __version__

# Order shown in `wsdino --help`: the workflow order.
SUBCOMMANDS = (
    "info",
    "synth",
    "preprocess",
    "train",
    "embed",
    "evaluate",
    "attention",
    "demo",
    "study",
    "fetch",
)


#: Command names that are not module names (``fetch-bbbc021`` lives in ``cli/fetch.py``).
ALIASES = {"fetch-bbbc021": "fetch"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``wsdino`` parser with every subcommand, or with ``only`` that one (its module
    alone is imported: ``wsdino evaluate`` never loads torch)."""
    parser = argparse.ArgumentParser(
        prog="wsdino",
        description=(
            "WS-DINO for high-content cell screens: load plates (BBBC021 layout or a "
            "Cell Painting load_data.csv), "
            "preprocess, train DINO / WS-DINO, embed, and evaluate NSC / NSCB MoA "
            "matching. The same core runs the napari plugin."
        ),
        epilog="Run 'wsdino COMMAND --help' for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"wsdino {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else SUBCOMMANDS:
        _subcommand_module(name).add_parser(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand module ``argv`` asks for (its first word), if it names one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    name = ALIASES.get(first, first)
    return name if name in SUBCOMMANDS and argv and argv[0] == first else None


def _subcommand_module(name: str):
    """The module of one entry of :data:`SUBCOMMANDS`; a missing one is an error (a
    broken installation), never a command silently left out of ``wsdino --help``."""
    qualified = f"napari_wsdino.cli.{name}"
    try:
        return importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            raise  # a module the command imports is missing: the original error names it
        raise ImportError(
            f"wsdino: the module of subcommand {name!r} ({qualified}) is missing, so this "
            "installation of napari-wsdino is incomplete. Reinstall it "
            "(pip install --force-reinstall napari-wsdino, or pip install -e . in a checkout); "
            f"if the command was retired, remove {name!r} from "
            "napari_wsdino.cli.SUBCOMMANDS.",
            name=qualified,
        ) from exc


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a user reads it: ``wsdino: warning: MESSAGE`` (no file, line, code)."""
    return f"wsdino: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from napari_wsdino.core.fsio import describe_os_error
    from napari_wsdino.core.imageio import ImageReadError
    from napari_wsdino.core.metadata import DataError
    from napari_wsdino.core.errors import CheckpointError

    shown, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"wsdino {args.command}: interrupted; finished work is kept.", file=sys.stderr)
        return 130
    except Exception as exc:
        # The disk (full, read-only, ...) first: it hides behind other errors
        # (torch.save's RuntimeError, a broken worker pool).
        message = describe_os_error(exc)
        if message is None and isinstance(
            exc, (DataError, ImageReadError, CheckpointError, FileNotFoundError, FileExistsError)
        ):
            message = str(exc)
        if message is None:
            raise
        print(f"wsdino {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
