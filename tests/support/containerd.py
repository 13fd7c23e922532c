"""A private containerd for ctr-remote, so tests never touch the host's daemon.

    with PrivateContainerd.start(tmp_path) as ctd:
        ctd.ctr("image", "pull", "--plain-http", "127.0.0.1:5000/app:v1")
        ctd.ctr("image", "convert", "--estargz", "--oci", SRC, DST)

Root, state and socket live under the given directory; CRI, the runtimes and
the other snapshotters are disabled so it starts in well under a second.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERD = "containerd"
CTR_REMOTE = "ctr-remote"
_START_TIMEOUT_S = 30.0

# Plugins a pull/convert/push does not need; disabling them keeps startup
# fast and avoids host dependencies (cgroups, btrfs, devmapper, CNI).
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.grpc.v1.tasks",
)


def _config(root: Path, state: Path, socket: Path) -> str:
    disabled = ", ".join(f'"{name}"' for name in _DISABLED_PLUGINS)
    return (
        "version = 2\n"
        f'root = "{root}"\n'
        f'state = "{state}"\n'
        f"disabled_plugins = [{disabled}]\n"
        "[grpc]\n"
        f'  address = "{socket}"\n'
        "[ttrpc]\n"
        f'  address = "{socket}.ttrpc"\n'
        "[debug]\n"
        '  address = ""\n'
        '  level = "warn"\n'
        "[metrics]\n"
        '  address = ""\n'
    )


@dataclass
class PrivateContainerd:
    """A running containerd; `ctr(...)` runs ctr-remote against it."""

    base: Path
    process: subprocess.Popen[bytes]
    socket: Path
    log: Path
    namespace: str = "crfs-test"
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, base: Path) -> "PrivateContainerd":
        if shutil.which(CONTAINERD) is None or shutil.which(CTR_REMOTE) is None:
            raise RuntimeError("containerd and ctr-remote must be installed")
        base.mkdir(parents=True, exist_ok=True)
        root, state = base / "root", base / "state"
        socket = base / "containerd.sock"
        config = base / "config.toml"
        config.write_text(_config(root, state, socket))
        log = base / "containerd.log"
        with open(log, "wb") as log_file:
            process = subprocess.Popen([CONTAINERD, "--config", str(config)],
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        ctd = cls(base=base, process=process, socket=socket, log=log)
        try:
            ctd._wait_ready()
        except BaseException:
            ctd.stop()
            raise
        return ctd

    def ctr(self, *args: str, timeout: float = 300.0) -> str:
        """Runs `ctr-remote --address SOCK --namespace NS ARGS...`; returns stdout."""
        cmd = [CTR_REMOTE, "--address", str(self.socket), "--namespace", self.namespace, *args]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n"
                f"{done.stderr.decode(errors='replace')}\n--- containerd log:\n{self.log_tail()}")
        return done.stdout.decode(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Pulls unpack into overlay snapshots; nothing stays mounted without
        # running containers, but unmount defensively before the dir goes away.
        subprocess.run(["umount", "-R", str(self.base / "root")], capture_output=True,
                       check=False)

    def __enter__(self) -> "PrivateContainerd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        # Readiness is polled (`ctr version` answers once the socket serves);
        # the deadline only bounds a daemon that never comes up.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.process.returncode}):\n"
                                   f"{self.log_tail()}")
            if self.socket.exists():
                probe = subprocess.run(
                    [CTR_REMOTE, "--address", str(self.socket), "version"],
                    capture_output=True, timeout=10, check=False)
                if probe.returncode == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not start within {_START_TIMEOUT_S}s:\n"
                           f"{self.log_tail()}")
