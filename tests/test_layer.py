"""Layer view: exact bytes from generated blobs of every format, trust, tampering, hostility."""
from __future__ import annotations

import functools
import random
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crfs_worker.errors import FormatError, UnverifiableError, VerificationError
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.toc import TocLimits
from tests import blobgen
from tests.blobgen import MemBlob, Spec, dir_, hardlink, reg, symlink

FORMATS = ["stargz", "estargz", "zstd:chunked", "zstdchunked-estargz"]
CHUNK = {"stargz": 64 << 10, "estargz": 64 << 10, "zstd:chunked": 16 << 10, "zstdchunked-estargz": 64 << 10}


def _specs() -> list[Spec]:
    rng = random.Random(42)
    big = rng.randbytes(300_000)
    holes = rng.randbytes(20_000) + b"\0" * 50_000 + rng.randbytes(3_000) + b"\0" * 2_000
    return [
        dir_("etc"),
        reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n" * 20),
        reg("etc/empty", b""),
        reg("big.bin", big),
        reg("holes.bin", holes),
        reg("small1", b"a" * 100), reg("small2", b"b" * 300), reg("small3", b"c" * 5),
        symlink("bin", "usr/bin"),
        reg("usr/bin/sh", b"#!" + rng.randbytes(9000), mode=0o755, uid=1000, gid=1000),
        hardlink("usr/bin/bash", "usr/bin/sh"),
        Spec("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        Spec("run/fifo", "fifo", mode=0o600),
        reg("x/.wh.gone", b""), reg("x/.wh..wh..opq", b""),
        reg("xattr", b"data", xattrs={"user.k": b"\x00\xffv", "security.capability": b"\x01\x02"}),
        reg("deep/a/b/c/d/file.txt", "ünïcode\n".encode() * 50),
    ]


SPECS = _specs()


@functools.lru_cache(maxsize=None)
def blob_for(fmt: str) -> blobgen.Blob:
    kw = {"chunk_size": CHUNK[fmt]}
    if fmt == "estargz":
        kw["min_chunk_size"] = 4096
    return blobgen.BUILDERS[fmt](SPECS, **kw)


def source(b: blobgen.Blob, **kw) -> LayerSource:
    kw.setdefault("allow_unverified", b.format == "stargz")
    kw.setdefault("toc_digest", b.toc_digest)
    kw.setdefault("annotations", b.annotations)
    return LayerSource(MemBlob(b.data, name=f"test-{b.format}"), **kw)


_INDEX_ROOT: list[Path] = []


def open_layer(b: blobgen.Blob, index_dir: Path | None = None, **kw) -> Layer:
    if index_dir is None:
        import tempfile
        index_dir = Path(tempfile.mkdtemp(prefix="crfs-test-index-"))
        _INDEX_ROOT.append(index_dir)
    return Layer.open(source(b, **kw), index_dir)


@functools.lru_cache(maxsize=None)
def shared_layer(fmt: str) -> Layer:
    return open_layer(blob_for(fmt))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    import shutil
    for d in _INDEX_ROOT:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ exact bytes


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_file_reads_back_exactly(fmt):
    b = blob_for(fmt)
    layer = shared_layer(fmt)
    assert layer.format == fmt
    assert set(b.files) >= {"big.bin", "holes.bin", "usr/bin/bash"}
    for path, data in b.files.items():
        assert layer.read(path, 0, len(data) + 100) == data, path
        assert layer.stat(path).size == len(data)
        assert layer.read(path, len(data), 10) == b""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), which=st.integers(0, 10**6), a=st.integers(0, 10**6),
       n=st.integers(0, 200_000))
