"""The wire protocol between crfs.so (or the CLI) and the worker, and its socket server.

Frames on a Unix stream socket: a 4-byte big-endian length, then one msgpack map.
A request is `{"op": NAME, ...arguments}`; a reply is `{"err": 0, ...fields}` or
`{"err": ERRNO, "msg": TEXT}`. A reply may carry one file descriptor (SCM_RIGHTS, sent
with the frame's first bytes). Paths and xattr names travel as msgpack bin (bytes).

Requests (all idempotent, so a client may resend after reconnecting):
    hello     {version}                   -> {version, pid}
    layers    {key}                       -> {layers: [NUM, ...]}  uppermost first
    root      {layer}                     -> fd: the layer's root directory (O_DIRECTORY)
    stat      {layer, path}               -> {st: [ino, mode, nlink, uid, gid, size,
                                               mtime_ns, rdev_major, rdev_minor]}
    exists    {layer, path}               -> {}
    list      {layer, path}               -> {entries: [[name, ino, ..., rdev_minor,
                                               [xattr name, ...]], ...]}  (a directory)
    readlink  {layer, path}               -> {target: bin}
    listxattr {layer, path}               -> {names: [bin, ...]}
    getxattr  {layer, path, name}         -> {value: bin}
    open      {layer, path, flags}        -> fd
    stats     {}                          -> {layers: [{num, name, fetched, cached,
                                               requests, failures,
                                               background: {state, done, total, error},
                                               prefetch: {state, bytes, error}}, ...]}
                                             (bytes; background state off | queued |
                                             waiting | running | complete | failed)
    record_start {}                       -> {id}   (accesslog.py: `crfs optimize`)
    record_stop  {id}                     -> {opens: [[layer, path, digest, location], ...],
                                              overflowed}  files opened for data, first
                                             access first (not idempotent: once only)
Only a peer running as our own uid is served (SO_PEERCRED), and the socket lives in a
0700 directory.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack

from .errors import CrfsError

PROTOCOL_VERSION = 1
MAX_FRAME = 64 << 20
_HEADER = struct.Struct(">I")
_MAX_FDS = 4

log = logging.getLogger(__name__)


class IpcError(CrfsError):
    """The worker connection failed or carried something that is not our protocol."""


@dataclass
class RequestFailed(CrfsError):
    """Raised by a request handler: the reply is this errno and message."""

    errno: int
    message: str

    def __str__(self) -> str:
        return f"{self.message} ({errno.errorcode.get(self.errno, self.errno)})"


@dataclass
class Reply:
    """A decoded reply: its fields, and the fd that came with it (the caller owns it)."""

    fields: dict[str, Any]
    fd: int | None = None

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise IpcError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def send_frame(sock: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    """Sends one frame; `fd` (if any) rides with its first bytes. The caller keeps `fd`."""
    data = encode_frame(message)
    if fd is None:
        sock.sendall(data)
        return
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, length: int, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    remaining = length
    fd_space = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
    while remaining:
        data, ancdata, _flags, _addr = sock.recvmsg(remaining, fd_space, socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not data:
            raise ConnectionResetError("connection closed mid-frame" if chunks else "connection closed")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Receives one frame: the decoded map and any fds that came with it (caller owns them)."""
    fds: list[int] = []
    try:
        (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds))
        if length == 0 or length > MAX_FRAME:
            raise IpcError(f"frame length {length} is out of range")
        body = _recv_exact(sock, length, fds)
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        _close_all(fds)
        raise IpcError(f"undecodable frame: {exc}") from exc
    except BaseException:
        _close_all(fds)
        raise
    if not isinstance(message, dict):
        _close_all(fds)
        raise IpcError("frame is not a map")
    return message, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class RequestHandler(Protocol):
    def handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Answers one request: reply fields and an fd to pass (closed after sending).
        Raises RequestFailed for an errno reply."""
        ...


@dataclass
class IpcServer:
    """Accepts connections on `path` and serves each in its own thread, in order."""

    path: Path
    handler: RequestHandler
    on_idle: Callable[[], None] | None = None  # called when the last client leaves
    _listener: socket.socket | None = field(default=None, init=False, repr=False)
    _clients: set[socket.socket] = field(default_factory=set, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def bind(self) -> None:
        """Binds the socket; the caller holds the worker lock, so a stale file is ours to remove."""
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self._listener = listener

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(target=self._accept_loop, name="crfs-ipc-accept", daemon=True)
        self._thread.start()

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if peer_uid(conn) != os.getuid():
                log.warning("refused a client running as uid %d", peer_uid(conn))
                conn.close()
                continue
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="crfs-ipc-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    request, fds = recv_frame(conn)
                except (ConnectionError, OSError):
                    return
                except IpcError as exc:
                    log.warning("dropping a client: %s", exc)
                    return
                _close_all(fds)  # clients send no fds
                fields, fd = self._answer(request)
                try:
                    send_frame(conn, fields, fd)
                except OSError:
                    return
                finally:
                    if fd is not None:
                        os.close(fd)
        finally:
            conn.close()
            with self._lock:
                self._clients.discard(conn)
                idle = not self._clients
            if idle and self.on_idle is not None and not self._stopping.is_set():
                self.on_idle()

    def _answer(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        try:
            fields, fd = self.handler.handle(request)
        except RequestFailed as exc:
            return {"err": exc.errno, "msg": exc.message}, None
        except Exception as exc:  # one bad request must not take the worker down
            log.exception("request %r failed", request.get("op"))
            return {"err": errno.EIO, "msg": f"internal error: {exc}"}, None
        return {"err": 0, **fields}, fd


@dataclass
class WorkerClient:
    """A blocking client for the CLI and tests: one request at a time."""

    path: Path
    _sock: socket.socket | None = field(default=None, init=False, repr=False)

    def connect(self) -> "WorkerClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise IpcError(f"no crfs worker answers at {self.path}: {exc.strerror}") from exc
        if peer_uid(sock) != os.getuid():
            sock.close()
            raise IpcError(f"{self.path} is served by another user")
        self._sock = sock
        hello = self.call("hello", version=PROTOCOL_VERSION)
        if hello.fields.get("version") != PROTOCOL_VERSION:
            self.close()
            raise IpcError(f"the worker at {self.path} speaks protocol {hello.fields.get('version')}")
        return self

    def call(self, op: str, **arguments: Any) -> Reply:
        """Sends one request. An errno reply raises RequestFailed; the fd (if any) is the caller's."""
        if self._sock is None:
            raise IpcError("not connected")
        try:
            send_frame(self._sock, {"op": op, **arguments})
            fields, fds = recv_frame(self._sock)
        except OSError as exc:
            raise IpcError(f"worker connection at {self.path} failed: {exc}") from exc
        reply = Reply(fields, fds[0] if fds else None)
        _close_all(fds[1:])
        err = fields.get("err")
        if not isinstance(err, int):
            reply.close_fd()
            raise IpcError(f"malformed reply to {op}: {fields!r}")
        if err:
            reply.close_fd()
            raise RequestFailed(err, str(fields.get("msg", "")))
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "WorkerClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
