"""crfs.so with a newer C fuse-overlayfs: Debian 13's 1.14 reads the 14th table entry,
`support_acls`, which Debian 12's 1.10 never calls. The whole real-mount suite
(tests/test_overlay_mount.py) runs again against it, in a child pytest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.newer_fuse_overlayfs import fuse_overlayfs_1_14, version

REPO = Path(__file__).resolve().parent.parent


def test_the_mount_suite_passes_on_fuse_overlayfs_from_debian_13() -> None:
    program = fuse_overlayfs_1_14()
    major, minor = (int(x) for x in version(program).split("-")[0].split(".")[:2])
    assert (major, minor) >= (1, 11), "not a fuse-overlayfs that calls support_acls"
    env = {**os.environ, "CRFS_TEST_FUSE_OVERLAYFS": str(program)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_overlay_mount.py"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary
