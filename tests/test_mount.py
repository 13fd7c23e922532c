"""`crfs mount REF DIR` / `crfs umount DIR`, and the mount_program wrapper podman runs.

`crfs mount` is real fuse-overlayfs with the image's layers through crfs.so: its tree
must equal the image's merged tree, read-only. The wrapper is checked against a stand-in
for fuse-overlayfs that records its command line (what podman's mount would run), with
lowers that resolve into a real layer store served by a worker.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from crfs_worker.convert import ConvertOptions, convert
from crfs_worker.imagemount import mount_type
from crfs_worker.mountprogram import Invocation, rewrite, split_options
from crfs_worker.progress import Progress
from tests.support.images import build_test_image, push_image
from tests.support.plugin_env import build_plugin
from tests.support.registry import RunningRegistry
from tests.support.workers import stop_worker
from tests.test_layerstore import StoreWorker, expected_merged, snapshot, start_store_worker

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="needs fuse-overlayfs")


@pytest.fixture(scope="module")
def image_ref(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, object]:
    image = build_test_image(tmp_path_factory.mktemp("mount-image") / "oci")
    gzip_ref, esgz_ref = f"{registry.host}/mount/app:gzip", f"{registry.host}/mount/app:esgz"
    with registry.client() as client:
        push_image(image, client, gzip_ref)
        convert(gzip_ref, esgz_ref, ConvertOptions(progress=Progress.disabled()), client)
    return esgz_ref, gzip_ref, image


@pytest.fixture(scope="module")
def crfs_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    build_plugin()
    runtime = Path(tempfile.mkdtemp(prefix="crfs-mt-"))  # short: a socket path has 108 bytes
    env = {**os.environ, "CRFS_RUNTIME_DIR": str(runtime), "CRFS_BACKGROUND_FETCH": "0",
           "CRFS_CACHE_DIR": str(tmp_path_factory.mktemp("mount-cache"))}
    yield env
    stop_worker(runtime)  # waits: the worker's view must be gone before the directory goes
    shutil.rmtree(runtime, ignore_errors=True)


def crfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crfs_worker.cli", *args], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mount_type(path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


# ------------------------------------------------------------------ crfs mount


def mount_options_of(target: Path) -> list[bytes]:
    """The -o values of the running processes whose command line names TARGET."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if os.fsencode(str(target)) in args and b"-o" in args[:-1]:
            found.append(args[args.index(b"-o") + 1])
    return found


def test_mount_shows_the_merged_image_read_only(crfs_env: dict[str, str], image_ref: tuple, target: Path) -> None:
    esgz, _, image = image_ref
    result = crfs(crfs_env, "mount", esgz, str(target))
    assert result.returncode == 0, result.stderr
    assert "mounted read-only" in result.stdout
    assert mount_type(target) == "fuse.fuse-overlayfs"
    # fuse-overlayfs runs with fast_ino=1 (crfs inode numbers are unique across layers).
    options = mount_options_of(target)
    assert options and all(b"fast_ino=1" in o.split(b",") for o in options), options
    expected = expected_merged(image)  # type: ignore[arg-type]
    got = snapshot(target, keep=())
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path] == expected[path], path
    for action in (lambda: (target / "new").write_text("x"), lambda: os.unlink(target / "etc" / "passwd")):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == errno.EROFS
    result = crfs(crfs_env, "umount", str(target))
    assert result.returncode == 0, result.stderr
    assert mount_type(target) is None


def test_mount_and_umount_refuse_clearly(crfs_env: dict[str, str], image_ref: tuple, target: Path,
                                         tmp_path: Path) -> None:
    esgz, gzip_ref, _ = image_ref
    cases = [
        (("umount", str(target)), "nothing is mounted there"),
        (("mount", esgz, str(tmp_path / "missing")), "not a directory"),
        (("mount", gzip_ref, str(target)), "no toc digest"),
        (("umount", "/proc"), "not one of crfs mount's"),
    ]
    for args, message in cases:
        result = crfs(crfs_env, *args)
        assert result.returncode == 1, args
        assert message in result.stderr.lower(), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert crfs(crfs_env, "mount", esgz, str(target)).returncode == 0
    again = crfs(crfs_env, "mount", esgz, str(target))
    assert again.returncode == 1 and "mounted there already" in again.stderr
    assert crfs(crfs_env, "umount", str(target)).returncode == 0


def test_mount_needs_a_fuse_overlayfs_with_plugins(crfs_env: dict[str, str], image_ref: tuple, target: Path,
                                                   tmp_path: Path) -> None:
    rust = tmp_path / "fuse-overlayfs"
    rust.write_text("#!/bin/sh\necho 'fuse-overlayfs: version 2.0.0'\n")
    rust.chmod(0o755)
    result = crfs({**crfs_env, "CRFS_FUSE_OVERLAYFS": str(rust)}, "mount", image_ref[0], str(target))
    assert result.returncode == 1
    assert "cannot load crfs.so" in result.stderr


# ------------------------------------------------------------------ the mount_program wrapper


def fake_fuse_overlayfs(directory: Path, version: str) -> Path:
    """Prints `version` for --version; otherwise records its arguments, one per line."""
    program = directory / f"fuse-overlayfs-{version}"
    program.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fuse-overlayfs: version {version}'; "
                       f"exit 0; fi\nprintf '%s\\n' \"$@\" > {directory}/args-{version}\n")
    program.chmod(0o755)
    return program


@pytest.fixture(scope="module")
def store_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreWorker]:
    running = start_store_worker(tmp_path_factory.mktemp("wrapper-store"))
    yield running
    running.stop()
    shutil.rmtree(running.runtime, ignore_errors=True)


