"""The environment the crfs.so tests run in: a built plugin, a registered test image, a
private runtime directory, and a way to find and stop the worker the plugin starts."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crfs_worker.ipc import WorkerClient
from crfs_worker.layerkeys import KeyStore, LayerRecord
from tests.support.layered_image import LayeredImage, build_layered_image
from tests.support.workers import stop_worker, worker_pid

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "plugin"


def build_plugin(target: str = "crfs.so") -> Path:
    subprocess.run(["make", "-s", "-C", str(PLUGIN_DIR), target], check=True)
    return PLUGIN_DIR / target


@dataclass
class PluginSession:
    plugin: Path
    image: LayeredImage
    runtime: Path
    cache: Path
    key: str
    env: dict[str, str]

    @property
    def socket(self) -> Path:
        return self.runtime / "worker.sock"

    def fresh_key(self, name: str, layers: tuple[int, ...] = (0, 1, 2)) -> str:
        """A key for copies of some layers (lowest first) under new paths: new layer
        numbers, so cold caches and counters of their own."""
        copies = self.runtime.parent / f"{self.runtime.name}-copies" / name
        copies.mkdir(parents=True, exist_ok=False)
        records = []
        for index in layers:
            layer = self.image.layers[index]
            copy = copies / layer.blob.name
            shutil.copyfile(layer.blob, copy)
            records.append(LayerRecord("file", str(copy), toc_digest=layer.toc_digest))
        return KeyStore(self.runtime).register(f"fresh:{copies}", records)

    def drop_cached_data(self) -> None:
        """Empties the chunk store and the content cache, so that the next reads go to the
        blobs (both are shared by every layer: copies under fresh keys hit them too)."""
        for kept in (self.cache / "chunks" / "sha256", self.cache / "content"):
            if kept.is_dir():
                for path in kept.rglob("*"):
                    if path.is_file():
                        path.unlink()

    def client(self) -> WorkerClient:
        return WorkerClient(self.socket).connect()

    def worker_pid(self) -> int | None:
        """The pid in the worker's lock file, if that process is alive."""
        return worker_pid(self.runtime)

    def stop_worker(self, timeout: float = 20.0) -> None:
        stop_worker(self.runtime, timeout)

    def cleanup(self) -> None:
        shutil.rmtree(self.runtime.parent / f"{self.runtime.name}-copies", ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)


def start_plugin_session(workdir: Path) -> PluginSession:
    plugin = build_plugin()
    image = build_layered_image(workdir)
    # Short paths: a Unix socket path must fit in 108 bytes.
    runtime = Path(tempfile.mkdtemp(prefix="crfs-rt-"))
    cache = Path(tempfile.mkdtemp(prefix="crfs-cache-"))
    records = [LayerRecord("file", str(layer.blob), toc_digest=layer.toc_digest) for layer in image.layers]
    key = KeyStore(runtime).register(f"test-image:{workdir}", records)
    env = {
        "CRFS_RUNTIME_DIR": str(runtime),
        "CRFS_CACHE_DIR": str(cache),
        "CRFS_WORKER_CMD": f"{sys.executable} -m crfs_worker.worker --idle-timeout 600",
        # Request counts are asserted: no background fetch (tests/test_prefetch.py tests it).
        "CRFS_BACKGROUND_FETCH": "0",
    }
    return PluginSession(plugin, image, runtime, cache, key, env)
