"""The chunk store (crfs_worker/chunkstore.py) and the chunk fetcher over it
(chunkfetch.py), with real layers of every format built by tests/blobgen.py and read
through the worker's LayerTable: verified bytes, stored once, shared, checked on use."""
from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from crfs_worker.chunkfetch import FetchGate, plan_spans, spans_for
from crfs_worker.chunkstore import ChunkStore
from crfs_worker.contentcache import ContentCache
from crfs_worker.dirs import STALE_TEMP_SECONDS
from crfs_worker.errors import VerificationError
from crfs_worker.layerkeys import KeyStore, LayerRecord
from crfs_worker.lowerlayer import LayerTable
from crfs_worker.prefetch import FetchOptions, prefetch_prioritized, prioritized_chunks
from tests import blobgen
from tests.blobgen import MemBlob, dir_, reg

DEADLINE = 60.0  # hang guard for waits on other threads; never a measured duration


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------ the store itself


def test_put_and_read_with_private_files(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = b"chunk bytes" * 1000
    store.put(sha(data), data)
    path = store.path_for(sha(data))
    assert path == tmp_path / "chunks" / "sha256" / sha(data).hex()[:2] / sha(data).hex()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (tmp_path / "chunks", tmp_path / "chunks/sha256", path.parent, tmp_path / "chunks/tmp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert list((tmp_path / "chunks/tmp").iterdir()) == []  # written under a temp name, renamed
    assert store.read(sha(data), len(data)) == data
    assert store.read(sha(data), len(data), 100, 11) == data[100:111]
    assert store.has(sha(data), len(data)) and store.check(sha(data), len(data))
    missing = sha(b"other")
    assert store.read(missing, 5) is None and not store.has(missing, 5)


def test_bytes_that_do_not_match_are_never_stored(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    claimed = sha(b"what the TOC promised")
    with pytest.raises(VerificationError, match=claimed.hex()):
        store.put(claimed, b"something else")
    assert not store.path_for(claimed).exists()
    assert list((tmp_path / "chunks/tmp").iterdir()) == []


def _alter_in_place(path: Path) -> None:
    """Same size, different bytes; mtime set far from now, so the change shows even within
    the clock tick of the write (the cheap check compares mtime/ctime to the verified ones)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))


def test_an_altered_file_is_detected_and_removed(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(70_000)
    store = ChunkStore(tmp_path / "chunks")
    store.put(sha(data), data)
    path = store.path_for(sha(data))
    _alter_in_place(path)
    assert store.has(sha(data), len(data))            # cheap: right size and mode...
    assert store.read(sha(data), len(data), 0, 10) is None  # ...but use checks it
    assert not path.exists() and store.discarded == 1
    # After a worker start the first use hashes the file whole, whatever its times say.
    store.put(sha(data), data)
    restarted = ChunkStore(tmp_path / "chunks")
    with open(path, "r+b") as f:
        f.write(b"\0")  # mtime may stay in the same tick: only the full hash can tell
    assert restarted.read(sha(data), len(data), 5000, 10) is None
    assert not path.exists()


def test_files_others_could_have_written_are_refused(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = b"x" * 4096
    store.put(sha(data), data)
    path = store.path_for(sha(data))
    os.chmod(path, 0o644)
    assert store.read(sha(data), len(data)) is None and not path.exists()
    store.put(sha(data), data)
    assert store.read(sha(data), len(data) + 1) is None  # wrong size
    target = tmp_path / "elsewhere"
    target.write_bytes(data)
    os.chmod(target, 0o600)
    store.put(sha(data), data)
    path.unlink()
    path.symlink_to(target)
    assert store.read(sha(data), len(data)) is None and not path.is_symlink()
    if os.getuid() == 0:
        store.put(sha(data), data)
        os.chown(path, 65534, 65534)
        assert store.read(sha(data), len(data)) is None


def test_stale_temps_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    """A worker killed while writing a chunk or a local copy leaves a temp file: an hour
    old, it goes when a store or content cache opens; a fresh one may be another
    process's and stays."""
    ChunkStore(tmp_path / "chunks")
    ContentCache(tmp_path / "content")
    old = [tmp_path / "chunks/tmp/chunk-old", tmp_path / "content/.tmp-old"]
    fresh = [tmp_path / "chunks/tmp/chunk-fresh", tmp_path / "content/.tmp-fresh"]
    for path in old + fresh:
        path.write_bytes(b"partial")
    past = time.time() - STALE_TEMP_SECONDS - 60
    for path in old:
        os.utime(path, (past, past))
    ChunkStore(tmp_path / "chunks")  # another worker start
    ContentCache(tmp_path / "content")
    assert [path.exists() for path in old + fresh] == [False, False, True, True]


# ------------------------------------------------------------------ planning and priority


@dataclass(frozen=True)
class FakeChunk:
    """Only offsets matter to the planner."""

    cstart: int
    cend: int
    zeros: bool = False


def test_spans_merge_small_holes_and_respect_the_limit() -> None:
    chunks = [FakeChunk(0, 100), FakeChunk(100, 200), FakeChunk(250, 300), FakeChunk(1000, 1100),
              FakeChunk(1100, 6000), FakeChunk(6000, 6100)]
    spans = plan_spans(list(reversed(chunks)), gap=60, limit=4000)
    # A hole of 50 is merged, one of 700 is not; a chunk above the limit goes alone.
    assert [(s.start, s.end) for s in spans] == [(0, 300), (1000, 1100), (1100, 6000), (6000, 6100)]
    assert spans[0].chunks == tuple(chunks[:3])
    assert [(s.start, s.end) for s in plan_spans(chunks, gap=0, limit=1 << 30)] == [
        (0, 200), (250, 300), (1000, 6100)]
    # Zeros chunks need no bytes: an empty span of their own, wherever the TOC puts them.
    zeros = FakeChunk(10_000, 20_000, zeros=True)
    mixed = spans_for([zeros, FakeChunk(0, 100)], gap=0, limit=1 << 30)
    assert [(s.start, s.end, s.chunks) for s in mixed] == [(0, 0, (zeros,)), (0, 100, (FakeChunk(0, 100),))]


def test_background_waits_while_on_demand_fetches_run() -> None:
    gate = FetchGate()
    stop = threading.Event()
    passed = threading.Event()

    def background() -> None:
        gate.wait_quiet(stop, poll=0.01)
        passed.set()

    with gate.on_demand():
        waiter = threading.Thread(target=background)
        waiter.start()
        waiter.join(0.2)
        assert not passed.is_set()  # cannot pass while an on-demand fetch runs
    waiter.join(DEADLINE)
    assert passed.is_set()


# ------------------------------------------------------------------ layers through the table


@dataclass
class Tables:
    """LayerTables (one per simulated worker life) over blobgen layers kept in memory."""

    tmp: Path
    blobs: dict[str, bytes]
    keys: KeyStore
    reads: dict[str, list[MemBlob]]

    def register(self, name: str, blob: blobgen.Blob, allow_unverified: bool = False) -> int:
        self.blobs[name] = blob.data
        record = LayerRecord("file", name, toc_digest=blob.toc_digest, annotations=dict(blob.annotations),
                             allow_unverified=allow_unverified)
        return self.keys.number_for(record)

    def table(self, options: FetchOptions | None = None,
              wrap: Callable[[MemBlob], Any] = lambda blob: blob) -> LayerTable:
        def opener(record: LayerRecord) -> Any:
            blob = MemBlob(self.blobs[record.location], record.location)
            self.reads.setdefault(record.location, []).append(blob)
            return wrap(blob)

        return LayerTable(self.keys, self.tmp / "index", ChunkStore(self.tmp / "chunks"),
                          options or FetchOptions(background=False), blob_opener=opener)


@pytest.fixture
def tables(tmp_path: Path) -> Tables:
    return Tables(tmp_path, {}, KeyStore(tmp_path / "rt"), {})


def _specs() -> list[blobgen.Spec]:
    rng = random.Random(7)
    big = rng.randbytes(300_000)
    return [dir_("d"), reg("d/small", b"small\n"), reg("d/big", big), reg("d/copy", big),
            reg("d/sparse", rng.randbytes(5000) + bytes(150_000) + rng.randbytes(5000)),
            reg("d/empty", b"")]


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked", "zstdchunked-estargz"])
def test_reads_are_stored_once_and_served_after_a_restart(tables: Tables, fmt: str) -> None:
    builder = blobgen.BUILDERS[fmt]
    blob = builder(_specs(), chunk_size=64 << 10)
    num = tables.register("layer", blob)
    table = tables.table()
    for path, data in blob.files.items():
        assert table.read(num, path, 0, len(data) + 10) == data, path
        assert table.read(num, path, 1000, 5000) == data[1000:6000], path
    stats = table.get(num).stats
    assert stats.verification_failures == 0
    # d/copy has the same chunks as d/big: stored once, fetched once.
    requests_after_big = stats.requests
    table.read(num, "d/copy", 0, 300_000)
    assert stats.requests == requests_after_big
    # Every digested chunk is in the store, verified.
    store = table.store
    for chunk in table.get(num).layer.chunks_for("d/big", 0, 300_000):
        assert store.check(chunk.digest, chunk.size)
    # A new worker life: opening the layer reads its footer, reads need nothing more.
    again = tables.table()
    opened = again.get(num).stats.requests
    for path, data in blob.files.items():
        assert again.read(num, path, 0, len(data)) == data, path
    assert again.get(num).stats.requests == opened


def test_unverified_legacy_chunks_are_kept_in_memory_not_on_disk(tables: Tables) -> None:
    blob = blobgen.stargz(_specs(), chunk_size=64 << 10, digests=False)
    num = tables.register("legacy", blob, allow_unverified=True)
    table = tables.table()
    data = blob.files["d/big"]
    assert table.read(num, "d/big", 0, 4096) == data[:4096]
    requests = table.get(num).stats.requests
    assert table.read(num, "d/big", 4096, 4096) == data[4096:8192]  # same chunk: no new request
    assert table.get(num).stats.requests == requests
    assert not any((tables.tmp / "chunks" / "sha256").rglob("*"))


def test_layers_share_chunks(tables: Tables) -> None:
    blob = blobgen.estargz(_specs(), chunk_size=64 << 10)
    first = tables.register("copy-a", blob)
    second = tables.register("copy-b", blob)  # another layer number, same content
    assert first != second
    table = tables.table()
    assert table.read(first, "d/big", 0, 300_000) == blob.files["d/big"]
    opened = table.get(second).stats.requests
    assert table.read(second, "d/big", 0, 300_000) == blob.files["d/big"]
    assert table.get(second).stats.requests == opened
    assert sum(table.get(second).stats.local_chunks.values()) == 300_000  # its bytes in cache


def test_a_chunk_that_fails_verification_is_not_stored(tables: Tables) -> None:
    good = blobgen.estargz(_specs(), chunk_size=64 << 10)
    probe = tables.table()
    num = tables.register("probe", good)
    chunk = probe.get(num).layer.chunks_for("d/big", 70_000, 1)[0]
    bad = good.flip((chunk.cstart + chunk.cend) // 2)
    bad_num = tables.register("bad", bad)
    table = tables.table()
    with pytest.raises(VerificationError, match="d/big"):
        table.read(bad_num, "d/big", 65536, 10)
    assert table.get(bad_num).stats.verification_failures == 1
    assert not table.store.path_for(chunk.digest).exists()
    assert table.read(bad_num, "d/big", 0, 10) == good.files["d/big"][:10]  # other chunks are fine


@dataclass
class HeldBlob:
    """A test double around a real blob: its first read waits until the test releases it,
    so that other readers surely arrive while that fetch is in flight (a timing a real
    registry cannot be told to produce)."""

    blob: MemBlob
    release: threading.Event
    first_read: threading.Event

    @property
    def size(self) -> int:
        return self.blob.size

    @property
    def name(self) -> str:
        return self.blob.name

    def read_range(self, offset: int, length: int) -> bytes:
        if not self.first_read.is_set():
            self.first_read.set()
            assert self.release.wait(DEADLINE)
        return self.blob.read_range(offset, length)


def test_concurrent_readers_fetch_each_chunk_once(tables: Tables) -> None:
    blob = blobgen.estargz(_specs(), chunk_size=64 << 10)
    num = tables.register("shared", blob)
    release, first_read = threading.Event(), threading.Event()
    table = tables.table(wrap=lambda b: HeldBlob(b, release, first_read))
    release.set()  # let the layer open (footer, TOC)
    live = table.get(num)
    release.clear()
    first_read.clear()
    mem: MemBlob = tables.reads["shared"][0]
    opened = len(mem.reads)
    results: list[bytes] = []
    errors: list[BaseException] = []
    started = threading.Barrier(9)

    def reader(path: str) -> None:
        started.wait(DEADLINE)
        try:
            results.append(table.read(num, path, 0, 300_000))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=("d/big" if i % 2 else "d/copy",)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(DEADLINE)
    assert first_read.wait(DEADLINE)
    # Every reader is running; the first fetch is held. Wait until the others have claimed
    # or found the chunks in flight (they block on it), then let the fetch go on.
    deadline = time.monotonic() + DEADLINE
    while len(table.fetcher._flights) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(DEADLINE)
    assert not errors and results == [blob.files["d/big"]] * 8
    fetched = mem.reads[opened:]
    # d/copy's chunks have d/big's digests: each digest was fetched once, from either file.
    chunks = live.layer.chunks_for("d/big", 0, 300_000) + live.layer.chunks_for("d/copy", 0, 300_000)
    times_fetched = {c.digest: 0 for c in chunks}
    for chunk in chunks:
        times_fetched[chunk.digest] += sum(1 for a, n in fetched if a <= chunk.cstart and chunk.cend <= a + n)
    assert set(times_fetched.values()) == {1}
    assert sum(n for _, n in fetched) < sum(c.cend - c.cstart for c in chunks) * 0.6  # one copy's worth


# ------------------------------------------------------------------ prefetch, in-process


def test_prefetch_is_one_request_for_the_prioritised_range(tables: Tables) -> None:
    specs = [dir_("a"), reg("a/first", b"1" * 100_000), reg("a/second", b"2" * 5000),
             reg("a/later", b"3" * 200_000)]
    blob = blobgen.estargz(specs, chunk_size=64 << 10, prefetch=["a/first", "a/second"])
    num = tables.register("prefetch", blob)
    table = tables.table()
    live = table.get(num)
    mem: MemBlob = tables.reads["prefetch"][0]
    opened = len(mem.reads)
    start, end = live.layer.prefetch_range()
    assert {c.path for c in prioritized_chunks(live.layer, end)} == {"a/first", "a/second"}
    prefetch_prioritized(live, table.fetcher)  # runs in the background
    assert live.prefetch.wait(timeout=DEADLINE)
    assert mem.reads[opened:] == [(start, end - start)]
    assert live.prefetch.state == "done" and live.prefetch.stored_bytes == 105_000
    prefetch_prioritized(live, table.fetcher)  # once per worker
    assert table.read(num, "a/first", 0, 100_000) == b"1" * 100_000
    assert table.read(num, "a/second", 0, 5000) == b"2" * 5000
    assert len(mem.reads) == opened + 1  # prioritised files come from the store
    assert table.read(num, "a/later", 0, 10) == b"3" * 10
    assert len(mem.reads) == opened + 2



def test_content_cache_names_a_file_from_pieces_only_if_they_match(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "content")
    data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(VerificationError):
        cache.put_pieces(digest, len(data), [data[:1 << 20], bytes(1 << 20), data[2 << 20:]])
    assert list((tmp_path / "content").iterdir()) == []  # neither the file nor a temp
    assert cache.put_pieces(digest, len(data), (data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)))
    assert cache.path_for(digest).read_bytes() == data
    assert not cache.put_pieces(digest, len(data), [data])  # cached already
