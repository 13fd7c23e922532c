"""How much of the kernel's asking reaches the worker's FUSE tree (fileview.py), counted.

The worker's one pyfuse3 mount is served here in the test process over a real LayerTable
(a blobgen eStargz layer in a file): the layer view crfs.so opens fds on, and one layer's
`diff` tree as podman's additional layer store shows it. `CountingLayers` passes every
call through to the table and counts it: each count is a kernel request that reached the
tree's nodes. A layer never changes, so a miss in it is kept by the kernel (a negative
entry) and each node reads its xattrs once; the view's root, whose layers come and go,
is asked every time.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from crfs_worker.chunkstore import ChunkStore
from crfs_worker.fileview import VIEW_ROOT_INO, FileView, LayerViewRoot
from crfs_worker.fusetree import BaseNode, Node, NodeAttr, fs_error
from crfs_worker.layerkeys import KeyStore, LayerRecord
from crfs_worker.layerstore import DiffEntry
from crfs_worker.lowerlayer import LayerTable
from crfs_worker.prefetch import FetchOptions
from tests import blobgen

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

SPECS = [
    blobgen.dir_("etc"),
    blobgen.reg("etc/passwd", b"root:x:0:0\n", xattrs={"user.origin": b"tar", "user.other": b"2"}),
    blobgen.reg("etc/plain", b"no xattrs\n"),
    blobgen.reg("etc/.wh.shadow", b""),
    blobgen.dir_("opq"),
    blobgen.reg("opq/.wh..wh..opq", b""),
    blobgen.reg("opq/kept", b"kept\n"),
    blobgen.dir_("lazy"),
    blobgen.reg("lazy/file", b"x"),
]


@dataclass
class CountingLayers:
    """The real layer table; `calls` counts (method, path) of what the tree asked."""

    table: LayerTable
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.table, name)
        if not callable(target) or name in ("get", "mount"):
            return target

        def counted(*args: Any) -> Any:
            self.calls[(name, str(args[1]) if len(args) > 1 else "")] += 1
            return target(*args)
        return counted


@dataclass(frozen=True)
class BothTrees(BaseNode):
    """The mount's root: `view` (the layer view) and `diff` (the layer in overlay form),
    each over its own counter."""

    view_layers: CountingLayers
    diff_layers: CountingLayers
    num: int

    def attr(self) -> NodeAttr:
        return NodeAttr.directory(1, 0o555, timeout=0)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        node: Node
        if name == "view":
            node = LayerViewRoot(self.view_layers, ino=VIEW_ROOT_INO)  # type: ignore[arg-type]
        elif name == "diff":
            node = DiffEntry(self.diff_layers, self.num, 1, "")  # type: ignore[arg-type]
        else:
            raise fs_error(errno.ENOENT, name)
        return node, node.attr()


@dataclass
class Mounted:
    view: FileView
    mountpoint: Path
    view_layers: CountingLayers
    diff_layers: CountingLayers
    num: int

    @property
    def diff(self) -> Path:
        return self.mountpoint / "diff"

    @property
    def layer(self) -> Path:
        return self.mountpoint / "view" / str(self.num)

    def in_diff(self, method: str, path: str) -> int:
        return self.diff_layers.calls[(method, path)]

    def in_view(self, method: str, path: str) -> int:
        return self.view_layers.calls[(method, path)]


@pytest.fixture(scope="module")
def mounted() -> Iterator[Mounted]:
    base = Path(tempfile.mkdtemp(prefix="crfs-fv-"))
    blob = blobgen.estargz(SPECS)
    (base / "layer.esgz").write_bytes(blob.data)
    keys = KeyStore(base / "rt")
    num = keys.number_for(LayerRecord("file", str(base / "layer.esgz"), toc_digest=blob.toc_digest))
    table = LayerTable(keys, base / "index", ChunkStore(base / "chunks"), FetchOptions(background=False))
    view_layers, diff_layers = CountingLayers(table), CountingLayers(table)
    table.get(num)
    view = FileView(BothTrees(view_layers, diff_layers, num), base / "mnt")
    view.mount()
    try:
        yield Mounted(view, base / "mnt", view_layers, diff_layers, num)
    finally:
        view.unmount()
        table.close()
        shutil.rmtree(base, ignore_errors=True)


def _missing(path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        os.lstat(path)


# ------------------------------------------------------------------ misses


def test_a_miss_in_a_diff_tree_reaches_the_worker_once(mounted: Mounted) -> None:
    for _ in range(3):
        _missing(mounted.diff / "etc" / "nothing")
    # lookup: the name, then its whiteout; the kernel keeps the miss after that.
    assert mounted.in_diff("exists", "etc/nothing") == 1
    assert mounted.in_diff("exists", "etc/.wh.nothing") == 1


def test_whiteout_probes_are_answered_and_kept(mounted: Mounted) -> None:
    # fuse-overlayfs probes `.wh.NAME` beside every entry: never an entry of a diff tree,
    # so the answer needs no query.
    os.lstat(mounted.diff / "etc")
    before = Counter(mounted.diff_layers.calls)
    for _ in range(2):
        _missing(mounted.diff / "etc" / ".wh.passwd")
        _missing(mounted.diff / "etc" / ".wh.shadow")
    assert mounted.diff_layers.calls == before
    # ... and the whiteout itself shows as NAME, a char device 0/0
    st = os.lstat(mounted.diff / "etc" / "shadow")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_a_miss_in_the_layer_view_reaches_the_worker_once(mounted: Mounted) -> None:
    for _ in range(3):
        _missing(mounted.layer / "etc" / "absent")
    assert mounted.in_view("stat", "etc/absent") == 1


def test_the_view_root_is_asked_every_time(mounted: Mounted) -> None:
    # Layers open while the worker runs: a missing layer number must not be kept.
    before = mounted.in_view("layer_numbers", "")
    for _ in range(3):
        _missing(mounted.mountpoint / "view" / "999")
    assert mounted.in_view("layer_numbers", "") - before == 3


# ------------------------------------------------------------------ xattrs


def test_diff_tree_xattrs_are_read_once_per_node(mounted: Mounted) -> None:
    opq, passwd = mounted.diff / "opq", mounted.diff / "etc" / "passwd"
    for _ in range(3):  # what fuse-overlayfs asks of every directory it merges
        for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
            assert os.getxattr(opq, name) == b"y"
        with pytest.raises(OSError) as hidden:
            os.getxattr(opq, "user.fuseoverlayfs.opaque")
        assert hidden.value.errno == errno.EOPNOTSUPP  # the tree carries no overlay xattrs
        assert os.getxattr(passwd, "user.origin") == b"tar"
        with pytest.raises(OSError) as absent:
            os.getxattr(passwd, "trusted.overlay.opaque")
        assert absent.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as other:
            os.getxattr(passwd, "user.absent")
        assert other.value.errno == errno.ENODATA
    assert sorted(os.listxattr(opq)) == ["trusted.overlay.opaque", "user.overlay.opaque"]
    assert sorted(os.listxattr(passwd)) == ["user.origin", "user.other"]
    assert mounted.in_diff("exists", "opq/.wh..wh..opq") == 1
    assert mounted.in_diff("exists", "etc/passwd/.wh..wh..opq") == 1
    assert mounted.in_diff("listxattr", "etc/passwd") == 1
    assert mounted.in_diff("getxattr", "etc/passwd") == 2  # one per name, once


def test_origin_probes_on_a_diff_tree_ask_nothing(mounted: Mounted) -> None:
    # Without fast_ino, fuse-overlayfs reads two origin xattrs of every file it opens.
    plain = mounted.diff / "etc" / "plain"
    for name in ("trusted.overlay.origin", "user.fuseoverlayfs.origin"):
        with pytest.raises(OSError) as absent:
            os.getxattr(plain, name)
        assert absent.value.errno == errno.EOPNOTSUPP
    assert not [call for call in mounted.diff_layers.calls if call[1] == "etc/plain" and "xattr" in call[0]]


@contextmanager
def _overlay_over_diff(mounted: Mounted, tmp_path: Path, options: str = "") -> Iterator[Path]:
    """Plain fuse-overlayfs (`options` first) over the layer's diff tree, as podman mounts it."""
    merged, upper, work = tmp_path / "m", tmp_path / "u", tmp_path / "w"
    for directory in (merged, upper, work):
        directory.mkdir()
    subprocess.run(["fuse-overlayfs", "-o", f"{options}lowerdir={mounted.diff},upperdir={upper},workdir={work}",
                    str(merged)], check=True, capture_output=True)
    try:
        yield merged
    finally:
        subprocess.run(["fusermount3", "-u", str(merged)], check=True)


