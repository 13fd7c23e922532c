"""The last bytes of registry blobs, kept on disk, so a restarted worker reopens layers
without the network.

`Layer.open` reads a blob's footer (its last bytes) every time, to find the TOC; with the
TOC's index cached, that read is the only network request of an open. A worker that keeps
the tail it read once can reopen the layer while the registry is down, and then serve every
chunk its store holds.

    INDEX/tails/HEX   the last bytes of the blob sha256:HEX (at most TAIL_LIMIT), 0600

A blob digest names immutable bytes, so a kept tail stays right. It is still treated as
untrusted input like any footer: Layer.open parses it with the same checks, and a cached
index is used only when its recorded format, blob size and TOC offset agree with it.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .blob import BlobReader, stream_range
from .dirs import ensure_private_dir, new_private_file, write_all

log = logging.getLogger(__name__)

TAIL_LIMIT = 1 << 20  # a footer read longer than this (a whole TOC) is not worth keeping
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


def tail_path(tails_dir: Path, blob_digest: str) -> Path | None:
    """Where the tail of `blob_digest` is kept (None for a digest that is not sha256)."""
    match = _DIGEST.match(blob_digest)
    return tails_dir / match.group(1) if match else None


@dataclass
class TailKeepingBlob:
    """A BlobReader that answers reads of the blob's kept tail from disk and keeps the
    longest tail read it forwards (up to TAIL_LIMIT bytes)."""

    blob: BlobReader
    path: Path
    _tail: bytes | None = field(default=None, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def name(self) -> str:
        return self.blob.name

    def read_range(self, offset: int, length: int) -> bytes:
        tail = self._kept()
        if self._in_tail(tail, offset, length):
            start = offset - (self.size - len(tail))
            return tail[start:start + length]
        data = self.blob.read_range(offset, length)
        if offset + length == self.size and 0 < length <= TAIL_LIMIT and (tail is None or length > len(tail)):
            self._keep(data)
        return data

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """The range as it streams (blob.stream_range): from the kept tail if it lies there,
        else from the blob (not kept: a streamed range is a TOC or file data)."""
        tail = self._kept()
        if self._in_tail(tail, offset, length):
            yield self.read_range(offset, length)
            return
        yield from stream_range(self.blob, offset, length)

    def _in_tail(self, tail: bytes | None, offset: int, length: int) -> bool:
        return tail is not None and length >= 0 and offset >= self.size - len(tail) and offset + length <= self.size

    def _kept(self) -> bytes | None:
        if not self._loaded:
            self._loaded = True
            self._tail = self._load()
        return self._tail

    def _load(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            # Ours, closed to others, no longer than the blob or the limit: else ignored.
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077
                    or not 0 < st.st_size <= min(TAIL_LIMIT, self.size)):
                return None
            data = os.pread(fd, st.st_size, 0)
        finally:
            os.close(fd)
        return data if data else None

    def _keep(self, data: bytes) -> None:
        """Best effort: a tail that cannot be written (a full disk) only costs a request later."""
        self._tail, self._loaded = data, True
        try:
            ensure_private_dir(self.path.parent)
            with new_private_file(self.path.parent) as (fd, tmp):
                write_all(fd, data)
                os.rename(tmp, self.path)
        except OSError as exc:
            log.info("%s: footer not kept at %s: %s", self.name, self.path, exc)
