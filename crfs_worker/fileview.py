"""The worker's one pyfuse3 mount: the layer view crfs.so takes fds from, and (when the
worker serves podman) the additional layer store, as trees of `fusetree.Node`.

    VIEW/NUM/PATH     layer NUM's tree as the tar holds it (whiteout files included)

VIEW is the mount itself, or `MOUNT/.layers` when the mount is podman's layer store
(layerstore.py). fuse-overlayfs needs kernel fds: a directory fd whose fstat shows the
layer's metadata, a file fd whose flistxattr/fgetxattr show the entry's xattrs, and an fd
on a large file that reads before the file was fetched. The view gives all three:
metadata comes from the layer index, file bytes are fetched chunk by chunk when the
kernel reads them. Inode numbers are the plugin's (layer number in the high bits), so
d_ino and st_ino agree with what statat reports. The mount runs its trio loop in its own
thread; calls that may block on the network go to worker threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pyfuse3
import trio

from .errors import CrfsError
from .fusetree import ATTR_TIMEOUT, BaseNode, FileHandle, Node, NodeAttr, fs_error, refuse_writes
from .layer import EntryStat
from .layerkeys import compose_ino
from .readrun import ReadRun
from .recent import Recent

log = logging.getLogger(__name__)

VIEW_ROOT_INO = 2  # the view's root when it is not the mount's root


class ViewSource(Protocol):
    """What the view needs from the worker's layers (lowerlayer.LayerTable provides it)."""

    def layer_numbers(self) -> list[int]: ...
    def stat(self, num: int, path: str) -> EntryStat: ...
    def readdir(self, num: int, path: str) -> list[tuple[str, EntryStat]]: ...
    def readlink(self, num: int, path: str) -> str: ...
    def listxattr(self, num: int, path: str) -> list[str]: ...
    def getxattr(self, num: int, path: str, name: str) -> bytes: ...
    def read(self, num: int, path: str, offset: int, size: int) -> bytes: ...
    def hold_local(self, num: int, path: str) -> list[bytes] | None: ...
    def release_local(self, held: list[bytes]) -> None: ...
    def ensure_local(self, num: int, path: str, offset: int, size: int) -> None: ...


# fuse-overlayfs reads a lower file in requests of at most this many bytes (its mount's
# max_read), which the kernel may pass on to us in smaller pieces.
SPLICE_REQUEST = 128 << 10
FUSE_OVERLAYFS = b"fuse-overlayfs"  # in its command or program name


def reads_by_splice(pid: int) -> bool:
    """Whether the process opening a file is fuse-overlayfs. It answers a read that failed
    after some bytes with a SHORT reply, which the kernel takes for the end of the file:
    the rest of the container's read becomes zeros. (The kernel's overlayfs passes the
    short read on as it is; crfs.so hands fuse-overlayfs O_DIRECT fds.)

    By its command name, or by its program's name when the name the kernel keeps is
    another: a build run through the dynamic loader (comm "ld-linux-x86-64") or a
    wrapper's renamed copy. A false positive only costs that reader direct reads."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            if FUSE_OVERLAYFS in comm.read():
                return True
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read(4096).split(b"\0")
    except OSError:
        return False
    return any(FUSE_OVERLAYFS in os.path.basename(arg) for arg in _program_args(argv))


def _program_args(argv: list[bytes]) -> list[bytes]:
    """argv[0], and for the dynamic loader (`ld-linux-x86-64.so.2 [--option VALUE]...
    PROGRAM ...`) the program it runs."""
    if not argv or not os.path.basename(argv[0]).startswith((b"ld-linux", b"ld.so")):
        return argv[:1]
    rest = argv[1:]
    while rest and rest[0].startswith(b"--"):
        rest = rest[2:] if rest[0] in (b"--library-path", b"--argv0", b"--preload", b"--audit") else rest[1:]
    return argv[:1] + rest[:1]


@dataclass
class OpenFile:
    """An open file of the mount: its handle; the read stream that pushes pages ahead
    (None for direct I/O); for fuse-overlayfs, the chunks held local while the file is
    open, or `guarded`: every read first fetches what fuse-overlayfs's next pieces of the
    same request will need, so that a failure fails the request's first piece."""

    handle: FileHandle
    stream: "ReadStream | None"
    held: list[bytes] | None = None
    guarded: bool = False


def entry_attr(ino: int, st: EntryStat) -> NodeAttr:
    """A layer entry's attributes under inode number `ino`."""
    return NodeAttr(ino, st.mode, st.nlink, st.uid, st.gid, st.size, st.mtime_ns,
                    os.makedev(st.rdev_major, st.rdev_minor))


