"""The worker under faults, with real processes: a worker killed with SIGKILL under eight
reader processes in a fuse-overlayfs mount (crfs.so lowers), malformed IPC frames, a
registry that hangs or is gone, and a worker restarted while the registry is down.

The image, registry, relay and per-test workers are those of tests/test_prefetch.py.
Waits are conditions with generous deadlines; nothing asserts a duration.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from crfs_worker.ipc import WorkerClient
from tests.test_prefetch import (  # noqa: F401  (fixtures)
    BASE_FILES,
    BIG,
    DEADLINE,
    EXPECTED,
    FUSE_OVERLAYFS,
    Crfs,
    PrefetchImage,
    crfs,
    image,
    merged_files,
)

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")

READERS = 8
SLICE = 128 << 10

# One reader process: until STOP exists, open a random file (afresh each time), read it
# whole (or a random slice of a large one), compare with the expected copy, log one line.
_READER = r"""
import os, random, sys
root, expected, stop, log, seed = sys.argv[1:6]
rng = random.Random(int(seed))
names = sorted(os.path.relpath(os.path.join(d, n), expected) for d, _, ns in os.walk(expected) for n in ns)
with open(log, "a", buffering=1) as out:
    while not os.path.exists(stop):
        name = rng.choice(names)
        size = os.path.getsize(os.path.join(expected, name))
        offset = rng.randrange(0, size - SLICE) if size > 4 * SLICE else 0
        length = SLICE if size > 4 * SLICE else size
        try:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                got = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            out.write(f"err {exc.errno} {name}\n")
            continue
        with open(os.path.join(expected, name), "rb") as f:
            f.seek(offset)
            want = f.read(length)
        # A read in flight on the killed worker's view can come back short (the bytes it
        # has are right): "short" is that; "wrong" would be different bytes.
        verdict = "ok" if got == want else "short" if got and want.startswith(got) else "wrong"
        out.write(f"{verdict} {name}\n")
