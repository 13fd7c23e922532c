"""A big file whose chunks are all local when a reader reaches its end gets a local copy
in the content cache (lowerlayer.LowerLayerService._copy_when_local), and later opens
through crfs.so get an fd on that copy: warm reads at local-file speed, with no FUSE hop
through the worker and no O_DIRECT view fd. The copy is named by the file's digest only
after its bytes hashed to it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import pytest

from tests.test_prefetch import BIG, FUSE_OVERLAYFS, Crfs, PrefetchImage, crfs, image  # noqa: F401

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")


def _fuse_overlayfs_fds(merged: Path) -> list[str]:
    """Where the fds of the fuse-overlayfs process serving `merged` point."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if os.fsencode(str(merged)) not in cmdline or b"fuse-overlayfs" not in cmdline[0]:
                continue
            return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except (FileNotFoundError, ProcessLookupError):
            continue
    raise AssertionError(f"no fuse-overlayfs process serves {merged}")


def test_a_big_file_read_to_its_end_is_served_from_a_local_copy(image: PrefetchImage,
                                                                crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    copy = worker.cache / "content" / f"sha256-{hashlib.sha256(BIG).hexdigest()}"
    first = worker.mount(name="first")
    assert (first / "data/big.bin").read_bytes() == BIG
    worker.wait_for(copy.exists, "the local copy of big.bin")
    # `crfs stats` tells when no copy is being written (what bench/b2 waits for).
    worker.wait_for(lambda: sum(row["copying"] for row in worker.stats()) == 0, "the copy to be reported done")
    assert copy.read_bytes() == BIG
    assert copy.stat().st_mode & 0o777 == 0o600

    second = worker.mount(name="second")
    with open(second / "data/big.bin", "rb") as reader:
        assert reader.read() == BIG
        assert str(copy) in _fuse_overlayfs_fds(second)  # the lower fd is the local copy


def test_a_big_file_read_only_in_part_gets_no_copy(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    copy = worker.cache / "content" / f"sha256-{hashlib.sha256(BIG).hexdigest()}"
    merged = worker.mount()
    with open(merged / "data/big.bin", "rb") as reader:
        reader.seek(len(BIG) - 4096)
        assert reader.read() == BIG[-4096:]  # the end, but not the chunks before it
    # A second reader of the whole file makes every chunk local: only then a copy.
    with open(worker.mount(name="again") / "data/big.bin", "rb") as reader:
        fds = _fuse_overlayfs_fds(worker.workdir / "again" / "merged")
        assert str(copy) not in fds
        assert reader.read() == BIG
    worker.wait_for(copy.exists, "the local copy of big.bin")


def test_a_file_not_read_through_crfs_so_gets_no_copy(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    """Only crfs.so's opens can use a copy: a whole read through the worker's tree itself
    (what the layer store's readers do) starts none. A copy is registered before the read
    that triggers it returns, so this needs no waiting."""
    worker = crfs("--no-background-fetch")
    copy = worker.cache / "content" / f"sha256-{hashlib.sha256(BIG).hexdigest()}"
    worker.mount()  # loads the layers into the worker's view
    view = worker.runtime / "view"
    num = next(n for n in os.listdir(view) if (view / n / "data/big.bin").exists())
    assert (view / num / "data/big.bin").read_bytes() == BIG
    assert sum(row["copying"] for row in worker.stats()) == 0
    assert not copy.exists()
