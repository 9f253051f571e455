"""Writes that never leave a half-written file behind: write beside the target, then rename.

The one home of atomic writes: every writer of a final file goes through :func:`atomic_path`.

- Temporary files are named ``.<target name>.<host>-<pid>.<random>.tmp`` beside the target, so a
  write killed half-way leaves a file whose writer can be told dead. :func:`remove_stale_temps`
  (run before every write and by store opens) deletes those whose writer is a dead process of
  this host, and those of other hosts (a shared folder, where their pids mean nothing here) once
  they are older than their target.
- Final files get the mode a normal file gets under the umask (``0o666 & ~umask``), not the
  0600 that :func:`tempfile.mkstemp` gives, so lab-mates can read projects and labels; final
  folders (an OME-Zarr store) likewise get ``0o777 & ~umask``, not :func:`tempfile.mkdtemp`'s 0700.
- A write that fails for a reason the user can fix (full disk, read-only or forbidden folder)
  raises :class:`hrmedseg.errors.OutputError` naming the target; the old target is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputError

TEMP_SUFFIX = ".tmp"
# .<name>.<host>-<pid>.<random>.tmp (mkstemp's random part has no dots)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
# Failures the user causes and can fix; others (bugs) keep their traceback.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR, errno.EEXIST})


def normal_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def normal_dir_mode() -> int:
    """The mode ``os.mkdir(path)`` would give a new folder under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def temp_prefix(target: Path) -> str:
    """Prefix of this process's temporary files for ``target``: ``.<name>.<host>-<pid>.``."""
    return f".{target.name}.{_host()}-{os.getpid()}."


def make_temp(target: Path) -> Path:
    """An empty temporary file beside ``target`` that names this process (see the module docstring)."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporary files in ``folder`` (for target ``name``, or any) left by dead writers.

    Stale: written on this host by a process that no longer runs (this process's own are kept:
    one of its writes may be in flight), or written on another host and older than the target.
    Returns the files removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    host = _host()
    for path in entries:
        m = _TEMP_RE.match(path.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        try:
            if m["host"] == host:
                pid = int(m["pid"])
                if pid == os.getpid() or _pid_alive(pid):
                    continue
            else:
                target = folder / m["name"]
                if not target.exists() or path.stat().st_mtime >= target.stat().st_mtime:
                    continue
            if path.is_dir() and not path.is_symlink():  # a killed atomic_dir's half-written folder
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def _finish(tmp: Path) -> None:
    """Make a complete temporary file durable and give it a normal file's mode."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, normal_file_mode())


def user_error(target: Path, err: OSError) -> OutputError | None:
    """An :class:`OutputError` naming ``target`` for failures the user can fix, else None."""
    if isinstance(err, OutputError) or err.errno not in USER_ERRNOS:
        return None
    what = err.strerror or type(err).__name__
    if err.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder of the path should be
        what = f"{err.filename or 'a part of the path'} is a file, not a folder"
    hint = " (free some space or write elsewhere)" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return OutputError(f"cannot write {target}: {what}{hint}; any existing {target.name} is unchanged")


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    """A fresh temporary file beside ``target``, removed (and the error made friendly) on failure."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent, target.name)
        tmp = make_temp(target)
        yield tmp
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and (friendly := user_error(target, err)) is not None:
            raise friendly from err
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target``.

    On any error the temporary file is removed and an existing ``target`` is untouched; a full
    disk or a forbidden folder raises :class:`OutputError` naming ``target``.
    """
    target = Path(target)
    with _temp_beside(target) as tmp:
        yield tmp
        _finish(tmp)
        os.replace(tmp, target)


def stage_file(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a complete, fsynced temporary file beside ``target`` with ``write(tmp)``; return it.

    For writers that move several files in at once (the annotation store): the caller renames the
    returned file onto ``target`` (it already has a normal file's mode) or deletes it.
    """
    target = Path(target)
    with _temp_beside(target) as tmp:
        write(tmp)
        _finish(tmp)
    return tmp


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    For outputs that are folders (an OME-Zarr store, one image's results): readers see the old
    folder or the complete new one, never a partial one. An existing ``target`` is moved aside
    and deleted only after the new folder is in place; on any error the temporary folder is
    removed and ``target`` is untouched. The folder's name carries this process's pid, as
    temporary files do, so the folder of a killed write is removed at the next write of ``target``.
    """
    target = Path(target)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent))
        yield tmp
        os.chmod(tmp, normal_dir_mode())  # mkdtemp's 0700 would survive the rename
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and (friendly := user_error(target, err)) is not None:
            raise friendly from err
        raise
