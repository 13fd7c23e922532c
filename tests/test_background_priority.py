"""The background fetch gives way to what containers read (prefetch.BackgroundFetcher,
chunkfetch.FetchGate): it starts only after a quiet period without on-demand fetches (a
mount counts as one), a background range in flight yields to an on-demand fetch (its
stream closed, what landed kept, the rest released to readers and fetched again later),
and the layer still becomes wholly local.

In-process: real eStargz layers (tests/blobgen.py) read through the worker's LayerTable,
with the background fetch on. The blob under them streams from memory and can hold its
stream at a byte until the test says so, and the gate's clock is a test clock: a registry
cannot stop mid-body on demand, and these tests must not depend on timing.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from crfs_worker.chunkfetch import AheadPolicy, FetchGate
from crfs_worker.chunkstore import ChunkStore
from crfs_worker.errors import CrfsError
from crfs_worker.layerkeys import KeyStore, LayerRecord
from crfs_worker.lowerlayer import LayerTable, LiveLayer
from crfs_worker.prefetch import FetchOptions, prefetch_prioritized
from tests import blobgen
from tests.blobgen import MemBlob, dir_, reg

DEADLINE = 60.0  # hang guard for waits on other threads; never a measured duration
CHUNK = 64 << 10

_rng = random.Random(11)
BIG = _rng.randbytes(8 * CHUNK)   # eight chunks (incompressible: ~512 KB of blob)
SMALL = _rng.randbytes(CHUNK)     # one chunk, after BIG in the blob
PRIORITISED = _rng.randbytes(4 * CHUNK)  # another layer's, before its landmark


class TestClock:
    """The gate's clock: moves only when the test says; counts its readings."""

    __test__ = False  # not a test class (pytest)

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now


class StreamingBlob(MemBlob):
    """A MemBlob that streams 16 KiB at a time, noting when (test clock) each stream
    opened and how many bytes it delivered; a stream stops before blob offset `hold_at`
    until `release()`."""

    def __init__(self, data: bytes, name: str, clock: TestClock) -> None:
        super().__init__(data, name)
        self.clock = clock
        self.hold_at: int | None = None
        self.piece_ends: set[int] = set()  # blob offsets where a piece ends, besides every 16 KiB
        self.streams: list[dict[str, Any]] = []
        self.holding = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        record = {"offset": offset, "length": length, "opened_at": self.clock.now, "delivered": 0}
        self.streams.append(record)
        at, end = offset, offset + length
        while at < end:
            upto = min(at + (16 << 10), end)
            if self.hold_at is not None and at < self.hold_at <= upto:
                upto = self.hold_at
            upto = min([upto] + [end for end in self.piece_ends if at < end < upto])
            record["delivered"] += upto - at
            yield self.data[at:upto]
            at = upto
            if at == self.hold_at:
                self.hold_at = None
                self.holding.set()
                assert self._released.wait(DEADLINE), "the test never released the stream"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Polls `condition` (a hang guard, not a measurement)."""
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.01)


class Worker:
    """A LayerTable with the background fetch on, over one layer whose blob is a
    StreamingBlob, and a test clock in its fetch gate."""

    def __init__(self, tmp: Path, blob: blobgen.Blob, quiet: float, range_gap: int) -> None:
        keys = KeyStore(tmp / "rt")
        record = LayerRecord("file", "layer", toc_digest=blob.toc_digest, annotations=dict(blob.annotations))
        self.num = keys.number_for(record)
        self.clock = TestClock()
        self.blob = StreamingBlob(blob.data, "streaming-blob", self.clock)
        self.store = ChunkStore(tmp / "chunks")
        # On-demand reads fetch just what they ask for (no neighbours, no read-ahead).
        options = FetchOptions(background=True, quiet=quiet, retry_delays=(), range_gap=range_gap,
                               ahead=AheadPolicy(coalesce=0, read_ahead=0))
        self.keys = keys
        self.blobs = {"layer": self.blob}
        self.table = LayerTable(keys, tmp / "index", self.store, options,
                                blob_opener=lambda record: self.blobs[record.location])
        self.gate: FetchGate = self.table.fetcher.gate
        self.gate.clock = self.clock
        self.live: LiveLayer = self.table.get(self.num)
        self.opened_at = len(self.blob.reads)

    def chunks(self, path: str, size: int) -> list[Any]:
        return self.live.layer.chunks_for(path, 0, size)

    def other_layer(self, blob: blobgen.Blob, name: str) -> tuple[LiveLayer, StreamingBlob]:
        """A second layer of the same worker."""
        record = LayerRecord("file", name, toc_digest=blob.toc_digest, annotations=dict(blob.annotations))
        self.blobs[name] = StreamingBlob(blob.data, name, self.clock)
        return self.table.get(self.keys.number_for(record)), self.blobs[name]

    def on_demand_reads(self) -> list[tuple[int, int]]:
        return self.blob.reads[self.opened_at:]

    def read(self, path: str, size: int) -> bytes:
        return self.table.read(self.num, path, 0, size)

    def all_stored(self) -> bool:
        return all(self.store.has(c.digest, c.size)
                   for path, size in (("a/big", len(BIG)), ("a/small", len(SMALL)))
                   for c in self.chunks(path, size))

    def wait_complete(self) -> None:
        def complete() -> bool:
            assert self.live.background.state != "failed", self.live.background.error
            return self.live.background.state == "complete"
        wait_for(complete, "the background fetch to complete")

    def close(self) -> None:
        self.blob.release()
        self.table.close()


@pytest.fixture
def layer() -> blobgen.Blob:
    return blobgen.estargz([dir_("a"), reg("a/big", BIG), reg("a/small", SMALL)], chunk_size=CHUNK)


@pytest.fixture
def make_worker(tmp_path: Path, layer: blobgen.Blob) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(quiet: float, range_gap: int = FetchOptions.range_gap) -> Worker:
        made.append(Worker(tmp_path, layer, quiet, range_gap))
        return made[-1]

    yield make
    for worker in made:
        worker.close()


@pytest.fixture
def optimised() -> blobgen.Blob:
    specs = [dir_("p"), reg("p/first", PRIORITISED), reg("p/later", SMALL[:1000])]
    return blobgen.estargz(specs, chunk_size=CHUNK, prefetch=["p/first"])


def _looked_again(worker: Worker) -> None:
    """Wakes the background fetch waiting for quiet and waits until it has read the clock."""
    before = worker.clock.readings
    worker.gate.recheck()
    wait_for(lambda: worker.clock.readings > before, "the background fetch to look at the clock")


def test_background_starts_only_after_a_quiet_period(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(5.0)
    worker.table.mount(worker.num)  # at 100: the mount is activity
    wait_for(lambda: worker.gate.waiting == 1, "the background fetch to wait for quiet")
    assert worker.live.background.as_dict()["state"] == "waiting"  # what `crfs stats` shows
    worker.clock.now = 104.0
    _looked_again(worker)
    assert worker.blob.streams == [] and worker.live.background.done_bytes == 0
    # A read at 104 (an on-demand fetch) starts the quiet period again: not before 109.
    assert worker.read("a/small", len(SMALL)) == SMALL
    worker.clock.now = 108.0
    _looked_again(worker)
    assert worker.blob.streams == []
    worker.clock.now = 109.0
    worker.gate.recheck()
    worker.wait_complete()
    assert worker.live.background.as_dict()["state"] == "complete"
    assert worker.blob.streams and all(s["opened_at"] >= 109.0 for s in worker.blob.streams)
    assert worker.all_stored()
    assert worker.read("a/big", len(BIG)) == BIG


def test_a_background_range_yields_to_an_on_demand_fetch(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(0.0)
    big = worker.chunks("a/big", len(BIG))
    small = worker.chunks("a/small", len(SMALL))
    worker.blob.hold_at = big[1].cend  # the background stream stops after a/big's second chunk
    worker.table.mount(worker.num)
    assert worker.blob.holding.wait(DEADLINE), "the background fetch never streamed"
    [opened] = worker.blob.streams
    assert (opened["offset"], opened["offset"] + opened["length"]) == (big[0].cstart, small[-1].cend)
    # a/small is in the background's range, claimed: its reader must not wait behind the
    # rest of the range, nor get an error: the stream yields and the reader fetches it.
    with ThreadPoolExecutor(max_workers=1) as pool:
        reading = pool.submit(worker.read, "a/small", len(SMALL))
        wait_for(lambda: worker.gate.active == 1, "the reader to wait on the background's claim")
        worker.blob.release()
        assert reading.result(DEADLINE) == SMALL
    worker.wait_complete()
    # The first stream was closed a piece after the reader came, short of its end.
    assert opened["delivered"] < opened["length"]
    # The reader fetched a/small itself, in one request.
    assert [(o, o + n) for o, n in worker.on_demand_reads()] == [(small[0].cstart, small[-1].cend)]
    # What landed was kept: the background resumed at the first chunk it had not landed,
    # after the yield, and did not fetch a/small again.
    resumed = worker.blob.streams[1:]
    assert resumed and resumed[0]["offset"] == big[2].cstart
    assert all(s["offset"] + s["length"] <= big[-1].cend for s in resumed)
    assert worker.all_stored()
    assert worker.read("a/big", len(BIG)) == BIG
    progress = worker.live.background.as_dict()
    assert progress["done"] == progress["total"] > 0


def test_holes_in_a_background_range_are_skipped_not_misread(make_worker: Callable[..., Worker]) -> None:
    """A background range runs over chunks stored meanwhile (holes in what it needs, longer
    than a piece of the stream) and tar headers between files (a piece may end inside)."""
    worker = make_worker(0.0, range_gap=1 << 20)  # one range over what is stored
    big = worker.chunks("a/big", len(BIG))
    small = worker.chunks("a/small", len(SMALL))
    # Read on demand first: a/big's chunks 2 and 3 (128 KiB of hole for the background).
    assert worker.table.read(worker.num, "a/big", big[2].offset, 2 * CHUNK) == BIG[2 * CHUNK:4 * CHUNK]
    # Pieces of the stream end one byte into the header between a/big and a/small.
    worker.blob.piece_ends = {big[-1].cend + 1}
    worker.table.mount(worker.num)
    worker.wait_complete()
    [stream] = worker.blob.streams
    assert (stream["offset"], stream["offset"] + stream["length"]) == (big[0].cstart, small[-1].cend)
    assert worker.live.stats.verification_failures == 0
    assert worker.all_stored()
    assert worker.read("a/big", len(BIG)) == BIG and worker.read("a/small", len(SMALL)) == SMALL


def test_a_mount_time_prefetch_holds_back_the_background_fetch(
        make_worker: Callable[..., Worker], optimised: blobgen.Blob) -> None:
    worker = make_worker(0.0)
    other, other_blob = worker.other_layer(optimised, "optimised")
    first = other.layer.chunks_for("p/first", 0, len(PRIORITISED))
    other_blob.hold_at = first[0].cend
    prefetch_prioritized(other, worker.table.fetcher)  # streams the landmark range, held
    assert other_blob.holding.wait(DEADLINE), "the prefetch never streamed"
    worker.table.mount(worker.num)
    # The container reads the prioritised files now: the background fetch waits.
    wait_for(lambda: worker.gate.waiting == 1, "the background fetch to wait for quiet")
    assert worker.gate.active == 1 and worker.blob.streams == []
    other_blob.release()
    worker.wait_complete()
    assert other.prefetch.state == "done" and worker.all_stored()


def test_gate_tokens_and_quiet_period() -> None:
    clock = TestClock(10.0)
    gate = FetchGate(clock=clock)
    stop = threading.Event()
    token = gate.wait_quiet(stop, quiet=0.0)  # nothing ran yet: at once
    assert not gate.interrupted(token)
    with gate.on_demand():
        assert gate.interrupted(token)
    assert not gate.interrupted(gate.wait_quiet(stop, quiet=0.0))
    token = gate.wait_quiet(stop, quiet=0.0)
    gate.note_activity()
    assert gate.interrupted(token)


def test_quiet_period_knob() -> None:
    assert FetchOptions.from_environment({}).quiet == FetchOptions().quiet > 0
    assert FetchOptions.from_environment({"CRFS_BACKGROUND_QUIET": "0.25"}).quiet == 0.25
    with pytest.raises(CrfsError, match="CRFS_BACKGROUND_QUIET"):
        FetchOptions.from_environment({"CRFS_BACKGROUND_QUIET": "-1"})
