"""docker-registry processes for the benchmarks: on loopback, or inside our own network
namespace (bench/netlink.py), over one storage directory; their access logs count what
clients fetched."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REGISTRY_BINARY = "docker-registry"
ACCESS_LINE = re.compile(r'"(GET|HEAD) (/v2/[^ ]+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')
NETNS_PORT = 5000   # the namespace is ours alone: any port is free there


def free_loopback_port() -> int:
    # Racy in theory; start() reports a registry that did not come up.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Fetched:
    """Registry traffic in a window of the access log."""

    blob_bytes: int
    blob_requests: int
    requests: int       # every GET/HEAD: manifests, configs, blobs


@dataclass
class BenchRegistry:
    """One `docker-registry serve` process; `prefix` runs it elsewhere (`ip netns exec NS`)."""

    workdir: Path
    storage: Path
    host: str
    port: int
    prefix: list[str] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, workdir: Path, storage: Path, host: str = "127.0.0.1", port: int | None = None,
              prefix: list[str] | None = None) -> "BenchRegistry":
        if shutil.which(REGISTRY_BINARY) is None:
            raise RuntimeError(f"{REGISTRY_BINARY} is not installed (Debian package docker-registry)")
        registry = cls(workdir, storage, host, port or free_loopback_port(), list(prefix or []))
        registry._launch()
        return registry

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "registry.log"

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "cache": {"blobdescriptor": "inmemory"},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.netloc, "secret": "crfs-bench-secret"},
        }
        config_path = self.workdir / "config.yml"
        config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([*self.prefix, REGISTRY_BINARY, "serve", str(config_path)],
                                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2.0, trust_env=False) as probe:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"docker-registry on {self.netloc} exited: {self.log_tail()}")
                try:
                    probe.get(f"http://{self.netloc}/v2/")
                    return
                except httpx.TransportError:
                    time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.netloc}: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def mark(self) -> int:
        return self.log.stat().st_size

    def fetched_since(self, mark: int) -> Fetched:
        blob_bytes = blob_requests = requests = 0
        with self.log.open("rb") as f:
            f.seek(mark)
            for line in f.read().decode(errors="replace").splitlines():
                m = ACCESS_LINE.search(line)
                if not m:
                    continue
                requests += 1
                if m.group(1) == "GET" and "/blobs/" in m.group(2) and m.group(4) != "-":
                    blob_bytes += int(m.group(4))
                    blob_requests += 1
        return Fetched(blob_bytes, blob_requests, requests)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> "BenchRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
