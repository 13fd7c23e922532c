"""Interoperability with stargz-snapshotter's own producer, `ctr-remote`.

One private containerd pulls a test image from the fixture registry, converts it
with `ctr-remote image convert --estargz --oci` and `--zstdchunked --oci`, and
pushes the results back. crfs must read every file of those images byte for byte
(lazily, through Range requests), and the eStargz that crfs writes must carry the
same TOC as ctr-remote's for the same layers (offsets and compression aside).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from crfs_worker.convert import ConvertOptions, convert
from crfs_worker.imagestore import RegistryStore
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.progress import Progress
from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient
from tests.support.containerd import PrivateContainerd
from tests.support.images import (
    TestImage,
    build_test_image,
    check_layer_view,
    estargz_toc,
    push_image,
)
from tests.support.registry import RunningRegistry

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"


@dataclass(frozen=True)
class Interop:
    image: TestImage
    host: str
    estargz: str        # repository:tag that ctr-remote pushed
    zstdchunked: str
    crfs: str           # the same image converted by crfs


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory,
            registry: RunningRegistry) -> Iterator[Interop]:
    work = tmp_path_factory.mktemp("interop")
    image = build_test_image(work / "src")
    host = registry.host
    source = f"{host}/interop/src:v1"
    with registry.client() as client:
        push_image(image, client, source)
        convert(source, f"{host}/interop/crfs:v1",
                ConvertOptions(progress=Progress.disabled()), client)
    with PrivateContainerd.start(work / "containerd") as ctd:
        ctd.ctr("image", "pull", "--plain-http", source)
        for flag, name in (("--estargz", "estargz"), ("--zstdchunked", "zstdchunked")):
            target = f"{host}/interop/{name}:v1"
            ctd.ctr("image", "convert", flag, "--oci", source, target)
            ctd.ctr("image", "push", "--plain-http", target)
    yield Interop(image, host, "interop/estargz:v1", "interop/zstdchunked:v1", "interop/crfs:v1")


def manifest_layers(client: RegistryClient, host: str, name: str) -> tuple[RegistryStore,
                                                                           list[dict[str, Any]]]:
    repository, tag = name.split(":")
    store = RegistryStore(client, ImageReference(host, repository))
    manifest = json.loads(store.get_manifest(tag).data)
    if "manifests" in manifest:  # ctr-remote may wrap a single platform in an index
        manifest = json.loads(store.get_manifest(manifest["manifests"][0]["digest"]).data)
    return store, manifest["layers"]


@pytest.mark.parametrize("kind", ["estargz", "zstdchunked"])
def test_crfs_reads_every_file_ctr_remote_wrote(interop: Interop, registry: RunningRegistry,
                                                tmp_path: Path, kind: str) -> None:
    expected_format = {"estargz": "estargz", "zstdchunked": "zstdchunked-estargz"}[kind]
    with registry.client() as client:
        store, layers = manifest_layers(client, interop.host, getattr(interop, kind))
        assert len(layers) == len(interop.image.layers)
        for number, (desc, original) in enumerate(zip(layers, interop.image.layers)):
            annotations = desc.get("annotations") or {}
            assert TOC_DIGEST in annotations
            blob = client.blob(store.reference(None), desc["digest"], desc["size"])
            with Layer.open(LayerSource(blob, None, annotations), tmp_path / f"{number}") as view:
                assert view.format == expected_format
                check_layer_view(view, original.entries)


def comparable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries without what legitimately differs between producers: compressed offsets,
    and user/group names, which are written only when they change (ctr-remote restarts
    that bookkeeping for each of its parallel parts), so they are resolved here."""
    names: dict[tuple[str, int], str] = {}
    result = []
    for entry in entries:
        entry = {k: v for k, v in entry.items() if k != "offset"}
        for key, id_key in (("userName", "uid"), ("groupName", "gid")):
            if entry["type"] == "chunk":
                continue
            ident = (key, entry.get(id_key, 0))
            if key in entry:
                names[ident] = entry[key]
            elif ident in names:
                entry[key] = names[ident]
        result.append(entry)
    return result


def test_crfs_writes_the_toc_ctr_remote_writes(interop: Interop,
                                                registry: RunningRegistry) -> None:
    with registry.client() as client:
        ours_store, ours = manifest_layers(client, interop.host, interop.crfs)
        theirs_store, theirs = manifest_layers(client, interop.host, interop.estargz)
        ours_total = theirs_total = 0
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine["mediaType"] == reference["mediaType"]
            assert set(mine["annotations"]) >= set(reference["annotations"])
            mine_blob = ours_store.get_blob(mine["digest"])
            their_blob = theirs_store.get_blob(reference["digest"])
            assert comparable(estargz_toc(mine_blob)["entries"]) == comparable(estargz_toc(their_blob)["entries"])
            for desc, blob in ((mine, mine_blob), (reference, their_blob)):
                assert desc["annotations"][UNCOMPRESSED_SIZE] == str(len(gzip.decompress(blob)))
            ours_total += len(mine_blob)
            theirs_total += len(their_blob)
    # crfs' default (zlib level 6) must not produce more bytes than ctr-remote's (Go, 9).
    assert ours_total <= theirs_total, (ours_total, theirs_total)
