"""B5: `crfs convert` against Debian's `ctr-remote image convert --estargz --oci` of the
same image in the same run: time and size, and the eStargz size against the gzip layer.

The image: debootstrap minbase + python3-numpy, python3-scipy, gcc as one gzip layer
(bench/images.py, cached); --quick: minbase + python3. Both converters work locally:
crfs from an OCI layout to a fresh OCI layout (`crfs convert oci:SRC:gzip oci:DST:esgz`),
ctr-remote from a private containerd's content store to the same store (the image is
pulled into it from a loopback registry first, untimed). Both with their defaults:
crfs gzip level 6, ctr-remote level 9, 4 MiB chunks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

from bench.common import PYTHON, REPO, BenchContext, BenchError, Figure, Target, mb, timed
from bench.images import IMAGES, gzip_layout, push_layout, read_layout
from crfs_worker.oci_layout import OciLayout
from tests.support.containerd import PrivateContainerd
from tests.support.registry import LoggedRegistry

ID = "B5"
TITLE = "convert: crfs convert vs ctr-remote image convert --estargz --oci"
CTR = "ctr-remote --estargz --oci"


def _crfs_convert(layout: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run([str(PYTHON), "-m", "crfs_worker.cli", "convert", f"oci:{layout}:gzip", f"oci:{out}:esgz"],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CRFS_CACHE_DIR": str(out.parent / "crfs-cache")})
    if done.returncode != 0:
        raise BenchError(f"crfs convert failed: {done.stderr[-2000:]}")


def _crfs_sizes(out: Path) -> list[int]:
    layout = OciLayout(out)
    try:
        manifest = json.loads(layout.get_manifest("esgz").data)
    finally:
        layout.close()
    return [layer["size"] for layer in manifest["layers"]]


def _ctr_image_digest(ctd: PrivateContainerd, name: str) -> str:
    for line in ctd.ctr("image", "ls").splitlines()[1:]:
        words = line.split()
        if words and words[0] == name:
            return next(w for w in words if w.startswith("sha256:"))
    raise BenchError(f"ctr-remote image ls does not list {name}")


def _ctr_sizes(ctd: PrivateContainerd, name: str) -> list[int]:
    manifest = json.loads(ctd.ctr("content", "get", _ctr_image_digest(ctd, name)))
    if "manifests" in manifest:  # a single platform may come wrapped in an index
        manifest = json.loads(ctd.ctr("content", "get", manifest["manifests"][0]["digest"]))
    return [layer["size"] for layer in manifest["layers"]]


def run(ctx: BenchContext) -> list[Figure]:
    spec = IMAGES["small" if ctx.quick else "numpy"]
    layout = gzip_layout(spec)
    gzip_bytes = read_layout(layout).compressed_bytes
    work = ctx.work / "b5"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = None
    crfs_s: list[float] = []
    ctr_s: list[float] = []
    crfs_bytes: list[float] = []
    ctr_bytes: list[float] = []
    with LoggedRegistry.start(work / "registry", work / "registry" / "storage") as registry, \
            PrivateContainerd.start(work / "containerd") as ctd:
        source = f"{registry.host}/bench/{spec.name}:gzip"
        push_layout(layout, source)
        ctd.ctr("image", "pull", "--plain-http", source, timeout=1800)
        for rep in range(ctx.reps):  # interleaved, so that a change in load hits both sides
            ctx.log(f"B5 repetition {rep + 1}/{ctx.reps}")
            out = work / "crfs-out"
            crfs_s.append(timed(partial(_crfs_convert, layout, out)))
            crfs_bytes.append(sum(_crfs_sizes(out)))
            target = f"{registry.host}/bench/{spec.name}:ctr-esgz-{rep}"
            ctr_s.append(timed(partial(ctd.ctr, "image", "convert", "--estargz", "--oci", source, target,
                                       timeout=3600)))
            ctr_bytes.append(sum(_ctr_sizes(ctd, target)))
            ctd.ctr("image", "rm", "--sync", target)  # the next repetition must write its blobs again
    ctx.record("B5", {"image": spec.name, "packages": list(spec.packages), "gzip_bytes": gzip_bytes,
                      "crfs_esgz_bytes": crfs_bytes[-1], "ctr_remote_esgz_bytes": ctr_bytes[-1]})
    what = f"{spec.name} image ({mb(gzip_bytes):.0f} MB gzip)"
    return [
        Figure(ID, f"convert time, {what}", "s", crfs_s, ctr_s, CTR, Target("<=", 0.5)),
        Figure(ID, "eStargz size", "MB", [mb(b) for b in crfs_bytes], [mb(b) for b in ctr_bytes], CTR,
               Target("<=", 1.0)),
        Figure(ID, "eStargz size against the gzip layer", "MB", [mb(b) for b in crfs_bytes],
               [mb(gzip_bytes)] * len(crfs_bytes), "the gzip image (level 6)",
               notes="eStargz adds a TOC and a gzip member per file and chunk"),
    ]
