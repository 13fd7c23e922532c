"""TOC: a streaming, validating parse of a layer's table of contents (untrusted input).

The TOC of a layer with a million entries is hundreds of MB of JSON, so it is never
loaded whole: `TocSource` fetches the compressed TOC from the blob in pieces and
decompresses it with a bounded output (a decompression bomb is refused), hashing as it
goes; `TocParser` decodes one entry at a time from a sliding text buffer with the C JSON
scanner (`scan_once`, what `raw_decode` uses underneath) and turns each into a validated
`TocEntry`.

Validation (everything a hostile TOC could use against us is refused with a FormatError
naming the layer and the entry):
- names are normalised (leading `./` stripped, `//` and `.` collapsed, trailing `/`
  dropped); absolute names (and hardlink targets), `..` components, NUL bytes, lone
  surrogates, components over 255 bytes and paths over 4096 bytes are refused (no
  eStargz, stargz or zstd:chunked producer writes an absolute name; `./x` they do write);
- integers must be JSON integers in [0, 2**62) (uid/gid/devices < 2**32); JSON floats are
  refused anywhere; totals (entries, regular file bytes, TOC bytes) have limits, and so
  has the JSON text of one entry (a huge value would otherwise be rescanned as it grows);
- data offsets must lie inside the blob's payload (before the TOC);
- digests must be `sha256:` + 64 hex digits; xattr values must be valid base64;
- unknown keys are ignored (crfs writes a stray "NumLink"; zstd:chunked adds accesstime...).

Both the eStargz schema (innerOffset, chunk entries without endOffset) and the
zstd:chunked one (endOffset, chunkType "zeros", RFC3339Nano times, chunk fields on every
entry of a multi-chunk file) are accepted: the index step makes sense of the chunks.
"""
from __future__ import annotations

import binascii
import calendar
import codecs
import hashlib
import json
import queue
import re
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import zstandard

from .blob import BlobReader, stream_range
from .errors import FormatError
from .footer import Footer

TOC_TAR_NAME = "stargz.index.json"
MAX_INT = 2**62
MAX_ID = 2**32

ENTRY_TYPES = frozenset(("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"))


@dataclass(frozen=True)
class TocLimits:
    """Bounds on what an untrusted TOC may make us do. All are configurable."""

    max_toc_bytes: int = 1 << 30          # uncompressed TOC JSON (decompression-bomb bound)
    max_entries: int = 20_000_000
    max_total_size: int = 1 << 50         # sum of regular file sizes (1 PiB)
    max_xattr_value: int = 65536          # Linux XATTR_SIZE_MAX
    max_path: int = 4096                  # Linux PATH_MAX
    max_entry_bytes: int = 8 << 20        # JSON text of one entry (or other top-level value)
    max_chunk_size: int = 256 << 20       # bytes decoded as one unit (a chunk, a legacy file)
    # What the index builder holds in memory or resolves one at a time (index.py):
    max_dirs: int = 1_000_000
    max_hardlinks: int = 1_000_000
    max_duplicates: int = 100_000         # names given again by a later entry (60 us each)
    read_size: int = 8 << 20              # compressed bytes fetched per read_range call


class TocEntry(NamedTuple):
    """One TOC entry, validated. `name` is normalised ("" is the root directory).

    `mode` holds permission, setuid/setgid and sticky bits only: the file type is `type`.
    `link_name` is a symlink's target as written, or a hardlink's target path normalised.
    Digests are raw 32-byte sha256 values. `zeros` marks a zstd:chunked "zeros" chunk.

    A NamedTuple rather than a dataclass: a million of them are made per large TOC, and
    building a tuple costs half as much as a dataclass instance; the index step unpacks
    it in one operation instead of reading nineteen attributes.
    """

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] | None = None
    digest: bytes | None = None
    offset: int = 0
    end_offset: int = 0
    inner_offset: int = 0
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: bytes | None = None
    zeros: bool = False


_new_entry = tuple.__new__


# ------------------------------------------------------------------------ field helpers

_SEPARATOR = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Tar entries after the TOC's in its gzip member: end-of-archive blocks and the padding to
# a tar record (10 KiB); anything much larger is not a TOC member a producer wrote.
_TOC_MEMBER_TAIL = 64 * 1024
_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d\d):(\d\d))\Z"
)
_HEX64 = re.compile(r"sha256:([0-9a-fA-F]{64})\Z")
_MIN_NS, _MAX_NS = -(2**63), 2**63 - 1  # what st_mtime and SQLite can hold


