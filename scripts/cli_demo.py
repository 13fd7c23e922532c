"""A quick demo without podman: a local registry, an image converted to eStargz, files read lazily.

Starts Debian's docker-registry on a free loopback port, builds a two-layer image
(busybox-static, and this machine's Python standard library as bulk), converts it with
`crfs convert` straight into the registry, then reads single files with `crfs cat` and
prints what that cost in bytes fetched from the registry (counted by the registry's own
access log) against the image's compressed size.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
BULK_DIR = Path("/usr/lib/python3.11")
CRFS = [sys.executable, "-m", "crfs_worker.cli"]
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python scripts/cli_demo.py`
    sys.path.insert(0, str(REPO))

from tests.support.registry import LoggedRegistry  # noqa: E402 (after the path setup)


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    tar.addfile(info)


def busybox_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp"):
            _add_dir(tar, d)
        tar.add(BUSYBOX, "bin/busybox")
        for applet in ("sh", "ls", "cat", "echo"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "busybox", 1_700_000_000
            tar.addfile(link)
        motd = b"crfs main job: this file came lazily from the registry\n"
        info = tarfile.TarInfo("etc/motd")
        info.size, info.mode, info.mtime = len(motd), 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(motd))
    return out.getvalue()


def bulk_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "usr")
        _add_dir(tar, "usr/lib")
        tar.add(BULK_DIR, "usr/lib/python3.11",
                filter=lambda t: None if "__pycache__" in t.name or "site-packages" in t.name else t)
    return out.getvalue()


def write_oci_image(layout: Path, layers: list[bytes]) -> None:
    """A minimal OCI image layout with gzip layers, tagged `v1`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    descriptors = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    **put(gzip.compress(tar, 6, mtime=0))} for tar in layers]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers",
                         "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **put(json.dumps(config).encode())},
                "layers": descriptors}
    top = put(json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **top,
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))


def crfs(*args: str, env: dict[str, str]) -> bytes:
    result = subprocess.run([*CRFS, *args], env=env, stdout=subprocess.PIPE)
    if result.returncode != 0:
        raise SystemExit(f"crfs {' '.join(args)} failed (exit {result.returncode})")
    return result.stdout


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="crfs-main-job-") as tmp:
        work = Path(tmp)
        (work / "registry").mkdir()
        registry = LoggedRegistry.start(work / "registry")
        try:
            env = {**os.environ, "CRFS_CACHE_DIR": str(work / "cache")}
            print(f"registry: docker-registry on {registry.host}")
            layers = [busybox_layer(), bulk_layer()]
            write_oci_image(work / "oci", layers)
            ref = f"{registry.host}/demo:esgz"
            print(f"convert:  oci:{work / 'oci'}:v1 -> {ref}")
            crfs("convert", f"oci:{work / 'oci'}:v1", ref, env=env)
            listing = json.loads(crfs("inspect", "--json", ref, env=env))
            image_size = sum(_blob_size(registry, l["digest"]) for l in listing["layers"])
            entries = sum(len(l["entries"]) for l in listing["layers"])
            print(f"image:    {len(listing['layers'])} eStargz layers, {entries} entries, "
                  f"{image_size} bytes compressed")
            print(f"{'file':40} {'size':>9} {'fetched':>9} {'requests':>8} {'of image':>8}")
            for path, source in (("/etc/motd", None), ("/bin/busybox", BUSYBOX),
                                 ("/usr/lib/python3.11/os.py", BULK_DIR / "os.py")):
                mark = registry.mark()
                data = crfs("cat", ref, path, env=env)
                if source is not None and data != source.read_bytes():
                    raise SystemExit(f"{path}: bytes differ from {source}")
                counted = registry.fetched_since(mark)
                fetched, requests = counted.blob_bytes, counted.blob_requests
                print(f"{path:40} {len(data):>9} {fetched:>9} {requests:>8} "
                      f"{100 * fetched / image_size:>7.2f}%")
            print("every file read back byte-identical; each read fetched only its own chunks "
                  "(TOCs come from the local index cache after the first read)")
        finally:
            registry.stop()
    return 0


def _blob_size(registry: LoggedRegistry, digest: str) -> int:
    request = urllib.request.Request(f"http://{registry.host}/v2/demo/blobs/{digest}", method="HEAD")
    with urllib.request.urlopen(request) as response:
        return int(response.headers["Content-Length"])


if __name__ == "__main__":
    sys.exit(main())
