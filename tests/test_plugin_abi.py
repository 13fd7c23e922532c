"""crfs.so called the way fuse-overlayfs calls it: dlopen'd (cffi), the ABI structs
re-declared from the verified layout, against a real worker serving real eStargz layers.
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import cffi
import pytest

from crfs_worker.layerkeys import INO_BITS
from tests.support.plugin_env import PluginSession, build_plugin

CDEF = """
struct ovl_layer {
  struct ovl_layer *next;
  void *ds;
  void *ovl_data;
  char *path;
  int fd;
  bool low;
  void *data_source_private_data;
  int stat_override_mode;
};
struct stat {                       /* x86-64 glibc */
  unsigned long st_dev; unsigned long st_ino; unsigned long st_nlink;
  unsigned int st_mode; unsigned int st_uid; unsigned int st_gid; int __pad0;
  unsigned long st_rdev; long st_size; long st_blksize; long st_blocks;
  long st_atime; long st_atime_nsec; long st_mtime; long st_mtime_nsec;
  long st_ctime; long st_ctime_nsec; long __unused[3];
};
struct dirent {
  unsigned long d_ino; long d_off; unsigned short d_reclen; unsigned char d_type; char d_name[256];
};
struct data_source {
  int (*num_of_layers) (const char *opaque, const char *path);
  int (*load_data_source) (struct ovl_layer *l, const char *opaque, const char *path, int n_layer);
  int (*cleanup) (struct ovl_layer *l);
  int (*file_exists) (struct ovl_layer *l, const char *pathname);
  int (*statat) (struct ovl_layer *l, const char *path, struct stat *st, int flags, unsigned int mask);
  int (*fstat) (struct ovl_layer *l, int fd, const char *path, unsigned int mask, struct stat *st);
  void *(*opendir) (struct ovl_layer *l, const char *path);
  struct dirent *(*readdir) (void *dirp);
  int (*closedir) (void *dirp);
  int (*openat) (struct ovl_layer *l, const char *path, int flags, unsigned int mode);
  int (*listxattr) (struct ovl_layer *l, const char *path, char *buf, size_t size);
  int (*getxattr) (struct ovl_layer *l, const char *path, const char *name, char *buf, size_t size);
  long (*readlinkat) (struct ovl_layer *l, const char *path, char *buf, size_t bufsiz);
  bool (*support_acls) (struct ovl_layer *l);
};
int plugin_version(void);
const char *plugin_name(void);
struct data_source *plugin_load(const char *opaque, const char *path);
int plugin_release(void);
struct dirent *readdir(void *dirp);   /* libc's, through dlopen(None) */
"""
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BASIC = 0x7FF
DT_DIR, DT_REG = 4, 8


class LoadedPlugin:
    """crfs.so loaded once per test module, with its layers loaded for the test image."""

    def __init__(self, path: Path, key: str) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        self.lib = self.ffi.dlopen(str(path))
        self.key = key
        self.ds: Any = None
        self.layers: list[Any] = []

    def load(self) -> None:
        self.ds = self.lib.plugin_load(self.key.encode(), b"/")
        assert self.ds != self.ffi.NULL
        n = self.ds.num_of_layers(self.key.encode(), b"/")
        assert n == 3
        for i in range(n):
            layer = self.ffi.new("struct ovl_layer *")
            layer.fd = -1  # as fuse-overlayfs sets it before load
            assert self.ds.load_data_source(layer, self.key.encode(), b"/", i) == 0
            self.layers.append(layer)

    def release(self) -> None:
        for layer in self.layers:
            assert self.ds.cleanup(layer) == 0
            os.close(layer.fd)  # fuse-overlayfs closes l->fd itself
        self.layers.clear()
        assert self.lib.plugin_release() == 0

    def stat(self, layer: Any, path: str) -> tuple[int, Any]:
        st = self.ffi.new("struct stat *")
        self.ffi.memmove(st, b"\xa5" * self.ffi.sizeof("struct stat"), self.ffi.sizeof("struct stat"))
        ret = self.ds.statat(layer, path.encode(), st, AT_SYMLINK_NOFOLLOW, STATX_BASIC)
        return (ret if ret == 0 else -self.ffi.errno), st

    def exists(self, layer: Any, path: str) -> int:
        ret = self.ds.file_exists(layer, path.encode())
        return 0 if ret == 0 else -self.ffi.errno

    def listdir(self, layer: Any, path: str) -> dict[str, tuple[int, int]]:
        dirp = self.ds.opendir(layer, path.encode())
        assert dirp != self.ffi.NULL, os.strerror(self.ffi.errno)
        names: dict[str, tuple[int, int]] = {}
        while True:
            self.ffi.errno = 0
            dent = self.ds.readdir(dirp)
            if dent == self.ffi.NULL:
                assert self.ffi.errno == 0
                break
            names[self.ffi.string(dent.d_name).decode()] = (dent.d_type, dent.d_ino)
        assert self.ds.closedir(dirp) == 0
        return names

    def getxattr(self, layer: Any, path: str, name: str, size: int) -> tuple[int, bytes]:
        buf = self.ffi.new("char[]", max(size, 1))
        ret = self.ds.getxattr(layer, path.encode(), name.encode(), buf if size else self.ffi.NULL, size)
        if ret < 0:
            return -self.ffi.errno, b""
        return ret, bytes(self.ffi.buffer(buf, ret)) if size else b""

    def listxattr(self, layer: Any, path: str, size: int) -> tuple[int, bytes]:
        buf = self.ffi.new("char[]", max(size, 1))
        ret = self.ds.listxattr(layer, path.encode(), buf if size else self.ffi.NULL, size)
        if ret < 0:
            return -self.ffi.errno, b""
        return ret, bytes(self.ffi.buffer(buf, ret)) if size else b""

    def readlink(self, layer: Any, path: str, size: int) -> tuple[int, bytes]:
        buf = self.ffi.new("char[]", size)
        ret = self.ds.readlinkat(layer, path.encode(), buf, size)
        if ret < 0:
            return -self.ffi.errno, b""
        return ret, bytes(self.ffi.buffer(buf, ret))

    def openat(self, layer: Any, path: str, flags: int) -> int:
        ret = self.ds.openat(layer, path.encode(), flags, 0o700)
        return ret if ret >= 0 else -self.ffi.errno


@pytest.fixture(scope="module")
def plugin(plugin_session: PluginSession) -> Iterator[LoadedPlugin]:
    saved = {k: os.environ.get(k) for k in plugin_session.env}
    os.environ.update(plugin_session.env)
    loaded = LoadedPlugin(plugin_session.plugin, plugin_session.key)
    loaded.load()
    yield loaded
    loaded.release()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def layer_stats(session: PluginSession) -> dict[int, dict[str, int]]:
    with session.client() as client:
        return {row["num"]: row for row in client.call("stats").fields["layers"]}


# ------------------------------------------------------------------ symbols


def test_exports_exactly_the_plugin_symbols(plugin_session: PluginSession) -> None:
    out = subprocess.run(["nm", "-D", "--defined-only", str(plugin_session.plugin)],
                         check=True, capture_output=True, text=True).stdout
    exported = sorted(line.split()[-1] for line in out.splitlines() if " T " in line)
    assert exported == ["plugin_load", "plugin_name", "plugin_release", "plugin_version"]


def test_version_and_name(plugin: LoadedPlugin) -> None:
    assert plugin.lib.plugin_version() == 1
    assert plugin.ffi.string(plugin.lib.plugin_name()) == b"crfs"
    assert plugin.ds.support_acls(plugin.layers[0]) is False


def test_invalid_keys_are_refused(plugin: LoadedPlugin) -> None:
    for bad in (b"sha256:abc", b"a,b", b""):
        assert plugin.lib.plugin_load(bad, b"/") == plugin.ffi.NULL
    assert plugin.ds.num_of_layers(b"0" * 32, b"/") == -1  # well-formed but unknown
    assert plugin.ffi.errno == errno.ENOENT


# ------------------------------------------------------------------ load


def test_layers_get_real_directory_fds(plugin: LoadedPlugin) -> None:
    nums = set()
    for layer in plugin.layers:
        assert layer.fd >= 0
        st = os.fstat(layer.fd)
        assert stat.S_ISDIR(st.st_mode)
        assert fcntl_flags(layer.fd) & os.O_DIRECTORY
        assert os.get_inheritable(layer.fd) is False
        assert plugin.ffi.string(layer.path) == b"/"
        ret, root = plugin.stat(layer, ".")
        assert ret == 0 and root.st_ino == st.st_ino and root.st_dev == st.st_dev
        nums.add(st.st_ino >> INO_BITS)
    assert len(nums) == 3  # a distinct layer number per layer, in the high bits


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


# ------------------------------------------------------------------ metadata


def test_statat_matches_the_tar(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    base = plugin.layers[2]  # the lowest layer
    expected = plugin_session.image.expected
    for path in ("etc/passwd", "etc/shadow", "usr/bin/tool", "usr/bin/suid", "usr/bin/link",
                 "etc/alt", "dev/null", "dev/sda", "dev/fifo", "rename-me", "data/big.bin", "data/empty"):
        ret, st = plugin.stat(base, path)
        assert ret == 0, path
        want = os.lstat(expected / path)
        assert (st.st_mode, st.st_uid, st.st_gid) == (want.st_mode, want.st_uid, want.st_gid), path
        assert st.st_rdev == want.st_rdev, path
        if not stat.S_ISDIR(want.st_mode):
            assert st.st_size == want.st_size, path
        assert (st.st_mtime, st.st_mtime_nsec) == (1_700_000_000, 0)
        assert (st.st_atime, st.st_ctime) == (st.st_mtime, st.st_mtime)  # the whole struct is filled
        assert st.st_blksize == 4096 and st.st_nlink >= 1 and st.st_ino != 0
        assert st.__pad0 == 0


def test_inode_numbers(plugin: LoadedPlugin) -> None:
    top, middle, base = plugin.layers
    _, tool = plugin.stat(base, "usr/bin/tool")
    _, hard = plugin.stat(base, "usr/bin/tool-hard")
    _, passwd = plugin.stat(base, "etc/passwd")
    assert tool.st_ino == hard.st_ino and tool.st_nlink == 2
    assert tool.st_ino != passwd.st_ino
    _, again = plugin.stat(base, "/usr/bin/tool")
    assert again.st_ino == tool.st_ino  # stable
    _, etc_top = plugin.stat(top, "etc")
    _, etc_base = plugin.stat(base, "etc")
    assert etc_top.st_ino >> INO_BITS != etc_base.st_ino >> INO_BITS


def test_file_exists_errno_conventions(plugin: LoadedPlugin) -> None:
    top, middle, base = plugin.layers
    for spelling in ("etc/passwd", "/etc/passwd", "./etc/passwd", "etc//passwd"):
        assert plugin.exists(base, spelling) == 0, spelling
    for root in (".", "", "/", "./"):
        assert plugin.exists(base, root) == 0
    assert plugin.exists(base, "etc/.wh.passwd") == -errno.ENOENT
    assert plugin.exists(middle, "etc/.wh.remove-me") == 0          # the whiteout, as the tar has it
    assert plugin.exists(middle, "opaque-me/.wh..wh..opq") == 0
    assert plugin.exists(middle, ".wh.doomed-dir") == 0
    assert plugin.exists(base, "etc/passwd/x") in (-errno.ENOENT, -errno.ENOTDIR)
    assert plugin.exists(base, "a/../etc") == -errno.ENOENT
    assert plugin.exists(base, ".no.prefetch.landmark") == -errno.ENOENT  # format artifact
    assert plugin.exists(base, "x" * 5000) == -errno.ENAMETOOLONG
    ret, _ = plugin.stat(base, "missing")
    assert ret == -errno.ENOENT


def test_readdir_gives_a_real_dir_stream(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    top, middle, base = plugin.layers
    root = plugin.listdir(base, ".")
    assert set(root) - {".", ".."} == {"data", "dev", "doomed-dir", "etc", "opaque-me", "rename-me", "usr", "var"}
    assert root["etc"][0] == DT_DIR
    etc = plugin.listdir(middle, "etc")
    assert set(etc) - {".", ".."} == {"hostname", ".wh.remove-me"}
    assert etc["hostname"][0] == DT_REG
    # d_ino agrees with statat (fast_ino=1 keys nodes by it).
    _, st = plugin.stat(middle, "etc/hostname")
    assert etc["hostname"][1] == st.st_ino
    big_dir = plugin.listdir(base, "usr/bin")
    assert {"tool", "tool-hard", "link", "suid"} <= set(big_dir)
    assert plugin.ds.opendir(base, b"etc/passwd") == plugin.ffi.NULL and plugin.ffi.errno == errno.ENOTDIR
    assert plugin.ds.opendir(base, b"nope") == plugin.ffi.NULL and plugin.ffi.errno == errno.ENOENT


def test_load_dirs_listing_comes_from_the_cache(plugin: LoadedPlugin) -> None:
    top, middle, base = plugin.layers
    st = plugin.ffi.new("struct stat *")
    # fuse-overlayfs' load_dir probes with statat(STATX_TYPE) right before opendir: that
    # stream is answered from the cached listing, same names, types and inode numbers.
    want = plugin.listdir(middle, "etc")
    assert plugin.ds.statat(middle, b"etc", st, AT_SYMLINK_NOFOLLOW, 0x1) == 0
    dirp = plugin.ds.opendir(middle, b"etc")
    assert dirp != plugin.ffi.NULL
    names = {}
    while True:
        plugin.ffi.errno = 0
        dent = plugin.ds.readdir(dirp)
        if dent == plugin.ffi.NULL:
            assert plugin.ffi.errno == 0
            break
        names[plugin.ffi.string(dent.d_name).decode()] = (dent.d_type, dent.d_ino)
    assert names == {name: v for name, v in want.items() if name not in (".", "..")}
    # It is still a real DIR *, but on a removed directory: libc readdir lists nothing.
    libc = plugin.ffi.dlopen(None)
    assert libc.readdir(dirp) == plugin.ffi.NULL
    assert plugin.ds.closedir(dirp) == 0
    # Another call in between: a stream of the view, which libc readdir can read.
    assert plugin.ds.statat(middle, b"etc", st, AT_SYMLINK_NOFOLLOW, 0x1) == 0
    assert plugin.ds.file_exists(middle, b"etc/.wh.x") == -1
    dirp = plugin.ds.opendir(middle, b"etc")
    listed = set()
    while (dent := libc.readdir(dirp)) != plugin.ffi.NULL:
        listed.add(plugin.ffi.string(dent.d_name).decode())
    assert listed - {".", ".."} == set(names)
    assert plugin.ds.closedir(dirp) == 0


def test_lookup_opens_are_answered_without_an_fd(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    base = plugin.layers[2]
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
    # fuse-overlayfs' lookup open (flags and mode exactly these) only reads origin xattrs
    # from the fd and takes statat's answer when it fails.
    for path, err in (("etc/passwd", errno.ENOSYS), ("data/big.bin", errno.ENOSYS), ("etc", errno.ENOSYS),
                      ("nope", errno.ENOENT), ("etc/passwd/x", errno.ENOTDIR)):
        assert plugin.ds.openat(base, path.encode(), flags, 0o755) == -1, path
        assert plugin.ffi.errno == err, path
    # Any other mode or flags is an open as before.
    fd = plugin.ds.openat(base, b"etc/passwd", flags, 0o700)
    assert fd >= 0 and os.read(fd, 5) == b"root:"
    os.close(fd)


def test_xattrs_follow_lgetxattr_semantics(plugin: LoadedPlugin) -> None:
    base = plugin.layers[2]
    assert plugin.getxattr(base, "etc/xattr-file", "user.crfs.test", 0) == (5, b"")
    assert plugin.getxattr(base, "etc/xattr-file", "user.crfs.test", 64) == (5, b"hello")
    assert plugin.getxattr(base, "etc/xattr-file", "user.other", 10)[0] == -errno.ERANGE
    assert plugin.getxattr(base, "etc/xattr-file", "user.missing", 64)[0] == -errno.ENODATA
    assert plugin.getxattr(base, "etc", "trusted.overlay.opaque", 16)[0] == -errno.ENODATA
    assert plugin.getxattr(base, "nope", "user.x", 16)[0] == -errno.ENOENT
    names = b"user.crfs.test\0user.other\0"
    assert plugin.listxattr(base, "etc/xattr-file", 0) == (len(names), b"")
    assert plugin.listxattr(base, "etc/xattr-file", 100) == (len(names), names)
    assert plugin.listxattr(base, "etc/xattr-file", 5)[0] == -errno.ERANGE
    assert plugin.listxattr(base, "etc/passwd", 100) == (0, b"")


def test_readlinkat(plugin: LoadedPlugin) -> None:
    base = plugin.layers[2]
    assert plugin.readlink(base, "etc/alt", 100) == (13, b"/etc/hostname")
    assert plugin.readlink(base, "etc/alt", 4) == (4, b"/etc")  # truncated, no NUL
    assert plugin.readlink(base, "usr/bin/link", 100) == (4, b"tool")
    assert plugin.readlink(base, "etc/passwd", 100)[0] == -errno.EINVAL
    assert plugin.readlink(base, "nope", 100)[0] == -errno.ENOENT


# ------------------------------------------------------------------ open


def test_openat_small_file_reads_verified_bytes_from_the_cache(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    top, middle, base = plugin.layers
    fd = plugin.openat(base, "data/small.txt", 0o500000)  # O_NOFOLLOW|O_CLOEXEC, as seen live
    assert fd >= 0
    try:
        assert os.read(fd, 1000) == (plugin_session.image.expected / "data/small.txt").read_bytes()
        target = os.readlink(f"/proc/self/fd/{fd}")
        assert target.startswith(str(plugin_session.cache))  # the shared content cache
        assert os.fstat(fd).st_mode & 0o777 == 0o600
    finally:
        os.close(fd)
    fd = plugin.openat(middle, "etc/hostname", os.O_RDONLY)
    assert os.read(fd, 100) == b"layer two\n"
    os.close(fd)
    fd = plugin.openat(base, "data/empty", os.O_RDONLY)
    assert os.read(fd, 100) == b""
    os.close(fd)


def test_openat_large_file_fetches_one_chunk_for_the_first_byte(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    key = plugin_session.fresh_key("abi-big", layers=(0,)).encode()
    assert plugin.ds.num_of_layers(key, b"/") == 1
    base = plugin.ffi.new("struct ovl_layer *")
    base.fd = -1
    assert plugin.ds.load_data_source(base, key, b"/", 0) == 0
    num = os.fstat(base.fd).st_ino >> INO_BITS
    plugin_session.drop_cached_data()  # the chunk store is shared with the original layers
    try:
        before = layer_stats(plugin_session)[num]
        fd = plugin.openat(base, "data/big.bin", os.O_RDONLY | os.O_CLOEXEC)
        assert fd >= 0
        try:
            opened = layer_stats(plugin_session)[num]
            assert opened["requests"] == before["requests"]  # opening fetched nothing
            assert os.pread(fd, 1, 0) == plugin_session.image.big_bytes[:1]
            first = layer_stats(plugin_session)[num]
            assert first["requests"] - before["requests"] == 1  # one chunk
            assert first["fetched"] - before["fetched"] < 2 << 20  # of a 3 MiB file in 1 MiB chunks
            data = os.pread(fd, len(plugin_session.image.big_bytes) + 10, 0)
            assert data == plugin_session.image.big_bytes
        finally:
            os.close(fd)
    finally:
        assert plugin.ds.cleanup(base) == 0
        os.close(base.fd)


def test_lookup_opens_fetch_nothing_and_show_xattrs(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    base = plugin.layers[2]
    num = os.fstat(base.fd).st_ino >> INO_BITS
    before = layer_stats(plugin_session)[num]
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
    for path in ("etc/passwd", "etc/xattr-file", "data/big.bin", "usr/bin/tool"):
        fd = plugin.openat(base, path, flags)
        assert fd >= 0, path
        if path == "etc/xattr-file":
            assert sorted(os.listxattr(fd)) == ["user.crfs.test", "user.other"]
            assert os.getxattr(fd, "user.crfs.test") == b"hello"
        os.close(fd)
    assert layer_stats(plugin_session)[num]["requests"] == before["requests"]
    # A full open of a file with xattrs keeps them on the fd (copy-up reads them there).
    fd = plugin.openat(base, "etc/xattr-file", os.O_RDONLY)
    assert os.getxattr(fd, "user.crfs.test") == b"hello"
    assert os.read(fd, 100) == b"has xattrs\n"
    os.close(fd)


def test_directory_fds_carry_the_layer_metadata(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    base = plugin.layers[2]
    fd = plugin.openat(base, "var/lib/deep/a/b", os.O_RDONLY | os.O_DIRECTORY)
    assert fd >= 0
    st = os.fstat(fd)
    os.close(fd)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o700, 1000, 1000, 1_700_000_000)
    fd = plugin.openat(base, "rename-me", os.O_RDONLY | os.O_DIRECTORY)
    assert os.getxattr(fd, "user.dirattr") == b"on-a-dir"
    os.close(fd)


def test_openat_refusals(plugin: LoadedPlugin) -> None:
    base = plugin.layers[2]
    assert plugin.openat(base, "etc/passwd", os.O_WRONLY) == -errno.EROFS
    assert plugin.openat(base, "etc/passwd", os.O_RDWR | os.O_CREAT) == -errno.EROFS
    assert plugin.openat(base, "etc/alt", os.O_RDONLY | os.O_NOFOLLOW) == -errno.ELOOP
    assert plugin.openat(base, "etc/passwd", os.O_RDONLY | os.O_DIRECTORY) == -errno.ENOTDIR
    assert plugin.openat(base, "nope", os.O_RDONLY) == -errno.ENOENT
    assert plugin.openat(base, "../../etc/passwd", os.O_RDONLY) == -errno.ENOENT


def test_fstat_answers_for_the_path(plugin: LoadedPlugin) -> None:
    base = plugin.layers[2]
    fd = plugin.openat(base, "usr/bin/tool", os.O_RDONLY)
    st = plugin.ffi.new("struct stat *")
    assert plugin.ds.fstat(base, fd, b"usr/bin/tool", STATX_BASIC, st) == 0
    os.close(fd)
    assert st.st_uid == 1000 and st.st_size == 20


def test_worker_restart_is_survived(plugin: LoadedPlugin, plugin_session: PluginSession) -> None:
    base = plugin.layers[2]
    old_fd = base.fd
    plugin_session.stop_worker()
    assert plugin_session.worker_pid() is None
    # The next round trip restarts the worker and replaces the root fds in place.
    fd = plugin.openat(base, "etc/passwd", os.O_RDONLY)
    assert fd >= 0 and os.read(fd, 5) == b"root:"
    os.close(fd)
    assert plugin_session.worker_pid() is not None
    assert base.fd == old_fd
    assert sorted(os.listdir(base.fd)) == ["data", "dev", "doomed-dir", "etc", "opaque-me", "rename-me", "usr", "var"]
    ret, st = plugin.stat(base, ".")
    assert ret == 0 and st.st_ino == os.fstat(base.fd).st_ino


# ------------------------------------------------------------------ leaks

HARNESS = r"""
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct ovl_layer { struct ovl_layer *next; void *ds; void *ovl_data; char *path; int fd; bool low;
                   void *priv; int stat_override_mode; };
