"""Rootless podman for the end-to-end tests: a base image from debootstrap (cached across
runs), a non-root user set up with podman-examples/setup-rootless.sh, a registry with an
access log (to count the bytes podman's lazily started containers really fetched), and
podman/crfs commands run as that user.

    tarball = debootstrap_tarball()                     # /var/cache/crfs-tests/..., built once
    user = PodmanUser.ensure("crfs-e2e")                # created and set up if missing
    registry = LoggedRegistry.start(tmp_path / "reg")
    user.podman(root, "pull", ref)
    fetched = registry.fetched_since(mark).blob_bytes
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from tests.support.registry import LoggedRegistry
from tests.support.workers import stop_process, worker_pid

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("CRFS_TEST_CACHE", "/var/cache/crfs-tests"))
DEBOOTSTRAP_COMMAND = ("debootstrap", "--variant=minbase", "--include=python3", "bookworm")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CLEANED = ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_Packages",
           "var/lib/apt/lists/*_Release*")
SETUP_SCRIPT = REPO / "podman-examples" / "setup-rootless.sh"
PYTHON = REPO / ".venv" / "bin" / "python"
CRFS_COMMAND = "/usr/local/bin/crfs"  # written by setup-rootless.sh


# ---------------------------------------------------------------------------- base image


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One builder at a time across concurrent test sessions and benchmark runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def debootstrap_tarball(cache_dir: Path = CACHE_DIR) -> Path:
    """A tar of `debootstrap --variant=minbase --include=python3 bookworm`, built once per
    machine and kept under `cache_dir`, keyed by the command (it takes about a minute)."""
    command = [*DEBOOTSTRAP_COMMAND, "DIR", DEBIAN_MIRROR, "&&", "rm", *CLEANED]
    key = hashlib.sha256(" ".join(command).encode()).hexdigest()[:16]
    tarball = cache_dir / f"debootstrap-{key}.tar"
    with file_lock(cache_dir / f".debootstrap-{key}.lock"):
        if tarball.exists():
            return tarball
        work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
        try:
            root = work / "root"
            result = subprocess.run([*DEBOOTSTRAP_COMMAND, str(root), DEBIAN_MIRROR],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"debootstrap failed: {result.stderr[-2000:] or result.stdout[-2000:]}")
            partial = work / "image.tar"
            # As image builds do: no downloaded packages or apt lists (incompressible bulk
            # that would make every image-relative figure look better than it is).
            for pattern in CLEANED:
                for path in root.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
                           check=True)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


def tarball_files(tarball: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Regular files of an image's tarball (names without the leading ./): the truth
    what containers read is compared with."""
    wanted = {f"./{name}": name for name in names}
    found: dict[str, bytes] = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None:
                continue
            assert member.isfile(), f"{name} is not a regular file in {tarball}"
            found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert set(found) == set(names), f"missing from the image: {set(names) - set(found)}"
    return found


# ---------------------------------------------------------------------------- registry


# ---------------------------------------------------------------------------- the user


class CommandError(RuntimeError):
    pass


@dataclass(frozen=True)
class PodmanRoot:
    """A podman storage of its own (--root/--runroot), so two paths never share images.
    podman 4.3.1 drops storage.conf's driver options once --root is given: they are
    passed again here."""

    graphroot: Path
    runroot: Path
    mount_program: str
    store: Path
    mountopt: str = ""   # overlay.mountopt: extra options for the mount program, e.g. fast_ino=1

    def args(self) -> list[str]:
        program = ["--storage-opt", f"overlay.mount_program={self.mount_program}"] if self.mount_program else []
        options = ["--storage-opt", f"overlay.mountopt={self.mountopt}"] if self.mountopt else []
        return ["--root", str(self.graphroot), "--runroot", str(self.runroot), "--storage-driver", "overlay",
                *program, *options, "--storage-opt", f"overlay.additionallayerstore={self.store}:ref"]


