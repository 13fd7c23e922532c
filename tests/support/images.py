"""Small real container images for tests, built without network access.

    image = build_test_image(tmp_path / "img")                  # OCI layout, gzip layers
    image.reference                                              # "oci:/.../img:latest"
    for layer in image.layers:                                   # (single-platform images)
        layer.tar_path                                           # the uncompressed layer tar
        layer.entries["bin/sh"].link                             # "busybox"
    push_image(image, registry.client(), f"{registry.host}/test/app:v1")

The three layers (see `standard_layers`):
  1. busybox: /bin/busybox from Debian's busybox-static plus one symlink per applet,
     /etc files, /tmp (1777), /root (0700), files the next layer deletes.
  2. changes: whiteouts (`etc/.wh.motd`, `var/log/.wh.old.log`), an opaque dir
     (`opt/app/.wh..wh..opq`), hardlinks, absolute/relative/dangling symlinks,
     xattrs (binary values too, on files and a dir), char/block devices, a fifo,
     setuid/setgid/sticky modes, non-root owners, names and link targets longer than
     100 bytes (PAX), non-ASCII names.
  3. big: names written with a `./` prefix and a `./` root entry, a file of more than
     two 4 MiB chunks, a file of exactly 4 MiB, an empty file.
Multi-platform images (`platforms=("linux/amd64", "linux/arm64")`) share layers 1-2;
each platform's third layer differs (arm64 gets a small `etc/arch` layer).

`ExpectedEntry` paths are normalised (no `./`, no trailing `/`, the root is "").
`read_tar_entries(file)` turns any tar (plain, gzip, zstd; eStargz included, its
TOC and landmarks left out) into the same form, for comparing a converted layer;
`check_layer_view(layer, entries)` asserts what crfs' Layer view shows.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import zstandard

from crfs_worker.estargz_writer import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    clean_entry_name,
    open_tar_stream,
)
from crfs_worker.imagestore import RegistryStore
from crfs_worker.layer import Layer
from crfs_worker.oci_layout import OciLayout
from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient

BUSYBOX = Path("/bin/busybox")
MTIME = 1_700_000_000
CHUNK = 4 << 20
BIG_FILE_SIZE = 2 * CHUNK + 12_345

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


@dataclass(frozen=True)
class ExpectedEntry:
    """One tar entry as a test expects to read it back."""

    path: str                      # normalised
    type: str                      # reg, dir, symlink, hardlink, char, block, fifo
    mode: int = 0o644              # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"
    mtime: int = MTIME
    data: bytes = b""              # regular files
    link: str = ""                 # symlink target as written; hardlink target normalised
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


@dataclass(frozen=True)
class TestLayer:
    name: str
    tar_path: Path                           # uncompressed tar
    entries: dict[str, ExpectedEntry]        # path -> entry, in tar order

    __test__ = False  # not a pytest test class

    @property
    def diff_id(self) -> str:
        return _sha256_file(self.tar_path)


@dataclass(frozen=True)
class PlatformImage:
    platform: str                  # "linux/amd64"
    manifest_digest: str
    config_digest: str
    layers: tuple[TestLayer, ...]
    layer_digests: tuple[str, ...]  # compressed blobs as stored


@dataclass(frozen=True)
class TestImage:
    layout: Path                   # OCI layout directory
    tag: str
    digest: str                    # what the tag points at (manifest or index)
    media_type: str
    images: tuple[PlatformImage, ...]
    compression: str               # gzip, zstd, none

    __test__ = False  # not a pytest test class

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def layers(self) -> tuple[TestLayer, ...]:
        """The layers of a single-platform image."""
        if len(self.images) != 1:
            raise ValueError("multi-platform image: use images[i].layers")
        return self.images[0].layers

    def platform(self, name: str) -> PlatformImage:
        return next(i for i in self.images if i.platform == name)


# --- layers -------------------------------------------------------------------


def busybox_layer_entries() -> list[tuple[str, ExpectedEntry]]:
    """(name as written in the tar, entry) for the busybox base layer."""
    busybox = BUSYBOX.read_bytes()
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True,
                             text=True).stdout.split()
    entries = [_dir("bin"), _reg("bin/busybox", busybox, 0o755)]
    entries += [_symlink(f"bin/{a}", "busybox") for a in sorted(set(applets)) if a != "busybox"]
    entries += [
        _dir("etc"),
        _reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"),
        _reg("etc/group", b"root:x:0:\nalice:x:1000:\n"),
        _reg("etc/hostname", b"crfs-test\n"),
        _reg("etc/motd", b"deleted by the next layer\n"),
        _dir("opt"), _dir("opt/app"), _reg("opt/app/old.txt", b"hidden by an opaque dir\n"),
        _dir("tmp", 0o1777), _dir("root", 0o700),
        _dir("var"), _dir("var/log"), _reg("var/log/old.log", b"old log\n"),
    ]
    return [(e.path + ("/" if e.type == "dir" else ""), e) for e in entries]


def changes_layer_entries() -> list[tuple[str, ExpectedEntry]]:
    long_dir = "usr/share/" + "long-directory-name-" * 5 + "end"
    long_file = f"{long_dir}/" + "f" * 120
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xfe"
    entries = [
        _dir("etc"), _reg("etc/.wh.motd", b"", 0o644),
        _dir("opt"), _dir("opt/app"), _reg("opt/app/.wh..wh..opq", b""),
        _reg("opt/app/new.txt", b"new\n"),
        _dir("var"), _dir("var/log"), _reg("var/log/.wh.old.log", b""),
        _dir("usr"), ExpectedEntry("usr/share", "dir", 0o755, xattrs={"user.dir-attr": b"d"}),
        _dir("usr/share/hl"), _reg("usr/share/hl/original", b"shared inode\n" * 100),
        ExpectedEntry("usr/share/hl/link1", "hardlink", 0o644, link="usr/share/hl/original"),
        ExpectedEntry("usr/share/hl/link2", "hardlink", 0o644, link="usr/share/hl/original"),
        _symlink("usr/share/abs-link", "/etc/hostname"),
        _symlink("usr/share/rel-link", "hl/original"),
        _symlink("usr/share/dangling", "does/not/exist"),
        ExpectedEntry("usr/share/xattr-file", "reg", 0o644, data=b"has xattrs\n", xattrs={
            "user.crfs.test": b"hello", "security.capability": cap,
            "trusted.overlay.meta": b"\x00\x01\x02"}),
        _dir(long_dir), _reg(long_file, b"long name\n"),
        _symlink("usr/share/long-target", "/" + long_file),
        _dir("usr/share/données"), _reg("usr/share/données/ünïcode-文件.txt", "é\n".encode()),
        _dir("usr/bin"), _reg("usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755),
        _dir("usr/sgid-sticky", 0o3775),
        _dir("dev"),
        ExpectedEntry("dev/null", "char", 0o666, devmajor=1, devminor=3),
        ExpectedEntry("dev/loop0", "block", 0o660, uid=0, gid=6, gname="disk", devmajor=7,
                      devminor=0),
        _dir("run"), ExpectedEntry("run/fifo", "fifo", 0o600),
        _dir("home"),
        ExpectedEntry("home/alice", "dir", 0o750, uid=1000, gid=1000, uname="alice",
                      gname="alice"),
        ExpectedEntry("home/alice/notes.txt", "reg", 0o640, uid=1000, gid=1000, uname="alice",
                      gname="alice", mtime=MTIME + 86_400, data=b"alice's notes\n"),
        ExpectedEntry("home/alice/no-names", "reg", 0o600, uid=2000, gid=2000, uname="",
                      gname="", data=b"ids without names\n"),
    ]
    return [(e.path + ("/" if e.type == "dir" else ""), e) for e in entries]


def big_layer_entries() -> list[tuple[str, ExpectedEntry]]:
    """Names with a `./` prefix, as `tar -C dir .` writes them."""
    entries = [
        _dir(""), _dir("data"),
        _reg("data/big.bin", big_file_data(BIG_FILE_SIZE)),
        _reg("data/exact-chunk.bin", (b"0123456789abcdef" * (CHUNK // 16))),
        _reg("data/empty", b""),
        _reg("data/small.txt", b"small\n"),
    ]
    return [("./" + e.path + ("/" if e.type == "dir" and e.path else ""), e) for e in entries]


def arch_layer_entries(arch: str) -> list[tuple[str, ExpectedEntry]]:
    entries = [_dir("etc"), _reg("etc/arch", f"{arch}\n".encode())]
    return [(e.path + ("/" if e.type == "dir" else ""), e) for e in entries]


def big_file_data(size: int) -> bytes:
    """Deterministic, half random and half text, so compression has real work."""
    rng = random.Random(1234)
    out = bytearray()
    block = 64 << 10
    while len(out) < size:
        out += rng.randbytes(block)
        out += (f"line {len(out)}: the quick brown fox jumps over the lazy dog\n" * 1000).encode()[:block]
    return bytes(out[:size])


def write_layer_tar(path: Path, entries: Iterable[tuple[str, ExpectedEntry]]) -> dict[str, ExpectedEntry]:
    """Writes an uncompressed PAX tar; returns the entries by normalised path."""
    expected: dict[str, ExpectedEntry] = {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, entry in entries:
            tar.addfile(_tarinfo(name, entry), io.BytesIO(entry.data) if entry.type == "reg" else None)
            expected[entry.path] = entry
    return expected


def standard_layers(work_dir: Path) -> list[TestLayer]:
    work_dir.mkdir(parents=True, exist_ok=True)
    return [
        _make_layer(work_dir, "busybox", busybox_layer_entries()),
        _make_layer(work_dir, "changes", changes_layer_entries()),
        _make_layer(work_dir, "big", big_layer_entries()),
    ]


def _make_layer(work_dir: Path, name: str, entries: list[tuple[str, ExpectedEntry]]) -> TestLayer:
    path = work_dir / f"{name}.tar"
    return TestLayer(name, path, write_layer_tar(path, entries))


# --- images ------------------------------------------------------------------


def build_test_image(directory: Path, *, compression: str = "gzip", flavour: str = "oci",
                     platforms: tuple[str, ...] = ("linux/amd64",), tag: str = "latest",
                     layers: list[TestLayer] | None = None) -> TestImage:
    """Writes an OCI layout at `directory` holding one image under `tag`.

    compression: gzip | zstd | none; flavour: oci | docker (media types; docker has no
    zstd). Several platforms make an index (docker: a manifest list)."""
    if (flavour, compression) not in LAYER_MEDIA_TYPES:
        raise ValueError(f"no {flavour} media type for {compression} layers")
    tars = directory.parent / f"{directory.name}-tars"
    tars.mkdir(parents=True, exist_ok=True)
    layers = layers or standard_layers(tars)
    layout = OciLayout(directory, create=True)
    images = []
    for platform in platforms:
        arch = platform.split("/")[1]
        platform_layers = layers if platform == platforms[0] else [
            *layers[:2], _make_layer(tars, f"arch-{arch}", arch_layer_entries(arch))]
        images.append(_write_image(layout, platform, platform_layers, compression, flavour))
    if len(platforms) == 1:
        manifest_type = DOCKER_MANIFEST if flavour == "docker" else OCI_MANIFEST
        layout.put_manifest(_manifest_bytes(layout, images[0]), manifest_type, tag)
        return TestImage(directory, tag, images[0].manifest_digest, manifest_type,
                         tuple(images), compression)
    index_type = DOCKER_MANIFEST_LIST if flavour == "docker" else OCI_INDEX
    manifest_type = DOCKER_MANIFEST if flavour == "docker" else OCI_MANIFEST
    index = {"schemaVersion": 2, "mediaType": index_type, "manifests": [
        {"mediaType": manifest_type, "digest": image.manifest_digest,
         "size": layout.blob_size(image.manifest_digest),
         "platform": _platform_json(image.platform)} for image in images]}
    digest = layout.put_manifest(json.dumps(index, indent=2).encode(), index_type, tag)
    return TestImage(directory, tag, digest, index_type, tuple(images), compression)


def _write_image(layout: OciLayout, platform: str, layers: list[TestLayer], compression: str,
                 flavour: str) -> PlatformImage:
    layer_type = LAYER_MEDIA_TYPES[(flavour, compression)]
    descriptors, digests = [], []
    for layer in layers:
        blob = compress(layer.tar_path.read_bytes(), compression)
        digest = _sha256(blob)
        layout.put_blob(digest, blob)
        descriptors.append({"mediaType": layer_type, "digest": digest, "size": len(blob)})
        digests.append(digest)
    os_name, arch = platform.split("/")[:2]
    config = {
        "created": "2023-11-14T22:13:20Z", "architecture": arch, "os": os_name,
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"crfs test layer {l.name}"}
                    for l in layers] + [{"created": "2023-11-14T22:13:20Z",
                                         "created_by": "CMD /bin/sh", "empty_layer": True}],
    }
    config_bytes = json.dumps(config, indent=2).encode()
    config_digest = _sha256(config_bytes)
    layout.put_blob(config_digest, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if flavour == "docker" else OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG if flavour == "docker" else OCI_CONFIG,
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": descriptors,
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    manifest_digest = layout.put_manifest(manifest_bytes, manifest["mediaType"], None)
    return PlatformImage(platform, manifest_digest, config_digest, tuple(layers), tuple(digests))


def _manifest_bytes(layout: OciLayout, image: PlatformImage) -> bytes:
    return layout.get_blob(image.manifest_digest)


def _platform_json(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    result = {"os": parts[0], "architecture": parts[1]}
    if len(parts) > 2:
        result["variant"] = parts[2]
    return result


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def push_image(image: TestImage, client: RegistryClient, reference: str) -> str:
    """Copies the image (every blob, child manifests, then the tagged top) to a
    registry; returns the pushed top digest."""
    ref = ImageReference.parse(reference)
    store = RegistryStore(client, ImageReference(ref.registry, ref.repository))
    layout = OciLayout(image.layout)
    for blob in sorted((image.layout / "blobs" / "sha256").iterdir()):
        digest = f"sha256:{blob.name}"
        if digest not in {i.manifest_digest for i in image.images} and digest != image.digest:
            store.put_blob(digest, blob)
    if len(image.images) > 1:
        for platform_image in image.images:
            manifest = layout.get_manifest(platform_image.manifest_digest)
            store.put_manifest(manifest.data, manifest.media_type, None)
    top = layout.get_manifest(image.digest)
    return store.put_manifest(top.data, image.media_type, ref.tag or "latest")


# --- reading tars back ---------------------------------------------------------


def read_tar_entries(source: BinaryIO | Path) -> dict[str, ExpectedEntry]:
    """Any tar (plain/gzip/zstd, eStargz included) as {normalised path: entry};
    eStargz's TOC and landmarks are left out."""
    if isinstance(source, Path):
        with open(source, "rb") as file:
            return read_tar_entries(file)
    result: dict[str, ExpectedEntry] = {}
    with tarfile.open(fileobj=open_tar_stream(source), mode="r|") as tar:
        for info in tar:
            path = clean_entry_name(info.name)
            if path in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
                continue
            result[path] = _expected_from(info, tar)
    return result


