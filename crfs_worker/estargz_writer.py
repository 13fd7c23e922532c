"""Tar stream -> eStargz blob.

Layout written (stargz-snapshotter's docs/estargz.md, as ctr-remote writes it):
every non-empty regular file's payload, and every further chunk of a big file,
starts a new gzip member; tar headers and padding ride in the member before.
The TOC (`stargz.index.json`) is the last tar entry, alone in its own member
with the tar end-of-archive blocks, followed by the 51-byte eStargz footer.

Members are independent gzip streams, so they are compressed in parallel by a
thread pool (zlib releases the GIL); offsets are only known once compressed,
so the TOC is assembled last from member indexes.
"""
from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import zstandard

from .errors import CrfsError, FormatError
from .footer import estargz_footer

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"
DEFAULT_CHUNK_SIZE = 4 << 20
# zlib level 6, not ctr-remote's 9: measured on two 175-220 MB layers, level 6
# output is still 0.3-2.4% smaller than ctr-remote's (Go's level 9) at 1/4 of its
# CPU, while zlib's level 9 costs 2-3x more CPU for 0.3-0.5% less size.
DEFAULT_COMPRESSION_LEVEL = 6

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
# Members are handed to the pool in batches of about this many input bytes, so
# layers of many tiny files do not pay one task per file.
_BATCH_BYTES = 1 << 20
_TAR_BUFSIZE = 64 << 10  # tarfile copies its buffer per header read: keep it small
_COPY_BYTES = 1 << 20


class PrioritizedFileNotFoundError(CrfsError):
    """A file asked to be prioritized is not in the layer."""


@dataclass(frozen=True)
class EstargzOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    # Files to put first (with parent dirs), in access order; empty means
    # "no prefetch" (a `.no.prefetch.landmark` first).
    prioritized_files: tuple[str, ...] = ()
    # False: prioritized files the layer lacks are skipped (and reported in the
    # result), as when one list serves every layer of an image.
    require_prioritized: bool = True
    # Compression threads; 1 compresses inline.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Where to spool the tar when reordering for prioritized files.
    spool_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, not {self.chunk_size}")
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"gzip level must be 0..9, not {self.compression_level}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, not {self.workers}")


@dataclass(frozen=True)
class EstargzResult:
    blob_digest: str        # sha256 of the eStargz blob
    blob_size: int
    toc_digest: str         # sha256 of the uncompressed TOC JSON
    diff_id: str            # sha256 of the uncompressed tar written
    uncompressed_size: int  # size of that tar
    toc_offset: int         # where the TOC's gzip member starts
    missing_prioritized: tuple[str, ...] = ()  # prioritized files not in this layer


def _inside_layer(name: str, what: str, where: str) -> str:
    """As tar extraction does: `/a` means `a` in the layer; `..` that climbs out is refused
    (crfs' readers refuse both in a TOC, so the writer must not produce them)."""
    if ".." in name.split("/"):
        raise FormatError(f"{where}: {what} {name!r} has a '..' component")
    return name.lstrip("/") or "./"


def clean_entry_name(name: str) -> str:
    """`./a//b/`, `/a/b`, `../a/b` -> `a/b`; the root is ``."""
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


# --- reading the input -----------------------------------------------------


def open_tar_stream(source: BinaryIO) -> BinaryIO:
    """Decompress `source` (gzip, zstd or plain tar), sniffed by magic bytes."""
    buffered = source if isinstance(source, io.BufferedReader) else io.BufferedReader(
        _RawAdapter(source), _COPY_BYTES)
    magic = buffered.peek(4)[:4]
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]
            buffered, read_across_frames=True, closefd=False)
    return buffered


