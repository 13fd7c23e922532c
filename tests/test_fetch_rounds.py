"""FetchRounds: the dependent round trips the benchmarks' ideal counts (bench/b1_cold_start.py).

Overlap is arranged with events around a real local blob: a real registry cannot hold a
response open on demand."""
from __future__ import annotations

import threading
from pathlib import Path

from crfs_worker.blob import LocalBlob
from crfs_worker.lowerlayer import CountingBlob, FetchRounds, LayerStats


class HeldBlob(LocalBlob):
    """A local blob whose reads wait until released, so that two can be in flight at once."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def read_range(self, offset: int, length: int) -> bytes:
        self.entered.release()
        assert self.release.wait(10)
        return super().read_range(offset, length)


def _blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 16)
    return path


def test_serial_requests_are_one_round_each(tmp_path: Path) -> None:
    stats = LayerStats()
    blob = CountingBlob(LocalBlob(_blob(tmp_path)), stats, FetchRounds())
    for offset in (0, 100, 200):
        assert blob.read_range(offset, 10) == bytes(range(offset, offset + 10))
    assert (stats.requests, stats.rounds, stats.fetched_bytes) == (3, 3, 30)


def test_overlapping_requests_share_a_round_across_layers(tmp_path: Path) -> None:
    rounds = FetchRounds()
    held = HeldBlob(_blob(tmp_path))
    first, second = LayerStats(), LayerStats()
    blobs = [CountingBlob(held, first, rounds), CountingBlob(held, second, rounds)]
    threads = [threading.Thread(target=b.read_range, args=(0, 8)) for b in blobs]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert held.entered.acquire(timeout=10)  # both requests are in flight
    held.release.set()
    for thread in threads:
        thread.join(10)
    assert first.requests + second.requests == 2
    assert first.rounds + second.rounds == 1
    CountingBlob(held, second, rounds).read_range(0, 8)  # none in flight now: a new round
    assert first.rounds + second.rounds == 2
