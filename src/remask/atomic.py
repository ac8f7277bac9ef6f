"""Staged writes: a file or directory appears under its name complete, or not at all.

Every writer in remask (checkpoints, trainer state, token and tokenizer caches, metrics
rewrites, plots, result files) goes through this module:

- `atomic_dir(target)` yields an empty staging directory beside `target`; when the block ends,
  every file and directory in it is fsynced, their modes are made uniform (0666/0777 less the
  umask: some writers create 0600 files), and it is renamed to `target`. An existing `target`
  is moved aside first and deleted only once the new one is in place.
- `atomic_file(target)` does the same for one file.
- `remove_dir(path)` renames a directory out of sight before deleting it, so a kill during the
  deletion never leaves a half-deleted directory under its name.
- `clear_staging(parent)` removes what a killed process left: `.tmp-*` and `.trash-*` entries.

A failure (an OSError, an exception, Ctrl-C) removes the staging entry and leaves `target` as
it was; OSErrors become a one-line `RemaskError` naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from remask.errors import RemaskError

STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def describe_os_error(error: OSError) -> str:
    """A short reason for an OSError ("no space left on device", "permission denied", ...)."""
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    return (error.strerror or str(error)).lower()


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Uniform modes, then fsync every file and directory under `root` (deepest first)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            os.chmod(path, FILE_MODE)
            fsync_path(path)
        os.chmod(dirpath, DIR_MODE)
        fsync_path(Path(dirpath))


def _hidden(target: Path, prefix: str) -> Path:
    return target.parent / f"{prefix}{target.name}-{uuid.uuid4().hex[:8]}"


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a directory so that it vanishes from its name at once (rename, then delete)."""
    path = Path(path)
    if not path.exists():
        return
    trash = _hidden(path, TRASH_PREFIX)
    os.rename(path, trash)
    fsync_path(path.parent)
    _rmtree(trash)


def clear_staging(parent: str | os.PathLike[str]) -> None:
    """Remove the staging and trash entries a killed writer left in `parent`."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            if entry.is_dir() and not entry.is_symlink():
                _rmtree(entry)
            else:
                entry.unlink(missing_ok=True)


def _swap_in(staging: Path, target: Path, replace: bool) -> None:
    if target.exists() or target.is_symlink():
        if not replace:  # somebody else wrote it first (a shared cache): keep theirs
            _rmtree(staging)
            return
        if not target.is_dir():
            raise RemaskError(f"cannot write {target}: it exists and is not a directory")
        aside = _hidden(target, TRASH_PREFIX)
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        fsync_path(target.parent)
        _rmtree(aside)
        return
    try:
        os.rename(staging, target)
    except OSError as e:
        if replace or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        _rmtree(staging)  # lost a race to another writer of the same cache entry
        return
    fsync_path(target.parent)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes `target` (see the module doc).

    `replace=False` keeps an existing `target` and discards the new content (for caches that
    several processes may fill at once).
    """
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _hidden(target, STAGING_PREFIX)
        staging.mkdir()
    except OSError as e:
        raise RemaskError(f"cannot write {target}: {describe_os_error(e)}") from None
    try:
        yield staging
        _finish_tree(staging)
        _swap_in(staging, target, replace)
    except OSError as e:
        _rmtree(staging)
        raise RemaskError(f"cannot write {target}: {describe_os_error(e)}") from None
    except BaseException:
        _rmtree(staging)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Yield a file open for writing; on success it replaces `target` in one rename."""
    target = Path(target).absolute()
    if target.is_dir():
        raise RemaskError(f"cannot write {target}: it is a directory")
    staging = _hidden(target, STAGING_PREFIX)
    try:
        handle = open(staging, mode, encoding=None if "b" in mode else encoding)
    except OSError as e:
        raise RemaskError(f"cannot write {target}: {describe_os_error(e)}") from None
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, FILE_MODE)
        os.replace(staging, target)
        fsync_path(target.parent)
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise RemaskError(f"cannot write {target}: {describe_os_error(e)}") from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_file(target) as f:
        f.write(text)
    return Path(target)


def write_json(target: str | os.PathLike[str], data: Any, **dumps: Any) -> Path:
    """JSON (never NaN or Infinity: those are not JSON) written atomically, newline-terminated."""
    return write_text(target, json.dumps(data, allow_nan=False, **({"indent": 2} | dumps)) + "\n")


def check_writable_dir(path: str | os.PathLike[str], what: str) -> None:
    """RemaskError unless `path` is, or can be created as, a directory we may write into.

    Nothing is left behind: directories created to probe are removed again.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RemaskError(f"{what} {path} exists and is not a directory")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    probe = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{STAGING_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
    except OSError as e:
        raise RemaskError(f"{what} {path} is not writable: {describe_os_error(e)}") from None
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
        for p in missing:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
