"""Test fixtures: synthesise real seekable-layer blobs from tar-entry specs.

Independent of the production writer (crfs_worker/estargz_writer.py): layouts follow
/work/shared/reference/image-formats.md.

- `stargz(specs)`: google/crfs legacy layout, 47-byte footer, no chunkDigest, optional
  whole-file `digest`.
- `estargz(specs)`: 51-byte footer, chunkDigest on every chunk, multi-chunk big files,
  innerOffset packing of small files (`min_chunk_size`), prefetch landmarks.
- `zstd_chunked(specs)`: containers/storage layout: zstd frames, rolling-style chunks and
  "zeros" chunks, TOC / tar-split / 64-byte footer in skippable frames + annotations.
- `zstdchunked_old(specs)`: stargz-snapshotter's zstdchunked: eStargz entries in zstd
  frames, TOC in a skippable frame, 40-byte footer, both kinds of annotations.

Every builder accepts `toc_hook(toc: dict) -> dict | bytes` to make hostile TOCs whose
digest still matches (the blob "vouches" for them), and returns a `Blob`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import zstandard

from crfs_worker.footer import (
    ESTARGZ_TOC_DIGEST,
    OLD_ZSTD_MANIFEST_CHECKSUM,
    OLD_ZSTD_MANIFEST_POSITION,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    ZSTD_TARSPLIT_POSITION,
    estargz_footer,
    stargz_footer,
    zstd_chunked_footer,
    zstd_skippable_frame,
    zstdchunked_old_footer,
)

TocHook = Callable[[dict], "dict | bytes"]


@dataclass
class Spec:
    """One tar entry to put in a layer."""

    name: str
    type: str = "reg"            # reg dir symlink hardlink char block fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000.0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def reg(name: str, data: bytes, **kw: Any) -> Spec:
    return Spec(name, "reg", data, **kw)


def dir_(name: str, mode: int = 0o755, **kw: Any) -> Spec:
    return Spec(name, "dir", mode=mode, **kw)


def symlink(name: str, target: str, **kw: Any) -> Spec:
    return Spec(name, "symlink", link=target, mode=0o777, **kw)


def hardlink(name: str, target: str, **kw: Any) -> Spec:
    return Spec(name, "hardlink", link=target, **kw)


@dataclass
class Blob:
    data: bytes
    format: str
    toc_digest: str | None          # what a LayerSource carries (None for legacy stargz)
    annotations: dict[str, str]
    toc_json: bytes
    files: dict[str, bytes]         # regular file contents by normalised path

    def flip(self, offset: int) -> "Blob":
        """A copy with one bit flipped at `offset`."""
        b = bytearray(self.data)
        b[offset] ^= 0x01
        return Blob(bytes(b), self.format, self.toc_digest, dict(self.annotations), self.toc_json,
                    self.files)


class MemBlob:
    """A BlobReader over bytes that counts read_range calls."""

    def __init__(self, data: bytes, name: str = "mem-blob") -> None:
        self.data = data
        self._name = name
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def name(self) -> str:
        return self._name

    def read_range(self, offset: int, length: int) -> bytes:
        from crfs_worker.blob import check_range

        check_range(self, offset, length)
        self.reads.append((offset, length))
        return self.data[offset:offset + length]


# ---------------------------------------------------------------------------- helpers

_TAR_TYPES = {
    "reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _tar_header(s: Spec, *, size: int | None = None) -> bytes:
    ti = tarfile.TarInfo(s.name + ("/" if s.type == "dir" and not s.name.endswith("/") else ""))
    ti.type = _TAR_TYPES[s.type]
    ti.size = len(s.data) if size is None else size
    if s.type != "reg":
        ti.size = 0
    ti.mode = s.mode
    ti.uid, ti.gid = s.uid, s.gid
    ti.mtime = s.mtime
    ti.linkname = s.link
    ti.devmajor, ti.devminor = s.devmajor, s.devminor
    if s.xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v.decode("latin-1") for k, v in s.xattrs.items()}
    return ti.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def _pad(n: int) -> bytes:
    return b"\0" * ((-n) % 512)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _rfc3339(t: float, nano: bool = False) -> str:
    d = datetime.fromtimestamp(int(t), timezone.utc)
    base = d.strftime("%Y-%m-%dT%H:%M:%S")
    if nano:
        frac = round((t - int(t)) * 1e9)
        if frac:
            return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def _toc_entry_base(s: Spec, nano: bool = False) -> dict:
    e: dict[str, Any] = {"name": s.name + ("/" if s.type == "dir" else ""), "type": s.type}
    if s.type == "reg" and s.data:
        e["size"] = len(s.data)
    e["modtime"] = _rfc3339(s.mtime, nano)
    if s.link:
        e["linkName"] = s.link
    e["mode"] = s.mode
    if s.uid:
        e["uid"] = s.uid
    if s.gid:
        e["gid"] = s.gid
    if s.devmajor:
        e["devMajor"] = s.devmajor
    if s.devminor:
        e["devMinor"] = s.devminor
    if s.xattrs:
        e["xattrs"] = {k: base64.b64encode(v).decode() for k, v in s.xattrs.items()}
    return e


def _files(specs: list[Spec]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for s in specs:
        name = s.name.strip("/")
        while name.startswith("./"):
            name = name[2:]
        if s.type == "reg":
            out[name] = s.data
        elif s.type == "hardlink":
            out[name] = out.get(s.link.strip("/"), b"")
    return out


def _apply_hook(toc: dict, hook: TocHook | None, indent: str | None) -> bytes:
    result = hook(toc) if hook else toc
    if isinstance(result, (bytes, bytearray)):
        return bytes(result)
    return json.dumps(result, indent=indent).encode()


# ---------------------------------------------------------------------------- gzip formats


class _GzipStream:
    """A blob made of gzip members."""

    def __init__(self, level: int = 6) -> None:
        self.out = bytearray()
        self.level = level
        self.z: Any = None
        self.member_start = 0
        self.member_usize = 0

    def new_member(self) -> None:
        self.end_member()
        self.z = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.member_start = len(self.out)
        self.member_usize = 0

    def end_member(self) -> None:
        if self.z is not None:
            self.out += self.z.flush()
            self.z = None

    def write(self, data: bytes) -> None:
        if self.z is None:
            self.new_member()
        self.out += self.z.compress(data)
        self.member_usize += len(data)


def _gzip_layer(
    specs: list[Spec], *, estargz: bool, chunk_size: int, min_chunk_size: int,
    digests: bool, prefetch: list[str] | None, no_prefetch: bool,
    toc_hook: TocHook | None, indent: str | None,
) -> tuple[bytes, bytes, int]:
    g = _GzipStream()
    entries: list[dict] = []
    order = list(specs)
    if estargz and prefetch is not None:
        first = [s for s in order if s.name in prefetch]
        rest = [s for s in order if s.name not in prefetch]
        order = first + [reg(".prefetch.landmark", b"\x0f")] + rest
    elif estargz and no_prefetch:
        order = [reg(".no.prefetch.landmark", b"\x0f")] + order
    for s in order:
        g.write(_tar_header(s))
        e = _toc_entry_base(s)
        entries.append(e)
        if s.type != "reg" or not s.data:
            continue
        if digests:
            e["digest"] = _sha(s.data)
        data = s.data
        multi = len(data) > chunk_size
        for coff in range(0, len(data), chunk_size):
            chunk = data[coff:coff + chunk_size]
            pack = (min_chunk_size and g.z is not None and g.member_usize < min_chunk_size
                    and g.member_start > 0 and len(data) < min_chunk_size)
            if not pack:
                g.new_member()
            ce = e if coff == 0 else {"name": s.name, "type": "chunk"}
            ce["offset"] = g.member_start
            if pack and g.member_usize:
                ce["innerOffset"] = g.member_usize
            if coff:
                ce["chunkOffset"] = coff
            if multi:
                ce["chunkSize"] = len(chunk)
            if estargz:
                ce["chunkDigest"] = _sha(chunk)
            if coff:
                entries.append(ce)
            g.write(chunk)
        g.write(_pad(len(data)))
    toc: dict[str, Any] = {"version": 1, "entries": entries}
    toc_json = _apply_hook(toc, toc_hook, indent)
    g.new_member()
    toc_offset = g.member_start
    g.write(_tar_header(Spec("stargz.index.json", "reg", mode=0o444), size=len(toc_json)))
    g.write(toc_json + _pad(len(toc_json)) + b"\0" * 1024)
    g.end_member()
    footer = estargz_footer(toc_offset) if estargz else stargz_footer(toc_offset)
    return bytes(g.out) + footer, toc_json, toc_offset


def stargz(specs: list[Spec], *, chunk_size: int = 4 << 20, digests: bool = True,
           toc_hook: TocHook | None = None) -> Blob:
    data, toc_json, _ = _gzip_layer(specs, estargz=False, chunk_size=chunk_size, min_chunk_size=0,
                                    digests=digests, prefetch=None, no_prefetch=False,
                                    toc_hook=toc_hook, indent=None)
    return Blob(data, "stargz", None, {}, toc_json, _files(specs))


def estargz(specs: list[Spec], *, chunk_size: int = 4 << 20, min_chunk_size: int = 0,
            prefetch: list[str] | None = None, no_prefetch: bool = False, digests: bool = True,
            toc_hook: TocHook | None = None, indent: str | None = "\t") -> Blob:
    data, toc_json, _ = _gzip_layer(specs, estargz=True, chunk_size=chunk_size,
                                    min_chunk_size=min_chunk_size, digests=digests,
                                    prefetch=prefetch, no_prefetch=no_prefetch,
                                    toc_hook=toc_hook, indent=indent)
    digest = _sha(toc_json)
    return Blob(data, "estargz", digest, {ESTARGZ_TOC_DIGEST: digest}, toc_json, _files(specs))


# ---------------------------------------------------------------------------- zstd formats


class _ZstdStream:
    """A blob made of zstd frames: bytes accumulate, `cut()` closes the current frame."""

    def __init__(self, level: int = 3) -> None:
        self.out = bytearray()
        self.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        self.pending += data

    def cut(self) -> int:
        """Close the current frame (if any bytes); return where the next one starts."""
        if self.pending:
            self.out += self.cctx.compress(bytes(self.pending))
            self.pending = bytearray()
        return len(self.out)


def _split_chunks(data: bytes, chunk_size: int, zeros_min: int) -> list[tuple[int, bytes, bool]]:
    """(offset, bytes, is_zeros): runs of >= zeros_min zero bytes become their own chunk."""
    out: list[tuple[int, bytes, bool]] = []
    i, n = 0, len(data)
    start = 0
    while i < n:
        if zeros_min and data[i] == 0:
            j = i
            while j < n and data[j] == 0:
                j += 1
            if j - i >= zeros_min:
                for k in range(start, i, chunk_size):
                    out.append((k, data[k:min(k + chunk_size, i)], False))
                out.append((i, data[i:j], True))
                start = i = j
                continue
            i = j
        else:
            i += 1
    for k in range(start, n, chunk_size):
        out.append((k, data[k:min(k + chunk_size, n)], False))
    return out


def zstd_chunked(specs: list[Spec], *, chunk_size: int = 64 << 10, zeros_min: int = 1024,
                 old_keys: bool = False, toc_hook: TocHook | None = None) -> Blob:
    z = _ZstdStream()
    entries: list[dict] = []
    for s in specs:
        z.write(_tar_header(s))
        e = _toc_entry_base(s, nano=True)
        if s.type == "reg":
            e["size"] = len(s.data)   # containers/storage writes size for every file
        entries.append(e)
        if s.type != "reg" or not s.data:
            continue
        e["digest"] = _sha(s.data)
        chunks = _split_chunks(s.data, chunk_size, zeros_min)
        frame_entries = []
        for coff, chunk, zeros in chunks:
            start = z.cut()
            z.write(chunk)
            end = z.cut()
            ce = e if coff == 0 else {"type": "chunk", "name": s.name, "chunkOffset": coff}
            frame_entries.append((ce, start, end, chunk, zeros))
        e["offset"] = frame_entries[0][1]
        e["endOffset"] = frame_entries[-1][2]
        if len(frame_entries) > 1:
            for ce, start, _end, chunk, zeros in frame_entries:
                ce["offset"] = start
                ce["chunkSize"] = len(chunk)
                ce["chunkDigest"] = _sha(chunk)
                if zeros:
                    ce["chunkType"] = "zeros"
                if ce is not e:
                    entries.append(ce)
        z.write(_pad(len(s.data)))
    z.write(b"\0" * 1024)
    z.cut()
    toc: dict[str, Any] = {"version": 1, "entries": entries, "tarSplitDigest": _sha(b"tar-split")}
    toc_json = _apply_hook(toc, toc_hook, None)
    ctoc = zstandard.ZstdCompressor(level=3).compress(toc_json)
    toc_off = len(z.out) + 8
    z.out += zstd_skippable_frame(ctoc)
    tarsplit = zstandard.ZstdCompressor().compress(b'{"type":1}\n')
    ts_off = len(z.out) + 8
    z.out += zstd_skippable_frame(tarsplit)
    z.out += zstd_skippable_frame(zstd_chunked_footer(toc_off, len(ctoc), len(toc_json),
                                                      ts_off, len(tarsplit), 11))
    checksum = _sha(ctoc)
    keys = (OLD_ZSTD_MANIFEST_CHECKSUM, OLD_ZSTD_MANIFEST_POSITION, None) if old_keys else (
        ZSTD_MANIFEST_CHECKSUM, ZSTD_MANIFEST_POSITION, ZSTD_TARSPLIT_POSITION)
    ann = {keys[0]: checksum, keys[1]: f"{toc_off}:{len(ctoc)}:{len(toc_json)}:1"}
    if keys[2]:
        ann[keys[2]] = f"{ts_off}:{len(tarsplit)}:11"
    return Blob(bytes(z.out), "zstd:chunked", checksum, ann, toc_json, _files(specs))


def zstdchunked_old(specs: list[Spec], *, chunk_size: int = 4 << 20,
                    toc_hook: TocHook | None = None) -> Blob:
    """stargz-snapshotter's zstdchunked: eStargz TOC entries, zstd frames, 40-byte footer."""
    z = _ZstdStream()
    entries: list[dict] = []
    for s in specs:
        z.write(_tar_header(s))
        e = _toc_entry_base(s)
        entries.append(e)
        if s.type != "reg" or not s.data:
            continue
        e["digest"] = _sha(s.data)
        multi = len(s.data) > chunk_size
        for coff in range(0, len(s.data), chunk_size):
            chunk = s.data[coff:coff + chunk_size]
            start = z.cut()
            ce = e if coff == 0 else {"name": s.name, "type": "chunk", "chunkOffset": coff}
            ce["offset"] = start
            if multi:
                ce["chunkSize"] = len(chunk)
            ce["chunkDigest"] = _sha(chunk)
            if coff:
                entries.append(ce)
            z.write(chunk)
        z.write(_pad(len(s.data)))
    z.write(b"\0" * 1024)
    z.cut()
    toc_json = _apply_hook({"version": 1, "entries": entries}, toc_hook, "\t")
    ctoc = zstandard.ZstdCompressor(level=3).compress(toc_json)
    toc_off = len(z.out) + 8
    z.out += zstd_skippable_frame(ctoc)
    z.out += zstd_skippable_frame(zstdchunked_old_footer(toc_off, len(ctoc), len(toc_json)))
    digest = _sha(toc_json)
    ann = {
        ESTARGZ_TOC_DIGEST: digest,
        OLD_ZSTD_MANIFEST_CHECKSUM: _sha(ctoc),
        OLD_ZSTD_MANIFEST_POSITION: f"{toc_off}:{len(ctoc)}:{len(toc_json)}:1",
    }
    return Blob(bytes(z.out), "zstdchunked-estargz", digest, ann, toc_json, _files(specs))


BUILDERS: dict[str, Callable[..., Blob]] = {
    "stargz": stargz,
    "estargz": estargz,
    "zstd:chunked": zstd_chunked,
    "zstdchunked-estargz": zstdchunked_old,
}


def tar_bytes(specs: list[Spec]) -> bytes:
    """The plain tar the specs describe (to compare layouts against)."""
    buf = io.BytesIO()
    for s in specs:
        buf.write(_tar_header(s))
        if s.type == "reg":
            buf.write(s.data + _pad(len(s.data)))
    buf.write(b"\0" * 1024)
    return buf.getvalue()