""".replace("SLICE", str(SLICE))


def _write_expected(directory: Path) -> Path:
    for name, data in EXPECTED.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def _log_lines(logs: list[Path]) -> list[list[str]]:
    return [path.read_text().splitlines() if path.exists() else [] for path in logs]


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_sigkilled_worker_under_eight_readers(image: PrefetchImage, crfs: Callable[..., Crfs],
                                              tmp_path: Path) -> None:
    """The kill happens while 8 processes read through the mount: the mount survives, the
    plugin starts a new worker, reads resume, and what the mount wrote stays intact."""
    worker = crfs()
    merged = worker.mount()
    upper = merged.parent / "upper"
    expected = _write_expected(tmp_path / "expected")
    (merged / "etc/written-before").write_bytes(b"before the kill\n")
    held_small = open(merged / "bin/app", "rb")  # a content-cache fd from the old worker
    stop, logs = tmp_path / "stop", [tmp_path / f"reader{i}.log" for i in range(READERS)]
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(merged), str(expected), str(stop), str(log),
                                 str(i)]) for i, log in enumerate(logs)]
    try:
        _wait(lambda: all(sum(line.startswith("ok") for line in lines) >= 5 for lines in _log_lines(logs)),
              "every reader to read through the first worker")
        old = worker.worker_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        _wait(lambda: worker.worker_pid() not in (None, old), "the plugin to start a new worker")
        marks = [len(lines) for lines in _log_lines(logs)]
        _wait(lambda: all(sum(line.startswith("ok") for line in lines[mark:]) >= 20
                          for lines, mark in zip(_log_lines(logs), marks)),
              "every reader to read through the new worker")
    finally:
        stop.touch()
        for reader in readers:
            reader.wait(timeout=DEADLINE)
    per_reader = _log_lines(logs)
    assert not [line for lines in per_reader for line in lines if line.startswith("wrong")]  # never wrong bytes
    # Files are reopened for every read and the plugin reconnects within the call: the
    # only read that may fail (an error, or short with the right bytes) is the one in
    # flight at the kill, at most one per reader; every read after it succeeds (above).
    for lines in per_reader:
        failed = [line for line in lines if line.startswith(("err", "short"))]
        assert len(failed) <= 1, failed
    assert held_small.read() == EXPECTED["bin/app"]  # the fd outlives the worker that gave it
    held_small.close()
    # The mount's own writes (its upper layer) are intact, old and new.
    (merged / "etc/written-after").write_bytes(b"after the restart\n")
    assert (upper / "etc/written-before").read_bytes() == b"before the kill\n"
    assert (merged / "etc/written-before").read_bytes() == b"before the kill\n"
    assert (upper / "etc/written-after").read_bytes() == b"after the restart\n"
    assert {k: v for k, v in merged_files(merged).items() if not k.startswith("etc/written-")} == EXPECTED


def test_malformed_frame_closes_only_that_connection(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    merged = worker.mount()
    socket_path = worker.runtime / "worker.sock"
    with WorkerClient(socket_path) as bystander:
        pid = bystander.call("hello", version=1).fields["pid"]
        frames = [
            struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",   # 0xc1: never valid msgpack
            struct.pack(">I", 3) + b"\x93\x01\x02",           # a msgpack list, not a map
            struct.pack(">I", 0xFFFFFFF0),                    # a length over the frame limit
            struct.pack(">I", 0),                             # an empty frame
        ]
        for frame in frames:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
                bad.settimeout(DEADLINE)
                bad.connect(str(socket_path))
                bad.sendall(frame)
                assert bad.recv(1) == b""  # the worker hung up on it, answering nothing
            # The bystander's connection and every other client are still served.
            assert bystander.call("hello", version=1).fields["pid"] == pid
    assert (merged / "data/many/f07.txt").read_bytes() == BASE_FILES["data/many/f07.txt"]
    assert worker.worker_pid() == pid


_TIMED_READ = r"""
import errno, os, sys, time
start = time.monotonic()
try:
    with open(sys.argv[1], "rb") as f:
        f.read()
    print("ok", 0.0)
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno), round(time.monotonic() - start, 1))
"""


def test_hung_registry_fails_unfetched_reads_within_the_deadline(image: PrefetchImage,
                                                                 crfs: Callable[..., Crfs]) -> None:
    """A registry that accepts connections but never answers (SIGSTOP): fetched files keep
    working, unfetched reads end in EIO (the fetch deadline bounds every try), and once it
    answers again the same mount reads them."""
    # No neighbours fetched along (CRFS_FETCH_COALESCE=0): f33 must stay unfetched here.
    worker = crfs("--no-background-fetch", CRFS_FETCH_DEADLINE="3", CRFS_FETCH_ATTEMPTS="2",
                  CRFS_FETCH_COALESCE="0")
    merged = worker.mount()
    assert (merged / "data/many/f03.txt").read_bytes() == BASE_FILES["data/many/f03.txt"]
    image.registry.process.pause()
    try:
        outcomes = []
        for name in ("data/many/f03.txt", "data/many/f33.txt", "data/big.bin"):
            # A child with a hang guard: a read that never ends fails the test here.
            result = subprocess.run([sys.executable, "-c", _TIMED_READ, str(merged / name)],
                                    capture_output=True, text=True, timeout=DEADLINE)
            outcomes.append(result.stdout.split()[0])
        assert outcomes == ["ok", "EIO", "EIO"]
    finally:
        image.registry.process.resume()
    assert (merged / "data/many/f33.txt").read_bytes() == BASE_FILES["data/many/f33.txt"]
    with open(merged / "data/big.bin", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(BIG).digest()


def test_restarted_worker_serves_a_local_image_with_the_registry_down(image: PrefetchImage,
                                                                      crfs: Callable[..., Crfs]) -> None:
    """Once the background fetch made the image local, the registry may go: a worker
    killed and restarted reopens its layers from the kept footers and cached indexes,
    for the mount that survived and for a new mount of the same key."""
    worker = crfs(CRFS_FETCH_DEADLINE="3", CRFS_FETCH_ATTEMPTS="2")
    key = worker.key()
    merged = worker.mount()
    worker.wait_for(lambda: all(row["background"]["state"] == "complete" for row in worker.stats()),
                    "background fetch")
    image.registry.process.stop()
    try:
        old = worker.worker_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        _wait(lambda: worker.worker_pid() != old, "the old worker to die")
        before = len(image.relay.records())
        assert merged_files(merged) == EXPECTED  # the plugin restarts the worker
        second = worker.mount_key(key, "offline")
        assert merged_files(second) == EXPECTED
        # Not one request reached the relay: nothing needed the registry.
        assert image.relay.records()[before:] == []
        assert all(row["requests"] == 0 and row["failures"] == 0 for row in worker.stats())
    finally:
        image.registry.process.start()


def test_kept_footer_is_untrusted_input(tmp_path: Path) -> None:
    """A footer kept on disk that is not ours (or too long) is ignored, never served."""
    from crfs_worker.blob import LocalBlob
    from crfs_worker.blobtail import TailKeepingBlob

    blob_file = tmp_path / "blob"
    blob_file.write_bytes(bytes(range(256)) * 4)
    kept = tmp_path / "tails" / ("ab" * 32)
    with LocalBlob(blob_file) as local:
        first = TailKeepingBlob(local, kept)
        assert first.read_range(1000, 24) == (bytes(range(256)) * 4)[1000:]
        assert kept.read_bytes() == (bytes(range(256)) * 4)[1000:]
        kept.write_bytes(b"x" * 24)  # altered, but still ours and private: the same promise
        os.chmod(kept, 0o644)        # open to others: ignored
        assert TailKeepingBlob(local, kept).read_range(1000, 24) == (bytes(range(256)) * 4)[1000:]
        os.chmod(kept, 0o600)
        kept.write_bytes(b"y" * 2000)  # longer than the blob: ignored
        assert TailKeepingBlob(local, kept).read_range(1000, 24) == (bytes(range(256)) * 4)[1000:]
