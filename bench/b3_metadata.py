"""B3: metadata: `find / -xdev` with a stat(1) of every entry, inside a container.

The B1 image (minbase + numpy, scipy, gcc; --quick: minbase + python3). crfs: the first
container after a lazy pull with a fresh worker over empty caches (the TOC index was
built at pull; no file data is needed), for both paths. Baseline: the same image as
gzip, pulled by podman and mounted by fuse-overlayfs over the unpacked layers, also the
first container after the pull. Timed inside the container, so start-up is not counted;
both sides must see the same number of entries. A second container's scan on each side
is reported too: it tells a cold-cache cost from a per-operation one.
crfs's mount program (plugin path) always adds fuse-overlayfs's `fast_ino=1`; podman's
default does not. So the baseline and the store path are also measured with
`overlay.mountopt=fast_ino=1`, and the plugin path is compared with both baselines.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.common import BenchContext, BenchError, Figure, Target
from bench.podman_env import RUN, BenchImage, Network, Podman, open_network, open_podman, prepared_image, \
    storage_conf_mountopt
from tests.support.podman import PodmanRoot

ID = "B3"
TITLE = "metadata: find / -xdev + stat of every entry"
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


@dataclass(frozen=True)
class Side:
    """One way of mounting the image: crfs through a path, or podman's own gzip pull."""

    label: str
    path: str        # mount program: "store" (plain fuse-overlayfs) or "plugin" (crfs's wrapper)
    tag: str         # "esgz" (lazy, crfs) or "gzip" (pulled whole, the baseline)
    mountopt: str = ""

    @property
    def lazy(self) -> bool:
        return self.tag == "esgz"


FAST_INO = storage_conf_mountopt()
# crfs's mount program always adds fast_ino=1 (crfs inode numbers cannot collide, see
# docs/PERFORMANCE-NOTES.md), and crfs's storage.conf sets it; podman's default does not. The baseline is
# measured both ways, so that no ratio owes anything to the option alone.
SIDES = (
    Side("store path", "store", "esgz"),
    Side("plugin path", "plugin", "esgz"),
    Side("store path, fast_ino=1 mountopt", "store", "esgz", FAST_INO),
    Side("native", "store", "gzip"),
    Side("native, fast_ino=1 mountopt", "store", "gzip", FAST_INO),
)
# (crfs side, baseline side): the rows of the table.
ROWS = (
    ("store path", "native"),
    ("plugin path", "native"),
    ("plugin path", "native, fast_ino=1 mountopt"),
    ("store path, fast_ino=1 mountopt", "native, fast_ino=1 mountopt"),
)


def side_scans(pod: Podman, net: Network, image: BenchImage, side: Side) -> Scans:
    root = pod.fresh_root(f"b3-{side.path}-{side.tag}{'-f' if side.mountopt else ''}", side.path, side.mountopt)
    try:
        if side.lazy:
            pod.cold_worker()
        return _pull_and_scan(pod, root, image.ref(net.netloc(LINK), side.tag))
    finally:
        pod.discard(root)


def _baseline_name(side: Side) -> str:
    return "fuse-overlayfs over the unpacked image" + (f", {side.mountopt}" if side.mountopt else "")


def run(ctx: BenchContext) -> list[Figure]:
    net = ctx.shared("network", lambda: open_network(ctx))
    name = "small" if ctx.quick else "numpy"
    image = ctx.shared(f"image-{name}", lambda: prepared_image(ctx, net, name))
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    scans: dict[str, list[Scans]] = {side.label: [] for side in SIDES}
    for rep in range(ctx.reps):  # interleaved, so that a change in load hits every side
        ctx.log(f"B3 repetition {rep + 1}/{ctx.reps}")
        for side in SIDES:
            scans[side.label].append(side_scans(pod, net, image, side))
    counts = {label: sorted({s.entries for s in results}) for label, results in scans.items()}
    ctx.record(ID, {"image": name, "entries": counts})
    if len({tuple(c) for c in counts.values()}) != 1:
        raise BenchError(f"the containers saw different trees: entries {counts}")
    entries = scans["native"][0].entries
    by_label = {side.label: side for side in SIDES}
    figures = []
    for crfs, base in ROWS:
        against = f" (baseline {base})" if base != "native" else ""
        figures.append(Figure(ID, f"find + stat of {entries} entries, {crfs}{against}", "s",
                              [s.first for s in scans[crfs]], [s.first for s in scans[base]],
                              _baseline_name(by_label[base]), Target("<=", 1.5)))
    for crfs in ("store path", "plugin path"):
        figures.append(Figure(ID, f"the same, second container, {crfs}", "s",
                              [s.second for s in scans[crfs]], [s.second for s in scans["native"]],
                              _baseline_name(by_label["native"]), notes="for diagnosis: caches warm on both sides"))
    return figures
