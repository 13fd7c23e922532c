"""Where crfs keeps per-user state: caches and the worker's runtime directory.

Both belong to the user who runs crfs: created 0700, and refused if another user owns
them (a cache another user can write could feed us bytes we never verified).
"""
from __future__ import annotations

import os
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CrfsError


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) 0700 if missing; refuse it if it is not ours or is open to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise CrfsError(f"{path}: expected a directory")
    if st.st_uid != os.getuid():
        raise CrfsError(f"{path}: owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


@contextmanager
def new_private_file(directory: Path | str, prefix: str = ".tmp-") -> Iterator[tuple[int, str]]:
    """(fd, path) of a new 0600 file in `directory`, for the block to write and rename
    into place: a name is given only to complete files. The file is removed if the block
    fails; the fd is closed when it ends."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        yield fd, tmp
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)


STALE_TEMP_SECONDS = 3600  # a temp file this old belongs to a writer that died


def remove_stale_temps(directory: Path, prefix: str = "") -> None:
    """Removes files named PREFIX... left by writers that died (older than an hour).
    Another process (another worker, the CLI) may share the directory: fresh ones stay."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for entry in os.scandir(directory):
        if not entry.name.startswith(prefix):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
        except FileNotFoundError:
            continue


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def cache_dir() -> Path:
    """$CRFS_CACHE_DIR, else $XDG_CACHE_HOME/crfs, else ~/.cache/crfs."""
    explicit = os.environ.get("CRFS_CACHE_DIR")
    if explicit:
        return ensure_private_dir(Path(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return ensure_private_dir(Path(base) / "crfs")


def index_dir() -> Path:
    """Built TOC indexes, one file per TOC digest."""
    return ensure_private_dir(cache_dir() / "index")


def runtime_dir() -> Path:
    """$CRFS_RUNTIME_DIR, else $XDG_RUNTIME_DIR/crfs, else /tmp/crfs-UID: the worker's socket lives here."""
    explicit = os.environ.get("CRFS_RUNTIME_DIR")
    if explicit:
        return ensure_private_dir(Path(explicit))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return ensure_private_dir(Path(xdg) / "crfs")
    return ensure_private_dir(Path(f"/tmp/crfs-{os.getuid()}"))
