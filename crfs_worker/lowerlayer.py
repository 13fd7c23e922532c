"""Answers crfs.so's requests from layer views: the worker side of the plugin protocol.

Metadata (stat, exists, readdir, readlink, xattrs) comes from each layer's index and
never touches the network. File bytes come from the chunk store (chunkstore.py), fetched
once per chunk through chunkfetch.py. `open` returns a real fd:
- a small regular file without xattrs: the verified file itself, from the chunk store when
  the file is one chunk, else assembled from its chunks into the content cache;
- everything else (directories, large files, files with xattrs, opens that only look,
  i.e. O_NONBLOCK): an fd on the worker's pyfuse3 view, which fetches chunks only when
  the kernel reads them and shows the entry's metadata and xattrs on fstat/fgetxattr.
When the plugin loads a layer (`layers`, `root`), its prioritised files are prefetched and
its background fetch is queued (prefetch.py).
Layers show the tar's truth: whiteouts are `.wh.NAME` files and `.wh..wh..opq`, which
fuse-overlayfs understands as they are.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .accesslog import AccessLog
from .blob import BlobReader, LocalBlob, stream_range
from .chunkfetch import ChunkFetcher
from .blobtail import TailKeepingBlob, tail_path
from .chunkstore import FULL_DISK_ERRNOS, ChunkStore
from .contentcache import ContentCache
from .errors import CrfsError, FormatError, NotFoundError, VerificationError
from .ipc import PROTOCOL_VERSION, RequestFailed
from .layer import EntryStat, Layer, LayerSource
from .layerkeys import KeyStore, LayerRecord, UnknownKeyError, compose_ino
from .prefetch import BackgroundFetcher, BackgroundProgress, FetchOptions, PrefetchStatus, prefetch_prioritized
from .recent import Recent
from .reference import ImageReference
from .registry import RegistryClient, SchemeMemo

log = logging.getLogger(__name__)

SMALL_FILE_LIMIT = 1 << 20  # files up to this size are fetched whole into the content cache
LOCAL_COPY_BUDGET = 8 << 30  # bigger files read to their end get a local copy while the content cache is below this
LOCAL_COPY_PIECE = 4 << 20
VIEW_FILES_KEPT = 4096       # big files handed to crfs.so that are remembered for local copies
LOCAL_COPY_WAIT = 30.0       # seconds an open waits for a local copy being written
# eStargz prefetch markers at a layer's root: format artifacts, not image content.
LANDMARKS = frozenset((".prefetch.landmark", ".no.prefetch.landmark"))


def _is_landmark(path: str) -> bool:
    return path in LANDMARKS


class LayerLike(Protocol):
    """The part of layer.Layer this module uses (see docs/DESIGN.md)."""

    def stat(self, path: str) -> EntryStat: ...
    def exists(self, path: str) -> bool: ...
    def readdir(self, path: str) -> list[tuple[str, EntryStat]]: ...
    def readlink(self, path: str) -> str: ...
    def listxattr(self, path: str) -> list[str]: ...
    def getxattr(self, path: str, name: str) -> bytes: ...
    def chunks_for(self, path: str, offset: int, size: int) -> list[Any]: ...
    def chunks_after(self, chunk: Any, end: int) -> list[Any]: ...
    def chunks_before(self, chunk: Any, start: int) -> list[Any]: ...
    def decode_chunk(self, chunk: Any, raw: bytes) -> bytes: ...
    def walk(self) -> Any: ...
    def prefetch_range(self) -> tuple[int, int] | None: ...


class FdView(Protocol):
    """Where non-cache fds come from (fileview.FileView)."""

    def root_fd(self, num: int) -> int: ...
    def open(self, num: int, parts: list[str], flags: int) -> int: ...


# ---------------------------------------------------------------------------- counters


@dataclass
class LayerStats:
    """What one layer cost: shown by `crfs stats`."""

    fetched_bytes: int = 0
    requests: int = 0
    rounds: int = 0  # requests that began a round trip of their own (see FetchRounds)
    verification_failures: int = 0
    cached_digests: set[str] = field(default_factory=set)  # whole files in the content cache
    local_chunks: dict[bytes, int] = field(default_factory=dict)  # chunk digest -> size, stored
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_fetch(self, length: int, new_round: bool) -> None:
        with self.lock:
            self.requests += 1
            self.rounds += new_round
            self.fetched_bytes += length

    def count_failure(self) -> None:
        with self.lock:
            self.verification_failures += 1

    def count_cached(self, digest: str) -> None:
        with self.lock:
            self.cached_digests.add(digest)

    def count_local(self, digest: bytes, size: int) -> None:
        with self.lock:
            self.local_chunks[digest] = size


@dataclass
class FetchRounds:
    """The worker's dependent round trips, for the benchmarks' ideal: a request that starts
    while no other is in flight (of any layer) begins a round; one that overlaps a request
    in flight (read-ahead, parallel neighbours) rides in that round."""

    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def request(self) -> Iterator[bool]:
        """Yields whether this request began a round."""
        with self.lock:
            new_round = self.in_flight == 0
            self.in_flight += 1
        try:
            yield new_round
        finally:
            with self.lock:
                self.in_flight -= 1


@dataclass
class CountingBlob:
    """A BlobReader that counts the Range requests, rounds and bytes of the blob under it."""

    blob: BlobReader
    stats: LayerStats
    rounds: FetchRounds = field(default_factory=FetchRounds)

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def name(self) -> str:
        return self.blob.name

    def read_range(self, offset: int, length: int) -> bytes:
        with self.rounds.request() as new_round:
            data = self.blob.read_range(offset, length)
        self.stats.count_fetch(length, new_round)
        return data

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """The blob's range as it streams (blob.stream_range), counted as one request; a
        stream closed early (a background range yielding to a reader) counts the bytes it
        carried."""
        delivered, new_round = 0, False
        try:
            with self.rounds.request() as new_round:
                for piece in stream_range(self.blob, offset, length):
                    delivered += len(piece)
                    yield piece
        finally:
            if delivered:
                self.stats.count_fetch(delivered, new_round)


# ---------------------------------------------------------------------------- layers


@dataclass
class LiveLayer:
    """One opened layer with the blob it reads through and its counters."""

    num: int
    record: LayerRecord
    layer: LayerLike
    blob: CountingBlob
    stats: LayerStats
    prefetch: PrefetchStatus = field(default_factory=PrefetchStatus)
    background: BackgroundProgress = field(default_factory=BackgroundProgress)
    prefetch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.layer, method)(*args)
        except VerificationError:
            self.stats.count_failure()
            raise

    def decode(self, chunk: Any, raw: bytes) -> bytes:
        # Layer.decode_chunk is safe in parallel (a decompressor per call): background and
        # on-demand fetches decode on all cores.
        try:
            return self.layer.decode_chunk(chunk, raw)
        except VerificationError:
            self.stats.count_failure()
            raise

    def note_local(self, digest: bytes, size: int) -> None:
        self.stats.count_local(digest, size)

    def following(self, chunk: Any, end: int) -> list[Any]:
        return self.layer.chunks_after(chunk, end)

    def preceding(self, chunk: Any, start: int) -> list[Any]:
        """The chunks right before `chunk` in the blob, from offset `start` (Layer.chunks_before)."""
        return self.layer.chunks_before(chunk, start)

    def file_digest(self, path: str) -> str | None:
        """The TOC's whole-file digest for `path` (the content cache key), if it has one."""
        st = self.layer.stat(path)
        raw = self.layer.index.file_digest(st.ino)  # type: ignore[attr-defined]
        return None if raw is None else "sha256:" + raw.hex()