def _is_clean_name(name: str) -> bool:
    """Whether normalize_name would return `name` as it is (the common case, checked
    without its splitting: the parse calls this for every entry)."""
    return not (not name or name[0] in "./" or name[-1] in "./" or "//" in name or "/." in name
                or "\x00" in name or len(name) > 255 or not name.isascii())


def normalize_name(name: str, max_path: int = 4096) -> str:
    """Clean a TOC path: strip leading "./" and "/", collapse "//" and "/./", drop a trailing "/".

    Raises ValueError (with the reason) for `..` components, NUL bytes, unencodable
    text, components over 255 bytes and paths over `max_path` bytes.
    """
    if not name or name[0] in "./" or name[-1] in "./" or "//" in name or "/." in name or "\x00" in name:
        if "\x00" in name:
            raise ValueError("contains a NUL byte")
        parts = []
        for p in name.split("/"):
            if p == "" or p == ".":
                continue
            if p == "..":
                raise ValueError("has a '..' component")
            parts.append(p)
        name = "/".join(parts)
    n = len(name)
    if n > 255 or not name.isascii():
        try:
            raw = name.encode()
        except UnicodeEncodeError:
            raise ValueError("is not valid UTF-8") from None
        n = len(raw)
        if n > 255 and any(len(p.encode()) > 255 for p in name.split("/")):
            raise ValueError("has a component over 255 bytes")
    if n > max_path:
        raise ValueError(f"is longer than {max_path} bytes")
    return name


def parse_time_ns(s: str) -> int:
    """RFC 3339 (with up to 9 fractional digits) to nanoseconds since the epoch."""
    m = _TIME.match(s)
    if m is None:
        raise ValueError(f"bad time {s!r}")
    y, mo, d, hh, mm, ss = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not (1 <= mo <= 12 and 1 <= d <= 31 and hh < 24 and mm < 60 and ss <= 60):
        raise ValueError(f"bad time {s!r}")
    secs = calendar.timegm((y, mo, d, hh, mm, ss, 0, 0, 0))
    if m.group(8):
        off = int(m.group(9)) * 3600 + int(m.group(10)) * 60
        secs -= off if m.group(8) == "+" else -off
    frac = m.group(7)
    ns = secs * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    # Nanoseconds since 1970 fit 64 bits only from 1677 to 2262; Go's zero time (year 1)
    # and far futures are real tar values, so they saturate rather than being refused.
    return min(max(ns, _MIN_NS), _MAX_NS)


def parse_digest(s: Any) -> bytes:
    """`sha256:<64 hex digits>` to 32 raw bytes (either case: the value is the same)."""
    if type(s) is not str:
        raise ValueError("is not a string")
    m = _HEX64.match(s)
    if m is None:
        raise ValueError(f"{s[:80]!r} is not sha256:<64 hex digits>")
    return bytes.fromhex(m.group(1))


def digest_str(raw: bytes) -> str:
    return "sha256:" + raw.hex()


def _refuse_float(s: str) -> Any:
    raise ValueError(f"non-integer number {s[:40]}")


# ------------------------------------------------------------------------ the TOC bytes


_END = object()
_LOW_WATER = 65536  # refill the parse buffer when less than this is left
_REFILL = 256 * 1024  # and then with at least this much


class _BlobRange:
    """File-like reader of `[start, end)` of a blob, in pieces, hashing what it reads.

    From a blob that streams ranges (a registry blob: `stream_range`), a range of at least
    STREAM_MIN bytes is read as ONE streamed range, handed on piece by piece as it
    arrives: the TOC is decompressed and parsed while the rest of it is still on the wire.
    Other ranges and blobs (local files) are read in `piece`-sized ranges. Reads may be
    short; b"" is the end."""

    STREAM_MIN = 64 << 10  # less is on the wire for a few ms: nothing to overlap

    def __init__(self, blob: BlobReader, start: int, end: int, piece: int, hasher: Any) -> None:
        self.blob, self.pos, self.end, self.piece, self.hasher = blob, start, end, piece, hasher
        self._streams = hasattr(blob, "stream_range") and end - start >= self.STREAM_MIN
        self._stream: Iterator[bytes] | None = None
        self._held = b""  # the part of a streamed piece not read yet

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.end:
            return b""
        if n < 0 or n > self.piece:
            n = self.piece
        n = min(n, self.end - self.pos)
        data = self._streamed(n) if self._streams else self.blob.read_range(self.pos, n)
        if not data:
            raise FormatError(f"{self.blob.name}: TOC range ended at {self.pos}, before {self.end}")
        self.pos += len(data)
        self.hasher.update(data)
        return data

    def _streamed(self, n: int) -> bytes:
        if not self._held:
            if self._stream is None:
                self._stream = stream_range(self.blob, self.pos, self.end - self.pos)
            self._held = next(self._stream, b"")
        data, self._held = self._held[:n], self._held[n:]
        return data

    def drain(self) -> None:
        while self.read():
            pass

    def close(self) -> None:
        """Ends a stream still open (the parse stopped early): its connection is given back."""
        if self._stream is not None:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
            self._stream = None


