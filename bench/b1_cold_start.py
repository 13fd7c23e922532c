"""B1: cold start: time until the first output line of
`podman run IMAGE python3 -c 'import numpy; print(numpy.__version__)'`.

crfs: the eStargz image (converted by crfs), pulled through the additional layer store
and run lazily, with an empty podman storage and a fresh worker over empty caches: once
with podman's plain fuse-overlayfs reading the store ("store path") and once with crfs's
mount program reading store layers through crfs.so ("plugin path").
Baseline: `podman run` (pull and run) of the same image as gzip into an empty storage.
Both on loopback and on the emulated link (bench/netlink.py: tbf rate in a network
namespace, a delaying relay for the round trip).

The ideal, on the emulated link: what the crfs run fetched (compressed bytes and
requests, from the registry's access log: the worker's range requests plus podman's
manifest and config) at the measured link rate, plus one round trip per request. Every
request is counted as dependent, which overstates the ideal where fetches overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.common import BenchContext, BenchError, Figure, Target
from bench.podman_env import LINKS, RUN, BenchImage, Counters, Network, Podman, open_network, open_podman, \
    prepared_image

ID = "B1"
TITLE = "cold start: podman run to first output line"
FULL = "podman pull + run, gzip"
COMMANDS = {
    "numpy": ("python3", "-c", "import numpy; print(numpy.__version__)"),
    "small": ("python3", "-c", "import json, sys; print(sys.version.split()[0])"),
}


@dataclass(frozen=True)
class ColdRun:
    seconds: float
    output: str
    fetched_bytes: int      # blob bytes in the registry's access log during the run
    requests: int           # every request in it
    worker: Counters


def crfs_cold_start(pod: Podman, net: Network, image: BenchImage, link: str, path: str) -> ColdRun:
    root = pod.fresh_root(f"b1-{path}-{link}", path)
    try:
        pod.cold_worker()
        registry = net.registry(link)
        mark = registry.mark()
        seconds, line = pod.first_line(root, [*RUN, image.ref(net.netloc(link), "esgz"), *COMMANDS[image.name]])
        fetched = registry.fetched_since(mark)
        return ColdRun(seconds, line, fetched.blob_bytes, fetched.requests, pod.counters())
    finally:
        pod.discard(root)


def full_pull_start(pod: Podman, net: Network, image: BenchImage, link: str) -> tuple[float, float, str]:
    """Seconds to the first line: pull + run into an empty storage, then (for the record:
    the floor podman and runc set) a run of the image now local; and the line."""
    root = pod.fresh_root(f"b1-full-{link}", "store")
    try:
        command = [*RUN, image.ref(net.netloc(link), "gzip"), *COMMANDS[image.name]]
        seconds, line = pod.first_line(root, command)
        local, _ = pod.first_line(root, command)
        return seconds, local, line
    finally:
        pod.discard(root)


def ideal_seconds(run: ColdRun, net: Network) -> float:
    return run.fetched_bytes * 8 / (net.check.rate_mbit * 1e6) + run.requests * net.check.rtt_ms / 1000


def run(ctx: BenchContext) -> list[Figure]:
    net = ctx.shared("network", lambda: open_network(ctx))
    name = "small" if ctx.quick else "numpy"
    image = ctx.shared(f"image-{name}", lambda: prepared_image(ctx, net, name))
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    figures: list[Figure] = []
    facts: dict[str, object] = {}
    for link in LINKS:
        runs: dict[str, list[ColdRun]] = {"store": [], "plugin": []}
        full: list[float] = []
        local: list[float] = []
        for rep in range(ctx.reps):  # interleaved, so that a change in load hits every side
            ctx.log(f"B1 {link} repetition {rep + 1}/{ctx.reps}")
            for path in runs:
                runs[path].append(crfs_cold_start(pod, net, image, link, path))
            pulled, again, expected = full_pull_start(pod, net, image, link)
            full.append(pulled)
            local.append(again)
            wrong = {r.output for path_runs in runs.values() for r in path_runs} - {expected}
            if wrong:
                raise BenchError(f"crfs containers printed {sorted(wrong)}, the gzip image {expected!r}")
        facts[f"{link}/local image run (podman + runc floor)"] = [round(s, 3) for s in local]
        for path, done in runs.items():
            outputs = {r.output for r in done}
            facts[f"{link}/{path}"] = {
                "outputs": sorted(outputs), "fetched_bytes": [r.fetched_bytes for r in done],
                "requests": [r.requests for r in done],
                "worker_fetched": [r.worker.fetched for r in done],
                "worker_requests": [r.worker.requests for r in done],
                "share_of_image": round(max(r.fetched_bytes for r in done) / image.esgz_bytes, 4)}
            figures.append(Figure(ID, f"cold start, {path} path, {link}", "s", [r.seconds for r in done], full,
                                  FULL, Target("<=", 0.1)))
            if link == "emulated":
                figures.append(Figure(ID, f"cold start against the ideal, {path} path, {link}", "s",
                                      [r.seconds for r in done], [ideal_seconds(r, net) for r in done],
                                      "ideal: fetched bytes / rate + RTT per request", Target("<=", 1.5)))
    ctx.record(ID, {"image": name, "command": " ".join(COMMANDS[name]), **facts})
    return figures
