"""Index: a compact on-disk SQLite index of one TOC, built once per TOC digest.

`IndexBuilder` consumes validated `TocEntry` values in TOC order (streaming: memory
holds the directories and a small window of chunks, not the entries) and writes a
SQLite file; `Index` answers lookups from it. `layer.py` builds into a temporary file and
renames it to `<index_dir>/<digest-hex>.sqlite` only once the TOC digest is verified,
so an index file that exists is an index of a verified TOC. For large TOCs
`make_builder` returns a `ProcessIndexBuilder`: the same builder in a child process, fed
msgpack batches of entries, so that building rows and inserting them runs on the second
core while the parent decompresses and parses the TOC (1,000,000 entries: about 5.5 s of
CPU in each process, about 220 MB of RSS for both; see bench/index_load.py).
Rows are buffered per kind and written a few hundred per INSERT statement; the name
index is made after the bulk insert, and only then are duplicate names resolved.

Tables (schema version `SCHEMA_VERSION`), one row per TOC name so a million-entry TOC
is a million rows:
- `node(seq, parent, name, ino, mode, nlink, uid, gid, size, mtime_ns, rdev_major,
  rdev_minor, link, digest, cstart, cend, inner, cdigest, zeros)`: `seq` is the TOC order
  (walk order) and, for the first name of an inode, its inode number (`ino == seq`);
  hardlink rows carry their target's `ino` and a copy of its attributes. `mode` is the full
  st_mode, `link` a symlink target, `digest` the raw sha256 of a regular file's whole
  content when the TOC gives one. A file stored as one chunk keeps it in the row: its
  compressed range [cstart, cend) in the blob, offset `inner` in the decompressed
  member/frame, raw sha256 `cdigest`, zstd:chunked `zeros` flag. Root is seq 1, parent 0;
  names dropped by a later duplicate get parent -seq. Index on (parent, name) (not
  declared UNIQUE: the build leaves one row per live name).
- `chunk(ino, foff, size, cstart, cend, inner, digest, zeros)`: files of several chunks.
- `xattr(ino, name, value)`, `meta(key, value)`.

Semantics (the tar's truth, as extraction would make it):
- inode numbers: root is 1, then one per new inode in TOC order (stable for a given TOC);
  hardlinks share their target's inode; nlink counts names (directories: 2 + subdirs).
- missing parent directories are created 0755 root:root at first need.
- duplicates: the later entry wins, like tar extraction. A directory entry for an
  existing directory updates its attributes (children stay); a directory replacing a
  non-directory replaces it; a non-directory replacing a directory is refused (tar
  could not do that either without deleting the tree); a later entry under a path that
  is a file turns that path into a directory.
- hardlinks: the target must be an earlier entry (the newest earlier one of that name);
  links to missing, later or directory targets are refused, so cycles cannot exist.
- limits (`TocLimits`, untrusted input): a chunk (the unit that is decompressed and
  verified at once) may need at most `max_chunk_size` bytes inflated (innerOffset +
  size), so a reader is never made to inflate gigabytes for one small read; directories,
  hardlinks and duplicate names are what the builder keeps in memory or resolves one by
  one, so each has its own limit (`max_dirs`, `max_hardlinks`, `max_duplicates`). At the
  default limits: 1,000,000 directories peak at about 320 MB of RSS, 1,000,000 hardlinks
  at about 520 MB and 22 s, 100,000 duplicates take under a second (they are found
  by one GROUP BY over the name index at the end, so their limit is checked then).
- whiteouts (`.wh.NAME`, `.wh..wh..opq`) are kept as the entries they are.
- chunk compressed ends: stargz/eStargz/zstdchunked-estargz: the next distinct offset
  among later data entries with innerOffset 0, the TOC's start for the last;
  zstd:chunked: the next chunk's offset within a file, the file's endOffset for its last
  chunk (falling back to the eStargz rule when endOffset is absent).
"""
from __future__ import annotations

import gc
import json
import os
import sqlite3
import stat as st
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

from .errors import CrfsError, FormatError
from .toc import TocEntry, TocLimits

SCHEMA_VERSION = 1
ROOT_INO = 1
BATCH = 20000

_TYPE_BITS = {
    "dir": st.S_IFDIR,
    "reg": st.S_IFREG,
    "symlink": st.S_IFLNK,
    "hardlink": 0,
    "char": st.S_IFCHR,
    "block": st.S_IFBLK,
    "fifo": st.S_IFIFO,
}

_TYPE_NAMES = {bits: name for name, bits in _TYPE_BITS.items() if bits}

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE node(
    seq INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name TEXT NOT NULL, ino INTEGER NOT NULL,
    mode INTEGER NOT NULL, nlink INTEGER NOT NULL DEFAULT 1, uid INTEGER NOT NULL DEFAULT 0,
    gid INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0, rdev_major INTEGER NOT NULL DEFAULT 0,
    rdev_minor INTEGER NOT NULL DEFAULT 0, link TEXT, digest BLOB,
    cstart INTEGER NOT NULL DEFAULT 0, cend INTEGER NOT NULL DEFAULT 0,
    inner INTEGER NOT NULL DEFAULT 0, cdigest BLOB, zeros INTEGER NOT NULL DEFAULT 0);
