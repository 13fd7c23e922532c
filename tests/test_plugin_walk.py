"""crfs.so under a metadata walk (B3's `find -exec stat`) in a real fuse-overlayfs mount.

What the plugin must not do on a walk, counted from its own trace (CRFS_PLUGIN_LOG): open
entries on the worker's FUSE view for lookups (fuse-overlayfs only reads origin xattrs
from such an fd), or open directories there to list them (load_dir's listings come
from the plugin's cached `list` replies). And what fast_ino=1 (which crfs's mount program
and `crfs mount` add) must keep: inode numbers unique across crfs layers, a plain lower
and the upper dir, hardlinks still merged.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from crfs_worker.estargz_writer import EstargzOptions, convert_file
from crfs_worker.layerkeys import INO_BITS, KeyStore, LayerRecord
from tests.support.images import ExpectedEntry, write_layer_tar
from tests.support.plugin_env import PluginSession
from tests.test_overlay_mount import (FUSE_OVERLAYFS, Mounted, hardlink_groups, layer_stats,  # noqa: F401
                                      mount_overlay, snapshot)

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")


def walk(root: Path) -> dict[str, os.stat_result]:
    """find + lstat of every entry, by path."""
    seen: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            seen[str(path.relative_to(root))] = os.lstat(path)
    return seen


def traced(log: Path, prefix: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("options", ["", "fast_ino=1"])
def test_a_walk_reaches_no_view_and_fetches_nothing(mount_overlay: Callable[..., Mounted], plugin_env: PluginSession,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    options: str) -> None:
    log = tmp_path / "plugin.log"
    monkeypatch.setenv("CRFS_PLUGIN_LOG", str(log))
    m = mount_overlay(options=options)
    before = layer_stats(plugin_env)  # the mount started the worker
    entries = walk(m.merged)
    assert len(entries) == len(snapshot(plugin_env.image.expected))
    listed = traced(log, "opendir(")
    # Every directory fuse-overlayfs listed came from the cached listing; none was opened
    # on the view (that costs an opendir, readdirs and a releasedir on the worker).
    assert listed and all("from the listing" in line and "(nil)" not in line for line in listed), listed
    # Lookup opens (fuse-overlayfs reads origin xattrs from them) are answered without an
    # fd; fast_ino=1 makes none at all.
    opens = traced(log, "openat(")
    assert all("answered without an fd" in line for line in opens), opens
    if options:
        assert opens == []
    else:
        assert len(opens) >= sum(1 for st in entries.values() if not stat.S_ISDIR(st.st_mode))
    after = layer_stats(plugin_env)
    assert {num: row["requests"] for num, row in after.items() if num in before} == \
        {num: row["requests"] for num, row in before.items()}


def test_fast_ino_keeps_inode_numbers_unique_across_layers(mount_overlay: Callable[..., Mounted],
                                                           plugin_env: PluginSession, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    (plain / "etc").mkdir(parents=True)
    (plain / "etc" / "plain-file").write_text("plain\n")
    (plain / "plain-dir").mkdir()
    (plain / "plain-dir" / "a").write_text("a\n")
    os.link(plain / "plain-dir" / "a", plain / "plain-dir" / "a-hard")
    lowers = f"//crfs/{plugin_env.key}//:{plain}"
    reference = mount_overlay(lowerdir=lowers, name="default")
    fast = mount_overlay(lowerdir=lowers, options="fast_ino=1", name="fast")
    for m in (reference, fast):
        (m.merged / "upper-file").write_text("upper\n")
        (m.merged / "etc" / "hostname-copy").write_text("copy\n")
    # Nothing vanished (a directory whose key collides is dropped) and nothing merged wrongly
    # (the files written here differ only in their mtime).
    upper_only = {"upper-file", "etc/hostname-copy"}
    trees = [snapshot(m.merged) for m in (fast, reference)]
    for tree in trees:
        for path in upper_only:
            del tree[path]["mtime"]
    assert trees[0] == trees[1]
    assert hardlink_groups(fast.merged) == hardlink_groups(reference.merged)
    assert frozenset({"plain-dir/a", "plain-dir/a-hard"}) in hardlink_groups(fast.merged)
    assert frozenset({"usr/bin/tool", "usr/bin/tool-hard"}) in hardlink_groups(fast.merged)
    entries = walk(fast.merged)
    by_ino: dict[int, set[str]] = {}
    for path, st in entries.items():
        by_ino.setdefault(st.st_ino, set()).add(path)
    shared = {frozenset(paths) for paths in by_ino.values() if len(paths) > 1}
    assert shared <= hardlink_groups(fast.merged)
    # crfs entries carry their layer number in the high bits; the plain lower's and the
    # upper dir's come from a local filesystem, far below.
    crfs_paths = set(snapshot(plugin_env.image.expected))
    plain_only = {"etc/plain-file", "plain-dir", "plain-dir/a", "plain-dir/a-hard"}
    for path in crfs_paths - {"etc"}:
        assert entries[path].st_ino >> INO_BITS >= 1, path
    for path in plain_only | upper_only:
        assert entries[path].st_ino >> INO_BITS == 0, path


@pytest.mark.parametrize("options", ["", "fast_ino=1"])
def test_copy_file_range_from_a_lower_file_copies_its_bytes(mount_overlay: Callable[..., Mounted],
                                                            plugin_env: PluginSession, options: str) -> None:
    # fuse-overlayfs opens the source of copy_file_range with the flags and mode of its
    # lookup opens, which crfs.so answers without an fd (ENOSYS): the kernel must then copy
    # through ordinary reads, never leave a short or empty file.
    m = mount_overlay(options=options)
    want = plugin_env.image.big_bytes
    src = os.open(m.merged / "data/big.bin", os.O_RDONLY)
    dst = os.open(m.merged / "big-copy.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        copied = 0
        while copied < len(want):
            n = os.copy_file_range(src, dst, len(want) - copied)
            assert n > 0, f"copy_file_range stopped at {copied} of {len(want)} bytes"
            copied += n
    finally:
        os.close(src)
        os.close(dst)
    assert (m.merged / "big-copy.bin").read_bytes() == want


def listings(log: Path) -> tuple[list[str], list[str], list[str]]:
    """(layer, path) of the listings crfs.so asked for on demand, asked for ahead, and
    took from the look-ahead, as `NUM, PATH` strings."""
    lines = log.read_text().splitlines()
    on_demand = [line[len("list("):line.rindex(") = ")] for line in lines if line.startswith("list(")]
    ahead = [line[len("list ahead("):-1] for line in lines if line.startswith("list ahead(") and line.endswith(")")]
    taken = [line[len("list ahead("):-len(") = taken")] for line in lines
             if line.startswith("list ahead(") and line.endswith(") = taken")]
    return on_demand, ahead, taken


@pytest.mark.parametrize("options", ["", "fast_ino=1"])
def test_a_walk_lists_each_directory_once_mostly_ahead(mount_overlay: Callable[..., Mounted],
                                                       plugin_env: PluginSession, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, options: str) -> None:
    # fuse-overlayfs lists a directory when it is looked up; crfs.so asks the worker for
    # the subdirectories of each directory listed so, ahead, on a second connection.
    trees = {}
    for ahead in ("0", ""):
        log = tmp_path / f"plugin-{ahead or 'default'}.log"
        monkeypatch.setenv("CRFS_PLUGIN_LOG", str(log))
        monkeypatch.setenv("CRFS_LIST_AHEAD", ahead)
        m = mount_overlay(options=options, name=f"ahead-{ahead or 'default'}")
        trees[ahead] = {path: (st.st_mode, st.st_size, st.st_ino, st.st_nlink) for path, st in walk(m.merged).items()}
        on_demand, asked, taken = listings(log)
        # Never a directory listed twice: on demand or from the look-ahead, once.
        assert len(set(on_demand)) == len(on_demand) and set(on_demand).isdisjoint(taken), (on_demand, taken)
        assert len(set(taken)) == len(taken) and set(taken) <= set(asked)
        if ahead == "0":
            assert asked == [] and len(on_demand) >= 10
            listed = set(on_demand)
        else:
            # The same directories, most of them listed before the walk reached them (and
            # a few the walk never needs: a lower layer's directory that an upper one
            # removes or makes opaque).
            assert listed <= set(on_demand) | set(taken) and set(on_demand) <= listed
            assert len(listed & set(taken)) > len(on_demand), (on_demand, taken)
    assert trees["0"] == trees[""] and len(trees[""]) == len(snapshot(plugin_env.image.expected))


def traced_requests(log: Path, op: str) -> tuple[list[str], list[str]]:
    """`NUM, PATH` of the OP requests crfs.so made on demand, and those it took ahead."""
    lines = log.read_text().splitlines()
    on_demand = [line[len(op) + 1:line.rindex(") = ")] for line in lines if line.startswith(f"{op}(")]
    taken = [line[len(op) + len(" ahead("):-len(") = taken")] for line in lines
             if line.startswith(f"{op} ahead(") and line.endswith(") = taken")]
    return on_demand, taken


LINKS = {f"links/l{i}": "../" * i + f"target-{i}" for i in range(6)} | \
    {f"links/sub/s{i}": "/abs/" + "x" * (100 * i) for i in range(1, 4)} | {"alone/one": "one-target"}


def symlink_layer(plugin_env: PluginSession, workdir: Path) -> str:
    """A one-layer image with directories of several symlinks each; returns its key."""
    entries = [(d, ExpectedEntry(d, "dir", 0o755)) for d in ("links", "links/sub", "alone")]
    entries += [(path, ExpectedEntry(path, "symlink", 0o777, link=target)) for path, target in LINKS.items()]
    tar, blob = workdir / "links.tar", workdir / "links.esgz"
    workdir.mkdir(parents=True, exist_ok=True)
    write_layer_tar(tar, entries)
    result = convert_file(tar, blob, EstargzOptions(workers=1))
    record = LayerRecord("file", str(blob), toc_digest=result.toc_digest)
    return KeyStore(plugin_env.runtime).register(f"links:{blob}", [record])


def test_symlinks_are_read_from_the_worker_once_most_of_them_ahead(mount_overlay: Callable[..., Mounted],
                                                                   plugin_env: PluginSession, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Who reads one symlink of a directory (stat, ls -l, a loader) reads the others next:
    # crfs.so asks for their targets ahead, and keeps every target it has read.
    key = symlink_layer(plugin_env, tmp_path / "image")
    for ahead in ("0", ""):
        log = tmp_path / f"plugin-{ahead or 'default'}.log"
        monkeypatch.setenv("CRFS_PLUGIN_LOG", str(log))
        monkeypatch.setenv("CRFS_LIST_AHEAD", ahead)
        m = mount_overlay(lowerdir=f"//crfs/{key}//", name=f"links-{ahead or 'default'}")
        for _ in range(2):
            assert {path: os.readlink(m.merged / path) for path in LINKS} == LINKS
        on_demand, taken = traced_requests(log, "readlink")
        paths = [entry.split(", ", 1)[1] for entry in on_demand + taken]
        assert sorted(paths) == sorted(LINKS)  # each read once, on demand or ahead
        if ahead == "0":
            assert taken == []
        else:  # the first of each directory on demand, the others ahead
            dirs = [entry.split(", ", 1)[1].rsplit("/", 1)[0] for entry in on_demand]
            assert sorted(dirs) == ["alone", "links", "links/sub"], on_demand
