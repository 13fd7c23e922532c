"""Index: tree semantics (inodes, links, duplicates, whiteouts), chunk ranges, writer process."""
from __future__ import annotations

import stat

import pytest

from crfs_worker import index as index_mod
from crfs_worker.errors import CrfsError, FormatError
from crfs_worker.index import ChunkRow, Index, IndexBuilder
from crfs_worker.toc import TocEntry as E

D1, D2 = b"\x01" * 32, b"\x02" * 32


def build(tmp_path, entries, fmt="estargz", payload_end=10**6, process=False, name="i") -> Index:
    p = tmp_path / f"{name}.sqlite"
    cls = index_mod.ProcessIndexBuilder if process else IndexBuilder
    b = cls(p, name="layer", fmt=fmt, payload_end=payload_end)
    try:
        b.add_all(entries)
        b.finish({"format": fmt})
    except BaseException:
        b.abort()
        raise
    return Index(p, "layer")


def tree(idx: Index) -> dict[str, tuple]:
    return {p: (s.ino, stat.filemode(s.mode), s.nlink, s.size) for p, s in idx.walk()}


def test_missing_parents_inodes_and_walk_order(tmp_path):
    idx = build(tmp_path, [E("a/b/c", "reg", size=3, offset=10, chunk_digest=D1, mode=0o600),
                           E("a", "dir", mode=0o700, uid=5), E("z", "fifo")])
    walk = list(idx.walk())
    assert [p for p, _ in walk] == ["", "a", "a/b", "a/b/c", "z"]
    inos = [s.ino for _, s in walk]
    assert inos[0] == 1 and len(set(inos)) == len(inos) and min(inos) > 0
    _, a = idx.lookup("a")
    assert (a.mode, a.uid, a.nlink) == (stat.S_IFDIR | 0o700, 5, 3)   # explicit entry won
    _, ab = idx.lookup("a/b")
    assert (ab.mode, ab.uid, ab.nlink) == (stat.S_IFDIR | 0o755, 0, 2)  # created 0755
    _, c = idx.lookup("a/b/c")
    assert (c.mode, c.nlink, c.size) == (stat.S_IFREG | 0o600, 1, 3)
    assert idx.stat(1).nlink == 3   # root: ".", "..", and "a" (as "..")
    assert [n for n, _ in idx.children(1)] == ["a", "z"]


def test_lookup_errors(tmp_path):
    idx = build(tmp_path, [E("f", "reg"), E("d", "dir")])
    with pytest.raises(FileNotFoundError):
        idx.lookup("nope")
    with pytest.raises(FileNotFoundError):
        idx.lookup("d/nope")
    with pytest.raises(NotADirectoryError):
        idx.lookup("f/x")


def test_hardlinks_share_inode_and_count_links(tmp_path):
    idx = build(tmp_path, [
        E("bin/sh", "reg", size=4, offset=10, chunk_digest=D1, mode=0o755, uid=3),
        E("bin/bash", "hardlink", link_name="bin/sh", mode=0o600),
        E("usr/bin/rbash", "hardlink", link_name="bin/bash"),   # a link to a link
    ])
    i1, s1 = idx.lookup("bin/sh")
    i2, s2 = idx.lookup("bin/bash")
    i3, s3 = idx.lookup("usr/bin/rbash")
    assert i1 == i2 == i3 and s1 == s2 == s3
    assert s1.nlink == 3 and s1.mode == stat.S_IFREG | 0o755 and s1.uid == 3
    assert idx.chunks(i3) == idx.chunks(i1) != []


@pytest.mark.parametrize("entries,msg", [
    ([E("a", "hardlink", link_name="missing")], "missing entry"),
    ([E("a", "hardlink", link_name="b"), E("b", "reg")], "later entry"),
    ([E("a", "hardlink", link_name="a")], "later entry|missing"),
    ([E("d", "dir"), E("a", "hardlink", link_name="d")], "directory"),
    ([E("a", "hardlink", link_name="x/y")], "missing"),
])
def test_bad_hardlinks_are_refused(tmp_path, entries, msg):
    with pytest.raises(FormatError, match=msg):
        build(tmp_path, entries)


