"""Fetching beyond the request (crfs_worker/chunkfetch.py, Layer.chunks_after): a cold
small file brings the files after it in its directory in the same Range request, and a
file read sequentially has its next chunks fetched ahead by parallel requests. Real
layers (tests/blobgen.py) read through the worker's LayerTable; Range requests are
counted by the in-memory blob."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from crfs_worker.chunkfetch import AheadPolicy
from crfs_worker.chunkstore import ChunkStore
from crfs_worker.errors import CrfsError, VerificationError
from crfs_worker.layerkeys import KeyStore, LayerRecord
from crfs_worker.lowerlayer import LayerTable
from crfs_worker.prefetch import FetchOptions
from tests import blobgen
from tests.blobgen import MemBlob, dir_, reg

DEADLINE = 60.0  # hang guard for the fetch threads; never a measured duration
SMALL = 2000     # bytes of each small file: incompressible, so ~2 KB of blob each


def _small_files(rng: random.Random, directory: str, count: int) -> list[blobgen.Spec]:
    return [reg(f"{directory}/f{i:02}", rng.randbytes(SMALL)) for i in range(count)]


def _specs() -> list[blobgen.Spec]:
    rng = random.Random(11)
    return ([dir_("a")] + _small_files(rng, "a", 20) + [dir_("b")] + _small_files(rng, "b", 5)
            + [dir_("c"), reg("c/big", rng.randbytes(1 << 20))])


class Worker:
    """One LayerTable over one layer in memory, with the blobs it opened (for counting)."""

    def __init__(self, tmp: Path, blob: blobgen.Blob, ahead: AheadPolicy) -> None:
        self.blob = blob
        self.opened: list[MemBlob] = []
        keys = KeyStore(tmp / "rt")
        record = LayerRecord("file", "layer", toc_digest=blob.toc_digest, annotations=dict(blob.annotations))
        self.num = keys.number_for(record)

        def opener(record: LayerRecord) -> MemBlob:
            mem = MemBlob(blob.data, record.location)
            self.opened.append(mem)
            return mem

        self.table = LayerTable(keys, tmp / "index", ChunkStore(tmp / "chunks"),
                                FetchOptions(background=False, ahead=ahead), blob_opener=opener)
        self.live = self.table.get(self.num)
        self.opened_at = len(self.requests)

    @property
    def requests(self) -> list[tuple[int, int]]:
        return [r for mem in self.opened for r in mem.reads]

    def new_requests(self) -> list[tuple[int, int]]:
        """Range requests since the layer was opened (footer and TOC excluded)."""
        return self.requests[self.opened_at:]

    def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        size = len(self.blob.files[path]) if size is None else size
        data = self.table.read(self.num, path, offset, size)
        assert self.table.fetcher.settle(DEADLINE)
        return data

    def chunk(self, path: str, offset: int = 0):  # type: ignore[no-untyped-def]
        return self.live.layer.chunks_for(path, offset, 1)[0]

    def stored(self, path: str) -> bool:
        chunks = self.live.layer.chunks_for(path, 0, len(self.blob.files[path]))
        return all(self.table.store.has(c.digest, c.size) for c in chunks)


NO_READ_AHEAD = AheadPolicy(read_ahead=0)


@pytest.fixture(params=["estargz", "zstd:chunked"])
def blob(request: pytest.FixtureRequest) -> blobgen.Blob:
    return blobgen.BUILDERS[request.param](_specs(), chunk_size=64 << 10)


# ------------------------------------------------------------------ neighbours


def test_a_cold_small_file_brings_the_rest_of_its_directory_in_one_request(
        tmp_path: Path, blob: blobgen.Blob) -> None:
    w = Worker(tmp_path, blob, NO_READ_AHEAD)
    assert w.read("a/f00") == blob.files["a/f00"]
    assert len(w.new_requests()) == 1  # one small file still costs one Range request
    for i in range(1, 20):
        assert w.read(f"a/f{i:02}") == blob.files[f"a/f{i:02}"]
    assert len(w.new_requests()) == 1  # the whole directory came with it
    # Another directory's files are not neighbours: b/ needs a request of its own. It
    # takes b/'s files before the asked one too (a program opens them in its own order).
    assert not w.stored("b/f00")
    assert w.read("b/f03") == blob.files["b/f03"]
    assert len(w.new_requests()) == 2
    assert all(w.stored(f"b/f{i:02}") for i in range(5))
    assert w.live.stats.verification_failures == 0


def test_files_before_the_asked_one_come_within_a_quarter_window_and_only_from_its_directory(
        tmp_path: Path, blob: blobgen.Blob) -> None:
    window = 8 * SMALL
    w = Worker(tmp_path, blob, replace(NO_READ_AHEAD, coalesce=window))
    assert w.read("a/f10") == blob.files["a/f10"]
    assert len(w.new_requests()) == 1
    reach = w.chunk("a/f10").cstart - window // 4
    came = [i for i in range(10) if w.stored(f"a/f{i:02}")]
    assert came == [i for i in range(10) if w.chunk(f"a/f{i:02}").cstart >= reach]
    assert 9 in came and 0 not in came
    w2 = Worker(tmp_path / "2", blob, NO_READ_AHEAD)
    w2.read("b/f00")  # a/f19 lies right before it in the blob, in another directory
    assert not w2.stored("a/f19")


def test_the_coalesce_window_bounds_the_request(tmp_path: Path, blob: blobgen.Blob) -> None:
    window = 5 * SMALL
    w = Worker(tmp_path, blob, replace(NO_READ_AHEAD, coalesce=window))
    w.read("a/f00")
    (start, length), = w.new_requests()
    assert length <= window
    assert w.stored("a/f01") and w.stored("a/f03")
    assert not w.stored("a/f06")
    assert w.read("a/f06") == blob.files["a/f06"]
    assert len(w.new_requests()) == 2


def test_without_coalescing_a_small_file_fetches_only_its_own_chunk(tmp_path: Path, blob: blobgen.Blob) -> None:
    w = Worker(tmp_path, blob, replace(NO_READ_AHEAD, coalesce=0))
    w.read("a/f00")
    chunk = w.chunk("a/f00")
    assert w.new_requests() == [(chunk.cstart, chunk.cend - chunk.cstart)]
    assert not w.stored("a/f01")


def test_a_local_neighbour_ends_the_request(tmp_path: Path, blob: blobgen.Blob) -> None:
    w = Worker(tmp_path, blob, replace(NO_READ_AHEAD, coalesce=4 * SMALL))
    w.read("a/f02")  # stores f02..f03 (the window)
    w.read("a/f00")
    (_, _), (start, length) = w.new_requests()
    assert start + length <= w.chunk("a/f02").cstart  # f02 is not fetched twice
    assert w.stored("a/f01")


def test_a_corrupt_neighbour_fails_only_itself(tmp_path: Path, blob: blobgen.Blob) -> None:
    probe = Worker(tmp_path / "probe", blob, NO_READ_AHEAD)
    chunk = probe.chunk("a/f05")
    bad = blob.flip((chunk.cstart + chunk.cend) // 2)
    w = Worker(tmp_path / "w", bad, NO_READ_AHEAD)
    assert w.read("a/f00") == blob.files["a/f00"]  # asked for: fine, whatever its neighbours
    assert w.live.stats.verification_failures == 1  # f05, fetched along and refused
    assert not w.stored("a/f05")
    assert w.stored("a/f04") and w.stored("a/f06")  # the others of the request are kept
    requests = len(w.new_requests())
    with pytest.raises(VerificationError, match="a/f05"):
        w.read("a/f05")  # its own reader fetches it again and sees the corruption
    assert len(w.new_requests()) == requests + 1
    for i in (4, 6, 19):
        assert w.read(f"a/f{i:02}") == blob.files[f"a/f{i:02}"]


def test_neighbours_are_fetched_once_when_readers_race(tmp_path: Path, blob: blobgen.Blob) -> None:
    import threading

    w = Worker(tmp_path, blob, NO_READ_AHEAD)
    errors: list[BaseException] = []

    def reader(name: str) -> None:
        try:
            assert w.table.read(w.num, name, 0, SMALL) == blob.files[name]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(f"a/f{i:02}",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    assert w.table.fetcher.settle(DEADLINE)
    fetched = sorted(w.new_requests())
    for (s1, l1), (s2, _l2) in zip(fetched, fetched[1:]):
        assert s1 + l1 <= s2  # no byte of the blob requested twice: single flight per chunk


# ------------------------------------------------------------------ read-ahead


AHEAD = AheadPolicy(coalesce=0, read_ahead=256 << 10, parallel=3, request_limit=128 << 10,
                    sequential_run=128 << 10, sequential_slack=16 << 10)


def test_a_sequential_reader_has_the_next_chunks_fetched_ahead(tmp_path: Path, blob: blobgen.Blob) -> None:
    w = Worker(tmp_path, blob, AHEAD)
    data = blob.files["c/big"]
    piece = 16 << 10
    for offset in range(0, 128 << 10, piece):  # a run of 128 KiB: two 64 KiB chunks
        assert w.read("c/big", offset, piece) == data[offset:offset + piece]
    layer = w.live.layer
    ahead = [c for c in layer.chunks_for("c/big", 128 << 10, 1 << 20)]
    last = w.chunk("c/big", (128 << 10) - 1)
    within = [c for c in ahead if c.cend <= last.cend + AHEAD.read_ahead]
    assert len(within) >= 3
    assert all(w.table.store.has(c.digest, c.size) for c in within)  # fetched without a read
    beyond = [c for c in ahead if c not in within]
    assert beyond and not any(w.table.store.has(c.digest, c.size) for c in beyond)
    # A request stops at request_limit, or less than one chunk beyond it.
    longest = max(c.cend - c.cstart for c in layer.chunks_for("c/big", 0, len(data)))
    assert all(length < AHEAD.request_limit + longest for _, length in w.new_requests())
    # Reading on: the rest arrives, every byte verified, no chunk requested twice.
    for offset in range(128 << 10, len(data), piece):
        assert w.read("c/big", offset, piece) == data[offset:offset + piece]
    fetched = sorted(w.new_requests())
    for (s1, l1), (s2, _l2) in zip(fetched, fetched[1:]):
        assert s1 + l1 <= s2
    assert w.live.stats.verification_failures == 0


def test_scattered_reads_fetch_nothing_ahead(tmp_path: Path, blob: blobgen.Blob) -> None:
    w = Worker(tmp_path, blob, AHEAD)
    data = blob.files["c/big"]
    for offset in (900 << 10, 10 << 10, 500 << 10, 700 << 10):  # an mmap'd library, say
        assert w.read("c/big", offset, 4096) == data[offset:offset + 4096]
    assert len(w.new_requests()) == 4


def test_read_ahead_failures_reach_only_the_readers_of_those_chunks(tmp_path: Path, blob: blobgen.Blob) -> None:
    probe = Worker(tmp_path / "probe", blob, AHEAD)
    victim = probe.chunk("c/big", 300 << 10)
    bad = blob.flip((victim.cstart + victim.cend) // 2)
    w = Worker(tmp_path / "w", bad, AHEAD)
    data = blob.files["c/big"]
    piece = 16 << 10
    for offset in range(0, victim.offset, piece):
        assert w.read("c/big", offset, piece) == data[offset:offset + piece]
    with pytest.raises(VerificationError, match="c/big"):
        w.read("c/big", victim.offset, piece)
    after = victim.offset + victim.size
    assert w.read("c/big", after, piece) == data[after:after + piece]


def test_options_from_the_environment() -> None:
    env = {"CRFS_FETCH_COALESCE": "262144", "CRFS_FETCH_READ_AHEAD": "0", "CRFS_FETCH_PARALLEL": "2"}
    ahead = FetchOptions.from_environment(env).ahead
    assert (ahead.coalesce, ahead.read_ahead, ahead.parallel) == (262144, 0, 2)
    assert FetchOptions.from_environment({}).ahead == AheadPolicy()
    with pytest.raises(CrfsError, match="CRFS_FETCH_PARALLEL"):
        FetchOptions.from_environment({"CRFS_FETCH_PARALLEL": "0"})
