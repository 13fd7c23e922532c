"""A read-only pyfuse3 view of the worker's layers, so the plugin can get real fds.

    MOUNT/NUM/PATH     layer NUM's tree as the tar holds it (whiteout files included)

fuse-overlayfs needs kernel fds: a directory fd whose fstat shows the layer's metadata,
a file fd whose flistxattr/fgetxattr show the entry's xattrs, and an fd on a large file
that reads before the file was fetched. The view gives all three: metadata comes from
the layer index, file bytes are fetched chunk by chunk when the kernel reads them.
Inode numbers are the plugin's (layer number in the high bits), so d_ino and st_ino
agree with what statat reports. The view runs its trio loop in its own thread; layer
calls go to worker threads, because they may block on the network.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pyfuse3
import trio

from .errors import CrfsError
from .layerkeys import compose_ino

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 3600.0  # layers never change: let the kernel keep what it learned


class EntryStatLike(Protocol):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev_major: int
    rdev_minor: int


class ViewSource(Protocol):
    """What the view needs from the worker's layers (lowerlayer.LayerTable provides it)."""

    def layer_numbers(self) -> list[int]: ...
    def stat(self, num: int, path: str) -> EntryStatLike: ...
    def readdir(self, num: int, path: str) -> list[tuple[str, EntryStatLike]]: ...
    def readlink(self, num: int, path: str) -> str: ...
    def listxattr(self, num: int, path: str) -> list[str]: ...
    def getxattr(self, num: int, path: str, name: str) -> bytes: ...
    def read(self, num: int, path: str, offset: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class _Node:
    num: int   # layer number, 0 for the view root
    path: str  # layer-relative path, "" for the layer root


@dataclass(frozen=True)
class _Listing:
    """An open directory: its entries, read once at opendir."""

    node: _Node
    entries: list[tuple[str, EntryStatLike]]

    def child(self, name: str) -> _Node:
        if self.node.num == 0:
            return _Node(int(name), "")
        return _Node(self.node.num, _join(self.node.path, name))


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


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


class ViewOperations(pyfuse3.Operations):
    """The FUSE side: inode numbers map back to (layer, path) as the kernel learns them."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, source: ViewSource) -> None:
        super().__init__()
        self.source = source
        self._nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node(0, "")}
        self._lookups: dict[int, int] = {}  # the kernel's references, per inode
        self._handles: dict[int, _Node] = {}
        self._listings: dict[int, _Listing] = {}
        self._next_fh = itertools.count(1)

    # ---- helpers

    def _meta(self, fn: Callable[..., Any], *args: object) -> Any:
        """A metadata call, answered in the loop's thread: the index is local, and a
        thread hop would cost more than the query (fuse-overlayfs asks a lot)."""
        try:
            return fn(*args)
        except CrfsError as exc:
            log.warning("view: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except (OSError, KeyError) as exc:
            raise pyfuse3.FUSEError(_errno_of(exc)) from exc
        except Exception as exc:  # an escaping exception would end the whole view
            log.exception("view: %s failed", getattr(fn, "__name__", fn))
            raise pyfuse3.FUSEError(errno.EIO) from exc

    async def _call(self, fn: Callable[..., object], *args: object) -> object:
        """A call that may block on the network: in a worker thread."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except CrfsError as exc:
            log.warning("view: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except (OSError, KeyError) as exc:
            raise pyfuse3.FUSEError(_errno_of(exc)) from exc
        except Exception as exc:  # an escaping exception would end the whole view
            log.exception("view: %s failed", getattr(fn, "__name__", fn))
            raise pyfuse3.FUSEError(errno.EIO) from exc

    def _node(self, inode: int) -> _Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _attrs(self, num: int, st: EntryStatLike) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = compose_ino(num, st.ino)
        attr.generation = 0
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_mode = st.mode
        attr.st_nlink = st.nlink
        attr.st_uid = st.uid
        attr.st_gid = st.gid
        attr.st_rdev = os.makedev(st.rdev_major, st.rdev_minor)
        attr.st_size = st.size
        attr.st_blksize = 4096
        attr.st_blocks = (st.size + 511) // 512
        attr.st_atime_ns = st.mtime_ns
        attr.st_mtime_ns = st.mtime_ns
        attr.st_ctime_ns = st.mtime_ns
        return attr

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        attr.st_mode = stat.S_IFDIR | 0o500
        attr.st_nlink = 2
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_blksize = 4096
        return attr

    async def _node_attrs(self, node: _Node) -> pyfuse3.EntryAttributes:
        return self._attrs(node.num, self._meta(self.source.stat, node.num, node.path))

    # ---- metadata

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        if parent.num == 0:
            if not text.isdigit() or int(text) not in self.source.layer_numbers():
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = _Node(int(text), "")
        else:
            node = _Node(parent.num, _join(parent.path, text))
        attr = await self._node_attrs(node)
        self._remember(attr.st_ino, node)
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.num == 0:
            return self._root_attrs()
        return await self._node_attrs(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        return os.fsencode(self._meta(self.source.readlink, node.num, node.path))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        if node.num == 0:
            return []
        return [os.fsencode(n) for n in self._meta(self.source.listxattr, node.num, node.path)]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.num == 0:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return self._meta(self.source.getxattr, node.num, node.path, os.fsdecode(name))

    def _remember(self, ino: int, node: _Node) -> None:
        """The kernel now holds one more reference to `ino`."""
        self._nodes.setdefault(ino, node)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
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
        node = self._node(inode)
        if node.num == 0:
            entries: list[tuple[str, EntryStatLike]] = []
            for num in self.source.layer_numbers():
                entries.append((str(num), self._meta(self.source.stat, num, "")))
        else:
            entries = self._meta(self.source.readdir, node.num, node.path)
        listing = _Listing(node, sorted(entries, key=lambda item: item[0]))
        fh = next(self._next_fh)
        self._listings[fh] = listing
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(listing.entries)):
            name, st = listing.entries[index]
            child = listing.child(name)
            attrs = self._attrs(child.num, st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                return
            self._remember(attrs.st_ino, child)  # readdirplus: the kernel took a reference

    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    # ---- files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._next_fh)
        self._handles[fh] = node
        # Opening fetches nothing: bytes come when the kernel reads them.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._handles.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if size <= 0:
            return b""
        # Short at the end of the file: the layer clamps to the file size.
        return await self._call(self.source.read, node.num, node.path, off, size)  # type: ignore[return-value]

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)


# Flags a plugin open may carry to the view; anything else (writes, O_CREAT...) is refused
# before this point. O_NOFOLLOW and O_CLOEXEC are always added.
_PASS_FLAGS = os.O_NONBLOCK | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_PATH | os.O_LARGEFILE


def unmount_stale(mountpoint: Path) -> None:
    """A view left by a dead worker answers ENOTCONN: detach it so we can mount again."""
    try:
        os.stat(mountpoint)
        if not os.path.ismount(mountpoint):
            return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class FileView:
    """Mounts the view at `mountpoint` (serving it from a thread) and opens fds on it."""

    source: ViewSource
    mountpoint: Path
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _token: trio.lowlevel.TrioToken | None = field(default=None, init=False, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def alive(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    def mount(self, timeout: float = 30.0) -> None:
        unmount_stale(self.mountpoint)
        self.mountpoint.mkdir(mode=0o700, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="crfs-view", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise CrfsError(f"cannot mount the layer view at {self.mountpoint}: {self._error or 'timeout'}")

    def _run(self) -> None:
        options = (set(pyfuse3.default_options) - {"default_permissions"}) | {
            "fsname=crfs", "subtype=crfs-view", "ro", "nodev", "nosuid",
        }
        try:
            pyfuse3.init(ViewOperations(self.source), str(self.mountpoint), options)
        except Exception as exc:  # reported by mount()
            self._error = exc
            self._ready.set()
            self._stopped.set()
            return
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("the layer view stopped")
        finally:
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
        return os.open(self.mountpoint / str(num), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, num: int, parts: list[str], flags: int) -> int:
        """Opens layer `num`'s entry at `parts`, one component at a time so that no symlink
        in a layer (whose target could be anything on the host) is ever followed."""
        final_flags = (flags & _PASS_FLAGS) | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if not parts:
            return os.open(self.mountpoint / str(num), final_flags)
        dir_fd = os.open(self.mountpoint / str(num), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            return os.open(parts[-1], final_flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
