"""podman's additional layer store as the worker serves it over real FUSE.

A worker process (`crfs worker --store DIR`) serves the three-layer test image (busybox;
whiteouts, an opaque dir, hardlinks, devices, xattrs; a multi-chunk file) converted to
eStargz in a real docker-registry. The tests go through the file system as podman's
containers/storage does: stat diff/info/blob, create `use`, rmdir the layer, read `blob`;
and they stack the `diff` trees with the kernel's overlayfs and with fuse-overlayfs, whose
merged trees must equal the image's.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from crfs_worker.convert import ConvertOptions, convert
from crfs_worker.estargz_writer import EstargzOptions
from crfs_worker.layerstore import USES_FILE, VIEW_NAME, encode_ref, read_use_counts
from crfs_worker.progress import Progress
from crfs_worker.reference import ImageReference
from tests.support.images import ExpectedEntry, TestImage, build_test_image, push_image
from tests.support.registry import RunningRegistry, start_plain_registry
from tests.support.workers import stop_process

HIDDEN_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
OPAQUE = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="stacks store layers with the kernel's overlayfs")


@dataclass
class StoreWorker:
    store: Path
    runtime: Path

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.store / encode_ref(ref) / digest

    def pid(self) -> int:
        return int((self.runtime / "worker.lock").read_text())

    def stop(self) -> None:
        stop_process(self.pid(), timeout=20)


def start_store_worker(base: Path) -> StoreWorker:
    runtime = Path(tempfile.mkdtemp(prefix="crfs-st-"))  # short: a socket path has 108 bytes
    store = base / "store"
    env = {**os.environ, "CRFS_RUNTIME_DIR": str(runtime), "CRFS_CACHE_DIR": str(base / "cache")}
    subprocess.run([sys.executable, "-m", "crfs_worker.worker", "--detach", "--store", str(store),
                    "--no-background-fetch"], env=env, check=True, capture_output=True, timeout=120)
    return StoreWorker(store, runtime)


@dataclass(frozen=True)
class Pushed:
    image: TestImage
    esgz: str            # registry reference of the eStargz image
    gzip: str            # the same image as pushed, gzip
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def layer_digests(self) -> list[str]:
        return [layer["digest"] for layer in self.manifest["layers"]]

    @property
    def toc_digests(self) -> list[str]:
        return [layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"] for layer in self.manifest["layers"]]


def _convert(registry: RunningRegistry, image: TestImage, repository: str, **estargz: Any) -> Pushed:
    gzip_ref, esgz_ref = f"{registry.host}/{repository}:gzip", f"{registry.host}/{repository}:esgz"
    with registry.client() as client:
        push_image(image, client, gzip_ref)
        convert(gzip_ref, esgz_ref, ConvertOptions(estargz=EstargzOptions(**estargz), progress=Progress.disabled()),
                client)
        manifest = json.loads(client.get_manifest(ImageReference.parse(esgz_ref)).data)
        config = json.loads(client.get_blob(ImageReference.parse(esgz_ref), manifest["config"]["digest"]))
    return Pushed(image, esgz_ref, gzip_ref, manifest, config)


@pytest.fixture(scope="module")
def pushed(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    return _convert(registry, build_test_image(tmp_path_factory.mktemp("store-image") / "oci"), "store/app")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWorker]:
    running = start_store_worker(tmp_path_factory.mktemp("store-worker"))
    yield running
    running.stop()
    shutil.rmtree(running.runtime, ignore_errors=True)


# ------------------------------------------------------------------ expectations


def _xattrs(path: Path, keep: tuple[str, ...]) -> dict[str, bytes]:
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)
            if name in keep or not name.startswith(HIDDEN_XATTRS)}


def snapshot(root: Path, keep: tuple[str, ...] = tuple(OPAQUE)) -> dict[str, dict[str, Any]]:
    """What a tree shows of each entry, by path (overlay xattrs only if in `keep`)."""
    tree: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            entry: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):  # a whiteout: nothing else counts
                entry["mode"] = stat.S_IMODE(st.st_mode)
                entry["xattrs"] = _xattrs(path, keep)
            if stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                entry["link"] = os.readlink(path)
            tree[str(path.relative_to(root))] = entry
    return tree


TYPES = {"reg": stat.S_IFREG, "hardlink": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
         "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


def expected_entry(entries: dict[str, ExpectedEntry], entry: ExpectedEntry) -> dict[str, Any]:
    data = entries[entry.link].data if entry.type == "hardlink" else entry.data
    out: dict[str, Any] = {"type": TYPES[entry.type], "uid": entry.uid, "gid": entry.gid,
                           "mode": 0o777 if entry.type == "symlink" else entry.mode,
                           "xattrs": {k: v for k, v in entry.xattrs.items() if not k.startswith(HIDDEN_XATTRS)}}
    if entry.type in ("char", "block"):
        out["rdev"] = (entry.devmajor, entry.devminor)
    if entry.type in ("reg", "hardlink"):
        out["sha256"] = hashlib.sha256(data).hexdigest()
    if entry.type == "symlink":
        out["link"] = entry.link
    return out


def expected_diff(entries: dict[str, ExpectedEntry]) -> dict[str, dict[str, Any]]:
    """One layer in overlay form: whiteouts as char 0/0, opaque dirs by xattr."""
    tree: dict[str, dict[str, Any]] = {}
    opaque = set()
    for path, entry in entries.items():
        parent, base = posixpath.split(path)
        if not path:
            continue
        if base == ".wh..wh..opq":
            opaque.add(parent)
        elif base.startswith(".wh."):
            tree[posixpath.join(parent, base[4:])] = {"type": stat.S_IFCHR, "uid": entry.uid, "gid": entry.gid,
                                                      "rdev": (0, 0)}
        else:
            tree[path] = expected_entry(entries, entry)
    for path in opaque:
        tree[path]["xattrs"] = {**tree[path]["xattrs"], **OPAQUE}
    return tree


def expected_merged(image: TestImage) -> dict[str, dict[str, Any]]:
    """The image's root file system once its layers are applied in order."""
    tree: dict[str, dict[str, Any]] = {}
    for layer in image.layers:
        for path, entry in layer.entries.items():
            parent, base = posixpath.split(path)
            if not path:
                continue
            if base.startswith(".wh."):
                gone = parent if base == ".wh..wh..opq" else posixpath.join(parent, base[4:])
                prefix = gone + "/" if base == ".wh..wh..opq" else gone
                for p in [p for p in tree if p == prefix or p.startswith(gone + "/")]:
                    del tree[p]
                continue
            if entry.type != "dir":
                for p in [p for p in tree if p.startswith(path + "/")]:
                    del tree[p]
            tree[path] = expected_entry(layer.entries, entry)
    return tree


