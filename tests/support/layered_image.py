"""A small three-layer test image for the plugin tests.

The layers are real tar files (ownership, modes, symlinks, hardlinks, xattrs, devices,
a FIFO, whiteouts, an opaque directory), written by images.write_layer_tar and converted
to eStargz by crfs's own writer; the expected merged tree is what GNU tar extracts from
the same tars, with the whiteouts applied the way container runtimes apply them.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crfs_worker.estargz_writer import EstargzOptions, convert_file
from tests.support.images import ExpectedEntry, write_layer_tar

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


def _entry(name: str, kind: str, mode: int = 0o644, **fields: Any) -> tuple[str, ExpectedEntry]:
    """An entry without user/group names, as these layers are written."""
    return name, ExpectedEntry(name, kind, mode, uname="", gname="", **fields)


def _dir(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
         xattrs: dict[str, bytes] | None = None) -> tuple[str, ExpectedEntry]:
    return _entry(name, "dir", mode, uid=uid, gid=gid, xattrs=xattrs or {})


def _file(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
          xattrs: dict[str, bytes] | None = None) -> tuple[str, ExpectedEntry]:
    return _entry(name, "reg", mode, uid=uid, gid=gid, data=data, xattrs=xattrs or {})


def _symlink(name: str, target: str) -> tuple[str, ExpectedEntry]:
    return _entry(name, "symlink", 0o777, link=target)


def _hardlink(name: str, target: str) -> tuple[str, ExpectedEntry]:
    return _entry(name, "hardlink", 0o755, link=target)


def _device(name: str, kind: str, major: int, minor: int, mode: int = 0o666) -> tuple[str, ExpectedEntry]:
    return _entry(name, kind, mode, devmajor=major, devminor=minor)


def _layer1(path: Path, big: bytes) -> None:
    write_layer_tar(path, [
        _dir("etc"),
        _file("etc/hostname", b"base\n"),
        _file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        _file("etc/remove-me", b"gone in layer 2\n"),
        _file("etc/xattr-file", b"has xattrs\n", xattrs={"user.crfs.test": b"hello", "user.other": b"x" * 100}),
        _file("etc/shadow", b"secret\n", mode=0o640, uid=0, gid=42),
        _symlink("etc/alt", "/etc/hostname"),
        _dir("usr", mode=0o755),
        _dir("usr/bin", mode=0o755),
        _file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755, uid=1000, gid=1000),
        _hardlink("usr/bin/tool-hard", "usr/bin/tool"),
        _symlink("usr/bin/link", "tool"),
        _file("usr/bin/suid", b"suid\n", mode=0o4755),
        _dir("var"),
        _dir("var/lib", mode=0o750, uid=5, gid=6),
        _dir("var/lib/deep"),
        _dir("var/lib/deep/a"),
        _dir("var/lib/deep/a/b", mode=0o700, uid=1000, gid=1000),
        _file("var/lib/deep/a/b/leaf", b"leaf\n"),
        _dir("opaque-me"),
        _file("opaque-me/x", b"x\n"),
        _file("opaque-me/y", b"y\n"),
        _dir("rename-me", mode=0o711, uid=7, gid=8, xattrs={"user.dirattr": b"on-a-dir"}),
        _file("rename-me/f", b"in a dir to rename\n"),
        _dir("rename-me/sub"),
        _file("rename-me/sub/g", b"g\n"),
        _dir("doomed-dir"),
        _file("doomed-dir/h", b"h\n"),
        _dir("data"),
        _file("data/big.bin", big),
        _file("data/small.txt", b"small file contents\n" * 10),
        _file("data/empty", b""),
        _dir("dev"),
        _device("dev/null", "char", 1, 3),
        _device("dev/sda", "block", 8, 0, mode=0o660),
        _device("dev/fifo", "fifo", 0, 0, mode=0o644),
    ])


def _layer2(path: Path) -> None:
    write_layer_tar(path, [
        _dir("etc"),
        _file("etc/hostname", b"layer two\n"),
        _file("etc/.wh.remove-me", b""),
        _dir("opaque-me"),
        _file("opaque-me/.wh..wh..opq", b""),
        _file("opaque-me/z", b"z only\n"),
        _dir("usr"),
        _dir("usr/bin"),
        _file("usr/bin/new", b"new in layer 2\n", mode=0o700),
        _file(".wh.doomed-dir", b""),
    ])


def _layer3(path: Path) -> None:
    write_layer_tar(path, [
        _dir("etc"),
        _file("etc/motd", b"top layer\n", mode=0o600, uid=33, gid=33),
        _dir("var"),
        _dir("var/lib", mode=0o755, uid=5, gid=6),  # the upper layer's metadata wins
    ])


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