def join_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# ---------------------------------------------------------------------------- the layer view


@dataclass(frozen=True)
class LayerFileHandle:
    source: ViewSource
    num: int
    path: str

    def read(self, offset: int, size: int) -> bytes:
        # Short at the end of the file: the layer clamps to the file size.
        return self.source.read(self.num, self.path, offset, size)


@dataclass(frozen=True)
class LayerViewEntry(BaseNode):
    """An entry of layer `num` as the tar holds it."""

    source: ViewSource
    num: int
    path: str  # layer-relative, "" for the layer's root
    miss_timeout = ATTR_TIMEOUT  # a layer never changes

    def attr(self) -> NodeAttr:
        st = self.source.stat(self.num, self.path)
        return entry_attr(compose_ino(self.num, st.ino), st)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        child = LayerViewEntry(self.source, self.num, join_path(self.path, name))
        return child, child.attr()

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        return [(name, LayerViewEntry(self.source, self.num, join_path(self.path, name)),
                 entry_attr(compose_ino(self.num, st.ino), st))
                for name, st in self.source.readdir(self.num, self.path)]

    def readlink(self) -> str:
        return self.source.readlink(self.num, self.path)

    @cached_property
    def _xattrs(self) -> dict[str, bytes]:
        """The entry's xattrs, read once per node: the kernel caches no xattr, and
        fuse-overlayfs asks for two of every entry it opens."""
        return {name: self.source.getxattr(self.num, self.path, name)
                for name in self.source.listxattr(self.num, self.path)}

    def xattr_names(self) -> list[str]:
        return list(self._xattrs)

    def xattr(self, name: str) -> bytes:
        return self._xattrs[name]

    def open(self, flags: int) -> FileHandle:
        refuse_writes(flags, self.path)
        # Opening fetches nothing: bytes come when the kernel reads them.
        return LayerFileHandle(self.source, self.num, self.path)


@dataclass(frozen=True)
class LayerViewRoot(BaseNode):
    """Lists the worker's open layers by number."""

    source: ViewSource
    ino: int = pyfuse3.ROOT_INODE
    may_block = True  # looking up a layer may open it (fetch its TOC)

    def attr(self) -> NodeAttr:
        return NodeAttr.directory(self.ino, timeout=0)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        if not name.isdigit() or int(name) not in self.source.layer_numbers():
            raise fs_error(errno.ENOENT, name)
        child = LayerViewEntry(self.source, int(name), "")
        return child, child.attr()

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        out: list[tuple[str, Node, NodeAttr]] = []
        for num in self.source.layer_numbers():
            child = LayerViewEntry(self.source, num, "")
            out.append((str(num), child, child.attr()))
        return out


# ---------------------------------------------------------------------------- pushed read-ahead

PAGE = 4096
PUSH_AFTER = 1 << 20     # a sequential run this long starts pushing
PUSH_AHEAD = 64 << 20    # at most this far past the reader's last read pages are pushed
PUSH_PIECE = 4 << 20     # bytes per notify_store (one chunk store chunk, typically)
RUN_SLACK = 512 << 10    # the kernel's readahead reads arrive a little out of order


@dataclass
class ReadStream:
    """How one open file is being read: a sequential run, and how far pages were pushed."""

    inode: int
    run: ReadRun = field(default_factory=ReadRun)
    queued_to: int = 0    # pieces below this offset are pushed or being pushed
    closed: bool = False  # released, or a push failed: push no more


StoreFn = Callable[[int, int, bytes], None]