# ------------------------------------------------------------------ the diff trees


@pytest.mark.parametrize("index", [0, 1, 2])
def test_diff_tree_is_the_layer_in_overlay_form(worker: StoreWorker, pushed: Pushed, index: int) -> None:
    diff = worker.layer_dir(pushed.esgz, pushed.layer_digests[index]) / "diff"
    assert snapshot(diff) == expected_diff(pushed.image.layers[index].entries)


def test_hardlinks_share_an_inode_and_trees_do_not(worker: StoreWorker, pushed: Pushed) -> None:
    diff = worker.layer_dir(pushed.esgz, pushed.layer_digests[1]) / "diff"
    inos = {os.lstat(diff / f"usr/share/hl/{name}").st_ino for name in ("original", "link1", "link2")}
    assert len(inos) == 1 and os.lstat(diff / "usr/share/hl/original").st_nlink == 3
    # The same layer under its TOC digest (containers/storage 1.54+) is another tree: a
    # directory the kernel met under two parents would be moved between them.
    by_toc = worker.layer_dir(pushed.esgz, pushed.toc_digests[1]) / "diff"
    assert snapshot(by_toc) == snapshot(diff)
    assert os.lstat(by_toc / "usr").st_ino != os.lstat(diff / "usr").st_ino


def test_kernel_overlay_and_fuse_overlayfs_merge_the_diff_trees(worker: StoreWorker, pushed: Pushed,
                                                               tmp_path: Path) -> None:
    # Through links without ':' (lowerdir splits on it), as podman's overlay/l/LINK.
    links = []
    for number, digest in enumerate(reversed(pushed.layer_digests)):
        links.append(tmp_path / f"l{number}")
        links[-1].symlink_to(worker.layer_dir(pushed.esgz, digest) / "diff")
    lowers = ":".join(map(str, links))
    expected = expected_merged(pushed.image)
    # userxattr: the kernel reads user.overlay.* as in a rootless podman's overlay.
    # fast_ino=1: what podman-examples/storage.conf's mountopt asks of fuse-overlayfs (the
    # store's inode numbers are unique across its trees and above any disk's).
    for name, command in (("kernel", ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}"]),
                          ("userxattr", ["mount", "-t", "overlay", "overlay", "-o", f"userxattr,lowerdir={lowers}"]),
                          ("fuse", ["fuse-overlayfs", "-o", f"lowerdir={lowers}"]),
                          ("fuse-fast-ino", ["fuse-overlayfs", "-o", f"fast_ino=1,lowerdir={lowers}"])):
        merged = tmp_path / name
        merged.mkdir()
        subprocess.run([*command, str(merged)], check=True, capture_output=True)
        try:
            got = snapshot(merged, keep=())
            hardlinks = {os.lstat(merged / f"usr/share/hl/{link}").st_ino for link in ("original", "link1", "link2")}
        finally:
            subprocess.run(["umount", str(merged)], check=True)
        assert sorted(got) == sorted(expected), name
        for path in expected:
            assert got[path] == expected[path], (name, path)
        assert len(hardlinks) == 1, name