def test_random_ranges_read_back_exactly(fmt, which, a, n):
    b = blob_for(fmt)
    files = sorted(b.files)
    path = files[which % len(files)]
    data = b.files[path]
    off = a % (len(data) + 1)
    assert shared_layer(fmt).read(path, off, n) == data[off:off + n]


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata(fmt):
    layer = shared_layer(fmt)
    sh, bash = layer.stat("usr/bin/sh"), layer.stat("/usr/bin/bash")
    assert sh == bash and sh.nlink == 2 and sh.mode == stat.S_IFREG | 0o755 and sh.uid == 1000
    assert layer.readlink("bin") == "usr/bin" and stat.S_ISLNK(layer.stat("bin").mode)
    dev = layer.stat("dev/null")
    assert stat.S_ISCHR(dev.mode) and (dev.rdev_major, dev.rdev_minor) == (1, 3)
    assert stat.S_ISFIFO(layer.stat("run/fifo").mode)
    assert sorted(layer.listxattr("xattr")) == ["security.capability", "user.k"]
    assert layer.getxattr("xattr", "user.k") == b"\x00\xffv"
    with pytest.raises(KeyError):
        layer.getxattr("xattr", "user.none")
    assert [n for n, _ in layer.readdir("x")] == [".wh..wh..opq", ".wh.gone"]
    for p in ("", "/", ".", "./"):
        assert stat.S_ISDIR(layer.stat(p).mode) and layer.stat(p).ino == 1
    assert layer.stat("./etc/") == layer.stat("/etc") == layer.stat("etc")
    assert layer.exists("etc/passwd") and not layer.exists("etc/nope") and not layer.exists("etc/passwd/x")
    with pytest.raises(FileNotFoundError):
        layer.stat("nope")
    with pytest.raises(FileNotFoundError):
        layer.stat("../etc/passwd")
    with pytest.raises(NotADirectoryError):
        layer.readdir("etc/passwd")
    with pytest.raises(IsADirectoryError):
        layer.read("etc", 0, 1)
    with pytest.raises(OSError):
        layer.readlink("etc/passwd")
    with pytest.raises(OSError):
        layer.read("bin", 0, 1)
    walked = [p for p, _ in layer.walk()]
    assert walked[0] == "" and "deep/a/b/c/d/file.txt" in walked and len(walked) == len(set(walked))
    inos = {s.ino for p, s in layer.walk() if p != "usr/bin/bash"}
    assert len(inos) == len(walked) - 1


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_concurrent_reads_from_threads(fmt):
    from concurrent.futures import ThreadPoolExecutor

    b = blob_for(fmt)
    layer = shared_layer(fmt)
    jobs = [(p, o) for p in sorted(b.files) for o in (0, 1000, 70_000)] * 4

    def one(job):
        p, o = job
        return layer.read(p, o, 50_000) == b.files[p][o:o + 50_000]

    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(one, jobs))


def test_zeros_chunks_need_no_fetch():
    layer = shared_layer("zstd:chunked")
    chunks = layer.chunks_for("holes.bin", 0, 10**6)
    zeros = [c for c in chunks if c.zeros]
    assert zeros and all(not c.needs_fetch for c in zeros)
    assert layer.decode_chunk(zeros[0], b"") == b"\0" * zeros[0].size


def test_reads_are_coalesced_into_one_range_request():
    b = blob_for("estargz")
    blob = MemBlob(b.data)
    layer = Layer.open(LayerSource(blob, b.toc_digest, b.annotations), _tmp())
    chunks = layer.chunks_for("big.bin", 0, 300_000)
    assert len(chunks) == 5
    assert layer.fetch_ranges(chunks) == [(chunks[0].cstart, chunks[-1].cend)]
    blob.reads.clear()
    assert layer.read("big.bin", 1000, 200_000) == b.files["big.bin"][1000:201_000]
    assert len(blob.reads) == 1
    # the worker's path: plan, fetch, decode
    c = layer.chunks_for("big.bin", 70_000, 1)
    assert len(c) == 1 and c[0].offset == 65536
    raw = b.data[c[0].cstart:c[0].cend]
    assert layer.decode_chunk(c[0], raw) == b.files["big.bin"][65536:131072]
    with pytest.raises(ValueError):
        layer.decode_chunk(c[0], raw[:-1])


