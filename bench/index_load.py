"""Benchmark: first index build and cached open of a layer with a 1,000,000-entry TOC.

Generates (once, cached in --work) an eStargz blob whose TOC is realistic: ~100k
directories, regular files (some multi-chunk, all with chunkDigest), symlinks,
hardlinks, xattrs, tab-indented like stargz-snapshotter's json.MarshalIndent. The
payload is a sparse hole (the index never reads file data). Then, each in a fresh
subprocess so that ru_maxrss is the measured step's own peak:

  1. first open: footer -> TOC stream -> digest check -> SQLite index build (for a TOC
     this size the index rows are built and inserted by a builder process beside the
     parse: its CPU and peak RSS are reported too, and the RSS target is for both)
  2. cached open: footer -> existing index
  3. a few lookups on the cached index

and prints a table against the targets (<= 10 s, <= 1 s, <= 250 MB RSS).

    .venv/bin/python bench/index_load.py [--entries 1000000] [--work DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from crfs_worker.footer import estargz_footer  # noqa: E402

TARGET_BUILD_S = 10.0
TARGET_CACHED_S = 1.0
TARGET_RSS_MB = 250.0

_WORDS = ("lib", "share", "python3", "site-packages", "include", "bin", "etc", "local",
          "doc", "man", "locale", "x86_64-linux-gnu", "perl5", "node_modules", "src",
          "test", "data", "config", "module", "util", "core", "api", "plugins", "vendor")


def _name(rng: random.Random) -> str:
    w = rng.choice(_WORDS)
    return f"{w}{rng.randrange(100000):x}" if rng.random() < 0.7 else f"{w}_{rng.randrange(1000)}.py"


def _dirname(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.randrange(1 << 20):x}"  # files never have a "-"


def generate_toc(path: Path, entries: int, seed: int = 1) -> tuple[int, int]:
    """Write TOC JSON for `entries` entries to `path`; return (json size, payload end)."""
    rng = random.Random(seed)
    ndirs = entries // 10
    dirs = [""]
    offset = 4096
    digest = hashlib.sha256(b"x").hexdigest()
    times = ["2023-0%d-1%dT12:34:5%dZ" % (m, d, s) for m in range(1, 4) for d in range(3) for s in range(3)]
    files: list[str] = []
    written = 0
    with open(path, "w", buffering=1 << 20) as f:
        f.write('{\n\t"version": 1,\n\t"entries": [\n')
        first = True
        count = 0

        def emit(body: str) -> None:
            nonlocal first, count
            f.write(("\t\t{\n" if first else ",\n\t\t{\n") + body + "\n\t\t}")
            first = False
            count += 1

        while count < entries:
            r = rng.random()
            t = rng.choice(times)
            if len(dirs) < ndirs and (r < 0.1 or len(dirs) < 50):
                parent = rng.choice(dirs[-200:]) if rng.random() < 0.8 else rng.choice(dirs)
                if parent.count("/") >= 6:  # real trees are rarely deeper than ~8
                    parent = rng.choice(dirs[:1000])
                name = (parent + "/" if parent else "") + _dirname(rng)
                dirs.append(name)
                emit(f'\t\t\t"name": "{name}/",\n\t\t\t"type": "dir",\n\t\t\t"modtime": "{t}",\n'
                     f'\t\t\t"mode": 16877,\n\t\t\t"NumLink": 0')
                continue
            parent = rng.choice(dirs[-300:]) if rng.random() < 0.9 else rng.choice(dirs)
            name = (parent + "/" if parent else "") + _name(rng)
            if r < 0.88:
                size = rng.choice((0, rng.randrange(1, 4096), rng.randrange(4096, 200000)))
                if rng.random() < 0.005:
                    size = rng.randrange(5 << 20, 20 << 20)
                xattr = ''
                if rng.random() < 0.01:
                    xattr = ',\n\t\t\t"xattrs": {\n\t\t\t\t"security.capability": "AQAAAgAgAAAAAAAAAAAAAAAAAAA="\n\t\t\t}'
                if size == 0:
                    emit(f'\t\t\t"name": "{name}",\n\t\t\t"type": "reg",\n\t\t\t"modtime": "{t}",\n'
                         f'\t\t\t"mode": 33188,\n\t\t\t"NumLink": 0{xattr}')
                else:
                    chunk = 4 << 20
                    emit(f'\t\t\t"name": "{name}",\n\t\t\t"type": "reg",\n\t\t\t"size": {size},\n'
                         f'\t\t\t"modtime": "{t}",\n\t\t\t"mode": 33188,\n\t\t\t"offset": {offset},\n'
                         f'\t\t\t"NumLink": 0{xattr},\n\t\t\t"digest": "sha256:{digest}",\n'
                         + (f'\t\t\t"chunkSize": {chunk},\n' if size > chunk else '')
                         + f'\t\t\t"chunkDigest": "sha256:{digest}"')
                    offset += max(64, size // 64)  # the index never reads data: keep the sparse payload small
                    coff = chunk
                    while coff < size and count < entries:
                        csize = min(chunk, size - coff)
                        emit(f'\t\t\t"name": "{name}",\n\t\t\t"type": "chunk",\n\t\t\t"offset": {offset},\n'
                             f'\t\t\t"chunkOffset": {coff},\n\t\t\t"chunkSize": {csize},\n'
                             f'\t\t\t"chunkDigest": "sha256:{digest}"')
                        offset += max(64, csize // 64)
                        coff += csize
                    if size <= 200000:
                        files.append(name)
            elif r < 0.995 or not files:
                target = "../" * rng.randrange(3) + _name(rng)
                emit(f'\t\t\t"name": "{name}",\n\t\t\t"type": "symlink",\n\t\t\t"modtime": "{t}",\n'
                     f'\t\t\t"linkName": "{target}",\n\t\t\t"mode": 41471,\n\t\t\t"NumLink": 0')
            else:
                target = rng.choice(files[-5000:])
                emit(f'\t\t\t"name": "{name}",\n\t\t\t"type": "hardlink",\n\t\t\t"modtime": "{t}",\n'
                     f'\t\t\t"linkName": "{target}",\n\t\t\t"mode": 33188,\n\t\t\t"NumLink": 0')
        f.write("\n\t]\n}")
        written = f.tell()
    return written, offset + 4096


def _tar_header(name: str, size: int) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def generate_blob(work: Path, entries: int) -> tuple[Path, str]:
    """The eStargz blob (sparse payload) and its TOC digest, cached in `work`."""
    blob = work / f"estargz-{entries}.blob"
    meta = work / f"estargz-{entries}.json"
    if blob.exists() and meta.exists():
        return blob, json.loads(meta.read_text())["toc_digest"]
    toc_json = work / f"toc-{entries}.json"
    t0 = time.monotonic()
    size, payload_end = generate_toc(toc_json, entries)
    h = hashlib.sha256()
    with open(toc_json, "rb") as src, open(blob, "wb") as out:
        out.truncate(payload_end)
        out.seek(payload_end)
        gz = zlib.compressobj(6, zlib.DEFLATED, 31)
        out.write(gz.compress(_tar_header("stargz.index.json", size)))
        while True:
            piece = src.read(1 << 20)
            if not piece:
                break
            h.update(piece)
            out.write(gz.compress(piece))
        out.write(gz.compress(b"\0" * ((-size) % 512) + b"\0" * 1024))
        out.write(gz.flush())
        out.write(estargz_footer(payload_end))
    toc_json.unlink()
    digest = "sha256:" + h.hexdigest()
    meta.write_text(json.dumps({"toc_digest": digest, "toc_json_bytes": size}))
    print(f"generated {blob} ({size / 1e6:.0f} MB TOC JSON, {blob.stat().st_blocks * 512 / 1e6:.0f} MB "
          f"on disk) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return blob, digest


_CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
sys.path.insert(0, {root!r})
from crfs_worker.blob import LocalBlob
from crfs_worker.layer import Layer, LayerSource


def hwm(pid):
    # VmHWM: peak RSS of the process's own memory (ru_maxrss would carry over across exec)
    try:
        for line in open(f"/proc/{{pid}}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


kids = {{}}
done = threading.Event()


def watch():
    me = str(os.getpid())
    while not done.is_set():
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = open(f"/proc/{{d}}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if stat[1] == me:
                    kids[d] = max(kids.get(d, 0.0), hwm(d))
        time.sleep(0.05)


w = threading.Thread(target=watch, daemon=True)
w.start()
t0 = time.monotonic()
c0 = time.process_time()
layer = Layer.open(LayerSource(LocalBlob(Path({blob!r})), {digest!r}, {{}}), Path({index!r}))
t_open = time.monotonic() - t0
cpu_open = time.process_time() - c0
done.set()
w.join()
names = [p for p, _ in zip((p for p, _ in layer.walk()), range({lookups}))]
t2 = time.monotonic()
for p in names:
    layer.stat(p)
t_lookup = (time.monotonic() - t2) / max(1, len(names))
import resource
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({{"open_s": t_open, "lookup_us": t_lookup * 1e6, "cpu_open_s": cpu_open,
                  "writer_rss_mb": max(kids.values(), default=0.0), "writer_cpu_s": ru.ru_utime + ru.ru_stime,
                  "rss_mb": hwm("self"), "entries": layer.index.meta.get("entries")}}))
"""


