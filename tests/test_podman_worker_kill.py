"""The crfs worker killed (SIGKILL) under a running rootless podman container.

A container of the eStargz Debian image (podman's `plugin` path: the mount_program
wrapper reads the store layer through crfs.so, background fetch off) runs eight reader
threads that reopen and read whole files of the image, compare them with checksums taken
from the image's tarball, and append one line per read to /results.log in the
container's upper layer. The worker is killed while they read. crfs.so starts a new
worker on its next call (the design's promise, docs/FAILURES.md): `crfs worker`, found in
the PATH fuse-overlayfs inherited from podman, inside podman's namespaces, where it also
mounts the layer store again for later podman commands. The container keeps running,
the readers keep reading correct bytes, and what the container wrote is intact.

Waits are conditions with generous deadlines; nothing asserts a duration.
"""
from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.podman import (
    NEEDS_ROOT_AND_PODMAN,
    wait_until,
    e2e_images,
    PLUGIN_LINE,
    WRAPPER,
    E2EImages,
    PodmanRoot,
    PodmanUser,
    debootstrap_tarball,
    tarball_files,
)

USER = "crfs-podkill"   # not the e2e test's user: its worker is ours to kill
WORK_LABEL = "podkill"  # names the `work` fixture's directory (tests/conftest.py)
READERS = 8
DEADLINE = 120.0        # seconds for any one condition; generous on a loaded 2-core VM
VIEW_FILE_LIMIT = 1 << 20  # larger files are read through the worker's FUSE view (FAILURES.md)
# Read over and over by the readers: big files (through the worker's view) and small
# ones (content-cache fds handed out by the worker).
READ_FILES = (
    "usr/bin/python3.11", "usr/lib/x86_64-linux-gnu/libcrypto.so.3", "usr/bin/perl",
    "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/bin/bash", "usr/lib/python3.11/pydoc_data/topics.py",
    "usr/lib/x86_64-linux-gnu/libssl.so.3", "usr/lib/python3.11/typing.py",
    "usr/lib/python3.11/_pydecimal.py", "usr/lib/python3.11/argparse.py",
)
# Read once, only after the restart: their bytes can only come from the new worker.
COLD_FILES = (
    "usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3", "usr/lib/x86_64-linux-gnu/libdb-5.3.so",
    "usr/lib/python3.11/pydoc.py",
)
MARKER = "written before the kill"

# The container's command: write the marker, then READERS threads that each, until /stop
# exists, open a file afresh, read it whole, compare its sha256, and log one line.
_READERS = r"""
import hashlib, os, random, sys, threading, time
give_up = time.monotonic() + 900  # a guard: readers of a test that died must not spin forever
expected = dict(arg.split("=", 1) for arg in sys.argv[1:])
with open("/marker", "w") as f:
    f.write("MARKER\n")
log = open("/results.log", "a", buffering=1)
lock = threading.Lock()

def reader(number):
    rng = random.Random(number)
    names = sorted(expected)
    while not os.path.exists("/stop") and time.monotonic() < give_up:
        name = rng.choice(names)
        try:
            with open("/" + name, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            line = ("ok" if digest == expected[name] else "wrong") + f" {number} {name}"
        except OSError as exc:
            line = f"err {number} {name} {exc.errno}"
        with lock:
            log.write(line + "\n")

threads = [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
""".replace("MARKER", MARKER).replace("READERS", str(READERS))

pytestmark = NEEDS_ROOT_AND_PODMAN


@pytest.fixture(scope="module")
def images(user: PodmanUser, work: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EImages]:
    with e2e_images(user, work, tmp_path_factory.mktemp("podkill-registry")) as prepared:
        yield prepared