def test_duplicates_later_entry_wins(tmp_path):
    idx = build(tmp_path, [
        E("f", "reg", size=5, offset=10, chunk_digest=D1),
        E("old", "hardlink", link_name="f"),          # made while f was the first file
        E("f", "reg", size=7, offset=20, chunk_digest=D2, mode=0o640),
        E("d", "dir", mode=0o700), E("d/x", "reg"),
        E("d", "dir", mode=0o750, uid=9),              # again: attributes change, child stays
        E("s", "reg"), E("s", "symlink", link_name="target"),
        E("t", "reg"), E("t", "dir"),                  # a directory replaces a file
    ])
    i_f, f = idx.lookup("f")
    i_old, old = idx.lookup("old")
    assert f.size == 7 and f.mode == stat.S_IFREG | 0o640 and f.nlink == 1
    assert i_old != i_f and old.size == 5 and old.nlink == 1   # the first inode lives on via the link
    assert idx.chunks(i_f)[0].digest == D2 and idx.chunks(i_old)[0].digest == D1
    _, d = idx.lookup("d")
    assert d.mode == stat.S_IFDIR | 0o750 and d.uid == 9 and idx.lookup("d/x")
    assert stat.S_ISLNK(idx.lookup("s")[1].mode)
    assert stat.S_ISDIR(idx.lookup("t")[1].mode)
    assert sorted(p for p, _ in idx.walk()) == ["", "d", "d/x", "f", "old", "s", "t"]


def test_duplicate_of_a_hardlinked_file_drops_one_name(tmp_path):
    idx = build(tmp_path, [E("a", "reg"), E("b", "hardlink", link_name="a"), E("c", "hardlink", link_name="a"),
                           E("b", "reg")])
    assert idx.lookup("a")[1].nlink == 2 and idx.lookup("c")[1].nlink == 2
    assert idx.lookup("b")[1].nlink == 1 and idx.lookup("b")[0] != idx.lookup("a")[0]


def test_non_directory_replacing_a_directory_is_refused(tmp_path):
    with pytest.raises(FormatError, match="replaces a directory"):
        build(tmp_path, [E("d", "dir"), E("d", "reg")])
    with pytest.raises(FormatError, match="replaces a directory"):
        build(tmp_path, [E("d/x", "reg"), E("d", "symlink", link_name="y")], name="j")


def test_whiteouts_devices_symlinks_xattrs(tmp_path):
    idx = build(tmp_path, [
        E("x/.wh.gone", "reg"), E("x/.wh..wh..opq", "reg"), E(".wh.top", "char"),
        E("dev/sda", "block", dev_major=8, dev_minor=1, mode=0o660),
        E("l", "symlink", link_name="../ü/target"),
        E("c", "reg", xattrs={"user.a": b"\x00\xff", "security.capability": b"cap"}),
    ])
    assert [n for n, _ in idx.children(idx.lookup("x")[0])] == [".wh..wh..opq", ".wh.gone"]
    ino, s = idx.lookup("dev/sda")
    assert stat.S_ISBLK(s.mode) and (s.rdev_major, s.rdev_minor) == (8, 1)
    ino, s = idx.lookup("l")
    assert idx.readlink(ino) == "../ü/target" and s.size == len("../ü/target".encode())
    ino, _ = idx.lookup("c")
    assert idx.xattrs(ino) == {"security.capability": b"cap", "user.a": b"\x00\xff"}
    assert stat.S_ISCHR(idx.lookup(".wh.top")[1].mode)


def test_estargz_chunk_ends_with_inner_offsets(tmp_path):
    idx = build(tmp_path, [
        E("a", "reg", size=10, offset=100, chunk_digest=D1),
        E("b", "reg", size=10, offset=100, inner_offset=512, chunk_digest=D1),   # packed with a
        E("d", "dir"),
        E("c", "reg", size=30, offset=300, chunk_size=10, chunk_digest=D1),
        E("c", "chunk", offset=400, chunk_offset=10, chunk_size=10, chunk_digest=D2),
        E("c", "chunk", offset=500, chunk_offset=20, chunk_digest=D2),         # size 0: to the end
    ], payload_end=900)
    ca = idx.chunks(idx.lookup("a")[0])
    cb = idx.chunks(idx.lookup("b")[0])
    assert ca == [ChunkRow(0, 10, 100, 300, 0, D1, False)]
    assert cb == [ChunkRow(0, 10, 100, 300, 512, D1, False)]
    cc = idx.chunks(idx.lookup("c")[0])
    assert [(r.foff, r.size, r.cstart, r.cend) for r in cc] == [(0, 10, 300, 400), (10, 10, 400, 500),
                                                                (20, 10, 500, 900)]
    ino = idx.lookup("c")[0]
    assert [r.foff for r in idx.chunks(ino, 12, 13)] == [10]
    assert [r.foff for r in idx.chunks(ino, 9, 21)] == [0, 10, 20]


