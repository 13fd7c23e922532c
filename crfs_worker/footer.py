"""Footers: where a seekable layer keeps its TOC.

Four layouts are recognised, from the tail of the blob:

| format                  | footer | what it is                                                    |
| ----------------------- | ------ | ------------------------------------------------------------- |
| `zstd:chunked`          | 64     | containers/storage: LE64 fields + "GNUlInUx", in a skippable frame |
| `zstdchunked-estargz`   | 40     | stargz-snapshotter's older zstdchunked: LE64 x4 + "GnUlInUx"  |
| `estargz`               | 51     | empty gzip member, extra subfield "SG" = "%016xSTARGZ"        |
| `stargz`                | 47     | google/crfs: empty gzip member, raw extra "%016xSTARGZ"       |

For zstd:chunked the layer's `...zstd-chunked.manifest-position` annotation is
authoritative when present (containers/storage itself never reads the footer).

The encoders here are used by the eStargz writer (`estargz_footer`) and by tests.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

from .blob import BlobReader
from .errors import FormatError

STARGZ_FOOTER_SIZE = 47
ESTARGZ_FOOTER_SIZE = 51
ZSTD_CHUNKED_FOOTER_SIZE = 64
ZSTDCHUNKED_OLD_FOOTER_SIZE = 40

ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_CHUNKED_MAGIC = b"GNUlInUx"          # containers/storage, 64-byte footer
ZSTDCHUNKED_OLD_MAGIC = b"GnUlInUx"       # stargz-snapshotter, 40-byte footer
MANIFEST_TYPE_CRFS = 1

# Layer annotations.
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ZSTD_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
OLD_ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
OLD_ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
OLD_ZSTD_TARSPLIT_POSITION = "io.containers.zstd-chunked.tarsplit-position"

# The longest footer plus the skippable-frame header in front of a zstd:chunked one.
TAIL_SIZE = ZSTD_CHUNKED_FOOTER_SIZE + 8

# Offsets past this are absurd for any blob (and keep arithmetic far from 2**63).
MAX_OFFSET = 2**62

_GZIP_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"  # FLG=FEXTRA, MTIME 0, XFL 0, OS 255
_EMPTY_DEFLATE_AND_TRAILER = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True)
class Footer:
    """Where the TOC is, as one footer (or annotation) says.

    `toc_offset`: for gzip formats, the start of the gzip member holding the TOC tar entry;
    for zstd formats, the first byte of the zstd-compressed TOC (past the 8-byte
    skippable-frame header). `toc_length` is the compressed TOC length: for gzip formats it
    runs up to the footer. `payload_end` is where file data must end: chunk ranges lie in
    `[0, payload_end)`.
    """

    format: str
    footer_size: int
    toc_offset: int
    toc_length: int
    toc_uncompressed_length: int | None = None
    tarsplit_offset: int | None = None
    tarsplit_length: int | None = None
    tarsplit_uncompressed_length: int | None = None

    @property
    def is_zstd(self) -> bool:
        return self.format in ("zstd:chunked", "zstdchunked-estargz")

    @property
    def payload_end(self) -> int:
        # zstd: the TOC's skippable frame header sits just before toc_offset.
        return self.toc_offset - 8 if self.is_zstd else self.toc_offset


# ---------------------------------------------------------------------------- encoders


def stargz_footer(toc_offset: int) -> bytes:
    """google/crfs's 47-byte footer: an empty gzip member with a raw 22-byte extra field."""
    _check_offset(toc_offset)
    extra = b"%016xSTARGZ" % toc_offset
    return _GZIP_HEAD + struct.pack("<H", len(extra)) + extra + _EMPTY_DEFLATE_AND_TRAILER


def estargz_footer(toc_offset: int) -> bytes:
    """eStargz's 51-byte footer: an empty gzip member whose extra field has one "SG" subfield."""
    _check_offset(toc_offset)
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    return _GZIP_HEAD + struct.pack("<H", len(extra)) + extra + _EMPTY_DEFLATE_AND_TRAILER


def zstd_skippable_frame(data: bytes, magic_nibble: int = 0) -> bytes:
    """A zstd skippable frame (magic 0x184D2A5?) holding `data`."""
    if not 0 <= magic_nibble <= 15:
        raise ValueError("magic_nibble must be 0..15")
    return bytes([0x50 + magic_nibble]) + ZSTD_SKIPPABLE_MAGIC[1:] + struct.pack("<I", len(data)) + data