@dataclass
class PodmanUser:
    """A non-root user set up for rootless podman with crfs (setup-rootless.sh)."""

    name: str
    uid: int
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def ensure(cls, name: str) -> "PodmanUser":
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
        result = subprocess.run(["bash", str(SETUP_SCRIPT), name], capture_output=True, text=True,
                                env={**os.environ, "CRFS_PYTHON": str(PYTHON)})
        if result.returncode != 0:
            raise CommandError(f"setup-rootless.sh {name} failed: {result.stderr or result.stdout}")
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, Path(entry.pw_dir))

    @property
    def runtime(self) -> Path:
        return Path(f"/run/user/{self.uid}")

    @property
    def crfs_runtime(self) -> Path:
        return self.runtime / "crfs"

    @property
    def store(self) -> Path:
        return self.home / ".local" / "share" / "crfs" / "store"

    @property
    def cache(self) -> Path:
        return self.home / ".cache" / "crfs"

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/local/bin:/usr/bin:/bin", "XDG_RUNTIME_DIR": str(self.runtime), **self.extra_env}

    def run(self, args: Sequence[str], *, timeout: float = 600, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        env = [f"{k}={v}" for k, v in self.env().items()]
        result = subprocess.run(["runuser", "-u", self.name, "--", "env", "-i", *env, *args], cwd="/",
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise CommandError(f"{' '.join(args)} (as {self.name}) exited {result.returncode}:\n"
                               f"{result.stderr[-3000:]}{result.stdout[-1000:]}")
        return result

    def podman(self, root: PodmanRoot | None, *args: str, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *(root.args() if root else []), *args], timeout=timeout, check=check)

    def make_dir(self, path: Path) -> Path:
        self.run(["mkdir", "-p", str(path)])
        return path

    # ---- the worker

    def worker_pid(self) -> int | None:
        return worker_pid(self.crfs_runtime)

    def start_worker(self, *extra: str, background: bool = False) -> int:
        # The command setup-rootless.sh installed: it works even when USER cannot read
        # this checkout (then it runs crfs from /opt/crfs).
        quiet = () if background else ("--no-background-fetch",)
        self.run([CRFS_COMMAND, "worker", "--detach", *quiet, *extra])
        pid = self.worker_pid()
        if pid is None:
            raise CommandError(f"{self.name}'s crfs worker did not stay up: {self.worker_log()}")
        return pid

    def stop_worker(self, timeout: float = 30) -> None:
        pid = self.worker_pid()
        if pid is not None:  # its view lives in podman's namespace: it goes with the worker
            stop_process(pid, timeout)

    def worker_log(self) -> str:
        log = self.crfs_runtime / "worker.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no worker log)"

    def clear_crfs_cache(self) -> None:
        """Cold caches (content, chunks, indexes): what the next run fetches is what it needs."""
        shutil.rmtree(self.cache, ignore_errors=True)

    def store_mounted(self) -> bool:
        """Whether the worker's store is mounted where podman looks (its namespace)."""
        pid = self.worker_pid()
        if pid is None:
            return False
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
        return any(line.split()[4] == str(self.store) for line in mountinfo.splitlines())


# ---------------------------------------------------------------------------- the flow

WRAPPER = "/usr/local/libexec/crfs/fuse-overlayfs"  # what setup-rootless.sh installs
# How podman stacks store layers: fuse-overlayfs reading the store alone, the wrapper
# (through crfs.so), and the kernel's rootless overlay (no mount program).
PATHS = {"store": "/usr/bin/fuse-overlayfs", "plugin": WRAPPER, "kernel": ""}
FULL_FLOW = ("store", "plugin")  # push, the pushed copy and the gzip original: podman's part, once per mount program
PLUGIN_LINE = re.compile(r" ([1-9]\d*) lower\(s\) via crfs\.so: ")


@dataclass(frozen=True)
class E2EImages:
    """The debootstrap image in the registry: as podman pushed it (gzip), and converted."""

    registry: LoggedRegistry
    gzip_ref: str
    esgz_ref: str
    esgz_layers: tuple[tuple[str, int], ...]   # (digest, size) of the eStargz blobs

    @property
    def esgz_bytes(self) -> int:
        return sum(size for _, size in self.esgz_layers)


def prepare_images(user: PodmanUser, registry: LoggedRegistry, tarball: Path, work: Path) -> E2EImages:
    """podman import + push (gzip), then `crfs convert` to eStargz."""
    repository = "e2e/debian"
    gzip_ref, esgz_ref = f"{registry.host}/{repository}:gzip", f"{registry.host}/{repository}:esgz"
    builder = PodmanRoot(user.make_dir(work / "builder"), user.make_dir(user.runtime / f"e2e-builder-{work.name}"),
                         "/usr/bin/fuse-overlayfs", user.store)
    user.podman(builder, "import", "--quiet", str(tarball), "localhost/crfs-e2e:base")
    user.podman(builder, "push", "--quiet", "--tls-verify=false", "localhost/crfs-e2e:base", gzip_ref)
    user.podman(builder, "rmi", "-a", "-f")
    convert = subprocess.run([str(PYTHON), "-m", "crfs_worker.cli", "convert", gzip_ref, esgz_ref],
                             capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "CRFS_CACHE_DIR": str(work / "convert-cache")})
    if convert.returncode != 0:
        raise CommandError(f"crfs convert failed: {convert.stderr}")
    manifest = registry.manifest(repository, "esgz")
    layers = tuple((layer["digest"], layer["size"]) for layer in manifest["layers"])
    return E2EImages(registry, gzip_ref, esgz_ref, layers)


