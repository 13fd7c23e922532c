"""Fuzzing on a fixed budget: the footer parser, the TOC parser (and the index that makes
sense of it, and the layer reads on top) on mutated real TOCs, and the worker's IPC
frame decoder. The only acceptable outcomes are a clean result or a CrfsError subclass
(for the IPC decoder, also the peer hanging up mid-frame): no other exception, no hang,
and no byte served that the original layer did not hold.

Each test is bounded by `max_examples` (about 10 s each on two cores); HYPOTHESIS_PROFILE
is not consulted, so CI always runs the same budget.
"""
from __future__ import annotations

import functools
import itertools
import json
import random
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crfs_worker.errors import CrfsError, FormatError
from crfs_worker.footer import (
    OLD_ZSTD_MANIFEST_POSITION,
    ZSTD_CHUNKED_MAGIC,
    ZSTD_MANIFEST_POSITION,
    ZSTDCHUNKED_OLD_MAGIC,
    Footer,
    estargz_footer,
    parse_footer,
    read_footer,
    stargz_footer,
    zstd_skippable_frame,
)
from crfs_worker.index import IndexBuilder
from crfs_worker.ipc import MAX_FRAME, IpcError, encode_frame, recv_frame
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.toc import TocLimits, TocParser
from tests import blobgen
from tests.blobgen import MemBlob, Spec, dir_, hardlink, reg, symlink

FORMATS = ["stargz", "estargz", "zstd:chunked", "zstdchunked-estargz"]
FOOTER_FORMATS = {"stargz", "estargz", "zstd:chunked", "zstdchunked-estargz"}


def fuzz(examples: int) -> Any:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _specs() -> list[Spec]:
    rng = random.Random(11)
    return [
        dir_("etc", mode=0o755), reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        reg("big", rng.randbytes(40_000)),
        reg("holes", rng.randbytes(3000) + b"\0" * 5000 + rng.randbytes(100)),
        reg("a", b"a" * 100), reg("b", b"b" * 300), reg("empty", b""),
        symlink("lnk", "../../etc/passwd"), hardlink("hl", "a"),
        Spec("dev/null", "char", devmajor=1, devminor=3),
        reg("x/.wh..wh..opq", b""),
        reg("xa", b"x", xattrs={"user.k": b"\x00v", "security.capability": b"\x01"}),
    ]


@functools.cache
def real_blob(fmt: str) -> blobgen.Blob:
    kw: dict[str, Any] = {"chunk_size": 16 << 10}
    if fmt == "estargz":
        kw["min_chunk_size"] = 1024
    if fmt == "zstd:chunked":
        kw["zeros_min"] = 1024
    return blobgen.BUILDERS[fmt](_specs(), **kw)


# ------------------------------------------------------------------ footers


def _check_footer(footer: Footer, blob_size: int) -> None:
    assert footer.format in FOOTER_FORMATS
    assert 0 <= footer.toc_offset and 0 < footer.toc_length
    assert footer.toc_offset + footer.toc_length <= blob_size
    assert 0 <= footer.payload_end <= footer.toc_offset


def _parse_or_refuse(tail: bytes, blob_size: int) -> None:
    try:
        footer = parse_footer(tail, blob_size, "fuzz-blob")
    except FormatError as e:
        assert "fuzz-blob" in str(e)
        return
    _check_footer(footer, blob_size)


@fuzz(3000)
@given(tail=st.binary(max_size=80), extra=st.integers(0, 2**64))
def test_footer_parser_on_random_tails(tail: bytes, extra: int) -> None:
    _parse_or_refuse(tail, len(tail) + extra)


def _footer_tails() -> list[tuple[bytes, int]]:
    tails = [(real_blob(f).data[-72:], len(real_blob(f).data)) for f in FORMATS]
    tails += [(b"\0" * 30 + estargz_footer(5), 100), (b"\0" * 30 + stargz_footer(7), 100)]
    return tails


@fuzz(2000)
@given(which=st.integers(0, 5), edits=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=4),
       size_delta=st.integers(-80, 2**63), fields=st.lists(st.integers(0, 2**64 - 1), min_size=7, max_size=7),
       rewrite=st.sampled_from([None, "zstd", "old"]))
def test_footer_parser_on_mutated_real_footers(which: int, edits: list, size_delta: int, fields: list,
                                               rewrite: str | None) -> None:
    tail, size = _footer_tails()[which]
    data = bytearray(tail)
    if rewrite == "zstd":  # arbitrary 64-bit numbers in a well-formed frame
        data = bytearray(zstd_skippable_frame(struct.pack("<7Q", *fields[:3], 1, *fields[3:6]) + ZSTD_CHUNKED_MAGIC))
    elif rewrite == "old":
        data = bytearray(b"\0" * 24 + zstd_skippable_frame(struct.pack("<4Q", *fields[:3], 1) + ZSTDCHUNKED_OLD_MAGIC))
    for pos, value in edits:
        data[pos % len(data)] = value
    _parse_or_refuse(bytes(data), max(len(data), size + size_delta))