LayerOpener = Callable[[LayerRecord, BlobReader, Path], LayerLike]


@dataclass
class RecordBlobOpener:
    """Opens the blob a layer record points at; registry blobs share one client."""

    options: FetchOptions = field(default_factory=FetchOptions)
    # Shared with the worker's other registry clients (the layer store's): a host is probed once.
    schemes: SchemeMemo = field(default_factory=SchemeMemo)
    _client: RegistryClient | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __call__(self, record: LayerRecord) -> BlobReader:
        if record.kind == "file":
            try:
                return LocalBlob(Path(record.location))
            except FileNotFoundError as exc:
                raise NotFoundError(f"layer blob {record.location} does not exist") from exc
        if record.digest is None or record.size is None:
            raise FormatError(f"{record.location}: registry layer without digest or size")
        return self.registry().blob(ImageReference.parse(record.location), record.digest, record.size)

    def registry(self) -> RegistryClient:
        """The one client of the worker's registry blobs (the layer store resolves images
        with it too: one connection pool, one transport per host)."""
        with self._lock:
            if self._client is None:
                self._client = RegistryClient(self.options.registry_config(), self.schemes)
            return self._client


def open_layer(record: LayerRecord, blob: BlobReader, index_dir: Path) -> Layer:
    source = LayerSource(blob, record.toc_digest, dict(record.annotations), record.allow_unverified)
    return Layer.open(source, index_dir)


