"""HTTP (and ``file://``) downloads that resume with ``Range`` and retry with back-off."""

from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Generator, Mapping

from napari_wsdino import __version__
from napari_wsdino.core.fetch.options import (
    _RESUME_HINT,
    FetchError,
    FetchOptions,
    format_bytes,
)
from napari_wsdino.core.fsio import describe_os_error
from napari_wsdino.core.progress import Progress

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _request(url: str, method: str = "GET", headers: Mapping[str, str] | None = None):
    hdrs = {"User-Agent": f"napari-wsdino/{__version__}", "Accept-Encoding": "identity"}
    hdrs.update(headers or {})
    return urllib.request.Request(url, method=method, headers=hdrs)


def remote_size(url: str, timeout: float = 30.0) -> int | None:
    """Size of a remote file from a ``HEAD`` request, ``None`` if the server won't say.

    Raises
    ------
    FetchError
        The server answers 404 (the file is not there), or does not answer within
        ``timeout`` (a stalled server would stall the download too; guessing a size
        instead would hide it, once per plate).
    """
    try:
        with urllib.request.urlopen(_request(url, "HEAD"), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FetchError(
                f"{url} does not exist (HTTP 404). Check --base-url: it must be the "
                "folder holding the BBBC021 files.", url=url,
            ) from None
        return None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, (TimeoutError, socket.timeout)) or isinstance(
                reason, (TimeoutError, socket.timeout)):
            raise FetchError(
                f"The server did not answer a size request for {url} within {timeout:g} s "
                "(stalled or unreachable): check the connection and --base-url and rerun, "
                "or allow longer with --timeout.", url=url,
            ) from None
        return None
    try:
        return int(length) if length is not None else None
    except ValueError:
        return None