class _RawAdapter(io.RawIOBase):
    """Lets io.BufferedReader (for peek) wrap any object with read()."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass
class _InputEntry:
    info: tarfile.TarInfo
    read: Callable[[int], bytes]  # payload reader (regular files only)


def _stream_entries(tar: tarfile.TarFile) -> Iterator[_InputEntry]:
    """Entries in tar order without keeping them: TarFile.members would grow
    by one TarInfo per entry, and layers can hold millions."""
    while True:
        info = tar.next()
        tar.members.clear()
        if info is None:
            return
        if not _is_reserved(info):
            yield _payload_entry(tar, info)


def _payload_entry(tar: tarfile.TarFile, info: tarfile.TarInfo) -> _InputEntry:
    reader = tar.extractfile(info) if info.isreg() else None
    return _InputEntry(info, reader.read if reader else _no_payload)


def _no_payload(size: int) -> bytes:
    return b""


def _is_reserved(info: tarfile.TarInfo) -> bool:
    """Entries the writer makes itself; an input that is already (e)stargz has them."""
    return clean_entry_name(info.name) in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)


@dataclass(frozen=True)
class _Order:
    first: list[tarfile.TarInfo]   # prioritized files, after their parents and link targets
    rest: list[tarfile.TarInfo]    # everything else, in tar order
    missing: tuple[str, ...]       # prioritized paths the layer lacks


def _prioritized_order(members: list[tarfile.TarInfo], options: EstargzOptions,
                       layer: str) -> _Order:
    """Reorders for prioritized files. A later duplicate replaces an earlier one."""
    by_name: dict[str, tarfile.TarInfo] = {}
    for info in members:
        by_name.pop(clean_entry_name(info.name), None)
        by_name[clean_entry_name(info.name)] = info
    moved: dict[str, tarfile.TarInfo] = {}
    missing = []
    for path in options.prioritized_files:
        if clean_entry_name(path) not in by_name and clean_entry_name(path) not in moved:
            if options.require_prioritized:
                raise PrioritizedFileNotFoundError(
                    f"{layer}: prioritized file {path!r} is not in the layer")
            missing.append(path)
            continue
        _move_with_dependencies(clean_entry_name(path), by_name, moved)
    return _Order(list(moved.values()), list(by_name.values()), tuple(missing))


def _move_with_dependencies(name: str, source: dict[str, tarfile.TarInfo],
                            moved: dict[str, tarfile.TarInfo]) -> None:
    """Moves `name` from `source` to `moved` after its parent dirs and hardlink
    target. Iterative, and each path is expanded once: a hostile tar may nest
    deeply or link in cycles."""
    stack = [(name, False)]
    expanded: set[str] = set()
    while stack:
        path, ready = stack.pop()
        if path not in source:
            continue  # already moved, or not in this layer (a lower one has it)
        if ready:
            moved[path] = source.pop(path)
            continue
        if path in expanded:
            continue
        expanded.add(path)
        stack.append((path, True))
        if source[path].islnk():
            stack.append((clean_entry_name(source[path].linkname), False))
        if path:  # the parent; "" is the root entry ("./"), if the tar has one
            stack.append((posixpath.dirname(path), False))


def _landmark(name: str) -> _InputEntry:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENTS)
    info.mode = 0  # as the reference writer: landmarks are markers, not files to use
    return _InputEntry(info, io.BytesIO(LANDMARK_CONTENTS).read)


# --- parallel gzip members --------------------------------------------------


def _compress_members(members: list[list[bytes]], level: int) -> list[bytes]:
    out = []
    for parts in members:
        gz = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip wrapper
        out.append(b"".join([gz.compress(p) for p in parts] + [gz.flush()]))
    return out


class GzipMemberWriter:
    """Writes a sequence of gzip members to `dest`, compressing them in parallel
    but writing them in order. Member indexes map to compressed offsets in
    `offsets` once written; hashes cover the compressed and uncompressed bytes."""

    def __init__(self, dest: BinaryIO, level: int, workers: int) -> None:
        self._dest = dest
        self._level = level
        self._pool = ThreadPoolExecutor(workers, "estargz-gzip") if workers > 1 else None
        self._max_pending = 2 * workers
        self._pending: deque[Future[list[bytes]]] = deque()
        self._batch: list[list[bytes]] = []
        self._batch_bytes = 0
        self._current: list[bytes] = []
        self._current_bytes = 0
        self._current_index = 0
        self.offsets: list[int] = []
        self.compressed_size = 0
        self.uncompressed_size = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()

    def start_member(self) -> int:
        """Ends the current member (unless still empty); returns the new one's index."""
        if self._current:
            self._batch.append(self._current)
            self._batch_bytes += self._current_bytes
            self._current, self._current_bytes = [], 0
            self._current_index += 1
            if self._batch_bytes >= _BATCH_BYTES:
                self._submit_batch()
        return self._current_index

    def write(self, data: bytes) -> None:
        if data:
            self._current.append(data)
            self._current_bytes += len(data)
            self.diff_hash.update(data)
            self.uncompressed_size += len(data)

    def flush(self) -> None:
        """Compresses and writes every member so far, the current one included."""
        self.start_member()
        self._submit_batch()
        while self._pending:
            self._write_out(self._pending.popleft().result())

    def write_raw(self, data: bytes) -> None:
        """Appends bytes outside any member (the footer); call after flush()."""
        self._emit(data)

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)

    def _submit_batch(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if self._pool is None:
            self._write_out(_compress_members(batch, self._level))
            return
        self._pending.append(self._pool.submit(_compress_members, batch, self._level))
        while len(self._pending) > self._max_pending:
            self._write_out(self._pending.popleft().result())

    def _write_out(self, members: list[bytes]) -> None:
        for member in members:
            self.offsets.append(self.compressed_size)
            self._emit(member)

    def _emit(self, data: bytes) -> None:
        self._dest.write(data)
        self.blob_hash.update(data)
        self.compressed_size += len(data)


# --- the TOC ----------------------------------------------------------------


@dataclass(slots=True)
class TocEntry:
    """One TOC entry; `member` is the gzip member index of its payload (or -1)."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    member: int = -1
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, str] | None = None
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    dropped: bool = False  # replaced by a later entry of the same name

    def to_json(self, offsets: list[int]) -> dict[str, object]:
        # Key order and omit-empty follow the reference writer's JSON.
        fields: list[tuple[str, object]] = [
            ("name", self.name), ("type", self.type), ("size", self.size),
            ("modtime", self.modtime), ("linkName", self.link_name), ("mode", self.mode),
            ("uid", self.uid), ("gid", self.gid), ("userName", self.user_name),
            ("groupName", self.group_name),
            ("offset", offsets[self.member] if self.member >= 0 else 0),
            ("devMajor", self.dev_major), ("devMinor", self.dev_minor),
            ("xattrs", self.xattrs), ("digest", self.digest),
            ("chunkOffset", self.chunk_offset), ("chunkSize", self.chunk_size),
            ("chunkDigest", self.chunk_digest),
        ]
        return {key: value for key, value in fields if value or key in ("name", "type")}


_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()
_TAR_TYPES = {
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def _format_modtime(mtime: float, where: str) -> str:
    seconds = int(mtime + 0.5) if mtime >= 0 else -int(-mtime + 0.5)  # Go rounds half away
    if seconds == 0:
        return ""
    try:
        stamp = datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, ValueError, OSError) as exc:
        raise FormatError(f"{where}: modification time {mtime} is out of range") from exc
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utf8(text: str, what: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError(f"{where}: {what} {text!r} is not valid UTF-8, which the "
                          "eStargz TOC (JSON) requires") from exc
    return text


class TocBuilder:
    """Collects TOC entries in tar order."""

    def __init__(self, layer: str) -> None:
        self._layer = layer
        self.entries: list[TocEntry] = []
        self._last_uname: dict[int, str] = {}
        self._last_gname: dict[int, str] = {}
        self._by_name: dict[str, int] = {}  # cleaned name -> index of its first TOC entry

    def entry_for(self, info: tarfile.TarInfo) -> TocEntry:
        where = f"{self._layer}: {info.name!r}"
        if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE:
            raise FormatError(f"{where}: sparse tar entries are not supported")
        if info.isreg():
            kind = "reg"
        elif info.type in _TAR_TYPES:
            kind = _TAR_TYPES[info.type]
        else:
            raise FormatError(f"{where}: unsupported tar entry type {info.type!r}")
        inside = _inside_layer(info.name, "entry name", where)
        name = _utf8(inside + ("/" if kind == "dir" and not inside.endswith("/") else ""),
                     "entry name", self._layer)
        entry = TocEntry(name=name, type=kind, mode=info.mode & 0o7777,
                         uid=info.uid, gid=info.gid, modtime=_format_modtime(info.mtime, where))
        entry.user_name = self._if_changed(self._last_uname, info.uid,
                                           _utf8(info.uname, "user name", where))
        entry.group_name = self._if_changed(self._last_gname, info.gid,
                                            _utf8(info.gname, "group name", where))
        if kind == "hardlink":  # names an entry of this layer; a symlink's target is data
            entry.link_name = _utf8(_inside_layer(info.linkname, "hardlink target", where),
                                    "link target", where)
        elif kind == "symlink":
            entry.link_name = _utf8(info.linkname, "link target", where)
        if kind in ("char", "block"):
            entry.dev_major, entry.dev_minor = info.devmajor, info.devminor
        if kind == "reg":
            entry.size = info.size
            entry.digest = _EMPTY_DIGEST  # the payload's, once written, if any
        xattrs = {
            key[len(_XATTR_PAX_PREFIX):]: base64.b64encode(
                value.encode("utf-8", "surrogateescape")).decode("ascii")
            for key, value in info.pax_headers.items() if key.startswith(_XATTR_PAX_PREFIX)
        }
        entry.xattrs = xattrs or None
        return entry

    def add(self, entries: list[TocEntry]) -> None:
        """Adds one tar entry's TOC entries (a reg file and its chunks)."""
        key = clean_entry_name(entries[0].name)
        earlier = self._by_name.get(key)
        if earlier is not None:  # tar semantics: the later entry wins
            self._drop_from(earlier)
        self._by_name[key] = len(self.entries)
        self.entries.extend(entries)

    def to_json(self, offsets: list[int]) -> bytes:
        toc = {"version": 1,
               "entries": [e.to_json(offsets) for e in self.entries if not e.dropped]}
        return json.dumps(toc, indent="\t", ensure_ascii=False).encode("utf-8")

    def _drop_from(self, index: int) -> None:
        first = self.entries[index]
        first.dropped = True
        for entry in self.entries[index + 1:]:
            if entry.type != "chunk" or entry.name != first.name:
                break
            entry.dropped = True

    @staticmethod
    def _if_changed(last: dict[int, str], ident: int, name: str) -> str:
        # Like the reference writer: a name is only repeated when it changes for that id.
        if not name or last.get(ident) == name:
            return ""
        last[ident] = name
        return name


# --- the writer -------------------------------------------------------------


class _EstargzWriter:
    def __init__(self, dest: BinaryIO, options: EstargzOptions, layer: str) -> None:
        self._options = options
        self._layer = layer
        self._members = GzipMemberWriter(dest, options.compression_level, options.workers)
        self._toc = TocBuilder(layer)

    def write(self, entries: Iterator[_InputEntry]) -> EstargzResult:
        try:
            for entry in entries:
                self._append(entry)
            return self._finish()
        finally:
            self._members.close()

    def _append(self, entry: _InputEntry) -> None:
        info = entry.info
        toc_entry = self._toc.entry_for(info)
        self._members.write(self._header(info))
        if toc_entry.type == "reg" and info.size > 0:
            self._toc.add(self._write_payload(toc_entry, entry.read, info.size))
            self._members.write(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        else:
            self._toc.add([toc_entry])

    def _header(self, info: tarfile.TarInfo) -> bytes:
        try:
            return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        except (ValueError, UnicodeError) as exc:
            raise FormatError(f"{self._layer}: {info.name!r}: cannot write tar header: {exc}") \
                from exc

    def _write_payload(self, first: TocEntry, read: Callable[[int], bytes],
                       size: int) -> list[TocEntry]:
        """Chunks of one regular file, each in a new member; fills the digests."""
        chunk_size = self._options.chunk_size
        file_hash = hashlib.sha256() if size > chunk_size else None
        chunks: list[TocEntry] = []
        written = 0
        entry = first
        while written < size:
            length = min(chunk_size, size - written)
            data = _read_exactly(read, length, f"{self._layer}: {first.name!r}")
            entry.member = self._members.start_member()
            entry.chunk_offset = written
            entry.chunk_size = chunk_size if length == chunk_size else 0  # 0: to end of file
            entry.chunk_digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self._members.write(data)
            if file_hash is not None:
                file_hash.update(data)
            chunks.append(entry)
            written += length
            entry = TocEntry(name=first.name, type="chunk")
        first.digest = "sha256:" + file_hash.hexdigest() if file_hash else first.chunk_digest
        return chunks

    def _finish(self) -> EstargzResult:
        self._members.flush()
        toc_json = self._toc.to_json(self._members.offsets)
        toc_offset = self._members.compressed_size
        self._members.start_member()
        toc_info = tarfile.TarInfo(TOC_TAR_NAME)
        toc_info.size = len(toc_json)
        toc_info.mode = 0o644
        self._members.write(self._header(toc_info))
        self._members.write(toc_json)
        self._members.write(b"\0" * (-len(toc_json) % tarfile.BLOCKSIZE))
        self._members.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # tar end-of-archive
        self._members.flush()
        self._members.write_raw(estargz_footer(toc_offset))
        return EstargzResult(
            blob_digest="sha256:" + self._members.blob_hash.hexdigest(),
            blob_size=self._members.compressed_size,
            toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
            diff_id="sha256:" + self._members.diff_hash.hexdigest(),
            uncompressed_size=self._members.uncompressed_size,
            toc_offset=toc_offset,
        )


def _read_exactly(read: Callable[[int], bytes], length: int, where: str) -> bytes:
    data = read(length)
    while len(data) < length:
        more = read(length - len(data))
        if not more:
            raise FormatError(f"{where}: tar payload ends early")
        data += more
    return data


_INPUT_ERRORS = (tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile, zstandard.ZstdError)


def write_estargz(source: BinaryIO, dest: BinaryIO, options: EstargzOptions | None = None,
                  name: str = "layer") -> EstargzResult:
    """Converts the tar (gzip, zstd or plain) read from `source` into an eStargz
    blob written to `dest`. `name` is the layer's name in error messages.

    Streams: only a few chunks are in memory at a time. With prioritized files
    the uncompressed tar is spooled to a temp file to be reordered.
    """
    options = options or EstargzOptions()
    writer = _EstargzWriter(dest, options, name)
    try:
        tar_stream = open_tar_stream(source)
        if options.prioritized_files:
            return _write_prioritized(writer, tar_stream, options, name)
        tar = tarfile.open(fileobj=tar_stream, mode="r|", bufsize=_TAR_BUFSIZE)
        return writer.write(itertools.chain([_landmark(NO_PREFETCH_LANDMARK)],
                                            _stream_entries(tar)))
    except CrfsError:
        raise
    except _INPUT_ERRORS as exc:
        raise FormatError(f"{name}: cannot read the layer as a (compressed) tar: {exc}") from exc


def _write_prioritized(writer: _EstargzWriter, tar_stream: BinaryIO, options: EstargzOptions,
                       name: str) -> EstargzResult:
    with tempfile.TemporaryFile(dir=options.spool_dir, prefix="crfs-spool-") as spool:
        shutil.copyfileobj(tar_stream, spool, _COPY_BYTES)
        spool.seek(0)
        with tarfile.open(fileobj=spool, mode="r:") as tar:
            members = [m for m in tar.getmembers() if not _is_reserved(m)]
            order = _prioritized_order(members, options, name)
            result = writer.write(itertools.chain(
                (_payload_entry(tar, info) for info in order.first),
                [_landmark(PREFETCH_LANDMARK)],
                (_payload_entry(tar, info) for info in order.rest)))
            return dataclasses.replace(result, missing_prioritized=order.missing)


def convert_file(source: Path, dest: Path, options: EstargzOptions | None = None) -> EstargzResult:
    """Converts a layer file (tar, tar.gz or tar.zst) into an eStargz blob file."""
    with open(source, "rb") as src, open(dest, "wb") as out:
        return write_estargz(src, out, options, name=str(source))