def zstd_chunked_footer(
    toc_offset: int,
    toc_length: int,
    toc_uncompressed_length: int,
    tarsplit_offset: int = 0,
    tarsplit_length: int = 0,
    tarsplit_uncompressed_length: int = 0,
    manifest_type: int = MANIFEST_TYPE_CRFS,
) -> bytes:
    """containers/storage's 64-byte footer data (callers wrap it in a skippable frame)."""
    for v in (toc_offset, toc_length, toc_uncompressed_length, tarsplit_offset,
              tarsplit_length, tarsplit_uncompressed_length):
        _check_offset(v)
    return struct.pack(
        "<7Q", toc_offset, toc_length, toc_uncompressed_length, manifest_type,
        tarsplit_offset, tarsplit_length, tarsplit_uncompressed_length,
    ) + ZSTD_CHUNKED_MAGIC


def zstdchunked_old_footer(toc_offset: int, toc_length: int, toc_uncompressed_length: int) -> bytes:
    """stargz-snapshotter's 40-byte zstdchunked footer data (wrapped in a skippable frame)."""
    for v in (toc_offset, toc_length, toc_uncompressed_length):
        _check_offset(v)
    return struct.pack("<4Q", toc_offset, toc_length, toc_uncompressed_length,
                       MANIFEST_TYPE_CRFS) + ZSTDCHUNKED_OLD_MAGIC


def _check_offset(v: int) -> None:
    if not isinstance(v, int) or v < 0 or v >= MAX_OFFSET:
        raise ValueError(f"offset/length out of range: {v!r}")


# ---------------------------------------------------------------------------- decoders


def _parse_gzip_footer(footer: bytes, name: str) -> int | None:
    """The TOC offset from a 47- or 51-byte gzip footer, or None if `footer` is not one."""
    size = len(footer)
    if size not in (STARGZ_FOOTER_SIZE, ESTARGZ_FOOTER_SIZE):
        return None
    if footer[:4] != b"\x1f\x8b\x08\x04":  # gzip, deflate, FLG == FEXTRA only
        return None
    (xlen,) = struct.unpack_from("<H", footer, 10)
    if 12 + xlen + len(_EMPTY_DEFLATE_AND_TRAILER) != size:
        return None
    extra = footer[12:12 + xlen]
    if size == ESTARGZ_FOOTER_SIZE:
        if extra[:2] != b"SG" or struct.unpack_from("<H", extra, 2)[0] != 22:
            return None
        payload = extra[4:]
    else:
        payload = extra
    if len(payload) != 22 or payload[16:] != b"STARGZ":
        return None
    hexpart = payload[:16]
    if any(c not in b"0123456789abcdefABCDEF" for c in hexpart):
        raise FormatError(f"{name}: stargz footer carries a malformed TOC offset {hexpart!r}")
    # The rest must be an empty deflate stream with a zero CRC and size: decode it to be sure.
    try:
        d = zlib.decompressobj(31)
        out = d.decompress(footer) + d.flush()
    except zlib.error as e:
        raise FormatError(f"{name}: stargz footer is not a valid gzip member: {e}") from None
    if out or not d.eof or d.unused_data:
        raise FormatError(f"{name}: stargz footer is not an empty gzip member")
    return int(hexpart, 16)


def parse_footer(tail: bytes, blob_size: int, name: str = "blob") -> Footer:
    """Identify and parse the footer at the end of `tail` (the blob's last bytes).

    `tail` should be the last `TAIL_SIZE` bytes (or the whole blob when smaller).
    Raises FormatError if no known footer is there or its numbers do not fit the blob.
    """
    if len(tail) > blob_size:
        raise ValueError("tail longer than the blob")
    if len(tail) >= ZSTD_CHUNKED_FOOTER_SIZE and tail[-8:] == ZSTD_CHUNKED_MAGIC:
        f = tail[-ZSTD_CHUNKED_FOOTER_SIZE:]
        off, clen, ulen, mtype, ts_off, ts_clen, ts_ulen = struct.unpack_from("<7Q", f, 0)
        if mtype != MANIFEST_TYPE_CRFS:
            raise FormatError(f"{name}: zstd:chunked footer has unknown manifest type {mtype}")
        footer = Footer("zstd:chunked", ZSTD_CHUNKED_FOOTER_SIZE, off, clen, ulen, ts_off, ts_clen, ts_ulen)
        _check_zstd_footer(footer, blob_size, name, frame_tail=tail)
        return footer
    if len(tail) >= ZSTDCHUNKED_OLD_FOOTER_SIZE and tail[-8:] == ZSTDCHUNKED_OLD_MAGIC:
        f = tail[-ZSTDCHUNKED_OLD_FOOTER_SIZE:]
        off, clen, ulen, mtype = struct.unpack_from("<4Q", f, 0)
        if mtype != MANIFEST_TYPE_CRFS:
            raise FormatError(f"{name}: zstdchunked footer has unknown manifest type {mtype}")
        footer = Footer("zstdchunked-estargz", ZSTDCHUNKED_OLD_FOOTER_SIZE, off, clen, ulen)
        _check_zstd_footer(footer, blob_size, name, frame_tail=tail)
        return footer
    for size, fmt in ((ESTARGZ_FOOTER_SIZE, "estargz"), (STARGZ_FOOTER_SIZE, "stargz")):
        if len(tail) < size:
            continue
        toc_offset = _parse_gzip_footer(tail[-size:], name)
        if toc_offset is None:
            continue
        if toc_offset >= blob_size - size:
            raise FormatError(
                f"{name}: {fmt} footer points at TOC offset {toc_offset}, past the blob "
                f"({blob_size} bytes)"
            )
        return Footer(fmt, size, toc_offset, blob_size - size - toc_offset)
    raise FormatError(
        f"{name}: no stargz, eStargz or zstd:chunked footer at the end of the blob "
        f"(is this a plain tar.gz layer?)"
    )


