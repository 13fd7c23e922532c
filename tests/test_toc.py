"""TOC: streaming parse round trips, both schemas, and refusal of hostile input."""
from __future__ import annotations

import base64
import datetime
import json
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crfs_worker.errors import FormatError
from crfs_worker.footer import read_footer
from crfs_worker.toc import (
    TocEntry,
    TocLimits,
    TocParser,
    TocSource,
    normalize_name,
    parse_time_ns,
    parse_toc_bytes,
)
from tests import blobgen
from tests.blobgen import MemBlob

PAYLOAD_END = 10**9


def split_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in cuts + [len(data)]:
        if c > prev:
            out.append(data[prev:c])
        prev = c
    return out


def parse(data: bytes, pieces: list[bytes] | None = None, **kw) -> list[TocEntry]:
    return list(TocParser(pieces or [data], name="blob", payload_end=kw.pop("payload_end", PAYLOAD_END),
                          **kw).entries())


# ------------------------------------------------------------------ strategies

component = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1, max_size=10,
).filter(lambda s: s not in (".", ".."))
names = st.lists(component, min_size=1, max_size=4).map("/".join)
digests = st.binary(min_size=32, max_size=32)
uint32 = st.integers(0, 2**32 - 1)


@st.composite
def entry(draw):
    """(JSON dict, expected TocEntry)."""
    typ = draw(st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo"]))
    name = draw(names)
    prefix = draw(st.sampled_from(["", "./"]))  # absolute names are refused (test_hostile_toc.py)
    d: dict = {"name": prefix + name + ("/" if typ == "dir" and draw(st.booleans()) else ""), "type": typ}
    exp = dict(name=name, type=typ)
    perm = draw(st.integers(0, 0o7777))
    type_bits = draw(st.sampled_from([0, 0o100000, 0o40000]))
    d["mode"] = perm | type_bits
    exp["mode"] = perm
    for key, field in (("uid", "uid"), ("gid", "gid")):
        if draw(st.booleans()):
            d[key] = exp[field] = draw(uint32)
    secs = draw(st.integers(0, 4_000_000_000))
    nanos = draw(st.sampled_from([0, 1, 500_000_000, 123_456_789]))
    base = datetime.datetime.fromtimestamp(secs, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    d["modtime"] = base + (f".{nanos:09d}" if nanos else "") + "Z"
    exp["mtime_ns"] = secs * 10**9 + nanos
    if typ == "reg":
        size = draw(st.integers(0, 2**40))
        if size:
            d["size"] = exp["size"] = size
            d["offset"] = exp["offset"] = draw(st.integers(1, PAYLOAD_END - 1))
            if draw(st.booleans()):
                dg = draw(digests)
                d["digest"] = "sha256:" + dg.hex()
                exp["digest"] = dg
            cd = draw(digests)
            d["chunkDigest"] = "sha256:" + cd.hex()
            exp["chunk_digest"] = cd
            if draw(st.booleans()):
                d["innerOffset"] = exp["inner_offset"] = draw(st.integers(0, 2**20))
    if typ in ("symlink", "hardlink"):
        target = draw(names)
        d["linkName"] = target if typ == "hardlink" else draw(st.sampled_from(["../", "/", ""])) + target
        exp["link_name"] = target if typ == "hardlink" else d["linkName"]
    if typ in ("char", "block"):
        d["devMajor"] = exp["dev_major"] = draw(uint32)
        d["devMinor"] = exp["dev_minor"] = draw(uint32)
    if draw(st.booleans()):
        xs = draw(st.dictionaries(component, st.binary(max_size=40), max_size=3))
        if xs:
            d["xattrs"] = {k: base64.b64encode(v).decode() for k, v in xs.items()}
            exp["xattrs"] = xs
    if draw(st.booleans()):
        d["NumLink"] = draw(st.integers(0, 5))       # crfs's stray key
    if draw(st.booleans()):
        d["accesstime"] = d["modtime"]               # zstd:chunked extras
        d["userName"] = "root"
    return d, TocEntry(**exp)


# ------------------------------------------------------------------ round trips


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(entry(), max_size=25), indent=st.sampled_from([None, "\t", 2]),
       cuts=st.lists(st.integers(0, 10**6), max_size=12), extra_first=st.booleans())
def test_toc_round_trips_through_any_piece_split(items, indent, cuts, extra_first):
    doc: dict = {"version": 1, "entries": [d for d, _ in items]}
    if extra_first:
        doc = {"tarSplitDigest": "sha256:" + "0" * 64, **doc}
    data = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    got = parse(data, split_pieces(data, cuts))
    assert got == [e for _, e in items]


@given(cuts=st.lists(st.integers(0, 10**4), max_size=40))
def test_multibyte_names_split_anywhere(cuts):
    doc = {"version": 1, "entries": [{"name": "日本語/ファイル" + str(i), "type": "reg"} for i in range(30)]}
    data = json.dumps(doc, ensure_ascii=False).encode()
    assert [e.name for e in parse(data, split_pieces(data, cuts))] == [e["name"] for e in doc["entries"]]


def test_every_single_split_point():
    data = json.dumps({"version": 1, "entries": [
        {"name": "a", "type": "reg", "size": 12345, "offset": 7},
        {"name": "b/", "type": "dir", "modtime": "2020-01-02T03:04:05Z"}]}, indent="\t").encode()
    want = parse(data)
    for i in range(len(data) + 1):
        assert parse(data, [data[:i], data[i:]]) == want


def test_zstd_chunked_schema():
    dg = "sha256:" + "ab" * 32
    doc = {"version": 1, "tarSplitDigest": dg, "entries": [
        {"type": "reg", "name": "f", "mode": 420, "size": 300000, "modtime": "2023-05-06T07:08:09.987654321Z",
         "accesstime": "2023-05-06T07:08:09Z", "changetime": "2023-05-06T07:08:09Z",
         "digest": dg, "offset": 100, "endOffset": 900, "chunkSize": 100000, "chunkDigest": dg},
        {"type": "chunk", "name": "f", "offset": 300, "chunkSize": 150000, "chunkOffset": 100000,
         "chunkDigest": dg, "chunkType": "zeros"},
        {"type": "chunk", "name": "f", "offset": 500, "chunkSize": 50000, "chunkOffset": 250000,
         "chunkDigest": dg},
    ]}
    p = TocParser([json.dumps(doc).encode()], payload_end=10000)
    es = list(p.entries())
    assert p.tar_split_digest == dg and p.version == 1
    assert es[0].mtime_ns == 1683356889_987654321
    assert (es[0].end_offset, es[0].chunk_size, es[1].zeros, es[2].zeros) == (900, 100000, True, False)
    assert es[1].chunk_offset == 100000 and es[1].offset == 300


@pytest.mark.parametrize("raw,want", [
    ("./a/b", "a/b"), ("/a//b/", "a/b"), ("a/./b", "a/b"), ("./", ""), ("/", ""), (".", ""),
    ("a/b/.", "a/b"), ("..foo/.bar", "..foo/.bar"), (".wh..wh..opq", ".wh..wh..opq"),
])
def test_name_normalisation(raw, want):
    assert normalize_name(raw) == want


@pytest.mark.parametrize("raw", ["../x", "a/../../x", "a/..", "..", "a\x00b", "x/" + "y" * 256,
                                 "a/" * 2100, "\ud800"])
def test_name_refusals(raw):
    with pytest.raises(ValueError):
        normalize_name(raw)


@pytest.mark.parametrize("t,ns", [
    ("1970-01-01T00:00:00Z", 0), ("2000-01-01T00:00:00.5Z", 946684800_500000000),
    ("2000-01-01T02:00:00+02:00", 946684800 * 10**9),
    # outside 1677..2262 nanoseconds overflow 64 bits (SQLite, st_mtime): they saturate
    ("0001-01-01T00:00:00Z", -(2**63)), ("3000-01-01T00:00:00Z", 2**63 - 1),
])
def test_times(t, ns):
    assert parse_time_ns(t) == ns


# ------------------------------------------------------------------ hostile input


def doc_with(entry: dict) -> bytes:
    return json.dumps({"version": 1, "entries": [entry]}).encode()


@pytest.mark.parametrize("entry,msg", [
    ({"name": "../x", "type": "reg"}, r"'\.\.'"),
    ({"name": "a/../../etc/passwd", "type": "reg"}, r"'\.\.'"),
    ({"name": "a\x00b", "type": "reg"}, "NUL"),
    ({"name": "x", "type": "reg", "size": 2**63}, "size"),
    ({"name": "x", "type": "reg", "size": 2**62}, "size"),
    ({"name": "x", "type": "reg", "size": -1}, "size"),
    ({"name": "x", "type": "reg", "size": "12"}, "size"),
    ({"name": "x", "type": "reg", "offset": 2**63 - 1, "size": 5}, "offset"),
    ({"name": "x", "type": "reg", "uid": 2**32}, "uid"),
    ({"name": "x", "type": "char", "devMajor": -5}, "devMajor"),
    ({"name": "x", "type": "reg", "size": 5, "offset": PAYLOAD_END}, "past the payload"),
    ({"name": "x", "type": "reg", "size": 5, "offset": 10, "endOffset": PAYLOAD_END + 1}, "past the payload"),
    ({"name": "x", "type": "reg", "size": 5, "offset": 10, "endOffset": 10}, "not after"),
    ({"name": "x", "type": "reg", "size": 5, "chunkOffset": 3, "chunkSize": 3}, "outside the file"),
    ({"name": "x", "type": "socket"}, "unknown type"),
    ({"name": "x"}, "unknown type"),
    ({"type": "reg"}, "no name"),
    ({"name": 5, "type": "reg"}, "no name"),
    ({"name": "x", "type": "reg", "digest": "md5:abc"}, "digest"),
    ({"name": "x", "type": "reg", "chunkDigest": "sha256:" + "g" * 64}, "chunkDigest"),
    ({"name": "x", "type": "reg", "xattrs": {"user.a": "%%%"}}, "base64"),
    ({"name": "x", "type": "reg", "xattrs": {"": "AA=="}}, "xattr name"),
    ({"name": "x", "type": "reg", "xattrs": ["a"]}, "not an object"),
    ({"name": "x", "type": "reg", "modtime": "yesterday"}, "modtime"),
    ({"name": "x", "type": "reg", "modtime": "2020-13-01T00:00:00Z"}, "modtime"),
    ({"name": "x", "type": "symlink"}, "without a linkName"),
    ({"name": "x", "type": "hardlink", "linkName": "../../etc/shadow"}, "hardlink target"),
    ({"name": "x", "type": "symlink", "linkName": "a\x00b"}, "NUL"),
    ({"name": "x", "type": "reg", "chunkType": "holes"}, "chunkType"),
    ({"name": "", "type": "reg"}, "root"),
])
def test_hostile_entries_are_refused_naming_the_entry(entry, msg):
    with pytest.raises(FormatError, match=msg) as ei:
        parse(doc_with(entry))
    assert "blob" in str(ei.value)


def test_floats_are_refused():
    with pytest.raises(FormatError):
        parse(b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": 1.5}]}')


@pytest.mark.parametrize("data,msg", [
    (b"", "JSON"), (b"[]", "JSON"), (b'{"version": 2, "entries": []}', "version"),
    (b'{"entries": []}', "no version"), (b'{"version": 1, "entries": [1]}', "not an object"),
    (b'{"version": 1, "entries": []} x', "trailing"), (b'{"version": 1, "entries": [{"name": "a", "type": "reg"}',
                                                       "JSON"),
    (b'{"version": 1, "version": 1, "entries": []}', "twice"), (b'\xff\xfe{}', "UTF-8"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg"} {"name": "b", "type": "reg"}]}', "JSON"),
])
def test_malformed_documents_are_refused(data, msg):
    with pytest.raises(FormatError, match=msg):
        parse(data)


def test_limits_on_totals():
    many = json.dumps({"version": 1, "entries": [{"name": f"f{i}", "type": "reg"} for i in range(11)]}).encode()
    with pytest.raises(FormatError, match="more than 10 entries"):
        parse(many, limits=TocLimits(max_entries=10))
    big = json.dumps({"version": 1, "entries": [
        {"name": f"f{i}", "type": "reg", "size": 2**61, "offset": 5} for i in range(2)]}).encode()
    with pytest.raises(FormatError, match="add up"):
        parse(big, limits=TocLimits(max_total_size=2**61 + 1))


def test_deep_nesting_is_refused_not_crashing():
    data = b'{"version": 1, "entries": [{"name": "x", "type": "reg", "junk": ' + b"[" * 100000 + b"]" * 100000 + b"}]}"
    with pytest.raises(FormatError):
        parse(data)


def test_surrogate_names_are_refused():
    with pytest.raises(FormatError):
        parse(b'{"version": 1, "entries": [{"name": "a\\ud800b", "type": "reg"}]}')


# ------------------------------------------------------------------ TOC sources


def test_estargz_source_reads_the_tar_entry_and_hashes_it():
    b = blobgen.estargz([blobgen.reg("a", b"hello")])
    blob = MemBlob(b.data)
    src = TocSource(blob, read_footer(blob))
    assert b"".join(src.pieces()) == b.toc_json
    assert src.digest() == b.toc_digest


def test_zstd_source_digest_is_of_the_compressed_toc():
    b = blobgen.zstd_chunked([blobgen.reg("a", b"hello" * 100)])
    blob = MemBlob(b.data)
    src = TocSource(blob, read_footer(blob, b.annotations))
    assert b"".join(src.pieces()) == b.toc_json
    assert src.digest() == b.toc_digest


def _gzip_toc_blob(payload: bytes) -> bytes:
    from crfs_worker.footer import estargz_footer
    from tests.blobgen import Spec, _tar_header, _pad

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = z.compress(_tar_header(Spec("stargz.index.json", mode=0o444), size=len(payload)))
    member += z.compress(payload + _pad(len(payload)) + b"\0" * 1024) + z.flush()
    return b"\0" * 10 + member + estargz_footer(10)


def test_gzip_bomb_is_refused():
    data = _gzip_toc_blob(b'{"version": 1, "entries": []' + b" " * (8 << 20) + b"}")
    assert len(data) < 100_000
    blob = MemBlob(data)
    src = TocSource(blob, read_footer(blob), TocLimits(max_toc_bytes=1 << 20))
    with pytest.raises(FormatError, match="exceeds|more than"):
        b"".join(src.pieces())
    assert src.digest() is None


def test_zstd_bomb_is_refused_even_if_the_footer_lies():
    json_bytes = b'{"version": 1, "entries": []' + b" " * (8 << 20) + b"}"
    b = blobgen.zstd_chunked([blobgen.reg("a", b"x")], toc_hook=lambda toc: json_bytes)
    blob = MemBlob(b.data)
    with pytest.raises(FormatError, match="exceeds"):  # the footer tells the truth: refused up front
        TocSource(blob, read_footer(blob, {}), TocLimits(max_toc_bytes=1 << 20))
    f = read_footer(blob, {})
    from dataclasses import replace
    lying = replace(f, toc_uncompressed_length=100)
    src = TocSource(blob, lying, TocLimits(max_toc_bytes=1 << 20))
    with pytest.raises(FormatError, match="more than"):
        b"".join(src.pieces())


def test_truncated_and_garbage_toc_members():
    good = _gzip_toc_blob(b'{"version": 1, "entries": []}')
    blob = MemBlob(good[:10] + good[10:30] + good[-51:])  # member cut short, footer kept
    with pytest.raises(FormatError):
        b"".join(TocSource(blob, read_footer(blob)).pieces())
    b = blobgen.zstd_chunked([blobgen.reg("a", b"x")])
    data = bytearray(b.data)
    f = read_footer(MemBlob(b.data), b.annotations)
    data[f.toc_offset:f.toc_offset + 4] = b"JUNK"  # not a zstd frame any more
    with pytest.raises(FormatError, match="zstd"):
        b"".join(TocSource(MemBlob(bytes(data)), f).pieces())


def test_parse_toc_bytes_helper():
    assert parse_toc_bytes(b'{"version": 1, "entries": [{"name": "a", "type": "fifo"}]}') == [
        TocEntry("a", "fifo")]


def test_toc_tar_entry_behind_pax_and_other_entries():
    import io
    import tarfile
    from crfs_worker.footer import estargz_footer

    payload = b'{"version": 1, "entries": [{"name": "a", "type": "dir"}]}'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        other = tarfile.TarInfo("unrelated.txt")
        other.size = 3
        tf.addfile(other, io.BytesIO(b"abc"))
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(payload)
        ti.pax_headers = {"comment": "ünïcode makes a PAX header"}
        tf.addfile(ti, io.BytesIO(payload))
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    member = z.compress(buf.getvalue()) + z.flush()
    data = b"\0" * 10 + member + estargz_footer(10)
    blob = MemBlob(data)
    src = TocSource(blob, read_footer(blob))
    assert b"".join(src.pieces()) == payload and src.json_size == len(payload)
