"""On-disk cache of verified whole-file contents, addressed by content digest.

One file per digest (`sha256-HEX`), shared by every layer and image that holds the same
bytes. Files are 0600 in a 0700 directory owned by the user, and reach their final name
only after their digest was checked, so a name is a promise about its bytes. As in the
chunk store, a file is hashed again the first time it is used after a worker start, and
checked cheaply (owner, mode, size, unchanged since verified) on every use.

Files that are a single chunk are served from the chunk store itself; this cache holds the
small files the worker assembled from several chunks, and local copies of big files
whose chunks were all local when a reader reached their end (`put_pieces`).
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .chunkstore import VerifiedFiles
from .dirs import cache_dir, ensure_private_dir, new_private_file, remove_stale_temps, write_all
from .errors import CrfsError, VerificationError

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class CachedFile:
    fd: int            # read-only, O_CLOEXEC; the caller owns it
    size: int
    fetched: bool      # False when the bytes were already in the cache


@dataclass
class ContentCache:
    root: Path
    # Striped locks: one fetch per digest at a time, without a lock per digest ever seen.
    _locks: tuple[threading.Lock, ...] = field(
        default_factory=lambda: tuple(threading.Lock() for _ in range(64)), init=False, repr=False
    )
    _verified: VerifiedFiles = field(default_factory=VerifiedFiles, init=False, repr=False)

    def __post_init__(self) -> None:
        ensure_private_dir(self.root)
        remove_stale_temps(self.root, ".tmp-")  # a copy cut short by a killed worker

    @classmethod
    def default(cls) -> "ContentCache":
        return cls(cache_dir() / "content")

    def path_for(self, digest: str) -> Path:
        match = _DIGEST.match(digest)
        if not match:
            raise CrfsError(f"content cache: unsupported digest {digest!r}")
        return self.root / f"sha256-{match.group(1)}"

    def open(self, digest: str, size: int) -> int | None:
        """An fd on the cached bytes, or None if they are not (or not validly) cached."""
        path = self.path_for(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        # A file we did not write (wrong owner, open to others, wrong size) or whose bytes
        # changed is not trusted.
        try:
            good = self._verified.check(bytes.fromhex(digest[7:]), fd, size)
        except BaseException:
            os.close(fd)
            raise
        if not good:
            os.close(fd)
            self._verified.forget(bytes.fromhex(digest[7:]))
            os.unlink(path)
            return None
        return fd

    def get(self, digest: str, size: int, fetch: Callable[[], bytes]) -> CachedFile:
        """The cached file for `digest`, fetching and verifying it once if missing."""
        with self._lock_for(digest):
            fd = self.open(digest, size)
            if fd is not None:
                return CachedFile(fd, size, fetched=False)
            data = fetch()
            return CachedFile(self._store(digest, size, data), size, fetched=True)

    def put_pieces(self, digest: str, size: int, pieces: Iterable[bytes]) -> bool:
        """Writes the file from `pieces` (in order), hashing as it goes, without holding it
        in memory; the file gets its name only if the bytes match `digest`. False if it was
        already cached. VerificationError if the bytes do not match (nothing is kept).
        The digest's lock (shared with other digests) is held only to look and to rename:
        a big copy must not hold up opens of small files."""
        with self._lock_for(digest):
            fd = self.open(digest, size)
            if fd is not None:
                os.close(fd)
                return False
        with new_private_file(self.root) as (fd, tmp):
            hasher, written = hashlib.sha256(), 0
            for piece in pieces:
                hasher.update(piece)
                written += len(piece)
                write_all(fd, piece)
            if written != size or "sha256:" + hasher.hexdigest() != digest:
                raise VerificationError(f"content cache: assembled bytes do not match {digest}")
            with self._lock_for(digest):  # the same bytes if another writer came first
                os.replace(tmp, self.path_for(digest))
                self._verified.remember(bytes.fromhex(digest[7:]), fd)
        return True

    def _store(self, digest: str, size: int, data: bytes) -> int:
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise VerificationError(f"content cache: fetched bytes do not match {digest}")
        final = self.path_for(digest)
        with new_private_file(self.root) as (fd, tmp):
            write_all(fd, data)
            os.replace(tmp, final)
            self._verified.remember(bytes.fromhex(digest[7:]), fd)
        # Reopen read-only: the writer's fd must not reach fuse-overlayfs.
        return os.open(final, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def _lock_for(self, digest: str) -> threading.Lock:
        return self._locks[hash(digest) % len(self._locks)]

    def disk_bytes(self) -> int:
        """Bytes of every file in the cache now (all workers' and earlier lives')."""
        total = 0
        for entry in os.scandir(self.root):
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
        return total

    def total_bytes(self, digests: set[str]) -> int:
        """Bytes these digests occupy in the cache now."""
        total = 0
        for digest in digests:
            try:
                total += self.path_for(digest).stat().st_size
            except (FileNotFoundError, CrfsError):
                continue
        return total