@dataclass
class LayerTable:
    """Layers by number, opened on first use and kept for the worker's life."""

    keys: KeyStore
    index_dir: Path
    store: ChunkStore
    options: FetchOptions = field(default_factory=FetchOptions)
    opener: LayerOpener = open_layer
    blob_opener: Callable[[LayerRecord], BlobReader] | None = None
    fetcher: ChunkFetcher = field(init=False)
    background: BackgroundFetcher = field(init=False)
    rounds: FetchRounds = field(default_factory=FetchRounds, init=False)
    # Told of every read that reaches a file's end (LowerLayerService makes local copies).
    read_to_end: Callable[[LiveLayer, str], None] | None = field(default=None, init=False, repr=False)
    _live: dict[int, LiveLayer] = field(default_factory=dict, init=False, repr=False)
    _opening: dict[int, threading.Lock] = field(default_factory=dict, init=False, repr=False)
    _mounting: set[int] = field(default_factory=set, init=False, repr=False)  # mount_soon running
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.blob_opener is None:
            self.blob_opener = RecordBlobOpener(self.options)
        self.fetcher = ChunkFetcher(self.store, policy=self.options.ahead)
        self.background = BackgroundFetcher(self.fetcher, self.options)

    def close(self) -> None:
        """Stops the background fetch and the read-ahead."""
        self.background.close()
        self.fetcher.close()

    def get(self, num: int) -> LiveLayer:
        live = self._live.get(num)
        if live is not None:
            return live
        # Opening may fetch a TOC over the network: only callers of this layer wait for it.
        with self._opening_lock(num):
            live = self._live.get(num)
            if live is not None:
                return live
            record = self.keys.layer(num)
            stats = LayerStats()
            assert self.blob_opener is not None
            blob = CountingBlob(self.blob_opener(record), stats, self.rounds)
            layer = self.opener(record, self._footer_source(record, blob), self.index_dir)
            live = LiveLayer(num, record, layer, blob, stats)
            with self._lock:
                self._live[num] = live
            log.info("opened layer %d: %s", num, record.describe())
            return live

    def _footer_source(self, record: LayerRecord, blob: CountingBlob) -> BlobReader:
        """What Layer.open reads: for a registry layer, its blob with the footer kept on
        disk, so that a restarted worker reopens it (index cached) without the network."""
        path = tail_path(self.index_dir / "tails", record.digest or "") if record.kind != "file" else None
        return blob if path is None else TailKeepingBlob(blob, path)

    def mount(self, num: int) -> LiveLayer:
        """The plugin loads layer `num`: open it, prefetch its prioritised files (once)
        and queue its background fetch."""
        live = self.get(num)
        prefetch_prioritized(live, self.fetcher)
        self.background.submit(live)
        return live

    def mount_soon(self, num: int) -> None:
        """`mount` in a thread of its own, once per layer: the caller goes on while the
        TOC comes in. A failure is logged; the next caller that needs the layer opens it
        again and gets the error."""
        with self._lock:
            live, mounting = num in self._live, num in self._mounting
            if not (live or mounting):
                self._mounting.add(num)
        if live:
            self.mount(num)  # no network: prefetch and background fetch, queued once
        if live or mounting:
            return
        try:
            threading.Thread(target=self._mount_logged, args=(num,), name=f"crfs-open-{num}", daemon=True).start()
        except RuntimeError:  # no thread to be had: its first user opens it
            with self._lock:
                self._mounting.discard(num)
            raise

    def _mount_logged(self, num: int) -> None:
        try:
            self.mount(num)
        except Exception as exc:  # the layer's users report it: they open it again
            log.warning("layer %d could not be opened: %s", num, exc)
        finally:
            with self._lock:
                self._mounting.discard(num)

    def _opening_lock(self, num: int) -> threading.Lock:
        with self._lock:
            return self._opening.setdefault(num, threading.Lock())

    def live_layers(self) -> list[LiveLayer]:
        with self._lock:
            return sorted(self._live.values(), key=lambda live: live.num)

    # The view's source (fileview.ViewSource)

    def layer_numbers(self) -> list[int]:
        return [live.num for live in self.live_layers()]

    def stat(self, num: int, path: str) -> EntryStat:
        if _is_landmark(path):
            raise FileNotFoundError(errno.ENOENT, "eStargz landmark", path)
        return self.get(num).call("stat", path)

    def exists(self, num: int, path: str) -> bool:
        return not _is_landmark(path) and self.get(num).call("exists", path)

    def readdir(self, num: int, path: str) -> list[tuple[str, EntryStat]]:
        entries = self.get(num).call("readdir", path)
        if path:
            return entries
        return [(name, st) for name, st in entries if name not in LANDMARKS]

    def readlink(self, num: int, path: str) -> str:
        return self.get(num).call("readlink", path)

    def listxattr(self, num: int, path: str) -> list[str]:
        return self.get(num).call("listxattr", path)

    def getxattr(self, num: int, path: str, name: str) -> bytes:
        return self.get(num).call("getxattr", path, name)

    def read(self, num: int, path: str, offset: int, size: int) -> bytes:
        """Verified bytes [offset, offset+size) of a file, fetching only missing chunks
        (adjacent ones in one Range request). A read that reaches the file's end is told
        to `read_to_end`."""
        live = self.get(num)
        chunks = live.call("chunks_for", path, offset, size)
        data = self.fetcher.read(live, chunks, offset, size)
        if self.read_to_end is not None and (len(data) < size or not chunks
                                             or offset + len(data) >= live.call("stat", path).size):
            self.read_to_end(live, path)
        return data

    def hold_local(self, num: int, path: str) -> list[bytes] | None:
        """If every chunk of the file is in the chunk store: those chunks, pinned (eviction
        spares them until `release_local`), so that no read of the file can fail. Else None."""
        live = self.get(num)
        chunks = live.call("chunks_for", path, 0, live.call("stat", path).size)
        if not chunks or any(c.digest is None for c in chunks):
            return None
        held = self.store.pin(c.digest for c in chunks)
        if all(self.store.has(c.digest, c.size) for c in chunks):
            return held
        self.store.unpin(held)
        return None

    def release_local(self, held: list[bytes]) -> None:
        self.store.unpin(held)

    def ensure_local(self, num: int, path: str, offset: int, size: int) -> None:
        """Fetches (verified) what a read of [offset, offset+size) needs, reading nothing;
        raises what that read would raise."""
        live = self.get(num)
        self.fetcher.ensure(live, live.call("chunks_for", path, offset, size), on_demand=True)

    def whole_file_chunk(self, live: LiveLayer, path: str, size: int) -> Any | None:
        """The file's only chunk, if one digested chunk holds the whole file."""
        chunks = live.call("chunks_for", path, 0, size)
        if len(chunks) != 1:
            return None
        chunk = chunks[0]
        if chunk.digest is None or chunk.offset != 0 or chunk.size != size:
            return None
        return chunk

    def chunk_fd(self, live: LiveLayer, chunk: Any) -> int | None:
        """A read-only fd on a digested chunk's verified bytes in the chunk store."""
        return self.fetcher.open_fd(live, chunk)


