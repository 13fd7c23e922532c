"""The `crfs` command end to end: convert from a real registry, then inspect and cat.

The image is the three-layer test image (busybox, whiteouts/opaque dirs/hardlinks/
devices, a multi-chunk file) pushed as gzip into a real docker-registry; every file of
the merged tree must come back byte-identical through `crfs cat`.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crfs_worker.cli import main
from crfs_worker.footer import read_footer
from crfs_worker.blob import LocalBlob
from crfs_worker.oci_layout import OciLayout
from tests.support.images import ExpectedEntry, TestImage, build_test_image, push_image
from tests.support.registry import RunningRegistry
from tests.support.workers import stop_worker

REPO = Path(__file__).resolve().parent.parent


def merged_tree(image: TestImage) -> dict[str, ExpectedEntry]:
    """What the image's root filesystem holds once its layers are applied in order."""
    tree: dict[str, ExpectedEntry] = {}
    for layer in image.layers:
        for path, entry in layer.entries.items():
            parent, base = posixpath.split(path)
            if base == ".wh..wh..opq":
                for p in [p for p in tree if p.startswith(parent + "/")]:
                    del tree[p]
                continue
            if base.startswith(".wh."):
                gone = posixpath.join(parent, base[len(".wh."):])
                for p in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                    del tree[p]
                continue
            if entry.type != "dir":
                for p in [p for p in tree if p.startswith(path + "/")]:
                    del tree[p]
            tree[path] = entry
    return tree


