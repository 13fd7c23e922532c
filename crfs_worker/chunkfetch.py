"""Verified chunks for readers: from the chunk store, else fetched once from the blob.

Every path that needs file bytes (the view's reads, the small-file cache, the mount-time
prefetch, the background fetch) comes here, so that:
- a chunk with a digest is fetched from the registry at most once per worker, however many
  readers, layers and images want it at the same time (single-flight: the first caller
  fetches, the others wait for it and then read the store);
- it is verified (`decode`) before it is stored, and stored before anyone reads it;
- on-demand reads go first (`FetchGate`): background fetches start only after on-demand
  fetches have been quiet for a while, and a background stream yields (stops, releasing
  the chunks it has not landed) as soon as an on-demand fetch starts;
- a streamed range (the mount-time prefetch, `stream_span`) lands each chunk as soon as its
  bytes are in; if the stream fails, the chunks it has not landed are released, and their
  waiters fetch them on demand instead of sharing its failure.
Chunks without a digest (legacy stargz, only with --allow-unverified) cannot be stored by
digest: they are single-flighted per layer and kept in a small memory cache instead.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Hashable, Iterator, Protocol, Sequence

from .blob import BlobReader, stream_range
from .chunkstore import ChunkStore, StoreFullError
from .errors import CrfsError
from .readrun import ReadRun
from .recent import Recent

log = logging.getLogger(__name__)

UNVERIFIED_CACHE_BYTES = 16 << 20
# Verified chunks just fetched, kept in memory too: a sequential reader reads each one
# right after it lands, in many small reads (128 KiB from fuse-overlayfs), each of which
# would otherwise open, check, read and close the chunk's store file.
LANDED_CACHE_BYTES = 32 << 20


class ChunkLike(Protocol):
    """The part of layer.Chunk this module uses."""

    path: str
    ino: int
    offset: int
    size: int
    cstart: int
    cend: int
    digest: bytes | None
    zeros: bool

    @property
    def key(self) -> tuple[int, int]: ...


class FetchTarget(Protocol):
    """One layer as the fetcher sees it (lowerlayer.LiveLayer)."""

    num: int

    @property
    def blob(self) -> BlobReader: ...

    def decode(self, chunk: Any, raw: bytes) -> bytes:
        """The chunk's verified bytes (VerificationError otherwise, counted)."""
        ...

    def note_local(self, digest: bytes, size: int) -> None:
        """The layer's chunk `digest` is in the store (for its `bytes in cache`)."""
        ...

    def following(self, chunk: Any, end: int) -> Sequence[Any]:
        """The digested chunks right after `chunk` in the blob, ending by offset `end`
        (Layer.chunks_after)."""
        ...

    def preceding(self, chunk: Any, start: int) -> Sequence[Any]:
        """The digested chunks right before `chunk` in the blob, from offset `start`, in
        blob order (Layer.chunks_before)."""
        ...


def flight_key(target: FetchTarget, chunk: ChunkLike) -> Hashable:
    """What makes two chunks the same: their digest, or for undigested chunks their place."""
    return chunk.digest if chunk.digest is not None else (target.num, chunk.key)


def storable(chunk: ChunkLike) -> bool:
    return chunk.digest is not None


@dataclass(frozen=True)
class Span:
    """One blob range to request and the chunks it holds."""

    start: int
    end: int
    chunks: tuple[Any, ...]
    extra: tuple[Any, ...] = ()  # neighbours fetched along: their failures are theirs alone

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_spans(chunks: Sequence[ChunkLike], gap: int, limit: int) -> list[Span]:
    """Chunks grouped into blob ranges: sorted by offset, merged while the hole between two
    is at most `gap` bytes and the range stays within `limit` bytes (a chunk larger than
    `limit` is a range of its own)."""
    spans: list[Span] = []
    start = end = 0
    group: list[ChunkLike] = []
    for chunk in sorted(chunks, key=lambda c: (c.cstart, c.cend)):
        if group and chunk.cstart <= end + gap and max(end, chunk.cend) - start <= limit:
            group.append(chunk)
            end = max(end, chunk.cend)
            continue
        if group:
            spans.append(Span(start, end, tuple(group)))
        group, start, end = [chunk], chunk.cstart, chunk.cend
    if group:
        spans.append(Span(start, end, tuple(group)))
    return spans


def spans_for(chunks: Sequence[ChunkLike], gap: int, limit: int) -> list[Span]:
    """`plan_spans` for chunks that need bytes; zeros chunks (which need none, whatever
    range the TOC gives them) come first in an empty span."""
    zeros = tuple(c for c in chunks if c.zeros)
    spans = [Span(0, 0, zeros)] if zeros else []
    return spans + plan_spans([c for c in chunks if not c.zeros], gap, limit)


