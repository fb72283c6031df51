"""File-system faults as one-line messages, and writes that leave no debris.

Every command and panel writes results somewhere the user chose. When that fails
because of the disk (full, read-only, not ours, a file where a folder should be),
the user needs the path, the cause and the fix on one line, not ``OSError`` or a
PyTorch ``enforce fail`` traceback. :func:`describe_os_error` finds the OS error in an
exception (also one raised *during* another, as ``torch.save`` does) and words it;
:func:`atomic_write` (and :func:`atomic_write_text`, for small text and JSON files) and
:func:`remove_on_failure` keep half-written files off the disk.

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
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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


def _default_mode() -> int:
    """The permissions a new file gets here (0o666 less the umask), read once."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_mode()


def unique_temp_path(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new, empty, hidden file beside ``path`` (``.NAME.<random><suffix>``), created
    exclusively: two writers of the same target never share a temporary file, and a
    rename of it over ``path`` stays on one file system. It gets the permissions a
    plain new file would (``mkstemp`` alone gives 0600)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        if hasattr(os, "fchmod"):  # not on Windows, where mkstemp gives the usual mode
            os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)
    return Path(name)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a unique temporary file beside ``path`` (:func:`unique_temp_path`); on
    success flush, fsync and rename it over ``path``; on failure delete it. A crash
    leaves the old file or the new one, and concurrent writers never collide.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(p, "w") as fh:
    ...     _ = fh.write("hello")
    >>> p.read_text(), [f.name for f in p.parent.iterdir()]
    ('hello', ['a.txt'])
    """
    path = Path(path)
    try:
        tmp = unique_temp_path(path)
    except OSError as exc:  # named by its random temporary name: name the target
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    with remove_on_failure(tmp):
        try:
            with open(tmp, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except Exception as exc:
            err = find_os_error(exc)
            if err is not None and (err.filename is None or err.filename == str(tmp)):
                raise OSError(err.errno, err.strerror, str(path)) from exc  # name the target
            raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`: the one writer of
    the package's small text and JSON files (configs, logs, state records, results).

    >>> import tempfile, pathlib
    >>> atomic_write_text(pathlib.Path(tempfile.mkdtemp()) / "a.json", "{}").read_text()
    '{}'
    """
    with atomic_write(path, "wb") as fh:
        fh.write(text.encode("utf-8"))
    return Path(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A unique temporary path beside ``path``, ending as ``path`` does (for writers that
    take a path and pick the format by its suffix: pandas, numpy, matplotlib); renamed
    over ``path`` when the block ends, deleted if it raises (:func:`atomic_write` for
    writers that take a file).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.csv"
    >>> with atomic_path(p) as tmp:
    ...     _ = tmp.write_text("x")
    >>> p.read_text(), [f.name for f in p.parent.iterdir()]
    ('x', ['a.csv'])
    """
    path = Path(path)
    try:
        tmp = unique_temp_path(path, suffix="." + path.name)
    except OSError as exc:  # named by its random temporary name: name the target
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    with remove_on_failure(tmp):
        yield tmp
        os.replace(tmp, path)


#: The advisory lock file a writer keeps in an output folder while it works.
LOCK_FILE = ".wsdino.lock"


#: ``flock`` errors of a file system without locks (NFS without its lock daemon, some FUSE).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


class OutputLockedError(FileExistsError):
    """Another process is writing the same output; the message names it (pid, host,
    command, since when) and what to do."""


def _lock_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe_holder(record: dict) -> str:
    if not record.get("pid"):
        return "another process (it is just starting)"
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("started", 0)))
    command = f" ({record['command']})" if record.get("command") else ""
    return f"process {record['pid']} on {record.get('host', '?')}{command}, since {since}"


@contextmanager
def output_lock(folder: str | Path, what: str = "this output", name: str = LOCK_FILE,
                label: str | Path | None = None) -> Iterator[Path]:
    """Hold an advisory lock on output folder ``folder`` (created) while the block runs.

    The lock is ``folder/.wsdino.lock`` (or ``folder/name``: one lock per output of a
    shared folder, the output then ``label`` in the message), locked with ``flock`` (so the kernel releases it
    when its holder dies: a stale lock, left by a killed run, is simply taken over) and
    holding the holder's pid, host, command and start time, for the message that refuses
    a second writer: :class:`OutputLockedError`. The file is removed on release. Where the
    platform has no ``flock`` the block runs unlocked.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with output_lock(folder):
    ...     try:
    ...         with output_lock(folder):
    ...             pass
    ...     except OutputLockedError as exc:
    ...         print(str(exc).split(" process")[0].replace(folder, "FOLDER"))
    FOLDER is being written by
    """
    folder = ensure_dir(folder)
    path = folder / name
    if fcntl is None:  # pragma: no cover - Windows
        yield path
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:  # read-only, not ours: name the output, not the lock
            raise type(exc)(exc.errno, exc.strerror, str(folder)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{label or folder} is being written by {_describe_holder(_lock_record(path))}"
                f": wait for it to finish (or stop it), or write {what} to another folder."
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            os.close(fd)  # e.g. an NFS mount without a lock daemon: run, but say so
            try:
                path.unlink()
            except OSError:
                pass
            warnings.warn(f"{folder}'s file system does not support locks ({exc.strerror}): "
                          "a second run writing the same output at the same time will not be "
                          "refused; start only one.", RuntimeWarning, stacklevel=3)
            yield path
            return
        # The holder before us may have removed the file between our open and our lock:
        # then we hold a lock on a file nobody else sees; start again on the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        try:
            path.unlink()  # before the lock goes: a waiting writer then finds a new file
        except OSError:
            pass
        os.close(fd)


@contextmanager
def writing(out: str | Path, what: str, part: str = "") -> Iterator[None]:
    """Hold the lock of output ``out`` (a file, or a folder that must hold only its own
    files) while the block writes it: ``.<name>[.<part>].lock`` beside it
    (:func:`output_lock`), so that a second writer of the same output, a command or a
    panel, is refused naming the first. A parent folder made only for the lock is taken
    back if the block fails."""
    out = Path(out)
    made = first_missing_dir(out.parent)
    name = f".{out.name}{'.' + part if part else ''}.lock"
    try:
        with output_lock(out.parent, what, name=name, label=out):
            yield
    except BaseException:
        remove_empty_dirs(out.parent, made)
        raise


def locked(gen, out: str | Path, what: str, part: str = ""):
    """Run generator ``gen`` (a task's progress) holding :func:`writing`'s lock on ``out``
    from its first step to its last; returns what ``gen`` returns."""
    with writing(out, what, part):
        return (yield from gen)


#: Written last into a folder of results written by :func:`write_file_set`: the set is
#: complete (and which files it holds).
COMPLETE_FILE = "complete.json"


def write_file_set(folder: str | Path, writers: Mapping[str, Callable[[Path], object]],
                   info: Mapping | None = None) -> list[Path]:
    """Replace the set of result files in ``folder`` as a whole.

    Each ``writers[name](path)`` writes one file to the temporary ``path`` it is given
    (ending as ``name`` does, for writers that pick a format by suffix). Only when all
    are written does the old set go: its ``complete.json`` is removed, each temporary
    file is renamed over its name, files of the old set not in the new one are removed,
    and ``complete.json`` (the names, ``info``) is written last. An error or Ctrl-C while
    writing leaves the old set untouched and no temporary files; :func:`file_set_state`
    tells a complete set from one cut short.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_file_set(folder, {"a.txt": lambda p: p.write_text("1")})
    >>> file_set_state(folder)
    ('complete', ['a.txt'])
    """
    folder = ensure_dir(folder)
    marker = folder / COMPLETE_FILE
    old = file_set_state(folder)[1]
    temps: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            target = folder / name
            temps[name] = unique_temp_path(target, suffix="." + name)
            write(temps[name])
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    marker.unlink(missing_ok=True)  # from here until the new marker: an incomplete set
    for name, tmp in temps.items():
        os.replace(tmp, folder / name)
    for name in set(old) - set(writers):
        (folder / name).unlink(missing_ok=True)
    with atomic_write(marker, "w") as fh:
        json.dump({"files": list(writers), "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   **(info or {})}, fh, indent=2)
    return [folder / name for name in writers]


def file_set_state(folder: str | Path) -> tuple[str, list[str]]:
    """``("complete", names)`` for a set :func:`write_file_set` finished (every file
    there), ``("incomplete", [])`` for a folder of other files (a set cut short, or one
    written before sets were marked), ``("absent", [])`` for a missing or empty folder
    (hidden files, such as temporary ones and locks, do not count)."""
    folder = Path(folder)
    visible = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if not visible:
        return "absent", []
    try:
        names = json.loads((folder / COMPLETE_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "incomplete", []
    if all((folder / n).is_file() for n in names):
        return "complete", list(names)
    return "incomplete", []


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