@dataclass
class PathReport:
    """What one way of running podman with crfs did and cost."""

    path: str                   # "store", "plugin" or "kernel" (see PATHS)
    image_bytes: int
    pull_fetched: int = 0       # registry blob bytes during the pull (TOCs)
    fetched: int = 0            # ... during the pull and the first run
    requests: int = 0
    pull_seconds: float = 0.0
    run_seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    uses_added_by_pull: int = 0
    uses_left_by_rmi: int = 0
    plugin_mounts: int = 0      # container mounts whose store layers went through crfs.so

    @property
    def fraction(self) -> float:
        return self.fetched / self.image_bytes

    def line(self) -> str:
        return (f"{self.path:7} {self.image_bytes:>12} {self.pull_fetched:>10} {self.fetched:>10} "
                f"{100 * self.fraction:>6.2f}% {self.pull_seconds:>6.2f} {self.run_seconds:>6.2f}")


REPORT_HEADER = f"{'path':7} {'image bytes':>12} {'pull':>10} {'pull+run':>10} {'share':>7} {'pull s':>6} {'run s':>6}"


def _uses(user: PodmanUser, images: E2EImages) -> int:
    from crfs_worker.layerstore import read_use_counts

    counts = read_use_counts(user.crfs_runtime)
    return sum(counts.get((images.esgz_ref, digest), 0) for digest, _ in images.esgz_layers)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip()