CREATE TABLE chunk(ino INTEGER NOT NULL, foff INTEGER NOT NULL, size INTEGER NOT NULL,
    cstart INTEGER NOT NULL, cend INTEGER NOT NULL, inner INTEGER NOT NULL, digest BLOB,
    zeros INTEGER NOT NULL, PRIMARY KEY(ino, foff)) WITHOUT ROWID;
CREATE TABLE xattr(ino INTEGER NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
"""

# The name index is made after the bulk insert (a sort is cheaper than a million B-tree
# inserts); duplicate names are resolved then. It is not UNIQUE, but the build leaves one
# live row per (parent, name): the others get parent = -seq.
_NAME_INDEX = "CREATE INDEX node_name ON node(parent, name)"

# Python's sqlite3 binds None and bytes through its (slow) adapter machinery, but int, str
# and bytearray directly: rows hold 0 / empty bytearray for "none" instead of NULL.
_NONE = bytearray()


@dataclass(frozen=True)
class EntryStat:
    ino: int        # > 0, unique in the layer, equal for hardlinks, stable
    mode: int       # full st_mode, type bits included
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev_major: int
    rdev_minor: int


@dataclass(frozen=True)
class ChunkRow:
    """One chunk of a regular file as the index holds it."""

    foff: int          # offset of the chunk in the file
    size: int          # uncompressed bytes
    cstart: int        # compressed range in the blob: [cstart, cend)
    cend: int
    inner: int         # offset of the chunk inside the decompressed member/frame
    digest: bytes | None
    zeros: bool


# One statement per kind of node, binding only the columns that kind fills: every value
# bound costs, and most of the nineteen columns are defaults. (Plain `?`: SQLite looks
# numbered parameters up in a list, which made a many-row statement quadratic.)
_NODE = "INSERT INTO node"
_DIR = ("(seq, parent, name, ino, mode, nlink, uid, gid, mtime_ns)", "(?, ?, ?, ?, ?, ?, ?, ?, ?)")
_EMPTY = ("(seq, parent, name, ino, mode, uid, gid, mtime_ns, digest)", "(?, ?, ?, ?, ?, ?, ?, ?, ?)")
_DATA = ("(seq, parent, name, ino, mode, uid, gid, size, mtime_ns, digest, cstart, cend, inner, "
         "cdigest, zeros)", "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SYMLINK = ("(seq, parent, name, ino, mode, uid, gid, size, mtime_ns, link)",
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_HARDLINK = ("(seq, parent, name, ino, mode)", "(?, ?, ?, 0, 0)")
_SPECIAL = ("(seq, parent, name, ino, mode, uid, gid, mtime_ns, rdev_major, rdev_minor)",
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_CHUNK = ("", "(?, ?, ?, ?, ?, ?, ?, ?)")
# Positions in a data row (_DATA's parameters), the only rows changed after they are made:
# a file's compressed end is known at the next member, its first chunk may move.
_D_DIGEST, _D_CSTART, _D_CEND, _D_INNER, _D_CDIGEST, _D_ZEROS = 9, 10, 11, 12, 13, 14
# Rows per INSERT statement: Python's executemany costs about 1 us per execution whatever
# it binds, SQLite's own insert a fifth of that; 256 rows of up to 15 values stay far below
# SQLite's (compile-time) limit of 32766 parameters.
_ROWS_PER_INSERT = 256


class _RowTable:
    """Rows of one INSERT shape, buffered and written many rows per statement."""

    def __init__(self, head: str, columns: str, values: str) -> None:
        self.rows: list = []
        self.width = values.count("?")
        self.one = f"{head}{columns} VALUES {values}"
        self.many = f"{head}{columns} VALUES {','.join([values] * _ROWS_PER_INSERT)}"

    def write(self, db: sqlite3.Connection, cut: int) -> None:
        """Insert the first `cut` rows and drop them from the buffer."""
        rows = self.rows
        full = cut - cut % _ROWS_PER_INSERT
        if full:
            flat = list(chain.from_iterable(rows[:full]))
            n = _ROWS_PER_INSERT * self.width
            db.executemany(self.many, [flat[i:i + n] for i in range(0, len(flat), n)])
        if cut > full:
            db.executemany(self.one, rows[full:cut])
        del rows[:cut]


_INSERT_XATTR = "INSERT OR REPLACE INTO xattr VALUES (?,?,?)"

# TOCs with more JSON than this are indexed by a builder process: the index work (Python
# rows, SQLite inserts) then runs beside the JSON parse on the second core. Threads cannot
# do that: the sqlite3 module takes the GIL back for every row.
PROCESS_BUILD_MIN_JSON = 16 << 20


def _open_build_db(path: str, create: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if create:  # before cache_size: a KiB cache size is turned into pages of the current size
        db.execute("PRAGMA page_size=16384")
    # No journal: a failed build is deleted, never rolled back.
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE",
                   "temp_store=FILE", "cache_size=-32768"):
        db.execute("PRAGMA " + pragma)
    if create:
        db.executescript(_SCHEMA)
    db.execute("BEGIN")
    return db


class IndexBuilder:
    """Writes the index of one TOC into `path` (a fresh file). Feed `add()`, then `finish()`."""

    def __init__(self, path: Path, *, name: str, fmt: str, payload_end: int,
                 limits: TocLimits | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.fmt = fmt
        self.limits = limits or TocLimits()
        self.max_chunk = self.limits.max_chunk_size
        self.duplicates = 0
        self.zstd_chunked = fmt == "zstd:chunked"
        self.payload_end = payload_end
        self.db = _open_build_db(str(self.path), create=True)
        self.seq = ROOT_INO
        # path -> [ino, mode (perm bits), uid, gid, mtime_ns, subdirs, parent ino]: directory
        # rows are written at the end, when their attributes and link counts are final.
        self.dirs: dict[str, list[int]] = {"": [ROOT_INO, 0o755, 0, 0, 0, 0, 0]}
        # Node rows not yet written, by kind (statement); the lists are emptied in place.
        self.dir_table = _RowTable(_NODE, *_DIR)
        self.tables = [_RowTable(_NODE, *kind) for kind in (_EMPTY, _SYMLINK, _HARDLINK, _SPECIAL)]
        self.data = _RowTable(_NODE, *_DATA)
        self.chunks = _RowTable("INSERT INTO chunk", *_CHUNK)
        self.empty_rows, self.symlink_rows, self.hardlink_rows, self.special_rows = (
            t.rows for t in self.tables)
        self.data_rows: list[list] = self.data.rows
        self.chunk_rows: list[list] = self.chunks.rows
        self.xattr_rows: list[tuple] = []
        self.hardlinks: list[tuple[int, str, str]] = []  # (seq, link name, target)
        # Names replaced by a later entry: (parent, name) -> their seqs (rows now parent -seq).
        self.dropped: dict[tuple[int, str], list[int]] = {}
        self.entries = 0
        self.next_flush = BATCH
        # The regular file whose chunks are being read: [data row, name, size, next file
        # offset, endOffset, last chunk (row, column), several chunks?, chunkDigest == digest?]
        self.cur: list | None = None
        # Chunks whose compressed end is not known yet: (row, column of cstart).
        self.pending: list[tuple[list, int]] = []
        self.pend_start = -1
        self.last_parent = ""
        self.last_pdir = self.dirs[""]
        self.prefetch_offset: int | None = None
        self.no_prefetch = False

    # ---------------------------------------------------------------- building

    def _bad(self, name: str, what: str) -> FormatError:
        return FormatError(f"{self.name}: TOC entry {name[:200]!r}: {what}")

    def _too_many(self, name: str, what: str, limit: int) -> FormatError:
        return self._bad(name, f"is one of more than {limit} {what}, the limit for one layer")

    def _chunk_too_big(self, name: str, inner: int, size: int) -> FormatError:
        # Decoding a chunk inflates its innerOffset bytes too, then drops them.
        what = f"{size} bytes" if not inner else f"{size} bytes at innerOffset {inner}"
        return self._bad(name, f"has a chunk of {what}, more than the limit of "
                               f"{self.max_chunk} bytes decoded at once")

    def add_all(self, entries: Iterable[TocEntry]) -> None:
        add = self.add
        for e in entries:
            add(e)

    def add(self, e: TocEntry) -> None:
        (name, typ, size, mode, uid, gid, mtime, link, major, minor, xattrs, digest, offset,
         end_offset, inner, coff, csize, cdigest, zeros) = e
        self.entries += 1
        if typ == "chunk":
            self._chunk(e if type(e) is TocEntry else TocEntry._make(e))
            return
        cur = self.cur
        if cur is not None:
            if cur[3] == cur[2] and not self.zstd_chunked:  # fully covered: nothing to settle
                self.cur = None
            else:
                self._close_file()
        if name == "":  # the root itself: attributes only
            self._dir_again(self.dirs[""], TocEntry._make(e))
            return
        parent, _, base = name.rpartition("/")
        dirs = self.dirs
        # Tar order keeps a directory's entries together: the last parent is the likely one.
        if parent == self.last_parent:
            pdir = self.last_pdir
        else:
            pdir = dirs.get(parent)
            if pdir is None:
                pdir = self._mkdirs(parent)
            self.last_parent, self.last_pdir = parent, pdir
        pino = pdir[0]
        seq = self.seq + 1
        # (A non-directory given the name of a directory is refused by _drop_duplicates.)
        if typ == "reg":
            self.seq = seq
            if size:
                # The file's first (often only) chunk lives in its row.
                if coff:
                    raise self._bad(name, f"first chunk starts at {coff}, not 0")
                if inner + (csize or size) > self.max_chunk:
                    raise self._chunk_too_big(name, inner, csize or size)
                if offset <= 0:
                    raise self._bad(name, "has file data but no data offset")
                pending = self.pending
                if not inner and offset != self.pend_start:
                    if pending:
                        self._member_at(offset, name)
                        pending = self.pending
                    self.pend_start = offset
                row = [seq, pino, base, seq, 0o100000 | mode, uid, gid, size, mtime,
                       bytearray(digest) if digest else _NONE, offset, 0, inner,
                       bytearray(cdigest) if cdigest and cdigest != digest else _NONE,
                       1 if zeros else 0]
                self.data_rows.append(row)
                slot = (row, _D_CSTART)
                pending.append(slot)
                self.cur = [row, name, size, csize or size, end_offset, slot, False,
                            cdigest is not None and cdigest == digest]
            else:
                self.empty_rows.append((seq, pino, base, seq, 0o100000 | mode, uid, gid, mtime,
                                        bytearray(digest) if digest else _NONE))
            if pino == ROOT_INO:
                if base == PREFETCH_LANDMARK:
                    self.prefetch_offset = offset
                elif base == NO_PREFETCH_LANDMARK:
                    self.no_prefetch = True
        elif typ == "dir":
            d = dirs.get(name)
            if d is not None:  # again: later attributes win, children stay
                self._dir_again(d, TocEntry._make(e))
                return
            if len(dirs) >= self.limits.max_dirs:
                raise self._too_many(name, "directories", self.limits.max_dirs)
            self.seq = seq
            dirs[name] = [seq, mode, uid, gid, mtime, 0, pino]
            pdir[5] += 1
        else:
            self.seq = seq
            if typ == "symlink":
                self.symlink_rows.append((seq, pino, base, seq, 0o120000 | mode, uid, gid,
                                          len(link.encode()), mtime, link))
            elif typ == "hardlink":
                if len(self.hardlinks) >= self.limits.max_hardlinks:
                    raise self._too_many(name, "hardlinks", self.limits.max_hardlinks)
                self.hardlinks.append((seq, name, link))
                self.hardlink_rows.append((seq, pino, base))
                xattrs = None  # a hardlink has its target's
            else:
                self.special_rows.append((seq, pino, base, seq, _TYPE_BITS[typ] | mode, uid, gid, mtime,
                                          major, minor))
        if xattrs:
            self._xattrs(seq, xattrs)
        if self.entries >= self.next_flush:
            self._flush()

    def _dir_again(self, d: list[int], e: TocEntry) -> None:
        d[1], d[2], d[3], d[4] = e.mode, e.uid, e.gid, e.mtime_ns
        if e.xattrs:
            self._xattrs(d[0], e.xattrs)

    def _mkdirs(self, path: str) -> list[int]:
        """Create missing parent directories 0755, outermost first."""
        parent, _, base = path.rpartition("/")
        pdir = self.dirs.get(parent)
        if pdir is None:
            pdir = self._mkdirs(parent)
        if len(self.dirs) >= self.limits.max_dirs:
            raise self._too_many(path, "directories", self.limits.max_dirs)
        self.seq += 1
        seq = self.seq
        d = [seq, 0o755, 0, 0, 0, 0, pdir[0]]
        self.dirs[path] = d
        pdir[5] += 1
        return d

    def _xattrs(self, ino: int, xattrs: dict[str, bytes]) -> None:
        for k, v in xattrs.items():
            self.xattr_rows.append((ino, k, bytearray(v)))

    # chunks ---------------------------------------------------------------

    def _member_at(self, offset: int, name: str) -> None:
        """A data entry with innerOffset 0 starts at `offset`: earlier members end there."""
        if offset != self.pend_start:
            if self.pending:
                for row, i in self.pending:
                    if row[i] >= offset:
                        raise self._bad(name, f"data offset {offset} is not after an earlier "
                                              f"entry's offset {row[i]}")
                    row[i + 1] = offset
                self.pending = []
            self.pend_start = offset

    def _chunk(self, e: TocEntry) -> None:
        cur = self.cur
        if cur is None:
            raise self._bad(e.name, "is a chunk that does not follow a non-empty regular file")
        row, name, size = cur[0], cur[1], cur[2]
        if e.name and e.name != name:
            raise self._bad(e.name, f"is a chunk of {name!r} but names another file")
        foff = e.chunk_offset
        if foff != cur[3]:
            raise self._bad(name, f"chunk at file offset {foff} leaves a gap or overlap "
                                  f"(expected {cur[3]})")
        csize = e.chunk_size or size - foff
        if foff + csize > size:
            raise self._bad(name, f"chunk [{foff}, {foff + csize}) runs past the file's {size} bytes")
        if e.inner_offset + csize > self.max_chunk:
            raise self._chunk_too_big(name, e.inner_offset, csize)
        offset = e.offset
        if offset <= 0:
            raise self._bad(name, "has file data but no data offset")
        ino = row[0]
        if not cur[6]:  # the second chunk: move the first one out of the node row
            fd = row[_D_CDIGEST] or (row[_D_DIGEST] if cur[7] else _NONE)
            first = [ino, 0, foff, row[_D_CSTART], row[_D_CEND], row[_D_INNER], fd, row[_D_ZEROS]]
            row[_D_CSTART] = row[_D_CEND] = row[_D_INNER] = row[_D_ZEROS] = 0
            row[_D_CDIGEST] = _NONE
            self.pending = [(first, 3) if r is row else (r, i) for r, i in self.pending]
            self.chunk_rows.append(first)
            cur[6] = True
        if e.end_offset:
            cur[4] = e.end_offset
        if e.inner_offset == 0:
            self._member_at(offset, name)
        cd = e.chunk_digest
        crow = [ino, foff, csize, offset, 0, e.inner_offset, bytearray(cd) if cd else _NONE,
                1 if e.zeros else 0]
        self.chunk_rows.append(crow)
        slot = (crow, 3)
        self.pending.append(slot)
        cur[5] = slot
        cur[3] = foff + csize

    def _close_file(self) -> None:
        row, name, size, covered, end_offset, (last, i), multi, _ = self.cur
        self.cur = None
        if covered != size:
            raise self._bad(name, f"chunks cover {covered} of the file's {size} bytes")
        # A file in one chunk without a chunkDigest: its whole-file digest vouches for the
        # chunk (Index.chunks applies that rule, so the row stores the digest once).
        if self.zstd_chunked and end_offset and not last[i + 1]:
            if end_offset <= last[i]:
                raise self._bad(name, f"endOffset {end_offset} is not after the data offset {last[i]}")
            last[i + 1] = end_offset
            self.pending = [(r, j) for r, j in self.pending if r is not last]

    def _flush(self, final: bool = False) -> None:
        """Write the buffered rows, except those still waiting for a compressed end."""
        self.next_flush = self.entries + BATCH
        db = self.db
        for t in self.tables:
            t.write(db, len(t.rows))
        if self.xattr_rows:
            db.executemany(_INSERT_XATTR, self.xattr_rows)
            self.xattr_rows.clear()
        for t, col in ((self.data, _D_CSTART), (self.chunks, 3)):
            rows = t.rows
            cut = len(rows)
            if not final and self.pending:
                for k, r in enumerate(rows):
                    if r[col] and not r[col + 1]:
                        cut = k
                        break
            t.write(db, cut)

    # ---------------------------------------------------------------- finishing

    def finish(self, meta: dict[str, object]) -> None:
        """Resolve what needed the whole TOC, write `meta`, and close the file."""
        if self.cur is not None:
            self._close_file()
        for row, i in self.pending:
            if row[i] >= self.payload_end:
                raise self._bad(str(row[0]), "data lies past the payload")
            row[i + 1] = self.payload_end
        self.pending = []
        self._flush(final=True)
        self._write_dirs()
        db = self.db
        # The index's sort spills to a temporary file past this much memory (RSS bound).
        db.execute("PRAGMA cache_size=-16384")
        db.execute(_NAME_INDEX)
        self._drop_duplicates()
        self._resolve_links()
        if self.prefetch_offset is not None and not self.no_prefetch:
            meta["prefetch_offset"] = self.prefetch_offset
        meta.update(schema=SCHEMA_VERSION, entries=self.entries, payload_end=self.payload_end)
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(meta.items()))
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=DELETE")
        db.close()

    def _write_dirs(self) -> None:
        """Directory rows with their final attributes and link counts (2 + subdirectories)."""
        table = self.dir_table
        rows = table.rows
        for path, d in self.dirs.items():
            rows.append((d[0], d[6], path.rpartition("/")[2], d[0], st.S_IFDIR | d[1], 2 + d[5],
                         d[2], d[3], d[4]))
            if len(rows) >= BATCH:
                table.write(self.db, len(rows))
        table.write(self.db, len(rows))

    def _drop_duplicates(self) -> None:
        """Names given more than once: the latest entry wins, earlier rows get parent -seq.

        (Like extraction: a later entry replaces the file; what a directory entry replaces
        or may not replace was settled in `add`.)
        """
        db = self.db
        limit = self.limits.max_duplicates
        # At most `limit` groups are fetched: one more means more duplicates than allowed.
        groups = db.execute("SELECT parent, name, count(*) FROM node GROUP BY parent, name "
                            "HAVING count(*) > 1").fetchmany(limit + 1)
        if sum(n - 1 for _, _, n in groups) > limit:
            raise FormatError(f"{self.name}: TOC has more than {limit} duplicate names, "
                              f"the limit for one layer")
        dropped = self.dropped
        for parent, name, _ in groups:
            rows = db.execute("SELECT seq, mode FROM node WHERE parent = ? AND name = ? ORDER BY seq",
                              (parent, name)).fetchall()
            for (_, mode), (_, later) in zip(rows, rows[1:]):
                if st.S_ISDIR(mode):  # tar could not replace a tree either without deleting it
                    self._replaced_dir(parent, name, later)
            seqs = [r[0] for r in rows]
            db.executemany("UPDATE node SET parent = -seq WHERE seq = ?", [(s,) for s in seqs[:-1]])
            dropped[(parent, name)] = seqs[:-1]
            self.duplicates += len(seqs) - 1

    _ATTRS = "mode, uid, gid, size, mtime_ns, rdev_major, rdev_minor"

    def _replaced_dir(self, parent: int, name: str, mode: int) -> None:
        ppath = next((p for p, d in self.dirs.items() if d[0] == parent), "")
        what = _TYPE_NAMES.get(st.S_IFMT(mode), "hardlink")
        raise self._bad(f"{ppath}/{name}" if ppath else name, f"a {what} entry replaces a directory")

    def _resolve_links(self) -> None:
        """Point hardlinks at their targets' inodes; count names (nlink) where it matters."""
        db = self.db
        dropped = self.dropped
        link_ino: dict[int, int] = {}       # hardlink row seq -> its inode
        names: dict[int, list[int]] = {}    # inode -> seqs of its hardlink rows
        updates = []
        for seq, name, target in self.hardlinks:
            parent, _, base = target.rpartition("/")
            pdir = self.dirs.get(parent)
            best = None
            if pdir is not None:
                key = (pdir[0], base)
                row = db.execute("SELECT seq, ino, mode FROM node WHERE parent = ? AND name = ? "
                                 "AND seq < ?", (*key, seq)).fetchone()
                if row is not None:
                    best = row[0]
                for old in dropped.get(key, ()):  # the name as it was when the link was made
                    if old < seq and (best is None or old > best):
                        best = old
            if best is None:
                later = pdir is not None and (
                    db.execute("SELECT 1 FROM node WHERE parent = ? AND name = ?",
                               (pdir[0], base)).fetchone() or (pdir[0], base) in dropped)
                what = "a later entry" if later else "a missing entry"
                raise self._bad(name, f"is a hardlink to {what} {target!r}")
            ino = link_ino.get(best, best)
            attrs = db.execute(f"SELECT {self._ATTRS} FROM node WHERE seq = ?", (ino,)).fetchone()
            if st.S_ISDIR(attrs[0]):
                raise self._bad(name, f"is a hardlink to the directory {target!r}")
            if not attrs[0]:  # cannot happen: earlier links are resolved first
                raise self._bad(name, f"is a hardlink to an unresolved entry {target!r}")
            link_ino[seq] = ino
            names.setdefault(ino, []).append(seq)
            db.execute(f"UPDATE node SET ino = ?, ({self._ATTRS}) = ({','.join('?' * 7)}) "
                       "WHERE seq = ?", (ino, *attrs, seq))
        # nlink: the live names of each inode that has hardlinks or lost a name.
        gone = {s for seqs in dropped.values() for s in seqs}
        affected = set(names)
        for s in gone:
            affected.add(link_ino.get(s, s))
        for ino in affected:
            rows = [ino, *names.get(ino, ())]
            live = sum(1 for r in rows if r not in gone)
            updates.extend((live, r) for r in rows)
        db.executemany("UPDATE node SET nlink = ? WHERE seq = ?", sorted(updates, key=lambda u: u[1]))

    def abort(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass


def _read_frame(f: Any) -> Any:
    head = f.read(8)
    if len(head) != 8:
        raise EOFError("index builder pipe closed")
    n = int.from_bytes(head, "little")
    data = f.read(n)
    if len(data) != n:
        raise EOFError("index builder pipe closed")
    # msgpack rather than pickle: a third of the CPU on both ends for a million entries.
    return msgpack.unpackb(data, use_list=False)


def _write_frame(f: Any, obj: Any) -> None:
    data = msgpack.packb(obj)
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)
    f.flush()


def _builder_main() -> None:
    """Builder process (`python -c`): argv = [path, layer name, format, payload end, limits JSON].

    Reads frames of entry tuples from stdin, then ("finish", meta); answers ("ok",) or
    ("error", is_format_error, message) on stdout.
    """
    gc.disable()
    path, name, fmt, payload_end = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    limits = TocLimits(**json.loads(sys.argv[5]))
    out = sys.stdout.buffer
    builder = None
    try:
        builder = IndexBuilder(Path(path), name=name, fmt=fmt, payload_end=payload_end,
                               limits=limits)
        inp = sys.stdin.buffer
        while True:
            kind, payload = _read_frame(inp)
            if kind == "add":
                builder.add_all(payload)
            else:
                builder.finish(payload)
                builder = None
                break
        _write_frame(out, ("ok",))
    except BaseException as e:  # reported to the parent, which raises it
        if builder is not None:
            builder.abort()
        try:
            _write_frame(out, ("error", isinstance(e, FormatError), str(e)))
        except OSError:
            pass
        sys.exit(1)


class ProcessIndexBuilder:
    """IndexBuilder's interface, with the builder in a child process fed with entries.

    A plain subprocess (no fork of a threaded parent, no re-import of its __main__);
    entries travel as msgpack arrays in batches over a pipe (TocEntry is a tuple: packed
    as it is, unpacked as a plain tuple).
    """

    BATCH = 20000

    def __init__(self, path: Path, *, name: str, fmt: str, payload_end: int,
                 limits: TocLimits | None = None) -> None:
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.name = name
        self.entries = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from crfs_worker.index import _builder_main; _builder_main()",
             str(path), name, fmt, str(payload_end), json.dumps(asdict(limits or TocLimits()))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )

    def add_all(self, entries: Iterable[TocEntry]) -> None:
        batch: list[tuple] = []
        append = batch.append
        n = self.BATCH
        for e in entries:
            append(e)
            if len(batch) >= n:
                self._send(("add", batch))
                self.entries += len(batch)
                batch = []
                append = batch.append
        if batch:
            self._send(("add", batch))
            self.entries += len(batch)

    def _send(self, msg: tuple) -> None:
        try:
            _write_frame(self.proc.stdin, msg)
        except OSError:
            self._fail()

    def _fail(self) -> None:
        msg = None
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            msg = _read_frame(self.proc.stdout)
        except (EOFError, OSError, ValueError, msgpack.UnpackException):
            pass
        status = self.proc.poll()  # before abort: how it ended, if it did on its own
        self.abort()
        if msg and msg[0] == "error":
            raise (FormatError if msg[1] else CrfsError)(msg[2])
        how = "" if status is None else f" (killed by signal {-status})" if status < 0 else f" (exit status {status})"
        raise CrfsError(f"{self.name}: the index builder process failed{how}")

    def finish(self, meta: dict[str, object]) -> None:
        self._send(("finish", meta))
        try:
            self.proc.stdin.close()
            msg = _read_frame(self.proc.stdout)
        except (EOFError, OSError, ValueError, msgpack.UnpackException):
            self._fail()
            return
        if msg[0] != "ok":
            self.abort()
            raise (FormatError if msg[1] else CrfsError)(msg[2])
        self.proc.wait()
        self.proc.stdout.close()

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def make_builder(path: Path, *, name: str, fmt: str, payload_end: int,
                 json_size: int | None, limits: TocLimits | None = None) -> IndexBuilder | ProcessIndexBuilder:
    """A builder process for large TOCs (when one can be started), else one in-process."""
    if json_size is not None and json_size >= PROCESS_BUILD_MIN_JSON and sys.executable:
        try:
            return ProcessIndexBuilder(path, name=name, fmt=fmt, payload_end=payload_end,
                                       limits=limits)
        except OSError:
            pass
    return IndexBuilder(path, name=name, fmt=fmt, payload_end=payload_end, limits=limits)


