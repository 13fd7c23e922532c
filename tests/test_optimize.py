"""`crfs optimize SRC DST -- CMD`: a real registry, real crfs mounts (fuse-overlayfs with
crfs.so and the worker), a real workload chrooted into the mount, and the DST image read
back with the Layer reader."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from crfs_worker.accesslog import MAX_ENTRIES, MAX_RECORDINGS, AccessLog
from crfs_worker.convert import ConvertOptions, convert
from crfs_worker.estargz_writer import PREFETCH_LANDMARK
from crfs_worker.image import Image, open_image
from crfs_worker.imagemount import mount_type
from crfs_worker.ipc import RequestFailed
from crfs_worker.progress import Progress
from crfs_worker.prefetch import prioritized_chunks
from tests.support.images import TestImage, build_test_image, check_layer_view, push_image
from tests.support.plugin_env import build_plugin
from tests.support.registry import RunningRegistry
from tests.support.workers import stop_worker

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("fuse-overlayfs") is None or shutil.which("unshare") is None,
                                reason="needs fuse-overlayfs and unshare")

# Reads files of all three layers; `/bin/busybox` itself is the first file opened (exec).
WORKLOAD = ["/bin/busybox", "sh", "-c",
            "cat /data/small.txt /etc/passwd /opt/app/new.txt; /bin/busybox head -c 10 /data/big.bin | wc -c"]
EXPECTED = ["bin/busybox", "data/small.txt", "etc/passwd", "opt/app/new.txt", "data/big.bin"]


@pytest.fixture(scope="module")
def images(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> tuple[TestImage, str, str]:
    image = build_test_image(tmp_path_factory.mktemp("optimize-image") / "oci")
    gzip_ref, esgz_ref = f"{registry.host}/optimize/app:gzip", f"{registry.host}/optimize/app:esgz"
    with registry.client() as client:
        push_image(image, client, gzip_ref)
        convert(gzip_ref, esgz_ref, ConvertOptions(progress=Progress.disabled()), client)
    return image, gzip_ref, esgz_ref


@contextmanager
def own_worker(cache: Path) -> Iterator[dict[str, str]]:
    """An environment with its own runtime dir (so its own worker) and chunk cache."""
    runtime = Path(tempfile.mkdtemp(prefix="crfs-opt-"))  # short: a socket path has 108 bytes
    env = {**os.environ, "CRFS_RUNTIME_DIR": str(runtime), "CRFS_BACKGROUND_FETCH": "0",
           "CRFS_CACHE_DIR": str(cache)}
    try:
        yield env
    finally:
        stop_worker(runtime)  # waits: its FUSE view goes with it, remove the directory after
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(scope="module")
def crfs_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    build_plugin()
    with own_worker(tmp_path_factory.mktemp("optimize-cache")) as env:
        yield env


def crfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crfs_worker.cli", *args], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=600, check=False)


def recorded_lines(stdout: str) -> list[tuple[str, str]]:
    """The `  /PATH  -> LAYER` lines of crfs optimize's report."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("  /") and "  -> " in line:
            path, layer = line.strip().split("  -> ")
            rows.append((path.lstrip("/"), layer))
    return rows


def regular_before_landmark(image: Image) -> dict[str, list[str]]:
    """Per DST layer digest: its regular files that precede `.prefetch.landmark`, TOC order."""
    out: dict[str, list[str]] = {}
    for opened in image.layers:
        first: list[str] = []
        for path, st in opened.layer.walk():
            if path == PREFETCH_LANDMARK:
                break
            if st.mode & 0o170000 == 0o100000:
                first.append(path)
        else:
            first = []  # no landmark: nothing is prioritised
        out[opened.descriptor.digest] = first
    return out


def check_dst(env: dict[str, str], dst: str, image: TestImage, stdout: str) -> Image:
    rows = recorded_lines(stdout)
    assert [path for path, _ in rows] == EXPECTED, stdout
    opened = open_image(dst, Path(env["CRFS_CACHE_DIR"]) / "test-index")
    first = regular_before_landmark(opened)
    by_layer: dict[str, list[str]] = {}
    for path, layer in rows:
        by_layer.setdefault(layer, []).append(path)
    # Each recorded file leads its own layer, in access order; no other file precedes the landmark.
    assert by_layer == {digest: files for digest, files in first.items() if files}
    assert len(by_layer) == 3  # busybox, changes and big layers each hold some
    # Every file (the rest follow the landmark) still reads back identical.
    for source, converted in zip(image.images[0].layers, opened.layers):
        check_layer_view(converted.layer, source.entries)
    return opened


def test_optimize_gzip_image_prioritises_what_the_workload_opened(
        crfs_env: dict[str, str], images: tuple, registry: RunningRegistry, tmp_path: Path) -> None:
    image, gzip_ref, _ = images
    dst = f"{registry.host}/optimize/app:opt"
    result = crfs(crfs_env, "optimize", gzip_ref, dst, "--", *WORKLOAD)
    assert result.returncode == 0, result.stderr
    assert "5 file(s) recorded in 3 layer(s)" in result.stdout
    assert "root:x:0:0" in result.stdout  # the workload's own output: it ran on the image
    opened = check_dst(crfs_env, dst, image, result.stdout)
    # The prioritised files of each layer are one contiguous blob range before the landmark.
    with opened:
        for layer in opened.layers:
            found = layer.layer.prefetch_range()
            assert found is not None
            chunks = prioritized_chunks(layer.layer, found[1])
            assert len(layer.layer.fetch_ranges(chunks)) == 1
    with own_worker(tmp_path / "fresh-cache") as fresh:  # chunks the optimize run stored would hide fetches
        mount_fetches_once(fresh, dst, tmp_path / "mnt")