def test_fuse_overlayfs_asks_one_opaque_xattr_per_directory(mounted: Mounted, tmp_path: Path) -> None:
    # fuse-overlayfs asks trusted.overlay.opaque, then (on ENODATA only) user.overlay.opaque
    # and user.fuseoverlayfs.opaque of every directory it merges, each a FUSE request the
    # kernel never keeps. ENOTSUP for the first makes it go on to `.wh..wh..opq`.
    operations = mounted.view.operations
    assert operations is not None
    asked: Counter[bytes] = Counter()
    real_getxattr = operations.getxattr

    async def counting_getxattr(inode: int, name: bytes, ctx: Any) -> bytes:
        asked[name] += 1
        return await real_getxattr(inode, name, ctx)
    operations.getxattr = counting_getxattr  # type: ignore[method-assign]
    try:
        with _overlay_over_diff(mounted, tmp_path, "fast_ino=1,") as merged:
            assert sorted(os.listdir(merged / "etc")) == ["passwd", "plain"]
            assert sorted(os.listdir(merged / "opq")) == ["kept"]
    finally:
        operations.getxattr = real_getxattr  # type: ignore[method-assign]
    assert asked[b"trusted.overlay.opaque"] >= 3  # root, etc, opq
    assert asked[b"user.overlay.opaque"] == 0
    assert asked[b"user.fuseoverlayfs.opaque"] == 0