def test_packed_small_files_share_a_member():
    layer = shared_layer("estargz")
    cs = [layer.chunks_for(p, 0, 10)[0] for p in ("small1", "small2", "small3")]
    assert len({c.cstart for c in cs}) < 3 and any(c.inner for c in cs)
    for p in ("small1", "small2", "small3"):
        assert layer.read(p, 0, 1000) == blob_for("estargz").files[p]


def _tmp() -> Path:
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="crfs-test-index-"))
    _INDEX_ROOT.append(d)
    return d


def test_cached_open_reads_only_the_footer(tmp_path):
    b = blob_for("estargz")
    Layer.open(source(b), tmp_path).close()
    assert [p.name for p in tmp_path.iterdir()] == [b.toc_digest[7:] + ".sqlite"]
    blob = MemBlob(b.data)
    layer = Layer.open(LayerSource(blob, b.toc_digest, b.annotations), tmp_path)
    assert len(blob.reads) == 1 and blob.reads[0][0] >= len(b.data) - 72
    assert layer.read("etc/passwd", 0, 4) == b"root"


def test_prefetch_ranges():
    specs = [reg("a", b"1" * 5000), reg("b", b"2" * 5000), reg("c", b"3")]
    b = blobgen.estargz(specs, prefetch=["b"])
    layer = open_layer(b)
    lo, hi = layer.prefetch_range()
    landmark = layer.chunks_for(".prefetch.landmark", 0, 1)[0].cstart
    assert (lo, hi) == (0, landmark) and landmark > layer.chunks_for("b", 0, 1)[0].cstart
    assert open_layer(blobgen.estargz(specs, no_prefetch=True)).prefetch_range() is None
    assert open_layer(blobgen.estargz(specs)).prefetch_range() is None


# ------------------------------------------------------------------ tampering


