"""Known SHA-256 hashes: read from a manifest file, or collected from fetched plates."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from napari_wsdino.core.fetch.options import COMPLETE_MARKER, FetchError


def load_manifest(path: str | Path) -> dict[str, str]:
    """Read known SHA-256 hashes: JSON ``{file name: hex}`` or ``sha256sum`` output.

    Example
    -------
    >>> hashes = load_manifest("BBBC021.sha256")  # doctest: +SKIP
    >>> options = FetchOptions(hashes=hashes)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FetchError(f"Cannot read manifest {path}: {exc}") from None
    hashes: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FetchError(f"Manifest {path} is not valid JSON: {exc}") from None
        items = data.items()
    else:
        items = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise FetchError(f"Manifest {path}: cannot read line {line!r}.")
            items.append((parts[1].lstrip("*").strip(), parts[0]))
    for name, digest in items:
        digest = str(digest).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise FetchError(f"Manifest {path}: {name!r} has no SHA-256 hex digest.")
        hashes[PurePosixPath(str(name)).name] = digest
    return hashes


def manifest_from_dest(dest: str | Path) -> dict[str, str]:
    """Hashes recorded in the ``.complete`` markers of ``dest``: archive -> SHA-256.

    Write them with ``json.dumps`` to share a manifest for later fetches.
    """
    out = {}
    for marker in sorted(Path(dest).glob(f"*/{COMPLETE_MARKER}")):
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("archive") and info.get("sha256"):
            out[info["archive"]] = info["sha256"]
    return out


__all__ = ["load_manifest", "manifest_from_dest"]