def run_child(blob: Path, digest: str, index: Path, lookups: int) -> dict:
    code = _CHILD.format(root=str(HERE.parent), blob=str(blob), digest=digest, index=str(index),
                         lookups=lookups)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"benchmark child failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "crfs-bench")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    blob, digest = generate_blob(args.work, args.entries)
    index = args.work / "index"
    if index.exists():
        for p in index.iterdir():
            p.unlink()
    load_before = os.getloadavg()
    first = run_child(blob, digest, index, 1000)
    cached = run_child(blob, digest, index, 1000)
    idx_files = list(index.glob("*.sqlite"))
    idx_mb = sum(p.stat().st_size for p in idx_files) / 1e6
    toc_mb = json.loads((args.work / f"estargz-{args.entries}.json").read_text())["toc_json_bytes"] / 1e6
    rows = [
        ("first open (build index)", f"{first['open_s']:.2f} s", f"<= {TARGET_BUILD_S:.0f} s",
         first["open_s"] <= TARGET_BUILD_S),
        ("first open CPU, main", f"{first['cpu_open_s']:.2f} s", "-", True),
        ("first open CPU, builder proc", f"{first['writer_cpu_s']:.2f} s", "-", True),
        ("builder process peak RSS", f"{first['writer_rss_mb']:.0f} MB", "-", True),
        ("first open peak RSS, main", f"{first['rss_mb']:.0f} MB", "-", True),
        ("first open peak RSS, both", f"{first['rss_mb'] + first['writer_rss_mb']:.0f} MB",
         f"<= {TARGET_RSS_MB:.0f} MB", first["rss_mb"] + first["writer_rss_mb"] <= TARGET_RSS_MB),
        ("cached open", f"{cached['open_s'] * 1000:.1f} ms", f"<= {TARGET_CACHED_S * 1000:.0f} ms",
         cached["open_s"] <= TARGET_CACHED_S),
        ("cached open peak RSS", f"{cached['rss_mb']:.0f} MB", f"<= {TARGET_RSS_MB:.0f} MB",
         cached["rss_mb"] <= TARGET_RSS_MB),
        ("stat() by path, cached", f"{cached['lookup_us']:.0f} us", "-", True),
    ]
    load = os.getloadavg()
    print(f"entries: {first['entries']}, TOC JSON: {toc_mb:.0f} MB, index: {idx_mb:.0f} MB, "
          f"blob: {blob}")
    print(f"load average before/after: {load_before[0]:.2f} / {load[0]:.2f} on {os.cpu_count()} CPUs "
          f"(other processes' load inflates wall times)")
    print(f"{'measure':28} {'result':>12} {'target':>12}  ok")
    for name, result, target, ok in rows:
        print(f"{name:28} {result:>12} {target:>12}  {'yes' if ok else 'NO'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