def mount_fetches_once(env: dict[str, str], dst: str, target: Path) -> None:
    """A mount of DST prefetches the prioritised range; the workload's reads then fetch nothing."""
    target.mkdir()
    mounted = crfs(env, "mount", dst, str(target))
    assert mounted.returncode == 0, mounted.stderr
    try:
        before = wait_for_prefetches(env)
        assert all(row["prefetch"]["state"] == "done" and row["prefetch"]["bytes"] > 0 for row in before.values()), before
        for path in EXPECTED:
            (target / path).read_bytes()
        assert stats(env) == before  # no further Range request, no byte more
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(target)], check=False)


def wait_for_prefetches(env: dict[str, str], bound: float = 120.0) -> dict[str, dict]:
    """The stats once no layer's prefetch runs (they run beside the mount); `bound` is a
    hang guard, never an asserted duration."""
    deadline = time.monotonic() + bound
    while True:
        now = stats(env)
        if all(row["prefetch"]["state"] != "running" for row in now.values()):
            return now
        assert time.monotonic() < deadline, f"gave up waiting for the prefetches: {now}"
        time.sleep(0.1)


def stats(env: dict[str, str]) -> dict[str, dict]:
    """What the worker fetched so far, per layer."""
    result = crfs(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: {"requests": row["requests"], "fetched": row["fetched"], "prefetch": row["prefetch"]}
            for row in json.loads(result.stdout)}


def test_optimize_rewrites_an_estargz_image_into_an_oci_layout(
        crfs_env: dict[str, str], images: tuple, tmp_path: Path) -> None:
    image, _, esgz_ref = images
    dst = f"oci:{tmp_path / 'out'}:opt"
    result = crfs(crfs_env, "optimize", esgz_ref, dst, "--", *WORKLOAD)
    assert result.returncode == 0, result.stderr
    check_dst(crfs_env, dst, image, result.stdout).close()


def test_failing_workload_is_an_error_unless_allowed(crfs_env: dict[str, str], images: tuple,
                                                     tmp_path: Path) -> None:
    _, _, esgz_ref = images
    dst = f"oci:{tmp_path / 'out'}:opt"
    failing = ["/bin/busybox", "sh", "-c", "cat /etc/group; exit 3"]
    result = crfs(crfs_env, "optimize", esgz_ref, dst, "--", *failing)
    assert result.returncode == 1
    assert "exited with status 3" in result.stderr and "--allow-failure" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    allowed = crfs(crfs_env, "optimize", "--allow-failure", esgz_ref, dst, "--", *failing)
    assert allowed.returncode == 0, allowed.stderr
    assert [path for path, _ in recorded_lines(allowed.stdout)] == ["bin/busybox", "etc/group"]
    assert "exit status 3" in allowed.stdout
    missing = crfs(crfs_env, "optimize", esgz_ref, dst, "--", "/no/such/program")
    assert missing.returncode == 1 and "exited with status" in missing.stderr
    empty = crfs(crfs_env, "optimize", esgz_ref, dst)
    assert empty.returncode == 1 and "no workload command" in empty.stderr
    assert mount_type(tmp_path) is None


# ------------------------------------------------------------------ the recording itself


def test_access_log_keeps_first_access_order_and_forgets_stopped_recordings() -> None:
    log = AccessLog()
    handlers = log.handlers(lambda num: (f"sha256:{num:064x}", f"loc{num}"))
    ident = handlers["record_start"]({})[0]["id"]
    log.note(2, "b")
    log.note(1, "a")
    log.note(2, "b")
    later = log.start()
    log.note(1, "c")
    reply = handlers["record_stop"]({"id": ident})[0]
    assert reply["opens"] == [[2, b"b", f"sha256:{2:064x}", "loc2"], [1, b"a", f"sha256:{1:064x}", "loc1"],
                              [1, b"c", f"sha256:{1:064x}", "loc1"]]
    assert not reply["overflowed"]
    with pytest.raises(RequestFailed) as caught:
        handlers["record_stop"]({"id": ident})
    assert caught.value.errno == errno.ENOENT
    assert list(log.stop(later).seen) == [(1, "c")]
    with pytest.raises(RequestFailed):
        handlers["record_stop"]({"id": "x"})


def test_access_log_is_bounded() -> None:
    log = AccessLog()
    first = log.start()
    for _ in range(MAX_RECORDINGS):
        log.start()
    with pytest.raises(RequestFailed):
        log.stop(first)  # the oldest gave way
    recording = log.stop(first + 1)
    for number in range(MAX_ENTRIES + 5):
        recording.note(1, str(number))
    assert len(recording.seen) == MAX_ENTRIES and recording.overflowed
