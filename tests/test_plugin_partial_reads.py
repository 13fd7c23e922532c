"""A read of a view fd that fails part-way must reach the reader as an error, never as
zeros. fuse-overlayfs 1.10 reads a lower fd by splice, and libfuse answers a splice that
stopped at an error after some bytes with a SHORT reply; the kernel takes a short FUSE
read for the end of the file and fills the rest of the request with zeros, which stay in
fuse-overlayfs's page cache. Pages already in the view's page cache followed by a chunk
that fails (a registry error, a corrupt chunk, the worker killed) made exactly that. The
view fds handed to crfs.so are O_DIRECT: one fuse-overlayfs read is one view request,
which succeeds or fails whole.

Both tests put the file's first chunk in the view's page cache by reading it through the
view, then make the next chunk fail while fuse-overlayfs reads across the two."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.test_prefetch import BIG, CHUNK, DEADLINE, EACH_FUSE_OVERLAYFS, FUSE_OVERLAYFS, Crfs, PrefetchImage, crfs, image  # noqa: F401

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")

SPAN = 4 * CHUNK  # one read across the cached chunk and those after it

# A child process reads SPAN bytes at 0 and prints how many it got, or the errno.
_READ = r"""
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    got = os.pread(fd, int(sys.argv[2]), 0)
    os.close(fd)
    expected = open(sys.argv[3], "rb").read(len(got))
    print("ok" if got == expected else "wrong", len(got))
except OSError as exc:
    print("err", exc.errno)
"""


def _cache_first_chunk(worker: Crfs) -> None:
    """Reads big.bin's first chunk through the view (no readahead: that chunk only)."""
    view = worker.runtime / "view"
    num = next(n for n in os.listdir(view) if (view / n / "data/big.bin").exists())
    fd = os.open(view / num / "data/big.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, CHUNK, 0) == BIG[:CHUNK]
    finally:
        os.close(fd)


def _read_in_child(path: Path, expected: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _READ, str(path), str(SPAN), str(expected)],
                            stdout=subprocess.PIPE, text=True)


def _verdict(child: subprocess.Popen[str]) -> str:
    out, _ = child.communicate(timeout=DEADLINE)
    return out.split()[0]


def _assert_intact(merged: Path) -> None:
    with open(merged / "data/big.bin", "rb") as f:
        assert f.read(SPAN) == BIG[:SPAN]  # what fuse-overlayfs's page cache kept
    assert (merged / "data/big.bin").read_bytes() == BIG


def _read_across_a_failing_chunk(image: PrefetchImage, worker: Crfs, merged: Path, tmp_path: Path) -> None:
    """big.bin's first chunk in the view's page cache, every blob GET failing: a read
    across both gives an error or (short) right bytes, never zeros."""
    expected = tmp_path / "big.bin"
    expected.write_bytes(BIG)
    _cache_first_chunk(worker)
    image.relay.fail_next(1000, 503, path_contains="/blobs/", method="GET")
    try:
        verdict = _verdict(_read_in_child(merged / "data/big.bin", expected))
    finally:
        image.relay.fail_next(0)
    assert verdict in ("err", "ok")
    _assert_intact(merged)


def test_failed_chunk_after_cached_pages_is_an_error(image: PrefetchImage, crfs: Callable[..., Crfs],
                                                    tmp_path: Path) -> None:
    worker = crfs("--no-background-fetch", CRFS_FETCH_COALESCE="0", CRFS_FETCH_READ_AHEAD="0",
                  CRFS_FETCH_ATTEMPTS="1")
    _read_across_a_failing_chunk(image, worker, worker.mount(), tmp_path)


