"""An on-demand fetch that takes neighbours streams (ChunkFetcher._stream_with_neighbours):
the reader is served once ITS chunks are in, while the neighbours' part of the same request
still streams; a broken stream releases the neighbours it did not bring and the reader's
own chunks are fetched again alone; a corrupt chunk fails only its own reader.

In-process: real layers (tests/blobgen.py) read through the worker's LayerTable. The blob
streams from memory and holds its stream before a given byte until the test releases it
(or breaks it there once): a registry cannot stop mid-body on demand, and these tests must
know that a read was served while the rest of its request had NOT arrived (no timing).
"""
from __future__ import annotations

import random
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import pytest

from crfs_worker.chunkfetch import AheadPolicy
from crfs_worker.errors import VerificationError
from tests import blobgen
from tests.blobgen import dir_, reg
from tests.support.held_layer import HeldLayer

DEADLINE = 60.0  # hang guard for waits on other threads; never a measured duration
SMALL = 2000     # bytes of each small file: incompressible, so ~2 KB of blob each
FILES = 12


class Worker(HeldLayer):
    """A LayerTable over one layer whose blob is a HeldStream; reads run in threads."""

    def __init__(self, tmp: Path, blob: blobgen.Blob, ahead: AheadPolicy = AheadPolicy(read_ahead=0)) -> None:
        super().__init__(tmp, blob, ahead, piece=512)
        self.files = blob.files

    def read_later(self, path: str) -> "Future[bytes]":
        return self.pool.submit(self.table.read, self.num, path, 0, SMALL)

    def chunk(self, path: str) -> Any:
        return self.live.layer.chunks_for(path, 0, 1)[0]

    def stored(self, path: str) -> bool:
        chunk = self.chunk(path)
        return self.table.store.has(chunk.digest, chunk.size)

    def reads(self) -> list[tuple[int, int]]:
        """Whole-range requests since the layer was opened (footer and TOC excluded)."""
        return self.blob.reads[self.opened_at[0]:]

    def close(self) -> None:
        self.blob.release()
        assert self.table.fetcher.settle(DEADLINE)
        super().close()


def _name(i: int) -> str:
    return f"a/f{i:02}"


@pytest.fixture(params=["estargz", "zstd:chunked"])
def layer(request: pytest.FixtureRequest) -> blobgen.Blob:
    rng = random.Random(5)
    specs = [dir_("a")] + [reg(_name(i), rng.randbytes(SMALL)) for i in range(FILES)]
    return blobgen.BUILDERS[request.param](specs, chunk_size=64 << 10)


@pytest.fixture
def worker(tmp_path: Path, layer: blobgen.Blob) -> Iterator[Worker]:
    made = Worker(tmp_path, layer)
    yield made
    made.close()


def test_the_reader_is_served_while_its_neighbours_still_stream(worker: Worker) -> None:
    held = worker.chunk(_name(8))
    worker.blob.hold_at = (held.cstart + held.cend) // 2  # the stream stops inside f08
    # Served although the request has not ended: f04's bytes are in.
    assert worker.read_later(_name(4)).result(DEADLINE) == worker.files[_name(4)]
    assert worker.blob.holding.wait(DEADLINE) and worker.blob.streams == [(worker.chunk(_name(0)).cstart,
                                                                   worker.chunk(_name(FILES - 1)).cend
                                                                   - worker.chunk(_name(0)).cstart)]
    # f08 on is the stream's (claimed): its reader waits for it, with no request of its own.
    waiting = worker.read_later(_name(10))
    assert not worker.stored(_name(8))
    worker.blob.release()
    assert waiting.result(DEADLINE) == worker.files[_name(10)]
    assert worker.table.fetcher.settle(DEADLINE)
    assert all(worker.stored(_name(i)) for i in range(FILES))
    assert len(worker.blob.streams) == 1 and worker.reads() == []  # ONE request for them all


def test_a_stream_broken_in_the_neighbours_releases_them_to_their_readers(worker: Worker) -> None:
    held = worker.chunk(_name(8))
    worker.blob.hold_at = (held.cstart + held.cend) // 2
    assert worker.read_later(_name(4)).result(DEADLINE) == worker.files[_name(4)]
    waiting = worker.read_later(_name(10))
    worker.blob.release(fail=True)
    # Waiting on the stream is not fetching: f10's reader fetches it itself.
    assert waiting.result(DEADLINE) == worker.files[_name(10)]
    assert worker.table.fetcher.settle(DEADLINE)
    for i in range(FILES):
        assert worker.table.read(worker.num, _name(i), 0, SMALL) == worker.files[_name(i)]
    # The chunks in before the break were not fetched again; each later one was, once.
    later = worker.blob.streams[1:] + worker.reads()
    covering = [sum(1 for a, n in later if a <= c.cstart and c.cend <= a + n)
                for c in (worker.chunk(_name(i)) for i in range(FILES))]
    assert covering == [0] * 8 + [1] * (FILES - 8)


def test_a_stream_broken_before_the_asked_chunk_fetches_it_alone(worker: Worker) -> None:
    asked = worker.chunk(_name(4))
    worker.blob.hold_at = (asked.cstart + asked.cend) // 2  # the neighbours before it are in
    reading = worker.read_later(_name(4))
    assert worker.blob.holding.wait(DEADLINE)
    worker.blob.release(fail=True)
    assert reading.result(DEADLINE) == worker.files[_name(4)]  # not EIO: it could be fetched
    assert worker.reads() == [(asked.cstart, asked.cend - asked.cstart)]  # alone, once
    assert worker.table.fetcher.settle(DEADLINE)
    assert all(worker.stored(_name(i)) for i in range(5))  # f00-f03 landed before the break
    assert not any(worker.stored(_name(i)) for i in range(5, FILES))  # released, not fetched


def test_a_corrupt_asked_chunk_fails_its_reader_and_the_neighbours_are_kept(
        tmp_path: Path, layer: blobgen.Blob) -> None:
    probe = Worker(tmp_path / "probe", layer)
    asked = probe.chunk(_name(4))
    probe.close()
    worker = Worker(tmp_path / "w", layer.flip((asked.cstart + asked.cend) // 2))
    try:
        with pytest.raises(VerificationError, match="a/f04"):
            worker.read_later(_name(4)).result(DEADLINE)
        assert worker.table.fetcher.settle(DEADLINE)
        assert len(worker.blob.streams) == 1 and worker.reads() == []
        assert not worker.stored(_name(4))
        assert all(worker.stored(_name(i)) for i in range(FILES) if i != 4)
        assert worker.live.stats.verification_failures == 1
    finally:
        worker.close()