@dataclass(frozen=True)
class AheadPolicy:
    """How far an on-demand fetch reaches beyond what was asked for.

    - `coalesce`: a request for chunks spanning fewer compressed bytes than this also takes
      the chunks that follow them in the blob (other files': a directory's files are
      adjacent), up to this many bytes in all, so that the files opened next are local.
      One request still: on a slow link its cost is one round trip plus the bytes.
    - `read_ahead`: a file read sequentially has its next chunks fetched, up to this many
      compressed bytes beyond the read, by `parallel` requests at once, decoded and
      verified in those threads (zlib, zstd and sha256 release the GIL).
    0 turns either off."""

    coalesce: int = 1 << 20
    read_ahead: int = 32 << 20
    parallel: int = 4
    request_limit: int = 16 << 20   # compressed bytes per read-ahead request
    sequential_run: int = 4 << 20  # bytes read back to back before reading ahead
    # A read within this much of the current run continues it: the kernel's readahead has
    # several reads in flight, and the view's threads may see them out of order.
    sequential_slack: int = 512 << 10
    tracked_files: int = 256        # files whose last read is remembered


# ---------------------------------------------------------------------------- priority


@dataclass
class FetchGate:
    """On-demand fetches before background ones.

    Counts the on-demand fetches in progress (and readers waiting on a fetch) and when the
    last one ended. A background fetch starts only once none has run for a quiet period
    (`wait_quiet`), and a background stream already open yields to the next that starts
    (`interrupted`, checked between pieces of the stream). A mount counts as activity
    (`note_activity`): the container that follows starts reading at once. `clock` is
    injectable for tests."""

    clock: Callable[[], float] = time.monotonic
    _active: int = field(default=0, init=False)
    _started: int = field(default=0, init=False)  # activity so far: what a background span watches
    _last: float = field(default=float("-inf"), init=False)
    _waiting: int = field(default=0, init=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)

    @contextmanager
    def on_demand(self) -> Iterator[None]:
        with self._changed:
            self._active += 1
            self._started += 1
            self._last = self.clock()
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                self._last = self.clock()  # the quiet period counts from the end
                self._changed.notify_all()

    def note_activity(self) -> None:
        """Something that on-demand reads follow (a mount): background fetches wait anew,
        and the open ones yield."""
        with self._changed:
            self._started += 1
            self._last = self.clock()
            self._changed.notify_all()

    def wait_quiet(self, stop: threading.Event, quiet: float = 0.0, poll: float = 0.5) -> int:
        """Returns once no on-demand fetch has run for `quiet` seconds (or `stop` is set):
        the token that `interrupted` compares against."""
        with self._changed:
            self._waiting += 1
            try:
                while not stop.is_set():
                    left = quiet - (self.clock() - self._last)
                    if not self._active and left <= 0:
                        break
                    self._changed.wait(poll if self._active else min(poll, left))
            finally:
                self._waiting -= 1
            return self._started

    def interrupted(self, token: int) -> bool:
        """Whether on-demand activity started since `wait_quiet` returned `token`."""
        return self._started != token

    @property
    def active(self) -> int:
        """On-demand fetches (and readers waiting on fetches) in progress now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Background fetches waiting for quiet now (for tests and stats)."""
        return self._waiting

    def recheck(self) -> None:
        """Wakes the waiters to look at the clock again (tests that move an injected clock)."""
        with self._changed:
            self._changed.notify_all()


# ---------------------------------------------------------------------------- single flight


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    data: bytes | None = None  # kept only for chunks the store cannot hold
    released: bool = False  # given up unfetched: a waiter fetches the chunk itself