# ---------------------------------------------------------------------------- requests


def path_parts(raw: Any) -> list[str]:
    """The components of a plugin path ("/x", "./x/", "." and "" are all fine); ".." is
    refused: a layer path never climbs."""
    if not isinstance(raw, (bytes, str)):
        raise RequestFailed(errno.EINVAL, "path must be bytes")
    text = os.fsdecode(raw)
    if "\x00" in text:
        raise RequestFailed(errno.EINVAL, "path contains NUL")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RequestFailed(errno.ENOENT, f"{text}: '..' is not a layer path")
    if len(text.encode(errors="surrogateescape")) >= 4096:
        raise RequestFailed(errno.ENAMETOOLONG, "path too long")
    return parts


def errno_for(exc: BaseException) -> int:
    if isinstance(exc, (FileNotFoundError, UnknownKeyError)):
        return errno.ENOENT
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, IsADirectoryError):
        return errno.EISDIR
    if isinstance(exc, KeyError):
        return errno.ENODATA
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO  # verification, format and registry failures: readers see EIO


def stat_fields(num: int, st: EntryStat) -> list[int]:
    return [compose_ino(num, st.ino), st.mode, st.nlink, st.uid, st.gid, st.size, st.mtime_ns,
            st.rdev_major, st.rdev_minor]


