"""A small three-layer test image for the plugin tests.

The layers are real tar files (ownership, modes, symlinks, hardlinks, xattrs, devices,
a FIFO, whiteouts, an opaque directory), converted to eStargz by crfs's own writer; the
expected merged tree is what GNU tar extracts from the same tars, with the whiteouts
applied the way container runtimes apply them.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from crfs_worker.estargz_writer import EstargzOptions, convert_file

MTIME = 1_700_000_000
BIG_SIZE = 3 << 20       # several chunks, and far above the small-file limit
CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class BuiltLayer:
    tar: Path
    blob: Path
    toc_digest: str
    blob_digest: str
    blob_size: int


@dataclass(frozen=True)
class LayeredImage:
    layers: tuple[BuiltLayer, ...]  # lowest first
    expected: Path                  # the merged tree, extracted by tar
    big_bytes: bytes                # content of data/big.bin


class _TarWriter:
    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = MTIME
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: dict[str, str] | None = None) -> None:
        info = self._info(name, tarfile.DIRTYPE, mode, uid, gid)
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tar.addfile(info)

    def file(self, name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
             xattrs: dict[str, str] | None = None) -> None:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)

    def hardlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.LNKTYPE, 0o755)
        info.linkname = target
        self.tar.addfile(info)

    def device(self, name: str, kind: bytes, major: int, minor: int, mode: int = 0o666) -> None:
        info = self._info(name, kind, mode)
        info.devmajor, info.devminor = major, minor
        self.tar.addfile(info)

    def close(self) -> None:
        self.tar.close()


def _layer1(path: Path, big: bytes) -> None:
    t = _TarWriter(path)
    t.dir("etc")
    t.file("etc/hostname", b"base\n")
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    t.file("etc/remove-me", b"gone in layer 2\n")
    t.file("etc/xattr-file", b"has xattrs\n", xattrs={"user.crfs.test": "hello", "user.other": "x" * 100})
    t.file("etc/shadow", b"secret\n", mode=0o640, uid=0, gid=42)
    t.symlink("etc/alt", "/etc/hostname")
    t.dir("usr", mode=0o755)
    t.dir("usr/bin", mode=0o755)
    t.file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755, uid=1000, gid=1000)
    t.hardlink("usr/bin/tool-hard", "usr/bin/tool")
    t.symlink("usr/bin/link", "tool")
    t.file("usr/bin/suid", b"suid\n", mode=0o4755)
    t.dir("var")
    t.dir("var/lib", mode=0o750, uid=5, gid=6)
    t.dir("var/lib/deep")
    t.dir("var/lib/deep/a")
    t.dir("var/lib/deep/a/b", mode=0o700, uid=1000, gid=1000)
    t.file("var/lib/deep/a/b/leaf", b"leaf\n")
    t.dir("opaque-me")
    t.file("opaque-me/x", b"x\n")
    t.file("opaque-me/y", b"y\n")
    t.dir("rename-me", mode=0o711, uid=7, gid=8, xattrs={"user.dirattr": "on-a-dir"})
    t.file("rename-me/f", b"in a dir to rename\n")
    t.dir("rename-me/sub")
    t.file("rename-me/sub/g", b"g\n")
    t.dir("doomed-dir")
    t.file("doomed-dir/h", b"h\n")
    t.dir("data")
    t.file("data/big.bin", big)
    t.file("data/small.txt", b"small file contents\n" * 10)
    t.file("data/empty", b"")
    t.dir("dev")
    t.device("dev/null", tarfile.CHRTYPE, 1, 3)
    t.device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660)
    t.device("dev/fifo", tarfile.FIFOTYPE, 0, 0, mode=0o644)
    t.close()


def _layer2(path: Path) -> None:
    t = _TarWriter(path)
    t.dir("etc")
    t.file("etc/hostname", b"layer two\n")
    t.file("etc/.wh.remove-me", b"")
    t.dir("opaque-me")
    t.file("opaque-me/.wh..wh..opq", b"")
    t.file("opaque-me/z", b"z only\n")
    t.dir("usr")
    t.dir("usr/bin")
    t.file("usr/bin/new", b"new in layer 2\n", mode=0o700)
    t.file(".wh.doomed-dir", b"")
    t.close()


def _layer3(path: Path) -> None:
    t = _TarWriter(path)
    t.dir("etc")
    t.file("etc/motd", b"top layer\n", mode=0o600, uid=33, gid=33)
    t.dir("var")
    t.dir("var/lib", mode=0o755, uid=5, gid=6)  # the upper layer's metadata wins
    t.close()


def _apply(tar_path: Path, root: Path) -> None:
    """Extract one layer over `root` as a container runtime would: whiteouts first."""
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    for name in names:
        base = os.path.basename(name)
        parent = root / os.path.dirname(name)
        if base == ".wh..wh..opq":
            for child in parent.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif base.startswith(".wh."):
            victim = parent / base[4:]
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            elif victim.exists() or victim.is_symlink():
                victim.unlink()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf", str(tar_path),
         "--exclude=.wh.*", "-C", str(root)],
        check=True,
    )


def build_layered_image(workdir: Path) -> LayeredImage:
    workdir.mkdir(parents=True, exist_ok=True)
    big = random.Random(1234).randbytes(BIG_SIZE)
    makers = [lambda p: _layer1(p, big), _layer2, _layer3]
    layers = []
    for i, make in enumerate(makers, start=1):
        tar = workdir / f"layer{i}.tar"
        make(tar)
        blob = workdir / f"layer{i}.esgz"
        result = convert_file(tar, blob, EstargzOptions(chunk_size=CHUNK_SIZE, workers=1))
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        layers.append(BuiltLayer(tar, blob, result.toc_digest, digest, blob.stat().st_size))
    expected = workdir / "expected"
    expected.mkdir()
    for layer in layers:
        _apply(layer.tar, expected)
    return LayeredImage(tuple(layers), expected, big)
