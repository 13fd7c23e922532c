"""`crfs mount REF DIR` and `crfs umount DIR`: an image's merged tree, read-only, without
any container runtime.

The mount is fuse-overlayfs with one lower, `//crfs/KEY//` (every layer of the image,
uppermost first, through crfs.so), and no upper directory, which makes it read-only.
File data is fetched from the registry when it is first read. It needs a C
fuse-overlayfs (plugin support, 0.7 to 1.x); the worker is started if none runs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import CrfsError
from .layerkeys import lowerdir_for
from .mountprogram import DEFAULT_FUSE_OVERLAYFS, plugin_path, supports_plugins

MOUNT_TIMEOUT = 300.0  # the mount waits for every layer's TOC


class MountError(CrfsError):
    """An image could not be mounted or unmounted."""


@dataclass(frozen=True)
class MountedImage:
    reference: str
    target: Path
    lowerdir: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for raw, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(raw, char)
    return field


def mount_type(target: Path) -> str | None:
    """The file system type mounted at `target` (the topmost), or None."""
    wanted = os.path.realpath(target)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == wanted:
                found = right.split()[0] if right else None
    return found


def mount_image(reference: str, target: Path, *, allow_unverified: bool = False,
                program: str | None = None, extra_options: str = "") -> MountedImage:
    program = program or os.environ.get("CRFS_FUSE_OVERLAYFS") or DEFAULT_FUSE_OVERLAYFS
    if not target.is_dir():
        raise MountError(f"{target}: not a directory")
    if mount_type(target) is not None:
        raise MountError(f"{target}: something is mounted there already")
    if not supports_plugins(program):
        raise MountError(f"{program} cannot load crfs.so (a C fuse-overlayfs 0.7 to 1.x can): mount the "
                         f"image with podman and the crfs layer store instead")
    plugin = plugin_path()
    if plugin is None or not plugin.is_file():
        raise MountError("crfs.so is not installed (build it with `make -C plugin`, or set CRFS_PLUGIN)")
    from . import worker  # the worker stack loads only here

    worker.ensure_worker()
    lowerdir = lowerdir_for(reference, allow_unverified=allow_unverified)
    # fast_ino=1: nodes keyed by readdir's d_ino, unique across crfs layers (see mountprogram.rewrite).
    fast_ino = "" if "fast_ino=" in extra_options else ",fast_ino=1"
    options = f"lowerdir={lowerdir},plugins={plugin}{fast_ino}" + (f",{extra_options}" if extra_options else "")
    try:
        result = subprocess.run([program, "-o", options, str(target)], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MountError(f"{program} did not mount {reference} at {target} within {MOUNT_TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise MountError(f"cannot mount {reference} at {target}: {detail}")
    return MountedImage(reference, target, lowerdir)


def unmount_image(target: Path) -> None:
    kind = mount_type(target)
    if kind is None:
        raise MountError(f"{target}: nothing is mounted there")
    if not kind.startswith("fuse"):
        raise MountError(f"{target}: a {kind} mount, not one of crfs mount's")
    result = subprocess.run(["fusermount3", "-u", str(target)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"cannot unmount {target}: {result.stderr.strip() or 'fusermount3 failed'}")


def run_mount(args: argparse.Namespace) -> int:
    """`crfs mount [--allow-unverified] [-o OPTIONS] REF DIR`"""
    mounted = mount_image(args.ref, Path(args.dir), allow_unverified=args.allow_unverified,
                          extra_options=args.options or "")
    print(f"{mounted.reference} is mounted read-only at {mounted.target}")
    return 0


def run_umount(args: argparse.Namespace) -> int:
    """`crfs umount DIR`"""
    unmount_image(Path(args.dir))
    return 0