class _Retry(Exception):
    """One attempt of a transfer failed in a way a retry may mend."""


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    if not value:
        return None
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _transfer(
    url: str, part: Path, have: int, expected: int | None, options: FetchOptions,
    event: Callable[[int, int | None], Progress],
) -> Generator[Progress, None, int | None]:
    """One attempt: append from byte ``have`` of ``url`` to ``part``; return the total
    size the server announced (``None`` if it did not). Raises :class:`_Retry`."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(_request(url, headers=headers), timeout=options.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Range past the end: the partial file is already whole, or too long.
            span = exc.headers.get("Content-Range", "") if exc.headers else ""
            m = re.search(r"/(\d+)", span)
            total = int(m.group(1)) if m else expected
            if total is not None and have == total:
                return total
            part.unlink(missing_ok=True)
            raise _Retry(f"server refused to resume at byte {have} (HTTP 416)") from None
        if exc.code in (404, 403, 410):
            raise FetchError(f"HTTP {exc.code} {exc.reason}", url=url) from None
        raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
    with resp:
        status = getattr(resp, "status", 200)
        ctype = (resp.headers.get("Content-Type") or "").lower()
        if ctype.startswith("text/html") and not url.lower().endswith((".htm", ".html")):
            raise FetchError(
                "the server answered with a web page instead of the file (the download "
                "layout may have changed, or a login or error page is in the way)"
            )
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        mode = "ab"
        if have and status == 206:
            span = _content_range(resp.headers.get("Content-Range"))
            if span is None or span[0] != have:
                part.unlink(missing_ok=True)
                raise _Retry("server resumed at the wrong byte "
                             f"({resp.headers.get('Content-Range')})")
            total = span[1]
            if total is None and length is not None:
                total = have + length
        else:
            if have:
                # The server ignored the Range header and sends the whole file.
                have, mode = 0, "wb"
            total = length
        got = yield from _copy_body(resp, part, mode, have, total, options, event)
        yield event(got, total)
        if total is not None and got < total:
            raise _Retry(f"connection closed after {got} of {total} bytes")
        if total is not None and got > total:
            part.unlink(missing_ok=True)
            raise _Retry(f"server sent {got} bytes, more than the announced {total}")
        return total


def _copy_body(resp, part: Path, mode: str, have: int, total: int | None,
               options: FetchOptions, event: Callable[[int, int | None], Progress],
               ) -> Generator[Progress, None, int]:
    """Write the response body to ``part`` (``mode`` "ab" to append after ``have``
    bytes, "wb" to start over), one event per chunk; return the bytes now in ``part``."""
    got = have
    last = have
    try:
        with open(part, mode) as fh:
            while True:
                try:
                    chunk = resp.read1(options.chunk_size)
                except (TimeoutError, socket.timeout) as exc:
                    raise _Retry(f"connection silent for {options.timeout:g} s ({exc})") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(f"connection dropped ({type(exc).__name__}: {exc})") from None
                if not chunk:
                    break
                fh.write(chunk)
                got += len(chunk)
                if got - last >= options.chunk_size:
                    last = got
                    fh.flush()
                    yield event(got, total)
    except OSError as exc:  # the disk, not the network: name the file (write() names none)
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(part)) from None
        raise
    return got


def download(
    url: str,
    target: str | Path,
    *,
    expected_size: int | None = None,
    options: FetchOptions = FetchOptions(),
    plate: str | None = None,
    on_bytes: Callable[[int, int | None], Progress] | None = None,
) -> Generator[Progress, None, Path]:
    """Download ``url`` to ``target`` through ``target.part``, resuming with ``Range``.

    A partial ``.part`` file left by an earlier run or attempt is continued, not
    restarted. After ``options.retries`` failed attempts the ``.part`` file is kept
    and :class:`FetchError` says how to resume.

    Yields
    ------
    Progress
        ``stage="download"``, ``step``/``total`` the bytes of this file (or what
        ``on_bytes(done, total)`` makes of them).

    Returns
    -------
    Path
        ``target``, complete (size checked against the server's length).
    """
    target = Path(target)
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name

    def event(done: int, total: int | None) -> Progress:
        if on_bytes is not None:
            return on_bytes(done, total)
        return Progress("download", done, total or 0, f"{name} {format_bytes(done)}",
                        {"file": name, "plate": plate, "url": url})

    last_error = "no attempt made"
    attempts = options.retries + 1
    for attempt in range(attempts):
        if attempt:
            # Wait before a retry, yielding so that a stopped worker stops here too.
            have = part.stat().st_size if part.exists() else 0
            yield from _pause(min(options.retry_wait * 2 ** (attempt - 1), 60.0),
                              event(have, expected_size))
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        if expected_size is not None and have == expected_size and have > 0:
            break
        try:
            total = yield from _transfer(url, part, have, expected_size, options, event)
        except (_Retry, FetchError, urllib.error.URLError, OSError,
                http.client.HTTPException) as exc:
            last_error = _retry_reason(exc, url, plate)
            continue
        if total is not None:
            expected_size = total
        break
    else:
        raise _gave_up(url, part, expected_size, attempts, last_error, plate)
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:  # pragma: no cover - guarded above
        raise FetchError(
            f"{_who(plate)}{url}: got {size} of {expected_size} bytes; {_RESUME_HINT}.",
            plate=plate, url=url)
    os.replace(part, target)
    return target


def _retry_reason(exc: Exception, url: str, plate: str | None) -> str:
    """Why an attempt failed, for the next retry; raises :class:`FetchError` instead
    when retrying cannot mend it (a missing file, our own disk full or read-only)."""
    if isinstance(exc, _Retry):
        return str(exc)
    if isinstance(exc, FetchError):
        raise FetchError(
            f"{_who(plate)}cannot download {url}: {exc}. Check the URL and --base-url.",
            plate=plate, url=url,
        ) from None
    reason = getattr(exc, "reason", exc)
    disk = describe_os_error(exc) if isinstance(exc, OSError) and exc.filename else None
    if disk:  # our disk (full, read-only): retrying would not mend it
        raise FetchError(f"{_who(plate)}{disk}", plate=plate, url=url) from None
    if isinstance(reason, FileNotFoundError):  # file:// mirror without the file
        raise FetchError(f"{_who(plate)}{url} does not exist. Check --base-url.",
                         plate=plate, url=url) from None
    return f"{type(exc).__name__}: {reason}"


def _gave_up(url: str, part: Path, expected_size: int | None, attempts: int,
             last_error: str, plate: str | None) -> FetchError:
    """The error after the last attempt: what failed, what is kept, how to resume."""
    have = part.stat().st_size if part.exists() else 0
    of = f" of {expected_size}" if expected_size is not None else ""
    kept = (f"{have}{of} bytes are kept in {part}; {_RESUME_HINT}" if have
            else f"nothing was downloaded; check the connection and {_RESUME_HINT}")
    return FetchError(
        f"{_who(plate)}download of {url} failed after {attempts} attempt(s): "
        f"{last_error}. {kept}.",
        plate=plate, url=url,
    )


def _pause(seconds: float, event: Progress) -> Generator[Progress, None, None]:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
        yield event


def _who(plate: str | None) -> str:
    return f"Plate {plate}: " if plate else ""


__all__ = ["download", "remote_size"]
