"""Rootless podman runs eStargz images lazily through crfs, end to end.

A non-root user set up by podman-examples/setup-rootless.sh; a Debian image made with
debootstrap (cached under /var/cache/crfs-tests), imported and pushed as gzip by podman
to a real docker-registry whose access log counts every byte fetched, converted with
`crfs convert`. For each way podman reads store layers (the layer store alone through
fuse-overlayfs, the mount_program wrapper that reads them through crfs.so, and the
kernel's rootless overlay without a mount program), with a cold worker: pull, run python3, write inside the container, run again, push the lazily
pulled image elsewhere and run that, rmi, and run the gzip original under the same config.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient
from tests.support.podman import (
    NEEDS_ROOT_AND_PODMAN,
    e2e_images,
    FULL_FLOW,
    PATHS,
    E2EImages,
    PathReport,
    PodmanRoot,
    PodmanUser,
    run_path,
)

USER = "crfs-e2e"
WORK_LABEL = "e2e"  # names the `work` fixture's directory (tests/conftest.py)
LAZY_LIMIT = 0.25  # pull + first run may fetch at most this share of the compressed image

pytestmark = NEEDS_ROOT_AND_PODMAN


@pytest.fixture(scope="module")
def images(user: PodmanUser, work: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EImages]:
    with e2e_images(user, work, tmp_path_factory.mktemp("e2e-registry")) as prepared:
        yield prepared


@pytest.fixture(scope="module")
def reports(user: PodmanUser, images: E2EImages, work: Path) -> dict[str, PathReport]:
    """Each path once (they take a while); the tests below check what they did."""
    return {path: run_path(user, images, work, path, full=path in FULL_FLOW) for path in PATHS}


@pytest.mark.parametrize("path", list(PATHS))
def test_container_starts_lazily(reports: dict[str, PathReport], path: str) -> None:
    report = reports[path]
    assert report.outputs["first"] == "42"
    # Only TOCs at pull time; the run fetched a small part of the image.
    assert 0 < report.pull_fetched < report.fetched
    assert report.fraction < LAZY_LIMIT, f"{path}: fetched {report.fetched} of {report.image_bytes} bytes"
    assert report.uses_added_by_pull == 1  # one layer, in use by the pulled image


@pytest.mark.parametrize("path", list(PATHS))
def test_container_writes_and_runs_again(reports: dict[str, PathReport], path: str) -> None:
    outputs = reports[path].outputs
    assert outputs["write"].splitlines() == ["written", "appended", "removed"]
    assert outputs["second"] == "42"


@pytest.mark.parametrize("path", list(PATHS))
def test_rmi_releases_the_store_layer(reports: dict[str, PathReport], path: str) -> None:
    assert reports[path].uses_left_by_rmi == 0


@pytest.mark.parametrize("path", FULL_FLOW)
def test_pushed_copy_and_gzip_original_run(reports: dict[str, PathReport], path: str) -> None:
    outputs = reports[path].outputs
    assert outputs["pushed"] == "43"
    assert outputs["gzip"] == "44"


def test_plugin_path_reads_store_layers_through_crfs_so(reports: dict[str, PathReport]) -> None:
    # Every container of the eStargz image mounted its store layer as //crfs/KEY//.
    assert reports["plugin"].plugin_mounts >= 3
    assert reports["store"].plugin_mounts == reports["kernel"].plugin_mounts == 0


def test_store_is_mounted_in_podmans_namespace_only(user: PodmanUser, reports: dict[str, PathReport]) -> None:
    pid = user.worker_pid()
    assert pid is not None
    pause = int((user.runtime / "libpod" / "tmp" / "pause.pid").read_text())
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(f"/proc/{pause}/ns/mnt").st_ino
    assert user.store_mounted()
    ours = Path("/proc/self/mountinfo").read_text()
    assert str(user.store) not in ours


def test_setup_script_is_idempotent(user: PodmanUser) -> None:
    conf = user.home / ".config" / "containers" / "storage.conf"
    before = conf.read_bytes(), Path("/etc/subuid").read_text()
    again = PodmanUser.ensure(USER)
    assert (conf.read_bytes(), Path("/etc/subuid").read_text()) == before
    assert sum(line.startswith(f"{USER}:") for line in before[1].splitlines()) == 1
    assert again.uid == user.uid
    assert oct(os.stat("/dev/fuse").st_mode & 0o777) == "0o666"


def test_setup_script_refuses_bad_input() -> None:
    script = Path(__file__).resolve().parent.parent / "podman-examples" / "setup-rootless.sh"
    for args, message in ((["no-such-user-crfs"], "no such user"), (["root"], "must not be root"), ([], "usage")):
        result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True)
        assert result.returncode != 0
        assert message in (result.stderr + result.stdout).lower()


def test_a_layer_whose_toc_does_not_verify_is_pulled_by_podman(user: PodmanUser, images: E2EImages, work: Path,
                                                               reports: dict[str, PathReport]) -> None:
    """The store cannot verify the layer, so podman's stat of it fails and podman pulls the
    layer itself (containers/storage takes any stat error for "not in this store"): the
    container runs, from bytes podman checked, and the worker log says why."""
    repository = images.esgz_ref.split("/", 1)[1].rsplit(":", 1)[0]
    broken = ImageReference(images.registry.host, repository, "broken-toc")
    with RegistryClient() as client:
        original = client.get_manifest(ImageReference(images.registry.host, repository, "esgz"))
        manifest = json.loads(original.data)
        manifest["layers"][-1]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] = "sha256:" + "0" * 64
        client.put_manifest(broken, json.dumps(manifest).encode(), original.media_type)
    user.start_worker()  # the worker that ran the good tag: its open layer of this blob does not count here
    root = PodmanRoot(user.make_dir(work / "broken" / "root"), user.make_dir(user.runtime / f"e2e-broken-{work.name}"),
                      PATHS["store"], user.store)
    mark = images.registry.mark()
    try:
        done = user.podman(root, "run", "--rm", "--network", "none", "--tls-verify=false", str(broken),
                           "python3", "-c", "print(45)")
    finally:
        user.podman(root, "rmi", "-a", "-f", check=False)
    assert done.stdout.strip() == "45"
    assert images.registry.fetched_since(mark).blob_bytes >= images.esgz_layers[-1][1]  # the whole layer
    assert "TOC does not match its digest" in user.worker_log()


def test_worker_follows_podman_into_new_namespaces(user: PodmanUser, reports: dict[str, PathReport]) -> None:
    """`podman system migrate` restarts podman's pause process: the worker, stuck in the
    old namespaces, exits (a process cannot join a sibling user namespace) and a new one
    serves the store where podman looks."""
    old = user.worker_pid()
    assert old is not None
    user.podman(None, "system", "migrate")
    user.podman(None, "info", "--format", "{{.Host.OCIRuntime.Name}}")  # starts the new pause process
    deadline = time.monotonic() + 30
    while Path(f"/proc/{old}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{old}").exists(), user.worker_log()
    assert "podman moved to new namespaces" in user.worker_log()
    new = user.start_worker()
    pause = int((user.runtime / "libpod" / "tmp" / "pause.pid").read_text())
    assert os.stat(f"/proc/{new}/ns/mnt").st_ino == os.stat(f"/proc/{pause}/ns/mnt").st_ino
    assert user.store_mounted()
