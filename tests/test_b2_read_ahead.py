"""B2 cold reads: how a big file read sequentially is fetched (crfs_worker/chunkfetch.py).

- the read-ahead claims a file's next chunks in batches of about `request_limit` and
  fetches each batch in ONE request, not a request per chunk each time the reader
  crosses one (each costs a round trip, and the registry's per-request work);
- a read-ahead request streams: each chunk lands (verified, stored) as soon as its bytes
  are in, so the reader waits for the chunk it needs, not for the whole request;
- chunks the fetcher has just landed are served from memory, without opening their
  store files again for every small read;
- `_Gathered`, the stream's byte keeper, hands out exactly the blob's bytes for any
  cut of the stream into pieces.

Real layers (tests/blobgen.py) read through the worker's LayerTable and a real chunk
store; the blob is in memory and counts its requests and streams (HeldStream can hold a
stream at a byte, which a registry cannot be made to do on demand).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crfs_worker.chunkfetch import AheadPolicy, _Gathered
from crfs_worker.chunkstore import ChunkStore
from crfs_worker.errors import VerificationError
from tests import blobgen
from tests.blobgen import dir_, reg
from tests.support.held_layer import HeldLayer

DEADLINE = 60.0  # hang guard for the fetch threads; never a measured duration
CHUNK = 64 << 10
BIG = random.Random(5).randbytes(40 * CHUNK)  # incompressible: a chunk is ~64 KiB of blob too
PIECE = 16 << 10  # the reader's read size
# Read-ahead after two chunks read, eight chunks ahead, four chunks a request.
POLICY = AheadPolicy(coalesce=0, read_ahead=8 * CHUNK, parallel=2, request_limit=4 * CHUNK,
                     sequential_run=2 * CHUNK, sequential_slack=PIECE)


class CountingStore(ChunkStore):
    """The real chunk store, counting the reads of stored chunk files."""

    reads = 0

    def read(self, digest: bytes, size: int, offset: int = 0, length: int | None = None) -> bytes | None:
        self.reads += 1
        return super().read(digest, size, offset, length)


class Reader(HeldLayer):
    """One LayerTable over one layer whose blob streams from memory (HeldStream)."""

    def __init__(self, tmp: Path, blob: blobgen.Blob, store_root: Path | None = None) -> None:
        super().__init__(tmp, blob, POLICY, CountingStore(store_root or tmp / "chunks"), workers=2)

    def requests(self) -> list[tuple[int, int]]:
        """Range requests since the layer was opened (whole reads and streams), by offset."""
        reads, streams = self.opened_at
        return sorted(self.blob.reads[reads:] + self.blob.streams[streams:])

    def read(self, offset: int, size: int = PIECE) -> bytes:
        return self.table.read(self.num, "big", offset, size)

    def chunks(self) -> list[Any]:
        return self.live.layer.chunks_for("big", 0, len(BIG))



@pytest.fixture(params=["estargz", "zstd:chunked"])
def layer(request: pytest.FixtureRequest) -> blobgen.Blob:
    return blobgen.BUILDERS[request.param]([dir_("d"), reg("big", BIG), reg("d/after", b"x" * 5000)],
                                          chunk_size=CHUNK)


@pytest.fixture
def reader(tmp_path: Path, layer: blobgen.Blob) -> Iterator[Reader]:
    made = Reader(tmp_path, layer)
    yield made
    made.close()


def _read_all(reader: Reader) -> None:
    for offset in range(0, len(BIG), PIECE):
        assert reader.read(offset) == BIG[offset:offset + PIECE]
    assert reader.table.fetcher.settle(DEADLINE)


def test_read_ahead_fetches_a_big_file_in_batches(reader: Reader) -> None:
    _read_all(reader)
    chunks = reader.chunks()
    requests = reader.requests()
    # Every chunk exactly once: requests neither overlap nor miss a chunk.
    for (s1, l1), (s2, _l2) in zip(requests, requests[1:]):
        assert s1 + l1 <= s2
    assert sum(length for _, length in requests) == chunks[-1].cend - chunks[0].cstart
    # The two chunks read before the run counts as sequential are fetched on demand; the
    # other 38 go four to a request (the last batch may be smaller), not one by one.
    ahead = [r for r in requests if r[0] >= chunks[2].cstart]
    assert len(ahead) <= 38 // 4 + 3
    assert all(length >= 3 * CHUNK for _, length in ahead[:-1])
    assert reader.live.stats.verification_failures == 0


def test_a_chunk_is_served_while_the_rest_of_its_request_streams(reader: Reader) -> None:
    chunks = reader.chunks()
    # Reading the first two chunks starts the read-ahead of the next eight (two requests);
    # hold its stream right after chunk 2.
    reader.blob.hold_at = chunks[2].cend
    for offset in range(0, 2 * CHUNK, PIECE):
        assert reader.read(offset) == BIG[offset:offset + PIECE]
    assert reader.blob.holding.wait(DEADLINE), "the read-ahead never streamed"
    # Chunk 2 is in: served now, while the request that holds it is still open.
    assert reader.pool.submit(reader.read, 2 * CHUNK).result(DEADLINE) == BIG[2 * CHUNK:2 * CHUNK + PIECE]
    assert not reader.store.has(chunks[3].digest, chunks[3].size)
    reader.blob.release()
    for offset in range(2 * CHUNK, len(BIG), PIECE):
        assert reader.read(offset) == BIG[offset:offset + PIECE]


def test_just_landed_chunks_are_read_from_memory(tmp_path: Path, layer: blobgen.Blob, reader: Reader) -> None:
    _read_all(reader)
    # Every read after the first chunk: its chunk was landed by this fetcher just before.
    # (The first chunk, fetched by the reader itself, comes back with its bytes.)
    assert reader.store.reads == 0
    # Another worker over the same store has nothing in memory: it reads the store files.
    other = Reader(tmp_path / "other", layer, store_root=reader.store.root)
    try:
        for offset in range(0, 4 * CHUNK, PIECE):
            assert other.read(offset) == BIG[offset:offset + PIECE]
        assert other.store.reads == 4 * CHUNK // PIECE
        assert other.requests() == []
    finally:
        other.close()


def test_a_corrupt_chunk_in_a_streamed_request_fails_its_reader(tmp_path: Path, layer: blobgen.Blob) -> None:
    probe = Reader(tmp_path / "probe", layer)
    victim = probe.chunks()[5]
    probe.close()
    reader = Reader(tmp_path / "r", layer.flip((victim.cstart + victim.cend) // 2))
    try:
        for offset in range(0, victim.offset, PIECE):
            assert reader.read(offset) == BIG[offset:offset + PIECE]
        with pytest.raises(VerificationError, match="big"):
            reader.read(victim.offset)
        after = victim.offset + victim.size
        assert reader.read(after) == BIG[after:after + PIECE]
        assert not reader.store.has(victim.digest, victim.size)
    finally:
        reader.close()


# ------------------------------------------------------------------ the stream's bytes


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_gathered_gives_each_range_exactly(data: st.DataObject) -> None:
    blob = bytes(range(256)) * 8
    start = data.draw(st.integers(0, 100))
    cuts = sorted(data.draw(st.lists(st.integers(start, len(blob)), max_size=12)))
    pieces = [blob[a:b] for a, b in zip([start] + cuts, cuts + [len(blob)])]
    # Ranges in blob order, maybe with holes between them: what chunks of a span are.
    bounds = sorted(data.draw(st.lists(st.integers(start, len(blob)), min_size=2, max_size=16)))
    ranges = [(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if b > a]
    gathered, pending, added = _Gathered(start), list(ranges), 0
    for piece in pieces:
        gathered.add(piece)
        added += len(piece)
        assert gathered.end == start + added
        while pending and pending[0][1] <= gathered.end:
            a, b = pending.pop(0)
            assert gathered.take(a, b) == blob[a:b]
        upto = pending[0][0] if pending else gathered.end
        gathered.drop_before(upto)
        assert gathered.start == min(upto, gathered.end)  # nothing kept that no range needs
    assert not pending
