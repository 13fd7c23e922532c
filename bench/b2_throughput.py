"""B2: read throughput of a 256 MiB file inside a container.

The image: minbase + python3, and a layer holding /data/big.bin (256 MiB of
pseudo-random, incompressible bytes) (bench/images.py). A container reads the file with
1 MiB read()s and reports bytes and seconds (timed inside: container start-up is not
part of a throughput).

- cold: the first read, just after a lazy pull with a fresh worker over empty caches,
  for both crfs paths (store, plugin), on loopback and on the emulated link; against
  `curl` of the file's eStargz layer blob over the same link.
- warm: a second container reading the same file (the worker holds its chunks, and once
  `crfs stats` shows no local copy being written: the worker's steady state); against
  the same file in the gzip image pulled by podman, read through fuse-overlayfs over the
  unpacked layers, also in a second container (page cache warm for both).

For diagnosis, beside the cold loopback rows: the verify floor, i.e. what inflating and
SHA-256-hashing the blob alone reaches, in memory on one core, with the same C libraries
the worker calls (zlib, OpenSSL through hashlib), against the same curl. No reader that
checks what it serves can beat it by more than the cores it spreads that work over, so it
bounds the cold loopback ratio from above.
"""
from __future__ import annotations

import hashlib
import subprocess
import time
import zlib

import httpx

from bench.common import BenchContext, BenchError, Figure, Target, mb
from bench.images import IMAGES
from bench.podman_env import LINKS, RUN, BenchImage, Network, Podman, open_network, open_podman, prepared_image
from tests.support.podman import PodmanRoot

ID = "B2"
TITLE = "read throughput of a 256 MiB file"
PATHS = ("store", "plugin")
READ = f"""
import time
started, total = time.monotonic(), 0
with open({IMAGES["bigfile"].big_file!r}, "rb", buffering=0) as f:
    while piece := f.read(1 << 20):
        total += len(piece)
print(total, time.monotonic() - started)
"""


def _read_rate(pod: Podman, root: PodmanRoot, ref: str) -> float:
    """MB/s of one whole read of the big file in a new container of `ref`."""
    _, line = pod.first_line(root, [*RUN, ref, "python3", "-c", READ])
    total, seconds = line.split()
    if int(total) != IMAGES["bigfile"].big_file_bytes:
        raise BenchError(f"read {total} bytes of {IMAGES['bigfile'].big_file}, expected "
                         f"{IMAGES['bigfile'].big_file_bytes}")
    return mb(int(total)) / float(seconds)


def crfs_reads(pod: Podman, net: Network, image: BenchImage, link: str, path: str) -> tuple[float, float]:
    """(cold, warm) MB/s: the first read after a lazy pull, then a second container's."""
    root = pod.crfs_root(f"b2-{path}-{link}", path)
    try:
        pod.cold_worker()
        ref = image.ref(net.netloc(link), "esgz")
        cold = _read_rate(pod, root, ref)
        pod.settle()  # warm = the worker's steady state: a local copy it writes is done
        return cold, _read_rate(pod, root, ref)
    finally:
        pod.discard(root)


def native_warm_read(pod: Podman, net: Network, image: BenchImage) -> float:
    root = pod.fresh_root("b2-native", "store")
    try:
        ref = image.ref(net.netloc("loopback"), "gzip")
        _read_rate(pod, root, ref)  # pulls, unpacks, and warms the page cache
        return _read_rate(pod, root, ref)
    finally:
        pod.discard(root)


def curl_rate(net: Network, image: BenchImage, link: str) -> float:
    digest, size = max(image.esgz_layers, key=lambda layer: layer[1])
    url = f"http://{net.netloc(link)}/v2/{image.repository}/blobs/{digest}"
    done = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise BenchError(f"curl {url} failed: {done.stderr.strip()}")
    got, seconds = done.stdout.split()
    if int(got) != size:
        raise BenchError(f"curl {url} fetched {got} bytes, the blob has {size}")
    return mb(size) / float(seconds)


def fetch_blob(net: Network, image: BenchImage) -> bytes:
    """The big file's eStargz layer blob, whole, over loopback (untimed)."""
    digest, size = max(image.esgz_layers, key=lambda layer: layer[1])
    url = f"http://{net.netloc('loopback')}/v2/{image.repository}/blobs/{digest}"
    response = httpx.get(url, follow_redirects=True, timeout=600)
    if response.status_code != 200 or len(response.content) != size:
        raise BenchError(f"GET {url}: status {response.status_code}, {len(response.content)} of {size} bytes")
    return response.content


def inflate_and_hash(blob: bytes, piece: int = 1 << 20) -> bytes:
    """The SHA-256 of what every gzip member of `blob` inflates to, with the blob fed in
    `piece`-sized reads as a network stream arrives."""
    view, digest = memoryview(blob), hashlib.sha256()
    inflate = zlib.decompressobj(31)
    for at in range(0, len(view), piece):
        data = bytes(view[at:at + piece])
        while data:
            digest.update(inflate.decompress(data))
            if not inflate.eof:
                break
            data, inflate = inflate.unused_data, zlib.decompressobj(31)
    return digest.digest()


def verify_floor(blob: bytes) -> float:
    """MB/s (of the blob) of `inflate_and_hash`."""
    started = time.monotonic()
    inflate_and_hash(blob)
    return mb(len(blob)) / (time.monotonic() - started)


def run(ctx: BenchContext) -> list[Figure]:
    net = ctx.shared("network", lambda: open_network(ctx))
    image = ctx.shared("image-bigfile", lambda: prepared_image(ctx, net, "bigfile"))
    pod = ctx.shared("podman", lambda: open_podman(ctx))
    figures: list[Figure] = []
    warm: dict[str, list[float]] = {path: [] for path in PATHS}
    native: list[float] = []
    floor: list[float] = []
    loopback_curl: list[float] = []
    blob = fetch_blob(net, image)
    for link in LINKS:
        cold: dict[str, list[float]] = {path: [] for path in PATHS}
        curl: list[float] = []
        for rep in range(ctx.reps):  # interleaved, so that a change in load hits every side
            ctx.log(f"B2 {link} repetition {rep + 1}/{ctx.reps}")
            for path in PATHS:
                first, second = crfs_reads(pod, net, image, link, path)
                cold[path].append(first)
                if link == "loopback":
                    warm[path].append(second)
            curl.append(curl_rate(net, image, link))
            if link == "loopback":
                native.append(native_warm_read(pod, net, image))
                floor.append(verify_floor(blob))
        for path in PATHS:
            figures.append(Figure(ID, f"cold read, {path} path, {link}", "MB/s", cold[path], curl,
                                  f"curl of the layer blob, {link}", Target(">=", 0.7)))
        if link == "loopback":
            loopback_curl = curl
    figures.append(Figure(ID, "verify floor: inflate + SHA-256 of the blob in memory, one core", "MB/s", floor,
                          loopback_curl, "curl of the layer blob, loopback",
                          notes="for diagnosis: bounds the cold loopback ratio (no network, no store, no FUSE)"))
    for path in PATHS:
        figures.append(Figure(ID, f"warm read, {path} path", "MB/s", warm[path], native,
                              "fuse-overlayfs over the unpacked image", Target(">=", 0.9)))
    return figures