@dataclass
class ReadAheadPusher:
    """Puts the next pages of a sequentially read file into the kernel's page cache with
    FUSE notify_store, PUSH_PIECE bytes a message, from threads of its own (two pieces at a
    time: one reads the chunk store while the other copies into the kernel).

    The kernel asks a FUSE server for at most its readahead window per read (128 KiB;
    only root may raise the mount's read_ahead_kb), and each
    request costs a round through the pyfuse3 loop. Pushed pages are read from the page
    cache without a request. The bytes pushed are what the read handler would return
    (the layer's verified read), so nothing unverified reaches the cache; a push that
    fails stops the file's pushing, and the reader's own read reports the error."""

    store: StoreFn
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="crfs-push"),
        init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _idle: threading.Condition = field(init=False, repr=False)
    _active: int = field(default=0, init=False)   # pieces submitted and not yet ended
    _stopped: bool = field(default=False, init=False)
    pushed_bytes: int = field(default=0, init=False)  # for tests and profiling

    def __post_init__(self) -> None:
        self._idle = threading.Condition(self._lock)

    def note_read(self, stream: ReadStream, handle: FileHandle, offset: int, asked: int, got: int) -> None:
        """Called after each read the handler answered; queues pieces when the file is
        being read sequentially and the queued pages are running out."""
        end = offset + got
        with self._lock:
            # The reader skips the queued pages: a read up to past them continues the run.
            stream.run.note(offset, got, RUN_SLACK, reach=stream.queued_to)
            # As far ahead as the run is long (up to PUSH_AHEAD): a reader that stops early
            # makes the worker fetch at most about as much again as it read.
            ahead = min(PUSH_AHEAD, max(PUSH_PIECE, stream.run.length))
            if (self._stopped or stream.closed or got < asked  # end of file
                    or stream.run.length < PUSH_AFTER or stream.queued_to >= end + ahead // 2):
                return
            start, limit = max(stream.queued_to, end - end % PAGE), end + ahead
            stream.queued_to = limit
            pieces = range(start, limit, PUSH_PIECE)
            self._active += len(pieces)
        for piece in pieces:
            self._executor.submit(self._push, stream, handle, piece, min(PUSH_PIECE, limit - piece))

    def close(self, stream: ReadStream) -> None:
        """The file was released: push no more of it."""
        with self._lock:
            stream.closed = True

    def _push(self, stream: ReadStream, handle: FileHandle, offset: int, size: int) -> None:
        try:
            with self._lock:
                if self._stopped or stream.closed:
                    return
            data = handle.read(offset, size)  # short or empty past the end of the file
            if data:
                self.store(stream.inode, offset, data)
            with self._lock:
                self.pushed_bytes += len(data)
        except Exception as exc:  # e.g. a chunk failed verification: its reader will see EIO
            log.debug("view: read-ahead push of inode %d at %d stopped: %s", stream.inode, offset, exc)
            with self._lock:
                stream.closed = True
        finally:
            with self._lock:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every push started so far has ended within `timeout` seconds."""
        with self._lock:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Waits for pushes in progress: none may reach the FUSE session once it is closed.
        Bounded: a push waiting on a page whose read the stopped loop will never answer
        must not keep the worker from exiting."""
        with self._lock:
            self._stopped = True
            if not self._idle.wait_for(lambda: self._active == 0, timeout):
                log.warning("view: a read-ahead push did not end within %.0f s", timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- directory listings

Listing = list[tuple[str, Node, NodeAttr]]
LISTED_ENTRIES = 1 << 16  # entries of immutable directories kept listed (~0.6 KiB each)


@dataclass
class OpenDir:
    """An open directory: listed at its first readdir (fuse-overlayfs opens every entry it
    looks up, directories too, without reading them, unless fast_ino)."""

    inode: int
    node: Node
    listing: Listing | None = None


# ---------------------------------------------------------------------------- FUSE side


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT
    if isinstance(exc, NotADirectoryError):
        return errno.ENOTDIR
    if isinstance(exc, KeyError):
        return pyfuse3.ENOATTR
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _fuse_error(exc: BaseException, what: str) -> pyfuse3.FUSEError:
    if isinstance(exc, CrfsError):
        log.warning("%s: %s", what, exc)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(exc, (OSError, KeyError)):
        return pyfuse3.FUSEError(_errno_of(exc))
    # An escaping exception would end the whole mount.
    log.error("%s failed", what, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


class ViewOperations(pyfuse3.Operations):
    """Inode numbers map to nodes as the kernel learns them (lookup, readdirplus) and are
    dropped when it forgets them."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, root: Node, store: StoreFn = pyfuse3.notify_store) -> None:
        super().__init__()
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self._lookups: dict[int, int] = {}  # the kernel's references, per inode
        self._handles: dict[int, OpenFile] = {}
        self.pusher = ReadAheadPusher(store)
        self._dirs: dict[int, OpenDir] = {}
        # The latest listings of immutable directories (a layer's), LISTED_ENTRIES entries
        # in all: each new container's fuse-overlayfs lists every directory it walks again.
        self.listed: Recent[int, Listing] = Recent(LISTED_ENTRIES, len)
        self._next_fh = itertools.count(1)

    # ---- helpers

    async def _run(self, blocking: bool, fn: Callable[..., Any], *args: object) -> Any:
        """Metadata of local indexes is answered in the loop's thread (a thread hop would
        cost more than the query, and fuse-overlayfs asks a lot); calls that may wait on
        the network run in a worker thread."""
        try:
            if blocking:
                return await trio.to_thread.run_sync(fn, *args)
            return fn(*args)
        except Exception as exc:
            raise _fuse_error(exc, f"view: {getattr(fn, '__name__', fn)}") from exc

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    @staticmethod
    def _entry(attr: NodeAttr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = 0
        entry.entry_timeout = attr.timeout
        entry.attr_timeout = attr.timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = 4096
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_atime_ns = attr.mtime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.mtime_ns
        return entry

    def _remember(self, ino: int, node: Node) -> None:
        """The kernel now holds one more reference to `ino`."""
        self._nodes.setdefault(ino, node)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    # ---- metadata

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        try:
            if parent.may_block:
                child, attr = await trio.to_thread.run_sync(parent.lookup, os.fsdecode(name))
            else:
                child, attr = parent.lookup(os.fsdecode(name))
        except FileNotFoundError:
            # The most frequent answer of all (overlay probes `.wh.NAME` for every entry):
            # no FUSEError round, and a kept miss where the directory cannot change.
            if parent.miss_timeout > 0:
                return self._miss(parent.miss_timeout)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except Exception as exc:
            raise _fuse_error(exc, "view: lookup") from exc
        self._remember(attr.ino, child)
        return self._entry(attr)

    @staticmethod
    def _miss(timeout: float) -> pyfuse3.EntryAttributes:
        """A negative entry: inode 0 with a timeout makes the kernel keep the miss (an
        ENOENT is never kept), so fuse-overlayfs's `.wh.NAME` probes come once."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = timeout
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        entry = self._entry(await self._run(False, node.attr))
        if inode == pyfuse3.ROOT_INODE:
            entry.st_ino = pyfuse3.ROOT_INODE
        return entry

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        return os.fsencode(await self._run(False, node.readlink))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        return [os.fsencode(n) for n in await self._run(False, node.xattr_names)]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        return await self._run(False, node.xattr, os.fsdecode(name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # The kernel forgets an inode only when nothing (no dentry, no open fd) uses it,
        # and looks it up again before any later use: the mapping can go.
        for ino, count in inode_list:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
            elif ino != pyfuse3.ROOT_INODE:
                self._lookups.pop(ino, None)
                self._nodes.pop(ino, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # ---- directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = next(self._next_fh)
        self._dirs[fh] = OpenDir(inode, self._node(inode))
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        opened = self._dirs.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if opened.listing is None:
            opened.listing = await self._listing(opened.inode, opened.node)
        listing = opened.listing
        for index in range(start_id, len(listing)):
            name, child, attr = listing[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), index + 1):
                return
            self._remember(attr.ino, child)  # readdirplus: the kernel took a reference

    async def _listing(self, inode: int, node: Node) -> Listing:
        # Only a directory whose misses the kernel may keep can never change.
        immutable = node.miss_timeout > 0
        listing = self.listed.get(inode) if immutable else None
        if listing is None:
            entries = await self._run(node.may_block, node.children)
            listing = sorted(entries, key=lambda item: item[0])
            if immutable:
                self.listed.put(inode, listing)
        return listing

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ---- files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        handle = await self._run(False, node.open, flags)
        held, guarded = None, False
        if isinstance(handle, LayerFileHandle) and reads_by_splice(ctx.pid):
            if flags & os.O_NONBLOCK:
                # Without fast_ino, fuse-overlayfs opens every entry it looks up so, only
                # to read origin xattrs: guarded at once, no thread hop and no chunk query
                # (a container's own O_NONBLOCK open is then read direct: correct, uncached).
                guarded = True
            else:
                # A file whose chunks are all local (held so while open) cannot fail a
                # read. Any other is served direct, every piece reaching us, and guarded.
                held = await self._run(True, handle.source.hold_local, handle.num, handle.path)
                guarded = held is None
        fh = next(self._next_fh)
        # A direct reader never looks in the page cache: pushing pages would be waste.
        stream = None if guarded or flags & os.O_DIRECT else ReadStream(inode)
        self._handles[fh] = OpenFile(handle, stream, held, guarded)
        return pyfuse3.FileInfo(fh=fh, keep_cache=not guarded, direct_io=guarded)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        opened = self._handles.get(fh)
        if opened is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if size <= 0:
            return b""
        if opened.guarded:
            data: bytes = await self._run(True, self._guarded_read, opened.handle, off, size)
        else:
            data = await self._run(True, opened.handle.read, off, size)
        if opened.stream is not None:
            self.pusher.note_read(opened.stream, opened.handle, off, size, len(data))
        return data

    @staticmethod
    def _guarded_read(handle: "LayerFileHandle", off: int, size: int) -> bytes:
        """First fetches what the rest of fuse-overlayfs's request needs, then reads: one
        thread hop for both."""
        handle.source.ensure_local(handle.num, handle.path, off, size + SPLICE_REQUEST)
        return handle.read(off, size)

    async def release(self, fh: int) -> None:
        opened = self._handles.pop(fh, None)
        if opened is None:
            return
        if opened.stream is not None:
            self.pusher.close(opened.stream)
        if opened.held is not None and isinstance(opened.handle, LayerFileHandle):
            opened.handle.source.release_local(opened.held)

    # ---- changes: only the layer store's `use` and release protocol (create, rmdir)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._node(parent_inode)
        await self._run(False, node.create, os.fsdecode(name))
        raise pyfuse3.FUSEError(errno.EROFS)  # nodes never create files

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(parent_inode)
        await self._run(False, node.rmdir, os.fsdecode(name))

    async def _read_only(self, *args: object) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mkdir = mknod = unlink = symlink = link = rename = _read_only  # type: ignore[assignment]
    setxattr = removexattr = _read_only  # type: ignore[assignment]


# ---------------------------------------------------------------------------- mounting


# Flags a plugin open may carry to the view; anything else (writes, O_CREAT...) is refused
# before this point. O_NOFOLLOW and O_CLOEXEC are always added.
_PASS_FLAGS = os.O_NONBLOCK | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_PATH | os.O_LARGEFILE | os.O_DIRECT
_MNT_DETACH = 2


def _detach(mountpoint: Path) -> None:
    """Lazy unmount. As (namespace) root directly: fusermount3 is setuid and refuses
    inside a user namespace; as a user through fusermount3."""
    if os.getuid() == 0:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) == 0:
            return
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def unmount_stale(mountpoint: Path) -> None:
    """A mount left by a dead worker answers ENOTCONN: detach it so we can mount again."""
    try:
        os.stat(mountpoint)
        if not os.path.ismount(mountpoint):
            return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
    _detach(mountpoint)


@dataclass
class FileView:
    """Mounts `root` at `mountpoint` (serving it from a thread) and opens fds on the layer
    view, whose NUM directories are in `view_dir` (default: the mountpoint)."""

    root: Node
    mountpoint: Path
    view_dir: Path | None = None
    read_only: bool = True
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _token: trio.lowlevel.TrioToken | None = field(default=None, init=False, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    operations: ViewOperations | None = field(default=None, init=False, repr=False)  # while mounted

    @property
    def alive(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    @property
    def layers_dir(self) -> Path:
        return self.view_dir or self.mountpoint

    def mount(self, timeout: float = 30.0) -> None:
        unmount_stale(self.mountpoint)
        self.mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="crfs-view", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise CrfsError(f"cannot mount the worker's FUSE tree at {self.mountpoint}: {self._error or 'timeout'}")

    def _run(self) -> None:
        # `ro` only when nothing is ever created or removed: the layer store needs both.
        options = (set(pyfuse3.default_options) - {"default_permissions"}) | {
            "fsname=crfs", "subtype=crfs-view", "nodev", "nosuid",
        } | ({"ro"} if self.read_only else set())
        operations = self.operations = ViewOperations(self.root)
        try:
            pyfuse3.init(operations, str(self.mountpoint), options)
        except Exception as exc:  # reported by mount()
            operations.pusher.stop()
            self._error = exc
            self._ready.set()
            self._stopped.set()
            return
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("the worker's FUSE tree stopped")
        finally:
            operations.pusher.stop()
            pyfuse3.close(unmount=True)
            self._stopped.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await pyfuse3.main(min_tasks=2, max_tasks=32)

    def unmount(self) -> None:
        if self._thread is None or self._token is None:
            return
        try:
            trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join(timeout=10)
        self._thread = None

    def root_fd(self, num: int) -> int:
        return os.open(self.layers_dir / str(num), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, num: int, parts: list[str], flags: int) -> int:
        """Opens layer `num`'s entry at `parts`, one component at a time so that no symlink
        in a layer (whose target could be anything on the host) is ever followed."""
        final_flags = (flags & _PASS_FLAGS) | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if not parts:
            return os.open(self.layers_dir / str(num), final_flags)
        dir_fd = os.open(self.layers_dir / str(num), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            return os.open(parts[-1], final_flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
