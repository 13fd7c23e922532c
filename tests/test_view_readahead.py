"""The view pushes the pages of a sequentially read file into the kernel's page cache
(fileview.ReadAheadPusher, FUSE notify_store), so that the reader's later reads reach the
worker not at all; scattered reads push nothing; a chunk that fails verification is never
pushed and its reader gets EIO.

A real pyfuse3 mount of the layer view in the test process, over a real LayerTable (a
blobgen eStargz layer in a file). `CountingLayers` records every read the tree made and
which thread made it: the pusher's threads are named `crfs-push`, every other read was a
kernel request.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from crfs_worker.chunkstore import ChunkStore
from crfs_worker.fileview import PUSH_AFTER, FileView, LayerViewRoot, ReadAheadPusher
from crfs_worker.layerkeys import KeyStore, LayerRecord
from crfs_worker.lowerlayer import LayerTable
from crfs_worker.prefetch import AheadPolicy, FetchOptions
from tests import blobgen

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

CHUNK = 1 << 20
BIG = os.urandom(12 * CHUNK + 12345)     # not a multiple of a page: the last push is short
SCATTERED = os.urandom(12 * CHUNK)
BAD = os.urandom(12 * CHUNK)
BAD_CHUNK = 8                            # the chunk of BAD whose compressed bytes are altered


@dataclass
class CountingLayers:
    """The real layer table; `reads` lists (pushed?, path, offset, size) of every read."""

    table: LayerTable
    reads: list[tuple[bool, str, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)

    def read(self, num: int, path: str, offset: int, size: int) -> bytes:
        pushed = threading.current_thread().name.startswith("crfs-push")
        with self.lock:
            self.reads.append((pushed, path, offset, size))
        return self.table.read(num, path, offset, size)

    def kernel_reads(self, path: str, start: int = 0) -> list[tuple[int, int]]:
        with self.lock:
            return [(off, size) for pushed, p, off, size in self.reads if not pushed and p == path and off >= start]


@dataclass
class Mounted:
    view: FileView
    layers: CountingLayers
    layer_dir: Path

    @property
    def pusher(self) -> ReadAheadPusher:
        assert self.view.operations is not None
        return self.view.operations.pusher


def _corrupt_chunk(blob: blobgen.Blob, path: str, index: int) -> bytes:
    """The blob with one byte inside the compressed bytes of `path`'s chunk `index` flipped."""
    entries = [e for e in json.loads(blob.toc_json)["entries"] if e.get("name") == path and "offset" in e]
    entries.sort(key=lambda e: e.get("chunkOffset", 0))
    start = entries[index]["offset"]
    end = entries[index + 1]["offset"]
    data = bytearray(blob.data)
    data[(start + end) // 2] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="module")
def mounted() -> Iterator[Mounted]:
    base = Path(tempfile.mkdtemp(prefix="crfs-ra-"))
    specs = [blobgen.reg("big", BIG), blobgen.reg("scattered", SCATTERED), blobgen.reg("bad", BAD)]
    blob = blobgen.estargz(specs, chunk_size=CHUNK)
    (base / "layer.esgz").write_bytes(_corrupt_chunk(blob, "bad", BAD_CHUNK))
    keys = KeyStore(base / "rt")
    num = keys.number_for(LayerRecord("file", str(base / "layer.esgz"), toc_digest=blob.toc_digest))
    # No neighbours, no fetch read-ahead: a chunk is fetched only when its bytes are asked for.
    options = FetchOptions(background=False, ahead=AheadPolicy(coalesce=0, read_ahead=0))
    table = LayerTable(keys, base / "index", ChunkStore(base / "chunks"), options)
    layers = CountingLayers(table)
    table.get(num)
    view = FileView(LayerViewRoot(layers), base / "mnt")  # type: ignore[arg-type]
    view.mount()
    try:
        yield Mounted(view, layers, base / "mnt" / str(num))
    finally:
        view.unmount()
        table.close()
        shutil.rmtree(base, ignore_errors=True)


def test_sequential_reads_are_pushed_and_reach_the_worker_only_at_the_pushed_end(mounted: Mounted) -> None:
    fd = os.open(mounted.layer_dir / "big", os.O_RDONLY)
    got = bytearray()
    try:
        # Waiting for the pushes after each read: the kernel then asks only where the
        # pushed pages end, and the window doubles with the run (4, 8, ... MiB).
        while piece := os.pread(fd, 1 << 16, len(got)):
            got += piece
            assert mounted.pusher.wait_idle(60)
    finally:
        os.close(fd)
    assert got == BIG
    asked = mounted.layers.kernel_reads("big")
    # Without pushes: one request per 128 KiB of readahead, ~100 for this file.
    assert len(asked) <= 30, asked
    assert mounted.pusher.pushed_bytes >= len(BIG) - PUSH_AFTER - sum(size for _, size in asked)


def test_scattered_reads_push_nothing(mounted: Mounted) -> None:
    before = mounted.pusher.pushed_bytes
    fd = os.open(mounted.layer_dir / "scattered", os.O_RDONLY)
    try:
        for offset in (9 * CHUNK, 2 * CHUNK, 11 * CHUNK, 5 * CHUNK, 0, 7 * CHUNK):
            assert os.pread(fd, 4096, offset) == SCATTERED[offset:offset + 4096]
    finally:
        os.close(fd)
    assert mounted.pusher.wait_idle(60)
    assert mounted.pusher.pushed_bytes == before
    assert mounted.layers.kernel_reads("scattered")


def test_a_chunk_failing_verification_is_not_pushed_and_its_reader_gets_eio(mounted: Mounted) -> None:
    fd = os.open(mounted.layer_dir / "bad", os.O_RDONLY)
    got = bytearray()
    try:
        with pytest.raises(OSError) as raised:
            while piece := os.pread(fd, 1 << 16, len(got)):
                got += piece
        assert raised.value.errno == errno.EIO
        assert mounted.pusher.wait_idle(60)
        with pytest.raises(OSError) as again:  # none of the bad chunk's pages was pushed
            os.pread(fd, 4096, BAD_CHUNK * CHUNK + 4096)
        assert again.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert bytes(got) == BAD[:len(got)]
    assert len(got) <= BAD_CHUNK * CHUNK
