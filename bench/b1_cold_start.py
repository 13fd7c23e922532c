"""B1: cold start: time until the first output line of
`podman run IMAGE python3 -c 'import numpy; print(numpy.__version__)'`.

crfs: the eStargz image converted by `crfs convert` ("esgz"), and the same image laid out
by `crfs optimize` for the command ("optimised image": the files it opens come first and
are prefetched in one range at mount), each pulled through the additional layer store
and run lazily, with an empty podman storage and a fresh worker over empty caches: once
with podman's plain fuse-overlayfs reading the store ("store path") and once with crfs's
mount program reading store layers through crfs.so ("plugin path"), both with the
overlay.mountopt of the storage.conf crfs ships (fast_ino=1). These workers fetch
only what is read (`--no-background-fetch`); one more row runs the plugin path with the
worker's default, the background fetch of the whole layer on, as a user gets it.
Baseline: `podman run` (pull and run) of the same image as gzip into an empty storage.
Both on loopback and on the emulated link (bench/netlink.py: tbf rate in a network
namespace, a delaying relay for the round trip).

The ideal, on the emulated link: what the crfs run fetched (compressed bytes, from the
registry's access log) at the measured link rate, plus one round trip per dependent fetch:
podman's own requests (manifest, config), and the worker's rounds, i.e. its requests that
began while none of its others was in flight (read-ahead and parallel fetches that overlap
one in flight add no round trip).
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.common import BenchContext, BenchError, Figure, Target
from bench.podman_env import LINKS, RUN, BenchImage, Counters, Network, Podman, open_network, open_podman, \
    optimized_image, prepared_image

ID = "B1"
TITLE = "cold start: podman run to first output line"
FULL = "podman pull + run, gzip"
COMMANDS = {
    "numpy": ("python3", "-c", "import numpy; print(numpy.__version__)"),
    "small": ("python3", "-c", "import json, sys; print(sys.version.split()[0])"),
}


@dataclass(frozen=True)
class Variant:
    path: str    # "store" or "plugin"
    tag: str     # "esgz": converted by `crfs convert`; "opt": by `crfs optimize` for the command
    background: bool = False  # the worker's background fetch (its default) on

    @property
    def label(self) -> str:
        return (f"{self.path} path" + (", optimised image" if self.tag == "opt" else "")
                + (", background fetch on (the worker's default)" if self.background else ""))

    @property
    def key(self) -> str:
        return f"{self.path}/{self.tag}" + ("/background" if self.background else "")


# The background rows show what a user with the default worker gets; the others measure
# the lazy path alone (what is fetched is what the container read), hence the ideal.
VARIANTS = (*(Variant(path, tag) for tag in ("esgz", "opt") for path in ("store", "plugin")),
            Variant("plugin", "esgz", background=True))


@dataclass(frozen=True)
class ColdRun:
    seconds: float
    output: str
    fetched_bytes: int      # blob bytes in the registry's access log during the run
    requests: int           # every request in it
    worker: Counters


def crfs_cold_start(pod: Podman, net: Network, image: BenchImage, link: str, variant: Variant) -> ColdRun:
    background = "-bg" if variant.background else ""
    root = pod.crfs_root(f"b1-{variant.path}-{variant.tag}{background}-{link[:4]}", variant.path)  # runroot <= 50 chars
    try:
        pod.cold_worker(background=variant.background)
        registry = net.registry(link)
        mark = registry.mark()
        seconds, line = pod.first_line(root, [*RUN, image.ref(net.netloc(link), variant.tag), *COMMANDS[image.name]])
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


def dependent_round_trips(run: ColdRun) -> int:
    """podman's own requests (manifest, config: one after the other) and the worker's
    rounds: its requests that began while none of its others was in flight."""
    return run.requests - run.worker.requests + run.worker.rounds


def ideal_seconds(run: ColdRun, net: Network) -> float:
    return run.fetched_bytes * 8 / (net.check.rate_mbit * 1e6) + dependent_round_trips(run) * net.check.rtt_ms / 1000


def run(ctx: BenchContext) -> list[Figure]:
    net = ctx.shared("network", lambda: open_network(ctx))
    name = "small" if ctx.quick else "numpy"
    image = ctx.shared(f"image-{name}", lambda: prepared_image(ctx, net, name))
    opt_layers = ctx.shared(f"image-{name}-opt", lambda: optimized_image(ctx, net, image, COMMANDS[name]))
    sizes = {"esgz": image.esgz_bytes, "opt": sum(size for _, size in opt_layers)}
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    figures: list[Figure] = []
    facts: dict[str, object] = {}
    for link in LINKS:
        runs: dict[Variant, list[ColdRun]] = {variant: [] for variant in VARIANTS}
        full: list[float] = []
        local: list[float] = []
        for rep in range(ctx.reps):  # interleaved, so that a change in load hits every side
            ctx.log(f"B1 {link} repetition {rep + 1}/{ctx.reps}")
            for variant in runs:
                runs[variant].append(crfs_cold_start(pod, net, image, link, variant))
            pulled, again, expected = full_pull_start(pod, net, image, link)
            full.append(pulled)
            local.append(again)
            wrong = {r.output for variant_runs in runs.values() for r in variant_runs} - {expected}
            if wrong:
                raise BenchError(f"crfs containers printed {sorted(wrong)}, the gzip image {expected!r}")
        facts[f"{link}/local image run (podman + runc floor)"] = [round(s, 3) for s in local]
        for variant, done in runs.items():
            facts[f"{link}/{variant.key}"] = {
                "outputs": sorted({r.output for r in done}), "fetched_bytes": [r.fetched_bytes for r in done],
                "requests": [r.requests for r in done],
                "worker_fetched": [r.worker.fetched for r in done],
                "worker_requests": [r.worker.requests for r in done],
                "worker_rounds": [r.worker.rounds for r in done],
                "share_of_image": round(max(r.fetched_bytes for r in done) / sizes[variant.tag], 4)}
            figures.append(Figure(ID, f"cold start, {variant.label}, {link}", "s", [r.seconds for r in done],
                                  full, FULL, Target("<=", 0.1)))
            if link == "emulated" and not variant.background:
                figures.append(Figure(ID, f"cold start against the ideal, {variant.label}, {link}", "s",
                                      [r.seconds for r in done], [ideal_seconds(r, net) for r in done],
                                      "ideal: fetched bytes / rate + RTT per dependent fetch", Target("<=", 1.5)))
    ctx.record(ID, {"image": name, "command": " ".join(COMMANDS[name]), **facts})
    return figures