def run_path(user: PodmanUser, images: E2EImages, work: Path, path: str, full: bool = True) -> PathReport:
    """The flow with a cold worker: pull, run, write, run again, rmi; `full` adds a push
    of the lazily pulled image, a run of that copy and one of the gzip original. Raises
    CommandError naming the failing step."""
    report = PathReport(path, images.esgz_bytes)
    registry = images.registry
    base = user.make_dir(work / path)
    root = PodmanRoot(user.make_dir(base / "root"), user.make_dir(user.runtime / f"e2e-{path}-{work.name}"),
                      PATHS[path], user.store)
    mount_log = base / "mount-program.log"
    user.extra_env["CRFS_MOUNT_PROGRAM_LOG"] = str(mount_log)
    user.stop_worker()
    user.clear_crfs_cache()
    user.start_worker()
    if not user.store_mounted():
        raise CommandError(f"the worker does not serve {user.store} in podman's namespace: {user.worker_log()}")
    uses_before = _uses(user, images)
    run = ("run", "--rm", "--network", "none")

    mark = registry.mark()
    started = time.monotonic()
    user.podman(root, "pull", "--quiet", "--tls-verify=false", images.esgz_ref)
    report.pull_seconds = time.monotonic() - started
    report.pull_fetched = registry.fetched_since(mark).blob_bytes
    report.uses_added_by_pull = _uses(user, images) - uses_before
    started = time.monotonic()
    report.outputs["first"] = _output(user.podman(root, *run, images.esgz_ref, "python3", "-c", "print(42)"))
    report.run_seconds = time.monotonic() - started
    fetched = registry.fetched_since(mark)
    report.fetched, report.requests = fetched.blob_bytes, fetched.blob_requests

    report.outputs["write"] = _output(user.podman(root, *run, images.esgz_ref, "sh", "-c",
        "echo written > /root/new && cat /root/new && echo appended >> /etc/os-release && "
        "tail -n 1 /etc/os-release && rm /etc/debian_version && test ! -e /etc/debian_version && echo removed"))
    report.outputs["second"] = _output(user.podman(root, *run, images.esgz_ref, "python3", "-c", "print(42)"))

    pushed = f"{registry.host}/e2e/pushed-{path}:v1"
    if full:
        user.podman(root, "push", "--quiet", "--tls-verify=false", images.esgz_ref, pushed)
    user.podman(root, "rmi", images.esgz_ref)
    report.uses_left_by_rmi = _uses(user, images) - uses_before
    if mount_log.exists():
        report.plugin_mounts = sum(1 for line in mount_log.read_text().splitlines() if PLUGIN_LINE.search(line))
    if full:
        fresh = PodmanRoot(user.make_dir(base / "fresh"),
                           user.make_dir(user.runtime / f"e2e-{path}-fresh-{work.name}"), PATHS[path], user.store)
        report.outputs["pushed"] = _output(user.podman(fresh, *run, "--tls-verify=false", pushed,
                                                       "python3", "-c", "print(43)"))
        report.outputs["gzip"] = _output(user.podman(root, *run, "--tls-verify=false", images.gzip_ref,
                                                     "python3", "-c", "print(44)"))
        user.podman(fresh, "rmi", "-a", "-f", check=False)
    user.podman(root, "rmi", "-a", "-f", check=False)
    return report


def remove_tree(path: Path) -> None:
    """Storage trees hold files of the user's subordinate ids: root removes them."""
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- for test modules

NEEDS_ROOT_AND_PODMAN = [
    pytest.mark.skipif(os.getuid() != 0, reason="creates a user and runs podman as it: needs root"),
    pytest.mark.skipif(shutil.which("podman") is None or shutil.which("debootstrap") is None,
                       reason="needs podman and debootstrap"),
]


@contextmanager
def podman_user(name: str) -> Iterator[PodmanUser]:
    """USER set up by setup-rootless.sh; its worker is stopped afterwards."""
    created = PodmanUser.ensure(name)
    try:
        yield created
    finally:
        created.stop_worker()


@contextmanager
def work_dir(user: PodmanUser, label: str) -> Iterator[Path]:
    """A private directory in USER's home (podman roots live there), removed afterwards
    with the run roots named after it."""
    path = user.make_dir(user.home / label / uuid.uuid4().hex[:8])
    try:
        yield path
    finally:
        remove_tree(path)
        for runroot in user.runtime.glob(f"e2e-*{path.name}"):
            remove_tree(runroot)


@contextmanager
def e2e_images(user: PodmanUser, work: Path, registry_dir: Path) -> Iterator[E2EImages]:
    """The debootstrap image in a logged registry, gzip and eStargz (prepare_images)."""
    registry = LoggedRegistry.start(registry_dir)
    try:
        yield prepare_images(user, registry, debootstrap_tarball(), work)
    finally:
        registry.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float,
               detail: Callable[[], str] = lambda: "") -> None:
    """Polls `condition` until it holds; fails naming `what` (and `detail()`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {detail()}"
        time.sleep(0.2)
