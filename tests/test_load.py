"""Load: sixteen fuse-overlayfs mounts (crfs.so lowers) of one image on one worker, and
64 threads reading random ranges of random files through random mounts. Every byte read
must be right, and each chunk must come from the registry once: the blob ranges the
relay saw never overlap (the single-flight fetcher and the shared chunk store at work).

The image, registry, relay and worker are those of tests/test_prefetch.py.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from tests.test_prefetch import (  # noqa: F401  (fixtures)
    DEADLINE,
    EXPECTED,
    FUSE_OVERLAYFS,
    Crfs,
    PrefetchImage,
    _range,
    crfs,
    image,
)

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")

MOUNTS = 16
READERS = 64
READS_PER_READER = 40
MAX_READ = 256 << 10


def _reader(mounts: list[Path], seed: int) -> list[str]:
    """Random slices of random files through random mounts; the problems it saw."""
    rng = random.Random(seed)
    names = sorted(EXPECTED)
    problems = []
    for _ in range(READS_PER_READER):
        name = rng.choice(names)
        want_all = EXPECTED[name]
        offset = rng.randrange(len(want_all)) if want_all else 0
        length = rng.randrange(1, MAX_READ)
        root = rng.choice(mounts)
        try:
            fd = os.open(root / name, os.O_RDONLY)
            try:
                got = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            problems.append(f"{root}/{name}: {exc}")
            continue
        if got != want_all[offset:offset + length]:
            problems.append(f"{root}/{name} [{offset}, +{length}): wrong bytes")
    return problems


def test_sixteen_mounts_and_64_readers_fetch_each_chunk_once(image: PrefetchImage,
                                                             crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    before = len(image.relay.records())
    key = worker.key()
    mounts = [worker.mount_key(key, f"m{i}") for i in range(MOUNTS)]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        problems = [p for found in pool.map(lambda seed: _reader(mounts, seed), range(READERS)) for p in found]
    assert problems == []
    rows = worker.stats()
    assert len(rows) == len(image.layers)  # one worker, each layer opened once for all 16 mounts
    assert all(row["failures"] == 0 for row in rows)
    for layer in image.layers:
        data_ranges = sorted(_range(r) for r in image.blob_gets(layer, before) if _range(r)[0] < layer.toc_offset)
        overlaps = [(a, b) for a, b in zip(data_ranges, data_ranges[1:]) if a[1] > b[0]]
        assert overlaps == [], f"{layer.digest}: chunks fetched more than once"
    base_data = [r for r in image.blob_gets(image.layers[0], before) if _range(r)[0] < image.layers[0].toc_offset]
    assert base_data  # the readers did reach the registry (a cold cache)
