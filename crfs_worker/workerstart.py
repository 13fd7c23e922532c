"""Starting the worker from the CLI (`crfs lowerdir`) the way crfs.so does.

If no worker answers on the socket, the worker command (CRFS_WORKER_CMD, split on blanks,
else this Python running `-m crfs_worker.worker`) is started detached: double fork, a
session of its own, stdio on /dev/null, no other fd but the write end of a report pipe as
fd 3 (CRFS_WORKER_READY_FD=3). The worker writes `ready` or `error: WHY` on it; a failed
exec writes `exec ERRNO`. So a worker that cannot start says why at once, and one that
starts is known to answer before this returns.

A worker that finds RUNTIME/worker.lock held reports `ready` only once the holder answers
(it waits out one that is exiting, then serves itself: worker._take_lock).
"""
from __future__ import annotations

import errno
import os
import select
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .dirs import runtime_dir
from .errors import CrfsError
from .ipc import IpcError, WorkerClient

REPORT_FD = 3
SOCKET_NAME = "worker.sock"  # as worker.socket_path


class WorkerStartError(CrfsError):
    """The worker could not be started, or did not answer in time."""


def worker_command(env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ) if env is None else env
    text = env.get("CRFS_WORKER_CMD", "").strip()
    return text.split() if text else [sys.executable, "-m", "crfs_worker.worker"]


def worker_answers(socket: Path) -> bool:
    try:
        with WorkerClient(socket):
            return True
    except (IpcError, OSError):
        return False


def ensure_worker(runtime: Path | None = None, *, timeout: float = 30.0,
                  command: Sequence[str] | None = None) -> bool:
    """Starts a worker for `runtime` unless one answers. Returns True if it started one;
    WorkerStartError (with the worker's reason) if it could not."""
    runtime = runtime or runtime_dir()
    socket = runtime / SOCKET_NAME
    if worker_answers(socket):
        return False
    env = dict(os.environ)
    env["CRFS_RUNTIME_DIR"] = str(runtime)
    argv = list(command) if command is not None else worker_command(env)
    deadline = time.monotonic() + timeout
    report = _spawn_detached(argv, env)
    try:
        line = _read_report(report, deadline)
    finally:
        os.close(report)
    _check_report(line, argv)
    while not worker_answers(socket):
        if time.monotonic() > deadline:
            raise WorkerStartError(f"no crfs worker answered at {socket} within {timeout:g} s "
                                   f"(started {' '.join(argv)})")
        time.sleep(0.05)
    return True


def _executable(argv: Sequence[str], env: dict[str, str]) -> str:
    found = shutil.which(argv[0], path=env.get("PATH", os.defpath)) if "/" not in argv[0] else argv[0]
    if found is None:
        raise WorkerStartError(f"cannot start the worker '{' '.join(argv)}': {argv[0]} is not in PATH")
    return found


def _spawn_detached(argv: Sequence[str], env: dict[str, str]) -> int:
    """Forks twice and execs `argv`; returns the read end of the report pipe."""
    if not argv:
        raise WorkerStartError("the worker command is empty (CRFS_WORKER_CMD)")
    path = _executable(argv, env)
    env = {**env, "CRFS_WORKER_READY_FD": str(REPORT_FD)}
    read_end, write_end = os.pipe()  # both close-on-exec
    # Everything the child needs is computed before fork: it only makes system calls.
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child execs or exits)
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.dup2(write_end, REPORT_FD)  # inheritable: the worker keeps it
            os.closerange(REPORT_FD + 1, os.sysconf("SC_OPEN_MAX"))
            os.execve(path, list(argv), env)
        except OSError as exc:
            os.write(REPORT_FD, b"exec %d\n" % (exc.errno or errno.ENOEXEC))
        finally:
            os._exit(127)
    os.close(write_end)
    os.waitpid(pid, 0)
    return read_end


def _read_report(fd: int, deadline: float) -> str:
    """The first line the worker reports ("" if it closed the pipe without one)."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        piece = os.read(fd, 512)
        if not piece:
            break
        data += piece
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _check_report(line: str, argv: Sequence[str]) -> None:
    if line.startswith("exec "):
        code = int(line[5:]) if line[5:].isdigit() else errno.ENOEXEC
        raise WorkerStartError(f"cannot start the worker '{' '.join(argv)}': {os.strerror(code)}")
    if line.startswith("error: "):
        raise WorkerStartError(f"the worker could not start: {line[7:]}")