# ------------------------------------------------------------------------ reading

_STAT_COLS = "ino, mode, nlink, uid, gid, size, mtime_ns, rdev_major, rdev_minor"


class Index:
    """Read-only view of a built index file. Methods may be called from several threads."""

    def __init__(self, path: Path, name: str = "layer") -> None:
        self.path = Path(path)
        self.name = name
        uri = "file:" + str(self.path.resolve()) + "?mode=ro&immutable=1"
        try:
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.meta = dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as e:
            raise FormatError(f"{self.path}: not a usable crfs index: {e}") from None
        if self.meta.get("schema") != SCHEMA_VERSION:
            raise FormatError(f"{self.path}: index schema {self.meta.get('schema')!r} is not "
                              f"{SCHEMA_VERSION}")
        self._dir_cache: dict[str, int] = {"": ROOT_INO}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def _one(self, sql: str, args: tuple) -> tuple | None:
        with self._lock:
            return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # -- lookups

    def lookup(self, path: str) -> tuple[int, EntryStat]:
        """The inode and stat of a normalised path. FileNotFoundError / NotADirectoryError."""
        if path == "":
            return ROOT_INO, self.stat(ROOT_INO)
        parent, _, base = path.rpartition("/")
        pino = self._dir(parent, path)
        row = self._one(f"SELECT {_STAT_COLS} FROM node WHERE parent = ? AND name = ?", (pino, base))
        if row is None:
            raise FileNotFoundError(2, f"{self.name}: no such file or directory", path)
        return row[0], EntryStat(*row)

    def _dir(self, path: str, full: str) -> int:
        ino = self._dir_cache.get(path)
        if ino is not None:
            return ino
        parent, _, base = path.rpartition("/")
        pino = self._dir(parent, full)
        row = self._one("SELECT ino, mode FROM node WHERE parent = ? AND name = ?", (pino, base))
        if row is None:
            raise FileNotFoundError(2, f"{self.name}: no such file or directory", full)
        if not st.S_ISDIR(row[1]):
            raise NotADirectoryError(20, f"{self.name}: not a directory: {path!r}", full)
        if len(self._dir_cache) > 8192:
            self._dir_cache = {"": ROOT_INO}
        self._dir_cache[path] = row[0]
        return row[0]

    def stat(self, ino: int) -> EntryStat:
        row = self._one(f"SELECT {_STAT_COLS} FROM node WHERE seq = ?", (ino,))
        if row is None or row[0] != ino:
            raise FileNotFoundError(2, f"{self.name}: no inode {ino}")
        return EntryStat(*row)

    def children(self, ino: int) -> list[tuple[str, EntryStat]]:
        rows = self._all(f"SELECT name, {_STAT_COLS} FROM node WHERE parent = ? ORDER BY name", (ino,))
        return [(r[0], EntryStat(*r[1:])) for r in rows]

    def readlink(self, ino: int) -> str | None:
        row = self._one("SELECT link FROM node WHERE seq = ?", (ino,))
        return row[0] if row and row[0] else None

    def file_digest(self, ino: int) -> bytes | None:
        row = self._one("SELECT digest FROM node WHERE seq = ?", (ino,))
        return bytes(row[0]) if row and row[0] else None

    def xattrs(self, ino: int) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in
                self._all("SELECT name, value FROM xattr WHERE ino = ? ORDER BY name", (ino,))}

    def chunks(self, ino: int, offset: int = 0, end: int | None = None) -> list[ChunkRow]:
        """The chunks of a regular file that overlap [offset, end) (all when end is None)."""
        if end is None:
            end = 2**63 - 1
        row = self._one("SELECT size, cstart, cend, inner, cdigest, zeros, digest FROM node "
                        "WHERE seq = ?", (ino,))
        if row is None or row[0] == 0:
            return []
        if row[1]:  # one chunk: the whole file, vouched for by its chunk or file digest
            return [ChunkRow(0, row[0], row[1], row[2], row[3], bytes(row[4] or row[6]) or None,
                             bool(row[5]))]
        rows = self._all(
            "SELECT foff, size, cstart, cend, inner, digest, zeros FROM chunk "
            "WHERE ino = ? AND foff < ? AND foff >= coalesce(("
            "  SELECT max(foff) FROM chunk WHERE ino = ? AND foff <= ?), 0) ORDER BY foff",
            (ino, end, ino, offset),
        )
        return [ChunkRow(r[0], r[1], r[2], r[3], r[4], r[5] or None, bool(r[6])) for r in rows]

    def chunk_count(self, ino: int) -> int:
        """The number of a regular file's rows in the chunk table (0 for a file of one
        chunk, which its node row holds, and for one without data)."""
        row = self._one("SELECT count(*) FROM chunk WHERE ino = ?", (ino,))
        return row[0] if row else 0

    def data_files_beside(self, ino: int, *, forward: bool = True,
                          batch: int = 64) -> Iterator[tuple[str, int]]:
        """(name, ino) of the regular files with data of their own that share the
        directory of entry `ino` and come after it in TOC order (which is blob order), or
        with `forward=False` before it, nearest first; the run ends at the first entry of
        another directory. Directories, links, hardlinks and empty files are passed over.
        Lazy: a caller that stops early reads only a batch or two of rows."""
        row = self._one("SELECT parent FROM node WHERE seq = ?", (ino,))
        if row is None:
            return
        parent = row[0]
        sql = ("SELECT seq, parent, name, ino, mode, size FROM node WHERE seq > ? ORDER BY seq LIMIT ?"
               if forward else
               "SELECT seq, parent, name, ino, mode, size FROM node WHERE seq < ? ORDER BY seq DESC LIMIT ?")
        seq = ino
        while True:
            rows = self._all(sql, (seq, batch))
            if not rows:
                return
            for seq, node_parent, name, node_ino, mode, size in rows:
                if node_parent != parent:
                    return
                if node_ino == seq and st.S_ISREG(mode) and size > 0:
                    yield name, node_ino

    def walk(self) -> Iterator[tuple[str, EntryStat]]:
        """Every node of the tree (root first, then TOC order of first appearance)."""
        yield "", self.stat(ROOT_INO)
        paths: dict[int, str] = {ROOT_INO: ""}
        cur = self.db.cursor()
        cur.execute(f"SELECT parent, name, {_STAT_COLS} FROM node WHERE +parent > 0 ORDER BY seq")
        while True:
            with self._lock:
                batch = cur.fetchmany(4096)
            if not batch:
                return
            for row in batch:
                ppath = paths.get(row[0])
                if ppath is None:  # cannot happen for an index this module built
                    raise FormatError(f"{self.path}: index entry {row[1]!r} has no parent")
                path = ppath + "/" + row[1] if ppath else row[1]
                s = EntryStat(*row[2:])
                if st.S_ISDIR(s.mode):
                    paths[s.ino] = path
                yield path, s