def estargz_toc(blob: bytes) -> dict[str, Any]:
    """The TOC JSON of an eStargz blob, found through its 51-byte footer (independent
    of crfs' own footer and TOC code)."""
    footer = blob[-51:]
    assert footer[:4] == b"\x1f\x8b\x08\x04" and footer[10:16] == b"\x1a\x00SG\x16\x00"
    toc_offset = int(footer[16:32], 16)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[toc_offset:-51])), mode="r:") as tar:
        (member,) = tar.getmembers()
        assert member.name == TOC_TAR_NAME
        return json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]


def _expected_from(info: tarfile.TarInfo, tar: tarfile.TarFile) -> ExpectedEntry:
    kinds = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
    kind = "reg" if info.isreg() else kinds[info.type]
    data = tar.extractfile(info).read() if kind == "reg" else b""  # type: ignore[union-attr]
    link = clean_entry_name(info.linkname) if kind == "hardlink" else info.linkname
    xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
              for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return ExpectedEntry(path=clean_entry_name(info.name), type=kind, mode=info.mode & 0o7777,
                         uid=info.uid, gid=info.gid, uname=info.uname, gname=info.gname,
                         mtime=int(info.mtime), data=data, link=link, xattrs=xattrs,
                         devmajor=info.devmajor if kind in ("char", "block") else 0,
                         devminor=info.devminor if kind in ("char", "block") else 0)


