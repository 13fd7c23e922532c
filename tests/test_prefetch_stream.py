"""The mount-time prefetch beside the mount, landing chunks as its one range streams in
(prefetch.prefetch_prioritized, ChunkFetcher.stream_span, blob.stream_range).

In-process: real eStargz layers (tests/blobgen.py) read through the worker's LayerTable.
The blob under them streams from memory and can hold its stream at a byte, or break it
there, until the test says so: a registry cannot stop mid-body on demand, and these tests
must know that a chunk was served while the rest of the range had NOT arrived (no timing).
The registry stream itself (resumed after a break) is tested against a real docker-registry
behind a FaultRelay.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from crfs_worker.blob import stream_range
from crfs_worker.errors import RegistryError, VerificationError
from crfs_worker.lowerlayer import LiveLayer
from crfs_worker.prefetch import prefetch_prioritized
from crfs_worker.registry import RetryPolicy
from tests import blobgen
from tests.blobgen import dir_, reg
from tests.support.held_layer import HeldLayer
from tests.support.registry import FaultRelay, RunningRegistry

DEADLINE = 60.0  # hang guard for waits on other threads; never a measured duration
CHUNK = 64 << 10

_rng = random.Random(7)
FIRST = _rng.randbytes(200_000)   # prioritised, four chunks (incompressible: ~200 KB of blob)
SECOND = _rng.randbytes(100_000)  # prioritised, two chunks
LATER = _rng.randbytes(50_000)    # after the landmark


class Worker(HeldLayer):
    """A LayerTable over one layer whose blob is a HeldStream."""

    def requests(self) -> list[tuple[int, int]]:
        """Range requests since the layer was opened: whole reads and streams."""
        return self.blob.reads[self.opened_at[0]:] + self.blob.streams

    def read_later(self, path: str, offset: int = 0, size: int = 1000) -> "Future[bytes]":
        return self.pool.submit(self.table.read, self.num, path, offset, size)

    def chunks(self, path: str, size: int) -> list[Any]:
        return self.live.layer.chunks_for(path, 0, size)

@pytest.fixture
def layer() -> blobgen.Blob:
    specs = [dir_("a"), reg("a/first", FIRST), reg("a/second", SECOND), reg("a/later", LATER)]
    return blobgen.estargz(specs, chunk_size=CHUNK, prefetch=["a/first", "a/second"])


@pytest.fixture
def worker(tmp_path: Path, layer: blobgen.Blob) -> Iterator[Worker]:
    made = Worker(tmp_path, layer)
    yield made
    made.close()


def _wait_claimed(worker: Worker) -> None:
    """The prefetch claims its chunks before it opens its stream."""
    assert worker.blob.holding.wait(DEADLINE), "the prefetch never reached the held byte"


def test_chunks_are_served_as_the_range_streams_in(worker: Worker) -> None:
    first = worker.chunks("a/first", len(FIRST))
    worker.blob.hold_at = first[1].cend  # the stream stops after a/first's second chunk
    prefetch_prioritized(worker.live, worker.table.fetcher)
    assert worker.live.prefetch.state == "running"  # the mount goes on meanwhile
    _wait_claimed(worker)
    # a/first's first chunk has streamed in: served now, while the range is held.
    assert worker.read_later("a/first", 0, CHUNK).result(DEADLINE) == FIRST[:CHUNK]
    # a/second is the prefetch's (claimed): its reader waits for the stream, no request.
    waiting = worker.read_later("a/second", 0, len(SECOND))
    # a/later is nobody's: fetched on demand at once, beside the held stream.
    assert worker.read_later("a/later", 0, len(LATER)).result(DEADLINE) == LATER
    assert not waiting.done() and worker.live.prefetch.state == "running"
    worker.blob.release()
    assert waiting.result(DEADLINE) == SECOND
    assert worker.live.prefetch.wait(timeout=DEADLINE)
    start, end = worker.live.layer.prefetch_range()
    later = worker.chunks("a/later", len(LATER))
    assert worker.blob.streams == [(start, end - start)]  # ONE range for the prioritised files
    assert worker.blob.reads[worker.opened_at[0]:] == [(later[0].cstart, later[-1].cend - later[0].cstart)]
    status = worker.live.prefetch.as_dict()
    assert status == {"state": "done", "bytes": len(FIRST) + len(SECOND), "error": ""}
    # Everything prioritised is local: no request more.
    before = len(worker.requests())
    assert worker.table.read(worker.num, "a/first", 0, len(FIRST)) == FIRST
    assert len(worker.requests()) == before


def test_a_broken_stream_releases_its_chunks_to_their_readers(worker: Worker) -> None:
    first = worker.chunks("a/first", len(FIRST))
    second = worker.chunks("a/second", len(SECOND))
    worker.blob.hold_at = first[0].cend  # a/first's first chunk arrives, then the link dies
    prefetch_prioritized(worker.live, worker.table.fetcher)
    _wait_claimed(worker)
    waiting = [worker.read_later("a/first", CHUNK, CHUNK), worker.read_later("a/second", 0, len(SECOND))]
    worker.blob.release(fail=True)
    # Waiting on the prefetch is not fetching: each reader now fetches its chunks itself.
    assert waiting[0].result(DEADLINE) == FIRST[CHUNK:2 * CHUNK]
    assert waiting[1].result(DEADLINE) == SECOND
    assert worker.live.prefetch.wait(timeout=DEADLINE)
    status = worker.live.prefetch.as_dict()
    assert status["state"] == "failed" and "broke off" in status["error"]
    assert status["bytes"] == CHUNK  # what landed before the break stays stored
    # Each chunk the stream did not land was fetched once (neighbours may ride along), and
    # the landed one not again. (On-demand fetches that take neighbours stream too: every
    # request after the prefetch's own stream counts.)
    fetched = worker.blob.reads[worker.opened_at[0]:] + worker.blob.streams[1:]
    covering = [sum(1 for a, n in fetched if a <= c.cstart and c.cend <= a + n) for c in first + second]
    assert covering == [0] + [1] * (len(first) + len(second) - 1)
    assert worker.table.store.has(first[0].digest, first[0].size)


def test_a_corrupt_chunk_is_never_stored_and_fails_only_its_own_readers(
        tmp_path: Path, layer: blobgen.Blob) -> None:
    probe = Worker(tmp_path / "probe", layer)
    second = probe.chunks("a/second", len(SECOND))
    probe.close()
    worker = Worker(tmp_path / "w", layer.flip(second[0].cstart + 100))  # bad on every fetch
    try:
        prefetch_prioritized(worker.live, worker.table.fetcher)
        assert worker.live.prefetch.wait(timeout=DEADLINE)
        status = worker.live.prefetch.as_dict()
        assert status["state"] == "failed" and status["bytes"] == len(FIRST) + len(SECOND) - CHUNK
        assert not worker.table.store.has(second[0].digest, second[0].size)
        before = len(worker.requests())
        assert worker.table.read(worker.num, "a/first", 0, len(FIRST)) == FIRST  # stored: no request
        assert worker.table.read(worker.num, "a/second", CHUNK, 1000) == SECOND[CHUNK:CHUNK + 1000]
        assert len(worker.requests()) == before
        with pytest.raises(VerificationError):
            worker.table.read(worker.num, "a/second", 0, 1000)
        assert len(worker.requests()) == before + 1  # its own fetch, which fails again
        assert worker.live.stats.verification_failures == 2
    finally:
        worker.close()


def test_a_second_mount_streams_nothing(worker: Worker) -> None:
    prefetch_prioritized(worker.live, worker.table.fetcher)
    assert worker.live.prefetch.wait(timeout=DEADLINE)
    again = LiveLayer(worker.num, worker.live.record, worker.live.layer, worker.live.blob, worker.live.stats)
    prefetch_prioritized(again, worker.table.fetcher)  # e.g. a restarted worker over the same store
    assert again.prefetch.wait(timeout=DEADLINE)
    assert again.prefetch.as_dict() == {"state": "local", "bytes": 0, "error": ""}
    assert len(worker.blob.streams) == 1


# ------------------------------------------------------------------ the registry stream


def _through(registry: RunningRegistry, relay: FaultRelay, attempts: int) -> Any:
    from dataclasses import replace

    process = replace(registry.process)
    process.port = int(relay.netloc.rsplit(":", 1)[1])
    relayed = replace(registry, process=process)
    retry = RetryPolicy(attempts=attempts, backoff_base=0.01, backoff_max=0.05, total_max=30.0)
    return relayed, relayed.client(retry=retry)


def test_a_registry_stream_resumes_where_it_broke_off(
        registry: RunningRegistry, fault_relay: Callable[[RunningRegistry], FaultRelay]) -> None:
    data = os.urandom(1 << 20)
    digest = registry.push_blob("prefetch-stream/resume", data)
    relay = fault_relay(registry)
    relayed, client = _through(registry, relay, attempts=3)
    with client:
        blob = client.blob(relayed.ref("prefetch-stream/resume"), digest, len(data))
        assert blob.read_range(0, 1) == data[:1]  # the client's /v2/ probe, before any cut
        relay.cut_next(1, after_bytes=300_000)
        assert b"".join(stream_range(blob, 1000, 900_000)) == data[1000:901_000]
        gets = [r for r in relay.records() if r.method == "GET" and r.range_header][1:]
        assert [(r.range_header.endswith("-900999"), r.completed) for r in gets] == [(True, False), (True, True)]
        # The second try starts after what the first delivered (the cut may lose a buffer's worth).
        resumed = int(gets[1].range_header.removeprefix("bytes=").split("-")[0])
        assert gets[0].range_header == "bytes=1000-900999" and 1000 < resumed <= 301_000
        mark = len(relay.records())
        relay.cut_next(5, after_bytes=1000)
        with pytest.raises(RegistryError, match=r"broke off after \d+ bytes, 3 attempt\(s\)") as caught:
            b"".join(stream_range(blob, 0, 500_000))
        assert "prefetch-stream/resume@" in str(caught.value)
        assert len([r for r in relay.records()[mark:] if r.method == "GET"]) == 3  # the bound holds
