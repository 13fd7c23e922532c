"""Load with real containers: sixteen rootless podman containers of one eStargz image on one
crfs worker, 64 reader threads (four per container) reading random slices of big and small
files of the image. Every slice must be right, and each chunk must come from the registry
once.

The user, the debootstrap image and the registry are those of tests/support/podman.py;
podman and the worker reach the registry through tests/support's FaultRelay (with no
fault set), because docker-registry's access log has bytes but not the Range of each
request. Its records give the byte ranges of the layer blob the worker fetched: data
ranges (before the TOC) must never overlap.

Each container gets its reading plan (file, offset, length, sha256 of the expected slice,
computed here from the image's tarball) and a start gate through a read-only volume: the
readers start together once all sixteen containers run. They write one ok/wrong/err line
per read to /results.log in the container's upper layer; `podman cp` collects it after
the containers exit. Waits are conditions with generous deadlines; nothing asserts a
duration.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crfs_worker.footer import TAIL_SIZE, parse_footer
from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient
from tests.support.podman import (
    NEEDS_ROOT_AND_PODMAN,
    wait_until,
    PATHS,
    PLUGIN_LINE,
    E2EImages,
    PodmanRoot,
    PodmanUser,
    debootstrap_tarball,
    prepare_images,
    tarball_files,
)
from tests.support.registry import FaultRelay, LoggedRegistry

USER = "crfs-load"       # its own user, hence its own worker: no other test's worker is touched
WORK_LABEL = "load"  # names the `work` fixture's directory (tests/conftest.py)
CONTAINERS = 16
READERS = 4              # per container: 64 readers in all
READS_PER_READER = 30
MAX_READ = 256 << 10
DEADLINE = 300.0         # seconds for any one condition; generous on a loaded 2-core VM
# Big files (read through the worker's FUSE view) and small ones (content-cache fds).
READ_FILES = (
    "usr/bin/python3.11", "usr/lib/x86_64-linux-gnu/libcrypto.so.3", "usr/bin/perl",
    "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/bin/bash", "usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30",
    "usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3", "usr/lib/python3.11/typing.py",
    "usr/lib/python3.11/argparse.py", "etc/passwd",
)

# The container's command: wait for /gate/go, then READERS threads that each read the
# slices of their plan (the file opened afresh each time) and log one line per read.
_READERS = r"""
import hashlib, json, os, sys, threading, time
container = sys.argv[1]
with open("/gate/plan.json") as f:
    plans = json.load(f)[container]
give_up = time.monotonic() + 600  # a guard: a container of a test that died must not wait forever
while not os.path.exists("/gate/go"):
    if time.monotonic() > give_up:
        sys.exit(3)
    time.sleep(0.1)
log = open("/results.log", "a", buffering=1)
lock = threading.Lock()