def podman_like_lowers(store_worker: StoreWorker, esgz: str, tmp_path: Path, registry: RunningRegistry) -> list[Path]:
    """Two store layers behind podman-style links (overlay/l/LINK -> ../ID/diff -> store), and
    one ordinary directory."""
    from crfs_worker.reference import ImageReference
    import json

    with registry.client() as client:
        manifest = json.loads(client.get_manifest(ImageReference.parse(esgz)).data)
    links = []
    for number, layer in enumerate(manifest["layers"][:2]):
        layer_dir = tmp_path / "overlay" / f"id{number}"
        layer_dir.mkdir(parents=True)
        (layer_dir / "diff").symlink_to(store_worker.layer_dir(esgz, layer["digest"]) / "diff")
        (tmp_path / "overlay" / "l").mkdir(exist_ok=True)
        links.append(tmp_path / "overlay" / "l" / f"LINK{number}")
        links[-1].symlink_to(f"../id{number}/diff")
    plain = tmp_path / "overlay" / "plain"
    plain.mkdir()
    return [links[1], plain, links[0]]


def test_wrapper_reads_store_layers_through_crfs_so(store_worker: StoreWorker, image_ref: tuple,
                                                    registry: RunningRegistry, tmp_path: Path) -> None:
    lowers = podman_like_lowers(store_worker, image_ref[0], tmp_path, registry)
    program = fake_fuse_overlayfs(tmp_path, "1.10")
    plugin = build_plugin()
    argv = ["-o", f"lowerdir={':'.join(map(str, lowers))},upperdir=/u,workdir=/w,,volatile,"
                  'context="system_u:object_r:container_file_t:s0:c1,c2"', "/merged"]
    result = rewrite(argv, str(program), plugin)
    assert result.replaced == 2 and not result.reason
    inv = Invocation.parse(result.argv)
    new_lowers = inv.option("lowerdir").split(":")  # type: ignore[union-attr]
    assert new_lowers[1] == str(lowers[1])
    for lower in (new_lowers[0], new_lowers[2]):
        assert lower.startswith("//crfs/") and lower.endswith("//") and len(lower) == len("//crfs///") + 32
    assert inv.option("plugins") == str(plugin)
    assert 'context="system_u:object_r:container_file_t:s0:c1,c2"' in inv.options
    assert inv.others == ["/merged"] and "volatile" in inv.options and "" in inv.options
    # fast_ino=1 is added (inode numbers of crfs layers are unique across layers), unless
    # the caller chose a value.
    assert inv.option("fast_ino") == "1"
    chosen = rewrite([argv[0], argv[1] + ",fast_ino=0", argv[2]], str(program), plugin)
    assert Invocation.parse(chosen.argv).option("fast_ino") == "0"
    # The KEY is one the worker knows: crfs.so finds the layer by it.
    key = new_lowers[0][len("//crfs/"):-2]
    assert (store_worker.runtime / "keys" / f"{key}.json").exists()


def test_wrapper_leaves_mounts_it_cannot_improve_alone(store_worker: StoreWorker, image_ref: tuple,
                                                       registry: RunningRegistry, tmp_path: Path) -> None:
    lowers = podman_like_lowers(store_worker, image_ref[0], tmp_path, registry)
    argv = ["-o", f"lowerdir={':'.join(map(str, lowers))},upperdir=/u,workdir=/w", "/merged"]
    plugin = build_plugin()
    rust = fake_fuse_overlayfs(tmp_path, "2.0.1")
    assert rewrite(argv, str(rust), plugin).argv == argv
    assert "no plugin support" in rewrite(argv, str(rust), plugin).reason
    c_version = fake_fuse_overlayfs(tmp_path, "1.10")
    assert rewrite(argv, str(c_version), None).argv == argv
    plain_only = ["-o", f"lowerdir={lowers[1]},upperdir=/u,workdir=/w", "/merged"]
    assert rewrite(plain_only, str(c_version), plugin).argv == plain_only


def test_wrapper_execs_the_real_program(store_worker: StoreWorker, image_ref: tuple, registry: RunningRegistry,
                                        tmp_path: Path) -> None:
    lowers = podman_like_lowers(store_worker, image_ref[0], tmp_path, registry)
    program = fake_fuse_overlayfs(tmp_path, "1.10")
    log = tmp_path / "mount-program.log"
    env = {**os.environ, "CRFS_FUSE_OVERLAYFS": str(program), "CRFS_MOUNT_PROGRAM_LOG": str(log),
           "CRFS_PLUGIN": str(build_plugin())}
    subprocess.run([sys.executable, "-m", "crfs_worker.mountprogram", "-o",
                    f"lowerdir={':'.join(map(str, lowers))},upperdir=/u,workdir=/w", "/merged"],
                   env=env, check=True, cwd=REPO)
    args = (tmp_path / "args-1.10").read_text().splitlines()
    assert args[0] == "-o" and args[-1] == "/merged"
    assert args[1].count("//crfs/") == 2 and f"plugins={env['CRFS_PLUGIN']}" in args[1]
    assert " 2 lower(s) via crfs.so" in log.read_text()


def test_option_splitting_keeps_quoted_commas() -> None:
    assert split_options('a=1,context="x,y",,b') == ["a=1", 'context="x,y"', "", "b"]
    inv = Invocation.parse(["-olowerdir=/a:/b", "-f", "-o", "upperdir=/u", "/m"])
    assert inv.options == ["lowerdir=/a:/b", "upperdir=/u"] and inv.others == ["-f", "/m"]