def test_layer_view_xattrs_are_all_shown_and_read_once(mounted: Mounted) -> None:
    passwd = mounted.layer / "etc" / "passwd"
    fd = os.open(passwd, os.O_RDONLY | os.O_NONBLOCK)  # what crfs.so hands fuse-overlayfs
    try:
        for _ in range(3):
            assert os.getxattr(fd, "user.origin") == b"tar"
            assert os.getxattr(fd, "user.other") == b"2"
            with pytest.raises(OSError) as absent:
                os.getxattr(fd, "trusted.overlay.origin")
            assert absent.value.errno == errno.ENODATA
        assert sorted(os.listxattr(fd)) == ["user.origin", "user.other"]
        assert os.read(fd, 100) == b"root:x:0:0\n"
    finally:
        os.close(fd)
    assert mounted.in_view("listxattr", "etc/passwd") == 1
    assert mounted.in_view("getxattr", "etc/passwd") == 2  # one per name, once


def test_fuse_overlayfs_lookup_opens_hold_nothing(mounted: Mounted, tmp_path: Path) -> None:
    # Without fast_ino, fuse-overlayfs opens every entry it looks up (O_NONBLOCK) only to read
    # origin xattrs: such an open asks the layer nothing; the open it reads through does.
    with _overlay_over_diff(mounted, tmp_path) as merged:
        assert sorted(os.listdir(merged / "etc")) == ["passwd", "plain"]
        os.lstat(merged / "etc" / "plain")
        assert (merged / "etc" / "passwd").read_bytes() == b"root:x:0:0\n"
    assert mounted.in_diff("hold_local", "etc/plain") == 0
    assert mounted.in_diff("hold_local", "etc/passwd") == 1


# ------------------------------------------------------------------ listings


def test_a_layer_directory_is_listed_once(mounted: Mounted) -> None:
    # Each new container's fuse-overlayfs lists every directory it walks again.
    for _ in range(3):
        assert sorted(os.listdir(mounted.diff / "opq")) == ["kept"]
        assert sorted(os.listdir(mounted.layer / "opq")) == [".wh..wh..opq", "kept"]
    assert mounted.in_diff("readdir", "opq") == 1
    assert mounted.in_view("readdir", "opq") == 1


def test_the_view_root_is_listed_every_time(mounted: Mounted) -> None:
    # Layers come and go: the listing of the view's root is never kept.
    before = mounted.in_view("layer_numbers", "")
    for _ in range(2):
        assert os.listdir(mounted.mountpoint / "view") == [str(mounted.num)]
    assert mounted.in_view("layer_numbers", "") - before == 2


def test_a_directory_opened_and_not_read_is_not_listed(mounted: Mounted) -> None:
    # What fuse-overlayfs does (without fast_ino) to every directory it looks up.
    fd = os.open(mounted.diff / "lazy", os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    os.close(fd)
    assert mounted.in_diff("readdir", "lazy") == 0
    assert os.listdir(mounted.diff / "lazy") == ["file"]
    assert mounted.in_diff("readdir", "lazy") == 1
    # Overlay asks whether it is opaque right after listing it: the listing answers.
    with pytest.raises(OSError) as absent:
        os.getxattr(mounted.diff / "lazy", "trusted.overlay.opaque")
    assert absent.value.errno == errno.EOPNOTSUPP
    assert mounted.in_diff("exists", "lazy/.wh..wh..opq") == 0
