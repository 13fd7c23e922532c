"""B1 cold start through podman's additional layer store: the layers of an image open as
soon as its manifest names them.

containers/storage stats STORE/REF/DIGEST/{diff,info,blob} while it pulls. The first
lookup under a reference fetches the image's manifest, and the worker then starts opening
every seekable layer it names at once (footer, TOC, digest check, index: LayerStore.
open_early -> LayerTable.mount_soon). The stat of `diff` still waits for its layer's open:
a layer whose TOC does not verify must fail it, because containers/storage takes any stat
error for "not in this store" and pulls the layer itself.
"""
from __future__ import annotations

import errno
import json
import os
import re
import time
from pathlib import Path

import pytest

from crfs_worker.reference import ImageReference
from tests.support.images import build_test_image
from tests.support.registry import RunningRegistry
from tests.test_layerstore import Pushed, StoreWorker, _convert, expected_diff, snapshot, worker  # noqa: F401

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the store's FUSE mount needs /dev/fuse (root here)")


@pytest.fixture(scope="module")
def converted(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    return _convert(registry, build_test_image(tmp_path_factory.mktemp("b1-store-image") / "oci"), "b1store/app")


def _with_wrong_toc_digest(registry: RunningRegistry, pushed: Pushed) -> str:
    """The same image under another tag, its top layer claiming a TOC digest it does not have."""
    manifest = json.loads(json.dumps(pushed.manifest))
    manifest["layers"][-1]["annotations"][TOC_DIGEST] = "sha256:" + "0" * 64
    ref = pushed.esgz.rsplit(":", 1)[0] + ":wrong-toc"
    with registry.client() as client:
        client.put_manifest(ImageReference.parse(ref), json.dumps(manifest).encode(), manifest["mediaType"])
    return ref


def test_a_layer_whose_toc_does_not_verify_fails_podmans_stat(worker: StoreWorker, registry: RunningRegistry,  # noqa: F811
                                                                converted: Pushed) -> None:
    ref = _with_wrong_toc_digest(registry, converted)
    layer = worker.layer_dir(ref, converted.layer_digests[-1])
    # What containers/storage does while it pulls: `diff` fails, so podman pulls the layer.
    with pytest.raises(OSError) as stat_diff:
        os.stat(layer / "diff")
    assert stat_diff.value.errno == errno.EIO
    assert json.loads((layer / "info").read_bytes())["compressed-diff-digest"] == converted.layer_digests[-1]
    with pytest.raises(OSError) as stat_blob:
        os.stat(layer / "blob")
    assert stat_blob.value.errno == errno.EIO
    log = (worker.runtime / "worker.log").read_text(errors="replace")
    assert "TOC does not match its digest" in log
    # The same blob under the good manifest is another layer: the bad one does not stand for it.
    good = worker.layer_dir(converted.esgz, converted.layer_digests[-1])
    assert snapshot(good / "diff") == expected_diff(converted.image.layers[-1].entries)


def test_a_layer_opened_beside_the_pull_serves_its_tree(worker: StoreWorker, converted: Pushed) -> None:  # noqa: F811
    # A fresh reference: its layers are looked up (and opened) for the first time here.
    layer = worker.layer_dir(converted.esgz, converted.layer_digests[0])
    for name in ("diff", "info", "blob"):
        os.stat(layer / name)
    assert snapshot(layer / "diff") == expected_diff(converted.image.layers[0].entries)


def test_the_first_lookup_opens_every_seekable_layer_of_the_image(worker: StoreWorker, registry: RunningRegistry,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    # Its own repository: no other test looked its layers up.
    pushed = _convert(registry, build_test_image(tmp_path / "oci"), "b1store/early")
    repository = pushed.esgz.rsplit(":", 1)[0]
    os.stat(worker.layer_dir(pushed.esgz, pushed.layer_digests[0]) / "diff")  # podman asks for one layer
    log = worker.runtime / "worker.log"
    wanted = {f"{repository}@{digest}" for digest in pushed.layer_digests}
    deadline = time.monotonic() + 60  # a bound on a hang, not a measurement
    opened: set[str] = set()
    while time.monotonic() < deadline and not wanted <= opened:
        opened = set(re.findall(r"opened layer \d+: (\S+)", log.read_text(errors="replace")))
        time.sleep(0.1)
    assert wanted <= opened
