"""Prefetch at mount, background fetch, the chunk store and worker start, end to end: a real
docker-registry behind a relay that records every request, real fuse-overlayfs mounts with
crfs.so, and the worker crfs.so starts (each test gets its own worker, runtime and cache).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from crfs_worker.blob import LocalBlob
from crfs_worker.estargz_writer import EstargzOptions, convert_file
from crfs_worker.ipc import WorkerClient
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.layerkeys import lowerdir_for
from crfs_worker.reference import ImageReference
from crfs_worker.worker import format_stats
from tests.support.newer_fuse_overlayfs import suite_fuse_overlayfs
from tests.support.plugin_env import build_plugin
from tests.support.registry import FaultRelay, RelayRecord, RunningRegistry, push_image, start_plain_registry
from tests.support.workers import stop_worker, worker_pid

FUSE_OVERLAYFS = str(suite_fuse_overlayfs())  # the default build; a test may ask for each (EACH_FUSE_OVERLAYFS)
DEADLINE = 120.0  # generous bound on waits for the worker; never an asserted duration
CHUNK = 64 << 10
RANGE_LIMIT = 16 << 20

pytestmark = pytest.mark.skipif(not Path(FUSE_OVERLAYFS).exists(), reason="fuse-overlayfs is not installed")
# Reads that fail part-way reach crfs.so differently per fuse-overlayfs version (1.14 calls
# entries 1.10 never does): such tests run on both (the `fuse_overlayfs` fixture, conftest.py).
EACH_FUSE_OVERLAYFS = pytest.mark.parametrize("fuse_overlayfs", ["1.10", "1.14"], indirect=True)

_rng = random.Random(2024)
BIG = _rng.randbytes(18 << 20)   # more than one background range
APP = _rng.randbytes(300 << 10)  # small (content cache) but several chunks
DUP = _rng.randbytes(1 << 20)
BASE_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "bin/app": APP,
    "data/big.bin": BIG,
    "data/dup1.bin": DUP,
    "data/dup2.bin": DUP,  # the same chunks as dup1.bin
    "data/zeros.bin": bytes(200 << 10),
    **{f"data/many/f{i:02d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(40)},
}
PRIORITIZED = ("bin/app", "data/many/f01.txt")
TOP_FILES = {"etc/passwd": b"root:x:0:0:top:/root:/bin/sh\n", "etc/motd": b"hello from the top layer\n"}
EXPECTED = {**BASE_FILES, **TOP_FILES}


# ------------------------------------------------------------------ the image


@dataclass(frozen=True)
class PushedLayer:
    blob: Path
    digest: str
    toc_digest: str
    landmark: int | None  # where the prioritised range ends
    toc_offset: int       # where the file data ends


@dataclass
class PrefetchImage:
    registry: RunningRegistry
    relay: FaultRelay
    layers: tuple[PushedLayer, ...]  # base first
    refs: dict[str, ImageReference]  # by repository: the same blobs under several names

    def blob_gets(self, layer: PushedLayer, since: int = 0) -> list[RelayRecord]:
        return [r for r in self.relay.records()[since:]
                if r.method == "GET" and r.path.endswith(layer.digest) and r.range_header]


def _tar(files: dict[str, bytes], path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


def _build_layer(workdir: Path, name: str, files: dict[str, bytes], prioritized: tuple[str, ...]) -> PushedLayer:
    tar, blob = workdir / f"{name}.tar", workdir / f"{name}.esgz"
    _tar(files, tar)
    result = convert_file(tar, blob, EstargzOptions(chunk_size=CHUNK, prioritized_files=prioritized))
    with LocalBlob(blob) as local, Layer.open(LayerSource(local, result.toc_digest), workdir / "index") as layer:
        found = layer.prefetch_range()
        toc_offset = layer.footer.toc_offset
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    return PushedLayer(blob, digest, result.toc_digest, None if found is None else found[1], toc_offset)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefetchImage]:
    workdir = tmp_path_factory.mktemp("prefetch-image")
    registry = start_plain_registry(workdir / "registry")
    relay = FaultRelay(registry.host).start()
    try:
        layers = (_build_layer(workdir, "base", BASE_FILES, PRIORITIZED), _build_layer(workdir, "top", TOP_FILES, ()))
        refs = {}
        with registry.client() as client:
            for repo in ("prefetch/image", "prefetch/copy"):
                ref = ImageReference.parse(f"{relay.netloc}/{repo}:v1")
                push_image(client, ref, [layer.blob.read_bytes() for layer in layers],
                           layer_annotations=[{"containerd.io/snapshot/stargz/toc.digest": layer.toc_digest}
                                              for layer in layers])
                refs[repo] = ref
        yield PrefetchImage(registry, relay, layers, refs)
    finally:
        relay.stop()
        registry.stop()


# ------------------------------------------------------------------ a worker and its mounts


@dataclass
class Crfs:
    """A private runtime and cache; the worker crfs.so starts there; mounts of images."""

    image: PrefetchImage
    plugin: Path
    env: dict[str, str]
    runtime: Path
    cache: Path
    workdir: Path
    program: Path  # the fuse-overlayfs build mounts run
    mounted: list[Path] = field(default_factory=list)

    def key(self, repo: str = "prefetch/image") -> str:
        with self.image.registry.client() as client:
            return lowerdir_for(str(self.image.refs[repo]), runtime=self.runtime, client=client)

    def mount(self, repo: str = "prefetch/image", name: str = "m") -> Path:
        return self.mount_key(self.key(repo), name)

    def mount_key(self, key: str, name: str) -> Path:
        """Mounts a registered lowerdir key (no registry lookup)."""
        base = self.workdir / name
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        opts = f"plugins={self.plugin},lowerdir={key},upperdir={upper},workdir={work}"
        result = subprocess.run([str(self.program), "-o", opts, str(merged)], capture_output=True, text=True,
                                timeout=DEADLINE, env=self.env)
        assert result.returncode == 0, result.stderr
        self.mounted.append(merged)
        return merged

    def stats(self) -> list[dict[str, Any]]:
        with WorkerClient(self.runtime / "worker.sock") as client:
            return list(client.call("stats").fields["layers"])

    def row(self, layer: PushedLayer, repo: str = "prefetch/image") -> dict[str, Any]:
        name = f"{self.image.refs[repo].name}@{layer.digest}"
        return next(row for row in self.stats() if row["name"] == name)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}: {self.stats()}"
            time.sleep(0.1)

    def worker_pid(self) -> int | None:
        return worker_pid(self.runtime)

    def stop(self) -> None:
        for merged in self.mounted:
            if subprocess.run(["fusermount3", "-u", str(merged)], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(merged)], capture_output=True)
        stop_worker(self.runtime, timeout=20)
        shutil.rmtree(self.runtime, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)


@pytest.fixture
def crfs(image: PrefetchImage, fuse_overlayfs: Path, tmp_path: Path) -> Iterator[Callable[..., Crfs]]:
    plugin = build_plugin()
    made: list[Crfs] = []

    def make(worker_args: str = "", **env: str) -> Crfs:
        # Short paths: a Unix socket path must fit in 108 bytes.
        runtime = Path(tempfile.mkdtemp(prefix="crfs-rt-"))
        cache = Path(tempfile.mkdtemp(prefix="crfs-cache-"))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRFS_")}
        full_env.update({"CRFS_RUNTIME_DIR": str(runtime), "CRFS_CACHE_DIR": str(cache),
                         "CRFS_WORKER_CMD": f"{sys.executable} -m crfs_worker.worker --idle-timeout 600 {worker_args}",
                         **env})
        made.append(Crfs(image, plugin, full_env, runtime, cache, tmp_path / f"w{len(made)}", fuse_overlayfs))
        return made[-1]

    yield make
    for one in made:
        one.stop()


def merged_files(root: Path) -> dict[str, bytes]:
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def _range(record: RelayRecord) -> tuple[int, int]:
    """[start, end) of a `bytes=A-B` Range header."""
    assert record.range_header is not None
    first, last = record.range_header.removeprefix("bytes=").split("-")
    return int(first), int(last) + 1


# ------------------------------------------------------------------ tests


def test_mount_prefetches_the_prioritised_files_in_one_request(image: PrefetchImage,
                                                               crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    base = image.layers[0]
    assert base.landmark is not None
    before = len(image.relay.records())
    merged = worker.mount()
    # The prefetch runs beside the mount: wait for it (bounded), then count its requests.
    worker.wait_for(lambda: all(row["prefetch"]["state"] != "running" for row in worker.stats()),
                    "the prefetches")
    # The base layer: footer and TOC (at the blob's end), then the prioritised range.
    prefetches = [r for r in image.blob_gets(base, before) if _range(r)[0] == 0]
    assert [r.range_header for r in prefetches] == [f"bytes=0-{base.landmark - 1}"]
    row = worker.row(base)
    assert row["prefetch"]["state"] == "done"
    assert row["prefetch"]["bytes"] == len(APP) + len(BASE_FILES["data/many/f01.txt"])
    assert row["background"]["state"] == "off"
    assert worker.row(image.layers[1])["prefetch"]["state"] == "none"  # no landmark in the top layer
    # Prioritised files are read without the network...
    mark = len(image.relay.records())
    assert (merged / "bin/app").read_bytes() == APP
    assert (merged / "data/many/f01.txt").read_bytes() == BASE_FILES["data/many/f01.txt"]
    assert image.relay.records()[mark:] == []
    # ...the others are fetched when read.
    assert (merged / "data/many/f30.txt").read_bytes() == BASE_FILES["data/many/f30.txt"]
    assert len(image.blob_gets(base, mark)) == 1
    assert worker.row(base)["failures"] == 0


def test_background_fetch_makes_the_image_local(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    worker = crfs()  # background fetch is on by default
    base = image.layers[0]
    before = len(image.relay.records())
    merged = worker.mount()
    worker.wait_for(lambda: all(row["background"]["state"] == "complete" for row in worker.stats()),
                    "background fetch")
    for row in worker.stats():
        assert row["background"]["done"] == row["background"]["total"] > 0
        assert row["cached"] >= row["background"]["total"]
        assert row["failures"] == 0
    assert all(line.split()[5] == "complete" for line in format_stats(worker.stats()).splitlines()[1:])
    # Large coalesced ranges (the files after the landmark, but for the footer and TOC),
    # none above the limit, no blob byte fetched twice.
    assert base.landmark is not None
    background = sorted(_range(r) for r in image.blob_gets(base, before)
                        if base.landmark <= _range(r)[0] and _range(r)[1] <= base.toc_offset)
    assert 2 <= len(background) <= 4  # about 20 MiB of chunks
    assert all(b - a <= RANGE_LIMIT for a, b in background)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(background, background[1:]))
    # No network needed any more: the registry process is stopped, every file reads right.
    mark = len(image.relay.records())
    image.registry.process.stop()
    try:
        assert merged_files(merged) == EXPECTED
    finally:
        image.registry.process.start()
    assert image.relay.records()[mark:] == []


_READ_SCRIPT = textwrap.dedent("""
    import errno, sys
    for path in sys.argv[1:]:
        try:
            with open(path, "rb") as f:
                f.read()
            print("ok")
        except OSError as exc:
            print(errno.errorcode.get(exc.errno, exc.errno))
