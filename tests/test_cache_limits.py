"""The chunk store's size limit (LRU eviction sparing chunks in use) and a full disk under
the cache: a real ChunkStore on real files, then a real worker behind crfs.so with
`--cache-size`, and one whose cache directory is a small tmpfs (ENOSPC on demand).

The image, registry, relay and workers are those of tests/test_prefetch.py.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from crfs_worker.chunkstore import ChunkStore, parse_size
from crfs_worker.errors import CrfsError
from crfs_worker.worker import _cache_size
from tests.test_prefetch import (  # noqa: F401  (fixtures)
    BIG,
    EXPECTED,
    FUSE_OVERLAYFS,
    Crfs,
    PrefetchImage,
    crfs,
    image,
    merged_files,
)

CHUNK = 1000


def _chunk(tag: int) -> tuple[bytes, bytes]:
    data = bytes([tag]) * CHUNK
    return hashlib.sha256(data).digest(), data


def _stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "sha256").rglob("*") if p.is_file())


def test_store_evicts_least_recently_used_chunks_not_in_use(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks", limit_bytes=3 * CHUNK)
    a, b, c, d, e = (_chunk(tag) for tag in range(5))
    for digest, data in (a, b, c):
        store.put(digest, data)
    assert store.read(a[0], CHUNK) == a[1]  # a is now more recent than b and c
    store.put(*d)
    assert not store.has(b[0], CHUNK) and store.has(a[0], CHUNK) and store.has(c[0], CHUNK)
    with store.pinned([c[0]]):  # c is being read: the oldest chunk not in use goes
        store.put(*e)
        assert store.has(c[0], CHUNK) and not store.has(a[0], CHUNK)
    assert store.evicted == 2 and store.total_bytes == _stored_bytes(tmp_path / "chunks") == 3 * CHUNK
    # A restarted worker with a smaller limit trims what the last one left.
    smaller = ChunkStore(tmp_path / "chunks", limit_bytes=CHUNK)
    assert _stored_bytes(tmp_path / "chunks") == smaller.total_bytes == CHUNK
    unlimited = ChunkStore(tmp_path / "chunks")
    unlimited.put(*a)
    unlimited.put(*b)
    assert unlimited.evicted == 0 and _stored_bytes(tmp_path / "chunks") == 3 * CHUNK


def test_cache_size_option_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_size("10G") == 10 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5k") == 1536
    assert parse_size("4096") == 4096 and parse_size("2GiB") == 2 << 30
    for bad in ("ten", "-1G", "inf", ""):
        with pytest.raises(CrfsError, match="cache size"):
            parse_size(bad)
    monkeypatch.delenv("CRFS_CACHE_SIZE", raising=False)
    assert _cache_size(None) is None
    monkeypatch.setenv("CRFS_CACHE_SIZE", "64M")
    assert _cache_size(None) == 64 << 20
    assert _cache_size("1G") == 1 << 30  # the option wins over the variable


@pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")
def test_worker_keeps_the_chunk_store_within_its_size(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    limit = 1 << 20
    worker = crfs("--no-background-fetch --cache-size 1M")
    merged = worker.mount()
    assert merged_files(merged) == EXPECTED  # ~20 MiB of chunks through a 1 MiB store
    # Chunks pinned by the reads in flight at the last store may exceed the limit briefly:
    # a few reads' worth (the kernel reads at most 128 KiB at a time, a few at once).
    assert _stored_bytes(worker.cache / "chunks") <= limit + (1 << 20)
    with open(merged / "data/big.bin", "rb") as f:  # evicted chunks come back when read again
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(BIG).digest()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")
def test_full_disk_degrades_to_fetching(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "crfs-full", str(worker.cache)], check=True)
    try:
        merged = worker.mount()
        first = merged_files(merged)
        second = merged_files(merged)  # nothing kept is trusted blindly: right bytes again
        full = b"disk full" in (worker.runtime / "worker.log").read_bytes()
    finally:
        worker.stop()
        subprocess.run(["umount", "-l", str(worker.cache)], check=False)
    assert first == EXPECTED and second == EXPECTED
    assert full  # the store did run out of space (the worker logged it), and reads went on
