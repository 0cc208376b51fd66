"""Writes a killed process cannot leave half done, and the directory lock jobs hold.

A file is written to `.NAME.tmp-PID` and renamed over NAME (atomic on POSIX); a directory is written under a
temporary name and renamed into place (`replace_dir`). `remove_partial_writes` deletes what a killed write left
behind, under the directory's lock (`lock_dir`, an flock held for the job's lifetime).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import UserError, write_error

LOCK = ".lock"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills `.NAME.tmp-PID` beside `path`, which is then renamed over it. On any failure the
    temporary file is removed, and a disk-full / quota / read-only / permission error becomes one UserError
    naming `path` (other errors keep their traceback)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (user := write_error(path, e)) is not None:
            raise user from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def unwritable(path: Path, error: OSError) -> UserError:
    """One line for a directory that cannot be created or written (read-only, or a file in the way)."""
    return UserError(f"{path}: cannot create or write this directory ({error.strerror or error})")


@contextmanager
def lock_dir(path: str | Path, job: str, lock_name: str = LOCK) -> Iterator[Path]:
    """Create directory `path` if needed and hold an exclusive lock on `path/<lock_name>` for the block: a
    second job on the same directory stops at once, naming the holder's pid. The lock file stays (deleting it
    would let a third job lock a fresh file while the second holds the old one). flock locks belong to an open
    file: never take the same directory's lock twice in one process (it would fail, naming this pid)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(path / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise unwritable(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{path} is in use by {holder}; wait for that job to end or use another directory") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (nsalign {job})\n".encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)  # a stale pid would name a job that no longer holds it
        os.close(fd)  # releases the lock


# what an interrupted write leaves next to its target: save_checkpoint's `.NAME.tmp-XXXXXXXX`, replace_dir's
# `.NAME.old-PID` (core.runs stages checkpoints as `.step_N.tmp-staging`, atomic files as `.NAME.tmp-PID`)
PARTIAL_WRITE = re.compile(r"^\.[^/]+\.(tmp|old)-\w+$")


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the fully written directory `src` to `dst`, replacing an existing `dst` (moved aside first:
    a directory cannot be renamed over a non-empty one)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def remove_partial_writes(parent: Path) -> list[str]:
    """Delete what interrupted writes left in `parent` (names matching PARTIAL_WRITE, nothing else); returns
    the names. Only while no other process writes there (core.runs calls it under the run's lock)."""
    found = sorted(p for p in parent.iterdir() if PARTIAL_WRITE.match(p.name)) if parent.is_dir() else []
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return [p.name for p in found]