def _check_zstd_footer(footer: Footer, blob_size: int, name: str, frame_tail: bytes | None = None) -> None:
    what = "zstd:chunked" if footer.format == "zstd:chunked" else "zstdchunked"
    if footer.toc_offset < 8 or footer.toc_length <= 0:
        raise FormatError(f"{name}: {what} TOC position {footer.toc_offset}:{footer.toc_length} is invalid")
    limit = blob_size - footer.footer_size - 8
    if footer.toc_offset + footer.toc_length > limit:
        raise FormatError(
            f"{name}: {what} TOC [{footer.toc_offset}, {footer.toc_offset + footer.toc_length}) "
            f"runs past the blob's footer ({blob_size} bytes)"
        )
    if frame_tail is not None and len(frame_tail) >= footer.footer_size + 8:
        head = frame_tail[-footer.footer_size - 8:-footer.footer_size]
        if head != ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", footer.footer_size):
            raise FormatError(f"{name}: {what} footer is not inside a zstd skippable frame")


def _parse_position(value: str, key: str, name: str) -> tuple[int, int, int]:
    parts = value.split(":")
    if len(parts) != 4 or not all(p.isdigit() and p.isascii() for p in parts):
        raise FormatError(f"{name}: annotation {key}={value!r} is not OFFSET:LENGTH:UNCOMPRESSED:TYPE")
    off, clen, ulen, mtype = (int(p) for p in parts)
    if mtype != MANIFEST_TYPE_CRFS:
        raise FormatError(f"{name}: annotation {key} has unknown manifest type {mtype}")
    if max(off, clen, ulen) >= MAX_OFFSET:
        raise FormatError(f"{name}: annotation {key}={value!r} is out of range")
    return off, clen, ulen


def footer_from_annotations(annotations: Mapping[str, str], blob_size: int, name: str) -> Footer | None:
    """A zstd:chunked Footer from the manifest-position annotation, if there is one."""
    for key in (ZSTD_MANIFEST_POSITION, OLD_ZSTD_MANIFEST_POSITION):
        value = annotations.get(key)
        if value is not None:
            off, clen, ulen = _parse_position(value, key, name)
            footer = Footer("zstd:chunked", ZSTD_CHUNKED_FOOTER_SIZE, off, clen, ulen)
            if footer.toc_offset < 8 or footer.toc_length <= 0 or off + clen > blob_size:
                raise FormatError(f"{name}: annotation {key}={value!r} lies outside the blob ({blob_size} bytes)")
            return footer
    return None


def read_footer(blob: BlobReader, annotations: Mapping[str, str] | None = None) -> Footer:
    """Find the TOC of `blob`: the zstd:chunked position annotation wins, else the footer."""
    annotations = annotations or {}
    size = blob.size
    n = min(TAIL_SIZE, size)
    tail = blob.read_range(size - n, n) if n else b""
    error: FormatError | None = None
    try:
        footer: Footer | None = parse_footer(tail, size, blob.name)
    except FormatError as e:
        footer, error = None, e
    annotated = footer_from_annotations(annotations, size, blob.name)
    if footer is not None and footer.format == "zstdchunked-estargz":
        # stargz-snapshotter's variant also writes the old position annotation; its
        # footer says which layout the TOC has (eStargz entries), so keep the footer.
        if annotated is not None and (annotated.toc_offset, annotated.toc_length) != (
            footer.toc_offset, footer.toc_length
        ):
            raise FormatError(
                f"{blob.name}: zstdchunked footer and manifest-position annotation disagree"
            )
        return footer
    if annotated is not None:
        if footer is not None and footer.format == "zstd:chunked":
            # Keep the footer's tar-split numbers; the annotation decides where the TOC is.
            return Footer(
                "zstd:chunked", footer.footer_size, annotated.toc_offset, annotated.toc_length,
                annotated.toc_uncompressed_length, footer.tarsplit_offset,
                footer.tarsplit_length, footer.tarsplit_uncompressed_length,
            )
        return annotated
    if footer is None:
        assert error is not None
        raise error
    return footer
