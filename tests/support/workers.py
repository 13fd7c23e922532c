"""Finding and stopping the crfs worker of a runtime directory, for test clean-ups.

    pid = worker_pid(runtime)         # the pid in RUNTIME/worker.lock, if that process lives
    stop_worker(runtime)              # SIGTERM, wait, SIGKILL; then unmount a stale view
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from crfs_worker.imagemount import mount_type


def worker_pid(runtime: Path) -> int | None:
    """The pid the worker wrote into its lock file, if that process is alive."""
    try:
        text = (runtime / "worker.lock").read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or not Path(f"/proc/{text}").exists():
        return None
    return int(text)


def stop_process(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def stop_worker(runtime: Path, timeout: float = 30.0) -> None:
    """Stops RUNTIME's worker; a view left mounted (a killed worker's) is detached, so the
    directory can be removed."""
    pid = worker_pid(runtime)
    if pid is not None:
        stop_process(pid, timeout)
    view = runtime / "view"
    # mountinfo, not os.path.ismount: a killed worker's view fails every stat (ENOTCONN).
    if mount_type(view) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(view)], check=False, capture_output=True)
