"""Layer view: one verified seekable layer (stargz, eStargz, zstd:chunked).

`Layer.open` reads the footer and the TOC through the `BlobReader`, checks the TOC
against its digest, and builds (or reuses) the on-disk index; `read` then serves file
bytes that have been checked against their chunk digests before any of them is returned.

The network-facing part is separate so that a worker can fetch and cache chunks itself:

    plan = layer.chunks_for(path, offset, size)      # which chunks, which blob ranges
    ranges = layer.fetch_ranges(plan)                # coalesced [start, end) blob ranges
    data = layer.decode_chunk(chunk, raw)            # raw = blob[chunk.cstart:chunk.cend]

`decode_chunk` returns verified bytes only (VerificationError otherwise).

Trust: eStargz (and stargz-snapshotter's zstdchunked): sha256 of the uncompressed TOC
JSON must equal the layer's toc.digest; zstd:chunked: sha256 of the compressed TOC must
equal its manifest-checksum. Legacy stargz has no TOC digest: it is refused unless
`allow_unverified`; then files with a `digest` are verified whole before any byte is
served (`decode_chunk` of their single whole-file chunk), others are served as they are.
"""
from __future__ import annotations

import bisect
import errno
import gc
import hashlib
import io
import itertools
import os
import re
import stat as st
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import zstandard

from .blob import BlobReader
from .errors import FormatError, RegistryError, UnverifiableError, VerificationError
from .footer import (
    ESTARGZ_TOC_DIGEST,
    OLD_ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_CHECKSUM,
    Footer,
    read_footer,
)
from .index import ChunkRow, EntryStat, Index, make_builder
from .recent import Recent
from .toc import TocLimits, TocParser, TocSource, normalize_name