def _same_error(error: BaseException) -> BaseException:
    """A fresh copy of another thread's failure to raise here (same class and message)."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    return copy if isinstance(copy, BaseException) else error


@dataclass
class _ReadState:
    """The reads of one file: their current run, and after which chunk the read-ahead was
    last planned (-1: not yet)."""

    run: ReadRun = field(default_factory=ReadRun)
    planned: int = -1


@dataclass
class ChunkFetcher:
    store: ChunkStore
    gate: FetchGate = field(default_factory=FetchGate)
    policy: AheadPolicy = field(default_factory=AheadPolicy)
    read_gap: int = 0  # on-demand reads merge only touching ranges: no byte they do not need
    # Recently decoded undigested chunks, so the kernel's small reads of one chunk fetch it once.
    _memory: "Recent[Hashable, bytes]" = field(default_factory=lambda: Recent(UNVERIFIED_CACHE_BYTES, len),
                                               init=False, repr=False)
    # Verified bytes of digested chunks this worker fetched lately, by digest.
    _landed: "Recent[bytes, bytes]" = field(default_factory=lambda: Recent(LANDED_CACHE_BYTES, len),
                                            init=False, repr=False)
    _flights: dict[Hashable, _Flight] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _reads: "OrderedDict[tuple[int, int], _ReadState]" = field(
        default_factory=OrderedDict, init=False, repr=False)
    _pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict, init=False, repr=False)
    _pending: set["Future[None]"] = field(default_factory=set, init=False, repr=False)
    _closed: bool = field(default=False, init=False)

    def close(self) -> None:
        """No more read-ahead or detached work; fetches already started finish (their
        readers wait for them), streams stop at their next piece (releasing their claims)."""
        with self._lock:
            pools, self._pools, self._closed = list(self._pools.values()), {}, True
        for pool in pools:
            pool.shutdown(wait=False)

    def detach(self, fn: Callable[..., None], *args: Any) -> bool:
        """Runs `fn` in a thread of its own kind (the mount-time prefetches: long streams
        that must not hold up read-ahead); False once closed. `settle` waits for it too."""
        return self._run_in("crfs-prefetch", fn, *args)

    def settle(self, timeout: float | None = None) -> bool:
        """Waits until the read-ahead, neighbour and detached work started so far is done;
        False if some is still running after `timeout` seconds."""
        with self._lock:
            pending = list(self._pending)
        _done, running = wait(pending, timeout)
        return not running

    # ---------------------------------------------------------------- readers

    def read(self, target: FetchTarget, chunks: Sequence[ChunkLike], offset: int, size: int) -> bytes:
        """Verified bytes [offset, offset+size) of the file that `chunks` (in file order,
        covering the range, as Layer.chunks_for returns them) belong to."""
        if not chunks:
            return b""
        self._read_ahead(target, chunks, offset, size)
        # Pinned: a size-limited store must not evict what this read is about to use.
        with self.store.pinned(c.digest for c in chunks):
            fresh = self.ensure(target, chunks, on_demand=True)
            pieces = []
            for chunk in chunks:
                lo = max(offset - chunk.offset, 0)
                hi = min(offset + size - chunk.offset, chunk.size)
                if hi > lo:
                    pieces.append(self._piece(target, chunk, lo, hi, fresh))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _piece(self, target: FetchTarget, chunk: ChunkLike, lo: int, hi: int,
               fresh: dict[Hashable, bytes]) -> bytes:
        if chunk.zeros and chunk.digest is None:
            return bytes(hi - lo)  # zeros by definition
        key = flight_key(target, chunk)
        data = fresh.get(key)
        if data is not None:
            return data[lo:hi]
        assert chunk.digest is not None  # undigested chunks always come back in `fresh`
        landed = self._landed.get(chunk.digest)
        if landed is not None and len(landed) == chunk.size:
            return landed[lo:hi]
        piece = self.store.read(chunk.digest, chunk.size, lo, hi - lo)
        if piece is not None:
            return piece
        # Removed or altered since `ensure` saw it: fetch it once more.
        data = self.ensure(target, [chunk], on_demand=True, trust_store=False).get(key)
        if data is None:
            piece = self.store.read(chunk.digest, chunk.size, lo, hi - lo)
            if piece is None:
                raise CrfsError(f"{target.blob.name}: {chunk.path}: chunk at file offset {chunk.offset} "
                                f"keeps disappearing from the chunk store {self.store.root}")
            return piece
        return data[lo:hi]

    def open_fd(self, target: FetchTarget, chunk: ChunkLike) -> int | None:
        """A read-only fd on a digested chunk's stored bytes (fetched if need be), or None."""
        assert chunk.digest is not None
        for _ in range(2):
            with self.store.pinned([chunk.digest]):
                fresh = self.ensure(target, [chunk], on_demand=True)
                fd = self.store.open(chunk.digest, chunk.size)
            if fd is None and fresh:
                return None  # fetched but not kept (a full disk): the caller serves another way
            if fd is not None:
                target.note_local(chunk.digest, chunk.size)
                return fd
        return None

    # ---------------------------------------------------------------- making chunks local

    def ensure(self, target: FetchTarget, chunks: Sequence[ChunkLike], *, on_demand: bool,
               trust_store: bool = True) -> dict[Hashable, bytes]:
        """Makes `chunks` local: digested ones in the store, others in the returned map
        (by flight key), which also holds the bytes of chunks this call fetched itself.
        On demand, a small request also takes the chunks that follow (AheadPolicy.coalesce)."""
        fresh: dict[Hashable, bytes] = {}
        missing: dict[Hashable, ChunkLike] = {}
        for chunk in chunks:
            key = flight_key(target, chunk)
            if key in missing or key in fresh:
                continue
            if chunk.zeros and chunk.digest is None:
                continue
            if chunk.digest is not None:
                if trust_store and self.store.has(chunk.digest, chunk.size):
                    target.note_local(chunk.digest, chunk.size)
                    continue
            else:
                data = self._memory.get(key)
                if data is not None:
                    fresh[key] = data
                    continue
            missing[key] = chunk
        if not missing:
            return fresh
        # A reader that waits on someone else's flight is on-demand too: a background
        # stream holding its chunk yields (releasing it) rather than make it wait behind
        # the rest of a long range.
        with self.gate.on_demand() if on_demand else nullcontext():
            fresh.update(self._fetch_or_wait(target, list(missing.values()), on_demand, trust_store))
        return fresh

    def _fetch_or_wait(self, target: FetchTarget, missing: list[ChunkLike], on_demand: bool,
                       trust_store: bool) -> dict[Hashable, bytes]:
        fresh: dict[Hashable, bytes] = {}
        mine, theirs = self._claim(target, missing)
        if mine:
            spans = spans_for(mine, self.read_gap, 1 << 62)
            if on_demand:
                spans = [self._coalesced(target, span) for span in spans]
            fresh.update(self._fetch_claimed(target, spans))
        released: list[ChunkLike] = []
        for chunk, key, flight in theirs:
            flight.done.wait()
            if flight.released:
                released.append(chunk)
            elif flight.error is not None:
                raise _same_error(flight.error)
            elif flight.data is not None:
                fresh[key] = flight.data
        if released:  # their fetcher gave up on them (a failed or yielding stream): fetch them here
            fresh.update(self.ensure(target, released, on_demand=on_demand, trust_store=trust_store))
        return fresh

    def stream_span(self, target: FetchTarget, span: Span,
                    on_stored: Callable[[int], None] | None = None, *,
                    should_yield: Callable[[], bool] | None = None, narrow: bool = False) -> int:
        """Fetches the digested chunks of `span` that are neither stored nor in flight, in
        ONE request for the whole span (with `narrow`, from the first of those chunks to the
        last), landing each as soon as its bytes are in: it is decoded, verified and stored
        (in a thread of its own, so the network read never waits on inflate), and its
        waiters wake then. `on_stored(n)` is told of each chunk stored. If the stream fails,
        or a chunk fails verification, the chunks not landed are released (their waiters
        fetch them on demand) and the first failure is raised once the rest has landed.
        If `should_yield()` turns true (checked before the request and after each piece of
        the stream), the stream is closed there: the chunks whose bytes are in land, the
        others are released, without error. Returns the bytes stored."""
        wanted = []
        for chunk in span.chunks:
            if chunk.digest is None:
                continue
            if self.store.check(chunk.digest, chunk.size):
                target.note_local(chunk.digest, chunk.size)
            elif chunk.zeros or span.start <= chunk.cstart <= chunk.cend <= span.end:
                wanted.append(chunk)  # (a chunk outside the span is left to on-demand reads)
        mine, _theirs = self._claim(target, wanted)
        if not mine:
            return 0
        return self._stream_claimed(target, span, mine, on_stored, should_yield=should_yield, narrow=narrow)

    def _stream_claimed(self, target: FetchTarget, span: Span, mine: Sequence[ChunkLike],
                        on_stored: Callable[[int], None] | None = None, *,
                        should_yield: Callable[[], bool] | None = None, narrow: bool = False) -> int:
        """`stream_span` for chunks this caller has claimed: every claim is landed or
        released before this returns."""
        lander = _Lander(self, target, on_stored)
        # Zeros chunks need no bytes; the others land in blob order as the stream brings them.
        ordered = deque(sorted(mine, key=lambda c: (not c.zeros, c.cstart, c.cend)))
        try:
            while ordered and ordered[0].zeros:
                lander.put(ordered.popleft(), b"")
            if ordered and not (should_yield is not None and should_yield()):
                if narrow:
                    span = Span(ordered[0].cstart, max(c.cend for c in ordered), span.chunks)
                self._stream_into(target, span, ordered, lander, should_yield)
        finally:
            for chunk in ordered:  # not handed over: the stream failed or stopped
                self._land(target, chunk, None, None, released=True)
            lander.finish()
        if lander.errors:
            raise lander.errors[0]
        return lander.stored

    def _stream_into(self, target: FetchTarget, span: Span, ordered: "deque[ChunkLike]",
                     lander: "_Lander", should_yield: Callable[[], bool] | None = None) -> None:
        """Reads the span's stream, handing each chunk of `ordered` (by blob offset) to
        `lander` once its bytes are in, and keeping only the bytes chunks still need;
        stops early (chunks left in `ordered`) once `should_yield()`."""
        # Closed at once on failure: the request ends (and stops counting as in flight).
        # Closed too when it yields: a partly received chunk is fetched again later.
        with closing(stream_range(target.blob, span.start, span.length)) as pieces:
            self._stream_until(target, pieces, _Gathered(span.start), ordered, lander.put,
                               lambda: bool(ordered) and should_yield is not None and should_yield())

    # ---------------------------------------------------------------- beyond the request

    def _coalesced(self, target: FetchTarget, span: Span) -> Span:
        """`span` extended over the claimable chunks right after it and, within a quarter
        of the coalesce window, right before it (a directory's files are opened in the
        program's order, not the blob's); they travel as `extra`. A chunk that is local
        or in flight ends a run."""
        limit = self.policy.coalesce
        fetched = [c for c in span.chunks if not c.zeros]
        if not fetched or span.length >= limit:
            return span
        first = min(fetched, key=lambda c: c.cstart)
        last = max(fetched, key=lambda c: c.cend)
        try:
            # Within the blob: a TOC is untrusted, and a bad neighbour must not fail the asker.
            after = target.following(last, min(span.start + limit, target.blob.size))
            before = target.preceding(first, max(0, span.start - limit // 4))
        except Exception as exc:  # optional: the asked-for chunks (claimed) must not wait on this
            log.warning("%s: %s: no neighbours fetched: %s", target.blob.name, last.path, exc)
            return span
        run = self._claim_run(target, after)
        back = self._claim_run(target, before[::-1])[::-1]  # nearest first: a claimed one ends it
        if not run and not back:
            return span
        return Span(back[0].cstart if back else span.start, run[-1].cend if run else span.end,
                    span.chunks, tuple(back) + tuple(run))

    def _claim_run(self, target: FetchTarget, chunks: Sequence[ChunkLike]) -> list[ChunkLike]:
        """Claims `chunks` in order up to the first that is local or someone's flight."""
        run: list[ChunkLike] = []
        with self._lock:
            for chunk in chunks:
                key = flight_key(target, chunk)
                if chunk.digest is None or key in self._flights or self.store.has(chunk.digest, chunk.size):
                    break
                self._flights[key] = _Flight()
                run.append(chunk)
        return run

    def _read_ahead(self, target: FetchTarget, chunks: Sequence[ChunkLike], offset: int, size: int) -> None:
        """For a sequential reader of a file: starts fetching the file's next chunks (those
        neither local nor in flight), a few requests at once, without waiting for them."""
        last = chunks[-1]
        if self.policy.read_ahead <= 0 or last.digest is None:
            return
        if not self._sequential(target, last, offset, size):
            return
        try:
            after = target.following(last, min(last.cend + self.policy.read_ahead, target.blob.size))
        except Exception as exc:  # optional: the reader's own read must not fail on this
            log.warning("%s: %s: no read-ahead: %s", target.blob.name, last.path, exc)
            return
        own = [c for c in after if c.ino == last.ino]
        mine, _theirs = self._claim(target, own, lambda missing: self._worth_a_request(last, missing))
        if not mine:
            return
        # A request takes chunks up to request_limit and may exceed it by less than one
        # chunk: chunks a little larger than a quarter of the limit still go four at a time.
        slack = max(c.cend - c.cstart for c in mine) - 1
        for span in plan_spans(mine, 0, self.policy.request_limit + slack):
            if not self._submit(self._fetch_ahead, target, span):
                for chunk in span.chunks:
                    self._land(target, chunk, None, CrfsError(f"{target.blob.name}: the worker is stopping"))

    def _worth_a_request(self, last: ChunkLike, missing: list[ChunkLike]) -> bool:
        """Whether to fetch the missing chunks of a read-ahead window now: once they make
        a whole request (`request_limit`), or once the first of them is less than that
        ahead of the reader (the file's end, a window of few chunks). Not a request per
        chunk each time the reader crosses one: each costs a round trip, and the
        registry's and our per-request work."""
        limit = self.policy.request_limit
        first = min(c.cstart for c in missing)
        return sum(c.cend - c.cstart for c in missing) >= limit or first - last.cend < limit

    def _sequential(self, target: FetchTarget, last: ChunkLike, offset: int, size: int) -> bool:
        """Whether this read makes a run of back-to-back reads of the file at least
        `sequential_run` long, and read-ahead was not planned after `last` yet (records
        the read either way). Short runs (a loader reading headers, mmap faults) fetch
        no more than they ask for."""
        key = (target.num, last.ino)
        with self._lock:
            if self._closed:
                return False
            state = self._reads.pop(key, None) or _ReadState()
            if not state.run.note(offset, size, self.policy.sequential_slack):
                state.planned = -1  # a new run
            go = state.run.length >= self.policy.sequential_run and state.planned != last.offset
            if go:
                state.planned = last.offset
            self._reads[key] = state
            while len(self._reads) > self.policy.tracked_files:
                self._reads.popitem(last=False)
        return go

    def _fetch_ahead(self, target: FetchTarget, span: Span) -> None:
        """Streams a read-ahead span, each chunk landing as soon as its bytes are in (the
        reader waits for the chunk it needs, not for the whole request; receiving and
        decoding run in two threads). A chunk that fails is released: its reader fetches
        it again and gets the failure itself (VerificationError for bad bytes)."""
        try:
            with self.gate.on_demand():
                self._stream_claimed(target, span, span.chunks)
        except (CrfsError, OSError) as exc:  # released: a reader of these chunks fetches them
            log.info("%s: read-ahead of %s failed: %s", target.blob.name, span.chunks[0].path, exc)
        except Exception:
            log.exception("%s: read-ahead", target.blob.name)

    def _submit(self, fn: Callable[..., None], *args: Any) -> bool:
        """Runs `fn` in the fetch threads; False once closed."""
        return self._run_in("crfs-fetch", fn, *args)

    def _run_in(self, pool: str, fn: Callable[..., None], *args: Any) -> bool:
        """Runs `fn` in the threads named `pool`, started on first use; False once closed."""
        with self._lock:
            if self._closed:
                return False
            executor = self._pools.get(pool)
            if executor is None:
                executor = self._pools[pool] = ThreadPoolExecutor(max_workers=self.policy.parallel,
                                                                  thread_name_prefix=pool)
        try:
            future = executor.submit(fn, *args)
        except RuntimeError:  # shut down meanwhile
            return False
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return True

    def _forget(self, future: "Future[None]") -> None:
        with self._lock:
            self._pending.discard(future)

    # ---------------------------------------------------------------- flights

    def _claim(self, target: FetchTarget, chunks: Sequence[ChunkLike],
               worth: Callable[[list[ChunkLike]], bool] | None = None
               ) -> tuple[list[ChunkLike], list[tuple[ChunkLike, Hashable, _Flight]]]:
        """Splits missing chunks into those this caller fetches and the flights of those
        others are fetching; chunks that became local meanwhile are neither. With
        `worth`, claims the missing chunks only if `worth(them)`."""
        mine: dict[Hashable, ChunkLike] = {}
        theirs: list[tuple[ChunkLike, Hashable, _Flight]] = []
        with self._lock:
            for chunk in chunks:
                key = flight_key(target, chunk)
                flight = self._flights.get(key)
                if flight is not None:
                    theirs.append((chunk, key, flight))
                elif key not in mine and not self._landed_meanwhile(target, chunk):
                    mine[key] = chunk
            if worth is not None and mine and not worth(list(mine.values())):
                mine = {}
            for key in mine:
                self._flights[key] = _Flight()
        return list(mine.values()), theirs

    def _landed_meanwhile(self, target: FetchTarget, chunk: ChunkLike) -> bool:
        """Whether a fetch that ended after the caller looked has stored the chunk. A
        fetcher stores before it lands its flight, so with no flight in the table (checked
        under the lock) the store tells. (Undigested chunks may, rarely, be fetched twice:
        their bytes must come back to the caller, and the memory cache may drop them.)"""
        if chunk.digest is not None and self.store.has(chunk.digest, chunk.size):
            target.note_local(chunk.digest, chunk.size)
            return True
        return False

    def _land(self, target: FetchTarget, chunk: ChunkLike, data: bytes | None,
              error: BaseException | None, kept: bool = True, *, released: bool = False) -> None:
        """Ends the flight of a claimed chunk, waking whoever waits for it; bytes the store
        did not keep go to the waiters. A `released` chunk was not fetched: its waiters
        fetch it themselves."""
        key = flight_key(target, chunk)
        with self._lock:
            flight = self._flights.pop(key)
        flight.error = error
        flight.released = released
        if chunk.digest is None or not kept:
            flight.data = data
        flight.done.set()

    def _fetch_claimed(self, target: FetchTarget, spans: Sequence[Span]) -> dict[Hashable, bytes]:
        """Fetches, verifies and stores claimed chunks (one request per span); every claim
        is landed (or, for a span's `extra` neighbours, released), with its error if it
        failed. Raises the first failure of an asked-for chunk after all of those landed.
        A span with neighbours streams (`_stream_with_neighbours`): the caller waits for
        its own chunks only; asked chunks a broken stream did not bring are fetched again
        here, alone."""
        out: dict[Hashable, bytes] = {}
        first_error: BaseException | None = None
        todo = deque(spans)
        while todo:
            span = todo.popleft()
            try:
                if span.extra:
                    got, error, left = self._stream_with_neighbours(target, span)
                    todo.extendleft(reversed(plan_spans(left, self.read_gap, 1 << 62)))
                else:
                    got, error = self._fetch_plain(target, span)
            except BaseException as exc:
                for rest in todo:  # asked chunks share the failure; neighbours go back to their readers
                    for chunk in rest.chunks:
                        self._land(target, chunk, None, exc)
                    for chunk in rest.extra:
                        self._land(target, chunk, None, None, released=True)
                raise
            out.update(got)
            first_error = first_error or error
        if first_error is not None:
            raise first_error
        return out

    def _fetch_plain(self, target: FetchTarget, span: Span
                     ) -> tuple[dict[Hashable, bytes], BaseException | None]:
        """One request for a span without neighbours, read whole; lands every chunk.
        Returns their bytes and the first chunk's failure; raises if the request fails."""
        try:
            raw = self._request(target, span)
        except BaseException as exc:
            for chunk in span.chunks:
                self._land(target, chunk, None, exc)
            raise
        out: dict[Hashable, bytes] = {}
        error: BaseException | None = None
        for chunk in span.chunks:
            try:
                data, kept = self._decode_and_keep(target, chunk, raw, span.start)
            except BaseException as exc:
                self._land(target, chunk, None, exc)
                error = error or exc
                continue
            self._land(target, chunk, data, None, kept)
            out[flight_key(target, chunk)] = data
        return out, error

    def _stream_with_neighbours(self, target: FetchTarget, span: Span
                                ) -> tuple[dict[Hashable, bytes], BaseException | None, list[ChunkLike]]:
        """Streams a span of asked chunks and their neighbours (`_coalesced`): each chunk
        lands as soon as its bytes are in, the asked ones decoded in this thread, the
        neighbours in the stream's decode thread. Once every asked chunk has landed, the
        rest of the stream goes on in a fetch thread (`_stream_rest`) and this returns:
        the reader does not wait for the neighbours. Returns the asked chunks' bytes, the
        first failure of one (a corrupt chunk fails only itself), and the asked chunks a
        broken stream did not bring: still claimed, for the caller to fetch alone. The
        neighbours it did not land are released (their readers fetch them)."""
        asked = {flight_key(target, c): c for c in span.chunks}
        lander = _Lander(self, target)
        ordered = deque(sorted(span.chunks + span.extra, key=lambda c: (not c.zeros, c.cstart, c.cend)))
        out: dict[Hashable, bytes] = {}
        errors: list[BaseException] = []

        def hand(chunk: ChunkLike, raw: bytes) -> None:
            key = flight_key(target, chunk)
            if asked.pop(key, None) is None:
                lander.put(chunk, raw)
                return
            try:
                data, kept = self._decode_and_keep(target, chunk, raw, chunk.cstart)
            except BaseException as exc:
                self._land(target, chunk, None, exc)
                errors.append(exc)
                return
            self._land(target, chunk, data, None, kept)
            out[key] = data

        while ordered and ordered[0].zeros:
            hand(ordered.popleft(), b"")
        pieces = stream_range(target.blob, span.start, span.length)
        gathered = _Gathered(span.start)
        handed_off = False
        try:
            try:
                if asked:
                    self._stream_until(target, pieces, gathered, ordered, hand, lambda: not asked)
                if ordered:
                    # Threads of their own: a stream paused behind long read-ahead streams
                    # would hold its neighbours' readers (and a connection) meanwhile.
                    handed_off = self._run_in("crfs-neighbours", self._stream_rest, target, pieces,
                                              gathered, ordered, lander)
            finally:
                if not handed_off:
                    self._end_stream(target, pieces, ordered, lander, keep=asked.keys())
        except Exception as exc:  # the stream broke: the asked chunks left are fetched alone
            log.info("%s: %s: on-demand stream broke off: %s", target.blob.name, span.chunks[0].path, exc)
        except BaseException as exc:
            for chunk in asked.values():
                self._land(target, chunk, None, exc)
            raise
        return out, (errors[0] if errors else None), list(asked.values())

    def _stream_until(self, target: FetchTarget, pieces: Iterator[bytes], gathered: "_Gathered",
                      ordered: "deque[ChunkLike]", hand: Callable[[ChunkLike, bytes], None],
                      enough: Callable[[], bool]) -> None:
        """Reads `pieces` into `gathered`, handing each chunk of `ordered` (blob order) its
        bytes as soon as they are in, until the stream ends or `enough()`."""
        for piece in pieces:
            if self._closed:
                raise CrfsError(f"{target.blob.name}: the worker is stopping")
            gathered.add(piece)
            while ordered and ordered[0].cend <= gathered.end:
                chunk = ordered.popleft()
                hand(chunk, gathered.take(chunk.cstart, chunk.cend))
            # Chunks are in blob order: bytes before the next one's start are done with
            # (a hole between chunks may go on past the bytes in so far).
            gathered.drop_before(ordered[0].cstart if ordered else gathered.end)
            if enough():
                return

    def _stream_rest(self, target: FetchTarget, pieces: Iterator[bytes], gathered: "_Gathered",
                     ordered: "deque[ChunkLike]", lander: "_Lander") -> None:
        """The neighbours' part of an on-demand stream, in a fetch thread: each lands as its
        bytes arrive; those a broken stream did not bring are released."""
        try:
            with self.gate.on_demand():
                self._stream_until(target, pieces, gathered, ordered, lander.put, lambda: not ordered)
        except (CrfsError, OSError) as exc:  # released: a reader of these chunks fetches them
            log.info("%s: neighbours not fetched: %s", target.blob.name, exc)
        except Exception:
            log.exception("%s: neighbours", target.blob.name)
        finally:
            self._end_stream(target, pieces, ordered, lander)

    def _end_stream(self, target: FetchTarget, pieces: Iterator[bytes], ordered: "deque[ChunkLike]",
                    lander: "_Lander", keep: Collection[Hashable] = ()) -> None:
        """Closes a stream (its request ends), releases the chunks of `ordered` it did not
        bring except those in `keep` (still claimed by the caller), and waits for the
        decode thread to land what it was handed."""
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        while ordered:
            chunk = ordered.popleft()
            if flight_key(target, chunk) not in keep:
                self._land(target, chunk, None, None, released=True)
        lander.finish()
        for error in lander.errors:  # e.g. a corrupt neighbour: its own reader will see it
            log.warning("%s: neighbour not kept: %s", target.blob.name, error)

    @staticmethod
    def _request(target: FetchTarget, span: Span) -> bytes:
        if not span.chunks or all(c.zeros for c in span.chunks):
            return b""  # zeros chunks need no bytes
        return target.blob.read_range(span.start, span.length)

    def _decode_and_keep(self, target: FetchTarget, chunk: ChunkLike, raw: bytes, base: int
                         ) -> tuple[bytes, bool]:
        """The chunk's verified bytes, and whether the store kept them."""
        piece = b"" if chunk.zeros else raw[chunk.cstart - base:chunk.cend - base]
        data = target.decode(chunk, piece)
        if chunk.digest is None:
            self._memory.put(flight_key(target, chunk), data)
            return data, False
        # In memory before the store: a reader that finds the file there finds these too.
        self._landed.put(chunk.digest, data)
        try:
            # `decode` has just hashed these bytes against the digest: not again.
            self.store.put(chunk.digest, data, verified=True)
        except StoreFullError as exc:
            # A full disk degrades to fetching: the verified bytes are served, not kept.
            if self.store.not_kept == 1 or self.store.not_kept % 1000 == 0:
                log.warning("%s (%d chunks not kept so far)", exc, self.store.not_kept)
            return data, False
        target.note_local(chunk.digest, len(data))
        return data, True


@dataclass
class _Gathered:
    """The bytes of a stream kept for the chunks still to land: the pieces as they came
    (no copy on arrival), joined once per chunk (`take`)."""

    start: int  # the blob offset of the first byte kept
    _pieces: "deque[memoryview]" = field(default_factory=deque, init=False, repr=False)
    _kept: int = field(default=0, init=False)

    @property
    def end(self) -> int:
        """The blob offset just after the last byte in."""
        return self.start + self._kept

    def add(self, piece: bytes) -> None:
        if piece:
            self._pieces.append(memoryview(piece))
            self._kept += len(piece)

    def take(self, begin: int, end: int) -> bytes:
        """The bytes [begin, end) of the blob, all in (start <= begin, end <= self.end),
        copied once."""
        parts, at = [], self.start
        for piece in self._pieces:
            lo, hi = max(begin - at, 0), min(end - at, len(piece))
            if hi > lo:
                parts.append(piece[lo:hi])
            at += len(piece)
            if at >= end:
                break
        return b"".join(parts)

    def drop_before(self, offset: int) -> None:
        """Forgets the bytes before blob offset `offset` (at most all that are in: the
        stream goes on from `end`)."""
        while self._pieces and self.start + len(self._pieces[0]) <= offset:
            first = self._pieces.popleft()
            self.start += len(first)
            self._kept -= len(first)
        if self._pieces and offset > self.start:
            cut = offset - self.start
            self._pieces[0] = self._pieces[0][cut:]
            self.start += cut
            self._kept -= cut


@dataclass
class _Lander:
    """The decode thread of one stream: decodes, verifies and stores the chunks handed to
    it, in order, and lands each; a chunk that fails is released (its waiters fetch it
    themselves: a corrupt chunk then fails their own fetch) and its error kept."""

    fetcher: ChunkFetcher
    target: FetchTarget
    on_stored: Callable[[int], None] | None = None
    stored: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _queue: "queue.SimpleQueue[tuple[ChunkLike, bytes] | None]" = field(
        default_factory=queue.SimpleQueue, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def put(self, chunk: ChunkLike, raw: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="crfs-land", daemon=True)
            self._thread.start()
        self._queue.put((chunk, raw))

    def finish(self) -> None:
        """Returns once every chunk handed over has landed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chunk, raw = item
            try:
                data, kept = self.fetcher._decode_and_keep(self.target, chunk, raw, chunk.cstart)
            except BaseException as exc:  # whatever it was, the chunk's waiters must wake
                self.fetcher._land(self.target, chunk, None, None, released=True)
                self.errors.append(exc)
                continue
            self.fetcher._land(self.target, chunk, data, None, kept)
            if kept:
                self.stored += len(data)
                if self.on_stored is not None:
                    self.on_stored(len(data))
