"""On-disk store of verified chunk bytes, addressed by their sha256 (the TOC's chunkDigest).

    ROOT/sha256/AB/ABCDEF...   one file per digest: the uncompressed chunk bytes
    ROOT/tmp/                  files being written (renamed into place once verified)

Shared by every layer and image of the user: two layers holding the same chunk store it
once. Directories are 0700 and files 0600, owned by the user; a file reaches its name only
after its bytes were hashed, so a name is a promise about its bytes. A promise on disk can
still be broken (a disk fault, a stray write), so every use checks the file cheaply (owner,
mode, size, and that its inode, mtime and ctime are the ones last verified) and the first
use after a worker start hashes it whole. A file that fails is deleted: the caller fetches
the chunk again.

With a size limit (`crfs worker --cache-size`, CRFS_CACHE_SIZE) the store evicts the
least recently used chunks once it holds more, sparing chunks a read is using (pinned).
A full disk never fails a read: `put` raises StoreFullError and callers serve the bytes
they fetched without keeping them.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .dirs import ensure_private_dir, new_private_file, remove_stale_temps, write_all
from .errors import CrfsError, VerificationError

log = logging.getLogger(__name__)

DIGEST_BYTES = 32          # sha256
_HASH_PIECE = 1 << 20
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class StoreFullError(CrfsError):
    """The disk (or quota) under the chunk store is full: the chunk was not kept."""


def parse_size(text: str) -> int:
    """`10G`, `512M`, `4096`, `1.5G` (binary units, an optional trailing B) as bytes."""
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = clean[-1:] if clean[-1:] in _SIZE_UNITS else ""
    number = clean[:-1] if unit else clean
    try:
        value = float(number)
    except ValueError:
        raise CrfsError(f"cache size {text!r}: expected a number with an optional K, M, G or T") from None
    if not value >= 0 or value == float("inf"):
        raise CrfsError(f"cache size {text!r}: must be a finite size of at least 0")
    return int(value * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class FileSignature:
    """What changes when a file is written to or replaced: inode, size, mtime, ctime."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileSignature":
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_private_file(st: os.stat_result, size: int) -> bool:
    """A regular file of ours, closed to others, of the expected size."""
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
            and st.st_size == size)


def hash_fd(fd: int, size: int) -> bytes:
    """sha256 of the first `size` bytes behind fd (short files hash short: callers compare)."""
    hasher = hashlib.sha256()
    offset = 0
    while offset < size:
        piece = os.pread(fd, min(_HASH_PIECE, size - offset), offset)
        if not piece:
            break
        hasher.update(piece)
        offset += len(piece)
    return hasher.digest()


@dataclass
class VerifiedFiles:
    """Which files were hashed whole during this process's life, by signature: a file whose
    signature is unchanged since need not be hashed again."""

    _known: dict[bytes, FileSignature] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def check(self, digest: bytes, fd: int, size: int) -> bool:
        """True if the open file `fd` holds exactly the bytes that hash to `digest`."""
        st = os.fstat(fd)
        if not is_private_file(st, size):
            return False
        signature = FileSignature.of(st)
        with self._lock:
            if self._known.get(digest) == signature:
                return True
        if hash_fd(fd, size) != digest:
            return False
        with self._lock:
            self._known[digest] = signature
        return True

    def remember(self, digest: bytes, fd: int) -> None:
        """`fd` was just written with bytes already hashed to `digest`."""
        signature = FileSignature.of(os.fstat(fd))
        with self._lock:
            self._known[digest] = signature

    def forget(self, digest: bytes) -> None:
        with self._lock:
            self._known.pop(digest, None)


def _check_digest(digest: bytes) -> bytes:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise CrfsError(f"chunk store: a chunk digest must be {DIGEST_BYTES} bytes of sha256, not {digest!r}")
    return digest