def _mid_chunk(b: blobgen.Blob, path: str) -> int:
    c = shared_layer(b.format).chunks_for(path, 0, 1)[0]
    return c.cstart + (c.cend - c.cstart) // 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_chunk_byte_gives_verification_error_and_no_data(fmt):
    b = blob_for(fmt)
    bad = b.flip(_mid_chunk(b, "big.bin"))
    layer = open_layer(bad)
    with pytest.raises(VerificationError) as ei:
        layer.read("big.bin", 0, 10)
    assert "big.bin" in str(ei.value) and f"test-{fmt}" in str(ei.value)
    c = layer.chunks_for("big.bin", 0, 1)[0]
    with pytest.raises(VerificationError):
        layer.decode_chunk(c, bad.data[c.cstart:c.cend])
    # other files are still served
    assert layer.read("etc/passwd", 0, 4) == b"root"


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_toc_byte_refuses_to_open(fmt, tmp_path):
    b = blob_for(fmt)
    layer = shared_layer(fmt)
    f = layer.footer
    for where in (f.toc_offset + f.toc_length // 2, f.toc_offset + 20, f.toc_offset + f.toc_length - 12):
        bad = b.flip(where)
        with pytest.raises((VerificationError, FormatError)):
            Layer.open(source(bad, allow_unverified=False, toc_digest=b.toc_digest or "sha256:" + "0" * 64),
                       tmp_path)
    assert not [p for p in tmp_path.iterdir()], "no index (or temp file) may be left behind"


def test_wrong_toc_digest_is_a_verification_error(tmp_path):
    b = blob_for("estargz")
    with pytest.raises(VerificationError, match="does not match"):
        Layer.open(LayerSource(MemBlob(b.data), "sha256:" + "1" * 64, {}), tmp_path)
    with pytest.raises(FormatError, match="sha256"):
        Layer.open(LayerSource(MemBlob(b.data), "md5:1234", {}), tmp_path)


def test_zstd_chunked_with_the_older_annotation_keys(tmp_path):
    b = blobgen.zstd_chunked(SPECS, chunk_size=16 << 10, old_keys=True)
    assert all(k.startswith("io.containers.") for k in b.annotations)
    layer = Layer.open(LayerSource(MemBlob(b.data), None, b.annotations), tmp_path)
    assert layer.format == "zstd:chunked" and layer.verified
    assert layer.read("big.bin", 5, 100_000) == b.files["big.bin"][5:100_005]


def test_annotation_supplies_the_digest(tmp_path):
    b = blob_for("zstd:chunked")
    layer = Layer.open(LayerSource(MemBlob(b.data), None, b.annotations), tmp_path)
    assert layer.toc_digest == b.toc_digest and layer.verified


# ------------------------------------------------------------------ legacy trust


def test_legacy_stargz_needs_allow_unverified(tmp_path):
    b = blob_for("stargz")
    with pytest.raises(UnverifiableError, match="no TOC digest"):
        Layer.open(LayerSource(MemBlob(b.data), None, {}), tmp_path)
    layer = Layer.open(LayerSource(MemBlob(b.data), None, {}, allow_unverified=True), tmp_path)
    assert not layer.verified and layer.toc_digest.startswith("sha256:")
    assert layer.read("etc/passwd", 0, 4) == b"root"


def test_legacy_files_with_digest_are_verified_whole(tmp_path):
    b = blob_for("stargz")
    bad = b.flip(_mid_chunk(b, "big.bin") + 2 * CHUNK["stargz"] // 3)   # the second chunk
    layer = Layer.open(LayerSource(MemBlob(bad.data), None, {}, allow_unverified=True), tmp_path)
    # the first bytes live in an intact chunk, but the file is only served once all of it checks out
    with pytest.raises(VerificationError, match="big.bin: file"):
        layer.read("big.bin", 0, 10)
    plan = layer.chunks_for("big.bin", 0, 10)
    assert len(plan) == 1 and plan[0].parts and plan[0].size == len(b.files["big.bin"])


def test_legacy_files_without_digest_are_served_as_is(tmp_path):
    b = blobgen.stargz(SPECS, chunk_size=CHUNK["stargz"], digests=False)
    layer = Layer.open(LayerSource(MemBlob(b.data), None, {}, allow_unverified=True), tmp_path)
    for path, data in b.files.items():
        assert layer.read(path, 0, len(data)) == data
    with pytest.raises(UnverifiableError):
        Layer.open(LayerSource(MemBlob(b.data), None, {}), tmp_path / "x")


def test_legacy_with_a_digest_given_is_verified(tmp_path):
    b = blob_for("stargz")
    from hashlib import sha256
    digest = "sha256:" + sha256(b.toc_json).hexdigest()
    layer = Layer.open(LayerSource(MemBlob(b.data), digest, {}), tmp_path)
    assert layer.verified and layer.read("small1", 0, 3) == b"aaa"


def test_estargz_chunk_without_any_digest_is_unverifiable(tmp_path):
    def strip(toc):
        for e in toc["entries"]:
            e.pop("chunkDigest", None)
            e.pop("digest", None)
        return toc

    b = blobgen.estargz([reg("f", b"hello" * 1000)], toc_hook=strip)
    layer = Layer.open(LayerSource(MemBlob(b.data), b.toc_digest, {}), tmp_path)
    with pytest.raises(UnverifiableError, match="f"):
        layer.read("f", 0, 5)
    layer = Layer.open(LayerSource(MemBlob(b.data), b.toc_digest, {}, allow_unverified=True), tmp_path)
    assert layer.read("f", 0, 5) == b"hello"


# ------------------------------------------------------------------ hostile TOCs (digest matches)


def _hook(fn):
    def hook(toc):
        fn(toc["entries"])
        return toc
    return hook


HOSTILE = {
    "dotdot": (_hook(lambda es: es.append({"name": "../evil", "type": "reg"})), r"'\.\.'"),
    "dotdot-deep": (_hook(lambda es: es.append({"name": "a/../../evil", "type": "reg"})), r"'\.\.'"),
    "nul": (_hook(lambda es: es.append({"name": "a\x00b", "type": "reg"})), "NUL"),
    "huge-size": (_hook(lambda es: es.append({"name": "h", "type": "reg", "size": 2**63 - 1, "offset": 5})), "size"),
    "near-2**62": (_hook(lambda es: es.append({"name": "h", "type": "reg", "size": 2**62, "offset": 5})), "size"),
    "past-blob": (_hook(lambda es: es.append({"name": "p", "type": "reg", "size": 5, "offset": 10**9})),
                  "past the payload"),
    "hardlink-missing": (_hook(lambda es: es.append({"name": "l", "type": "hardlink", "linkName": "nope"})),
                         "missing"),
    "hardlink-later": (_hook(lambda es: es.insert(0, {"name": "l", "type": "hardlink", "linkName": "etc/passwd"})),
                       "later"),
    "hardlink-self": (_hook(lambda es: es.append({"name": "l", "type": "hardlink", "linkName": "l"})),
                      "later|missing"),
    "bomb": (lambda toc: b'{"version": 1, "entries": []' + b" " * (3 << 20) + b"}", "bomb|exceeds|more than"),
}


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tocs_are_refused(fmt, case, tmp_path):
    hook, msg = HOSTILE[case]
    specs = [dir_("etc"), reg("etc/passwd", b"root\n")]
    b = blobgen.BUILDERS[fmt](specs, toc_hook=hook)
    with pytest.raises(FormatError, match=msg):
        Layer.open(LayerSource(MemBlob(b.data, "hostile"), b.toc_digest, b.annotations), tmp_path,
                   limits=TocLimits(max_toc_bytes=1 << 20))
    assert not list(tmp_path.iterdir())


def test_absolute_names_are_refused(tmp_path):
    # No producer writes them; more cases in test_hostile_toc.py.
    b = blobgen.estargz([reg("ok", b"1")], toc_hook=_hook(
        lambda es: es.append({"name": "/etc/shadow", "type": "reg"})))
    with pytest.raises(FormatError, match="'/etc/shadow': name is an absolute path"):
        Layer.open(LayerSource(MemBlob(b.data), b.toc_digest, {}), tmp_path)
    assert not list(tmp_path.iterdir())


def test_chunk_range_past_the_blob_end_is_refused(tmp_path):
    # offsets inside the payload but a zstd:chunked endOffset beyond the TOC start
    b = blobgen.zstd_chunked([reg("f", b"abc" * 100)], toc_hook=_hook(
        lambda es: es[0].update(endOffset=es[0]["endOffset"] + 10**6)))
    with pytest.raises(FormatError, match="past the payload"):
        Layer.open(LayerSource(MemBlob(b.data), b.toc_digest, b.annotations), tmp_path)


# ------------------------------------------------------------------ scale (slow)


def _scale(tmp_path, entries: int) -> Layer:
    """Builds the index of a generated TOC, then opens it again from the cache. Only
    correctness is asserted here: bench/index_load.py measures time and memory."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "index_load", Path(__file__).resolve().parent.parent / "bench" / "index_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    blob_path, digest = bench.generate_blob(tmp_path, entries)
    from crfs_worker.blob import LocalBlob
    Layer.open(LayerSource(LocalBlob(blob_path), digest, {}), tmp_path / "index").close()
    built = list((tmp_path / "index").iterdir())
    layer = Layer.open(LayerSource(LocalBlob(blob_path), digest, {}), tmp_path / "index")
    assert list((tmp_path / "index").iterdir()) == built  # reused, not rebuilt
    assert layer.index.meta["entries"] == entries
    n = sum(1 for _ in layer.walk())
    assert n > entries * 0.95   # chunk entries and a few duplicate names are not tree nodes
    return layer


def test_scale_200k_entries(tmp_path):
    """About 5 s: big enough to use the writer process and the buffer refills."""
    _scale(tmp_path, 200_000).close()


@pytest.mark.slow
def test_scale_1m_entries(tmp_path):
    """The index of 1,000,000 entries builds and reopens (about 25 s with generation)."""
    _scale(tmp_path, 1_000_000).close()