def _int_arg(request: dict[str, Any], name: str) -> int:
    value = request.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestFailed(errno.EINVAL, f"missing integer argument {name!r}")
    return value


@dataclass
class LowerLayerService:
    """The request handler the worker's IpcServer calls (see ipc.py for the protocol)."""

    table: LayerTable
    view: FdView
    cache: ContentCache
    small_file_limit: int = SMALL_FILE_LIMIT
    access_log: AccessLog = field(default_factory=AccessLog)  # `crfs optimize` recordings
    local_copy_budget: int = LOCAL_COPY_BUDGET  # no local copy once the content cache holds this much
    # Local copies being written: digest -> (done, layer number).
    _copying: dict[str, tuple[threading.Event, int]] = field(default_factory=dict, init=False, repr=False)
    _copy_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Big files handed to crfs.so as view fds (layer number, path), the newest last: only
    # those get local copies (the layer store's readers cannot use them).
    _view_files: Recent[tuple[int, str], bool] = field(default_factory=lambda: Recent(VIEW_FILES_KEPT), init=False,
                                                       repr=False)

    def __post_init__(self) -> None:
        self.table.read_to_end = self._copy_when_local

    def handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        op = request.get("op")
        handler = self._handlers().get(op) if isinstance(op, str) else None
        if handler is None:
            raise RequestFailed(errno.ENOSYS, f"unknown request {op!r}")
        try:
            return handler(request)
        except RequestFailed:
            raise
        except (CrfsError, OSError) as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.warning("%s failed: %s", op, exc)
            raise RequestFailed(code, str(exc)) from exc

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], int | None]]]:
        return {
            "hello": self._hello,
            "layers": self._layers,
            "root": self._root,
            "stat": self._stat,
            "exists": self._exists,
            "list": self._list,
            "readlink": self._readlink,
            "listxattr": self._listxattr,
            "getxattr": self._getxattr,
            "open": self._open,
            "stats": self._stats,
            **self.access_log.handlers(self._describe_layer),
        }

    def _describe_layer(self, num: int) -> tuple[str | None, str]:
        record = self.table.get(num).record
        return record.digest, record.location

    def _target(self, request: dict[str, Any]) -> tuple[LiveLayer, list[str], str]:
        live = self.table.get(_int_arg(request, "layer"))
        parts = path_parts(request.get("path"))
        return live, parts, "/".join(parts)

    def _hello(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        return {"version": PROTOCOL_VERSION, "pid": os.getpid()}, None

    def _layers(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        key = request.get("key")
        if not isinstance(key, str):
            raise RequestFailed(errno.EINVAL, "missing key")
        nums = self.table.keys.layer_numbers(key)
        # Open (and verify) every layer now, while the mount waits, and prefetch what the
        # image prioritised: TOC fetches and prefetches of the layers overlap.
        with ThreadPoolExecutor(max_workers=min(4, len(nums))) as pool:
            list(pool.map(self.table.mount, nums))
        return {"layers": nums}, None

    def _root(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        num = _int_arg(request, "layer")
        self.table.mount(num)  # a restarted worker learns of the layer here
        return {}, self.view.root_fd(num)

    def _stat(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        live, _, path = self._target(request)
        return {"st": stat_fields(live.num, self.table.stat(live.num, path))}, None

    def _exists(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        live, _, path = self._target(request)
        if not self.table.exists(live.num, path):
            raise RequestFailed(errno.ENOENT, f"{path}: not in layer {live.num}")
        return {}, None

    def _list(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """A whole directory at once: the plugin caches it and answers stat, exists and
        xattr-name questions about its entries without asking again."""
        live, _, path = self._target(request)
        rows = []
        index = live.layer.index  # type: ignore[attr-defined]
        for name, st in self.table.readdir(live.num, path):
            # By inode, not by path: a path lookup per entry was most of a walk's worker time.
            names = index.xattrs(st.ino)
            rows.append([os.fsencode(name), *stat_fields(live.num, st), [os.fsencode(n) for n in names]])
        return {"entries": rows}, None

    def _readlink(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        live, _, path = self._target(request)
        st = self.table.stat(live.num, path)
        if not stat.S_ISLNK(st.mode):
            raise RequestFailed(errno.EINVAL, f"{path}: not a symlink")
        return {"target": os.fsencode(self.table.readlink(live.num, path))}, None

    def _listxattr(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        live, _, path = self._target(request)
        self.table.stat(live.num, path)
        return {"names": [os.fsencode(n) for n in self.table.listxattr(live.num, path)]}, None

    def _getxattr(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        live, _, path = self._target(request)
        name = request.get("name")
        if not isinstance(name, (bytes, str)):
            raise RequestFailed(errno.EINVAL, "missing xattr name")
        try:
            self.table.stat(live.num, path)
            value = self.table.getxattr(live.num, path, os.fsdecode(name))
        except KeyError as exc:
            raise RequestFailed(errno.ENODATA, f"{path}: no xattr {os.fsdecode(name)}") from exc
        return {"value": bytes(value)}, None

    def _open(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        live, parts, path = self._target(request)
        flags = _int_arg(request, "flags")
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_CREAT | os.O_TRUNC):
            raise RequestFailed(errno.EROFS, f"{path}: layers are read-only")
        st = self.table.stat(live.num, path)
        if flags & os.O_DIRECTORY and not stat.S_ISDIR(st.mode):
            raise RequestFailed(errno.ENOTDIR, f"{path}: not a directory")
        if stat.S_ISLNK(st.mode) and not flags & os.O_PATH:
            raise RequestFailed(errno.ELOOP, f"{path}: is a symlink")
        if stat.S_ISREG(st.mode) and not flags & (os.O_PATH | os.O_NONBLOCK):
            self.access_log.note(live.num, path)  # a workload reads this file's data
        if self._wants_cache(live, path, st, flags):
            fd = self._cached_fd(live, path, st)
            if fd is not None:
                return {}, fd
        if (stat.S_ISCHR(st.mode) or stat.S_ISBLK(st.mode) or stat.S_ISSOCK(st.mode)) and not flags & os.O_PATH:
            return {}, self._stand_in_fd(live, path)
        if stat.S_ISFIFO(st.mode):
            flags |= os.O_NONBLOCK  # a FIFO open without a writer would block this thread for ever
        wants_copy = self._wants_local_copy(live, path, st, flags)
        if wants_copy:
            fd = self._local_copy_fd(live, path, st)
            if fd is not None:
                return {}, fd
        if stat.S_ISREG(st.mode) and not flags & os.O_PATH:
            # O_DIRECT: each read fuse-overlayfs makes is one view request, which succeeds
            # or fails whole. Through the view's page cache a read could return cached
            # pages and then stop at a chunk that failed (a registry error, a corrupt
            # chunk, the worker killed); libfuse answers such a partial splice with a
            # SHORT reply, and the kernel, taking it for the end of the file, fills the
            # rest of fuse-overlayfs's request with zeros and keeps them: wrong bytes
            # (tests/test_plugin_partial_reads.py). Warm reads come from local copies.
            flags |= os.O_DIRECT
            if wants_copy:
                self._note_view_file(live.num, path)
        # Opening on the view fetches nothing; the kernel's reads fetch chunks.
        return {}, self.view.open(live.num, parts, flags)

    def _stand_in_fd(self, live: LiveLayer, path: str) -> int:
        """An empty, sealed stand-in for a device node or socket. fuse-overlayfs opens one
        only to copy it up (it reads st_size bytes, i.e. none, and the xattrs); the view
        is mounted nodev, and opening a device must never reach a real device anyway."""
        fd = os.memfd_create("crfs-special", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            for name in self.table.listxattr(live.num, path):
                try:
                    os.setxattr(fd, name, self.table.getxattr(live.num, path, name))
                except OSError as exc:  # e.g. trusted.* without CAP_SYS_ADMIN: best effort
                    log.info("%s: xattr %s not kept on the device stand-in: %s", path, name, exc)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        finally:
            os.close(fd)
        return read_only

    def _wants_cache(self, live: LiveLayer, path: str, st: EntryStat, flags: int) -> bool:
        if not stat.S_ISREG(st.mode) or st.size > self.small_file_limit:
            return False
        if flags & (os.O_NONBLOCK | os.O_PATH):
            return False  # a lookup that only reads xattrs: fetch nothing
        return not self.table.listxattr(live.num, path)  # copy-up reads xattrs from the fd

    def _cached_fd(self, live: LiveLayer, path: str, st: EntryStat) -> int | None:
        chunk = self.table.whole_file_chunk(live, path, st.size) if st.size else None
        if chunk is not None:
            fd = self.table.chunk_fd(live, chunk)  # the chunk IS the file
            if fd is not None:
                return fd
        digest = live.file_digest(path)
        if digest is None:
            return None  # nothing vouches for the whole file: the view verifies chunk by chunk
        try:
            cached = self.cache.get(digest, st.size, lambda: self._fetch_whole(live, path, st.size))
        except OSError as exc:
            if exc.errno not in FULL_DISK_ERRNOS:
                raise
            log.warning("content cache: %s: %s not kept (%s): served through the view", path, digest, exc)
            return None
        live.stats.count_cached(digest)
        return cached.fd

    # ---- local copies of big files (warm reads at local-file speed)

    def _wants_local_copy(self, live: LiveLayer, path: str, st: EntryStat, flags: int) -> bool:
        if not stat.S_ISREG(st.mode) or st.size <= self.small_file_limit:
            return False
        if flags & (os.O_NONBLOCK | os.O_PATH):
            return False
        return not self.table.listxattr(live.num, path)  # copy-up reads xattrs from the fd

    def _local_copy_fd(self, live: LiveLayer, path: str, st: EntryStat) -> int | None:
        """The file's local copy in the content cache, if one was made (never started here:
        an open waits only for a copy already being written, LOCAL_COPY_WAIT at most)."""
        digest = live.file_digest(path)
        if digest is None:
            return None
        with self._copy_lock:
            copying = self._copying.get(digest, (None, 0))[0]
        if copying is not None:
            # A copy being written (the previous container just read the file to its end)
            # is ready sooner than the O_DIRECT view would serve the file.
            copying.wait(LOCAL_COPY_WAIT)
        fd = self.cache.open(digest, st.size)  # hashed once per worker life, as every cache file
        if fd is not None:
            live.stats.count_cached(digest)
        return fd

    def _note_view_file(self, num: int, path: str) -> None:
        self._view_files.put((num, path), True)

    def _copy_when_local(self, live: LiveLayer, path: str) -> None:
        """LayerTable.read reached the end of `path`: if the file is big and every one of
        its chunks is local, copy it into the content cache in the background, so that
        later opens get a local file (read at local-file speed, no FUSE hop) instead of
        an O_DIRECT view fd. Bounded: no copy once the content cache holds local_copy_budget
        bytes; a copy doubles the disk the file takes (its chunks stay: other layers and
        the view may use them)."""
        if self._view_files.get((live.num, path)) is None:
            return  # not read through crfs.so (the layer store, the CLI): no use for a copy
        digest = live.file_digest(path)
        if digest is None:
            return
        with self._copy_lock:
            if digest in self._copying:
                return
        if self.cache.path_for(digest).exists():
            return  # made already
        st = self.table.stat(live.num, path)
        # Bounded by what the content cache holds on disk, whoever made it (a scan: this
        # runs once per big file read to its end).
        if self.cache.disk_bytes() + st.size > self.local_copy_budget:
            return
        with self._copy_lock:
            if digest in self._copying:
                return
            self._copying[digest] = (threading.Event(), live.num)
        threading.Thread(target=self._copy_local, args=(live, path, st.size, digest),
                         name="crfs-local-copy", daemon=True).start()

    def _copy_local(self, live: LiveLayer, path: str, size: int, digest: str) -> None:
        try:
            held = self.table.hold_local(live.num, path)  # evictions must not make the copy fetch
            if held is None:
                return  # a copy would fetch: the reader left some chunks unread
            try:
                pieces = (self.table.read(live.num, path, offset, min(LOCAL_COPY_PIECE, size - offset))
                          for offset in range(0, size, LOCAL_COPY_PIECE))
                if self.cache.put_pieces(digest, size, pieces):
                    log.info("content cache: local copy of %s (%d bytes)", path, size)
            finally:
                self.table.release_local(held)
        except (CrfsError, OSError) as exc:  # the view still serves the file, verified
            log.warning("content cache: no local copy of %s: %s", path, exc)
        finally:
            with self._copy_lock:
                self._copying.pop(digest)[0].set()

    def _fetch_whole(self, live: LiveLayer, path: str, size: int) -> bytes:
        return self.table.read(live.num, path, 0, size) if size else b""

    def _stats(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        rows = []
        for live in self.table.live_layers():
            with live.stats.lock:
                digests = set(live.stats.cached_digests)
                local = sum(live.stats.local_chunks.values())
                row = {
                    "num": live.num,
                    "name": live.record.describe(),
                    "fetched": live.stats.fetched_bytes,
                    "requests": live.stats.requests,
                    "rounds": live.stats.rounds,
                    "failures": live.stats.verification_failures,
                }
            with self._copy_lock:
                row["copying"] = sum(1 for _, num in self._copying.values() if num == live.num)
            row["cached"] = local + self.cache.total_bytes(digests)
            row["background"] = live.background.as_dict()
            row["prefetch"] = live.prefetch.as_dict()
            rows.append(row)
        return {"layers": rows}, None

