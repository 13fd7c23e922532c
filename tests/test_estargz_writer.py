"""The eStargz writer against the reference layout, parsed independently here
(zlib member by member, the footer byte by byte, the TOC with json), and read
back through crfs' own Layer view."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crfs_worker.blob import LocalBlob
from crfs_worker.errors import FormatError
from crfs_worker.estargz_writer import (
    EstargzOptions,
    EstargzResult,
    PrioritizedFileNotFoundError,
    convert_file,
    write_estargz,
)
from crfs_worker.layer import Layer, LayerSource
from tests.support.images import (
    CHUNK,
    TestLayer,
    check_layer_view,
    compress,
    read_tar_entries,
    standard_layers,
)

FOOTER_SIZE = 51


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TestLayer]:
    return {layer.name: layer for layer in standard_layers(tmp_path_factory.mktemp("tars"))}


@dataclass
class Parsed:
    """An eStargz blob taken apart without crfs code."""

    blob: bytes
    members: dict[int, bytes]       # gzip member offset -> decompressed bytes
    toc_offset: int
    toc: dict[str, Any]
    toc_json: bytes


def parse_members(data: bytes) -> dict[int, bytes]:
    members: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        inflater = zlib.decompressobj(31)
        out, fed = [], pos
        while not inflater.eof:
            assert fed < len(data), f"gzip member at {pos} is truncated"
            piece = data[fed:fed + 65536]
            fed += len(piece)
            out.append(inflater.decompress(piece))
        members[pos] = b"".join(out)
        pos = fed - len(inflater.unused_data)
    return members


def parse_estargz(blob: bytes) -> Parsed:
    footer = blob[-FOOTER_SIZE:]
    toc_offset = int(footer[16:32], 16)
    # The reference's footer, written out byte by byte.
    assert footer == (b"\x1f\x8b\x08\x04" + b"\x00" * 4 + b"\x00\xff" + b"\x1a\x00" + b"SG"
                      + b"\x16\x00" + b"%016xSTARGZ" % toc_offset + b"\x01\x00\x00\xff\xff"
                      + b"\x00" * 8)
    assert gzip.decompress(footer) == b""
    members = parse_members(blob[:-FOOTER_SIZE])
    assert toc_offset in members and max(members) == toc_offset, "the TOC is the last member"
    toc_tar = members[toc_offset]
    with tarfile.open(fileobj=io.BytesIO(toc_tar), mode="r:") as tar:
        entries = tar.getmembers()
        assert [e.name for e in entries] == ["stargz.index.json"]
        toc_json = tar.extractfile(entries[0]).read()  # type: ignore[union-attr]
    assert toc_tar.endswith(b"\0" * 1024), "tar end-of-archive blocks follow the TOC"
    assert len(toc_tar) == 512 + len(toc_json) + (-len(toc_json) % 512) + 1024
    return Parsed(blob, members, toc_offset, json.loads(toc_json), toc_json)


def write(layer_path: Path, out: Path, **options: Any) -> tuple[EstargzResult, Parsed]:
    result = convert_file(layer_path, out, EstargzOptions(**options))
    return result, parse_estargz(out.read_bytes())


def open_layer(blob_path: Path, result: EstargzResult, index_dir: Path) -> Layer:
    blob = LocalBlob(blob_path)
    return Layer.open(LayerSource(blob, result.toc_digest, {}), index_dir)


@pytest.mark.parametrize("name", ["busybox", "changes", "big"])
def test_blob_has_the_reference_structure(layers: dict[str, TestLayer], tmp_path: Path,
                                          name: str) -> None:
    layer = layers[name]
    result, parsed = write(layer.tar_path, tmp_path / "out.esgz", chunk_size=1 << 20)
    blob = parsed.blob
    uncompressed = b"".join(parsed.members[offset] for offset in sorted(parsed.members))

    assert result.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.blob_size == len(blob)
    assert result.toc_offset == parsed.toc_offset
    assert result.toc_digest == "sha256:" + hashlib.sha256(parsed.toc_json).hexdigest()
    assert result.diff_id == "sha256:" + hashlib.sha256(uncompressed).hexdigest()
    assert result.uncompressed_size == len(uncompressed)

    toc = parsed.toc
    assert toc["version"] == 1
    entries = toc["entries"]
    first = entries[0]
    assert (first["name"], first["type"], first["size"]) == (".no.prefetch.landmark", "reg", 1)
    assert parsed.members[first["offset"]][:1] == b"\x0f"

    # Every non-empty payload (and chunk) starts its own member, and nothing else does
    # (besides the first member, of headers, and the TOC's).
    payload_offsets = {e["offset"] for e in entries if e["type"] in ("reg", "chunk") and
                       e.get("size", 1) > 0 and "offset" in e}
    assert set(parsed.members) == payload_offsets | {0, parsed.toc_offset}

    check_chunks(entries, parsed, layer, chunk_size=1 << 20)
    check_metadata(entries, layer)


def check_chunks(entries: list[dict[str, Any]], parsed: Parsed, layer: TestLayer,
                 chunk_size: int) -> None:
    by_path: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry["type"] in ("reg", "chunk"):
            by_path.setdefault(entry["name"].removeprefix("./"), []).append(entry)
    for path, expected in layer.entries.items():
        if expected.type != "reg":
            continue
        chunks = by_path[path]
        data = expected.data
        assert chunks[0]["type"] == "reg"
        assert chunks[0].get("size", 0) == len(data)
        assert chunks[0]["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        if not data:
            assert len(chunks) == 1 and "offset" not in chunks[0]
            continue
        assert [c.get("chunkOffset", 0) for c in chunks] == list(range(0, len(data), chunk_size))
        for chunk in chunks:
            start = chunk.get("chunkOffset", 0)
            size = chunk.get("chunkSize") or len(data) - start
            assert size == min(chunk_size, len(data) - start)
            piece = data[start:start + size]
            assert parsed.members[chunk["offset"]][:size] == piece
            assert chunk["chunkDigest"] == "sha256:" + hashlib.sha256(piece).hexdigest()


def check_metadata(entries: list[dict[str, Any]], layer: TestLayer) -> None:
    toc_by_path = {e["name"].removeprefix("./").rstrip("/"): e for e in entries
                   if e["type"] != "chunk"}
    last_names: dict[int, str] = {}
    for entry in entries:
        if "userName" in entry:
            assert last_names.get(entry.get("uid", 0)) != entry["userName"], \
                "userName is only repeated when it changes"
            last_names[entry.get("uid", 0)] = entry["userName"]
    for path, expected in layer.entries.items():
        entry = toc_by_path[path]
        assert entry["type"] == expected.type, path
        assert entry.get("mode", 0) == expected.mode, path
        assert (entry.get("uid", 0), entry.get("gid", 0)) == (expected.uid, expected.gid), path
        assert entry.get("modtime") == _rfc3339(expected.mtime), path
        assert {k: base64.b64decode(v) for k, v in (entry.get("xattrs") or {}).items()} \
            == dict(expected.xattrs), path
        if expected.type == "dir":
            assert entry["name"].endswith("/"), path
        if expected.type in ("symlink", "hardlink"):
            assert entry["linkName"].removeprefix("./") == expected.link, path
        if expected.type in ("char", "block"):
            assert (entry.get("devMajor", 0), entry.get("devMinor", 0)) \
                == (expected.devmajor, expected.devminor), path


def _rfc3339(seconds: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def test_default_chunking_of_big_and_exact_files(layers: dict[str, TestLayer],
                                                 tmp_path: Path) -> None:
    _, parsed = write(layers["big"].tar_path, tmp_path / "big.esgz")
    entries = parsed.toc["entries"]
    big = [e for e in entries if e["name"] == "./data/big.bin"]
    assert [(e["type"], e.get("chunkOffset", 0), e.get("chunkSize", 0)) for e in big] == [
        ("reg", 0, CHUNK), ("chunk", CHUNK, CHUNK), ("chunk", 2 * CHUNK, 0)]
    exact = [e for e in entries if e["name"] == "./data/exact-chunk.bin"]
    assert [(e["type"], e.get("chunkSize", 0)) for e in exact] == [("reg", CHUNK)]
    check_chunks(entries, parsed, layers["big"], chunk_size=CHUNK)


@pytest.mark.parametrize("name", ["busybox", "changes", "big"])
def test_contents_read_back_identical(layers: dict[str, TestLayer], tmp_path: Path,
                                      name: str) -> None:
    layer = layers[name]
    out = tmp_path / "out.esgz"
    result = convert_file(layer.tar_path, out, EstargzOptions(chunk_size=1 << 20))
    # As a plain tar.gz (what a non-lazy puller sees): same entries, same order.
    back = read_tar_entries(out)
    assert back == layer.entries
    assert list(back) == list(layer.entries)
    # Through crfs' Layer view, lazily, verified chunk by chunk.
    with open_layer(out, result, tmp_path / "index") as view:
        assert view.format == "estargz"
        check_layer_view(view, layer.entries)


def test_same_blob_from_gzip_zstd_and_plain_input_and_any_worker_count(
        layers: dict[str, TestLayer]) -> None:
    tar = layers["changes"].tar_path.read_bytes()
    digests = set()
    for compression in ("none", "gzip", "zstd"):
        for workers in (1, 3):
            out = io.BytesIO()
            result = write_estargz(io.BytesIO(compress(tar, compression)), out,
                                   EstargzOptions(workers=workers, chunk_size=4096))
            digests.add(result.blob_digest)
    assert len(digests) == 1


def test_prioritized_files_come_first_with_parents_and_link_targets(
        layers: dict[str, TestLayer], tmp_path: Path) -> None:
    layer = layers["changes"]
    prioritized = ("usr/share/hl/link1", "/etc/.wh.motd", "./run/fifo")
    result, parsed = write(layer.tar_path, tmp_path / "p.esgz", prioritized_files=prioritized)
    names = [e["name"] for e in parsed.toc["entries"] if e["type"] != "chunk"]
    head = ["usr/", "usr/share/", "usr/share/hl/", "usr/share/hl/original",
            "usr/share/hl/link1", "etc/", "etc/.wh.motd", "run/", "run/fifo",
            ".prefetch.landmark"]
    assert names[:len(head)] == head
    rest = [n for n in (p + ("/" if e.type == "dir" else "") for p, e in layer.entries.items())
            if n not in head]
    assert names[len(head):] == rest
    landmark = parsed.toc["entries"][len(head) - 1]
    assert parsed.members[landmark["offset"]][:1] == b"\x0f"
    assert read_tar_entries(tmp_path / "p.esgz") == layer.entries
    with open_layer(tmp_path / "p.esgz", result, tmp_path / "index") as view:
        assert view.prefetch_range() == (0, landmark["offset"])
        check_layer_view(view, layer.entries)


def test_missing_prioritized_file_is_named(layers: dict[str, TestLayer], tmp_path: Path) -> None:
    with pytest.raises(PrioritizedFileNotFoundError, match="no/such/file"):
        write_estargz(io.BytesIO(layers["changes"].tar_path.read_bytes()), io.BytesIO(),
                      EstargzOptions(prioritized_files=("etc", "no/such/file")), name="L1")


def test_missing_prioritized_files_can_be_skipped(layers: dict[str, TestLayer]) -> None:
    out = io.BytesIO()
    result = write_estargz(io.BytesIO(layers["changes"].tar_path.read_bytes()), out,
                           EstargzOptions(prioritized_files=("bin/busybox", "run/fifo"),
                                          require_prioritized=False))
    assert result.missing_prioritized == ("bin/busybox",)
    names = [e["name"] for e in parse_estargz(out.getvalue()).toc["entries"]]
    assert names[:3] == ["run/", "run/fifo", ".prefetch.landmark"]


def _tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_later_duplicate_wins(tmp_path: Path) -> None:
    tar = _tar((_info("a"), b"first version"), (_info("b"), b"b"), (_info("a"), b"second"))
    out = tmp_path / "dup.esgz"
    result = write_estargz(io.BytesIO(tar), open(out, "wb"), EstargzOptions())
    toc = parse_estargz(out.read_bytes()).toc
    assert [e["name"] for e in toc["entries"]] == [".no.prefetch.landmark", "b", "a"]
    with open_layer(out, result, tmp_path / "index") as view:
        assert view.read("a", 0, 100) == b"second"


def test_absolute_names_land_inside_the_layer_and_dotdot_is_refused(tmp_path: Path) -> None:
    # Like tar extraction: `/etc/x` is the layer's etc/x; crfs' readers refuse absolute
    # names in a TOC, so the writer must never put one there.
    tar = _tar((_info("/etc/x"), b"inside"), (_info("/etc/hard", tarfile.LNKTYPE, "/etc/x"), b""))
    out = tmp_path / "abs.esgz"
    result = write_estargz(io.BytesIO(tar), open(out, "wb"), EstargzOptions())
    names = [e["name"] for e in parse_estargz(out.read_bytes()).toc["entries"]]
    assert not any(n.startswith("/") for n in names)
    with open_layer(out, result, tmp_path / "index") as view:
        assert view.read("etc/hard", 0, 100) == b"inside"
    for bad in (_info("../escape"), _info("a/../../escape"), _info("ok", tarfile.LNKTYPE, "../x")):
        with pytest.raises(FormatError, match=r"'\.\.'"):
            write_estargz(io.BytesIO(_tar((_info("x"), b"x"), (bad, b"data"))), io.BytesIO(), EstargzOptions())


def test_prioritized_hardlink_cycle_and_deep_nesting_terminate(tmp_path: Path) -> None:
    deep = "/".join(["d"] * 1500)
    tar = _tar((_info("x", tarfile.LNKTYPE, "y"), b""), (_info("y", tarfile.LNKTYPE, "x"), b""),
               (_info(deep), b"deep"))
    out = io.BytesIO()
    write_estargz(io.BytesIO(tar), out, EstargzOptions(prioritized_files=("x", deep)))
    names = [e["name"] for e in parse_estargz(out.getvalue()).toc["entries"]]
    assert names == ["y", "x", deep, ".prefetch.landmark"]


def test_reconverting_an_estargz_blob_keeps_one_toc(layers: dict[str, TestLayer],
                                                    tmp_path: Path) -> None:
    first = tmp_path / "once.esgz"
    convert_file(layers["changes"].tar_path, first)
    twice = tmp_path / "twice.esgz"
    convert_file(first, twice, EstargzOptions(prioritized_files=("etc/.wh.motd",)))
    names = [e["name"] for e in parse_estargz(twice.read_bytes()).toc["entries"]]
    assert names.count(".no.prefetch.landmark") == 0 and names.count(".prefetch.landmark") == 1
    assert read_tar_entries(twice) == layers["changes"].entries


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad-crc"])
def test_bad_input_is_a_format_error_naming_the_layer(layers: dict[str, TestLayer],
                                                      damage: str) -> None:
    good = gzip.compress(layers["changes"].tar_path.read_bytes())
    bad = {"truncated": good[: len(good) // 2],
           "garbage": b"this is not a tar file at all" * 40,
           "bad-crc": good[:-8] + bytes(8)}[damage]
    with pytest.raises(FormatError, match="layer-7"):
        write_estargz(io.BytesIO(bad), io.BytesIO(), name="layer-7")


def test_non_utf8_names_are_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("bad-\udcff-name")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as out:
        out.addfile(info, io.BytesIO(b""))
    with pytest.raises(FormatError, match="not valid UTF-8"):
        write_estargz(io.BytesIO(tar.getvalue()), io.BytesIO(), name="L")


class _ZeroTar(io.RawIOBase):
    """A tar of one big file of zeros, generated as it is read (never all in memory)."""

    def __init__(self, size: int) -> None:
        info = tarfile.TarInfo("zeros")
        info.size = size
        self._parts = iter([info.tobuf(tarfile.PAX_FORMAT)])
        self._remaining = size + (-size % 512) + 1024
        self._current = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self._current:
            header = next(self._parts, None)
            if header is not None:
                self._current = header
            elif self._remaining:
                count = min(self._remaining, 1 << 20)
                self._remaining -= count
                self._current = bytes(count)
            else:
                return 0
        count = min(len(buffer), len(self._current))
        buffer[:count] = self._current[:count]
        self._current = self._current[count:]
        return count


def test_memory_stays_bounded_for_large_layers() -> None:
    size = 128 << 20
    sink = hashlib.sha256()

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            sink.update(data)
            return len(data)

    tracemalloc.start()
    try:
        result = write_estargz(io.BufferedReader(_ZeroTar(size)), Sink(),  # type: ignore[arg-type]
                               EstargzOptions(compression_level=1, workers=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.uncompressed_size > size
    # A few 4 MiB chunks in flight, never the layer.
    assert peak < 48 << 20, f"peak {peak / 2**20:.0f} MiB"
