"""Images the benchmarks run: Debian root filesystems made with debootstrap (cached under
/var/cache/crfs-bench, keyed by the command), turned into single-layer gzip OCI layouts
(also cached), and pushed to a registry.

    spec = IMAGES["numpy"]                       # minbase + python3-numpy, scipy, gcc
    layout = gzip_layout(spec)                   # oci:DIR:gzip, built once per machine
    push_layout(layout, "127.0.0.1:5000/bench/numpy:gzip")
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crfs_worker.imagestore import RegistryStore
from crfs_worker.oci_layout import OciLayout
from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient
from tests.support.podman import file_lock

CACHE_DIR = Path(os.environ.get("CRFS_BENCH_CACHE", "/var/cache/crfs-bench"))
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# As image builds do: no downloaded packages or apt lists (incompressible bulk that
# would flatter every ratio against the compressed image).
CLEANED = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_Packages",
           "var/lib/apt/lists/*_Release*")
GZIP_LEVEL = 6  # what podman and containerd use by default
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYOUT_TAG = "gzip"


@dataclass(frozen=True)
class ImageSpec:
    """A Debian minbase root filesystem with extra packages, and optionally one more
    layer holding a file of pseudo-random bytes (for read throughput)."""

    name: str
    packages: tuple[str, ...]
    big_file: str | None = None
    big_file_bytes: int = 0

    @property
    def debootstrap_args(self) -> list[str]:
        return ["--variant=minbase", f"--include={','.join(self.packages)}", SUITE]

    @property
    def key(self) -> str:
        text = " ".join([*self.debootstrap_args, DEBIAN_MIRROR, *CLEANED, str(self.big_file),
                         str(self.big_file_bytes), str(GZIP_LEVEL)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


IMAGES = {
    # B1 and B5: the cold-start image of the issue (about 1 GB unpacked was the guess).
    "numpy": ImageSpec("numpy", ("python3", "python3-numpy", "python3-scipy", "gcc")),
    # B5 --quick: the same recipe without the big packages.
    "small": ImageSpec("small", ("python3",)),
    # B2: a 256 MiB file in a layer of its own, over the small image.
    "bigfile": ImageSpec("bigfile", ("python3",), "/data/big.bin", 256 << 20),
}


def rootfs_tarball(spec: ImageSpec, cache_dir: Path = CACHE_DIR) -> Path:
    """The uncompressed tar of the debootstrap tree for `spec`, built once per machine."""
    rootfs_key = hashlib.sha256(" ".join([*spec.debootstrap_args, *CLEANED]).encode()).hexdigest()[:16]
    tarball = cache_dir / f"rootfs-{rootfs_key}.tar"
    with file_lock(cache_dir / f".rootfs-{rootfs_key}.lock"):
        if tarball.exists():
            return tarball
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
        try:
            root = work / "root"
            started = time.monotonic()
            done = subprocess.run(["debootstrap", *spec.debootstrap_args, str(root), DEBIAN_MIRROR],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"debootstrap for {spec.name} failed: "
                                   f"{(done.stderr or done.stdout)[-2000:]}")
            for pattern in CLEANED:
                for path in root.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            partial = work / "rootfs.tar"
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
                           check=True)
            os.replace(partial, tarball)
            print(f"bench: built {spec.name} root filesystem in {time.monotonic() - started:.0f} s",
                  flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def big_file_tar(spec: ImageSpec, dest: Path) -> None:
    """A tar holding `spec.big_file`: deterministic pseudo-random (incompressible) bytes,
    so that the compressed and uncompressed sizes match, as for media or model weights."""
    assert spec.big_file is not None
    rng = random.Random(256)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        parts = spec.big_file.strip("/").split("/")
        for depth in range(1, len(parts)):
            info = tarfile.TarInfo("/".join(parts[:depth]))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(info)
        info = tarfile.TarInfo("/".join(parts))
        info.size, info.mode, info.mtime = spec.big_file_bytes, 0o644, 1700000000
        tar.addfile(info, _RandomReader(rng, spec.big_file_bytes))


@dataclass
class _RandomReader:
    rng: random.Random
    left: int

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return self.rng.randbytes(size)


def _gzip_file(src: Path, dest: Path) -> tuple[str, str, int]:
    """gzip `src` into `dest`; returns (compressed digest, diff_id, compressed size)."""
    compressed, uncompressed = hashlib.sha256(), hashlib.sha256()
    with open(src, "rb") as source, open(dest, "wb") as raw:
        with gzip.GzipFile(fileobj=_Hashing(raw, compressed), mode="wb", compresslevel=GZIP_LEVEL,
                           mtime=0) as out:
            while piece := source.read(1 << 20):
                uncompressed.update(piece)
                out.write(piece)
    return "sha256:" + compressed.hexdigest(), "sha256:" + uncompressed.hexdigest(), dest.stat().st_size


@dataclass
class _Hashing:
    """A write-only file that hashes what passes through it."""

    raw: object
    digest: "hashlib._Hash"

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)  # type: ignore[attr-defined]

    def flush(self) -> None:
        self.raw.flush()  # type: ignore[attr-defined]


def gzip_layout(spec: ImageSpec, cache_dir: Path = CACHE_DIR) -> Path:
    """An OCI layout (tag `gzip`) of `spec` with gzip layers, built once per machine."""
    layout_dir = cache_dir / f"oci-{spec.name}-{spec.key}"
    with file_lock(cache_dir / f".oci-{spec.key}.lock"):
        if (layout_dir / "index.json").exists():
            return layout_dir
        tars = [rootfs_tarball(spec, cache_dir)]
        work = Path(tempfile.mkdtemp(prefix="oci-", dir=cache_dir))
        try:
            if spec.big_file:
                tars.append(work / "big.tar")
                big_file_tar(spec, tars[-1])
            partial = work / "layout"
            layout = OciLayout(partial, create=True)
            descriptors, diff_ids = [], []
            for number, tar in enumerate(tars):
                blob = work / f"layer{number}.gz"
                digest, diff_id, size = _gzip_file(tar, blob)
                layout.put_blob(digest, blob)
                blob.unlink()
                descriptors.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size})
                diff_ids.append(diff_id)
            config = json.dumps({
                "architecture": "amd64", "os": "linux",
                "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                           "Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": f"crfs bench: {spec.name} layer {n}"} for n in range(len(tars))],
            }).encode()
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            layout.put_blob(config_digest, config)
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": descriptors,
            }).encode()
            layout.put_manifest(manifest, OCI_MANIFEST, LAYOUT_TAG)
            layout.close()
            os.replace(partial, layout_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return layout_dir


@dataclass(frozen=True)
class LayoutImage:
    """What a cached layout holds: its manifest and blob sizes."""

    manifest: dict
    layer_sizes: tuple[int, ...]

    @property
    def compressed_bytes(self) -> int:
        return sum(self.layer_sizes)


def read_layout(layout_dir: Path, tag: str = LAYOUT_TAG) -> LayoutImage:
    layout = OciLayout(layout_dir)
    try:
        manifest = json.loads(layout.get_manifest(tag).data)
    finally:
        layout.close()
    return LayoutImage(manifest, tuple(layer["size"] for layer in manifest["layers"]))


def push_layout(layout_dir: Path, target: str, tag: str = LAYOUT_TAG) -> None:
    """Copies the layout's image to registry reference `target` (HOST/REPO:TAG)."""
    ref = ImageReference.parse(target)
    layout = OciLayout(layout_dir)
    try:
        manifest = layout.get_manifest(tag)
        parsed = json.loads(manifest.data)
        with RegistryClient() as client:
            store = RegistryStore(client, ref)
            for descriptor in [parsed["config"], *parsed["layers"]]:
                if not store.has_blob(descriptor["digest"]):
                    store.put_blob(descriptor["digest"], layout.blob_path(descriptor["digest"]))
            store.put_manifest(manifest.data, manifest.media_type, ref.tag)
    finally:
        layout.close()


def unpack_rootfs(layout_dir: Path, dest: Path, tag: str = LAYOUT_TAG) -> None:
    """Extracts the image's layers in order into `dest` (numeric owners kept: run as root)."""
    image = read_layout(layout_dir, tag)
    layout = OciLayout(layout_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for layer in image.manifest["layers"]:
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-xzf", str(layout.blob_path(layer["digest"])),
                            "-C", str(dest)], check=True)
    finally:
        layout.close()