class TocSource:
    """The uncompressed TOC JSON of one blob, as a stream of byte pieces.

    Iterate `pieces()` once; then `digest()` gives the digest that vouches for this TOC in
    the layer's format (it reads whatever the parse left unread, within the same limits):
    sha256 of the uncompressed TOC JSON for stargz/eStargz/zstdchunked-estargz,
    sha256 of the compressed TOC for zstd:chunked.
    """

    OUT_PIECE = 1 << 20

    def __init__(self, blob: BlobReader, footer: Footer, limits: TocLimits | None = None) -> None:
        self.blob = blob
        self.footer = footer
        self.limits = limits or TocLimits()
        self.name = blob.name
        self._compressed = hashlib.sha256()
        self._plain = hashlib.sha256()
        self._raw = _BlobRange(blob, footer.toc_offset, footer.toc_offset + footer.toc_length,
                               self.limits.read_size, self._compressed)
        self._gen: Iterator[bytes] | None = None
        self.plain_bytes = 0
        self.failed = False   # the stream itself was refused (bomb, bad gzip/zstd, no TOC entry)
        # Size of the TOC JSON: known from the footer (zstd) or, for gzip formats, once the
        # first piece has arrived (from the TOC's tar header).
        self.json_size: int | None = footer.toc_uncompressed_length if footer.is_zstd else None
        if footer.is_zstd and footer.toc_uncompressed_length is not None:
            if footer.toc_uncompressed_length > self.limits.max_toc_bytes:
                raise FormatError(
                    f"{self.name}: TOC of {footer.toc_uncompressed_length} bytes exceeds the "
                    f"limit of {self.limits.max_toc_bytes} bytes"
                )

    @property
    def digest_is_compressed(self) -> bool:
        return self.footer.format == "zstd:chunked"

    def pieces(self) -> Iterator[bytes]:
        """The uncompressed TOC JSON, read and decompressed ahead by a background thread."""
        if self._gen is None:
            inner = self._zstd() if self.footer.is_zstd else self._gzip_tar()
            self._gen = self._guarded(self._background(inner))
        return self._gen

    def close(self) -> None:
        """Stop reading (ends the background reader thread and a streamed range)."""
        if self._gen is not None:
            self._gen.close()
        self._raw.close()

    def _background(self, gen: Iterator[bytes]) -> Iterator[bytes]:
        # zlib, zstd and hashlib release the GIL: decompressing and hashing the next
        # pieces overlaps with the JSON parse of this one.
        q: queue.Queue = queue.Queue(maxsize=8)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            try:
                for piece in gen:
                    if not put(piece):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer, which raises it
                put(e)

        t = threading.Thread(target=run, name="crfs-toc-reader", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join()

    def _guarded(self, gen: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from gen
        except FormatError:
            self.failed = True
            raise

    def digest(self) -> str | None:
        """Finish reading (as far as the digest needs) and return `sha256:<hex>`.

        None when the digest cannot be known because the stream itself was refused
        (for the uncompressed-JSON digest of gzip formats and zstdchunked-estargz).
        """
        if self.digest_is_compressed:
            return self.compressed_digest()
        if self.failed:
            return None
        try:
            for _ in self.pieces():
                pass
        except FormatError:
            return None
        return "sha256:" + self._plain.hexdigest()

    def compressed_digest(self) -> str:
        """sha256 of the compressed TOC bytes (reads the rest of them; ends `pieces()`)."""
        if self._gen is not None:
            self._gen.close()  # stops the reader thread before this thread reads the blob
        self._raw.drain()
        return "sha256:" + self._compressed.hexdigest()

    def _bomb(self) -> FormatError:
        return FormatError(
            f"{self.name}: TOC decompresses to more than {self.limits.max_toc_bytes} bytes "
            f"(decompression bomb?)"
        )

    def _emit(self, data: bytes) -> bytes:
        self.plain_bytes += len(data)
        if self.plain_bytes > self.limits.max_toc_bytes:
            raise self._bomb()
        declared = self.json_size
        if declared is not None and self.plain_bytes > declared:
            # Refused now, not at the end: the rest could be gigabytes.
            raise FormatError(f"{self.name}: TOC decompresses to more than the {declared} bytes "
                              f"its {'footer' if self.footer.is_zstd else 'tar header'} declares")
        self._plain.update(data)
        return data

    def _zstd(self) -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        reader = dctx.stream_reader(self._raw, read_size=min(self.limits.read_size, 1 << 20),
                                    read_across_frames=False)
        try:
            while True:
                data = reader.read(self.OUT_PIECE)
                if not data:
                    break
                yield self._emit(data)
        except zstandard.ZstdError as e:
            raise FormatError(f"{self.name}: TOC is not valid zstd: {e}") from None
        expected = self.footer.toc_uncompressed_length
        if expected is not None and expected != self.plain_bytes:
            raise FormatError(
                f"{self.name}: TOC decompressed to {self.plain_bytes} bytes, the footer "
                f"says {expected}"
            )

    def _gunzip(self) -> Iterator[bytes]:
        """The decompressed bytes of the gzip member holding the TOC tar entry (bounded)."""
        d = zlib.decompressobj(31)
        total = 0
        limit = self.limits.max_toc_bytes + 64 * 1024  # room for tar headers and padding
        try:
            while not d.eof:
                data = d.unconsumed_tail or self._raw.read()
                if not data:
                    # Input is exhausted, but inflate may still hold output (a match copy
                    # cut short by the output bound): drain it before calling it truncated.
                    out = d.decompress(b"", self.OUT_PIECE)
                    if not out:
                        raise FormatError(f"{self.name}: TOC gzip member is truncated")
                    total += len(out)
                    if total > limit:
                        raise self._bomb()
                    yield out
                    continue
                out = d.decompress(data, self.OUT_PIECE)
                total += len(out)
                if total > limit:
                    raise self._bomb()
                if out:
                    yield out
        except zlib.error as e:
            raise FormatError(f"{self.name}: TOC is not valid gzip: {e}") from None

    def _gzip_tar(self) -> Iterator[bytes]:
        """The content of the `stargz.index.json` tar entry in the TOC's gzip member."""
        src = _Pieces(self._gunzip())
        long_name: str | None = None
        pax_path: str | None = None
        while True:
            hdr = src.read_exact(512)
            if hdr is None or hdr == b"\0" * 512:
                raise FormatError(f"{self.name}: TOC gzip member holds no {TOC_TAR_NAME} entry")
            name, size, typeflag = _parse_tar_header(hdr, self.name)
            padded = (size + 511) & ~511
            if typeflag in (b"x", b"L"):
                if size > 1 << 20:
                    raise FormatError(f"{self.name}: oversized tar extended header in the TOC member")
                body = src.read_exact(padded)
                if body is None:
                    raise FormatError(f"{self.name}: TOC tar entry is truncated")
                body = body[:size]
                if typeflag == b"L":
                    long_name = body.rstrip(b"\0").decode("utf-8", "replace")
                else:
                    pax_path = _pax_path(body) or pax_path
                continue
            if typeflag == b"g":
                if src.skip(padded) is False:
                    raise FormatError(f"{self.name}: TOC tar entry is truncated")
                continue
            name = pax_path or long_name or name
            long_name = pax_path = None
            if typeflag in (b"0", b"\0") and name.lstrip("./") == TOC_TAR_NAME or name == TOC_TAR_NAME:
                if size > self.limits.max_toc_bytes:
                    raise self._bomb()
                self.json_size = size
                left = size
                while left:
                    piece = src.read_some(min(left, self.OUT_PIECE))
                    if piece is None:
                        raise FormatError(f"{self.name}: TOC tar entry is truncated")
                    left -= len(piece)
                    yield self._emit(piece)
                # Decode the rest of the member (tar padding and end blocks) so that its
                # CRC is checked: every byte of the TOC member is accounted for.
                tail = 0
                while (piece := src.read_some(self.OUT_PIECE)) is not None:
                    tail += len(piece)
                    if tail > _TOC_MEMBER_TAIL:
                        raise FormatError(f"{self.name}: TOC gzip member holds more than "
                                          f"{_TOC_MEMBER_TAIL} bytes after the TOC")
                return
            # Some other entry before the TOC: skip it (bounded by the member's size limit).
            if src.skip(padded) is False:
                raise FormatError(f"{self.name}: TOC tar entry is truncated")


class _Pieces:
    """Exact-size reads over an iterator of byte pieces."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self.it = it
        self.buf = b""

    def read_some(self, n: int) -> bytes | None:
        if not self.buf:
            self.buf = next(self.it, b"")
            if not self.buf:
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_exact(self, n: int) -> bytes | None:
        parts, need = [], n
        while need:
            p = self.read_some(need)
            if p is None:
                return None
            parts.append(p)
            need -= len(p)
        return b"".join(parts)

    def skip(self, n: int) -> bool:
        while n:
            p = self.read_some(min(n, 1 << 20))
            if p is None:
                return False
            n -= len(p)
        return True


def _parse_tar_header(hdr: bytes, blob_name: str) -> tuple[str, int, bytes]:
    def field(a: int, b: int) -> bytes:
        return hdr[a:b].split(b"\0", 1)[0]

    chksum = field(148, 156).strip(b" \0")
    try:
        want = int(chksum, 8) if chksum else -1
    except ValueError:
        want = -1
    got = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    if want != got:
        raise FormatError(f"{blob_name}: TOC tar header has a bad checksum")
    raw_size = hdr[124:136]
    if raw_size[0] & 0x80:  # GNU base-256
        size = int.from_bytes(raw_size[1:], "big")
    else:
        s = raw_size.split(b"\0", 1)[0].strip(b" ")
        try:
            size = int(s, 8) if s else 0
        except ValueError:
            raise FormatError(f"{blob_name}: TOC tar header has a bad size {s!r}") from None
    name = field(0, 100)
    if hdr[257:262] == b"ustar":
        prefix = field(345, 500)
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), size, hdr[156:157]


def _pax_path(body: bytes) -> str | None:
    path = None
    while body:
        sp = body.find(b" ")
        if sp <= 0:
            break
        try:
            n = int(body[:sp])
        except ValueError:
            break
        rec, body = body[sp + 1:n], body[n:]
        if n <= 0:
            break
        k, _, v = rec.rstrip(b"\n").partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "replace")
    return path


# ------------------------------------------------------------------------ the JSON parse


class TocParser:
    """Streams validated `TocEntry` values out of TOC JSON bytes.

    `entries()` yields them in TOC order; when it is exhausted the whole document has been
    checked (top-level object, `version` == 1) and `version` / `tar_split_digest` are set.
    `payload_end` is where file data must end in the blob (the TOC's start).
    """

    def __init__(
        self,
        pieces: Iterable[bytes],
        *,
        name: str = "blob",
        payload_end: int = MAX_INT,
        limits: TocLimits | None = None,
    ) -> None:
        self.name = name
        self.payload_end = payload_end
        self.limits = limits or TocLimits()
        self._it = iter(pieces)
        self._dec = codecs.getincrementaldecoder("utf-8")("strict")
        self._s = ""
        self._pos = 0
        self._eof = False
        decoder = json.JSONDecoder(parse_float=_refuse_float)
        self._scan = decoder.scan_once
        self.version: int | None = None
        self.tar_split_digest: str | None = None
        self.count = 0
        self.total_size = 0
        self._times: dict[str, int] = {}

    # -- buffer

    def _more(self) -> bool:
        """Append the next piece to the text buffer (dropping what was consumed)."""
        if self._eof:
            return False
        # Gather a good amount at once: each refill copies the unconsumed rest of the buffer,
        # and a value that straddles the end is scanned again from its start. Gathering at
        # least as much as is pending keeps both linear in the size of a large value.
        want = max(_REFILL, len(self._s) - self._pos)
        texts, got = [], 0
        try:
            while got < want:
                piece = next(self._it, None)
                if piece is None:
                    texts.append(self._dec.decode(b"", True))
                    self._eof = True
                    break
                texts.append(self._dec.decode(piece))
                got += len(piece)
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.name}: TOC is not valid UTF-8: {e.reason}") from None
        self._s = self._s[self._pos:] + "".join(texts)
        self._pos = 0
        return True

    def _skip_ws(self) -> str:
        """Skip whitespace; return the next character ("" at the end of input)."""
        while True:
            s = self._s
            # A regex, not a loop: a hostile TOC may hold a gigabyte of whitespace.
            pos = _WHITESPACE.match(s, self._pos).end()
            self._pos = pos
            if pos < len(s):
                return s[pos]
            if not self._more():
                return ""

    def _value(self) -> Any:
        """Decode one complete JSON value at the current position."""
        while True:
            s = self._s
            try:
                value, end = self._scan(s, self._pos)
            except (StopIteration, json.JSONDecodeError) as e:
                if len(s) - self._pos > self.limits.max_entry_bytes:
                    # Whether it is malformed or just huge, more text cannot make it usable.
                    what = e.msg if isinstance(e, json.JSONDecodeError) else "no value"
                    raise FormatError(f"{self.name}: TOC entry #{self.count} is not a JSON value "
                                      f"of at most {self.limits.max_entry_bytes} bytes ({what})") from None
                if self._more():
                    continue
                raise FormatError(f"{self.name}: TOC is not valid JSON near byte "
                                  f"{self._pos}: {e}") from None
            except (ValueError, RecursionError) as e:
                raise FormatError(f"{self.name}: TOC is malformed: {e}") from None
            if end == len(s) and not self._eof:
                # A number may continue in the next piece: decode again with more text.
                self._more()
                continue
            self._pos = end
            return value

    def _expect(self, chars: str, where: str) -> str:
        c = self._skip_ws()
        if c == "" or c not in chars:
            got = repr(c) if c else "end of input"
            raise FormatError(f"{self.name}: TOC is not valid JSON: expected {chars!r} {where}, got {got}")
        self._pos += 1
        return c

    # -- document

    def entries(self) -> Iterator[TocEntry]:
        self._expect("{", "at the start of the TOC")
        seen: set[str] = set()
        if self._skip_ws() == "}":
            self._pos += 1
        else:
            while True:
                if self._skip_ws() != '"':
                    raise FormatError(f"{self.name}: TOC is not valid JSON: expected a key")
                key = self._value()
                self._expect(":", f"after key {key!r}")
                self._skip_ws()
                if key in seen:
                    raise FormatError(f"{self.name}: TOC has the key {key!r} twice")
                seen.add(key)
                if key == "entries":
                    yield from self._entries()
                else:
                    value = self._value()
                    if key == "version":
                        if type(value) is not int or value != 1:
                            raise FormatError(f"{self.name}: unsupported TOC version {value!r}")
                        self.version = value
                    elif key == "tarSplitDigest":
                        if value is not None and type(value) is not str:
                            raise FormatError(f"{self.name}: TOC tarSplitDigest is not a string")
                        self.tar_split_digest = value
                if self._expect(",}", "between TOC keys") == "}":
                    break
        if self._skip_ws() != "":
            raise FormatError(f"{self.name}: TOC has trailing data after the JSON object")
        if self.version is None:
            raise FormatError(f"{self.name}: TOC has no version")

    def _entries(self) -> Iterator[TocEntry]:
        self._expect("[", "for the TOC entries")
        if self._skip_ws() == "]":
            self._pos += 1
            return
        convert = self._convert
        max_entries = self.limits.max_entries
        scan = self._scan
        sep = _SEPARATOR.match
        s, pos = self._s, self._pos
        low = len(s) - _LOW_WATER
        while True:
            if pos > low and not self._eof:
                # Top the buffer up before an entry can straddle its end: a failed scan
                # costs a JSONDecodeError, which counts the lines of the whole buffer.
                self._pos = pos
                self._more()
                s, pos = self._s, self._pos
                low = len(s) - _LOW_WATER
                continue
            # Fast path: a whole entry and the separator after it are in the buffer.
            try:
                d, end = scan(s, pos)
                m = sep(s, end)
                ok = m is not None and m.end() < len(s)
            except (StopIteration, json.JSONDecodeError, ValueError, RecursionError):
                ok = False
            if not ok:
                self._pos = pos
                d = self._value()
                s, end = self._s, self._pos
                c = self._skip_ws()
                s = self._s
                if c == ",":
                    self._pos += 1
                    self._skip_ws()
                    m = None
                elif c == "]":
                    self._pos += 1
                    m = False
                else:
                    raise FormatError(f"{self.name}: TOC is not valid JSON: expected ',' or ']' "
                                      f"after entry #{self.count}")
                s = self._s
                low = len(s) - _LOW_WATER
                nxt = self._pos
            else:
                nxt = m.end()
            if type(d) is not dict:
                raise FormatError(f"{self.name}: TOC entry #{self.count} is not an object")
            if self.count >= max_entries:
                raise FormatError(f"{self.name}: TOC has more than {max_entries} entries")
            e = convert(d)
            self.count += 1
            yield e
            if m is False:
                return
            pos = nxt

    # -- one entry

    def _bad(self, d: dict, what: str) -> FormatError:
        name = d.get("name")
        label = repr(name[:200]) if type(name) is str else f"#{self.count}"
        return FormatError(f"{self.name}: TOC entry {label}: {what}")

    def _convert(self, d: dict) -> TocEntry:
        get = d.get
        typ = get("type")
        name = get("name")
        if type(typ) is not str or typ not in ENTRY_TYPES:  # (a list is not even hashable)
            raise self._bad(d, f"has unknown type {str(typ)[:40]!r}")
        if type(name) is not str:
            raise self._bad(d, "has no name")
        # normalize_name only when needed: a clean name is kept as it is, and so is one
        # of the names tar writes ("./usr/bin/", "./etc/passwd") once "./" (and a
        # directory's "/") is off.
        if name[:2] == "./":
            bare = name[2:-1] if name[-1] == "/" else name[2:]
            if _is_clean_name(bare):
                name = bare
        if not _is_clean_name(name):
            if name[:1] == "/":
                raise self._bad(d, "name is an absolute path (layer names are relative)")
            try:
                name = normalize_name(name, self.limits.max_path)
            except ValueError as e:
                raise self._bad(d, f"name {e}") from None
            if name == "" and typ != "dir":
                raise self._bad(d, f"is the root but has type {typ!r}")

        size = get("size", 0)
        mode = get("mode", 0)
        uid = get("uid", 0)
        gid = get("gid", 0)
        offset = get("offset", 0)
        end_offset = get("endOffset", 0)
        inner = get("innerOffset", 0)
        coff = get("chunkOffset", 0)
        csize = get("chunkSize", 0)
        major = get("devMajor", 0)
        minor = get("devMinor", 0)
        try:
            # Non-negative and below the bound <=> no bit at or above it (negatives have all).
            bad = ((size | mode | offset | end_offset | inner | coff | csize) >> 62
                   or (uid | gid | major | minor) >> 32)
        except TypeError:
            bad = True
        if bad:
            for key, v, top in (("size", size, MAX_INT), ("mode", mode, MAX_INT), ("uid", uid, MAX_ID),
                                ("gid", gid, MAX_ID), ("offset", offset, MAX_INT),
                                ("endOffset", end_offset, MAX_INT), ("innerOffset", inner, MAX_INT),
                                ("chunkOffset", coff, MAX_INT), ("chunkSize", csize, MAX_INT),
                                ("devMajor", major, MAX_ID), ("devMinor", minor, MAX_ID)):
                if type(v) is not int or not 0 <= v < top:
                    raise self._bad(d, f"{key} {str(v)[:40]} is not an integer in [0, {top})")

        if offset or end_offset:
            # Data ranges: inside the payload, i.e. before the TOC.
            pe = self.payload_end
            if offset >= pe or end_offset > pe:
                raise self._bad(d, f"data range [{offset}, {end_offset or offset}) lies past the "
                                   f"payload's end {pe}")
            if end_offset and end_offset <= offset:
                raise self._bad(d, f"endOffset {end_offset} is not after offset {offset}")

        t = get("modtime")
        if type(t) is str and t:
            mtime = self._times.get(t)
            if mtime is None:
                mtime = self._time(d, t)
        elif t:
            raise self._bad(d, f"modtime {str(t)[:40]!r} is not an RFC 3339 time")
        else:
            mtime = 0

        link = get("linkName", "")
        if link or typ == "hardlink" or typ == "symlink":
            link = self._link(d, typ, link)

        xattrs = get("xattrs")
        if xattrs:
            xattrs = self._xattrs(d, xattrs)
        else:
            xattrs = None

        digest = get("digest")
        cdigest = get("chunkDigest")
        if digest:
            if cdigest:
                if cdigest == digest:  # one chunk: the same digest twice
                    digest = cdigest = self._digest(d, "digest", digest)
                else:
                    digest = self._digest(d, "digest", digest)
                    cdigest = self._digest(d, "chunkDigest", cdigest)
            else:
                digest = self._digest(d, "digest", digest)
                cdigest = None
        else:
            digest = None
            cdigest = self._digest(d, "chunkDigest", cdigest) if cdigest else None
        ctype = get("chunkType")
        zeros = False
        if ctype:
            if ctype == "zeros":
                zeros = True
            elif ctype != "data":
                raise self._bad(d, f"has unknown chunkType {str(ctype)[:40]!r}")

        if typ == "reg":
            self.total_size += size
            if self.total_size > self.limits.max_total_size:
                raise self._bad(d, f"regular files add up to more than {self.limits.max_total_size} bytes")
            if coff or csize:
                if coff >= size > 0 or coff + csize > size:
                    raise self._bad(d, f"chunk [{coff}, +{csize}) lies outside the file's {size} bytes")

        return _new_entry(TocEntry, (name, typ, size, mode & 0o7777, uid, gid, mtime, link, major,
                                     minor, xattrs, digest, offset, end_offset, inner, coff, csize,
                                     cdigest, zeros))

    def _time(self, d: dict, t: Any) -> int:
        try:
            mtime = parse_time_ns(t) if type(t) is str else None
        except ValueError:
            mtime = None
        if mtime is None:
            raise self._bad(d, f"modtime {str(t)[:40]!r} is not an RFC 3339 time")
        if len(self._times) > 65536:
            self._times.clear()
        self._times[t] = mtime
        return mtime

    def _digest(self, d: dict, key: str, value: Any) -> bytes:
        # The common case in a few C calls; anything odd goes through the strict parser.
        # (fromhex skips whitespace, but then 64 characters cannot make 32 bytes.)
        if type(value) is str and len(value) == 71 and value.startswith("sha256:"):
            try:
                raw = bytes.fromhex(value[7:])
            except ValueError:
                raw = b""
            if len(raw) == 32:
                return raw
        try:
            return parse_digest(value)
        except ValueError as e:
            raise self._bad(d, f"{key} {e}") from None

    def _link(self, d: dict, typ: str, link: Any) -> str:
        if not link:
            if typ == "hardlink" or typ == "symlink":
                raise self._bad(d, f"is a {typ} without a linkName")
            return ""
        if type(link) is not str:
            raise self._bad(d, "linkName is not a string")
        if typ == "hardlink":
            if link[0] == "/":
                raise self._bad(d, "hardlink target is an absolute path (layer names are relative)")
            try:
                link = normalize_name(link, self.limits.max_path)
            except ValueError as e:
                raise self._bad(d, f"hardlink target {e}") from None
            if link == "":
                raise self._bad(d, "is a hardlink to the root")
        elif "\x00" in link or len(link) > self.limits.max_path or not (link.isascii() or _utf8_ok(link)):
            raise self._bad(d, "linkName has a NUL byte, is too long or not UTF-8")
        return link

    def _xattrs(self, d: dict, xattrs: Any) -> dict[str, bytes]:
        if type(xattrs) is not dict:
            raise self._bad(d, "xattrs is not an object")
        out = {}
        for k, v in xattrs.items():
            if not k or "\x00" in k or len(k) > 255 or not (k.isascii() or _utf8_ok(k)):
                raise self._bad(d, f"xattr name {k[:60]!r} is empty, too long or has a NUL byte")
            if type(v) is not str:
                raise self._bad(d, f"xattr {k!r} is not a base64 string")
            try:
                raw = binascii.a2b_base64(v, strict_mode=True) if v else b""
            except (binascii.Error, ValueError):
                raise self._bad(d, f"xattr {k!r} is not valid base64") from None
            if len(raw) > self.limits.max_xattr_value:
                raise self._bad(d, f"xattr {k!r} is larger than {self.limits.max_xattr_value} bytes")
            out[k] = raw
        return out


def _utf8_ok(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_toc_bytes(data: bytes, *, name: str = "blob", payload_end: int = MAX_INT,
                    limits: TocLimits | None = None) -> list[TocEntry]:
    """Convenience for tests and small TOCs: all entries of a whole TOC JSON document."""
    return list(TocParser([data], name=name, payload_end=payload_end, limits=limits).entries())
