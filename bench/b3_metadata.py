"""B3: metadata: `find / -xdev` with a stat(1) of every entry, inside a container.

The B1 image (minbase + numpy, scipy, gcc; --quick: minbase + python3). crfs: the first
container after a lazy pull with a fresh worker over empty caches (the TOC index was
built at pull; no file data is needed), for both paths. Baseline: the same image as
gzip, pulled by podman and mounted by fuse-overlayfs over the unpacked layers, also the
first container after the pull. Timed inside the container, so start-up is not counted;
both sides must see the same number of entries. A second container's scan on each side
is reported too: it tells a cold-cache cost from a per-operation one.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.common import BenchContext, BenchError, Figure, Target
from bench.podman_env import RUN, BenchImage, Network, Podman, open_network, open_podman, prepared_image
from tests.support.podman import PodmanRoot

ID = "B3"
TITLE = "metadata: find / -xdev + stat of every entry"
PATHS = ("store", "plugin")
LINK = "loopback"  # metadata comes from the index built at pull: the link does not matter
SCAN = ('s=$(date +%s%N); n=$(find / -xdev -exec stat --format=%i {} + | wc -l); e=$(date +%s%N); '
        'echo "$n $(( (e - s) / 1000 ))"')


def _scan(pod: Podman, root: PodmanRoot, ref: str) -> tuple[int, float]:
    """(entries, seconds) of one scan in a new container of `ref`."""
    _, line = pod.first_line(root, [*RUN, ref, "sh", "-c", SCAN])
    entries, micros = line.split()
    return int(entries), int(micros) / 1e6


@dataclass(frozen=True)
class Scans:
    entries: int
    first: float     # seconds, the first container after the pull
    second: float    # the next container


def _pull_and_scan(pod: Podman, root: PodmanRoot, ref: str) -> Scans:
    pod.run(root, ["pull", "--quiet", "--tls-verify=false", ref])
    entries, first = _scan(pod, root, ref)
    again, second = _scan(pod, root, ref)
    if again != entries:
        raise BenchError(f"{ref}: the second container saw {again} entries, the first {entries}")
    return Scans(entries, first, second)


def crfs_scans(pod: Podman, net: Network, image: BenchImage, path: str) -> Scans:
    root = pod.fresh_root(f"b3-{path}", path)
    try:
        pod.cold_worker()
        return _pull_and_scan(pod, root, image.ref(net.netloc(LINK), "esgz"))
    finally:
        pod.discard(root)


def native_scans(pod: Podman, net: Network, image: BenchImage) -> Scans:
    root = pod.fresh_root("b3-native", "store")
    try:
        return _pull_and_scan(pod, root, image.ref(net.netloc(LINK), "gzip"))
    finally:
        pod.discard(root)


def run(ctx: BenchContext) -> list[Figure]:
    net = ctx.shared("network", lambda: open_network(ctx))
    name = "small" if ctx.quick else "numpy"
    image = ctx.shared(f"image-{name}", lambda: prepared_image(ctx, net, name))
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    scans: dict[str, list[Scans]] = {path: [] for path in PATHS}
    native: list[Scans] = []
    for rep in range(ctx.reps):  # interleaved, so that a change in load hits every side
        ctx.log(f"B3 repetition {rep + 1}/{ctx.reps}")
        for path in PATHS:
            scans[path].append(crfs_scans(pod, net, image, path))
        native.append(native_scans(pod, net, image))
    counts = {side: sorted({s.entries for s in results}) for side, results in (*scans.items(), ("native", native))}
    ctx.record(ID, {"image": name, "entries": counts})
    if len({tuple(c) for c in counts.values()}) != 1:
        raise BenchError(f"the containers saw different trees: entries {counts}")
    baseline = "fuse-overlayfs over the unpacked image"
    figures = []
    for path in PATHS:
        figures.append(Figure(ID, f"find + stat of {native[0].entries} entries, {path} path", "s",
                              [s.first for s in scans[path]], [s.first for s in native], baseline,
                              Target("<=", 1.5)))
        figures.append(Figure(ID, f"the same, second container, {path} path", "s",
                              [s.second for s in scans[path]], [s.second for s in native], baseline,
                              notes="for diagnosis: caches warm on both sides"))
    return figures
