"""Rootless podman's namespaces: where the worker must mount the layer store.

Rootless podman keeps a user namespace and a mount namespace of its own, held open by a
pause process; every podman command joins them. A FUSE mount made outside them is
invisible to podman, so a worker serving podman's layer store joins them first, as
`podman unshare` would, but without a podman process staying around as its parent:

    PID = $XDG_RUNTIME_DIR/libpod/tmp/pause.pid   (started with `podman unshare true`)
    setns(/proc/PID/ns/user); setns(/proc/PID/ns/mnt)

Inside, the user is uid 0 of the namespace (the files it owns show as root's), and the
mounts it makes are podman's. fds passed over the worker's Unix socket work everywhere,
so crfs.so in a fuse-overlayfs outside podman still gets its fds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import CrfsError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
NAMESPACES = (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS))  # user first: it grants the right to join mnt


class NamespaceError(CrfsError):
    """podman's namespaces could not be found or joined."""


def pause_pid_file(env: Mapping[str, str] | None = None) -> Path:
    """Where podman 4.x keeps its pause process id (libpod's rootless tmp dir)."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR") or f"/tmp/podman-run-{os.getuid()}"
    return Path(runtime) / "libpod" / "tmp" / "pause.pid"


def _alive_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    # /proc/PID itself: its ns/ entries may be closed to us (another user namespace).
    if not text.isdigit() or not os.path.isdir(f"/proc/{text}"):
        return None
    return int(text)


def _namespace_id(pid: int | str, name: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{name}").st_ino


def inside(pid: int) -> bool:
    """Whether this process already lives in `pid`'s user and mount namespaces."""
    return all(_namespace_id("self", name) == _namespace_id(pid, name) for name, _ in NAMESPACES)


def _setns(fd: int, kind: int, what: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, kind) != 0:
        code = ctypes.get_errno()
        raise NamespaceError(f"cannot join podman's {what} namespace: {os.strerror(code)}")


def join(pid: int) -> None:
    """Moves this (single-threaded) process into `pid`'s user and mount namespaces."""
    if threading.active_count() != 1:
        raise NamespaceError("cannot join podman's namespaces: the process already runs threads")
    fds = []
    try:
        for name, _ in NAMESPACES:
            fds.append(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
        for fd, (name, kind) in zip(fds, NAMESPACES):
            _setns(fd, kind, name)
    except OSError as exc:
        raise NamespaceError(f"cannot open podman's namespaces (pause process {pid}): {exc.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class PodmanNamespace:
    pid: int
    joined: bool      # False: we were inside already
    pid_file: Path    # where podman names its pause process

    def moved(self) -> bool:
        """Whether podman now keeps another namespace (its pause process was restarted,
        e.g. by `podman system migrate`): our mounts are then invisible to it."""
        pid = _alive_pid(self.pid_file)
        if pid is None:
            return False  # none yet: the next podman command starts one
        try:
            return not inside(pid)
        except OSError:
            return True  # a namespace we cannot even look into is not ours


def enter_podman_namespace(podman: str = "podman") -> PodmanNamespace:
    """Joins rootless podman's namespaces, starting its pause process if none runs."""
    pid_file = pause_pid_file()
    pid = _alive_pid(pid_file)
    if pid is None:
        binary = shutil.which(podman)
        if binary is None:
            raise NamespaceError(f"{podman} is not installed: no podman namespace to join")
        result = subprocess.run([binary, "unshare", "true"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
        pid = _alive_pid(pid_file)
        if result.returncode != 0 or pid is None:
            raise NamespaceError(f"`podman unshare true` did not leave a pause process in {pid_file}: "
                                 f"{result.stderr.strip() or 'no error printed'}")
    if inside(pid):
        return PodmanNamespace(pid, False, pid_file)
    join(pid)
    return PodmanNamespace(pid, True, pid_file)


def wants_podman_namespace() -> bool:
    """A rootless user with podman installed: their podman mounts in its own namespace."""
    return os.getuid() != 0 and shutil.which("podman") is not None