# ------------------------------------------------------------------ what podman reads


def test_info_carries_the_true_diff_id(worker: StoreWorker, pushed: Pushed, registry: RunningRegistry) -> None:
    for index, layer in enumerate(pushed.manifest["layers"]):
        for name in (layer["digest"], pushed.toc_digests[index]):
            info = json.loads((worker.layer_dir(pushed.esgz, name) / "info").read_bytes())
            assert info == {
                "compressed-diff-digest": layer["digest"],
                "compressed-size": layer["size"],
                "diff-digest": pushed.config["rootfs"]["diff_ids"][index],
                "diff-size": int(layer["annotations"]["io.containers.estargz.uncompressed-size"]),
                "compression": 2,
            }
        # The DiffID is what the blob really decompresses to.
        tar = gzip.decompress(registry.blob_file(layer["digest"]).read_bytes())
        assert info["diff-digest"] == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert info["diff-size"] == len(tar)


def test_blob_reads_the_raw_blob(worker: StoreWorker, pushed: Pushed, registry: RunningRegistry) -> None:
    digest = pushed.layer_digests[2]
    blob = worker.layer_dir(pushed.esgz, digest) / "blob"
    raw = registry.blob_file(digest).read_bytes()
    assert blob.stat().st_size == len(raw)
    assert blob.read_bytes() == raw
    with blob.open("rb") as f:  # ranged reads
        f.seek(len(raw) // 2)
        assert f.read(1000) == raw[len(raw) // 2:len(raw) // 2 + 1000]


def test_use_and_rmdir_count_references(worker: StoreWorker, pushed: Pushed) -> None:
    digest = pushed.layer_digests[0]
    layer = worker.layer_dir(pushed.esgz, digest)
    key = (pushed.esgz, digest)
    before = read_use_counts(worker.runtime).get(key, 0)
    for _ in range(2):  # as containers/storage: os.Create(use) must fail with ENOENT
        with pytest.raises(FileNotFoundError):
            open(layer / "use", "w")
    assert not (layer / "use").exists()
    assert read_use_counts(worker.runtime)[key] == before + 2
    with pytest.raises(FileNotFoundError):
        os.rmdir(layer)
    assert read_use_counts(worker.runtime).get(key, 0) == before + 1
    assert layer.is_dir()  # still served: another image may use it
    stored = json.loads((worker.runtime / USES_FILE).read_text())
    assert {"ref": pushed.esgz, "digest": digest, "uses": before + 1} in stored
    with pytest.raises(FileNotFoundError):
        os.rmdir(layer)


def test_nothing_else_can_be_changed(worker: StoreWorker, pushed: Pushed) -> None:
    layer = worker.layer_dir(pushed.esgz, pushed.layer_digests[0])
    for action in (lambda: (layer / "diff" / "new").write_text("x"), lambda: os.mkdir(layer / "diff" / "d"),
                   lambda: os.unlink(layer / "diff" / "etc" / "passwd"), lambda: (layer / "info").write_text("x"),
                   lambda: os.setxattr(layer / "diff" / "etc", "user.x", b"1")):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def test_layers_podman_must_pull_itself_are_absent(worker: StoreWorker, pushed: Pushed, registry: RunningRegistry) -> None:
    with registry.client() as client:
        gzip_manifest = json.loads(client.get_manifest(ImageReference.parse(pushed.gzip)).data)
    gzip_digest = gzip_manifest["layers"][0]["digest"]
    unknown = "sha256:" + "0" * 64
    for ref, digest in ((pushed.gzip, gzip_digest), (pushed.esgz, unknown), (pushed.esgz, gzip_digest),
                        (f"{registry.host}/store/no-such-image:v1", pushed.layer_digests[0])):
        for name in ("diff", "info", "blob"):
            assert not (worker.layer_dir(ref, digest) / name).exists(), (ref, digest, name)
    assert not (worker.store / "not base64!" / pushed.layer_digests[0] / "diff").exists()
    assert not (worker.store / encode_ref(pushed.esgz) / "not-a-digest" / "diff").exists()


def test_a_layer_of_another_platform_is_found(worker: StoreWorker, registry: RunningRegistry,
                                              tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "multi", platforms=("linux/amd64", "linux/arm64"))
    ref = f"{registry.host}/store/multi:esgz"
    with registry.client() as client:
        push_image(image, client, f"{registry.host}/store/multi:gzip")
        convert(f"{registry.host}/store/multi:gzip", ref, ConvertOptions(progress=Progress.disabled()), client)
        index = json.loads(client.get_manifest(ImageReference.parse(ref)).data)
        arm = next(m for m in index["manifests"] if m["platform"]["architecture"] == "arm64")
        arm_manifest = json.loads(client.get_manifest(ImageReference.parse(ref).with_digest(arm["digest"])).data)
    diff = worker.layer_dir(ref, arm_manifest["layers"][-1]["digest"]) / "diff"
    assert (diff / "etc" / "arch").read_text() == "arm64\n"


def test_store_root_lists_references_and_hides_the_view(worker: StoreWorker, pushed: Pushed) -> None:
    (worker.layer_dir(pushed.esgz, pushed.layer_digests[0]) / "info").read_bytes()
    names = os.listdir(worker.store)
    assert encode_ref(pushed.esgz).split("/")[0] in names
    assert VIEW_NAME not in names
    assert (worker.store / VIEW_NAME).is_dir()  # crfs.so's fds still come from there
    key = (worker.layer_dir(pushed.esgz, pushed.layer_digests[0]) / "crfs.key").read_text().strip()
    assert len(key) == 32


def test_a_tampered_blob_fails_at_its_end(worker: StoreWorker, tmp_path: Path) -> None:
    own = start_plain_registry(tmp_path / "registry")  # its blobs get damaged: nobody else's
    try:
        pushed = _convert(own, build_test_image(tmp_path / "oci"), "store/tampered", chunk_size=1 << 20)
        digest = pushed.layer_digests[2]
        blob_file = own.blob_file(digest)
        raw = bytearray(blob_file.read_bytes())
        blob = worker.layer_dir(pushed.esgz, digest) / "blob"
        assert blob.stat().st_size == len(raw)  # the TOC, at the end, is still intact
        raw[len(raw) // 3] ^= 0xFF
        blob_file.write_bytes(bytes(raw))
        with pytest.raises(OSError) as caught:
            blob.read_bytes()
        assert caught.value.errno == errno.EIO
    finally:
        own.stop()


def test_digest_check_takes_pieces_in_any_order() -> None:
    from crfs_worker.errors import VerificationError
    from crfs_worker.layerstore import DigestCheck

    blob = bytes(range(256)) * 1000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    pieces = [(offset, blob[offset:offset + 7000]) for offset in range(0, len(blob), 7000)]
    good = DigestCheck(len(blob), digest, set())
    for offset, piece in reversed(pieces):  # readahead answered last to first
        good.add(offset, piece, "blob")
    bad_set: set[str] = set()
    bad = DigestCheck(len(blob), digest, bad_set)
    tampered = [(o, p if o != 14000 else b"x" + p[1:]) for o, p in pieces]
    with pytest.raises(VerificationError):
        for offset, piece in [*tampered[1:], tampered[0]]:
            bad.add(offset, piece, "blob")
    assert bad_set == {digest}
    with pytest.raises(VerificationError):  # sticky: no later read passes
        DigestCheck(len(blob), digest, bad_set).check_known("blob")