@pytest.fixture(scope="module")
def converted(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TestImage]:
    work = tmp_path_factory.mktemp("cli")
    image = build_test_image(work / "src")
    with registry.client() as client:
        push_image(image, client, f"{registry.host}/cli/app:gzip")
    dst = f"{registry.host}/cli/app:esgz"
    env = {**os.environ, "CRFS_CACHE_DIR": str(work / "cache")}
    run = subprocess.run([sys.executable, "-m", "crfs_worker.cli", "convert",
                          f"{registry.host}/cli/app:gzip", dst],
                         env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert dst in run.stdout and "3 layer(s) converted" in run.stdout
    return dst, image


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRFS_CACHE_DIR", str(tmp_path / "cache"))


def cat(capsysbinary: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, bytes, str]:
    status = main(["cat", *args])
    out, err = capsysbinary.readouterr()
    return status, out, err.decode()


def test_every_file_of_the_merged_tree_reads_back_identical(
        converted: tuple[str, TestImage], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    ref, image = converted
    tree = merged_tree(image)
    regular = {p: e for p, e in tree.items() if e.type == "reg"}
    assert len(regular) > 10
    for path, entry in regular.items():
        status, out, err = cat(capsysbinary, ref, "/" + path)
        assert (status, err) == (0, ""), path
        assert out == entry.data, path
    for path, entry in tree.items():  # hardlinks read as their target
        if entry.type == "hardlink" and tree.get(entry.link, entry).type == "reg":
            assert cat(capsysbinary, ref, path)[1] == tree[entry.link].data


def test_cat_follows_symlinks_inside_the_image(
        converted: tuple[str, TestImage], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    ref, _ = converted
    status, out, _ = cat(capsysbinary, ref, "bin/sh")
    assert status == 0 and out == Path("/bin/busybox").read_bytes()


def test_whiteouts_and_opaque_dirs_hide_lower_files(
        converted: tuple[str, TestImage], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    ref, image = converted
    tree = merged_tree(image)
    lower = image.layers[0].entries
    hidden = [p for p, e in lower.items() if e.type == "reg" and p not in tree]
    assert hidden, "the test image must delete some lower files"
    for path in hidden:
        status, out, err = cat(capsysbinary, ref, path)
        assert status == 1 and out == b"" and "no such file" in err, path


def test_cat_errors_are_one_line(converted: tuple[str, TestImage],
                                 capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    ref, _ = converted
    for path, message in (("etc", "is a directory"), ("no/such/file", "no such file")):
        status, out, err = cat(capsysbinary, ref, path)
        assert status == 1 and out == b"" and message in err
        assert "Traceback" not in err and err.count("\n") == 1


def test_inspect_lists_every_layer_like_tar_tv(
        converted: tuple[str, TestImage], capsys: pytest.CaptureFixture[str]) -> None:
    ref, image = converted
    assert main(["inspect", ref]) == 0
    text = capsys.readouterr().out
    assert text.count("# layer sha256:") == 3
    assert "lrwxrwxrwx 0/0" in text and "bin/sh -> busybox" in text
    assert main(["inspect", "--json", ref]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [len(layer["entries"]) > 0 for layer in doc["layers"]] == [True] * 3
    paths = {e["path"] for e in doc["layers"][0]["entries"]}
    assert set(image.layers[0].entries) <= paths


def _layer_blob(tmp_path: Path, ref: str) -> tuple[Path, str]:
    """Copies the converted image into an OCI layout; returns its top layer blob and TOC digest."""
    assert main(["convert", ref, f"oci:{tmp_path / 'oci'}:x"]) == 0
    layout = OciLayout(tmp_path / "oci")
    manifest = json.loads(layout.get_manifest("x").data)
    top = manifest["layers"][-1]
    return layout.blob_path(top["digest"]), top["annotations"]["containerd.io/snapshot/stargz/toc.digest"]


def test_local_blob_needs_its_toc_digest_and_detects_tampering(
        converted: tuple[str, TestImage], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    ref, image = converted
    blob, toc_digest = _layer_blob(tmp_path, ref)
    capsysbinary.readouterr()
    big = max((e for e in image.layers[-1].entries.values() if e.type == "reg"), key=lambda e: len(e.data))

    status, out, _ = cat(capsysbinary, str(blob), big.path, "--toc-digest", toc_digest)
    assert status == 0 and out == big.data

    status, out, err = cat(capsysbinary, str(blob), big.path)
    assert status == 1 and out == b"" and "toc" in err.lower()

    # One flipped byte inside the big file's first chunk: an error, and no byte of output.
    tampered = tmp_path / "tampered"
    shutil.copy(blob, tampered)
    data = bytearray(tampered.read_bytes())
    with LocalBlob(blob) as reader:
        toc_offset = read_footer(reader).toc_offset
    pos = data.find(b"\x1f\x8b", 2048)  # a gzip member well inside the payload
    assert 0 < pos < toc_offset
    data[pos + 200] ^= 0x01
    tampered.write_bytes(bytes(data))
    failures = 0
    for path, entry in image.layers[-1].entries.items():
        if entry.type != "reg":
            continue
        status, out, err = cat(capsysbinary, str(tampered), path, "--toc-digest", toc_digest)
        if status != 0:
            failures += 1
            assert out == b"" and "Traceback" not in err
        else:
            assert out == entry.data, path  # untouched chunks still serve correct bytes
    assert failures >= 1

    # One flipped byte in the TOC: the layer is refused. (A fresh cache: an index built
    # from the verified TOC of the same digest would rightly be used without the TOC.)
    monkeypatch.setenv("CRFS_CACHE_DIR", str(tmp_path / "fresh-cache"))
    data = bytearray(blob.read_bytes())
    data[toc_offset + 40] ^= 0x01
    tampered.write_bytes(bytes(data))
    status, out, err = cat(capsysbinary, str(tampered), big.path, "--toc-digest", toc_digest)
    assert status == 1 and out == b"" and "Traceback" not in err and "TOC" in err


def test_bad_references_give_clear_errors(capsys: pytest.CaptureFixture[str], registry: RunningRegistry) -> None:
    assert main(["inspect", f"{registry.host}/no/such:image"]) == 1
    err = capsys.readouterr().err
    assert "no/such" in err and "Traceback" not in err
    assert main(["inspect", "UPPER/Case::bad"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_deeply_nested_json_is_a_format_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """json's decoder recurses per nesting level: an index.json or a manifest of 100k
    brackets must be refused by name, not escape as a RecursionError."""
    layout = tmp_path / "nested"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text("[" * 100_000)
    assert main(["inspect", f"oci:{layout}"]) == 1
    assert "index.json is nested too deeply" in capsys.readouterr().err

    manifest = b"[" * 100_000
    digest = hashlib.sha256(manifest).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{digest}",
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "x"}}]}))
    for command in (["inspect", f"oci:{layout}:x"], ["convert", f"oci:{layout}:x", f"oci:{tmp_path / 'out'}:x"]):
        assert main(command) == 1
        assert "manifest is nested too deeply" in capsys.readouterr().err


def test_pip_install_gives_a_working_crfs_command(tmp_path: Path) -> None:
    """A non-editable install of the checkout: the package, the command and crfs.so."""
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(target), str(REPO)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (target / "crfs_worker" / "crfs.so").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    help_run = subprocess.run([str(target / "bin" / "crfs"), "--help"], env=env,
                              capture_output=True, text=True, cwd=tmp_path)
    assert help_run.returncode == 0 and "convert" in help_run.stdout


def test_lowerdir_starts_the_worker_and_stats_report_it(
        converted: tuple[str, TestImage], tmp_path: Path) -> None:
    ref, image = converted
    env = {**os.environ, "CRFS_CACHE_DIR": str(tmp_path / "cache"),
           "CRFS_RUNTIME_DIR": str(tmp_path / "run"), "CRFS_BACKGROUND_FETCH": "0"}
    crfs = [sys.executable, "-m", "crfs_worker.cli"]
    try:
        run = subprocess.run([*crfs, "lowerdir", ref], env=env, capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 0, run.stderr
        assert re.fullmatch(r"//crfs/[A-Za-z0-9_.-]+//\n", run.stdout)
        stats = subprocess.run([*crfs, "stats", "--json"], env=env, capture_output=True, text=True, cwd=REPO)
        assert stats.returncode == 0, stats.stderr  # the worker answers: lowerdir started it
        assert isinstance(json.loads(stats.stdout), list)
    finally:
        stop_worker(tmp_path / "run")
