"""A chunk's neighbours in the blob (Layer.chunks_after / chunks_before, from
Index.data_files_beside): what an on-demand fetch may take along in the same Range
request. Real layers built by tests/blobgen.py, opened with Layer.open."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from crfs_worker.layer import Chunk, Layer, LayerSource
from tests import blobgen
from tests.blobgen import MemBlob, dir_, hardlink, reg, symlink

SMALL = 2000  # incompressible: ~2 KB of blob per small file


def _specs() -> list[blobgen.Spec]:
    rng = random.Random(5)
    a = [reg(f"a/f{i:02}", rng.randbytes(SMALL)) for i in range(10)]
    # Entries without data of their own are passed over, not run enders.
    a[4:4] = [symlink("a/link", "f00"), dir_("a/sub"), reg("a/empty", b""), hardlink("a/hard", "a/f00")]
    # A subdirectory's file ends a run: the files after it are not looked at.
    a += [dir_("a/deep"), reg("a/deep/x", rng.randbytes(SMALL)), reg("a/f10", rng.randbytes(SMALL))]
    return ([dir_("a")] + a + [dir_("b"), reg("b/g0", rng.randbytes(SMALL)), reg("b/g1", rng.randbytes(SMALL)),
            dir_("c"), reg("c/big", rng.randbytes(5 * 64 << 10))])


@pytest.fixture(params=["estargz", "zstd:chunked"])
def layer(request: pytest.FixtureRequest, tmp_path: Path) -> Layer:
    b = blobgen.BUILDERS[request.param](_specs(), chunk_size=64 << 10)
    with Layer.open(LayerSource(MemBlob(b.data, name="neighbours"), b.toc_digest, b.annotations),
                    tmp_path) as opened:
        yield opened


def _first(layer: Layer, path: str, offset: int = 0) -> Chunk:
    return layer.chunks_for(path, offset, 1)[0]


def _paths(chunks: list[Chunk]) -> list[str]:
    return [c.path for c in chunks]


def _in_blob_order(chunks: list[Chunk]) -> bool:
    return all(a.cend <= b.cstart for a, b in zip(chunks, chunks[1:]))


def test_data_files_beside_walk_the_directory_in_toc_order_both_ways(layer: Layer) -> None:
    ino = layer.stat("a/f05").ino
    after = [name for name, _ in layer.index.data_files_beside(ino)]
    before = [name for name, _ in layer.index.data_files_beside(ino, forward=False, batch=2)]
    assert after == ["f06", "f07", "f08", "f09"]  # a/deep/x is another directory's
    # Nearest first; the symlink, subdirectory, empty file and hardlink are passed over,
    # and the run stops at the directory's own entry.
    assert before == ["f04", "f03", "f02", "f01", "f00"]
    assert list(layer.index.data_files_beside(layer.stat("b/g0").ino, forward=False)) == []
    assert list(layer.index.data_files_beside(10**9)) == []  # no such entry: nothing


def test_chunks_before_are_the_directory_files_before_the_chunk_in_blob_order(layer: Layer) -> None:
    chunk = _first(layer, "a/f05")
    before = layer.chunks_before(chunk, 0)
    assert _paths(before) == ["a/f00", "a/f01", "a/f02", "a/f03", "a/f04"]
    assert _in_blob_order(before + [chunk])
    assert all(c.digest is not None and not c.zeros for c in before)
    # chunks_after is its mirror, unchanged.
    assert _paths(layer.chunks_after(chunk, layer.blob.size)) == ["a/f06", "a/f07", "a/f08", "a/f09"]


def test_chunks_before_start_where_asked(layer: Layer) -> None:
    chunk = _first(layer, "a/f05")
    f03 = _first(layer, "a/f03")
    assert _paths(layer.chunks_before(chunk, f03.cstart)) == ["a/f03", "a/f04"]
    assert layer.chunks_before(chunk, chunk.cstart) == []


def test_a_gap_wider_than_allowed_ends_the_run(layer: Layer) -> None:
    chunk = _first(layer, "a/f05")
    f04 = _first(layer, "a/f04")
    # Between f04 and f05 lie the tar headers of the link, the subdirectory, the empty
    # file, the hardlink and f05: a gap just too small for them stops before f04.
    assert layer.chunks_before(chunk, 0, gap=chunk.cstart - f04.cend - 1) == []
    assert _paths(layer.chunks_before(chunk, 0, gap=chunk.cstart - f04.cend))[-1] == "a/f04"


def test_the_first_file_of_a_directory_has_nothing_before_it(layer: Layer) -> None:
    assert layer.chunks_before(_first(layer, "b/g0"), 0) == []
    assert _paths(layer.chunks_before(_first(layer, "b/g1"), 0)) == ["b/g0"]


def test_a_later_chunk_of_a_big_file_has_the_earlier_ones_before_it(layer: Layer) -> None:
    third = _first(layer, "c/big", 2 * 64 << 10)
    before = layer.chunks_before(third, 0)
    assert [(c.path, c.offset) for c in before] == [("c/big", 0), ("c/big", 64 << 10)]
    assert _in_blob_order(before + [third])