def check_layer_view(view: Layer, entries: Mapping[str, ExpectedEntry]) -> None:
    """Asserts that crfs' Layer view shows exactly these entries' metadata and bytes."""
    kinds = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
             "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
    for path, expected in entries.items():
        info = view.stat(path)
        if expected.type == "hardlink":
            assert info.ino == view.stat(expected.link).ino, path
            continue
        assert stat.S_IFMT(info.mode) == kinds[expected.type], path
        assert stat.S_IMODE(info.mode) == expected.mode, path
        assert (info.uid, info.gid) == (expected.uid, expected.gid), path
        assert info.mtime_ns == expected.mtime * 10**9, path
        if expected.type == "reg":
            assert info.size == len(expected.data), path
            assert view.read(path, 0, len(expected.data) + 1) == expected.data, path
        if expected.type == "symlink":
            assert view.readlink(path) == expected.link, path
        if expected.type in ("char", "block"):
            assert (info.rdev_major, info.rdev_minor) == (expected.devmajor, expected.devminor)
        assert {n: view.getxattr(path, n) for n in view.listxattr(path)} == dict(expected.xattrs)


# --- helpers -----------------------------------------------------------------


def _dir(path: str, mode: int = 0o755) -> ExpectedEntry:
    return ExpectedEntry(path, "dir", mode)


def _reg(path: str, data: bytes, mode: int = 0o644) -> ExpectedEntry:
    return ExpectedEntry(path, "reg", mode, data=data)


def _symlink(path: str, target: str) -> ExpectedEntry:
    return ExpectedEntry(path, "symlink", 0o777, link=target)


def _tarinfo(name: str, entry: ExpectedEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
                 "fifo": tarfile.FIFOTYPE}[entry.type]
    info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
    info.uname, info.gname, info.mtime = entry.uname, entry.gname, entry.mtime
    info.size = len(entry.data) if entry.type == "reg" else 0
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                        for k, v in entry.xattrs.items()}
    return info


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(1 << 20):
            digest.update(piece)
    return "sha256:" + digest.hexdigest()