__all__ = ["Chunk", "EntryStat", "Layer", "LayerSource"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
COALESCE_GAP = 0  # merge only touching or overlapping compressed ranges
NEIGHBOUR_GAP = 64 << 10  # neighbouring chunks: tar headers (and little else) lie between
CACHED_FILES = 64            # files whose chunk rows a layer keeps for its readers
CACHED_ROWS_PER_FILE = 4096  # larger files are asked of the index at each read


@dataclass(frozen=True)
class LayerSource:
    """How to find and trust a layer."""

    blob: BlobReader
    toc_digest: str | None                 # eStargz toc.digest, or zstd:chunked manifest-checksum
    annotations: Mapping[str, str] = field(default_factory=dict)
    allow_unverified: bool = False


@dataclass(frozen=True)
class _FileRows:
    """A regular file as its reads need it; `rows` None: too many to keep (asked each time)."""

    ino: int
    stat: EntryStat
    rows: list[ChunkRow] | None
    offsets: list[int]  # each row's file offset, for bisect


@dataclass(frozen=True)
class Chunk:
    """A piece of a regular file that is fetched, decompressed and verified as a unit.

    `raw` for `decode_chunk` is `blob[cstart:cend]`. `zeros` chunks need no bytes
    (`cstart == cend` is not guaranteed: the frame exists, but need not be fetched).
    `parts` is set for a whole-file chunk (a file verified only by its whole-file digest):
    the members that make it up, each decoded from its own place in `raw`.
    `key` identifies the chunk's decoded bytes within the layer, for caches.
    """

    path: str
    ino: int
    offset: int
    size: int
    cstart: int
    cend: int
    inner: int
    digest: bytes | None
    zeros: bool = False
    parts: tuple[ChunkRow, ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        return (self.ino, self.offset)

    @property
    def needs_fetch(self) -> bool:
        return not self.zeros


def _check_digest(value: str, what: str, name: str) -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise FormatError(f"{name}: {what} {value!r} is not sha256:<64 lowercase hex digits>")
    return value


class Layer:
    """A verified layer. Create with `Layer.open`."""

    def __init__(self, source: LayerSource, index: Index, footer: Footer, toc_digest: str,
                 verified: bool, limits: TocLimits | None = None) -> None:
        self.source = source
        self.blob = source.blob
        self.name = source.blob.name
        self.index = index
        self.footer = footer
        self.format = footer.format
        self.toc_digest = toc_digest
        self.verified = verified
        self.allow_unverified = source.allow_unverified
        self.limits = limits or TocLimits()
        self._lock = threading.RLock()
        self._files: Recent[str, _FileRows] = Recent(CACHED_FILES)

    # ------------------------------------------------------------------ opening

    @staticmethod
    def expected_digests(source: LayerSource, fmt: str) -> tuple[str | None, str | None]:
        """(digest of the uncompressed TOC, digest of the compressed TOC) that vouch for it."""
        ann = source.annotations or {}
        name = source.blob.name
        plain = compressed = None
        if fmt == "zstd:chunked":
            compressed = source.toc_digest or ann.get(ZSTD_MANIFEST_CHECKSUM) or ann.get(
                OLD_ZSTD_MANIFEST_CHECKSUM)
        else:
            plain = source.toc_digest or ann.get(ESTARGZ_TOC_DIGEST)
            if fmt == "zstdchunked-estargz":
                compressed = ann.get(ZSTD_MANIFEST_CHECKSUM) or ann.get(OLD_ZSTD_MANIFEST_CHECKSUM)
        if plain is not None:
            plain = _check_digest(plain, "TOC digest", name)
        if compressed is not None:
            compressed = _check_digest(compressed, "TOC manifest-checksum", name)
        return plain, compressed

    @classmethod
    def open(cls, source: LayerSource, index_dir: Path, *, limits: TocLimits | None = None) -> "Layer":
        blob = source.blob
        footer = read_footer(blob, source.annotations or {})
        fmt = footer.format
        plain, compressed = cls.expected_digests(source, fmt)
        key = compressed if fmt == "zstd:chunked" else plain
        if key is None and not source.allow_unverified:
            what = "legacy stargz layer has no TOC digest" if fmt == "stargz" else \
                f"{fmt} layer comes with no TOC digest"
            raise UnverifiableError(
                f"{blob.name}: {what}: its contents cannot be verified (allow unverified "
                f"layers to use it anyway, or give the TOC digest)"
            )
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        if key is not None:
            cached = cls._cached(index_dir / f"{key[7:]}.sqlite", blob, footer)
            if cached is not None:
                return cls(source, cached, footer, key, verified=True, limits=limits)
        return cls._build(source, index_dir, footer, plain, compressed, key, limits)

    @staticmethod
    def _cached(path: Path, blob: BlobReader, footer: Footer) -> Index | None:
        if not path.exists():
            return None
        try:
            idx = Index(path, blob.name)
        except FormatError:
            return None
        m = idx.meta
        if (m.get("format"), m.get("blob_size"), m.get("toc_offset")) != (
            footer.format, blob.size, footer.toc_offset
        ):
            idx.close()
            return None
        return idx

    @classmethod
    def _build(cls, source: LayerSource, index_dir: Path, footer: Footer, plain: str | None,
               compressed: str | None, key: str | None, limits: TocLimits | None) -> "Layer":
        blob = source.blob
        limits = limits or TocLimits()
        toc = TocSource(blob, footer, limits)
        fd, tmp_name = tempfile.mkstemp(dir=index_dir, prefix=".build-", suffix=".sqlite")
        os.close(fd)
        tmp = Path(tmp_name)
        builder = None
        # The build allocates millions of short-lived containers and no cycles: the cyclic
        # GC would rescan the growing heap again and again (about a third of the time).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            tmp.unlink()
            try:
                pieces = toc.pieces()
                first = next(pieces, b"")
                # Large TOCs are indexed by a builder process (see index.make_builder).
                builder = make_builder(tmp, name=blob.name, fmt=footer.format,
                                       payload_end=footer.payload_end, json_size=toc.json_size,
                                       limits=limits)
                parser = TocParser(itertools.chain((first,), pieces), name=blob.name,
                                   payload_end=footer.payload_end, limits=limits)
                builder.add_all(parser.entries())
            except FormatError as e:
                # A tampered TOC is reported as such, not as whatever it broke.
                cls._verify(toc, blob.name, plain, compressed, cause=e)
                raise
            actual = cls._verify(toc, blob.name, plain, compressed)
            verified = key is not None
            digest = key if verified else actual
            assert digest is not None
            builder.finish({
                "format": footer.format, "blob_size": blob.size, "toc_offset": footer.toc_offset,
                "toc_digest": digest, "verified": int(verified),
            })
            builder = None
            final = index_dir / f"{digest[7:]}.sqlite"
            os.replace(tmp, final)
        except BaseException:
            if builder is not None:
                builder.abort()
            tmp.unlink(missing_ok=True)
            raise
        finally:
            toc.close()
            if gc_was_enabled:
                gc.enable()
        return cls(source, Index(final, blob.name), footer, digest, verified=verified, limits=limits)

    @staticmethod
    def _verify(toc: TocSource, name: str, plain: str | None, compressed: str | None,
                cause: Exception | None = None) -> str | None:
        """Check the TOC's digest(s); return the digest that names its index.

        With `cause` (the parse failed), only a digest mismatch is raised, chained to it.
        """
        actual = None
        if not toc.digest_is_compressed:
            actual = toc.digest()  # before compressed_digest(), which ends the TOC stream
            if plain is not None and actual is not None and actual != plain:
                raise VerificationError(
                    f"{name}: TOC does not match its digest {plain} (got {actual})") from cause
        if compressed is not None or toc.digest_is_compressed:
            actual_c = toc.compressed_digest()
            if compressed is not None and actual_c != compressed:
                raise VerificationError(
                    f"{name}: TOC does not match its manifest-checksum {compressed} "
                    f"(got {actual_c})") from cause
            if toc.digest_is_compressed:
                return actual_c
        if actual is None and cause is None:
            raise FormatError(f"{name}: TOC could not be read")
        return actual

    # ------------------------------------------------------------------ metadata

    @staticmethod
    def _norm(path: str) -> str:
        try:
            return normalize_name(path)
        except ValueError:
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", path) from None

    def _lookup(self, path: str) -> tuple[int, EntryStat]:
        norm = self._norm(path)
        with self._lock:
            return self.index.lookup(norm)

    def stat(self, path: str) -> EntryStat:
        return self._lookup(path)[1]

    def exists(self, path: str) -> bool:
        try:
            self._lookup(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def readdir(self, path: str) -> list[tuple[str, EntryStat]]:
        ino, s = self._lookup(path)
        if not st.S_ISDIR(s.mode):
            raise NotADirectoryError(errno.ENOTDIR, f"{self.name}: not a directory", path)
        with self._lock:
            return self.index.children(ino)

    def readlink(self, path: str) -> str:
        ino, s = self._lookup(path)
        if not st.S_ISLNK(s.mode):
            raise OSError(errno.EINVAL, f"{self.name}: not a symlink", path)
        with self._lock:
            return self.index.readlink(ino) or ""

    def listxattr(self, path: str) -> list[str]:
        ino, _ = self._lookup(path)
        with self._lock:
            return list(self.index.xattrs(ino))

    def getxattr(self, path: str, name: str) -> bytes:
        ino, _ = self._lookup(path)
        with self._lock:
            return self.index.xattrs(ino)[name]

    def walk(self) -> Iterator[tuple[str, EntryStat]]:
        return self.index.walk()

    def prefetch_range(self) -> tuple[int, int] | None:
        off = self.index.meta.get("prefetch_offset")
        return None if off is None else (0, int(off))

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Layer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ data

    def chunks_for(self, path: str, offset: int, size: int) -> list[Chunk]:
        """The chunks holding bytes [offset, offset+size) of the regular file at `path`.

        Raises IsADirectoryError / OSError(EINVAL) for non-regular files, and
        UnverifiableError for chunks nothing vouches for unless unverified data is allowed.
        """
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size", path)
        norm = self._norm(path)
        file = self._reading(norm, path)
        ino, s = file.ino, file.stat
        end = min(s.size, offset + size)
        if offset >= end:
            return []
        with self._lock:
            if file.rows is None:
                rows = self.index.chunks(ino, offset, end)
            else:  # the rows that overlap [offset, end), as Index.chunks selects them
                first = max(bisect.bisect_right(file.offsets, offset) - 1, 0)
                rows = file.rows[first:bisect.bisect_left(file.offsets, end)]
            if any(r.digest is None and not r.zeros for r in rows):
                fdigest = self.index.file_digest(ino)
                if fdigest is not None:
                    if s.size > self.limits.max_chunk_size:
                        # Verified whole means decoded whole, in memory: bounded.
                        raise UnverifiableError(
                            f"{self.name}: {norm}: file of {s.size} bytes can only be verified "
                            f"whole, and that is more than the limit of "
                            f"{self.limits.max_chunk_size} bytes decoded at once")
                    rows = self.index.chunks(ino)
                    return [Chunk(norm, ino, 0, s.size, min(r.cstart for r in rows),
                                  max(r.cend for r in rows), 0, fdigest, False, tuple(rows))]
                if not self.allow_unverified:
                    raise UnverifiableError(
                        f"{self.name}: {norm}: file data carries no digest to verify it against")
        return [Chunk(norm, ino, r.foff, r.size, r.cstart, r.cend, r.inner, r.digest, r.zeros)
                for r in rows]

    def _reading(self, norm: str, path: str) -> _FileRows:
        """The regular file's inode, stat and chunk rows, from a small cache: a reader asks
        for the same file thousands of times (the kernel reads 128 KiB at a time)."""
        file = self._files.get(norm)
        if file is not None:
            return file
        ino, s = self._lookup(norm)
        if st.S_ISDIR(s.mode):
            raise IsADirectoryError(errno.EISDIR, f"{self.name}: is a directory", path)
        if not st.S_ISREG(s.mode):
            raise OSError(errno.EINVAL, f"{self.name}: not a regular file", path)
        with self._lock:
            rows = self.index.chunks(ino) if s.size and self._few_chunks(ino) else None
            file = _FileRows(ino, s, rows, [r.foff for r in rows] if rows is not None else [])
        self._files.put(norm, file)
        return file

    def _few_chunks(self, ino: int) -> bool:
        """Whether a file's chunk rows are few enough to keep in memory."""
        return self.index.chunk_count(ino) <= CACHED_ROWS_PER_FILE

    def chunks_after(self, chunk: Chunk, end: int, gap: int = NEIGHBOUR_GAP) -> list[Chunk]:
        """The digested chunks that follow `chunk` in the blob and end by blob offset `end`:
        the rest of its file, then the files of its directory that come after it in TOC
        order (which is blob order), as long as each starts within `gap` bytes of the one
        before (tar headers lie between). For fetching neighbours along with a chunk;
        chunks nothing vouches for (no digest) and zeros chunks end the run, as does
        anything out of blob order (a TOC is untrusted: at worst this fetches `end` bytes
        that are then verified like any other)."""
        if chunk.parts:
            return []
        found: list[Chunk] = []
        last = chunk.cend
        for candidate in self._chunks_beside(chunk, forward=True):
            if candidate.zeros or candidate.digest is None or candidate.cend > end:
                break
            if not last <= candidate.cstart <= last + gap:
                break
            found.append(candidate)
            last = candidate.cend
        return found

    def chunks_before(self, chunk: Chunk, start: int, gap: int = NEIGHBOUR_GAP) -> list[Chunk]:
        """The mirror of `chunks_after`: the digested chunks that precede `chunk` in the
        blob and start at or after blob offset `start`, in blob order: the earlier chunks
        of its file, then the files of its directory that come before it in TOC order,
        as long as each ends within `gap` bytes of the one after it. Programs open a
        directory's files in their own order (python: import order), not the blob's, so
        a file's neighbours on both sides are likely next."""
        if chunk.parts:
            return []
        found: list[Chunk] = []
        first = chunk.cstart
        for candidate in self._chunks_beside(chunk, forward=False):
            if candidate.zeros or candidate.digest is None or candidate.cstart < start:
                break
            if not first - gap <= candidate.cend <= first:
                break
            found.append(candidate)
            first = candidate.cstart
        found.reverse()
        return found

    def _chunks_beside(self, chunk: Chunk, *, forward: bool) -> Iterator[Chunk]:
        """Chunks after `chunk` (or before it, nearest first): its file's, then those of the
        regular files beside it in its directory, up to the first entry of another one."""
        prefix = chunk.path.rpartition("/")[0]
        with self._lock:
            if forward:
                mine = [r for r in self.index.chunks(chunk.ino, chunk.offset + chunk.size)
                        if r.foff > chunk.offset]
            else:
                mine = self.index.chunks(chunk.ino, 0, chunk.offset)[::-1] if chunk.offset else []
        yield from (self._chunk(chunk.path, chunk.ino, r) for r in mine)
        for name, ino in self.index.data_files_beside(chunk.ino, forward=forward):
            path = f"{prefix}/{name}" if prefix else name
            with self._lock:
                rows = self.index.chunks(ino)
            yield from (self._chunk(path, ino, r) for r in (rows if forward else reversed(rows)))

    @staticmethod
    def _chunk(path: str, ino: int, r: ChunkRow) -> Chunk:
        return Chunk(path, ino, r.foff, r.size, r.cstart, r.cend, r.inner, r.digest, r.zeros)

    @staticmethod
    def fetch_ranges(chunks: list[Chunk], gap: int = COALESCE_GAP) -> list[tuple[int, int]]:
        """Blob ranges to fetch for `chunks`: overlapping or touching ranges merged."""
        spans = sorted((c.cstart, c.cend) for c in chunks if c.needs_fetch)
        out: list[list[int]] = []
        for a, b in spans:
            if out and a <= out[-1][1] + gap:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]

    def _inflate(self, raw: bytes, inner: int, size: int) -> bytes:
        want = inner + size
        if self.footer.is_zstd:
            # A decompressor per call: they must not be shared between threads, and
            # decode_chunk is called from the worker's threads concurrently.
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
            reader = dctx.stream_reader(io.BytesIO(raw), read_across_frames=False)
            parts, got = [], 0
            while got < want:
                # Bounded pieces: read(n) allocates n bytes up front, however short the frame.
                piece = reader.read(min(want - got, 4 << 20))
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
            out = b"".join(parts)
        else:
            d = zlib.decompressobj(31)
            out = d.decompress(raw, want)
        if len(out) < want:
            raise ValueError(f"decompresses to {len(out)} bytes, {want} expected")
        return out[inner:want] if inner else out

    def decode_chunk(self, chunk: Chunk, raw: bytes) -> bytes:
        """The chunk's bytes from its compressed `raw = blob[cstart:cend]`, verified.

        VerificationError (naming layer and path) if they do not match the chunk's digest.
        """
        if chunk.zeros:
            data = bytes(chunk.size)
        else:
            if len(raw) != chunk.cend - chunk.cstart:
                raise ValueError(f"{chunk.path}: got {len(raw)} raw bytes for a chunk of "
                                 f"{chunk.cend - chunk.cstart}")
            try:
                if chunk.parts:
                    pieces = []
                    for p in chunk.parts:
                        a = p.cstart - chunk.cstart
                        pieces.append(bytes(self._zero_or_inflate(p, raw[a:p.cend - chunk.cstart])))
                    data = b"".join(pieces)
                else:
                    data = self._inflate(raw, chunk.inner, chunk.size)
            except (zlib.error, zstandard.ZstdError, ValueError) as e:
                scope = "file" if chunk.parts else f"chunk at file offset {chunk.offset}"
                what = f"{self.name}: {chunk.path}: {scope} does not decode: {e}"
                if chunk.digest is not None:
                    raise VerificationError(what) from None
                raise FormatError(what) from None
        if chunk.digest is not None:  # zeros chunks without one are zeros by definition
            if hashlib.sha256(data).digest() != chunk.digest:
                scope = "file" if chunk.parts else f"chunk at file offset {chunk.offset}"
                raise VerificationError(
                    f"{self.name}: {chunk.path}: {scope} does not match its digest "
                    f"sha256:{chunk.digest.hex()}")
        elif not self.allow_unverified and not chunk.zeros:
            raise UnverifiableError(f"{self.name}: {chunk.path}: no digest to verify data against")
        return data

    def _zero_or_inflate(self, row: ChunkRow, raw: bytes) -> bytes:
        if row.zeros:
            return bytes(row.size)
        return self._inflate(raw, row.inner, row.size)

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file (short at its end), verified."""
        chunks = self.chunks_for(path, offset, size)
        if not chunks:
            return b""
        fetched: dict[tuple[int, int], bytes] = {}
        try:
            for a, b in self.fetch_ranges(chunks):
                fetched[(a, b)] = self.blob.read_range(a, b - a)
        except RegistryError as e:
            # The registry's message names the blob and the range; a reader wants the file.
            raise type(e)(f"{chunks[0].path}: {e}") from None
        ranges = sorted(fetched)
        out = []
        for c in chunks:
            raw = b""
            if c.needs_fetch:
                for a, b in ranges:
                    if a <= c.cstart and c.cend <= b:
                        buf = fetched[(a, b)]
                        raw = buf[c.cstart - a:c.cend - a]
                        break
            out.append(self.decode_chunk(c, raw))
        data = b"".join(out) if len(out) > 1 else out[0]
        start = offset - chunks[0].offset
        end = min(offset + size, chunks[-1].offset + chunks[-1].size) - chunks[0].offset
        return data[start:end]
