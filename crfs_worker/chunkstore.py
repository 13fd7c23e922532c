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
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .dirs import ensure_private_dir
from .errors import CrfsError, VerificationError

log = logging.getLogger(__name__)

DIGEST_BYTES = 32          # sha256
STALE_TEMP_SECONDS = 3600  # a temp file this old belongs to a writer that died
_HASH_PIECE = 1 << 20


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
    _verified: VerifiedFiles = field(default_factory=VerifiedFiles, init=False, repr=False)
    _fanout_ready: set[str] = field(default_factory=set, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Counted for the log and tests: files found altered on disk and removed.
    discarded: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        ensure_private_dir(self.root)
        ensure_private_dir(self.root / "sha256")
        ensure_private_dir(self.root / "tmp")
        self._remove_stale_temps()

    def path_for(self, digest: bytes) -> Path:
        hexdigest = _check_digest(digest).hex()
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    # ---------------------------------------------------------------- reading

    def has(self, digest: bytes, size: int) -> bool:
        """Cheap: a file of the right size, owner and mode is there (its bytes unchecked)."""
        try:
            st = os.lstat(self.path_for(digest))
        except FileNotFoundError:
            return False
        return is_private_file(st, size)

    def open(self, digest: bytes, size: int) -> int | None:
        """A read-only fd on the chunk's verified bytes, or None if they are not stored
        (a file that fails its check is removed). The caller owns the fd."""
        path = self.path_for(digest)
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

    def put(self, digest: bytes, data: bytes) -> None:
        """Stores `data` under `digest`; VerificationError if it does not hash to it."""
        _check_digest(digest)
        if hashlib.sha256(data).digest() != digest:
            raise VerificationError(f"chunk store: bytes offered for sha256:{digest.hex()} do not match it")
        final = self.path_for(digest)
        self._ensure_fanout(final.parent)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="chunk-")  # created 0600
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.rename(tmp, final)
            self._verified.remember(digest, fd)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)

    def _ensure_fanout(self, directory: Path) -> None:
        with self._lock:
            if directory.name in self._fanout_ready:
                return
        ensure_private_dir(directory)
        with self._lock:
            self._fanout_ready.add(directory.name)

    def _discard(self, digest: bytes, why: str) -> None:
        path = self.path_for(digest)
        log.warning("chunk store: %s %s: removed", path, why)
        self._verified.forget(digest)
        with self._lock:
            self.discarded += 1
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _remove_stale_temps(self) -> None:
        # Another worker (another runtime dir) may share this store: leave fresh temps alone.
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self.root / "tmp"):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
