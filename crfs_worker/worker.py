"""The crfs worker process: one per user, serving crfs.so and the CLI over a Unix socket.

    RUNTIME/worker.sock   the socket (RUNTIME is dirs.runtime_dir(), 0700)
    RUNTIME/worker.lock   held while a worker runs: a second one exits quietly once the
                          first answers, and takes over from one that is exiting
    RUNTIME/worker.log    what went wrong (the worker has no terminal)
    RUNTIME/view/         the pyfuse3 view fds come from (without a layer store)
    RUNTIME/keys, layers  the KEY registry (layerkeys.py)
    STORE/                podman's additional layer store (layerstore.py), when served;
                          the view is then STORE/.layers (pyfuse3: one FUSE mount per process)

crfs.so starts the worker when none answers (`crfs worker`, or CRFS_WORKER_CMD), and so
does `ensure_worker()` (for `crfs lowerdir`). The worker lives while clients are connected
(every mount holds one) and exits after `--idle-timeout` seconds without any, or on
SIGTERM/SIGINT. Mounted layers are made local in the background unless
`--no-background-fetch` or CRFS_BACKGROUND_FETCH=0 (see prefetch.py).

A worker that serves podman's layer store never exits for idleness: podman looks for its
layers there at any time. The store is served when `--store DIR` or $CRFS_STORE_DIR
names it, or when podman's storage.conf lists the default store
(~/.local/share/crfs/store) in additionallayerstores. A rootless user's worker that
serves a store first joins podman's user and mount namespaces (usernamespace.py), the
only place where podman can see the mount.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chunkstore import ChunkStore, parse_size
from .contentcache import ContentCache
from .dirs import cache_dir, ensure_private_dir, index_dir, runtime_dir
from .errors import CrfsError
from .fileview import VIEW_ROOT_INO, FileView, LayerViewRoot
from .ipc import IpcServer, WorkerClient
from .layerkeys import KeyStore
from .layerstore import VIEW_NAME, StoreRoot, configured_store_dir, open_store
from .lowerlayer import LayerTable, LowerLayerService, RecordBlobOpener
from .usernamespace import PodmanNamespace, enter_podman_namespace, wants_podman_namespace
from .workerstart import worker_answers
from .prefetch import FetchOptions, progress_label

log = logging.getLogger("crfs_worker")

SOCKET_NAME = "worker.sock"
# How long a worker waits for the lock of one that answers nothing: an exiting worker has
# closed its socket and still joins its fetches and unmounts its view (10 s each at most).
LOCK_WAIT = 25.0  # within the starters' 30 s (crfs.so, ensure_worker): they see our error
NAMESPACE_CHECK_TICKS = 5  # seconds between checks that podman still uses the namespaces we joined


def socket_path(runtime: Path | None = None) -> Path:
    return (runtime or runtime_dir()) / SOCKET_NAME


@dataclass
class WorkerConfig:
    runtime: Path
    index: Path
    content: Path
    idle_timeout: float
    fetch: FetchOptions = field(default_factory=FetchOptions)
    store: Path | None = None   # podman's additional layer store, served when set
    podman: PodmanNamespace | None = None  # rootless podman's namespaces, joined to serve the store
    cache_size: int | None = None  # the chunk store's size limit in bytes (None: unlimited)

    @property
    def chunks(self) -> Path:
        return self.content.parent / "chunks"


@dataclass
class _Lock:
    fd: int

    @classmethod
    def try_acquire(cls, path: Path) -> "_Lock | None":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd)

    def release(self) -> None:
        os.close(self.fd)


def _take_lock(runtime: Path) -> _Lock | None:
    """The worker lock, or None when the worker holding it answers. A holder that answers
    nothing is starting (it answers soon) or exiting (its socket is closed while it
    finishes): wait for either, so that whoever started us is never told `ready` with
    nothing about to answer."""
    path, socket = runtime / "worker.lock", socket_path(runtime)
    deadline = time.monotonic() + LOCK_WAIT
    while (lock := _Lock.try_acquire(path)) is None:
        if worker_answers(socket):
            return None
        if time.monotonic() > deadline:
            raise CrfsError(f"another crfs worker holds {path} (pid {_lock_holder(path)}) and has not "
                            f"answered at {socket} for {LOCK_WAIT:g} s")
        time.sleep(0.05)
    return lock


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _setup_logging(runtime: Path) -> None:
    handler = logging.handlers.RotatingFileHandler(runtime / "worker.log", maxBytes=1 << 20, backupCount=2)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


@dataclass
class ReadyReport:
    """Tells whoever started us (crfs.so, through CRFS_WORKER_READY_FD) that we serve, or
    why we cannot, so a mount fails at once with the reason instead of timing out."""

    fd: int | None

    @classmethod
    def from_environment(cls) -> "ReadyReport":
        text = os.environ.pop("CRFS_WORKER_READY_FD", "")
        if not text.isdigit():
            return cls(None)
        fd = int(text)
        try:
            os.set_inheritable(fd, False)  # not for fusermount3 or anything else we start
        except OSError:
            return cls(None)
        return cls(fd)

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def run(config: WorkerConfig, ready: ReadyReport | None = None) -> int:
    """Serves until told to stop or idle; 0 also when another worker already runs."""
    ready = ready or ReadyReport(None)
    try:
        ensure_private_dir(config.runtime)
    except CrfsError as exc:
        ready.send(f"error: {exc}")
        return 1
    try:
        lock = _take_lock(config.runtime)
    except CrfsError as exc:
        ready.send(f"error: {exc}")
        return 1
    if lock is None:
        ready.send("ready")  # another worker serves
        return 0
    _setup_logging(config.runtime)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    view: FileView | None = None
    table: LayerTable | None = None
    try:
        table = LayerTable(KeyStore(config.runtime), ensure_private_dir(config.index),
                           ChunkStore(config.chunks, config.cache_size), config.fetch)
        view = _file_view(config, table)
        view.mount()
        service = LowerLayerService(table, view, ContentCache(config.content))
        server = IpcServer(socket_path(config.runtime), service)
        server.start()
        log.info("worker %d serving %s", os.getpid(), server.path)
        ready.send("ready")
        try:
            _wait(server, view, stop, None if config.store else config.idle_timeout, config.podman)
        finally:
            server.stop()
    except (CrfsError, OSError) as exc:
        log.error("%s", exc)
        ready.send(f"error: {exc}")
        return 1
    finally:
        if table is not None:
            table.close()
        if view is not None:
            view.unmount()
        lock.release()
        log.info("worker %d stopped", os.getpid())
    return 0


def _file_view(config: WorkerConfig, table: LayerTable) -> FileView:
    """The worker's one FUSE mount: the layer view alone, or the layer store with the
    view inside it."""
    if config.store is None:
        return FileView(LayerViewRoot(table), config.runtime / "view")

    def registry_client() -> object:
        from .registry import RegistryClient

        # The store resolves an image just before its layer is opened: the blob reads share
        # its client, so they neither probe the registry's scheme again (a TLS context and
        # two round trips) nor set up a transport of their own (another TLS context).
        opener = table.blob_opener
        return opener.registry() if isinstance(opener, RecordBlobOpener) else RegistryClient()

    store = open_store(table, config.runtime, registry_client)
    root = StoreRoot(store, LayerViewRoot(table, ino=VIEW_ROOT_INO))
    return FileView(root, config.store, view_dir=config.store / VIEW_NAME, read_only=False)


def _wait(server: IpcServer, view: FileView, stop: threading.Event, idle_timeout: float | None,
          podman: PodmanNamespace | None = None) -> None:
    """Until told to stop, the FUSE mount dies, podman moves to new namespaces, or
    `idle_timeout` seconds pass without a client (None: never)."""
    idle_since = time.monotonic()
    ticks = 0
    while not stop.wait(1.0):
        ticks += 1
        if not view.alive:
            # Without the view no fd can be served: exit, so that the next client starts a new worker.
            log.error("the layer view is gone: exiting")
            return
        if podman is not None and ticks % NAMESPACE_CHECK_TICKS == 0 and podman.moved():
            # A process cannot move from one user namespace to a sibling: a new worker must.
            log.error("podman moved to new namespaces (its pause process restarted): exiting, so that a "
                      "new worker serves the layer store where podman can see it")
            return
        if server.client_count or idle_timeout is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle_timeout:
            log.info("idle for %.0f s: exiting", idle_timeout)
            return


def _cache_size(option: str | None) -> int | None:
    """--cache-size, else $CRFS_CACHE_SIZE; None (unlimited) when neither is set."""
    text = option if option is not None else os.environ.get("CRFS_CACHE_SIZE", "").strip()
    return parse_size(text) if text else None


def _store_dir(args: argparse.Namespace) -> Path | None:
    if args.no_store:
        return None
    store = args.store or configured_store_dir()
    return store.absolute() if store is not None else None


def main(argv: list[str] | None = None) -> int:
    """`crfs worker [OPTIONS]`: run the worker in the foreground of this process (or,
    with --detach, in the background once it serves)."""
    parser = argparse.ArgumentParser(prog="crfs worker", description="serve crfs.so, podman's layer store "
                                                                     "and the crfs CLI")
    parser.add_argument("--idle-timeout", type=float, default=600.0,
                        help="exit after this many seconds without clients (default 600; inf: never; "
                             "never while serving a layer store)")
    parser.add_argument("--store", type=Path, metavar="DIR",
                        help="serve podman's additional layer store at DIR (default: the store podman's "
                             "storage.conf lists, if it is ~/.local/share/crfs/store)")
    parser.add_argument("--no-store", action="store_true", help="serve no layer store")
    parser.add_argument("--no-podman-namespace", action="store_true",
                        help="mount the store where we are, even for a rootless podman user")
    parser.add_argument("--detach", action="store_true",
                        help="run in the background; return once the worker serves (or say why not)")
    parser.add_argument("--no-background-fetch", action="store_true",
                        help="fetch only what is read (default: make mounted layers wholly local "
                             "in the background; CRFS_BACKGROUND_FETCH=0 does the same)")
    parser.add_argument("--cache-size", metavar="SIZE",
                        help="keep the chunk store within SIZE (e.g. 10G, 512M), evicting the least "
                             "recently used chunks (default: $CRFS_CACHE_SIZE, else unlimited)")
    args = parser.parse_args(argv)
    if args.detach:
        return _detach([a for a in (sys.argv[1:] if argv is None else argv) if a != "--detach"])
    ready = ReadyReport.from_environment()
    try:
        store = _store_dir(args)
        podman = None
        if store is not None and not args.no_podman_namespace and wants_podman_namespace():
            # Before any thread exists: a process that runs threads cannot join a user namespace.
            podman = enter_podman_namespace()
        fetch = FetchOptions.from_environment(background=False if args.no_background_fetch else None)
        config = WorkerConfig(runtime_dir(), index_dir(), cache_dir() / "content", args.idle_timeout, fetch,
                              store, podman, _cache_size(args.cache_size))
    except CrfsError as exc:
        ready.send(f"error: {exc}")
        print(f"crfs worker: {exc}", file=sys.stderr)
        return 1
    return run(config, ready)


def _detach(argv: list[str]) -> int:
    """Starts `crfs worker ARGV` detached and returns once it serves, or says why not."""
    from .workerstart import ensure_worker as start_unless_running

    try:
        start_unless_running(timeout=120.0, command=[sys.executable, "-m", "crfs_worker.worker", *argv])
    except CrfsError as exc:
        print(f"crfs worker: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- clients


def ensure_worker(runtime: Path | None = None, timeout: float = 30.0) -> bool:
    """Starts a detached worker unless one answers (True if it started one); see workerstart.py."""
    from .workerstart import ensure_worker as start_unless_running

    return start_unless_running(runtime, timeout=timeout)


def connect(runtime: Path | None = None) -> WorkerClient:
    """A connection to the running worker (IpcError if none answers)."""
    return WorkerClient(socket_path(runtime)).connect()


def request_stats(runtime: Path | None = None) -> list[dict[str, Any]]:
    """Per-layer counters of the running worker, for `crfs stats`."""
    with connect(runtime) as client:
        return list(client.call("stats").fields["layers"])


def format_stats(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'LAYER':>5}  {'FETCHED':>12}  {'CACHED':>12}  {'REQUESTS':>8}  {'VERIFY-FAIL':>11}  "
             f"{'BACKGROUND':>10}  NAME"]
    for row in rows:
        lines.append(
            f"{row['num']:>5}  {row['fetched']:>12}  {row['cached']:>12}  {row['requests']:>8}  "
            f"{row['failures']:>11}  {progress_label(row.get('background') or {}):>10}  {row['name']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