def read_slice(name, offset, length):
    fd = os.open("/" + name, os.O_RDONLY)
    try:
        parts = []
        while length > 0:  # a short read is allowed; only EOF ends the slice early
            part = os.pread(fd, length, offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
            length -= len(part)
        return b"".join(parts)
    finally:
        os.close(fd)

def reader(number):
    for name, offset, length, digest in plans[number]:
        try:
            data = read_slice(name, offset, length)
            kind = "ok" if hashlib.sha256(data).hexdigest() == digest else "wrong"
            line = f"{kind} {number} {name} {offset} {length}"
        except OSError as exc:
            line = f"err {number} {name} {offset} {length} {exc.errno}"
        with lock:
            log.write(line + "\n")

threads = [threading.Thread(target=reader, args=(n,)) for n in range(len(plans))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""

pytestmark = NEEDS_ROOT_AND_PODMAN


@dataclass(frozen=True)
class RelayedImages:
    """The eStargz image as podman and the worker see it: through the recording relay."""

    images: E2EImages
    relay: FaultRelay
    ref: str
    payload_ends: dict[str, int]  # layer digest -> where its file data ends (the TOC starts)


@pytest.fixture(scope="module")
def relayed(user: PodmanUser, work: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayedImages]:
    registry = LoggedRegistry.start(tmp_path_factory.mktemp("load-registry"))
    relay = FaultRelay(registry.host).start()
    try:
        images = prepare_images(user, registry, debootstrap_tarball(), work)
        ref = images.esgz_ref.replace(registry.host, relay.netloc, 1)
        yield RelayedImages(images, relay, ref, _payload_ends(images))
    finally:
        relay.stop()
        registry.stop()


def _payload_ends(images: E2EImages) -> dict[str, int]:
    """Each layer's footer, read straight from the registry (not through the relay)."""
    ref = ImageReference.parse(images.esgz_ref)
    ends = {}
    with RegistryClient() as client:
        for digest, size in images.esgz_layers:
            blob = client.get_blob(ref, digest)
            ends[digest] = parse_footer(blob[-TAIL_SIZE:], size, digest).payload_end
    return ends


def _plans(contents: dict[str, bytes], seed: int) -> dict[str, list[list[list[object]]]]:
    """container index -> reader -> [name, offset, length, sha256 of the expected slice]."""
    rng = random.Random(seed)
    names = sorted(contents)
    plans: dict[str, list[list[list[object]]]] = {}
    for container in range(CONTAINERS):
        readers = []
        for _ in range(READERS):
            reads: list[list[object]] = []
            for _ in range(READS_PER_READER):
                name = rng.choice(names)
                data = contents[name]
                offset, length = rng.randrange(len(data)), rng.randrange(1, MAX_READ)
                reads.append([name, offset, length, hashlib.sha256(data[offset:offset + length]).hexdigest()])
            readers.append(reads)
        plans[str(container)] = readers
    return plans


def _wait(condition: Callable[[], bool], what: str, detail: Callable[[], str] = lambda: "") -> None:
    wait_until(condition, what, DEADLINE, detail)


def _running(user: PodmanUser, root: PodmanRoot, names: list[str]) -> bool:
    result = user.podman(root, "ps", "--format", "{{.Names}}")
    return set(names) <= set(result.stdout.split())


def _logs(user: PodmanUser, root: PodmanRoot, names: list[str]) -> str:
    return "".join(user.podman(root, "logs", name, check=False).stderr[-2000:] for name in names)


def _data_ranges(relayed: RelayedImages, since: int) -> dict[str, list[tuple[int, int]]]:
    """Per layer, the [start, end) blob ranges fetched before its TOC, sorted."""
    ranges: dict[str, list[tuple[int, int]]] = {digest: [] for digest in relayed.payload_ends}
    for record in relayed.relay.records()[since:]:
        if record.method != "GET" or "/blobs/" not in record.path:
            continue
        digest = record.path.rsplit("/", 1)[1]
        if digest not in ranges:  # the image config: podman fetches it whole
            continue
        assert record.range_header is not None, f"a whole-blob GET of layer {digest}: {record}"
        first, last = record.range_header.removeprefix("bytes=").split("-")
        if int(first) < relayed.payload_ends[digest]:
            ranges[digest].append((int(first), int(last) + 1))
    return {digest: sorted(found) for digest, found in ranges.items()}


@pytest.mark.parametrize("path", ["plugin", "store"])
def test_sixteen_containers_and_64_readers_fetch_each_chunk_once(user: PodmanUser, relayed: RelayedImages,
                                                                 work: Path, path: str) -> None:
    contents = tarball_files(debootstrap_tarball(), READ_FILES)
    base = user.make_dir(work / path)
    root = PodmanRoot(user.make_dir(base / "root"), user.make_dir(user.runtime / f"load-{path}-{work.name}"),
                      PATHS[path], user.store)
    gate = user.make_dir(base / "gate")
    plan_file = gate / "plan.json"
    plan_file.write_text(json.dumps(_plans(contents, seed=len(path))))
    os.chmod(plan_file, 0o644)
    mount_log = base / "mount-program.log"
    # podman hands its environment to the mount program, hence to crfs.so: no background
    # fetch anywhere, so every chunk fetched is one a reader (or a mount's prefetch) asked for.
    user.extra_env.update(CRFS_MOUNT_PROGRAM_LOG=str(mount_log), CRFS_BACKGROUND_FETCH="0")
    user.stop_worker()
    user.clear_crfs_cache()
    worker = user.start_worker()
    assert user.store_mounted(), user.worker_log()

    mark = len(relayed.relay.records())
    user.podman(root, "pull", "--quiet", "--tls-verify=false", relayed.ref)
    names = [f"load-{path}-{work.name}-{n}" for n in range(CONTAINERS)]
    try:
        for n, name in enumerate(names):
            user.podman(root, "run", "-d", "--name", name, "--network", "none", "-v", f"{gate}:/gate:ro",
                        relayed.ref, "python3", "-c", _READERS, str(n))
        _wait(lambda: _running(user, root, names), "all containers to run",
              lambda: user.podman(root, "ps", "-a").stdout + user.worker_log())
        (gate / "go").touch()
        exits = user.podman(root, "wait", *names, timeout=DEADLINE).stdout.split()
        failed = [name for name, code in zip(names, exits) if code != "0"]
        assert len(exits) == CONTAINERS and failed == [], \
            f"exit codes {exits}: {_logs(user, root, failed[:1])}{user.worker_log()}"
        copied = user.make_dir(base / "results")
        for n, name in enumerate(names):
            user.podman(root, "cp", f"{name}:/results.log", str(copied / f"{n}.log"))
    finally:
        user.podman(root, "rm", "-f", *names, check=False)
        user.podman(root, "rmi", "-a", "-f", check=False)

    lines = {n: (copied / f"{n}.log").read_text().splitlines() for n in range(CONTAINERS)}
    every = [line for found in lines.values() for line in found]
    print(f"{path}: {len(every)} reads by {CONTAINERS * READERS} readers")
    assert [line for line in every if not line.startswith("ok ")] == []  # no wrong bytes, no errors
    for n, found in lines.items():
        per_reader = [sum(1 for line in found if line.split()[1] == str(r)) for r in range(READERS)]
        assert per_reader == [READS_PER_READER] * READERS, f"container {n}: {per_reader}"

    # One worker served all sixteen containers, and (plugin path) their lowers went through crfs.so.
    assert user.worker_pid() == worker
    plugin_mounts = sum(1 for line in mount_log.read_text().splitlines()
                        if PLUGIN_LINE.search(line)) if mount_log.exists() else 0
    assert plugin_mounts >= CONTAINERS if path == "plugin" else plugin_mounts == 0

    ranges = _data_ranges(relayed, mark)
    for digest, found in ranges.items():
        overlaps = [(a, b) for a, b in itertools.pairwise(found) if a[1] > b[0]]
        assert overlaps == [], f"{digest}: chunks fetched more than once"
    fetched = sum(end - start for found in ranges.values() for start, end in found)
    print(f"{path}: {fetched} data bytes in {sum(map(len, ranges.values()))} ranges, "
          f"of {relayed.images.esgz_bytes} blob bytes")
    assert fetched > 0  # the readers did reach the registry (a cold cache)
