"""What B1-B3 share: the registries (loopback, and behind the emulated link), the images
pushed and converted once per run, and a rootless podman user with crfs set up
(tests/support/podman.py, podman-examples/setup-rootless.sh).

    net = ctx.shared("network", lambda: open_network(ctx))
    image = ctx.shared("image-numpy", lambda: prepared_image(ctx, net, "numpy"))
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    root = pod.fresh_root("b1-plugin", "plugin")
    pod.cold_worker()
    seconds, line = pod.first_line(root, ["run", ..., image.ref(net.netloc("emulated"), "esgz"), ...])
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from bench.common import PYTHON, REPO, BenchContext, BenchError, mb
from bench.images import IMAGES, gzip_layout, push_layout
from bench.netlink import DelayRelay, LinkCheck, NetnsLink, check_link
from crfs_worker.imagestore import RegistryStore
from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient
from tests.support.podman import PATHS, PodmanRoot, PodmanUser
from tests.support.registry import LoggedRegistry
from tests.support.workers import stop_worker

NETNS_PORT = 5000   # the namespace is ours alone: any port is free there


def storage_conf_mountopt() -> str:
    """overlay.mountopt of the storage.conf crfs ships (podman-examples/): what a user's
    podman gives fuse-overlayfs. podman drops it once --root is given, so the crfs roots
    of the benchmarks pass it again."""
    with (REPO / "podman-examples" / "storage.conf").open("rb") as f:
        return str(tomllib.load(f)["storage"]["options"]["overlay"].get("mountopt", ""))

USER = "crfs-bench"          # not the tests' user: a test session may run beside a benchmark
LINKS = ("loopback", "emulated")
SELF_CHECK_BYTES = 32 << 20   # large enough that tbf's burst is noise in the measured rate
RUN = ("run", "--rm", "--network", "none", "--quiet", "--tls-verify=false")


# ---------------------------------------------------------------------------- registries


@dataclass
class Network:
    """One registry storage served twice: on loopback, and from our own network namespace
    behind a rate-limited veth and a delaying relay (the emulated link)."""

    loopback: LoggedRegistry
    emulated: LoggedRegistry
    relay: DelayRelay
    check: LinkCheck

    def netloc(self, link: str) -> str:
        return self.loopback.host if link == "loopback" else self.relay.netloc

    def registry(self, link: str) -> LoggedRegistry:
        """The process whose access log sees the traffic of `link`."""
        return self.loopback if link == "loopback" else self.emulated


def _self_check_blob(netloc: str) -> str:
    data = os.urandom(SELF_CHECK_BYTES)  # incompressible, in case anything on the path compresses
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient() as client:
        client.put_blob(ImageReference.parse(f"{netloc}/bench/selfcheck"), digest, data)
    return digest


@contextmanager
def open_network(ctx: BenchContext) -> Iterator[Network]:
    storage = ctx.work / "registry-storage"
    shutil.rmtree(storage, ignore_errors=True)
    with LoggedRegistry.start(ctx.work / "registry-loopback", storage) as loopback, \
            NetnsLink.create(ctx.rate_mbit) as link, \
            LoggedRegistry.start(ctx.work / "registry-netns", storage, link.ns_addr, NETNS_PORT,
                                 tuple(link.exec_prefix())) as emulated, \
            DelayRelay((link.ns_addr, NETNS_PORT), ctx.rtt_ms / 2000) as relay:
        digest = _self_check_blob(loopback.host)
        check = check_link(relay.netloc, "/v2/", f"/v2/bench/selfcheck/blobs/{digest}", ctx.rate_mbit,
                           ctx.rtt_ms)
        ctx.log(f"emulated link: {check.text()}")
        ctx.record("link", {"rate_mbit": round(check.rate_mbit, 1), "rtt_ms": round(check.rtt_ms, 2),
                            "asked_rate_mbit": ctx.rate_mbit, "asked_rtt_ms": ctx.rtt_ms, "ok": check.ok,
                            "qdiscs": link.qdiscs().strip().splitlines()})
        if not check.ok:
            raise BenchError(f"the emulated link is off: {check.text()}")
        yield Network(loopback, emulated, relay, check)


# ---------------------------------------------------------------------------- images


@dataclass(frozen=True)
class BenchImage:
    """An image in the registry storage as gzip (tag `gzip`) and converted by crfs (`esgz`)."""

    name: str
    repository: str
    gzip_layers: tuple[tuple[str, int], ...]   # (digest, size)
    esgz_layers: tuple[tuple[str, int], ...]

    def ref(self, netloc: str, kind: str) -> str:
        return f"{netloc}/{self.repository}:{kind}"

    @property
    def gzip_bytes(self) -> int:
        return sum(size for _, size in self.gzip_layers)

    @property
    def esgz_bytes(self) -> int:
        return sum(size for _, size in self.esgz_layers)


def _layers(netloc: str, repository: str, tag: str) -> tuple[tuple[str, int], ...]:
    with RegistryClient() as client:
        store = RegistryStore(client, ImageReference.parse(f"{netloc}/{repository}"))
        manifest = json.loads(store.get_manifest(tag).data)
    return tuple((layer["digest"], layer["size"]) for layer in manifest["layers"])


@contextmanager
def prepared_image(ctx: BenchContext, net: Network, name: str) -> Iterator[BenchImage]:
    """Pushes the cached gzip layout of IMAGES[name] and converts it with `crfs convert`
    (registry to registry, on loopback; B5 times conversion)."""
    repository = f"bench/{name}"
    netloc = net.loopback.host
    push_layout(gzip_layout(IMAGES[name]), f"{netloc}/{repository}:gzip")
    started = time.monotonic()
    done = subprocess.run([str(PYTHON), "-m", "crfs_worker.cli", "convert", f"{netloc}/{repository}:gzip",
                           f"{netloc}/{repository}:esgz"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CRFS_CACHE_DIR": str(ctx.work / "convert-cache")})
    if done.returncode != 0:
        raise BenchError(f"crfs convert of {name} failed: {done.stderr[-2000:]}")
    image = BenchImage(name, repository, _layers(netloc, repository, "gzip"), _layers(netloc, repository, "esgz"))
    ctx.log(f"image {name}: {mb(image.gzip_bytes):.0f} MB gzip, {mb(image.esgz_bytes):.0f} MB eStargz "
            f"(converted in {time.monotonic() - started:.0f} s)")
    ctx.record(f"image-{name}", {"gzip_bytes": image.gzip_bytes, "esgz_bytes": image.esgz_bytes,
                                 "layers": len(image.esgz_layers)})
    yield image


@contextmanager
def optimized_image(ctx: BenchContext, net: Network, image: BenchImage,
                    command: Sequence[str]) -> Iterator[tuple[tuple[str, int], ...]]:
    """`crfs optimize` of the image's eStargz tag for `command`, pushed as tag `opt` (the
    files the workload opens come first, before `.prefetch.landmark`). Yields its layers.
    Runs as root with its own worker, stopped afterwards, over its own caches."""
    netloc = net.loopback.host
    runtime, cache = ctx.work / "optimize-runtime", ctx.work / "optimize-cache"
    for directory in (runtime, cache):
        shutil.rmtree(directory, ignore_errors=True)
    env = {**os.environ, "CRFS_RUNTIME_DIR": str(runtime), "CRFS_CACHE_DIR": str(cache)}
    started = time.monotonic()
    try:
        done = subprocess.run([str(PYTHON), "-m", "crfs_worker.cli", "optimize", image.ref(netloc, "esgz"),
                               image.ref(netloc, "opt"), "--", *command], capture_output=True, text=True,
                              cwd=REPO, env=env)
    finally:
        stop_worker(runtime)
    if done.returncode != 0:
        raise BenchError(f"crfs optimize of {image.name} failed: {done.stderr[-2000:]}")
    layers = _layers(netloc, image.repository, "opt")
    recorded = next((line for line in done.stdout.splitlines() if "recorded in" in line), "")
    ctx.log(f"image {image.name}: optimised for {' '.join(command)!r} in {time.monotonic() - started:.0f} s "
            f"({recorded}), {mb(sum(size for _, size in layers)):.0f} MB")
    ctx.record(f"image-{image.name}-opt", {"command": list(command), "recorded": recorded,
                                           "opt_bytes": sum(size for _, size in layers)})
    yield layers


# ---------------------------------------------------------------------------- podman


@dataclass(frozen=True)
class Counters:
    """The worker's per-layer counters, summed (`crfs stats --json`)."""

    fetched: int
    requests: int
    rounds: int      # requests that began a round trip (none other in flight): dependent fetches


