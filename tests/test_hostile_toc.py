"""Hostile TOCs: every trick a TOC could play is refused with a FormatError naming the
layer and the entry, or made harmless; nothing outside the layer is ever touched.

The TOCs here are vouched for by their digest (the blob's author is the attacker), so
only validation stands between them and the reader. Blobs are real layer files built in
memory (tests/blobgen.py) or, for the bombs, crafted byte by byte; the CLI runs as a real
subprocess under strace to show that no path outside the layer is ever looked at.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from crfs_worker.errors import FormatError, UnverifiableError, VerificationError
from crfs_worker.footer import estargz_footer, zstd_chunked_footer, zstd_skippable_frame
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.toc import TocLimits
from tests import blobgen
from tests.blobgen import MemBlob, Spec, dir_, hardlink, reg, symlink

REPO = Path(__file__).resolve().parent.parent
FORMATS = ["stargz", "estargz", "zstd:chunked", "zstdchunked-estargz"]
LAYER_PASSWD = b"root:x:0:0:the layer's own passwd:/root:/bin/sh\n"
MAX_RSS_MB = 150  # a bomb may cost a bounded buffer or two, never what it expands to
BIG = random.Random(7).randbytes(150_000)


def _base_specs() -> list[Spec]:
    return [dir_("etc"), reg("etc/passwd", LAYER_PASSWD), reg("big", BIG),
            reg("small", b"small file")]


def build(fmt: str, specs: list[Spec], hook: Callable[[dict], Any] | None = None) -> blobgen.Blob:
    kw: dict[str, Any] = {"toc_hook": hook}
    if fmt in ("stargz", "estargz"):
        kw["chunk_size"] = 64 << 10
    elif fmt == "zstd:chunked":
        kw["chunk_size"] = 32 << 10
    b = blobgen.BUILDERS[fmt](specs, **kw)
    if b.toc_digest is None:  # legacy stargz: verified through a digest the user gives
        b.toc_digest = "sha256:" + hashlib.sha256(b.toc_json).hexdigest()
    return b


def layer_name(fmt: str) -> str:
    return f"hostile-{fmt.replace(':', '-')}"


def open_layer(b: blobgen.Blob, index_dir: Path, limits: TocLimits | None = None) -> Layer:
    return Layer.open(LayerSource(MemBlob(b.data, layer_name(b.format)), b.toc_digest, b.annotations),
                      index_dir, limits=limits)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refuse(b: blobgen.Blob, tmp_path: Path, match: str, limits: TocLimits | None = None) -> str:
    """Opening `b` fails with a FormatError matching `match` that names the layer; the
    index directory stays empty and nothing else under tmp_path appears."""
    before = tree(tmp_path)
    index_dir = tmp_path / "index"
    with pytest.raises(FormatError, match=match) as caught:
        open_layer(b, index_dir, limits)
    message = str(caught.value)
    assert layer_name(b.format) in message
    assert not list(index_dir.iterdir()), "no index (or temporary file) may be left behind"
    assert tree(tmp_path) - before <= {"index"}
    return message


def add_entry(entry: dict) -> Callable[[dict], dict]:
    def hook(toc: dict) -> dict:
        toc["entries"].append(entry)
        return toc
    return hook


def patch_entry(name: str, **fields: Any) -> Callable[[dict], dict]:
    """Sets `fields` on the first TOC entry called `name` (None deletes a field)."""
    def hook(toc: dict) -> dict:
        entry = next(e for e in toc["entries"] if e["name"] == name)
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        return toc
    return hook


# ------------------------------------------------------------------ names

BAD_NAMES = {
    "dotdot": ("../evil", r"'\.\.' component"),
    "dotdot-deep": ("a/../../evil", r"'\.\.' component"),
    "dotdot-last": ("a/b/..", r"'\.\.' component"),
    "absolute": ("/etc/shadow", "absolute path"),
    "absolute-root": ("/", "absolute path"),
    "absolute-double": ("//etc/cron.d/x", "absolute path"),
    "nul": ("etc/pass\x00wd", "NUL byte"),
    "long-component": ("d/" + "x" * 256, "component over 255 bytes"),
    "long-path": ("/".join(["d" * 200] * 25), "longer than 4096 bytes"),
    "lone-surrogate": ("bad\ud800name", "not valid UTF-8"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_names_are_refused_naming_layer_and_entry(fmt: str, case: str, tmp_path: Path) -> None:
    name, complaint = BAD_NAMES[case]
    b = build(fmt, _base_specs(), add_entry({"name": name, "type": "reg", "mode": 0o644}))
    message = refuse(b, tmp_path, complaint)
    assert f"TOC entry {name[:200]!r}" in message


@pytest.mark.parametrize("entry, complaint", [
    ({"name": "h", "type": "hardlink", "linkName": "/etc/passwd"}, "hardlink target is an absolute path"),
    ({"name": "h", "type": "hardlink", "linkName": "../etc/passwd"}, r"hardlink target has a '\.\.'"),
    ({"name": "h", "type": "hardlink", "linkName": "etc/\x00"}, "hardlink target contains a NUL"),
    ({"name": "s", "type": "symlink", "linkName": "/etc/\x00passwd"}, "linkName has a NUL byte"),
    ({"name": "s", "type": "symlink", "linkName": "x" * 5000}, "too long"),
    ({"name": "s", "type": "symlink"}, "symlink without a linkName"),
    ({"name": 7, "type": "reg"}, "has no name"),
    ({"name": "sock", "type": "socket"}, "unknown type 'socket'"),
    ({"name": "x", "type": "reg", "xattrs": {"user.a\x00": "AA=="}}, "xattr name"),
    ({"name": "x", "type": "reg", "xattrs": {"user.a": "!!"}}, "not valid base64"),
])
def test_bad_link_targets_and_fields_are_refused(entry: dict, complaint: str, tmp_path: Path) -> None:
    refuse(build("estargz", _base_specs(), add_entry(entry)), tmp_path, complaint)


@pytest.mark.parametrize("fmt", FORMATS)
def test_relative_prefixes_real_producers_write_are_accepted(fmt: str, tmp_path: Path) -> None:
    def hook(toc: dict) -> dict:
        for e in toc["entries"]:
            e["name"] = "./" + e["name"]
        toc["entries"].insert(0, {"name": "./", "type": "dir", "mode": 0o711})
        return toc

    layer = open_layer(build(fmt, _base_specs(), hook), tmp_path)
    assert layer.read("etc/passwd", 0, 1000) == LAYER_PASSWD
    assert stat.S_IMODE(layer.stat("").mode) == 0o711
    assert [p for p, _ in layer.walk()] == ["", "etc", "etc/passwd", "big", "small"]


# ------------------------------------------------------------------ symlinks pointing outside


def _escape_specs(canary: Path) -> list[Spec]:
    climb = "../" * 12
    return [
        dir_("etc"), reg("etc/passwd", LAYER_PASSWD),
        symlink("abs", "/etc/passwd"),
        symlink("rel", climb + "etc/passwd"),
        symlink("canary_abs", str(canary)),
        symlink("canary_rel", climb + str(canary).lstrip("/")),
        symlink("etc_out", "/etc"),
        symlink("root", "/"),
        symlink("loop", "loop"),
        symlink("ping", "pong"), symlink("pong", "ping"),
    ]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host file no layer operation may ever read (or even look up)."""
    path = tmp_path / "host" / "canary-secret.txt"
    path.parent.mkdir()
    path.write_text("HOST-ONLY-CANARY-CONTENT\n")
    return path


