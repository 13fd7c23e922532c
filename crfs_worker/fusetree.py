"""The nodes of the worker's FUSE mount, and what the FUSE side needs from each of them.

pyfuse3 allows one FUSE session per process, so every tree the worker serves (the layer
view crfs.so takes fds from, podman's additional layer store) hangs under one root.
A tree is made of `Node` values; `fileview.ViewOperations` maps the kernel's inode
numbers to nodes and calls them. Nodes report errors as OSError with an errno
(FileNotFoundError, NotADirectoryError, ...), KeyError for a missing xattr, or
CrfsError (the reader sees EIO).
"""
from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

# Layers never change: let the kernel keep what it learned. A shorter time only makes it
# ask again, entry by entry, under a long-running container.
ATTR_TIMEOUT = 365 * 86400.0


def fs_error(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass(frozen=True)
class NodeAttr:
    """What the kernel is told about a node (lookup, getattr, readdirplus)."""

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    timeout: float = ATTR_TIMEOUT

    @classmethod
    def directory(cls, ino: int, mode: int = 0o500, timeout: float = ATTR_TIMEOUT) -> "NodeAttr":
        """A directory of the worker's own (not a layer's), owned by the worker's user."""
        return cls(ino, stat.S_IFDIR | mode, nlink=2, uid=os.getuid(), gid=os.getgid(), timeout=timeout)

    @classmethod
    def regular(cls, ino: int, size: int, mode: int = 0o400) -> "NodeAttr":
        return cls(ino, stat.S_IFREG | mode, size=size, uid=os.getuid(), gid=os.getgid())


class FileHandle(Protocol):
    """An open file: reads may block (they fetch from the registry), so they run in a thread."""

    def read(self, offset: int, size: int) -> bytes: ...


class Node(Protocol):
    # Whether lookup/children may wait on the network (then they run in a worker thread).
    may_block: bool
    # How long the kernel may remember that a name is NOT in this directory (0: ask every
    # time). Only an immutable directory can say more than 0.
    miss_timeout: float

    def attr(self) -> NodeAttr: ...
    def lookup(self, name: str) -> tuple["Node", NodeAttr]: ...
    def children(self) -> list[tuple[str, "Node", NodeAttr]]: ...
    def readlink(self) -> str: ...
    def xattr_names(self) -> list[str]: ...
    def xattr(self, name: str) -> bytes: ...
    def open(self, flags: int) -> FileHandle: ...
    def create(self, name: str) -> None: ...
    def rmdir(self, name: str) -> None: ...


class BaseNode(ABC):
    """Defaults: a read-only node that is neither a directory, a symlink nor a file."""

    may_block = False
    miss_timeout = 0.0

    @abstractmethod
    def attr(self) -> NodeAttr:
        """Every node says what it is."""

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        raise fs_error(errno.ENOTDIR, name)

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        raise fs_error(errno.ENOTDIR, "readdir")

    def readlink(self) -> str:
        raise fs_error(errno.EINVAL, "readlink")

    def xattr_names(self) -> list[str]:
        return []

    def xattr(self, name: str) -> bytes:
        raise KeyError(name)

    def open(self, flags: int) -> FileHandle:
        raise fs_error(errno.EACCES, "open")

    def create(self, name: str) -> None:
        raise fs_error(errno.EROFS, name)

    def rmdir(self, name: str) -> None:
        raise fs_error(errno.EROFS, name)


def refuse_writes(flags: int, what: str) -> None:
    """Everything the worker serves is read-only."""
    if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
        raise fs_error(errno.EROFS, what)


@dataclass(frozen=True)
class BytesHandle:
    """An open in-memory file."""

    data: bytes

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


@dataclass(frozen=True)
class BytesFile(BaseNode):
    """A small read-only file whose content is known when it is looked up."""

    ino: int
    data: bytes

    def attr(self) -> NodeAttr:
        return NodeAttr.regular(self.ino, len(self.data))

    def open(self, flags: int) -> FileHandle:
        refuse_writes(flags, "in-memory file")
        return BytesHandle(self.data)
