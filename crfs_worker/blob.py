"""Blob readers: sized, random-access bytes of one layer blob.

Everything above this step (footer, TOC, layer view) reads blobs only through
`BlobReader`, so a local file and a registry blob are interchangeable.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .errors import FormatError, RegistryError


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


class StreamBroken(Exception):
    """One try of a streamed range ended early (connection lost, too slow): the stream
    resumes from the first byte not yet delivered, within its retry bound."""


@dataclass(frozen=True)
class ResumeBound:
    """How often, and for how long, a streamed range may be resumed: at most `attempts`
    tries in all, none started more than `deadline` seconds after the first."""

    attempts: int = 4
    deadline: float = 30.0
    backoff_base: float = 0.25
    backoff_max: float = 4.0

    def delay(self, failures: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))


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


def resuming(open_at: Callable[[int, int], Iterator[bytes]], offset: int, length: int,
             bound: ResumeBound, name: str) -> Iterator[bytes]:
    """The pieces of [offset, offset+length) from tries of `open_at(at, count)`; a try
    that raises StreamBroken is followed by one from the first byte not yet delivered,
    within `bound`. Extra bytes a try sends are an error, never delivered."""
    started = time.monotonic()
    done = failures = 0
    while True:
        pieces = open_at(offset + done, length - done)
        try:
            for piece in pieces:
                if done + len(piece) > length:
                    raise FormatError(f"{name}: range [{offset}, {offset + length}): more bytes than asked for")
                done += len(piece)
                yield piece
            if done == length:
                return
            raise StreamBroken(f"ended after {done} of {length} bytes")
        except StreamBroken as exc:
            failures += 1
            delay = bound.delay(failures)
            if failures >= bound.attempts or time.monotonic() - started + delay > bound.deadline:
                raise RegistryError(f"{name}: range [{offset}, {offset + length}) broke off after "
                                    f"{done} bytes, {failures} attempt(s): {exc}") from None
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        time.sleep(delay)