def test_single_chunk_file_is_vouched_for_by_its_file_digest(tmp_path):
    idx = build(tmp_path, [E("a", "reg", size=10, offset=100, digest=D2)])
    assert idx.chunks(idx.lookup("a")[0])[0].digest == D2
    assert idx.file_digest(idx.lookup("a")[0]) == D2


def test_zstd_chunked_ends_use_end_offset(tmp_path):
    idx = build(tmp_path, [
        E("f", "reg", size=30, offset=100, end_offset=400, chunk_size=10, chunk_digest=D1, digest=D2),
        E("f", "chunk", offset=200, chunk_offset=10, chunk_size=10, chunk_digest=D1, zeros=True),
        E("f", "chunk", offset=300, chunk_offset=20, chunk_size=10, chunk_digest=D2),
        E("g", "reg", size=5, offset=450, end_offset=480, digest=D1),
    ], fmt="zstd:chunked", payload_end=1000)
    cf = idx.chunks(idx.lookup("f")[0])
    assert [(r.cstart, r.cend, r.zeros) for r in cf] == [(100, 200, False), (200, 300, True), (300, 400, False)]
    assert idx.chunks(idx.lookup("g")[0]) == [ChunkRow(0, 5, 450, 480, 0, D1, False)]


@pytest.mark.parametrize("entries,msg", [
    ([E("c", "chunk", offset=5, chunk_offset=0)], "does not follow"),
    ([E("f", "reg", size=20, offset=5, chunk_size=10), E("g", "reg")], "cover 10 of"),
    ([E("f", "reg", size=20, offset=5, chunk_size=10), E("f", "chunk", offset=9, chunk_offset=12)], "gap"),
    ([E("f", "reg", size=20, offset=5, chunk_size=10),
      E("f", "chunk", offset=9, chunk_offset=10, chunk_size=15)], "runs past"),
    ([E("f", "reg", size=20, offset=5, chunk_size=10), E("g", "chunk", offset=9, chunk_offset=10)],
     "names another"),
    ([E("f", "reg", size=20)], "no data offset"),
    ([E("f", "reg", size=2, offset=50), E("g", "reg", size=2, offset=40)], "not after"),
])
def test_inconsistent_chunks_are_refused(tmp_path, entries, msg):
    with pytest.raises(FormatError, match=msg):
        build(tmp_path, entries)


def test_prefetch_landmarks(tmp_path):
    idx = build(tmp_path, [E("a", "reg", size=3, offset=10), E(".prefetch.landmark", "reg", size=1, offset=50)])
    assert idx.meta["prefetch_offset"] == 50
    idx = build(tmp_path, [E(".no.prefetch.landmark", "reg", size=1, offset=10)], name="n")
    assert "prefetch_offset" not in idx.meta


def _many(n: int) -> list[E]:
    out = []
    off = 10
    for i in range(n):
        out.append(E(f"d{i % 7}/f{i % 50}", "reg", size=5, offset=off, chunk_digest=D1))  # many duplicates
        off += 10
        if i % 11 == 0:
            out.append(E(f"links/l{i}", "hardlink", link_name=f"d{i % 7}/f{i % 50}"))
        if i % 13 == 0:
            out.append(E(f"d{i % 7}/sub{i}", "dir"))
    return out


