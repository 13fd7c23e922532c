"""Making layers local ahead of reads: the mount-time prefetch and the background fetch.

At mount, the prioritised files of an eStargz layer (everything before `.prefetch.landmark`)
are fetched in ONE Range request, beside the mount rather than inside it (the mount, and the
container start, go on meanwhile): each chunk is verified and put in the chunk store as soon
as its bytes have streamed in, and a reader of a prioritised chunk waits for it there (one
fetch), while a reader of any other chunk fetches it at once. Then, unless turned off (`crfs
worker --no-background-fetch`, CRFS_BACKGROUND_FETCH=0), the background fetch makes each
mounted layer wholly local: the chunks not yet stored, in blob order, coalesced into ranges
of up to `range_limit` bytes, `parallel` requests in flight, each chunk verified before it
is stored as its bytes stream in. On-demand reads go first (chunkfetch.FetchGate): the
background fetch starts only once the worker's on-demand fetches (and mounts, and mount-time
prefetches) have been quiet for `quiet` seconds, and a background range in flight yields to
an on-demand fetch at once: its stream is closed, the chunks already in are kept, the others
are fetched after the next quiet period. A layer whose background fetch failed (registry
down) is tried again later, a few times, and whenever it is mounted again.

How long one registry request may take is bounded by CRFS_FETCH_ATTEMPTS tries and
CRFS_FETCH_DEADLINE seconds: no retry starts after the deadline, and each try gives up
after that long without progress (connecting, or between bytes). A read while the registry
is down fails (EIO) within that bound instead of hanging.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Iterator, Mapping, Protocol

from .chunkfetch import AheadPolicy, ChunkFetcher, ChunkLike, FetchTarget, Span, spans_for
from .errors import CrfsError, RegistryError, UnverifiableError

log = logging.getLogger(__name__)

PREFETCH_LANDMARK = ".prefetch.landmark"
_FALSE = frozenset(("0", "false", "no", "off"))
_TRUE = frozenset(("1", "true", "yes", "on"))


# ---------------------------------------------------------------------------- options


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise CrfsError(f"{name}={env[name]!r}: expected 1 or 0")


def _env_number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise CrfsError(f"{name}={text!r}: expected a number") from None
    if not value >= minimum:  # also refuses NaN
        raise CrfsError(f"{name}={text!r}: must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class FetchOptions:
    """How the worker fetches layer data."""

    background: bool = True
    range_limit: int = 16 << 20      # bytes per background request
    range_gap: int = 64 << 10        # a hole this small between chunks is fetched, not split on
    parallel: int = 3                # background requests in flight
    # Seconds without on-demand fetches before the background fetch starts or resumes.
    # The link is the container's while it reads: a numpy import on a 100 Mbit/s link ran
    # 3-5x slower beside the background fetch (docs/PERFORMANCE-NOTES.md).
    quiet: float = 1.5
    attempts: int = 4                # tries of one registry request (connection errors, 5xx)
    deadline: float = 30.0           # seconds after which a request stops retrying
    retry_delays: tuple[float, ...] = (15.0, 60.0, 300.0)  # background retries of a failed layer
    ahead: AheadPolicy = field(default_factory=AheadPolicy)  # on-demand fetches: neighbours, read-ahead

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None, *,
                         background: bool | None = None) -> "FetchOptions":
        """CRFS_BACKGROUND_FETCH (1/0), CRFS_BACKGROUND_QUIET (seconds), CRFS_FETCH_ATTEMPTS,
        CRFS_FETCH_DEADLINE, CRFS_FETCH_COALESCE and CRFS_FETCH_READ_AHEAD (bytes; 0 = off),
        CRFS_FETCH_PARALLEL (read-ahead requests in flight); an explicit `background` (the worker's
        --no-background-fetch) wins over the variable."""
        env = os.environ if env is None else env
        defaults = cls()
        enabled = _env_bool(env, "CRFS_BACKGROUND_FETCH", defaults.background)
        ahead = replace(
            defaults.ahead,
            coalesce=int(_env_number(env, "CRFS_FETCH_COALESCE", defaults.ahead.coalesce, 0)),
            read_ahead=int(_env_number(env, "CRFS_FETCH_READ_AHEAD", defaults.ahead.read_ahead, 0)),
            parallel=int(_env_number(env, "CRFS_FETCH_PARALLEL", defaults.ahead.parallel, 1)),
        )
        return cls(
            background=enabled if background is None else background,
            quiet=_env_number(env, "CRFS_BACKGROUND_QUIET", defaults.quiet, 0),
            attempts=int(_env_number(env, "CRFS_FETCH_ATTEMPTS", defaults.attempts, 1)),
            deadline=_env_number(env, "CRFS_FETCH_DEADLINE", defaults.deadline, 0.1),
            ahead=ahead,
        )

    def registry_config(self) -> Any:
        """The registry client configuration: the user's registries, credentials and CAs,
        with this retry bound. (Imported here: the registry stack loads only when needed.)"""
        from .registry import RegistryConfig, RetryPolicy

        base = RegistryConfig.from_environment()
        retry = RetryPolicy(attempts=self.attempts, backoff_base=base.retry.backoff_base,
                            backoff_max=min(base.retry.backoff_max, self.deadline),
                            total_max=self.deadline)
        # A host that does not answer, or stalls mid-answer, must not hold a reader for
        # longer than the bound per try.
        bound = self.deadline
        timeouts = replace(base.timeouts, connect=min(base.timeouts.connect, bound),
                           read=min(base.timeouts.read, bound), pool=min(base.timeouts.pool, bound))
        return replace(base, retry=retry, timeouts=timeouts)


# ---------------------------------------------------------------------------- chunks of a layer


class ChunkedLayer(Protocol):
    """The part of layer.Layer this module reads."""

    def walk(self) -> Iterator[tuple[str, Any]]: ...
    def chunks_for(self, path: str, offset: int, size: int) -> list[Any]: ...
    def prefetch_range(self) -> tuple[int, int] | None: ...


def _file_chunks(layer: ChunkedLayer, path: str, size: int) -> list[Any]:
    try:
        return layer.chunks_for(path, 0, size)
    except UnverifiableError:
        return []  # nothing vouches for it: nothing to store


def layer_chunks(layer: ChunkedLayer) -> Iterator[Any]:
    """Every chunk of every regular file (hardlinked files once), in TOC order."""
    seen: set[int] = set()
    for path, st in layer.walk():
        if not stat.S_ISREG(st.mode) or st.size == 0 or st.ino in seen:
            continue
        seen.add(st.ino)
        yield from _file_chunks(layer, path, st.size)


def prioritized_chunks(layer: ChunkedLayer, end: int) -> list[Any]:
    """The chunks that lie before blob offset `end` (the landmark): the TOC lists entries
    in blob order, so the walk stops at the landmark or at the first chunk beyond it."""
    found: list[Any] = []
    for path, st in layer.walk():
        if path == PREFETCH_LANDMARK:
            break
        if not stat.S_ISREG(st.mode) or st.size == 0:
            continue
        for chunk in _file_chunks(layer, path, st.size):
            if not chunk.zeros and chunk.cend > end:
                return found
            found.append(chunk)
    return found


# ---------------------------------------------------------------------------- progress


@dataclass
class PrefetchStatus:
    """The mount-time prefetch of one layer: `pending` (not started), `running`, then
    `none` (no landmark), `local` (all stored already), `done`, or `failed`; `stored_bytes`
    grows while it runs."""

    state: str = "pending"
    stored_bytes: int = 0
    error: str = ""
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"state": self.state, "bytes": self.stored_bytes, "error": self.error}

    def add_stored(self, count: int) -> None:
        with self.lock:
            self.stored_bytes += count

    def finish(self, state: str, error: str = "") -> None:
        with self.lock:
            self.state, self.error = state, error
        self.finished.set()

    def wait(self, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Waits while the prefetch runs (until `stop` is set, or `timeout` seconds);
        whether it has ended (or never started)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.state == "running" and not (stop is not None and stop.is_set()):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.finished.wait(0.5 if left is None else min(left, 0.5))
        return self.state != "running"


@dataclass
class BackgroundProgress:
    """One layer's background fetch: `off`, `queued`, `waiting` (for the prefetch and a quiet
    spell of on-demand fetches), `running`, `complete` or `failed`."""

    state: str = "off"
    total_bytes: int = 0
    done_bytes: int = 0
    error: str = ""
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"state": self.state, "done": self.done_bytes, "total": self.total_bytes,
                    "error": self.error}

    def set(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def add_done(self, count: int) -> None:
        with self.lock:
            self.done_bytes += count


def progress_label(background: Mapping[str, Any]) -> str:
    """`complete`, `37%`, `waiting`, `queued`, `off` or `failed`: what `crfs stats` shows."""
    state = background.get("state", "off")
    if state == "running":
        total = background.get("total") or 0
        percent = 100 * (background.get("done") or 0) // total if total else 0
        return f"{min(percent, 99)}%"
    return str(state)


class MountedLayer(FetchTarget, Protocol):
    """What the prefetch and the background fetch need of a layer (lowerlayer.LiveLayer)."""

    layer: Any
    prefetch: PrefetchStatus
    background: BackgroundProgress
    prefetch_lock: threading.Lock


# ---------------------------------------------------------------------------- mount-time prefetch


def prefetch_prioritized(target: MountedLayer, fetcher: ChunkFetcher) -> None:
    """Starts fetching the layer's prioritised range in the background, once per worker
    (later calls return at once), and returns: `target.prefetch` tells how it goes. A
    failure is recorded and logged, not raised: reads then fetch on demand."""
    with target.prefetch_lock:
        status = target.prefetch
        with status.lock:
            if status.state != "pending":
                return
            status.state = "running"
    if not fetcher.detach(_prefetch, target, fetcher):
        target.prefetch.finish("failed", "the worker is stopping")


def _prefetch(target: MountedLayer, fetcher: ChunkFetcher) -> None:
    status = target.prefetch
    try:
        found = target.layer.prefetch_range()
        if found is None or found[1] <= found[0]:
            status.finish("none")
            return
        start, end = found
        chunks = prioritized_chunks(target.layer, end)
        # The container is about to read these: background fetches wait (or yield).
        with fetcher.gate.on_demand():
            stored = fetcher.stream_span(target, Span(start, end, tuple(chunks)), on_stored=status.add_stored)
    except (CrfsError, OSError) as exc:
        log.warning("prefetch of %s failed: %s", target.blob.name, exc)
        status.finish("failed", str(exc))
        return
    except Exception:  # a bug: recorded, and its claims were released by stream_span
        log.exception("prefetch of %s", target.blob.name)
        status.finish("failed", "internal error (see the worker log)")
        return
    log.info("prefetched %d bytes of %s", stored, target.blob.name)
    status.finish("done" if stored else "local")


# ---------------------------------------------------------------------------- background fetch


@dataclass
class BackgroundFetcher:
    """Makes queued layers wholly local, one layer at a time, from one thread (plus the
    `parallel` request threads of the layer being fetched)."""

    fetcher: ChunkFetcher
    options: FetchOptions
    _queue: list[MountedLayer] = field(default_factory=list, init=False, repr=False)
    _wake: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _timers: list[threading.Timer] = field(default_factory=list, init=False, repr=False)

    def submit(self, target: MountedLayer) -> None:
        """Queues a mounted layer unless it is queued, being fetched or complete. A mount
        is activity: the background fetch (of any layer) waits for quiet anew."""
        self.fetcher.gate.note_activity()
        if not self.options.background or self._stop.is_set():
            return
        with target.background.lock:
            if target.background.state in ("queued", "waiting", "running", "complete"):
                return
            target.background.state = "queued"
        with self._wake:
            self._queue.append(target)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="crfs-background", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            for timer in self._timers:
                timer.cancel()
            self._wake.notify_all()
        self.fetcher.gate.recheck()  # those waiting for quiet see the stop at once
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                target = self._queue.pop(0)
            try:
                self._fetch_layer(target)
            except Exception:  # a bug must not end the background fetch of every layer
                log.exception("background fetch of %s", target.blob.name)
                target.background.set(state="failed", error="internal error (see the worker log)")

    def _fetch_layer(self, target: MountedLayer) -> None:
        progress = target.background
        progress.set(state="waiting", error="", done_bytes=0)
        # The prioritised range first: it holds claims this fetch would only wait on, and
        # its one stream should have the link to itself.
        target.prefetch.wait(self._stop)
        # Not even the catalogue (a TOC walk, hashing chunks stored before a restart) while
        # a container reads: it would take a core from it.
        self._wait_quiet()
        progress.set(state="running")
        try:
            missing = self._catalogue(target)
            self._fetch_all(target, missing)
            left = [c for c in missing if c.digest is None or not self.fetcher.store.has(c.digest, c.size)]
            if left and not self._stop.is_set():
                raise CrfsError(f"{len(left)} chunk(s) could not be made local")
        except (CrfsError, OSError) as exc:
            self._failed(target, exc)
            return
        if self._stop.is_set():
            return
        progress.set(state="complete", done_bytes=progress.total_bytes)
        log.info("background fetch of %s complete", target.blob.name)

    def _catalogue(self, target: MountedLayer) -> list[ChunkLike]:
        """Counts the layer's stored bytes; returns the chunks still missing, by digest once."""
        unique: dict[bytes, Any] = {}
        for chunk in layer_chunks(target.layer):
            if chunk.digest is not None:
                unique.setdefault(chunk.digest, chunk)
        total = sum(c.size for c in unique.values())
        missing = []
        done = 0
        for chunk in unique.values():
            if self._stop.is_set():
                break
            if self.fetcher.store.check(chunk.digest, chunk.size):
                target.note_local(chunk.digest, chunk.size)
                done += chunk.size
            else:
                missing.append(chunk)
        target.background.set(total_bytes=total, done_bytes=done)
        return missing

    def _fetch_all(self, target: MountedLayer, missing: list[ChunkLike]) -> None:
        spans = spans_for(missing, self.options.range_gap, self.options.range_limit)
        give_up = threading.Event()  # the registry failed: the other spans would too
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=self.options.parallel,
                                thread_name_prefix="crfs-background-fetch") as pool:
            futures: list[Future[None]] = [
                pool.submit(self._fetch_span, target, span, give_up, errors) for span in spans]
            for future in futures:
                future.result()
        if errors:
            raise errors[0]

    def _wait_quiet(self) -> int:
        return self.fetcher.gate.wait_quiet(self._stop, self.options.quiet)

    def _fetch_span(self, target: MountedLayer, span: Span, give_up: threading.Event,
                    errors: list[BaseException]) -> None:
        """Streams the span's chunks in, after a quiet period; if it yields to an on-demand
        fetch, what it has not landed is streamed after the next quiet period."""
        pending = [span]
        while pending and not (self._stop.is_set() or give_up.is_set()):
            part = pending.pop(0)
            token = self._wait_quiet()
            if self._stop.is_set() or give_up.is_set():
                break
            try:
                self.fetcher.stream_span(target, part, narrow=True,
                                         should_yield=partial(self._should_yield, token))
            except RegistryError as exc:
                give_up.set()
                errors.append(exc)
                break
            except (CrfsError, OSError) as exc:  # e.g. one chunk failed verification: go on
                errors.append(exc)
                continue
            if self.fetcher.gate.interrupted(token):  # it may have yielded: the rest again
                left = [c for c in part.chunks if not self._stored(c)]
                pending = spans_for(left, self.options.range_gap, self.options.range_limit) + pending
        target.background.add_done(sum(c.size for c in span.chunks if self._stored(c)))

    def _should_yield(self, token: int) -> bool:
        return self._stop.is_set() or self.fetcher.gate.interrupted(token)

    def _stored(self, chunk: ChunkLike) -> bool:
        return chunk.digest is not None and self.fetcher.store.has(chunk.digest, chunk.size)

    def _failed(self, target: MountedLayer, exc: BaseException) -> None:
        progress = target.background
        with progress.lock:
            progress.state = "failed"
            progress.error = str(exc)
            progress.failures += 1
            attempt = progress.failures
        log.warning("background fetch of %s failed: %s", target.blob.name, exc)
        if attempt > len(self.options.retry_delays) or self._stop.is_set():
            return
        timer = threading.Timer(self.options.retry_delays[attempt - 1], self.submit, args=(target,))
        timer.daemon = True
        with self._wake:
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()
