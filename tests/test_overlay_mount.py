"""Real fuse-overlayfs (/usr/bin/fuse-overlayfs, 1.10) with crfs.so lowers over real FUSE.

The merged tree of a three-layer eStargz image is compared with what GNU tar extracts
from the same layer tars (whiteouts applied); then writes: copy-up, deep mkdir, renaming
a lower directory, deleting. Every mount is unmounted even when a test fails.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from crfs_worker.layerkeys import KeyStore, LayerRecord, lowerdir_for
from tests.support.plugin_env import PluginSession

# Another C fuse-overlayfs can be tested with the same suite (test_fuse_overlayfs_versions.py).
FUSE_OVERLAYFS = os.environ.get("CRFS_TEST_FUSE_OVERLAYFS", "/usr/bin/fuse-overlayfs")
# fuse-overlayfs' own bookkeeping, not image content.
PRIVATE_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "security.")

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")


@dataclass
class Mounted:
    merged: Path
    upper: Path


def _unmount(path: Path) -> None:
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


@pytest.fixture
def mount_overlay(plugin_env: PluginSession, tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    mounted: list[Path] = []

    def mount(lowerdir: str | None = None, options: str = "", name: str = "m") -> Mounted:
        base = tmp_path / name
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        lower = lowerdir or f"//crfs/{plugin_env.key}//"
        opts = f"plugins={plugin_env.plugin},lowerdir={lower},upperdir={upper},workdir={work}"
        if options:
            opts += "," + options
        result = subprocess.run([FUSE_OVERLAYFS, "-o", opts, str(merged)], capture_output=True, text=True,
                                timeout=120, env=dict(os.environ))
        assert result.returncode == 0, result.stderr
        mounted.append(merged)
        return Mounted(merged, upper)

    yield mount
    for path in mounted:
        _unmount(path)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything an image promises about each entry, by path."""
    tree: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            entry: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
            xattrs = {}
            for attr in os.listxattr(path, follow_symlinks=False):
                if not attr.startswith(PRIVATE_XATTRS):
                    xattrs[attr] = os.getxattr(path, attr, follow_symlinks=False)
            entry["xattrs"] = xattrs
            if stat.S_ISREG(st.st_mode):
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                entry["size"] = st.st_size
                entry["mtime"] = st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            tree[str(path.relative_to(root))] = entry
    return tree


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                groups.setdefault(st.st_ino, set()).add(str(path.relative_to(root)))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def layer_stats(session: PluginSession) -> dict[int, dict[str, Any]]:
    with session.client() as client:
        return {row["num"]: row for row in client.call("stats").fields["layers"]}


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("options", ["", "fast_ino=1,noacl,threaded=1"])
def test_merged_tree_matches_tar_extraction(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession,
                                           options: str) -> None:
    m = mount_overlay(options=options)
    expected = snapshot(plugin_env.image.expected)
    merged = snapshot(m.merged)
    assert sorted(merged) == sorted(expected)
    for path in expected:
        assert merged[path] == expected[path], path
    assert hardlink_groups(m.merged) == hardlink_groups(plugin_env.image.expected) == {
        frozenset({"usr/bin/tool", "usr/bin/tool-hard"})
    }
    # Spot checks of the layering itself.
    assert (m.merged / "etc/hostname").read_text() == "layer two\n"
    assert not (m.merged / "etc/remove-me").exists()
    assert sorted(os.listdir(m.merged / "opaque-me")) == ["z"]
    assert not (m.merged / "doomed-dir").exists()
    assert stat.S_IMODE(os.stat(m.merged / "var/lib").st_mode) == 0o755  # upper layer's metadata
    assert list(m.upper.iterdir()) == []  # reading wrote nothing


def test_reading_one_small_file_fetches_a_tiny_fraction(mount_overlay: Callable[..., Mounted],
                                                        plugin_env: PluginSession) -> None:
    m = mount_overlay()
    plugin_env.drop_cached_data()  # earlier tests may have cached it: make this read go to the blob
    base_layer = plugin_env.image.layers[0]
    num = os.stat(m.merged / "data").st_ino >> 40  # only the base layer has data/
    before = layer_stats(plugin_env)[num]
    assert (m.merged / "usr/bin/suid").read_bytes() == b"suid\n"
    after = layer_stats(plugin_env)[num]
    assert after["requests"] - before["requests"] == 1  # fetched whole, in one Range request
    fetched = after["fetched"] - before["fetched"]
    assert 0 < fetched < base_layer.blob_size / 100
    assert after["failures"] == 0
    assert after["cached"] >= 5


