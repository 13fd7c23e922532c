"""Blob readers: sized, random-access bytes of one layer blob.

Everything above this step (footer, TOC, layer view) reads blobs only through
`BlobReader`, so a local file and a registry blob are interchangeable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from .errors import FormatError


class BlobReader(Protocol):
    """Random access to one blob. `read_range` returns exactly `length` bytes or raises."""

    @property
    def size(self) -> int: ...

    @property
    def name(self) -> str:
        """What to call this blob in error messages (a path or `repo@digest`)."""
        ...

    def read_range(self, offset: int, length: int) -> bytes: ...


def check_range(blob: BlobReader, offset: int, length: int) -> None:
    """Refuse ranges outside the blob: a hostile TOC may point anywhere."""
    if offset < 0 or length < 0 or offset + length > blob.size:
        raise FormatError(
            f"{blob.name}: range [{offset}, {offset + length}) lies outside the blob "
            f"of {blob.size} bytes"
        )


@dataclass
class LocalBlob:
    """A blob in a local file."""

    path: Path
    _fd: int = field(init=False, repr=False)
    _size: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def name(self) -> str:
        return str(self.path)

    def read_range(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{self.path}: short read at offset {offset}")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "LocalBlob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- streaming ranges


def stream_range(blob: BlobReader, offset: int, length: int) -> Iterator[bytes]:
    """Bytes [offset, offset+length) of `blob` in pieces as they arrive, `length` bytes
    in all or an error: its own `stream_range` (a registry blob streams one ranged GET,
    resumed if it breaks: registry.RegistryBlob), else the range in one piece."""
    check_range(blob, offset, length)
    if length == 0:
        return
    own = getattr(blob, "stream_range", None)
    if own is not None:
        yield from own(offset, length)
        return
    yield blob.read_range(offset, length)