@fuzz(1500)
@given(which=st.sampled_from(["zstd:chunked", "zstdchunked-estargz", "estargz"]),
       key=st.sampled_from([ZSTD_MANIFEST_POSITION, OLD_ZSTD_MANIFEST_POSITION]),
       value=st.one_of(st.text(max_size=40),
                       st.lists(st.integers(-5, 2**64), min_size=1, max_size=5).map(
                           lambda xs: ":".join(map(str, xs)))))
def test_footer_annotations_on_random_values(which: str, key: str, value: str) -> None:
    b = real_blob(which)
    try:
        footer = read_footer(MemBlob(b.data, "fuzz-blob"), {key: value})
    except FormatError as e:
        assert "fuzz-blob" in str(e)
        return
    _check_footer(footer, len(b.data))


# ------------------------------------------------------------------ TOCs

NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.sampled_from(["../x", "/abs", "a\x00b", ".", "", "./", "sha256:" + "a" * 64,
                                           "zeros", "data", "2020-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z",
                                           "reg", "dir", "chunk", "hardlink", "symlink", "AA=="]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
KEYS = ["name", "type", "size", "mode", "uid", "gid", "modtime", "linkName", "devMajor", "devMinor",
        "xattrs", "digest", "offset", "endOffset", "innerOffset", "chunkOffset", "chunkSize",
        "chunkDigest", "chunkType", "NumLink"]


@st.composite
def structure_ops(draw: Any) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        # Plausible edits (a field off by a little, from the wrong entry) get past the open
        # checks more often than nasty values, and test the reads more.
        kind = draw(st.sampled_from(["set", "del", "dup", "swap", "drop", "top",
                                     "copy-field", "copy-field", "nudge", "nudge", "nudge"]))
        ops.append((kind, draw(st.integers(0, 10**6)), draw(st.sampled_from(KEYS)), draw(NASTY),
                    draw(st.integers(0, 10**6))))
    return ops


def apply_structure(doc: dict, ops: list[tuple]) -> dict:
    entries = doc["entries"]
    for kind, i, key, value, j in ops:
        if not entries:
            break
        e = entries[i % len(entries)]
        other = entries[j % len(entries)]
        if kind == "set":
            e[key] = value
        elif kind == "del":
            e.pop(key, None)
        elif kind == "dup":
            entries.insert(j % (len(entries) + 1), dict(e))
        elif kind == "swap":
            a, b = i % len(entries), j % len(entries)
            entries[a], entries[b] = entries[b], entries[a]
        elif kind == "drop":
            entries.remove(e)
        elif kind == "copy-field":  # a value of the right kind, from the wrong entry
            if key in other:
                e[key] = other[key]
        elif kind == "nudge":
            numbers = [k for k, v in e.items() if type(v) is int]
            if numbers:
                k = numbers[j % len(numbers)]
                e[k] += (i % 65) - 32 or 1
        else:
            doc[key if key in ("version", "entries") else "version"] = value
            if not isinstance(doc.get("entries"), list):
                break
    return doc


@st.composite
def mutated_toc(draw: Any) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(FORMATS))
    data = real_blob(fmt).toc_json
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "structure", "structure"]))
    if kind == "flip":
        buf = bytearray(data)
        for pos, x in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)),
                                    min_size=1, max_size=8)):
            buf[pos] ^= x
        data = bytes(buf)
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=20)) + data[pos + draw(st.integers(0, 20)):]
    else:
        doc = apply_structure(json.loads(data), draw(structure_ops()))
        data = json.dumps(doc, indent=draw(st.sampled_from([None, "\t"])),
                          ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return fmt, data


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


SMALL_LIMITS = TocLimits(max_entries=10_000, max_entry_bytes=1 << 20, max_chunk_size=1 << 20)


@fuzz(1200)
@given(toc=mutated_toc(), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_toc_parser_and_index_on_mutated_real_tocs(toc: tuple[str, bytes], cuts: list[int]) -> None:
    fmt, data = toc
    payload_end = len(real_blob(fmt).data) - 200
    parser = TocParser(_pieces(data, cuts), name="fuzz-layer", payload_end=payload_end, limits=SMALL_LIMITS)
    with tempfile.TemporaryDirectory() as tmp:
        builder = IndexBuilder(Path(tmp) / "i.sqlite", name="fuzz-layer", fmt=fmt, payload_end=payload_end,
                               limits=SMALL_LIMITS)
        try:
            builder.add_all(parser.entries())
            builder.finish({"format": fmt})
        except FormatError as e:
            builder.abort()
            assert "fuzz-layer" in str(e)


def _original_pieces(fmt: str) -> set[bytes]:
    """Every chunk's bytes and every whole file of the unmutated layer."""
    layer = _original_layer(fmt)
    out: set[bytes] = set(real_blob(fmt).files.values())
    for path, s in layer.walk():
        if s.mode & 0o170000 == 0o100000:
            for c in layer.chunks_for(path, 0, s.size):
                out.add(layer.read(path, c.offset, c.size))
    return out


@functools.cache
def _original_layer(fmt: str) -> Layer:
    b = real_blob(fmt)
    return Layer.open(LayerSource(MemBlob(b.data), b.toc_digest, b.annotations),
                      Path(tempfile.mkdtemp(prefix="crfs-fuzz-")))


@functools.cache
def _originals(fmt: str) -> tuple[bytes, ...]:
    return tuple(_original_pieces(fmt))


def _read_everything(layer: Layer, originals: tuple[bytes, ...]) -> int:
    """Reads every regular file chunk by chunk; returns how many chunks were served.
    Served bytes must be (a prefix of) a chunk or file the original layer held."""
    served = 0
    for path, s in layer.walk():
        if s.mode & 0o170000 != 0o100000:
            continue
        try:
            plan = layer.chunks_for(path, 0, s.size)
        except CrfsError:
            continue
        for c in plan:
            try:
                data = layer.read(path, c.offset, c.size)
            except CrfsError:
                continue
            if c.zeros and c.digest is None:
                assert data == bytes(len(data)), path
            else:
                assert any(o.startswith(data) for o in originals), f"{path}: bytes the layer never held"
            served += 1
    return served


@fuzz(400)
@given(fmt=st.sampled_from(["estargz", "zstd:chunked", "zstdchunked-estargz"]), ops=structure_ops())
def test_layers_from_mutated_tocs_serve_only_original_bytes(fmt: str, ops: list[tuple]) -> None:
    """The mutated TOC is what the blob vouches for (its digest matches): only the index
    checks and the chunk digests stand between it and the reader."""
    originals = _originals(fmt)
    hook = (lambda toc: json.dumps(apply_structure(toc, ops)).encode("utf-8", "surrogatepass"))
    kw: dict[str, Any] = {"chunk_size": 16 << 10, "toc_hook": hook}
    if fmt == "estargz":
        kw["min_chunk_size"] = 1024
    b = blobgen.BUILDERS[fmt](_specs(), **kw)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            layer = Layer.open(LayerSource(MemBlob(b.data, "fuzz-layer"), b.toc_digest, b.annotations),
                               Path(tmp), limits=SMALL_LIMITS)
        except CrfsError as e:
            assert "fuzz-layer" in str(e)
            return
        with layer:
            _read_everything(layer, originals)


def test_the_read_invariant_can_fail() -> None:
    """The check above is not vacuous: the original layer serves, foreign bytes fail it."""
    originals = _originals("estargz")
    assert _read_everything(_original_layer("estargz"), originals) > 5
    assert not any(o.startswith(b"root:x:0:0::/root:/bin/zsh") for o in originals)


# ------------------------------------------------------------------ the IPC frame decoder

MSGPACK_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
MESSAGES = st.dictionaries(st.text(max_size=10), MSGPACK_VALUES, max_size=6)


def _decode(data: bytes) -> dict | None:
    """recv_frame on exactly `data` from a peer that then hangs up: the map, or None when
    the peer hung up mid-frame. Anything but IpcError / ConnectionError fails the test."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        try:
            message, fds = recv_frame(b)
        except IpcError as e:
            assert str(e)
            return None
        except ConnectionError:
            return None
        assert isinstance(message, dict) and fds == []
        return message
    finally:
        a.close()
        b.close()


@fuzz(300)
@given(message=MESSAGES)
def test_ipc_frames_round_trip(message: dict) -> None:
    assert _decode(encode_frame(message)) == json.loads(json.dumps(message, default=list)) \
        if not _has_bytes(message) else _decode(encode_frame(message)) == message


def _has_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(_has_bytes(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bytes(v) for v in value)
    return False


@fuzz(1000)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda body: struct.pack(">I", len(body)) + body),
    st.tuples(MESSAGES, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
              st.integers(0, 10**6), st.booleans()).map(lambda t: _mutate_frame(*t)),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=50)).map(lambda t: struct.pack(">I", t[0]) + t[1]),
))
def test_ipc_decoder_on_hostile_bytes(data: bytes) -> None:
    decoded = _decode(data)
    if decoded is not None:
        (length,) = struct.unpack(">I", data[:4])
        assert 0 < length <= MAX_FRAME
        # compared packed: a NaN in the frame is not equal to itself
        expected = msgpack.unpackb(data[4:4 + length], raw=False)
        assert msgpack.packb(expected, use_bin_type=True) == msgpack.packb(decoded, use_bin_type=True)


def _mutate_frame(message: dict, edits: list, cut: int, truncate: bool) -> bytes:
    frame = bytearray(encode_frame(message))
    for pos, value in edits:
        frame[pos % len(frame)] = value
    return bytes(frame[:cut % (len(frame) + 1)] if truncate else frame)