@dataclass
class ChunkStore:
    """Verified chunk bytes by sha256 digest (raw 32-byte digests, as the index holds them)."""

    root: Path
    limit_bytes: int | None = None  # evict least recently used chunks above this (None: never)
    _verified: VerifiedFiles = field(default_factory=VerifiedFiles, init=False, repr=False)
    # Every stored chunk, least recently used first: digest -> size.
    _recency: "OrderedDict[bytes, int]" = field(default_factory=OrderedDict, init=False, repr=False)
    _total: int = field(default=0, init=False)
    _pins: dict[bytes, int] = field(default_factory=dict, init=False, repr=False)
    _fanout_ready: set[str] = field(default_factory=set, init=False, repr=False)
    _chunks_dir: str = field(default="", init=False, repr=False)  # ROOT/sha256, as a string
    _tmp_dir: str = field(default="", init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Counted for the log and tests: files found altered on disk and removed.
    discarded: int = field(default=0, init=False)
    evicted: int = field(default=0, init=False)       # chunks removed to stay within limit_bytes
    not_kept: int = field(default=0, init=False)      # chunks a full disk kept out

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._chunks_dir = str(self.root / "sha256")
        self._tmp_dir = str(self.root / "tmp")
        ensure_private_dir(self.root)
        ensure_private_dir(self.root / "sha256")
        ensure_private_dir(self.root / "tmp")
        remove_stale_temps(self.root / "tmp")
        self._load_recency()

    @property
    def total_bytes(self) -> int:
        """Bytes of the chunks this store knows it holds."""
        with self._lock:
            return self._total

    def path_for(self, digest: bytes) -> Path:
        return Path(self._file(digest))

    def _file(self, digest: bytes) -> str:
        """path_for as a string: every read asks, and pathlib costs more than the read."""
        hexdigest = _check_digest(digest).hex()
        return f"{self._chunks_dir}/{hexdigest[:2]}/{hexdigest}"

    # ---------------------------------------------------------------- reading

    def has(self, digest: bytes, size: int) -> bool:
        """Cheap: a file of the right size, owner and mode is there (its bytes unchecked)."""
        try:
            st = os.lstat(self._file(digest))
        except FileNotFoundError:
            return False
        return is_private_file(st, size)

    def open(self, digest: bytes, size: int) -> int | None:
        """A read-only fd on the chunk's verified bytes, or None if they are not stored
        (a file that fails its check is removed). The caller owns the fd."""
        path = self._file(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            self._discard(digest, "is a symlink")
            return None
        try:
            good = self._verified.check(digest, fd, size)
        except BaseException:
            os.close(fd)
            raise
        if not good:
            os.close(fd)
            self._discard(digest, "does not match its digest, size or permissions")
            return None
        self._note_used(digest, size)
        return fd

    def check(self, digest: bytes, size: int) -> bool:
        """Whether the chunk is stored and verified (hashing it if not yet this worker's life)."""
        fd = self.open(digest, size)
        if fd is None:
            return False
        os.close(fd)
        return True

    def read(self, digest: bytes, size: int, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes [offset, offset+length) of a stored chunk of `size` bytes, or None if it is
        not (validly) stored."""
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside a chunk of {size} bytes")
        fd = self.open(digest, size)
        if fd is None:
            return None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:  # truncated after the check: treat as absent
            self._discard(digest, "shrank while being read")
            return None
        return data

    # ---------------------------------------------------------------- writing

    def put(self, digest: bytes, data: bytes, *, verified: bool = False) -> None:
        """Stores `data` under `digest`; VerificationError if it does not hash to it,
        StoreFullError if the disk is full (nothing is left behind). `verified`: the
        caller has just hashed these very bytes to `digest` (Layer.decode_chunk), so they
        are not hashed twice (a 4 MiB chunk costs ~5 ms of sha256)."""
        _check_digest(digest)
        if not verified and hashlib.sha256(data).digest() != digest:
            raise VerificationError(f"chunk store: bytes offered for sha256:{digest.hex()} do not match it")
        try:
            self._write(digest, data)
        except OSError as exc:
            if exc.errno not in FULL_DISK_ERRNOS:
                raise
            with self._lock:
                self.not_kept += 1
            raise StoreFullError(f"chunk store {self.root}: disk full, sha256:{digest.hex()} not kept "
                                 f"({exc.strerror})") from exc
        self._note_used(digest, len(data))
        self._evict()

    @contextmanager
    def pinned(self, digests: Iterable[bytes]) -> Iterator[None]:
        """While in this block, eviction spares these chunks (a read is using them)."""
        held = self.pin(digests)
        try:
            yield
        finally:
            self.unpin(held)

    def pin(self, digests: Iterable[bytes]) -> list[bytes]:
        """Eviction spares these chunks until `unpin` of what this returns."""
        held = [d for d in digests if d is not None]
        with self._lock:
            for digest in held:
                self._pins[digest] = self._pins.get(digest, 0) + 1
        return held

    def unpin(self, held: Iterable[bytes]) -> None:
        with self._lock:
            for digest in held:
                left = self._pins[digest] - 1
                if left:
                    self._pins[digest] = left
                else:
                    del self._pins[digest]

    def _write(self, digest: bytes, data: bytes) -> None:
        final = self._file(digest)
        self._ensure_fanout(Path(final).parent)
        with new_private_file(self._tmp_dir, "chunk-") as (fd, tmp):
            write_all(fd, data)
            os.rename(tmp, final)
            self._verified.remember(digest, fd)

    def _ensure_fanout(self, directory: Path) -> None:
        with self._lock:
            if directory.name in self._fanout_ready:
                return
        directory.mkdir(mode=0o700, exist_ok=True)  # an OSError (ENOSPC) reaches put as such
        ensure_private_dir(directory)
        with self._lock:
            self._fanout_ready.add(directory.name)

    def _discard(self, digest: bytes, why: str) -> None:
        path = self.path_for(digest)
        log.warning("chunk store: %s %s: removed", path, why)
        self._verified.forget(digest)
        with self._lock:
            self.discarded += 1
            self._drop_locked(digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------- size limit

    def _load_recency(self) -> None:
        """What a previous worker left, oldest use first (atime, else mtime, says when)."""
        found: list[tuple[int, bytes, int]] = []
        for fanout in os.scandir(self.root / "sha256"):
            if not fanout.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fanout.path):
                try:
                    digest = bytes.fromhex(entry.name)
                    st = entry.stat(follow_symlinks=False)
                except (ValueError, FileNotFoundError):
                    continue
                if len(digest) == DIGEST_BYTES and stat.S_ISREG(st.st_mode):
                    found.append((max(st.st_atime_ns, st.st_mtime_ns), digest, st.st_size))
        with self._lock:
            for _, digest, size in sorted(found):
                self._recency[digest] = size
                self._total += size
        self._evict()

    def _note_used(self, digest: bytes, size: int) -> None:
        with self._lock:
            if digest in self._recency:
                self._recency.move_to_end(digest)
                return
            self._recency[digest] = size
            self._total += size

    def _drop_locked(self, digest: bytes) -> None:
        size = self._recency.pop(digest, None)
        if size is not None:
            self._total -= size

    def _evict(self) -> None:
        """Removes least recently used, unpinned chunks until the store fits its limit.
        (A reader holding an fd on a removed chunk keeps reading it: unlink spares open files.)"""
        if self.limit_bytes is None:
            return
        while True:
            with self._lock:
                if self._total <= self.limit_bytes:
                    return
                victim = next((d for d in self._recency if d not in self._pins), None)
                if victim is None:
                    return  # everything left is in use
                self._drop_locked(victim)
                self.evicted += 1
            self._verified.forget(victim)
            try:
                os.unlink(self.path_for(victim))
            except FileNotFoundError:
                pass

