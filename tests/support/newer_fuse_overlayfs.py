"""A newer C fuse-overlayfs than Debian 12's 1.10, for plugin ABI tests: Debian 13's.

fuse-overlayfs 1.11 and later call the data source's 14th entry, `support_acls`, which
1.10 never reads. Debian 13 (trixie) ships 1.14, built against its glibc 2.41 and libfuse
3.17; those three packages are fetched from Debian's mirror (checked against the sha256
its package index gives), unpacked under CACHE, and run through trixie's own dynamic
loader with trixie's libraries first and bookworm's after (for crfs.so's libmsgpackc).
"""
from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
from pathlib import Path

import httpx

MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
PACKAGES = ("fuse-overlayfs", "libfuse3-4", "libc6")
CACHE = Path("/var/cache/crfs-tests/fuse-overlayfs-trixie")
MULTIARCH = "x86_64-linux-gnu"


def _package_index(client: httpx.Client) -> dict[str, dict[str, str]]:
    response = client.get(f"{MIRROR}/dists/{SUITE}/main/binary-amd64/Packages.xz")
    response.raise_for_status()
    wanted: dict[str, dict[str, str]] = {}
    for stanza in lzma.decompress(response.content).decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") in PACKAGES:
            wanted[fields["Package"]] = fields
    missing = set(PACKAGES) - set(wanted)
    if missing:
        raise RuntimeError(f"{SUITE} has no {', '.join(sorted(missing))}")
    return wanted


def _unpack(client: httpx.Client, fields: dict[str, str], root: Path) -> None:
    response = client.get(f"{MIRROR}/{fields['Filename']}")
    response.raise_for_status()
    if hashlib.sha256(response.content).hexdigest() != fields["SHA256"]:
        raise RuntimeError(f"{fields['Filename']}: sha256 differs from the package index")
    deb = root.parent / Path(fields["Filename"]).name
    deb.write_bytes(response.content)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    deb.unlink()


DEBIAN_12 = Path("/usr/bin/fuse-overlayfs")  # 1.10, installed


def suite_fuse_overlayfs() -> Path:
    """The fuse-overlayfs the real-mount tests run: $CRFS_TEST_FUSE_OVERLAYFS (how
    tests/test_fuse_overlayfs_versions.py runs a module again on another build), else
    Debian 12's."""
    return Path(os.environ.get("CRFS_TEST_FUSE_OVERLAYFS") or DEBIAN_12)


def fuse_overlayfs_build(name: str) -> Path:
    """A build by name, for tests parametrized over them: "1.10" (Debian 12's) or "1.14"
    (Debian 13's, fetched once)."""
    builds = {"1.10": lambda: DEBIAN_12, "1.14": fuse_overlayfs_1_14}
    if name not in builds:
        raise ValueError(f"no fuse-overlayfs build {name!r}: one of {', '.join(builds)}")
    return builds[name]()


def fuse_overlayfs_1_14() -> Path:
    """A runnable `fuse-overlayfs` command (a script) for Debian 13's fuse-overlayfs."""
    wrapper = CACHE / "fuse-overlayfs"
    if wrapper.exists():
        return wrapper
    root = CACHE / "root"
    CACHE.mkdir(parents=True, exist_ok=True)
    with httpx.Client(timeout=120, trust_env=False) as client:
        for fields in _package_index(client).values():
            _unpack(client, fields, root)
    libs = root / "usr" / "lib" / MULTIARCH
    script = (f"#!/bin/sh\nexec {libs}/ld-linux-x86-64.so.2 --library-path {libs}:/usr/lib/{MULTIARCH} "
              f"{root}/usr/bin/fuse-overlayfs \"$@\"\n")
    tmp = wrapper.with_suffix(".tmp")
    tmp.write_text(script)
    os.chmod(tmp, 0o755)
    tmp.rename(wrapper)
    return wrapper


def version(program: Path) -> str:
    result = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=30)
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("fuse-overlayfs: version"):
            return line.split()[-1]
    raise RuntimeError(f"{program} --version said: {result.stdout}{result.stderr}")
