"""Crash-safe cache folders: written aside, published with one rename, built once.

An entry (an AOTInductor engine, an ONNX export) is a folder. A builder writes it into a
private staging sibling and publishes it with `os.rename`, which is atomic: a reader sees
the whole entry or none, whatever instant the builder is killed at. Concurrent builders of
one entry take its lock first, so the second waits and then finds the first's entry.

    with cachedir.lock(entry):                  # one builder at a time per entry
        if not usable(entry):
            tmp = cachedir.staging(entry)        # .<name>.tmp-<pid>-<random>, next to entry
            ...write the files into tmp...
            cachedir.publish(tmp, entry)         # fsync, then rename into place

Leftovers of killed builders (staging folders, an old entry renamed aside) are never
mistaken for entries: their names start with "." and carry the builder's pid, so
`sweep(entry)` removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(-.*)?$")


def lock_path(entry) -> Path:
    entry = Path(entry)
    return entry.with_name(f".{entry.name}.lock")


@contextlib.contextmanager
def lock(entry, timeout: Optional[float] = None):
    """Hold the exclusive lock of `entry` (flock on the sibling `.<name>.lock`) for the block.

    Another process locking the same entry waits (up to `timeout` seconds, then TimeoutError).
    The kernel drops the lock when its holder dies, so a killed builder never leaves it held.
    """
    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or deadline is None:
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process holds the lock of {entry} ({path}) for over "
                                       f"{timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def staging(entry) -> Path:
    """A new empty folder next to `entry` to write it in: `.<name>.tmp-<pid>-<random>`, with
    the permissions a plain mkdir would give (mkdtemp's 0700 would make the entry private)."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{os.getpid()}-", dir=entry.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _fsync_tree(folder: Path) -> None:
    """Flush the files and folders under `folder` to disk, so that after a power loss the
    renamed entry never holds empty or partial files."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp, entry, *, replace: bool = True) -> Path:
    """Move the finished staging folder `tmp` to `entry` with one rename, after flushing it.

    An existing entry is kept when replace=False (tmp is removed: another builder finished
    first); with replace=True it is renamed aside, the new one renamed in, and the old one
    removed, so readers see the old or the new entry, never a mix. Returns `entry`.
    """
    tmp, entry = Path(tmp), Path(entry)
    _fsync_tree(tmp)
    if entry.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return entry
    old = None
    if entry.exists():
        old = entry.with_name(f".{entry.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(entry, old)
    try:
        os.rename(tmp, entry)
    except OSError:
        if old is not None:
            os.rename(old, entry)
        raise
    _fsync_dir(entry.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return entry


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(entry) -> list:
    """Remove the staging and set-aside folders of `entry` whose builder process is gone
    (killed mid-write); returns what was removed. Call it holding the entry's lock."""
    entry = Path(entry)
    removed = []
    if not entry.parent.is_dir():
        return removed
    for item in entry.parent.iterdir():
        match = _LEFTOVER.match(item.name)
        if match and match["name"] == entry.name and item.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    return removed
