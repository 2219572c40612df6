"""Private scratch directories for plaintext that must not outlive its use (decrypted weights, a child being made).

Contract: :func:`private_dir` makes a directory (mode 0700) under ``root`` named ``private-<prefix>…`` and holds an
exclusive ``flock`` on it for as long as its ``with`` block runs; the directory is removed on exit, whatever happens.
A process killed inside the block (kill -9, power loss) releases the lock with its death, and :func:`clean_private`
(run by :meth:`llmos.registry.service.Registry.maintain` at every start) removes each such directory whose lock
nobody holds, so plaintext never stays on disk past the next start. A directory is locked before it is given its
``private-`` name, so a cleaner never removes one that is still in use or being set up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

PREFIX = "private-"


@contextlib.contextmanager
def private_dir(root: Path, prefix: str) -> Iterator[Path]:
    """A new 0700 directory under ``root``, locked while in use and removed on exit."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=root))  # mkdtemp: 0700, owner only
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a directory nobody else knows yet: never waits
        path = root / f"{PREFIX}{prefix}{uuid.uuid4().hex[:12]}"
        try:
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)  # releases the lock


def clean_private(root: Path) -> int:
    """Remove the private directories under ``root`` whose owner is gone (nobody holds their lock); the count."""
    removed = 0
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if not entry.name.startswith(PREFIX):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a symlink, or not a directory
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive and using it
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed
