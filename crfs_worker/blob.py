"""Blob readers: sized, random-access bytes of one layer blob.

Everything above this step (footer, TOC, layer view) reads blobs only through
`BlobReader`, so a local file and a registry blob are interchangeable.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .errors import FormatError, RangeNotSupportedError, RegistryError


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


class RangeStreamer(Protocol):
    """A blob that can hand out a range in pieces as they arrive."""

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]: ...


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
    in all or an error. A registry blob streams one ranged GET (resumed if it breaks); a
    blob that cannot stream gives the range in one piece."""
    check_range(blob, offset, length)
    if length == 0:
        return
    own = getattr(blob, "stream_range", None)
    if own is not None:
        yield from own(offset, length)
        return
    counted = _counting_wrapper(blob)
    if counted is not None:
        yield from _counted_stream(counted, offset, length)
        return
    registry = _registry_blob(blob)
    if registry is not None:
        yield from _registry_stream(registry, offset, length)
        return
    yield blob.read_range(offset, length)


def _counting_wrapper(blob: BlobReader) -> Any | None:
    """lowerlayer.CountingBlob (`blob`, `rounds`, `stats`) has no stream_range of its own:
    its inner blob is streamed here and counted as one request, as its read_range would."""
    inner = getattr(blob, "blob", None)
    if inner is None or not hasattr(blob, "rounds") or not hasattr(blob, "stats"):
        return None
    return blob


def _counted_stream(wrapper: Any, offset: int, length: int) -> Iterator[bytes]:
    delivered, new_round = 0, False
    try:
        with wrapper.rounds.request() as new_round:
            for piece in stream_range(wrapper.blob, offset, length):
                delivered += len(piece)
                yield piece
    finally:
        # Also a stream closed early (a background range yielding to a reader): the
        # request was made and these bytes crossed the link.
        if delivered:
            wrapper.stats.count_fetch(delivered, new_round)


def _registry_blob(blob: BlobReader) -> Any | None:
    from .registry import RegistryBlob  # the registry stack loads only when needed

    return blob if isinstance(blob, RegistryBlob) else None


def _registry_stream(blob: Any, offset: int, length: int) -> Iterator[bytes]:
    config = blob.client.config
    bound = ResumeBound(config.retry.attempts, config.retry.total_max,
                        config.retry.backoff_base, config.retry.backoff_max)
    yield from resuming(lambda at, count: _registry_pieces(blob, at, count), offset, length, bound, blob.name)


def _registry_pieces(blob: Any, offset: int, length: int) -> Iterator[bytes]:
    """One try: a ranged GET read piece by piece. Opening it is retried by the client
    (connection errors, 5xx); a body that breaks off, stalls for the read timeout or takes
    longer than `range_body` seconds is StreamBroken."""
    import httpx

    response = _open_registry_range(blob, offset, length)
    limit = blob.client.config.timeouts.range_body
    deadline = time.monotonic() + limit
    received = 0
    try:
        for piece in response.iter_bytes(64 << 10):
            received += len(piece)
            yield piece
            if received < length and time.monotonic() > deadline:
                raise StreamBroken(f"body too slow: {received} of {length} bytes in {limit} s")
    except httpx.HTTPError as exc:
        raise StreamBroken(f"{type(exc).__name__}: {exc}") from None
    finally:
        response.close()


def _open_registry_range(blob: Any, offset: int, length: int) -> Any:
    """The open response to a ranged GET of a registry blob (the source that answered is
    kept, as RegistryBlob.read_range does). Uses the client's request machinery (auth,
    retries, mirrors) from registry.py, which has no streaming range read of its own."""
    from .auth import pull_scope
    from .registry import _check_content_range

    client, last = blob.client, offset + length - 1

    def open_from(source: Any) -> Any:
        ref = source.reference
        what = f"blob {ref.repository}@{blob.digest} range [{offset}, {offset + length})"

        def check(response: Any) -> Any:
            if response.status_code == 200 and not (offset == 0 and length == blob.size):
                raise RangeNotSupportedError(
                    f"registry {ref.registry}: {what}: the registry ignored the Range header and "
                    "answered with the whole blob (HTTP 200); crfs needs registries that serve byte ranges")
            if response.status_code == 206:
                _check_content_range(response, ref.registry, what, offset, last)
            return response

        return client._call(source, "GET", f"blobs/{blob.digest}", (pull_scope(ref.repository),),
                            f"GET {what}", headers={"Range": f"bytes={offset}-{last}"},
                            accept={200, 206}, handle=check, keep_open=True)

    source = blob._source
    if source is not None:
        try:
            return open_from(source)
        except RegistryError:
            if not source.mirror:
                raise
    response, blob._source = client._from_pull_sources_with_source(blob.ref, open_from)
    return response


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