struct data_source {
  int (*num_of_layers) (const char *, const char *);
  int (*load_data_source) (struct ovl_layer *, const char *, const char *, int);
  int (*cleanup) (struct ovl_layer *);
  int (*file_exists) (struct ovl_layer *, const char *);
  int (*statat) (struct ovl_layer *, const char *, struct stat *, int, unsigned int);
  int (*fstat) (struct ovl_layer *, int, const char *, unsigned int, struct stat *);
  void *(*opendir) (struct ovl_layer *, const char *);
  struct dirent *(*readdir) (void *);
  int (*closedir) (void *);
  int (*openat) (struct ovl_layer *, const char *, int, mode_t);
  int (*listxattr) (struct ovl_layer *, const char *, char *, size_t);
  int (*getxattr) (struct ovl_layer *, const char *, const char *, char *, size_t);
  ssize_t (*readlinkat) (struct ovl_layer *, const char *, char *, size_t);
  bool (*support_acls) (struct ovl_layer *);
};

#define CHECK(c) do { if (!(c)) { fprintf (stderr, "failed: %s\n", #c); return 2; } } while (0)

int main (int argc, char **argv)
{
  void *h = dlopen (argv[1], RTLD_NOW | RTLD_LOCAL);
  CHECK (h);
  int (*version) (void) = dlsym (h, "plugin_version");
  struct data_source *(*load) (const char *, const char *) = dlsym (h, "plugin_load");
  int (*release) (void) = dlsym (h, "plugin_release");
  CHECK (version () == 1);
  char *key = strdup (argv[2]), *path = strdup ("/");   /* freed right after, as fuse-overlayfs does */
  struct data_source *ds = load (key, path);
  CHECK (ds);
  int n = ds->num_of_layers (key, path);
  CHECK (n == 3);
  struct ovl_layer *layers = calloc (n, sizeof (*layers));
  for (int i = 0; i < n; i++) {
    layers[i].fd = -1;
    CHECK (ds->load_data_source (&layers[i], key, path, i) == 0);
    layers[i].path = layers[i].path;  /* malloc'd by the plugin, freed by us below */
  }
  free (key);
  free (path);
  struct ovl_layer *base = &layers[2];
  for (int round = 0; round < 3; round++) {
    struct stat st;
    char buf[256];
    CHECK (ds->file_exists (base, "etc/passwd") == 0);
    CHECK (ds->file_exists (base, "etc/.wh.passwd") == -1);
    CHECK (ds->statat (base, "usr/bin/tool", &st, 0x100, 0x7ff) == 0 && st.st_uid == 1000);
    CHECK (ds->statat (base, "missing", &st, 0x100, 0x7ff) == -1);
    CHECK (ds->getxattr (base, "etc/xattr-file", "user.crfs.test", buf, sizeof buf) == 5);
    CHECK (ds->getxattr (base, "etc/xattr-file", "user.crfs.test", buf, 2) == -1);
    CHECK (ds->listxattr (base, "etc/xattr-file", buf, sizeof buf) > 0);
    CHECK (ds->readlinkat (base, "etc/alt", buf, sizeof buf) == 13);
    void *d = ds->opendir (base, "usr/bin");
    CHECK (d);
    int entries = 0;
    while (ds->readdir (d)) entries++;
    CHECK (entries >= 4);
    CHECK (ds->closedir (d) == 0);
    /* load_dir's pattern: a STATX_TYPE probe, then the listing stream (one left open:
       cleanup and release must free it). */
    CHECK (ds->statat (base, "usr/bin", &st, 0x100, 0x1) == 0);
    d = ds->opendir (base, "usr/bin");
    CHECK (d);
    for (entries = 0; ds->readdir (d); entries++)
      ;
    CHECK (entries >= 4);
    CHECK (ds->closedir (d) == 0);
    CHECK (ds->statat (base, "etc", &st, 0x100, 0x1) == 0);
    if (round == 2)
      CHECK (ds->opendir (base, "etc") != NULL);
    CHECK (ds->openat (base, "etc/passwd", O_RDONLY | O_NONBLOCK | O_NOFOLLOW, 0755) == -1);
    CHECK (ds->openat (base, "etc/nope", O_RDONLY | O_NONBLOCK | O_NOFOLLOW, 0755) == -1);
    int fd = ds->openat (base, "data/small.txt", O_RDONLY | O_NOFOLLOW | O_CLOEXEC, 0700);
    CHECK (fd >= 0 && read (fd, buf, 10) == 10);
    close (fd);
    fd = ds->openat (base, "data/big.bin", O_RDONLY, 0);
    CHECK (fd >= 0 && pread (fd, buf, 10, 0) == 10);
    close (fd);
    CHECK (ds->openat (base, "etc/passwd", O_WRONLY, 0) == -1);
  }
  for (int i = 0; i < n; i++) {
    CHECK (ds->cleanup (&layers[i]) == 0);
    close (layers[i].fd);
    free (layers[i].path);
  }
  free (layers);
  CHECK (release () == 0);
  puts ("ok");
  return 0;
}
"""


def test_no_leaks_under_valgrind(plugin_session: PluginSession, tmp_path: Path) -> None:
    plugin_so = build_plugin()
    source = tmp_path / "harness.c"
    source.write_text(textwrap.dedent(HARNESS))
    binary = tmp_path / "harness"
    subprocess.run(["gcc", "-O0", "-g", "-Wall", "-o", str(binary), str(source), "-ldl"], check=True)
    env = {**os.environ, **plugin_session.env}
    result = subprocess.run(
        ["valgrind", "--leak-check=full", "--show-leak-kinds=definite,indirect,possible",
         "--errors-for-leak-kinds=definite,indirect,possible", "--error-exitcode=99",
         "--track-fds=no", str(binary), str(plugin_so), plugin_session.key],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "ok"
    assert "ERROR SUMMARY: 0 errors" in result.stderr


def test_no_leaks_or_overflows_under_address_sanitizer(plugin_session: PluginSession, tmp_path: Path) -> None:
    """The same harness, built with -fsanitize=address, loading the ASan build of the
    plugin (make crfs-asan.so): any overflow, use after free or leak fails it."""
    plugin_so = build_plugin("crfs-asan.so")
    source = tmp_path / "harness.c"
    source.write_text(textwrap.dedent(HARNESS))
    binary = tmp_path / "harness-asan"
    subprocess.run(["gcc", "-O0", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-Wall",
                    "-o", str(binary), str(source), "-ldl"], check=True)
    env = {**os.environ, **plugin_session.env,
           "ASAN_OPTIONS": "detect_leaks=1:exitcode=98:detect_stack_use_after_return=1",
           "LSAN_OPTIONS": "exitcode=97"}
    result = subprocess.run([str(binary), str(plugin_so), plugin_session.key], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "ok"
    assert "ERROR: AddressSanitizer" not in result.stderr
    assert "ERROR: LeakSanitizer" not in result.stderr


def _load_in_subprocess(session: PluginSession, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import cffi, errno
        from tests.test_plugin_abi import CDEF
        ffi = cffi.FFI(); ffi.cdef(CDEF)
        lib = ffi.dlopen({str(session.plugin)!r})
        ds = lib.plugin_load(b"{session.key}", b"/")
        ret = ds.num_of_layers(b"{session.key}", b"/")
        print(ret, errno.errorcode.get(ffi.errno))
    """)
    # The 60 s guard only catches a hang: without the worker's report the plugin would
    # wait for CRFS_WORKER_START_TIMEOUT (600 s here).
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **session.env, **env},
                          capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parents[1]))


def test_a_worker_command_that_cannot_run_fails_at_once(plugin_session: PluginSession, tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    result = _load_in_subprocess(plugin_session, {
        "CRFS_RUNTIME_DIR": str(runtime), "CRFS_WORKER_CMD": "/nonexistent/crfs-worker --x",
        "CRFS_WORKER_START_TIMEOUT": "600"})
    assert result.stdout.split() == ["-1", "EIO"]
    assert "cannot start the worker '/nonexistent/crfs-worker --x': No such file or directory" in result.stderr


def test_a_worker_that_cannot_start_says_why(plugin_session: PluginSession, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory another user owns")
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    foreign = tmp_path / "foreign-cache"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)  # a cache another user could have filled
    result = _load_in_subprocess(plugin_session, {
        "CRFS_RUNTIME_DIR": str(runtime), "CRFS_CACHE_DIR": str(foreign), "CRFS_WORKER_START_TIMEOUT": "600"})
    assert result.stdout.split() == ["-1", "EIO"]
    assert "the worker could not start:" in result.stderr
    assert f"{foreign}: owned by uid 65534" in result.stderr
