"""B3: metadata: `find / -xdev` with a stat(1) of every entry, inside a container.

The B1 image (minbase + numpy, scipy, gcc; --quick: minbase + python3). crfs: the first
container after a lazy pull with a fresh worker over empty caches (the TOC index was
built at pull; no file data is needed), for both paths. Baseline: the same image as
gzip, pulled by podman and mounted by fuse-overlayfs over the unpacked layers, also the
first container after the pull. Timed inside the container, so start-up is not counted;
both sides must see the same number of entries.
"""
from __future__ import annotations

from bench.common import BenchContext, BenchError, Figure, Target
from bench.podman_env import RUN, BenchImage, Network, Podman, open_network, open_podman, prepared_image

ID = "B3"
TITLE = "metadata: find / -xdev + stat of every entry"
PATHS = ("store", "plugin")
LINK = "loopback"  # metadata comes from the index built at pull: the link does not matter
SCAN = ('s=$(date +%s%N); n=$(find / -xdev -exec stat --format=%i {} + | wc -l); e=$(date +%s%N); '
        'echo "$n $(( (e - s) / 1000 ))"')


def _scan(pod: Podman, root, ref: str) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """(entries, seconds) of one scan in a new container of `ref`."""
    _, line = pod.first_line(root, [*RUN, ref, "sh", "-c", SCAN])
    entries, micros = line.split()
    return int(entries), int(micros) / 1e6


def crfs_scan(pod: Podman, net: Network, image: BenchImage, path: str) -> tuple[int, float]:
    root = pod.fresh_root(f"b3-{path}", path)
    try:
        pod.cold_worker()
        ref = image.ref(net.netloc(LINK), "esgz")
        pod.run(root, ["pull", "--quiet", "--tls-verify=false", ref])
        return _scan(pod, root, ref)
    finally:
        pod.discard(root)


def native_scan(pod: Podman, net: Network, image: BenchImage) -> tuple[int, float]:
    root = pod.fresh_root("b3-native", "store")
    try:
        ref = image.ref(net.netloc(LINK), "gzip")
        pod.run(root, ["pull", "--quiet", "--tls-verify=false", ref])
        return _scan(pod, root, ref)
    finally:
        pod.discard(root)


def run(ctx: BenchContext) -> list[Figure]:
    net = ctx.shared("network", lambda: open_network(ctx))
    name = "small" if ctx.quick else "numpy"
    image = ctx.shared(f"image-{name}", lambda: prepared_image(ctx, net, name))
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    scans: dict[str, list[tuple[int, float]]] = {path: [] for path in PATHS}
    native: list[tuple[int, float]] = []
    for rep in range(ctx.reps):  # interleaved, so that a change in load hits every side
        ctx.log(f"B3 repetition {rep + 1}/{ctx.reps}")
        for path in PATHS:
            scans[path].append(crfs_scan(pod, net, image, path))
        native.append(native_scan(pod, net, image))
    counts = {side: sorted({n for n, _ in results}) for side, results in (*scans.items(), ("native", native))}
    ctx.record(ID, {"image": name, "entries": counts})
    if len({tuple(c) for c in counts.values()}) != 1:
        raise BenchError(f"the containers saw different trees: entries {counts}")
    return [Figure(ID, f"find + stat of {native[0][0]} entries, {path} path", "s", [s for _, s in scans[path]],
                   [s for _, s in native], "fuse-overlayfs over the unpacked image", Target("<=", 1.5))
            for path in PATHS]