""")


@EACH_FUSE_OVERLAYFS
def test_reads_fail_with_eio_while_the_registry_is_down(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    worker = crfs(CRFS_BACKGROUND_FETCH="0", CRFS_FETCH_ATTEMPTS="2", CRFS_FETCH_DEADLINE="2")
    merged = worker.mount()
    assert worker.row(image.layers[0])["background"]["state"] == "off"
    worker.wait_for(lambda: worker.row(image.layers[0])["prefetch"]["state"] == "done", "the prefetch")
    image.registry.process.stop()
    try:
        # In a child with a hang guard: the retry bound (2 tries, 2 s) ends each read.
        paths = [merged / "bin/app", merged / "data/many/f30.txt", merged / "data/big.bin"]
        result = subprocess.run([sys.executable, "-c", _READ_SCRIPT, *map(str, paths)],
                                capture_output=True, text=True, timeout=DEADLINE)
        # Prefetched: local. A small file (content cache) and a large one (the view): EIO.
        assert result.stdout.split() == ["ok", "EIO", "EIO"], result.stderr
    finally:
        image.registry.process.start()
    assert (merged / "data/many/f30.txt").read_bytes() == BASE_FILES["data/many/f30.txt"]  # not remembered
    with open(merged / "data/big.bin", "rb") as f:
        assert f.read() == BIG
    assert worker.row(image.layers[0])["failures"] == 0  # unreachable is not unverifiable


def test_concurrent_readers_fetch_each_chunk_once(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    worker = crfs("--no-background-fetch")
    base = image.layers[0]
    # Two images with the same base blob: two layer numbers, two view inodes, so the
    # kernel's page cache cannot merge their reads; only the chunk store can.
    first, second = worker.mount("prefetch/image", "a"), worker.mount("prefetch/copy", "b")
    before = len(image.relay.records())
    jobs = [first / "data/big.bin", second / "data/big.bin", first / "data/dup1.bin",
            second / "data/dup2.bin", first / "data/dup2.bin", second / "data/dup1.bin"] * 2
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        contents = list(pool.map(lambda path: path.read_bytes(), jobs))
    assert contents == [BIG, BIG, DUP, DUP, DUP, DUP] * 2
    fetched = [_range(r) for r in image.blob_gets(base, before)]
    with LocalBlob(base.blob) as local, Layer.open(LayerSource(local, base.toc_digest),
                                                   worker.cache / "check-index") as layer:
        chunks = [c for path in ("data/big.bin", "data/dup1.bin", "data/dup2.bin")
                  for c in layer.chunks_for(path, 0, 1 << 30)]
    by_digest: dict[bytes, int] = {}
    for chunk in chunks:
        covering = sum(1 for a, b in fetched if a <= chunk.cstart and chunk.cend <= b)
        by_digest[chunk.digest] = by_digest.get(chunk.digest, 0) + covering
    assert set(by_digest.values()) == {1}  # dup1 and dup2 share digests: one fetch for both


def test_a_chunk_altered_on_disk_is_fetched_again(image: PrefetchImage, crfs: Callable[..., Crfs]) -> None:
    worker = crfs("--no-background-fetch")
    merged = worker.mount()
    assert (merged / "data/many/f30.txt").read_bytes() == BASE_FILES["data/many/f30.txt"]
    stored = [p for p in (worker.cache / "chunks" / "sha256").rglob("*") if p.is_file()
              and p.read_bytes() == BASE_FILES["data/many/f30.txt"]]
    assert len(stored) == 1 and stored[0].stat().st_mode & 0o777 == 0o600
    pid = worker.worker_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # the next use starts a new worker (a restart)
    worker.wait_for(lambda: worker.worker_pid() is None, "the worker to stop")
    data = bytearray(stored[0].read_bytes())
    data[0] ^= 0xFF
    stored[0].write_bytes(bytes(data))  # same size, other bytes
    # A new mount (the first one's page cache holds the file) starts a new worker.
    again = worker.mount(name="again")
    assert (again / "data/many/f30.txt").read_bytes() == BASE_FILES["data/many/f30.txt"]
    assert stored[0].read_bytes() == BASE_FILES["data/many/f30.txt"]  # replaced by a verified copy


# ------------------------------------------------------------------ starting the worker


def test_ensure_worker_starts_one_detached_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from crfs_worker.worker import ensure_worker

    runtime = Path(tempfile.mkdtemp(prefix="crfs-rt-"))
    cache = Path(tempfile.mkdtemp(prefix="crfs-cache-"))
    monkeypatch.setenv("CRFS_CACHE_DIR", str(cache))
    monkeypatch.delenv("CRFS_WORKER_CMD", raising=False)
    try:
        assert ensure_worker(runtime) is True
        pid = int((runtime / "worker.lock").read_text())
        for n in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{n}") == "/dev/null"
        assert os.getsid(pid) != os.getsid(0)
        assert ensure_worker(runtime) is False  # one answers: nothing started
        assert int((runtime / "worker.lock").read_text()) == pid
    finally:
        stop_worker(runtime, timeout=20)
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


# Holds RUNTIME/worker.lock with its pid inside, as a worker does, and answers nothing on the
# socket: what a worker is while it exits (socket closed, fetches and view still finishing),
# held in that state until its stdin closes. A real exiting worker cannot be held so on demand.
_EXITING_WORKER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, b"%d\n" % os.getpid())
print("locked", flush=True)
sys.stdin.read()
"""
# The worker command, noting each start (its pid) before it runs the worker.
_NOTED_WORKER = r"""
import os, sys
with open(sys.argv[1], "a") as starts:
    starts.write(f"{os.getpid()}\n")
from crfs_worker.worker import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_worker_started_while_another_exits_takes_over(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """The worker ensure_worker starts finds the lock held by one that answers nothing (an
    exiting worker). It must neither say `ready` and leave (nothing would answer: a mount's
    30 s worker start under load) nor fail: it waits for the lock and serves."""
    from concurrent.futures import ThreadPoolExecutor

    from crfs_worker.workerstart import ensure_worker, worker_answers

    runtime = Path(tempfile.mkdtemp(prefix="crfs-rt-"))
    starts = tmp_path / "starts"
    monkeypatch.setenv("CRFS_CACHE_DIR", str(tmp_path / "cache"))
    exiting = subprocess.Popen([sys.executable, "-c", _EXITING_WORKER, str(runtime / "worker.lock")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert exiting.stdout is not None and exiting.stdout.readline() == "locked\n"
        command = [sys.executable, "-c", _NOTED_WORKER, str(starts), "--idle-timeout", "600"]
        with ThreadPoolExecutor(1) as pool:
            started = pool.submit(ensure_worker, runtime, timeout=DEADLINE, command=command)
            deadline = time.monotonic() + DEADLINE
            while not starts.exists():
                assert time.monotonic() < deadline, "the worker did not start"
                time.sleep(0.05)
            time.sleep(0.5)  # not needed for the verdict: gives a wrong worker time to leave
            first = int(starts.read_text().split()[0])
            assert Path(f"/proc/{first}").exists(), "the worker left while the lock was held"
            assert not started.done() and not worker_answers(runtime / "worker.sock")
            exiting.stdin.close()  # type: ignore[union-attr]  # the exiting worker is gone now
            exiting.wait(timeout=DEADLINE)
            assert started.result(timeout=DEADLINE) is True
        assert worker_answers(runtime / "worker.sock")
        assert starts.read_text().split() == [str(first)] and worker_pid(runtime) == first
    finally:
        exiting.kill()
        exiting.wait()
        stop_worker(runtime, timeout=20)
        shutil.rmtree(runtime, ignore_errors=True)


def test_ensure_worker_says_why_a_worker_cannot_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crfs_worker.worker import ensure_worker
    from crfs_worker.workerstart import WorkerStartError

    runtime = tmp_path / "rt"
    monkeypatch.setenv("CRFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CRFS_BACKGROUND_FETCH", "maybe")
    with pytest.raises(WorkerStartError, match="could not start: CRFS_BACKGROUND_FETCH='maybe': expected 1 or 0"):
        ensure_worker(runtime)
    monkeypatch.delenv("CRFS_BACKGROUND_FETCH")
    monkeypatch.setenv("CRFS_WORKER_CMD", f"{tmp_path}/no-such-worker --x")
    with pytest.raises(WorkerStartError, match="no-such-worker --x': No such file or directory"):
        ensure_worker(runtime)  # the exec's own errno, reported through the pipe


# ------------------------------------------------------------------ options


def test_fetch_options_from_the_environment() -> None:
    from crfs_worker.errors import CrfsError
    from crfs_worker.prefetch import FetchOptions

    assert FetchOptions.from_environment({}).background is True
    assert FetchOptions.from_environment({"CRFS_BACKGROUND_FETCH": "0"}).background is False
    assert FetchOptions.from_environment({"CRFS_BACKGROUND_FETCH": "1"}, background=False).background is False
    options = FetchOptions.from_environment({"CRFS_FETCH_ATTEMPTS": "2", "CRFS_FETCH_DEADLINE": "5"})
    config = options.registry_config()
    assert (config.retry.attempts, config.retry.total_max) == (2, 5.0)
    assert max(config.timeouts.connect, config.timeouts.read, config.timeouts.pool) <= 5.0
    for name, value in (("CRFS_BACKGROUND_FETCH", "maybe"), ("CRFS_FETCH_ATTEMPTS", "0"),
                        ("CRFS_FETCH_DEADLINE", "soon"), ("CRFS_FETCH_DEADLINE", "nan")):
        with pytest.raises(CrfsError, match=name):
            FetchOptions.from_environment({name: value})
