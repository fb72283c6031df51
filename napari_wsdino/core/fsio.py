"""File-system faults as one-line messages, and writes that leave no debris.

Every command and panel writes results somewhere the user chose. When that fails
because of the disk (full, read-only, not ours, a file where a folder should be),
the user needs the path, the cause and the fix on one line, not ``OSError`` or a
PyTorch ``enforce fail`` traceback. :func:`describe_os_error` finds the OS error in an
exception (also one raised *during* another, as ``torch.save`` does) and words it;
:func:`atomic_write` and :func:`remove_on_failure` keep half-written files off the disk.

Example
-------
>>> import errno
>>> exc = OSError(errno.ENOSPC, "No space left on device", "/data/cache/images_DAPI.npy")
>>> print(describe_os_error(exc))  # doctest: +NORMALIZE_WHITESPACE
No space left on the disk holding /data/cache/images_DAPI.npy: free space there or
write to another folder on a larger disk; finished work is kept and a rerun
resumes from it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: The errors this module words; others keep their own message.
FILE_SYSTEM_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
     errno.EISDIR, errno.EEXIST, errno.EFBIG}
)


#: numpy's ``tofile`` on a full disk: ``OSError("81920 requested and 36832 written")``.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The first file-system :class:`OSError` in ``exc`` or its causes / contexts.

    ``torch.save`` on a full disk raises ``RuntimeError('[enforce fail ...]')`` while
    handling ``OSError(ENOSPC)``; worker processes raise the OSError itself; numpy
    reports a short write without an errno (taken as ENOSPC: a regular file takes
    every byte it is given unless the disk or a quota is full).
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FILE_SYSTEM_ERRNOS:
            return exc
        if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(str(exc)):
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({exc})")
        exc = exc.__cause__ or exc.__context__
    return None


def _where(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else exc.filename2
    return str(name) if name is not None else "the output folder"


def describe_os_error(exc: BaseException) -> str | None:
    """One line naming the path, the cause and the fix; ``None`` if ``exc`` holds no
    file-system error (see :data:`FILE_SYSTEM_ERRNOS`)."""
    err = find_os_error(exc)
    if err is None:
        return None
    where = _where(err)
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        cause = "No space left" if code == errno.ENOSPC else "Disk quota or file size limit reached"
        return (f"{cause} on the disk holding {where}: free space there or write to another "
                "folder on a larger disk; finished work is kept and a rerun resumes from it.")
    if code == errno.EROFS:
        return (f"{where} is on a read-only file system: write to a folder on a writable "
                "disk instead.")
    if code in (errno.EACCES, errno.EPERM):
        return (f"Permission denied for {where}: use a path you may read and write, or "
                "change its permissions (chmod / chown).")
    if code == errno.ENOTDIR:
        return (f"{where}: part of this path is a file, not a folder: give a folder path "
                "(a new one is created).")
    if code == errno.EISDIR:
        return f"{where} is a folder where a file was expected: give a file path."
    # EEXIST: mkdir over an existing file.
    if Path(where).is_file():
        return (f"{where} is a file, not a folder: give a folder path (a new one is "
                "created), or move the file away.")
    return f"{where} already exists: choose another path or remove it."


def ensure_dir(path: str | Path) -> Path:
    """Create folder ``path`` (and parents); a file in the way raises ``NotADirectoryError``
    naming it (``mkdir`` would say ``FileExistsError``, which reads as "already done")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    path.mkdir(parents=True, exist_ok=True)
    return path


def first_missing_dir(path: str | Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (``None`` if it does):
    what creating ``path`` would create, for :func:`remove_empty_dirs` to take back."""
    path = Path(path).absolute()
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_empty_dirs(path: str | Path, up_to: Path | None) -> None:
    """Remove ``path`` and its parents up to ``up_to`` (included) while they are empty:
    a command that failed before writing anything leaves no empty folders behind."""
    if up_to is None:
        return
    folder, up_to = Path(path).absolute(), Path(up_to).absolute()
    while True:
        try:
            folder.rmdir()  # only ever removes an empty folder
        except OSError:
            return
        if folder == up_to or up_to not in folder.parents:
            return
        folder = folder.parent


@contextmanager
def remove_on_failure(*paths: str | Path) -> Iterator[None]:
    """Delete ``paths`` (files) if the block raises; the error goes on unchanged."""
    try:
        yield
    except BaseException:
        for p in paths:
            try:
                Path(p).unlink(missing_ok=True)
            except OSError:
                pass  # the original error matters more than the debris
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """Open ``path.tmp`` for writing; on success flush, fsync and rename it over
    ``path``; on failure delete it. A crash leaves the old file or the new one.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(p, "w") as fh:
    ...     _ = fh.write("hello")
    >>> p.read_text()
    'hello'
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with remove_on_failure(tmp):
        try:
            with open(tmp, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except Exception as exc:
            err = find_os_error(exc)
            if err is not None and err.filename is None:  # write() names no file
                raise OSError(err.errno, err.strerror, str(path)) from exc
            raise


def preallocate(path: str | Path, size: int) -> None:
    """Reserve ``size`` bytes for file ``path`` now, so that a full disk fails here with
    ``ENOSPC`` instead of killing a later memory-mapped write with ``SIGBUS``."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, int(size))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            # No fallocate on this file system: at least refuse what cannot fit.
            free = shutil.disk_usage(Path(path).parent).free
            if free < size - os.fstat(fd).st_size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
    finally:
        os.close(fd)
