"""Files: everything the project writes (checkpoints, exports, shards, downloads, caches) appears whole or not at
all: written under a temporary name beside the target, synced, then renamed into place."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; once written it is synced and renamed to `path`.

    A crash or error leaves no half-written `path` (and no temporary file, short of kill -9); the
    temporary name starts with a dot and ends in .tmpPID, so no glob for shards or checkpoints sees it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
        os.replace(tmp, path)
        fsync_folder(path.parent)  # and the rename itself on disk before anything relies on it (--keep-last)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder) -> None:
    """A folder's entries (a rename, a deletion) written to disk, as fsync does for a file's bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ATOMIC_TEMP_GLOB = ".*.tmp[0-9]*"  # the names atomic_write writes to before the rename


def remove_stale_temp_files(folder) -> None:
    """Delete the temporary files that atomic_write leaves behind when its process is killed (kill -9).

    Only for a folder that no live process writes into (fineweb.py locks its output folder first).
    """
    for p in Path(folder).glob(ATOMIC_TEMP_GLOB):
        p.unlink(missing_ok=True)


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch url into dest through a temporary file, so a half-written file is never taken for data."""
    import shutil
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)
