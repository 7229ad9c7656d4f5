"""Atomic output writing and small file helpers.

Every output is first written under a hidden temporary name next to its destination and then
moved into place with ``os.replace``, so a reader (or DVC) never sees a half-written file: a
stage killed midway leaves either the old output or nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import SpmlError

TMP_MARK = ".tmp-"


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    """A hidden temporary next to ``path``, tagged with this process's id (see remove_stale_temporaries).

    An unwritable place (a read-only folder, a parent that is a file) is a user error, reported before
    anything is computed into the temporary."""
    prefix = f".{path.name}{TMP_MARK}{os.getpid()}-"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
            # mkstemp/mkdtemp create 0600/0700 whatever the umask; the renamed output must get the mode a
            # plain open()/mkdir() would have given it (0666/0777 minus the umask), or others cannot read it
            os.chmod(tmp, 0o777 & ~current_umask())
            return tmp
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    except OSError as exc:
        raise SpmlError(f"cannot write {path}: {unwritable_reason(path, exc)}; choose another place or make "
                        "it writable") from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


def current_umask() -> int:
    """The process umask: from /proc on Linux, else by setting and restoring it (racy only with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents); an unwritable place is one SpmlError line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpmlError(f"cannot create folder {path}: {unwritable_reason(path / '_', exc)}; choose another "
                        "place or make it writable") from None
    return path


def unwritable_reason(path: Path, exc: OSError) -> str:
    """Why ``path`` cannot be created, in words: the ancestor that is a file, else the OS's reason."""
    for parent in Path(path).parents:
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a folder"
    return exc.strerror or type(exc).__name__


def _owner_alive(temporary: Path, marker: str) -> bool:
    pid = temporary.name[len(marker):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries left by a process killed with SIGKILL (nothing else leaves them).

    Temporaries of live processes are kept: two runs may build the same output (e.g. the shared image
    cache) at once, and the last rename wins with identical content.
    """
    path = Path(path)
    if not path.parent.exists():
        return
    marker = f".{path.name}{TMP_MARK}"
    for stale in path.parent.glob(f"{marker}*"):
        if not _owner_alive(stale, marker):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first (a failed write removes them again)."""
    missing, parent = [], path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there meanwhile) or already gone
            return


# what a full disk looks like: the OS's errno, pyarrow's message, torch's zip writer's message
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed for want of space (an OSError with ENOSPC/EDQUOT, or a library's error
    carrying the OS's words, e.g. pyarrow's, or torch's zip writer's "file write failed")."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return isinstance(exc, (OSError, RuntimeError)) and any(words in str(exc) for words in DISK_FULL_WORDS)


def disk_full_error(path: str | os.PathLike, needed: int | None = None) -> SpmlError:
    """One line for a full disk: the file, the bytes needed where known, the bytes free there."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(where).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {needed:,} bytes, " if needed else ""
    return SpmlError(f"no space left on the device to write {path} ({need}{free}); nothing was written: free "
                     "some space or choose another place, then rerun")


def reserve(path: str | os.PathLike, size: int | None = None) -> None:
    """Allocate ``size`` bytes (default: the file's length) of the file ``path`` on disk now, so that a full disk
    is an ENOSPC here, where it is reported as one line, and not a SIGBUS in a memory map or a library's
    cryptic write error later. Where the OS has no posix_fallocate, nothing is checked."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        length = os.fstat(handle.fileno()).st_size if size is None else size
        if length > 0:
            os.posix_fallocate(handle.fileno(), 0, length)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path``, on any error it is deleted.

    A full disk becomes one SpmlError naming ``path`` (and ``needed`` bytes, where the caller knows them)."""
    path = Path(path)
    remove_stale_temporaries(path)
    created = _missing_parents(path)
    tmp = _tmp_sibling(path, is_dir=False)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        _remove_empty(created)
        if is_disk_full(exc):
            raise disk_full_error(path, needed) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces the directory ``path`` as a whole."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SpmlError(f"{path} exists and is not a folder; move it away or choose another output folder")
    remove_stale_temporaries(path)
    created = _missing_parents(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        yield tmp
        if path.exists():
            old = _tmp_sibling(path, is_dir=True)
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        _remove_empty(created)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        # allow_nan=False: NaN/Infinity are not JSON; callers turn them into null or refuse them first
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def terminate_cleanly() -> None:
    """Turn SIGTERM into SystemExit so ``atomic_*`` contexts delete their temporaries on ``kill``."""

    def _handler(signum, frame):
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # not in the main thread (e.g. under a test runner)
        signal.signal(signal.SIGTERM, _handler)
