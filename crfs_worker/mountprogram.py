"""podman's mount_program, wrapped: store layers read through crfs.so instead of FUSE twice.

containers/storage runs `MOUNT_PROGRAM -o lowerdir=A:B,upperdir=U,workdir=W[,...] MERGED`.
A lower that resolves into the crfs layer store (`.../BASE64REF/DIGEST/diff`, through
podman's `overlay/l/LINK` and `overlay/ID/diff` symlinks) is replaced by `//crfs/KEY//`,
KEY read from the layer's `crfs.key` file, and `plugins=CRFS.SO` is added: file data
then comes from local cache files through crfs.so, not through a second FUSE hop. Then
the real fuse-overlayfs is exec'd (it daemonizes; containers/storage waits for EOF on
its stderr).

Nothing is rewritten, and everything still works through the store alone, when the real
program has no plugin support (fuse-overlayfs 2.x, the Rust rewrite, skips plugin
lowers), when crfs.so is missing, or when a layer's KEY cannot be read.

    mount_program = "/usr/local/libexec/crfs/fuse-overlayfs"   # python -m crfs_worker.mountprogram

Environment: CRFS_FUSE_OVERLAYFS (the real program, default /usr/bin/fuse-overlayfs),
CRFS_PLUGIN (crfs.so, default: the one installed with crfs), CRFS_MOUNT_PROGRAM_LOG (a
file that gets one line per mount: what was rewritten).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DEFAULT_FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
KEY_FILE = "crfs.key"  # as layerstore.KEY_FILE (not imported: this program starts on every mount)
_STORE_DIFF = re.compile(r"/sha256:[0-9a-f]{64}/diff$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_VERSION = re.compile(r"version\s+(\d+)\.(\d+)")


def plugin_path() -> Path | None:
    """crfs.so: $CRFS_PLUGIN, else the copy installed in the package, else the repository's."""
    explicit = os.environ.get("CRFS_PLUGIN")
    if explicit:
        return Path(explicit)
    here = Path(__file__).resolve().parent
    for candidate in (here / "crfs.so", here.parent / "plugin" / "crfs.so"):
        if candidate.is_file():
            return candidate
    return None


def supports_plugins(program: str) -> bool:
    """C fuse-overlayfs (0.7 to 1.x) loads data-source plugins; 2.x parses `//` lowers
    but does not implement them."""
    try:
        result = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    match = _VERSION.search(result.stdout + result.stderr)
    return match is not None and (0, 7) <= (int(match.group(1)), int(match.group(2))) < (2, 0)


def split_options(text: str) -> list[str]:
    """Splits a -o value on commas outside double quotes (SELinux `context="a,b"`)."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


@dataclass
class Invocation:
    """A mount program's command line: `-o` options and everything else, in order."""

    options: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)   # flags and the mount point

    @classmethod
    def parse(cls, argv: Sequence[str]) -> "Invocation":
        inv = cls()
        args = iter(argv)
        for arg in args:
            if arg == "-o":
                inv.options += split_options(next(args, ""))
            elif arg.startswith("-o") and len(arg) > 2:
                inv.options += split_options(arg[2:])
            else:
                inv.others.append(arg)
        return inv

    def argv(self) -> list[str]:
        return ["-o", ",".join(self.options), *self.others] if self.options else list(self.others)

    def option(self, name: str) -> str | None:
        prefix = name + "="
        return next((o[len(prefix):] for o in reversed(self.options) if o.startswith(prefix)), None)

    def set_option(self, name: str, value: str) -> None:
        prefix = name + "="
        self.options = [o for o in self.options if not o.startswith(prefix)] + [prefix + value]


def store_key(lower: str) -> str | None:
    """KEY of a lower that is a crfs store layer's `diff`, else None."""
    real = os.path.realpath(lower)
    if not _STORE_DIFF.search(real):
        return None
    try:
        key = Path(real).parent.joinpath(KEY_FILE).read_text().strip()
    except OSError:
        return None
    return key if _KEY.match(key) else None


@dataclass(frozen=True)
class Rewrite:
    argv: list[str]
    replaced: int     # lowers now served by crfs.so
    reason: str       # why nothing was rewritten, if so


def rewrite(argv: Sequence[str], program: str, plugin: Path | None) -> Rewrite:
    inv = Invocation.parse(argv)
    lowerdir = inv.option("lowerdir")
    if not lowerdir:
        return Rewrite(list(argv), 0, "no lowerdir")
    lowers = lowerdir.split(":")
    keys = [store_key(lower) for lower in lowers]
    if not any(keys):
        return Rewrite(list(argv), 0, "no crfs store layer")
    if plugin is None or not plugin.is_file():
        return Rewrite(list(argv), 0, "crfs.so not found")
    if not supports_plugins(program):
        return Rewrite(list(argv), 0, f"{program} has no plugin support")
    inv.set_option("lowerdir", ":".join(f"//crfs/{key}//" if key else lower for lower, key in zip(lowers, keys)))
    plugins = inv.option("plugins")
    inv.set_option("plugins", f"{plugins}:{plugin}" if plugins else str(plugin))
    # fast_ino=1 (unless the caller chose): fuse-overlayfs then keys its nodes by (d_ino, 0)
    # from readdir in every layer instead of opening each entry to read origin xattrs.
    # crfs inode numbers are LAYER << 40 | INO with a layer number >= 1 never reused
    # (layerkeys.compose_ino), store trees add bit 63, and the upper dir and podman's plain
    # lowers (one local filesystem) stay below 2**40: no two layers share a key. The cost:
    # a copied-up file's inode number no longer follows its lower's across remounts (the
    # origin xattr is not read), as with fast_ino on any lowers. See PERFORMANCE-NOTES.md.
    if inv.option("fast_ino") is None:
        inv.set_option("fast_ino", "1")
    return Rewrite(inv.argv(), sum(1 for key in keys if key), "")


def _log(text: str) -> None:
    path = os.environ.get("CRFS_MOUNT_PROGRAM_LOG")
    if not path:
        return
    try:
        with open(path, "a") as out:
            out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {os.getpid()} {text}\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    program = os.environ.get("CRFS_FUSE_OVERLAYFS") or DEFAULT_FUSE_OVERLAYFS
    result = rewrite(argv, program, plugin_path())
    _log(f"{result.replaced} lower(s) via crfs.so{': ' + result.reason if result.reason else ''}: "
         f"{program} {' '.join(result.argv)}")
    try:
        os.execv(program, [program, *result.argv])
    except OSError as exc:
        print(f"crfs mount program: cannot run {program}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