def test_worker_killed_during_a_read_after_cached_pages(image: PrefetchImage, crfs: Callable[..., Crfs],
                                                       tmp_path: Path) -> None:
    worker = crfs("--no-background-fetch", CRFS_FETCH_COALESCE="0", CRFS_FETCH_READ_AHEAD="0")
    merged = worker.mount()
    expected = tmp_path / "big.bin"
    expected.write_bytes(BIG)
    _cache_first_chunk(worker)
    # The relay counts a request until it has sent the last byte, maybe after the client
    # moved on: wait for none, so that the request awaited below is the child's read (the
    # kill landed during the child's lookups otherwise, see the test after this one).
    image.relay.records(DEADLINE)
    image.registry.process.pause()  # the next chunk's fetch hangs: the read is in flight
    try:
        child = _read_in_child(merged / "data/big.bin", expected)
        assert image.relay.wait_in_flight(1, DEADLINE), "the read never reached the registry"
        old = worker.worker_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        verdict = _verdict(child)
    finally:
        image.registry.process.resume()
    assert verdict in ("err", "ok")
    _assert_intact(merged)  # through the worker the plugin starts anew


def _plain_overlay_over_view(worker: Crfs, base: Path) -> Path:
    """fuse-overlayfs WITHOUT crfs.so over the layer holding big.bin in the worker's view:
    it opens the view's files itself, as it opens the diff trees of podman's layer store
    (the same FUSE tree code serves both)."""
    view = worker.runtime / "view"
    num = next(n for n in os.listdir(view) if (view / n / "data/big.bin").exists())
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    opts = f"lowerdir={view / num},upperdir={upper},workdir={work}"
    done = subprocess.run([str(worker.program), "-o", opts, str(merged)], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    worker.mounted.append(merged)
    return merged


@EACH_FUSE_OVERLAYFS
def test_plain_fuse_overlayfs_over_the_tree_gets_an_error_not_zeros(
        image: PrefetchImage, crfs: Callable[..., Crfs], tmp_path: Path) -> None:
    """The store path with plain fuse-overlayfs (no crfs.so): it opens a tree file whose
    first chunk is in the page cache, and the next chunk fails. Direct I/O alone is not
    enough (after the failed 128 KiB read the kernel reads page by page, the pages before
    the failed chunk succeed and fuse-overlayfs answers short all the same): each read of
    such a file first fetches what the next 128 KiB need (fileview.OpenFile.guarded)."""
    worker = crfs("--no-background-fetch", CRFS_FETCH_COALESCE="0", CRFS_FETCH_READ_AHEAD="0",
                  CRFS_FETCH_ATTEMPTS="1")
    worker.mount()  # starts the worker and loads the layers into its view
    _read_across_a_failing_chunk(image, worker, _plain_overlay_over_view(worker, tmp_path / "plain"), tmp_path)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"worker {pid} did not die"
        time.sleep(0.05)


def test_worker_lost_while_a_directory_is_first_listed(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    """fuse-overlayfs (1.10 to 1.16) SKIPS a layer whose ds->opendir fails while it lists a
    directory, and keeps the listing: had crfs.so failed that opendir because the worker
    was lost and no new one answered yet, merged/data would stay without the layer's
    files, ENOENT for good. The listing's stream must report the failure instead (the
    lookup fails, nothing is kept) so that the next access, with a worker back, succeeds.
    A new worker is kept from answering by making the runtime directory one crfs.so
    refuses (a real check of the plugin, turned on and off at will)."""
    # No look-ahead: it would list data/ at the mount, before the worker is lost.
    worker = crfs("--no-background-fetch", CRFS_LIST_AHEAD="0")
    merged = worker.mount()  # lists the layers' roots, not data/
    old = worker.worker_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _wait_gone(old)
    worker.runtime.chmod(0o755)  # crfs.so refuses it: no worker can be reached
    try:
        with pytest.raises(OSError) as lost:
            (merged / "data/big.bin").stat()
        assert lost.value.errno == errno.EIO  # not ENOENT: nothing about data/ was concluded
    finally:
        worker.runtime.chmod(0o700)
    assert (merged / "data/big.bin").read_bytes() == BIG  # a new worker lists data/ now