def test_first_byte_of_a_large_file_costs_one_chunk(mount_overlay: Callable[..., Mounted],
                                                    plugin_env: PluginSession) -> None:
    m = mount_overlay(lowerdir=f"//crfs/{plugin_env.fresh_key('overlay-big')}//")
    plugin_env.drop_cached_data()  # the chunk store is shared with the original layers
    num = os.stat(m.merged / "data").st_ino >> 40
    before = layer_stats(plugin_env)[num]
    with open(m.merged / "data/big.bin", "rb") as f:
        opened = layer_stats(plugin_env)[num]
        first = f.read(1)
        after = layer_stats(plugin_env)[num]
        assert first == plugin_env.image.big_bytes[:1]
        assert opened["requests"] == before["requests"]  # open fetched nothing
        assert after["requests"] - before["requests"] == 1  # one 1 MiB chunk of a 3 MiB file
        assert after["fetched"] - before["fetched"] <= (1 << 20) + (64 << 10)
        assert f.read() == plugin_env.image.big_bytes[1:]
    assert layer_stats(plugin_env)[num]["failures"] == 0


# ------------------------------------------------------------------ writing


def test_copy_up_keeps_metadata_and_xattrs(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    m = mount_overlay()
    with open(m.merged / "etc/passwd", "a") as f:
        f.write("user:x:1000:1000::/home/user:/bin/sh\n")
    assert (m.merged / "etc/passwd").read_text().endswith("/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    copied = m.upper / "etc/passwd"
    assert copied.read_text().startswith("root:x:0:0")
    with open(m.merged / "etc/xattr-file", "a") as f:
        f.write("more\n")
    assert os.getxattr(m.upper / "etc/xattr-file", "user.crfs.test") == b"hello"
    assert os.getxattr(m.merged / "etc/xattr-file", "user.crfs.test") == b"hello"
    os.chmod(m.merged / "etc/shadow", 0o600)  # a metadata-only change copies up too
    st = os.lstat(m.upper / "etc/shadow")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 42)
    assert st.st_mtime_ns == os.lstat(plugin_env.image.expected / "etc/shadow").st_mtime_ns
    assert (m.upper / "etc/shadow").read_bytes() == b"secret\n"
    # The image itself is unchanged: a second mount sees the original.
    other = mount_overlay(name="second")
    assert (other.merged / "etc/passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\n"


def test_mkdir_deep_inside_a_lower_directory(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    m = mount_overlay()
    (m.merged / "var/lib/deep/a/b/new/x").mkdir(parents=True)
    (m.merged / "var/lib/deep/a/b/new/x/file").write_text("hi\n")
    assert (m.merged / "var/lib/deep/a/b/new/x/file").read_text() == "hi\n"
    assert sorted(os.listdir(m.merged / "var/lib/deep/a/b")) == ["leaf", "new"]
    # Parents were copied up with the lower directories' metadata (read from the fds).
    for rel, expected in (("var/lib/deep/a/b", (0o700, 1000, 1000)), ("var/lib", (0o755, 5, 6)),
                          ("var/lib/deep", (0o755, 0, 0))):
        st = os.lstat(m.upper / rel)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == expected, rel
        # Times came from the lower fd too (mtime then moved: children were created in it).
        assert st.st_atime_ns == 1_700_000_000 * 10**9, rel


def test_rename_a_lower_directory(mount_overlay: Callable[..., Mounted]) -> None:
    m = mount_overlay()
    # fuse-overlayfs answers rename(2) of a lower directory with EXDEV (as overlayfs does
    # without redirect_dir); mv then copies and deletes, which is what users see.
    with pytest.raises(OSError) as exdev:
        os.rename(m.merged / "rename-me", m.merged / "renamed")
    assert exdev.value.errno == errno.EXDEV
    subprocess.run(["mv", str(m.merged / "rename-me"), str(m.merged / "renamed")], check=True)
    assert not (m.merged / "rename-me").exists()
    assert (m.merged / "renamed/f").read_text() == "in a dir to rename\n"
    assert (m.merged / "renamed/sub/g").read_text() == "g\n"
    st = os.lstat(m.merged / "renamed")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 7, 8)
    assert os.getxattr(m.merged / "renamed", "user.dirattr") == b"on-a-dir"
    # And back over the whiteout the first move left: the directory now lives in the
    # upper dir, so rename(2) works, and fuse-overlayfs reads the lower "rename-me"
    # through the plugin's DIR * with libc readdir to whiteout what must stay hidden.
    os.rename(m.merged / "renamed", m.merged / "rename-me")
    assert sorted(os.listdir(m.merged / "rename-me")) == ["f", "sub"]
    assert (m.merged / "rename-me/sub/g").read_text() == "g\n"


def test_delete_files_and_directories(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    m = mount_overlay()
    (m.merged / "etc/shadow").unlink()
    shutil.rmtree(m.merged / "var/lib/deep")
    (m.merged / "dev/null").unlink()
    assert not (m.merged / "etc/shadow").exists()
    assert not (m.merged / "var/lib/deep").exists()
    assert sorted(os.listdir(m.merged / "dev")) == ["fifo", "sda"]
    assert "shadow" not in os.listdir(m.merged / "etc")
    # The deletions are whiteouts in the upper dir (char 0/0, or .wh. files).
    shadow = m.upper / "etc/shadow"
    wh = m.upper / "etc/.wh.shadow"
    assert (shadow.exists() or shadow.is_symlink() or os.path.lexists(shadow)) or wh.exists()
    if os.path.lexists(shadow):
        st = os.lstat(shadow)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # A recreated name shows only the new file.
    (m.merged / "etc/shadow").write_text("new\n")
    assert (m.merged / "etc/shadow").read_text() == "new\n"


# ------------------------------------------------------------------ keys


def test_a_single_layer_key_mixed_with_a_plain_lower(mount_overlay: Callable[..., Mounted],
                                                     plugin_env: PluginSession, tmp_path: Path) -> None:
    layer = plugin_env.image.layers[2]  # the top layer alone
    key = KeyStore(plugin_env.runtime).register(
        f"one-layer:{tmp_path}", [LayerRecord("file", str(layer.blob), toc_digest=layer.toc_digest)])
    plain = tmp_path / "plain"
    (plain / "etc").mkdir(parents=True)
    (plain / "etc/from-plain").write_text("plain\n")
    m = mount_overlay(lowerdir=f"//crfs/{key}//:{plain}")
    assert sorted(os.listdir(m.merged / "etc")) == ["from-plain", "motd"]
    assert (m.merged / "etc/motd").read_text() == "top layer\n"


def test_unknown_key_fails_the_mount_with_a_message(plugin_env: PluginSession, tmp_path: Path) -> None:
    for d in ("u", "w", "m"):
        (tmp_path / d).mkdir()
    opts = f"plugins={plugin_env.plugin},lowerdir=//crfs/{'f' * 32}//,upperdir={tmp_path / 'u'},workdir={tmp_path / 'w'}"
    result = subprocess.run([FUSE_OVERLAYFS, "-o", opts, str(tmp_path / "m")], capture_output=True, text=True,
                            timeout=60)
    if result.returncode == 0:
        _unmount(tmp_path / "m")
    assert result.returncode != 0
    assert "crfs lowerdir" in result.stderr


def test_image_from_a_real_registry(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession,
                                    registry: Any) -> None:
    from crfs_worker.reference import ImageReference
    from tests.support.registry import push_image

    layers = plugin_env.image.layers
    ref = ImageReference.parse(f"{registry.host}/plugin/image:v1")
    with registry.client() as client:
        push_image(client, ref, [layer.blob.read_bytes() for layer in layers],
                   layer_annotations=[{"containerd.io/snapshot/stargz/toc.digest": layer.toc_digest}
                                      for layer in layers])
        lower = lowerdir_for(str(ref), runtime=plugin_env.runtime, client=client)
    assert lower.startswith("//crfs/") and lower.endswith("//") and ":" not in lower and "," not in lower
    m = mount_overlay(lowerdir=lower)
    assert snapshot(m.merged) == snapshot(plugin_env.image.expected)
    # The registry layers are distinct layers to the worker, with their own counters.
    rows = [row for row in layer_stats(plugin_env).values() if row["name"].startswith(ref.name)]
    assert len(rows) == 3
    assert all(row["failures"] == 0 and row["requests"] > 0 for row in rows)


def test_registry_image_without_toc_digests_is_refused(plugin_env: PluginSession, registry: Any) -> None:
    from crfs_worker.errors import CrfsError
    from crfs_worker.reference import ImageReference
    from tests.support.registry import push_image

    ref = ImageReference.parse(f"{registry.host}/plugin/plain-gzip:v1")
    with registry.client() as client:
        push_image(client, ref, [plugin_env.image.layers[1].blob.read_bytes()])  # no annotation
        with pytest.raises(CrfsError, match="no TOC digest"):
            lowerdir_for(str(ref), runtime=plugin_env.runtime, client=client)


# ------------------------------------------------------------------ the worker


def test_mount_starts_a_detached_worker(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    plugin_env.stop_worker()
    assert plugin_env.worker_pid() is None
    # mount_overlay waits for EOF on fuse-overlayfs' stdout and stderr (as podman does):
    # it returns only because the worker it started kept neither.
    m = mount_overlay()
    pid = plugin_env.worker_pid()
    assert pid is not None
    for n in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{n}") == "/dev/null"
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [t for t in targets if t.startswith(("/dev/pts", "/dev/tty"))]
    assert os.getsid(pid) != os.getsid(0)  # a session of its own (double fork: not its leader)
    tty_nr = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[4])
    assert tty_nr == 0  # no controlling terminal
    assert (m.merged / "etc/hostname").read_text() == "layer two\n"


def test_mount_survives_a_worker_restart(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    m = mount_overlay()
    assert (m.merged / "etc/passwd").read_text().startswith("root:")
    old = plugin_env.worker_pid()
    plugin_env.stop_worker()
    # New opens reconnect, start a new worker and swap the layers' root fds in place.
    assert (m.merged / "data/small.txt").read_bytes() == (plugin_env.image.expected / "data/small.txt").read_bytes()
    assert sorted(os.listdir(m.merged / "rename-me/sub")) == ["g"]
    (m.merged / "var/lib/deep/a/b/after-restart").mkdir()
    new = plugin_env.worker_pid()
    assert new is not None and new != old


def test_stats_report(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    from crfs_worker.worker import format_stats, request_stats

    m = mount_overlay()
    (m.merged / "etc/motd").read_bytes()
    rows = request_stats(plugin_env.runtime)
    assert {"num", "name", "fetched", "cached", "requests", "failures", "background", "prefetch"} <= set(rows[0])
    text = format_stats(rows)
    assert text.splitlines()[0].split() == ["LAYER", "FETCHED", "CACHED", "REQUESTS", "VERIFY-FAIL", "BACKGROUND",
                                            "NAME"]
    assert all(line.split()[5] == "off" for line in text.splitlines()[1:])  # CRFS_BACKGROUND_FETCH=0
    assert str(plugin_env.image.layers[2].blob) in text
    assert len(text.splitlines()) == len(rows) + 1


def test_corrupted_chunks_are_eio_and_counted(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession,
                                              tmp_path: Path) -> None:
    # A blob whose TOC is intact (so it opens) but whose big file's bytes were altered.
    original = plugin_env.image.layers[0]
    data = bytearray(original.blob.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    bad = tmp_path / "corrupt.esgz"
    bad.write_bytes(bytes(data))
    plugin_env.drop_cached_data()  # verified chunks of the intact layer would serve the reads
    key = KeyStore(plugin_env.runtime).register(
        f"corrupt:{bad}", [LayerRecord("file", str(bad), toc_digest=original.toc_digest)])
    m = mount_overlay(lowerdir=f"//crfs/{key}//")
    assert (m.merged / "etc/passwd").read_text().startswith("root:")  # untouched files still read
    with pytest.raises(OSError) as failed:
        (m.merged / "data/big.bin").read_bytes()
    assert failed.value.errno == errno.EIO
    num = os.stat(m.merged / "data").st_ino >> 40
    assert layer_stats(plugin_env)[num]["failures"] >= 1


def test_concurrent_mounts_share_one_worker(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession) -> None:
    from concurrent.futures import ThreadPoolExecutor

    plugin_env.stop_worker()
    # Each fuse-overlayfs finds no worker and starts one; the lock lets one serve them all.
    with ThreadPoolExecutor(max_workers=3) as pool:
        mounts = list(pool.map(lambda i: mount_overlay(name=f"c{i}"), range(3)))
    pid = plugin_env.worker_pid()
    assert pid is not None
    # Workers that lost the race report "ready" and exit; wait for them (a hang guard).
    for _ in range(600):
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_crfs_worker(int(p), plugin_env)]
        if workers == [pid]:
            break
        time.sleep(0.05)
    assert workers == [pid]
    for m in mounts:
        assert (m.merged / "etc/motd").read_text() == "top layer\n"


def _is_crfs_worker(pid: int, session: PluginSession) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"crfs_worker.worker" in cmdline and f"CRFS_RUNTIME_DIR={session.runtime}".encode() in environ