@dataclass
class Podman:
    """The benchmark's rootless podman user, its worker, and throwaway podman storages."""

    user: PodmanUser
    base: Path
    roots: list[PodmanRoot] = field(default_factory=list)

    def crfs_root(self, name: str, path: str) -> PodmanRoot:
        """An empty podman storage for crfs's `path`, configured as storage.conf has it."""
        return self.fresh_root(name, path, storage_conf_mountopt())

    def fresh_root(self, name: str, path: str, mountopt: str = "") -> PodmanRoot:
        """An empty podman storage whose mount program is that of `path` ("store"/"plugin"),
        given `mountopt` (overlay.mountopt) if any."""
        unique = f"{name}-{uuid.uuid4().hex[:6]}"
        root = PodmanRoot(self.user.make_dir(self.base / unique),
                          self.user.make_dir(self.user.runtime / f"bench-{unique}"), PATHS[path], self.user.store,
                          mountopt)
        self.roots.append(root)
        return root

    def discard(self, root: PodmanRoot) -> None:
        self.user.podman(root, "rmi", "-a", "-f", check=False)
        for directory in (root.graphroot, root.runroot):
            shutil.rmtree(directory, ignore_errors=True)
        if root in self.roots:
            self.roots.remove(root)

    def cold_worker(self, background: bool = False) -> None:
        """A fresh worker over empty caches (indexes, chunks, whole files): a cold start.
        Background fetch is off unless asked for, so what is fetched is what the container
        needed."""
        self.user.stop_worker()
        self.user.clear_crfs_cache()
        self.user.start_worker(background=background)
        if not self.user.store_mounted():
            raise BenchError(f"the worker does not serve {self.user.store}: {self.user.worker_log()}")

    def settle(self, timeout: float = 120) -> None:
        """Waits until the worker writes no local copy (crfs stats): its steady state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = json.loads(self.user.run([str(PYTHON), "-m", "crfs_worker.cli", "stats", "--json"]).stdout)
            if not sum(row.get("copying", 0) for row in rows):
                return
            time.sleep(0.2)
        raise BenchError(f"the worker was still writing local copies after {timeout:.0f} s")

    def counters(self) -> Counters:
        rows = json.loads(self.user.run([str(PYTHON), "-m", "crfs_worker.cli", "stats", "--json"]).stdout)
        return Counters(sum(r["fetched"] for r in rows), sum(r["requests"] for r in rows),
                        sum(r["rounds"] for r in rows))

    def command(self, root: PodmanRoot | None, args: Sequence[str]) -> list[str]:
        env = [f"{k}={v}" for k, v in self.user.env().items()]
        return ["runuser", "-u", self.user.name, "--", "env", "-i", *env, "podman",
                *(root.args() if root else []), *args]

    def run(self, root: PodmanRoot | None, args: Sequence[str], timeout: float = 1800) -> str:
        return self.user.podman(root, *args, timeout=timeout).stdout

    def first_line(self, root: PodmanRoot, args: Sequence[str], timeout: float = 1800) -> tuple[float, str]:
        """Seconds from starting `podman ARGS` to its first line of output, and that line;
        the command must then succeed."""
        log = self.base / f"podman-{uuid.uuid4().hex[:6]}.stderr"
        with open(log, "w") as stderr:
            started = time.monotonic()
            process = subprocess.Popen(self.command(root, args), stdout=subprocess.PIPE, stderr=stderr,
                                       text=True, cwd="/")
            killer = threading.Timer(timeout, process.kill)  # bounds a hung run; never fires otherwise
            killer.start()
            try:
                assert process.stdout is not None
                line = process.stdout.readline()
                elapsed = time.monotonic() - started
                process.stdout.read()
                process.wait()
            finally:
                killer.cancel()
        message = log.read_text(errors="replace")[-3000:]
        log.unlink()
        if process.returncode != 0 or not line.strip():
            raise BenchError(f"podman {' '.join(args)} exited {process.returncode}: {message}")
        return elapsed, line.strip()

    def close(self) -> None:
        for root in list(self.roots):
            self.discard(root)
        self.user.stop_worker()


@contextmanager
def open_podman(ctx: BenchContext) -> Iterator[Podman]:
    if os.geteuid() != 0:
        raise BenchError("B1-B3 create a user and run rootless podman as it: run as root")
    for tool in ("podman", "fuse-overlayfs", "runuser"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    user = PodmanUser.ensure(USER)
    base = user.make_dir(user.home / "bench" / uuid.uuid4().hex[:8])
    pod = Podman(user, base)
    try:
        yield pod
    finally:
        pod.close()
        shutil.rmtree(base, ignore_errors=True)
