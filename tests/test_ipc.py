"""The worker's wire protocol and socket server, over real Unix sockets.

The handler here is a small real one (it answers from a dict and opens real files);
no socket or kernel behaviour is mocked.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest

from crfs_worker.contentcache import ContentCache
from crfs_worker.errors import CrfsError, VerificationError
from crfs_worker.ipc import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    IpcError,
    IpcServer,
    RequestFailed,
    WorkerClient,
    encode_frame,
    recv_frame,
    send_frame,
)
from crfs_worker.layerkeys import KeyStore, LayerRecord, UnknownKeyError, compose_ino, key_for
from crfs_worker.lowerlayer import errno_for, path_parts


class DictHandler:
    """Answers `get` from a dict, `file` with an fd on a real file, `boom` by crashing."""

    def __init__(self, tmp: Path) -> None:
        self.values = {"a": 1, "b": b"\x00\xff"}
        self.file = tmp / "payload"
        self.file.write_bytes(b"payload bytes")

    def handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        op = request["op"]
        if op == "hello":
            return {"version": PROTOCOL_VERSION, "pid": os.getpid()}, None
        if op == "get":
            if request["key"] not in self.values:
                raise RequestFailed(errno.ENOENT, f"no {request['key']}")
            return {"value": self.values[request["key"]]}, None
        if op == "file":
            return {}, os.open(self.file, os.O_RDONLY | os.O_CLOEXEC)
        if op == "boom":
            raise ZeroDivisionError("handler bug")
        raise RequestFailed(errno.ENOSYS, op)


@pytest.fixture
def server(tmp_path: Path):
    handler = DictHandler(tmp_path)
    srv = IpcServer(tmp_path / "s.sock", handler)
    srv.start()
    yield srv
    srv.stop()


def test_frames_roundtrip_with_fd(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    target = tmp_path / "f"
    target.write_bytes(b"xyz")
    fd = os.open(target, os.O_RDONLY)
    try:
        send_frame(a, {"op": "x", "path": b"\xff/bin"}, fd)
    finally:
        os.close(fd)
    message, fds = recv_frame(b)
    assert message == {"op": "x", "path": b"\xff/bin"}
    assert len(fds) == 1
    assert os.pread(fds[0], 3, 0) == b"xyz"
    assert os.get_inheritable(fds[0]) is False  # received with MSG_CMSG_CLOEXEC
    os.close(fds[0])
    a.close()
    b.close()


def test_recv_refuses_oversized_and_garbage_frames() -> None:
    a, b = socket.socketpair()
    a.sendall(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(IpcError, match="out of range"):
        recv_frame(b)
    a2, b2 = socket.socketpair()
    a2.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(IpcError, match="undecodable"):
        recv_frame(b2)
    a3, b3 = socket.socketpair()
    body = msgpack.packb([1, 2])
    a3.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(IpcError, match="not a map"):
        recv_frame(b3)
    for s in (a, b, a2, b2, a3, b3):
        s.close()


def test_truncated_frame_is_a_connection_error() -> None:
    a, b = socket.socketpair()
    a.sendall(encode_frame({"op": "x"})[:-1])
    a.close()
    with pytest.raises(ConnectionResetError):
        recv_frame(b)
    b.close()


def test_client_server_replies_and_errors(server: IpcServer) -> None:
    with WorkerClient(server.path) as client:
        assert client.call("get", key="a").fields == {"err": 0, "value": 1}
        assert client.call("get", key="b").fields["value"] == b"\x00\xff"
        with pytest.raises(RequestFailed) as failed:
            client.call("get", key="zz")
        assert failed.value.errno == errno.ENOENT and "no zz" in str(failed.value)
        # A crashing handler answers EIO and the connection keeps working.
        with pytest.raises(RequestFailed) as crashed:
            client.call("boom")
        assert crashed.value.errno == errno.EIO
        reply = client.call("file")
        assert reply.fd is not None
        assert os.pread(reply.fd, 100, 0) == b"payload bytes"
        reply.close_fd()
        assert client.call("get", key="a").fields["value"] == 1


def test_server_serves_clients_concurrently(server: IpcServer) -> None:
    results: list[int] = []

    def worker() -> None:
        with WorkerClient(server.path) as client:
            for _ in range(50):
                results.append(client.call("get", key="a").fields["value"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [1] * 200


def test_socket_is_private(server: IpcServer) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o600


def test_other_uid_is_refused(tmp_path: Path) -> None:
    # A real second user: a child process that drops to nobody before connecting.
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="crfs-ipc-"))  # outside pytest's 0700 tree
    shared.chmod(0o755)
    server = IpcServer(shared / "s.sock", DictHandler(tmp_path))
    server.start()
    os.chmod(server.path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(server.path))
            s.sendall(encode_frame({"op": "get", "key": "a"}))
            data = s.recv(100)
            os.write(w, b"closed" if data == b"" else b"served")
        except (ConnectionResetError, BrokenPipeError):  # closed before or after our request
            os.write(w, b"closed")
        except OSError as exc:
            os.write(w, f"error {exc}".encode())
        os._exit(0)
    os.close(w)
    outcome = os.read(r, 100)
    os.waitpid(pid, 0)
    os.close(r)
    server.stop()
    shared.rmdir()
    assert outcome == b"closed"


def test_no_worker_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IpcError, match="no crfs worker answers"):
        WorkerClient(tmp_path / "absent.sock").connect()


def test_path_parts_normalise_and_refuse_climbing() -> None:
    assert path_parts(b"") == []
    assert path_parts(b".") == []
    assert path_parts(b"/a/./b/") == ["a", "b"]
    assert path_parts(b"./.wh..wh..opq") == [".wh..wh..opq"]
    with pytest.raises(RequestFailed) as climbing:
        path_parts(b"a/../../etc")
    assert climbing.value.errno == errno.ENOENT
    with pytest.raises(RequestFailed):
        path_parts(None)


def test_errno_mapping() -> None:
    assert errno_for(FileNotFoundError()) == errno.ENOENT
    assert errno_for(NotADirectoryError()) == errno.ENOTDIR
    assert errno_for(KeyError("x")) == errno.ENODATA
    assert errno_for(VerificationError("bad")) == errno.EIO
    assert errno_for(UnknownKeyError("k")) == errno.ENOENT


def test_keystore_numbers_are_stable_and_durable(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "rt")
    lower = LayerRecord("file", "/blobs/a", toc_digest="sha256:" + "a" * 64)
    upper = LayerRecord("file", "/blobs/b", toc_digest="sha256:" + "b" * 64)
    key = store.register("image-one", [lower, upper])
    assert key == key_for("image-one") and ":" not in key and "/" not in key
    nums = store.layer_numbers(key)
    assert len(nums) == 2 and nums[0] != nums[1]
    # A second store over the same directory (a restarted worker) agrees.
    again = KeyStore(tmp_path / "rt")
    assert again.layer_numbers(key) == nums
    assert again.layer(nums[0]) == upper  # uppermost first
    # The same layer in another image keeps its number.
    other = again.register("image-two", [upper])
    assert again.layer_numbers(other) == [nums[0]]
    with pytest.raises(UnknownKeyError, match="crfs lowerdir"):
        again.layer_numbers("0" * 32)
    with pytest.raises(CrfsError):
        again.register("x", [lower], key="bad:key")
    assert (tmp_path / "rt").stat().st_mode & 0o777 == 0o700


def test_compose_ino_puts_the_layer_in_high_bits() -> None:
    assert compose_ino(1, 5) == (1 << 40) | 5
    assert compose_ino(2, 5) != compose_ino(1, 5)
    with pytest.raises(CrfsError):
        compose_ino(1, 0)
    with pytest.raises(CrfsError):
        compose_ino(1, 1 << 40)


def test_content_cache_verifies_before_naming(tmp_path: Path) -> None:
    import hashlib

    cache = ContentCache(tmp_path / "cache")
    data = b"hello cache"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    fetches: list[int] = []

    def fetch() -> bytes:
        fetches.append(1)
        return data

    first = cache.get(digest, len(data), fetch)
    assert first.fetched and os.pread(first.fd, 100, 0) == data
    second = cache.get(digest, len(data), fetch)
    assert not second.fetched and fetches == [1]
    for f in (first, second):
        os.close(f.fd)
    stored = cache.path_for(digest)
    assert stored.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    bad_digest = "sha256:" + "0" * 64
    with pytest.raises(VerificationError):
        cache.get(bad_digest, len(data), fetch)
    assert not cache.path_for(bad_digest).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [stored.name]  # no temp left
    # A cache file someone else could have written is not trusted.
    os.chmod(stored, 0o644)
    assert cache.open(digest, len(data)) is None