def test_symlink_targets_are_data_never_followed_by_the_layer(canary: Path, tmp_path: Path) -> None:
    b = build("estargz", _escape_specs(canary))
    layer = open_layer(b, tmp_path / "index")
    assert layer.readlink("canary_abs") == str(canary)  # kept as written
    assert layer.readlink("rel") == "../" * 12 + "etc/passwd"
    for name in ("abs", "rel", "canary_abs", "canary_rel", "etc_out", "root", "loop"):
        assert stat.S_ISLNK(layer.stat(name).mode)
        with pytest.raises(OSError):
            layer.read(name, 0, 100)
        with pytest.raises(OSError):
            layer.chunks_for(name, 0, 100)
    with pytest.raises(NotADirectoryError):
        layer.stat("etc_out/passwd")
    with pytest.raises(NotADirectoryError):
        layer.readdir("etc_out")
    assert not layer.exists("etc_out/passwd") and not layer.exists("root/etc")
    with pytest.raises(FileNotFoundError):
        layer.stat("../../" + str(canary))
    walked = {p for p, _ in layer.walk()}
    assert not any("canary-secret" in p for p in walked)


def _crfs(args: list[str], tmp_path: Path, trace: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRFS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "crfs_worker.cli", *args]
    if trace is not None:
        # Every path-taking system call of crfs and its children (index builders).
        cmd = ["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace), *cmd]
    return subprocess.run(cmd, capture_output=True, env=env, cwd=REPO, timeout=120, check=False)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (Debian package strace)")
def test_cli_cat_and_inspect_through_escaping_links_never_touch_the_host(canary: Path, tmp_path: Path) -> None:
    b = build("estargz", _escape_specs(canary))
    blob = tmp_path / "layer.blob"
    blob.write_bytes(b.data)
    digest = ["--toc-digest", b.toc_digest]
    host_passwd = Path("/etc/passwd").read_bytes()
    assert host_passwd != LAYER_PASSWD
    trace = tmp_path / "strace.log"
    logs = []
    # Links to /etc/passwd resolve inside the layer: the layer's own file, never the host's.
    for link in ("abs", "rel", "etc_out/passwd", "root/../../etc/passwd"):
        done = _crfs(["cat", str(blob), link, *digest], tmp_path, trace)
        assert (done.returncode, done.stdout) == (0, LAYER_PASSWD), (link, done.stderr)
        logs.append(trace.read_text())
    for link in ("canary_abs", "canary_rel"):
        done = _crfs(["cat", str(blob), link, *digest], tmp_path, trace)
        assert done.returncode == 1 and done.stdout == b""
        assert b"no such file" in done.stderr and b"Traceback" not in done.stderr
        logs.append(trace.read_text())
    done = _crfs(["cat", str(blob), "ping", *digest], tmp_path, trace)
    assert done.returncode == 1 and b"too many levels of symbolic links" in done.stderr
    logs.append(trace.read_text())
    done = _crfs(["inspect", "--json", str(blob), *digest], tmp_path, trace)
    assert done.returncode == 0 and str(canary).encode() in done.stdout  # shown as data
    logs.append(trace.read_text())
    for text in logs:
        # The command line (execve) names the links; every other call is crfs at work.
        log = "\n".join(line for line in text.splitlines() if " execve(" not in line)
        assert str(blob) in log and str(tmp_path / "cache") in log  # the trace is of crfs at work
        assert "/etc/passwd" not in log, "crfs looked up the host's /etc/passwd"
        assert str(canary) not in log and "canary-secret" not in log, "crfs looked at the host file"
        assert "HOST-ONLY-CANARY" not in log


# ------------------------------------------------------------------ duplicates


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicates_later_entry_wins(fmt: str, tmp_path: Path) -> None:
    specs = [
        reg("f", b"old"), reg("f", b"the later content wins"),
        dir_("d", mode=0o700), reg("d/child", b"kept"), dir_("d", mode=0o750),
        reg("g", b"a file"), dir_("g"), reg("g/inner", b"inside"),
        reg("p", b"was a file"), reg("p/q", b"parent became a directory"),
        symlink("s", "first"), reg("s", b"now a file"),
    ]
    layer = open_layer(build(fmt, specs), tmp_path)
    assert layer.read("f", 0, 100) == b"the later content wins" and layer.stat("f").nlink == 1
    assert stat.S_IMODE(layer.stat("d").mode) == 0o750 and layer.read("d/child", 0, 10) == b"kept"
    assert stat.S_ISDIR(layer.stat("g").mode) and layer.read("g/inner", 0, 10) == b"inside"
    assert stat.S_ISDIR(layer.stat("p").mode) and layer.read("p/q", 0, 100) == b"parent became a directory"
    assert layer.read("s", 0, 100) == b"now a file"
    walked = [p for p, _ in layer.walk()]
    assert len(walked) == len(set(walked))
    assert sorted(walked) == sorted(["", "f", "d", "d/child", "g", "g/inner", "p", "p/q", "s"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("later", [reg("d", b"x"), symlink("d", "elsewhere"), Spec("d", "fifo"),
                                   hardlink("d", "f")], ids=["reg", "symlink", "fifo", "hardlink"])
def test_non_directory_replacing_a_directory_is_refused(fmt: str, later: Spec, tmp_path: Path) -> None:
    specs = [reg("f", b"f"), dir_("d"), reg("d/child", b"c"), later]
    message = refuse(build(fmt, specs), tmp_path, "replaces a directory")
    assert "TOC entry 'd'" in message


# ------------------------------------------------------------------ hardlinks

BAD_LINKS = {
    "cycle": ([hardlink("a", "b"), hardlink("b", "a")], "hardlink to a later entry 'b'"),
    "self": ([hardlink("a", "a")], "hardlink to a (later|missing) entry 'a'"),
    "missing": ([reg("x", b"x"), hardlink("a", "nothing/here")], "hardlink to a missing entry"),
    "later": ([hardlink("a", "x"), reg("x", b"x")], "hardlink to a later entry 'x'"),
    "directory": ([dir_("dd"), hardlink("a", "dd")], "hardlink to the directory 'dd'"),
    "through-file": ([reg("x", b"x"), hardlink("a", "x/y")], "hardlink to a missing entry"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(BAD_LINKS))
def test_bad_hardlinks_are_refused(fmt: str, case: str, tmp_path: Path) -> None:
    specs, complaint = BAD_LINKS[case]
    message = refuse(build(fmt, specs), tmp_path, complaint)
    assert "TOC entry 'a'" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_hardlink_chains_and_replaced_targets(fmt: str, tmp_path: Path) -> None:
    specs = [reg("x", b"x content"), hardlink("y", "x"), hardlink("z", "y"),
             reg("t", b"old t"), hardlink("h", "t"), reg("t", b"new t")]
    layer = open_layer(build(fmt, specs), tmp_path)
    assert layer.stat("x").ino == layer.stat("y").ino == layer.stat("z").ino
    assert layer.stat("z").nlink == 3 and layer.read("z", 0, 100) == b"x content"
    # h was made when t was the old file: it keeps that file, as tar extraction would.
    assert layer.read("h", 0, 100) == b"old t" and layer.read("t", 0, 100) == b"new t"
    assert layer.stat("h").ino != layer.stat("t").ino
    assert layer.stat("h").nlink == 1 and layer.stat("t").nlink == 1


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("value", [2**62, 2**63 - 1, 2**63, 2**64, -1, -(2**63), "7", 1.5, [1], None],
                         ids=["2^62", "2^63-1", "2^63", "2^64", "-1", "-2^63", "string", "float", "list", "null"])
@pytest.mark.parametrize("key", ["size", "offset", "chunkSize", "chunkOffset", "innerOffset",
                                 "endOffset", "mode", "uid", "gid", "devMajor"])
def test_integers_out_of_range_are_refused(key: str, value: Any, tmp_path: Path) -> None:
    if value is None:
        value = {"n": 1}
    b = build("zstd:chunked", _base_specs(), patch_entry("big", **{key: value}))
    refuse(b, tmp_path, "is not an integer|non-integer number")


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_sizes_that_fit_the_integer_range_but_not_reason(fmt: str, tmp_path: Path) -> None:
    # 2^62 - 1 passes the integer check; the sum of file sizes (1 PiB) refuses it.
    refuse(build(fmt, _base_specs(), patch_entry("big", size=2**62 - 1)), tmp_path / "a",
           "regular files add up to more than")
    # A file that claims 10 GB in one chunk: decoding it would take 10 GB of memory.
    one_chunk = {"size": 10 << 30, "chunkSize": None, "chunkDigest": None}
    b = build(fmt, [reg("f", b"tiny")], patch_entry("f", **one_chunk))
    refuse(b, tmp_path / "b", r"chunk of 10737418240 bytes, more than the limit")
    # innerOffset counts too: it is inflated and dropped before the chunk's bytes.
    b = build("estargz", [reg("f", b"tiny")], patch_entry("f", innerOffset=2**61))
    refuse(b, tmp_path / "c", r"at innerOffset 2305843009213693952, more than the limit")


def test_legacy_whole_file_verification_is_bounded(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    b = blobgen.stargz([reg("f", data), reg("g", b"small")], chunk_size=64 << 10)
    limits = TocLimits(max_chunk_size=100_000)
    source = LayerSource(MemBlob(b.data, "legacy"), None, {}, allow_unverified=True)
    layer = Layer.open(source, tmp_path, limits=limits)
    with pytest.raises(UnverifiableError, match="legacy: f: file of 300000 bytes can only be verified whole"):
        layer.read("f", 0, 10)
    assert layer.read("g", 0, 10) == b"small"
    assert Layer.open(source, tmp_path / "default").read("f", 0, 300_000) == data


# ------------------------------------------------------------------ chunk ranges


def _offsets(b: blobgen.Blob) -> dict[str, int]:
    """Data offset by name; for a file of several chunks, its last chunk's."""
    return {e["name"]: e["offset"] for e in json.loads(b.toc_json)["entries"] if e.get("offset")}


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_past_the_payload_is_refused(fmt: str, tmp_path: Path) -> None:
    refuse(build(fmt, _base_specs(), patch_entry("small", offset=len(build(fmt, _base_specs()).data))),
           tmp_path, "past the payload")


def test_end_offset_past_the_payload_is_refused(tmp_path: Path) -> None:
    b = build("zstd:chunked", _base_specs(), patch_entry("small", endOffset=2**40))
    refuse(b, tmp_path, "past the payload")


@pytest.mark.parametrize("fmt", ["stargz", "estargz", "zstdchunked-estargz"])
def test_offsets_going_backwards_are_refused(fmt: str, tmp_path: Path) -> None:
    offsets = _offsets(build(fmt, _base_specs()))
    b = build(fmt, _base_specs(), patch_entry("small", offset=offsets["etc/passwd"] - 1))
    refuse(b, tmp_path, "is not after an earlier entry's offset")


@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked-estargz"])
def test_chunk_gaps_and_overlaps_are_refused(fmt: str, tmp_path: Path) -> None:
    def shift(delta: int) -> Callable[[dict], dict]:
        def hook(toc: dict) -> dict:
            chunk = next(e for e in toc["entries"] if e["type"] == "chunk")
            chunk["chunkOffset"] += delta
            return toc
        return hook

    specs = [reg("big", os.urandom(200_000))]
    if fmt == "zstdchunked-estargz":
        b_gap = blobgen.zstdchunked_old(specs, chunk_size=64 << 10, toc_hook=shift(+1))
        b_over = blobgen.zstdchunked_old(specs, chunk_size=64 << 10, toc_hook=shift(-1))
    else:
        b_gap, b_over = build(fmt, specs, shift(+1)), build(fmt, specs, shift(-1))
    refuse(b_gap, tmp_path / "gap", "leaves a gap or overlap")
    refuse(b_over, tmp_path / "overlap", "leaves a gap or overlap")


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_or_misplaced_data_is_never_served(fmt: str, tmp_path: Path) -> None:
    """Ranges that pass the open checks but point at the wrong bytes: reads fail, the
    other files still read exactly."""
    base = build(fmt, _base_specs())
    offsets = _offsets(base)
    cases = {
        # the data of the entry before (big's last chunk): sharing it passes the open checks
        "shared": patch_entry("small", offset=offsets["big"]),
        "inner-past-end": patch_entry("small", innerOffset=1 << 20),
    }
    for case, hook in cases.items():
        layer = open_layer(build(fmt, _base_specs(), hook), tmp_path / case)
        with pytest.raises((VerificationError, FormatError)) as caught:
            layer.read("small", 0, 100)
        assert "small" in str(caught.value), case
        assert layer.read("etc/passwd", 0, 1000) == LAYER_PASSWD
        assert layer.read("big", 0, 10**6) == base.files["big"]


# ------------------------------------------------------------------ bombs and absurd counts


def _rss_child(code: str, tmp_path: Path) -> tuple[str, float]:
    """Runs `code` in a fresh interpreter; returns its output and the peak RSS in MB of it
    or of the index builder process it may start, whichever is larger."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import resource
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                print("HWM", max(int(line.split()[1]) / 1024, children))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    hwm = float(lines[-1].split()[1])
    return "\n".join(lines[:-1]), hwm


_OPEN_AND_REPORT = """
    import sys
    from pathlib import Path
    from crfs_worker.blob import LocalBlob
    from crfs_worker.errors import CrfsError
    from crfs_worker.layer import Layer, LayerSource
    from crfs_worker.toc import TocLimits
    try:
        Layer.open(LayerSource(LocalBlob(Path({blob!r})), {digest!r}, {{}}), Path("index"),
                   limits=TocLimits(**{limits!r}))
        print("OPENED")
    except CrfsError as e:
        print(type(e).__name__, e)
"""


def _refused_in_child(blob: Path, digest: str, tmp_path: Path, match: str,
                      limits: dict | None = None) -> float:
    out, hwm = _rss_child(_OPEN_AND_REPORT.format(blob=str(blob), digest=digest, limits=limits or {}),
                          tmp_path)
    assert out.startswith("FormatError") and blob.name in out, out
    assert re.search(match, out), out
    assert not list((tmp_path / "index").iterdir())
    assert hwm < MAX_RSS_MB, f"peak RSS {hwm:.0f} MB"
    print(f"{blob.name}: refused, peak RSS {hwm:.0f} MB")
    return hwm


def _tar_header(name: str, size: int) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108], h[108:116], h[116:124] = b"0000444\0", b"0000000\0", b"0000000\0"
    h[124:136] = b"%011o\0" % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    h[136:148], h[148:156], h[156:157] = b"00000000000\0", b" " * 8, b"0"
    h[257:263], h[263:265] = b"ustar\0", b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _gzip_bomb(head: bytes, spaces: int) -> bytes:
    """A gzip member: `head`, then `spaces` spaces (in 1 MiB segments, reused: after a
    full flush every segment compresses to the same bytes), no valid trailer."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    segment = c.compress(b" " * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    out.append(segment * (spaces >> 20))
    return b"".join(out)


def _zstd_bomb(head: bytes, total: int) -> bytes:
    """A zstd frame: `head` in a raw block, then RLE blocks of spaces up to `total` bytes
    (4 bytes per 128 KiB: 10 GB in 320 KB)."""
    block = 128 << 10
    frame = bytearray(b"\x28\xb5\x2f\xfd" + b"\x00" + b"\x58")  # no content size; window 128 KiB (2^17)
    frame += struct.pack("<I", (len(head) << 3) | 0)[:3] + head  # raw block
    left = total - len(head)
    rle = struct.pack("<I", (block << 3) | (1 << 1))[:3] + b" "
    frame += rle * (left // block - 1)
    frame += struct.pack("<I", (block << 3) | (1 << 1) | 1)[:3] + b" "  # the last block
    return bytes(frame)


TEN_GB = 10 << 30
JSON_HEAD = b'{"version": 1, "entries": ['


def test_gzip_toc_declaring_10_gb_is_refused_at_once(tmp_path: Path) -> None:
    member = _gzip_bomb(_tar_header("stargz.index.json", TEN_GB) + JSON_HEAD, 1 << 20)
    blob = tmp_path / "declares.blob"
    blob.write_bytes(member + estargz_footer(0))
    _refused_in_child(blob, "sha256:" + "0" * 64, tmp_path, "decompression bomb")


def test_gzip_toc_expanding_to_10_gb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    # The tar header admits 256 MiB (under the default 1 GiB limit); the member holds
    # 10 GB of spaces. The JSON ends unfinished after 256 MiB; the rest is never inflated.
    member = _gzip_bomb(_tar_header("stargz.index.json", 256 << 20) + JSON_HEAD, TEN_GB)
    blob = tmp_path / "expands.blob"
    blob.write_bytes(member + estargz_footer(0))
    assert blob.stat().st_size < 12 << 20
    _refused_in_child(blob, "sha256:" + "0" * 64, tmp_path, "not valid JSON|more than 65536 bytes after")


def _zstd_chunked_blob(ctoc: bytes, declared: int) -> bytes:
    payload = zstandard.ZstdCompressor().compress(b"\0" * 1024)
    toc_off = len(payload) + 8
    out = payload + zstd_skippable_frame(ctoc)
    return out + zstd_skippable_frame(zstd_chunked_footer(toc_off, len(ctoc), declared))


def test_zstd_toc_declaring_10_gb_is_refused_at_once(tmp_path: Path) -> None:
    ctoc = zstandard.ZstdCompressor().compress(JSON_HEAD + b"]}")
    blob = tmp_path / "declares.blob"
    blob.write_bytes(_zstd_chunked_blob(ctoc, TEN_GB))
    digest = "sha256:" + hashlib.sha256(ctoc).hexdigest()
    _refused_in_child(blob, digest, tmp_path, "TOC of 10737418240 bytes exceeds the limit")


@pytest.mark.parametrize("declared", [4096, 64 << 20], ids=["small", "at-limit"])
def test_zstd_toc_expanding_to_10_gb_is_refused_with_bounded_memory(declared: int, tmp_path: Path) -> None:
    ctoc = _zstd_bomb(JSON_HEAD, TEN_GB)
    blob = tmp_path / "expands.blob"
    blob.write_bytes(_zstd_chunked_blob(ctoc, declared))
    digest = "sha256:" + hashlib.sha256(ctoc).hexdigest()  # it matches: the author is the attacker
    # The default limit (1 GiB) would do, but takes seconds of inflating spaces: use 64 MiB.
    limits = {"max_toc_bytes": 64 << 20}
    _refused_in_child(blob, digest, tmp_path, "more than the 4096 bytes its footer declares"
                      if declared == 4096 else "decompression bomb", limits)


def test_one_huge_entry_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    # 64 MB in one string: without a bound on one entry, each refill rescanned it from its
    # start (300 MB took 85 s and 1.2 GB of RSS).
    body = JSON_HEAD + b'{"name": "' + b"a" * (64 << 20) + b'", "type": "reg"}]}'
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    member = c.compress(_tar_header("stargz.index.json", len(body)) + body + b"\0" * 1024) + c.flush()
    blob = tmp_path / "huge-entry.blob"
    blob.write_bytes(member + estargz_footer(0))
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    _refused_in_child(blob, digest, tmp_path, "not a JSON value of at most 8388608 bytes")


def test_absurd_entry_count_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    # 5,000,000 entries (the same directory again and again: 135 MB of JSON, 130 KB of
    # gzip) against a limit of 200,000: refused at the limit, streaming all the way.
    count = 5_000_000
    one = b'{"name": "d/", "type": "dir"},'
    tail = b'{"name": "d/", "type": "dir"}]}'
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    digest = hashlib.sha256(JSON_HEAD)
    size = len(JSON_HEAD) + len(one) * (count - 1) + len(tail)
    parts = [c.compress(_tar_header("stargz.index.json", size) + JSON_HEAD)]
    block = one * 100_000
    for n in range(0, count - 1, 100_000):
        piece = block if n + 100_000 <= count - 1 else one * (count - 1 - n)
        digest.update(piece)
        parts.append(c.compress(piece))
    digest.update(tail)
    parts.append(c.compress(tail + b"\0" * ((-size) % 512) + b"\0" * 1024) + c.flush())
    blob = tmp_path / "many.blob"
    blob.write_bytes(b"".join(parts) + estargz_footer(0))
    _refused_in_child(blob, "sha256:" + digest.hexdigest(), tmp_path, "more than 200000 entries",
                      {"max_entries": 200_000})


def test_deep_json_nesting_is_refused(tmp_path: Path) -> None:
    b = build("estargz", _base_specs(), lambda toc: json.dumps(toc)[:-2].encode() + b", " + b"[" * 100_000
              + b"]" * 100_000 + b"]}")
    refuse(b, tmp_path, "malformed|not an object|recursion")


def _many(kind: str, n: int) -> Callable[[dict], dict]:
    def hook(toc: dict) -> dict:
        if kind == "dirs":
            toc["entries"] += [{"name": f"d{i}/", "type": "dir"} for i in range(n)]
        elif kind == "implicit-dirs":  # parents no entry names: created as needed
            toc["entries"] += [{"name": f"p{i}/f", "type": "reg"} for i in range(n)]
        elif kind == "hardlinks":
            toc["entries"] += [{"name": f"h{i}", "type": "hardlink", "linkName": "small"} for i in range(n)]
        else:
            toc["entries"] += [{"name": "small", "type": "reg"} for _ in range(n)]
        return toc
    return hook


@pytest.mark.parametrize("kind, limits, complaint", [
    ("dirs", TocLimits(max_dirs=1000), "one of more than 1000 directories"),
    ("implicit-dirs", TocLimits(max_dirs=1000), "one of more than 1000 directories"),
    ("hardlinks", TocLimits(max_hardlinks=1000), "one of more than 1000 hardlinks"),
    ("duplicates", TocLimits(max_duplicates=1000), "more than 1000 duplicate names"),
])
def test_what_the_index_holds_in_memory_is_bounded(kind: str, limits: TocLimits, complaint: str,
                                                  tmp_path: Path) -> None:
    """Directories, hardlinks and duplicate names cost the builder memory (or time) each:
    each has a limit (1,000,000 by default), refused with a clear error."""
    refuse(build("estargz", _base_specs(), _many(kind, 1500)), tmp_path / "over", complaint, limits)
    layer = open_layer(build("estargz", _base_specs(), _many(kind, 900)), tmp_path / "under", limits)
    assert layer.read("etc/passwd", 0, 1000) == LAYER_PASSWD
