"""Footers: encode/parse round trips for all four layouts, detection, annotations."""
from __future__ import annotations

import gzip
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crfs_worker.errors import FormatError
from crfs_worker.footer import (
    ESTARGZ_FOOTER_SIZE,
    MAX_OFFSET,
    OLD_ZSTD_MANIFEST_POSITION,
    STARGZ_FOOTER_SIZE,
    ZSTD_MANIFEST_POSITION,
    estargz_footer,
    parse_footer,
    read_footer,
    stargz_footer,
    zstd_chunked_footer,
    zstd_skippable_frame,
    zstdchunked_old_footer,
)
from tests.blobgen import MemBlob

offsets = st.integers(min_value=0, max_value=2**40)


def test_estargz_footer_bytes_match_the_reference_layout():
    f = estargz_footer(0x1234)
    assert len(f) == ESTARGZ_FOOTER_SIZE
    assert f[:10] == bytes.fromhex("1f8b08040000000000ff")
    assert f[10:12] == b"\x1a\x00" and f[12:14] == b"SG" and f[14:16] == b"\x16\x00"
    assert f[16:38] == b"0000000000001234STARGZ"
    assert f[38:] == bytes.fromhex("010000ffff") + b"\0" * 8
    assert gzip.decompress(f) == b""  # a valid, empty gzip member


def test_stargz_footer_bytes_match_the_reference_layout():
    f = stargz_footer(0xABC)
    assert len(f) == STARGZ_FOOTER_SIZE
    assert f[10:12] == b"\x16\x00" and f[12:34] == b"0000000000000abcSTARGZ"
    assert gzip.decompress(f) == b""


@given(off=offsets, pad=st.binary(max_size=100))
def test_gzip_footers_round_trip(off, pad):
    for enc, fmt, size in ((estargz_footer, "estargz", 51), (stargz_footer, "stargz", 47)):
        blob_size = off + len(pad) + size + 1
        tail = (pad + enc(off))[-72:]
        f = parse_footer(tail, blob_size)
        assert (f.format, f.footer_size, f.toc_offset) == (fmt, size, off)
        assert f.toc_length == blob_size - size - off


@given(off=st.integers(8, 2**40), clen=st.integers(1, 2**30), ulen=st.integers(0, 2**30),
       ts=st.integers(0, 2**40))
def test_zstd_chunked_footer_round_trips(off, clen, ulen, ts):
    data = zstd_skippable_frame(zstd_chunked_footer(off, clen, ulen, ts, 5, 7))
    blob_size = off + clen + 8 + 72 + 10
    f = parse_footer(data, blob_size)
    assert (f.format, f.toc_offset, f.toc_length, f.toc_uncompressed_length) == (
        "zstd:chunked", off, clen, ulen)
    assert (f.tarsplit_offset, f.tarsplit_length, f.tarsplit_uncompressed_length) == (ts, 5, 7)
    assert f.payload_end == off - 8


@given(off=st.integers(8, 2**40), clen=st.integers(1, 2**30), ulen=st.integers(0, 2**30))
def test_old_zstdchunked_footer_round_trips(off, clen, ulen):
    data = zstd_skippable_frame(zstdchunked_old_footer(off, clen, ulen))
    f = parse_footer(data, off + clen + 48 + 10)
    assert (f.format, f.footer_size, f.toc_offset, f.toc_length, f.toc_uncompressed_length) == (
        "zstdchunked-estargz", 40, off, clen, ulen)


def test_zstd_footer_layout():
    raw = zstd_chunked_footer(1, 2, 3, 4, 5, 6)
    assert len(raw) == 64 and raw[-8:] == b"GNUlInUx"
    assert struct.unpack("<7Q", raw[:56]) == (1, 2, 3, 1, 4, 5, 6)
    old = zstdchunked_old_footer(1, 2, 3)
    assert len(old) == 40 and old[-8:] == b"GnUlInUx" and struct.unpack("<4Q", old[:32]) == (1, 2, 3, 1)


@pytest.mark.parametrize("tail", [b"", b"x" * 100, b"\x1f\x8b" + b"\0" * 60, gzip.compress(b"hello")])
def test_no_footer_is_a_format_error(tail):
    with pytest.raises(FormatError, match="no stargz"):
        parse_footer(tail, max(len(tail), 1))


def test_footer_offset_past_the_blob_is_refused():
    with pytest.raises(FormatError, match="past the blob"):
        parse_footer(estargz_footer(10_000), 100)
    data = zstd_skippable_frame(zstd_chunked_footer(50, 1000, 10))
    with pytest.raises(FormatError, match="past the blob"):
        parse_footer(data, 200)


def test_zstd_footer_with_wrong_manifest_type_is_refused():
    data = zstd_skippable_frame(zstd_chunked_footer(50, 10, 10, manifest_type=2))
    with pytest.raises(FormatError, match="manifest type"):
        parse_footer(data, 1000)


def test_corrupted_gzip_footer_is_refused():
    f = bytearray(estargz_footer(5))
    f[20] = ord("z")  # not a hex digit
    with pytest.raises(FormatError, match="malformed TOC offset"):
        parse_footer(bytes(f), 1000)


def test_encoders_refuse_out_of_range_offsets():
    for bad in (-1, MAX_OFFSET):
        with pytest.raises(ValueError):
            estargz_footer(bad)


def _zstd_blob(off=100, clen=20, ulen=30) -> bytes:
    body = b"\0" * (off - 8) + zstd_skippable_frame(b"t" * clen)
    return body + zstd_skippable_frame(zstd_chunked_footer(off, clen, ulen))


def test_manifest_position_annotation_is_authoritative():
    data = _zstd_blob()
    blob = MemBlob(data)
    assert read_footer(blob, {}).toc_offset == 100
    f = read_footer(blob, {ZSTD_MANIFEST_POSITION: "50:10:99:1"})
    assert (f.format, f.toc_offset, f.toc_length, f.toc_uncompressed_length) == ("zstd:chunked", 50, 10, 99)
    # the older key is honoured too, and works without any footer at all
    f = read_footer(MemBlob(b"\0" * 500), {OLD_ZSTD_MANIFEST_POSITION: "50:10:99:1"})
    assert f.toc_offset == 50 and f.format == "zstd:chunked"


@pytest.mark.parametrize("value", ["1:2:3", "a:b:c:1", "50:10:99:2", "590:100:1:1", "-1:2:3:1"])
def test_bad_manifest_position_annotation_is_refused(value):
    with pytest.raises(FormatError):
        read_footer(MemBlob(_zstd_blob() + b"\0" * 400), {ZSTD_MANIFEST_POSITION: value})


def test_read_footer_of_tiny_blobs():
    with pytest.raises(FormatError):
        read_footer(MemBlob(b""), {})
    with pytest.raises(FormatError):
        read_footer(MemBlob(b"abc"), {})


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_parse_footer_never_crashes_on_garbage(tail):
    try:
        parse_footer(tail, len(tail) + 1000)
    except FormatError:
        pass