def _checksums(tarball: Path, names: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    """(sha256, size) of regular files of the image's tarball: the truth readers compare with."""
    return {name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in tarball_files(tarball, names).items()}


def _wait(condition: Callable[[], bool], what: str, detail: Callable[[], str] = lambda: "") -> None:
    wait_until(condition, what, DEADLINE, detail)


def _lines(user: PodmanUser, root: PodmanRoot, container: str, check: bool = True) -> list[str]:
    """Complete lines of /results.log (a reader may be writing the last one); with
    check=False, none while the file does not exist yet."""
    result = user.podman(root, "exec", container, "cat", "/results.log", check=check)
    return result.stdout.split("\n")[:-1] if result.returncode == 0 else []


def _per_reader(lines: list[str], kind: str) -> list[int]:
    counts = [0] * READERS
    for line in lines:
        fields = line.split()
        if fields[0] == kind:
            counts[int(fields[1])] += 1
    return counts


def _store_served(user: PodmanUser, pid: int) -> bool:
    """The store answers in podman's mount namespace (a dead worker's mount stays listed
    in mountinfo but fails every call with ENOTCONN)."""
    result = user.run(["nsenter", "-t", str(pid), "-U", "-m", "--preserve-credentials", "stat", "-c", "%F",
                       str(user.store)], check=False)
    return result.returncode == 0 and result.stdout.strip() == "directory"


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def test_sigkilled_worker_under_a_running_container(user: PodmanUser, images: E2EImages, work: Path) -> None:
    """The container survives, crfs.so starts a new worker that serves its reads and the
    layer store again, and the container's upper layer is intact."""
    truth = _checksums(debootstrap_tarball(), READ_FILES + COLD_FILES)
    root = PodmanRoot(user.make_dir(work / "root"), user.make_dir(user.runtime / f"e2e-podkill-{work.name}"),
                      WRAPPER, user.store)
    mount_log = work / "mount-program.log"
    # podman hands its environment to the mount program, hence to crfs.so and to the worker
    # it starts: that one too fetches only what is read. The store it serves comes from the
    # user's storage.conf, found although it is uid 0 in podman's user namespace.
    user.extra_env.update(CRFS_MOUNT_PROGRAM_LOG=str(mount_log), CRFS_BACKGROUND_FETCH="0")
    user.stop_worker()
    user.clear_crfs_cache()
    first = user.start_worker()
    user.podman(root, "pull", "--quiet", "--tls-verify=false", images.esgz_ref)
    container = f"podkill-{work.name}"
    expected = [f"{name}={truth[name][0]}" for name in READ_FILES]
    user.podman(root, "run", "-d", "--name", container, "--network", "none", images.esgz_ref,
                "python3", "-c", _READERS, *expected)
    try:
        _wait(lambda: min(_per_reader(_lines(user, root, container, check=False), "ok")) >= 3,
              "every reader to read through the first worker")
        assert user.podman(root, "exec", container, "cat", "/marker").stdout == MARKER + "\n"
        before = _lines(user, root, container)  # written before the kill: must stay as they are
        os.kill(first, signal.SIGKILL)
        _wait(lambda: not Path(f"/proc/{first}").exists(), "the killed worker to go")
        # Until a new worker mounts the store again, podman commands fail (ENOTCONN on it).
        _wait(lambda: user.worker_pid() not in (None, first), "crfs.so to start a new worker")
        second = user.worker_pid()
        assert second is not None and second != first
        _wait(lambda: _store_served(user, second), "the new worker to serve the layer store", user.worker_log)
        after = len(_lines(user, root, container))
        _wait(lambda: all(n >= 10 for n in _per_reader(_lines(user, root, container)[after:], "ok")),
              "every reader to read through the new worker",
              lambda: "\n".join(_lines(user, root, container)[after:][-40:]) + user.worker_log())
        # Started by crfs.so (its default command, `crfs worker`), not by anything here,
        # with podman's environment: background fetch off.
        assert _cmdline(second)[-1:] == ["worker"] and "crfs_worker.cli" in _cmdline(second), _cmdline(second)
        assert _environ(second).get("CRFS_BACKGROUND_FETCH") == "0"

        # Files nobody read yet: their bytes come from the registry through the new worker.
        mark = images.registry.mark()
        sums = user.podman(root, "exec", container, "sha256sum", *(f"/{name}" for name in COLD_FILES)).stdout
        assert {line.split()[1].lstrip("/"): line.split()[0] for line in sums.splitlines()} == \
            {name: truth[name][0] for name in COLD_FILES}
        assert images.registry.fetched_since(mark).blob_bytes > 0

        assert user.podman(root, "inspect", "--format", "{{.State.Running}}", container).stdout.strip() == "true"
        user.podman(root, "exec", container, "touch", "/stop")
        assert user.podman(root, "wait", container, timeout=DEADLINE).stdout.strip() == "0"
        # The upper layer, read from the stopped container (a new mount through the new worker).
        copied = user.make_dir(work / "copied")
        for name in ("marker", "results.log"):
            user.podman(root, "cp", f"{container}:/{name}", str(copied / name))
    finally:
        user.podman(root, "rm", "-f", container, check=False)

    assert (copied / "marker").read_text() == MARKER + "\n"
    lines = (copied / "results.log").read_text().splitlines()
    assert lines[:len(before)] == before  # what was written before the kill is unchanged
    assert all(line.split()[0] in ("ok", "wrong", "err") for line in lines)
    assert not [line for line in lines if line.startswith("wrong")]  # never wrong bytes
    # Files are reopened for every read and crfs.so reconnects within the call: only a
    # read in flight at the kill on an fd of the old worker's view (a file over 1 MiB)
    # may fail, at most once per reader.
    errors = [line for line in lines if line.startswith("err")]
    print(f"reads: {len(before)} before the kill, {len(lines) - after} once the new worker served; "
          f"failed: {errors}")
    assert all(n <= 1 for n in _per_reader(lines, "err")), errors
    assert all(truth[line.split()[2]][1] > VIEW_FILE_LIMIT for line in errors), errors
    assert sum(1 for line in mount_log.read_text().splitlines() if PLUGIN_LINE.search(line)) >= 2

    # A fresh container of the same image starts with the worker crfs.so started.
    out = user.podman(root, "run", "--rm", "--network", "none", images.esgz_ref, "python3", "-c", "print(42)")
    assert out.stdout.strip() == "42"
    assert user.worker_pid() == second
    user.podman(root, "rmi", "-a", "-f", check=False)
