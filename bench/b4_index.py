"""B4: a layer of 1,000,000 entries: index load time (first and cached) and memory.

crfs: `Layer.open` of a generated eStargz blob whose TOC has 1M entries (bench/index_load.py:
realistic names, chunks, links, xattrs; sparse payload), each in a fresh process:
first open (footer, TOC stream, digest check, SQLite index build, with its builder
process) and cached open (footer, existing index).
Baseline, the naive reader, in the same run: read the footer, gunzip the TOC member and
`json.loads` it, also in a fresh process. A naive reader has no cache, so it is the
baseline for the cached open too. Memory is peak RSS (VmHWM; for the first open the main
process plus the index builder).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import index_load
from bench.common import BenchContext, BenchError, Figure, Target, mb

ID = "B4"
TITLE = "1M-entry layer: index load and memory"
ENTRIES = 1_000_000
QUICK_ENTRIES = 100_000
NAIVE = "naive reader: gunzip + json.loads of the TOC"

_NAIVE_CHILD = r"""
import json, sys, time, zlib
sys.path.insert(0, {root!r})
from crfs_worker.blob import LocalBlob
from crfs_worker.footer import read_footer

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

started = time.monotonic()
with LocalBlob(__import__("pathlib").Path({blob!r})) as blob:
    footer = read_footer(blob)
    member = blob.read_range(footer.toc_offset, blob.size - footer.toc_offset)
tar = zlib.decompressobj(31).decompress(member)
size = int(tar[124:136].rstrip(b"\0 ") or b"0", 8)
toc = json.loads(tar[512:512 + size])
seconds = time.monotonic() - started
print(json.dumps({{"seconds": seconds, "rss": hwm(), "entries": len(toc["entries"])}}))
"""


def _naive_load(blob: Path) -> dict:
    code = _NAIVE_CHILD.format(root=str(index_load.HERE.parent), blob=str(blob))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"naive TOC load of {blob} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _crfs_open(blob: Path, digest: str, index: Path, first: bool) -> dict:
    if first:
        shutil.rmtree(index, ignore_errors=True)
    index.mkdir(parents=True, exist_ok=True)
    try:
        return index_load.run_child(blob, digest, index, 1000)
    except SystemExit as exc:  # run_child's way of saying the child failed
        raise BenchError(f"crfs open of {blob}: {exc}") from None


def run(ctx: BenchContext) -> list[Figure]:
    entries = QUICK_ENTRIES if ctx.quick else ENTRIES
    work = ctx.work / "b4"
    work.mkdir(parents=True, exist_ok=True)
    blob, digest = index_load.generate_blob(work, entries)
    index = work / "index"
    results: dict[str, list[dict]] = {"first": [], "cached": [], "naive": []}
    for rep in range(ctx.reps):  # interleaved, so that a change in load hits both sides
        ctx.log(f"B4 repetition {rep + 1}/{ctx.reps}")
        results["first"].append(_crfs_open(blob, digest, index, first=True))
        results["cached"].append(_crfs_open(blob, digest, index, first=False))
        results["naive"].append(_naive_load(blob))
    loaded = {r["entries"] for r in results["naive"]}
    if loaded != {entries}:
        raise BenchError(f"the naive reader found {loaded} entries, not {entries}")
    naive_s = [r["seconds"] for r in results["naive"]]
    naive_mib = [r["rss"] / 2**20 for r in results["naive"]]
    toc_mb = mb(json.loads((work / f"estargz-{entries}.json").read_text())["toc_json_bytes"])
    ctx.record("B4", {"entries": entries, "toc_json_mb": round(toc_mb, 1),
                      "index_mb": round(mb(sum(p.stat().st_size for p in index.glob("*.sqlite"))), 1),
                      "lookup_us_cached": [round(r["lookup_us"], 1) for r in results["cached"]],
                      "builder_cpu_s": [round(r["writer_cpu_s"], 2) for r in results["first"]],
                      "main_cpu_s": [round(r["cpu_open_s"], 2) for r in results["first"]]})
    label = f"{entries:,} entries ({toc_mb:.0f} MB TOC JSON)"
    return [
        Figure(ID, f"index load, first (build), {label}", "s", [r["open_s"] for r in results["first"]],
               naive_s, NAIVE, Target("<=", index_load.TARGET_BUILD_S, on="crfs")),
        Figure(ID, "index load, cached", "s", [r["open_s"] for r in results["cached"]], naive_s, NAIVE,
               Target("<=", index_load.TARGET_CACHED_S, on="crfs")),
        # index_load reports VmHWM in MiB, and states its target in the same unit.
        Figure(ID, "peak RSS, first load (worker + index builder)", "MiB",
               [r["rss_mb"] + r["writer_rss_mb"] for r in results["first"]],
               naive_mib, NAIVE, Target("<=", index_load.TARGET_RSS_MB, on="crfs")),
        Figure(ID, "peak RSS, cached load", "MiB", [r["rss_mb"] for r in results["cached"]],
               naive_mib, NAIVE, Target("<=", index_load.TARGET_RSS_MB, on="crfs")),
    ]