def test_builder_process_gives_the_same_index(tmp_path, monkeypatch):
    entries = _many(400)
    inline = build(tmp_path, entries, name="inline")
    monkeypatch.setattr(index_mod.ProcessIndexBuilder, "BATCH", 16)
    other = build(tmp_path, entries, process=True, name="process")
    assert tree(inline) == tree(other)
    for p, _ in inline.walk():
        ino = inline.lookup(p)[0]
        assert inline.chunks(ino) == other.chunks(ino)


def _every_kind(n: int) -> list[E]:
    """n entries of each kind of node row (and chunks), names unique within each kind."""
    out, off = [], 10
    for i in range(n):
        out += [E(f"d{i % 3}/sub{i}", "dir", mode=0o700, uid=i), E(f"e/empty{i}", "reg", mtime_ns=i),
                E(f"f/data{i}", "reg", size=9, offset=off, chunk_digest=D1, digest=D1, uid=i),
                E(f"s/link{i}", "symlink", link_name=f"t{i}"), E(f"h/hard{i}", "hardlink", link_name=f"f/data{i}"),
                E(f"c/fifo{i}", "fifo", gid=i), E(f"m/multi{i}", "reg", size=8, offset=off + 3, chunk_size=4),
                E(f"m/multi{i}", "chunk", offset=off + 6, chunk_offset=4, chunk_size=4, chunk_digest=D2)]
        off += 10
    return out


def test_many_rows_per_insert_write_the_same_rows(tmp_path, monkeypatch):
    """Rows are written 256 per INSERT statement: the values must land in the right rows
    (counts on both sides of the statement size, with the remainder written one by one)."""
    entries = _every_kind(600)
    many = build(tmp_path, entries, name="many")
    monkeypatch.setattr(index_mod, "_ROWS_PER_INSERT", 1)
    one = build(tmp_path, entries, name="one")
    assert tree(many) == tree(one) and len(tree(one)) == 1 + 9 + 600 * 7
    for p, s in many.walk():
        assert one.lookup(p)[1] == s
        assert many.readlink(s.ino) == one.readlink(s.ino)
        assert many.chunks(s.ino) == one.chunks(s.ino)
    _, d = many.lookup("d1/sub1")
    assert (stat.S_IMODE(d.mode), d.uid, d.nlink) == (0o700, 1, 2)
    assert many.lookup("h/hard5")[1] == many.lookup("f/data5")[1] and many.lookup("f/data5")[1].nlink == 2
    assert [c.digest for c in many.chunks(many.lookup("m/multi7")[0])] == [None, D2]


def test_builder_process_errors_reach_the_parent(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod.ProcessIndexBuilder, "BATCH", 8)
    with pytest.raises(FormatError, match="missing"):        # raised at finish
        build(tmp_path, _many(30) + [E("zz", "hardlink", link_name="nothing")], process=True)
    bad = [E("c", "chunk", offset=5)] + _many(3000)           # raised on a later send
    with pytest.raises(FormatError, match="does not follow"):
        build(tmp_path, bad, process=True, name="j")
    b = index_mod.ProcessIndexBuilder(tmp_path / "x.sqlite", name="l", fmt="estargz", payload_end=10**6)
    b.add_all(_many(30))
    proc = b.proc
    b.abort()
    assert proc.poll() is not None


def test_a_killed_builder_process_is_reported_with_its_signal(tmp_path):
    b = index_mod.ProcessIndexBuilder(tmp_path / "x.sqlite", name="layer-x", fmt="estargz", payload_end=10**6)
    b.proc.kill()
    b.proc.wait()
    with pytest.raises(CrfsError, match=r"layer-x: the index builder process failed \(killed by signal 9\)"):
        b.finish({})
    assert not (tmp_path / "x.sqlite").exists()


def test_make_builder_picks_by_toc_size(tmp_path):
    small = index_mod.make_builder(tmp_path / "a", name="l", fmt="estargz", payload_end=9, json_size=1000)
    big = index_mod.make_builder(tmp_path / "b", name="l", fmt="estargz", payload_end=9, json_size=1 << 30)
    assert isinstance(small, IndexBuilder) and isinstance(big, index_mod.ProcessIndexBuilder)
    small.abort()
    big.abort()


def test_index_rejects_foreign_files(tmp_path):
    p = tmp_path / "bad.sqlite"
    p.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(FormatError):
        Index(p)
