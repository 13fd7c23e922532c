"""`convert`: real images (OCI layouts and a real docker-registry) -> eStargz images,
checked file by file against the original layer tars."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from crfs_worker.blob import LocalBlob
from crfs_worker.convert import ConversionError, ConvertOptions, convert
from crfs_worker.errors import InvalidReferenceError, NotFoundError, VerificationError
from crfs_worker.estargz_writer import EstargzOptions
from crfs_worker.imagestore import ImageStore, RegistryStore, open_location
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.oci_layout import OciLayout
from crfs_worker.progress import Progress
from crfs_worker.reference import ImageReference
from tests.support.images import (
    TestImage,
    TestLayer,
    build_test_image,
    check_layer_view,
    estargz_toc,
    push_image,
    read_tar_entries,
    standard_layers,
)
from tests.support.registry import RunningRegistry

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
QUIET = Progress.disabled()


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[TestLayer]:
    return standard_layers(tmp_path_factory.mktemp("tars"))


def options(**kwargs: Any) -> ConvertOptions:
    return ConvertOptions(progress=QUIET, estargz=EstargzOptions(chunk_size=1 << 20), **kwargs)


def check_converted_image(store: ImageStore, target: str, source_manifest: dict[str, Any],
                          source_config: dict[str, Any], layers: tuple[TestLayer, ...],
                          work: Path) -> dict[str, Any]:
    """The converted manifest: eStargz layers reading back as the original tars,
    annotations and config right. Returns the manifest."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = store.get_manifest(target)
    document = json.loads(manifest.data)
    docker = manifest.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert document["mediaType"] == source_manifest["mediaType"]
    config = json.loads(store.get_blob(document["config"]["digest"]))
    assert document["config"]["mediaType"] == source_manifest["config"]["mediaType"]
    assert len(document["layers"]) == len(layers)
    diff_ids = []
    for number, (desc, layer) in enumerate(zip(document["layers"], layers)):
        assert desc["mediaType"] == (DOCKER_GZIP if docker else OCI_GZIP)
        blob = store.get_blob(desc["digest"])
        assert len(blob) == desc["size"]
        tar = gzip.decompress(blob)
        assert desc["annotations"][UNCOMPRESSED_SIZE] == str(len(tar))
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        assert read_tar_entries(io.BytesIO(blob)) == layer.entries
        path = work / f"layer-{number}.esgz"
        path.write_bytes(blob)
        # Layer.open checks the TOC against the toc.digest annotation.
        with LocalBlob(path) as local, \
                Layer.open(LayerSource(local, desc["annotations"][TOC_DIGEST], desc["annotations"]),
                           work / f"index-{number}") as view:
            check_layer_view(view, layer.entries)
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    without_rootfs = {k: v for k, v in config.items() if k != "rootfs"}
    assert without_rootfs == {k: v for k, v in source_config.items() if k != "rootfs"}
    return document


def source_documents(image: TestImage, platform_index: int = 0) -> tuple[dict, dict]:
    layout = OciLayout(image.layout)
    manifest = json.loads(layout.get_blob(image.images[platform_index].manifest_digest))
    config = json.loads(layout.get_blob(manifest["config"]["digest"]))
    return manifest, config


@pytest.mark.parametrize("flavour,compression", [
    ("oci", "gzip"), ("oci", "zstd"), ("oci", "none"), ("docker", "gzip")])
def test_oci_layout_to_oci_layout(layers: list[TestLayer], tmp_path: Path, flavour: str,
                                  compression: str) -> None:
    image = build_test_image(tmp_path / "src", compression=compression, flavour=flavour,
                             layers=layers, tag="v1")
    result = convert(image.reference, f"oci:{tmp_path / 'dst'}:esgz", options())
    assert result.reference == f"oci:{tmp_path / 'dst'}:esgz"
    assert [layer.copied for layer in result.layers] == [False] * 3
    store = OciLayout(tmp_path / "dst")
    assert store.resolve("esgz")["digest"] == result.digest
    manifest, config = source_documents(image)
    check_converted_image(store, "esgz", manifest, config, image.layers, tmp_path)


def test_registry_to_registry_reads_lazily(layers: list[TestLayer], tmp_path: Path,
                                           registry: RunningRegistry) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    with registry.client() as client:
        push_image(image, client, f"{registry.host}/convert/src:v1")
        result = convert(f"{registry.host}/convert/src:v1", f"{registry.host}/convert/dst:esgz",
                         options(), client)
        store = RegistryStore(client, ImageReference(registry.host, "convert/dst"))
        manifest, config = source_documents(image)
        document = check_converted_image(store, "esgz", manifest, config, image.layers, tmp_path)
        assert store.get_manifest("esgz").digest == result.digest
        # Straight from the registry with Range requests, as the filesystem will.
        desc = document["layers"][2]
        blob = client.blob(store.reference(None), desc["digest"], desc["size"])
        source = LayerSource(blob, desc["annotations"][TOC_DIGEST], desc["annotations"])
        with Layer.open(source, tmp_path / "lazy-index") as view:
            check_layer_view(view, image.layers[2].entries)


def test_registry_to_oci_layout(layers: list[TestLayer], tmp_path: Path,
                                registry: RunningRegistry) -> None:
    image = build_test_image(tmp_path / "src", compression="zstd", layers=layers)
    with registry.client() as client:
        push_image(image, client, f"{registry.host}/convert/zstd:v1")
        convert(f"{registry.host}/convert/zstd:v1", f"oci:{tmp_path / 'dst'}", options(), client)
    manifest, config = source_documents(image)
    # No tag given for the destination: "latest".
    check_converted_image(OciLayout(tmp_path / "dst"), "latest", manifest, config,
                          image.layers, tmp_path)


def test_multi_platform_index_converted_whole(layers: list[TestLayer], tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers,
                             platforms=("linux/amd64", "linux/arm64"))
    result = convert(image.reference, f"oci:{tmp_path / 'dst'}:all", options())
    # Layers shared by both platforms are converted once.
    assert len(result.layers) == 4
    store = OciLayout(tmp_path / "dst")
    index = json.loads(store.get_manifest("all").data)
    source_index = json.loads(OciLayout(image.layout).get_manifest(image.digest).data)
    assert index["mediaType"] == source_index["mediaType"]
    assert [m["platform"] for m in index["manifests"]] == \
        [m["platform"] for m in source_index["manifests"]]
    for number, (entry, platform_image) in enumerate(zip(index["manifests"], image.images)):
        manifest, config = source_documents(image, number)
        check_converted_image(store, entry["digest"], manifest, config, platform_image.layers,
                              tmp_path / platform_image.platform.replace("/", "-"))


def test_attestations_are_copied_and_follow_their_image(layers: list[TestLayer],
                                                        tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers,
                             platforms=("linux/amd64", "linux/arm64"))
    layout = OciLayout(image.layout)
    statement = b'{"_type": "https://in-toto.io/Statement/v0.1"}'
    statement_digest = "sha256:" + hashlib.sha256(statement).hexdigest()
    layout.put_blob(statement_digest, statement)
    empty_config = b"{}"
    layout.put_blob("sha256:" + hashlib.sha256(empty_config).hexdigest(), empty_config)
    attestation = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(empty_config).hexdigest(), "size": 2},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": statement_digest,
                    "size": len(statement)}]}).encode()
    attestation_digest = layout.put_manifest(attestation, "application/vnd.oci.image.manifest.v1+json",
                                             None)
    index = json.loads(layout.get_blob(image.digest))
    amd64 = image.images[0].manifest_digest
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": attestation_digest,
        "size": len(attestation), "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                        "vnd.docker.reference.digest": amd64}})
    layout.put_manifest(json.dumps(index).encode(), index["mediaType"], "attested")

    convert(f"oci:{image.layout}:attested", f"oci:{tmp_path / 'dst'}:v1", options())
    store = OciLayout(tmp_path / "dst")
    converted = json.loads(store.get_manifest("v1").data)["manifests"]
    assert converted[2]["digest"] == attestation_digest
    assert store.get_blob(statement_digest) == statement
    assert converted[2]["annotations"]["vnd.docker.reference.digest"] == converted[0]["digest"]
    assert converted[0]["digest"] != amd64


def test_docker_manifest_list_with_platform_filter(layers: list[TestLayer],
                                                   tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers, flavour="docker",
                             platforms=("linux/amd64", "linux/arm64"))
    result = convert(image.reference, f"oci:{tmp_path / 'dst'}:arm",
                     options(platform="linux/arm64"))
    assert result.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    store = OciLayout(tmp_path / "dst")
    manifest, config = source_documents(image, 1)
    check_converted_image(store, "arm", manifest, config, image.platform("linux/arm64").layers,
                          tmp_path)
    assert json.loads(store.get_blob(json.loads(store.get_manifest("arm").data)["config"]["digest"]))[
        "architecture"] == "arm64"
    with pytest.raises(ConversionError, match=r"linux/s390x.*linux/amd64, linux/arm64"):
        convert(image.reference, f"oci:{tmp_path / 'dst'}:x", options(platform="linux/s390x"))


def test_estargz_layers_are_copied_as_they_are(layers: list[TestLayer], tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    first = convert(image.reference, f"oci:{tmp_path / 'once'}:v1", options())
    again = convert(f"oci:{tmp_path / 'once'}:v1", f"oci:{tmp_path / 'twice'}:v1", options())
    assert [layer.copied for layer in again.layers] == [True] * 3
    assert again.digest == first.digest


def test_one_prioritized_list_serves_every_layer(layers: list[TestLayer], tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    wanted = ("bin/busybox", "usr/share/hl/link1", "/data/big.bin", "no/such/file")
    result = convert(image.reference, f"oci:{tmp_path / 'dst'}", ConvertOptions(
        progress=QUIET, estargz=EstargzOptions(prioritized_files=wanted)))
    assert result.missing_prioritized == ("no/such/file",)
    store = OciLayout(tmp_path / "dst")
    manifest = json.loads(store.get_manifest(None).data)
    heads = []
    for desc in manifest["layers"]:
        names = [e["name"] for e in estargz_toc(store.get_blob(desc["digest"]))["entries"]
                 if e["type"] != "chunk"]
        heads.append(names[:names.index(".prefetch.landmark")])
    assert heads == [["bin/", "bin/busybox"],
                     ["usr/", "usr/share/", "usr/share/hl/", "usr/share/hl/original",
                      "usr/share/hl/link1"],
                     ["./", "./data/", "./data/big.bin"]]


def test_corrupt_source_blob_is_refused_and_nothing_is_tagged(layers: list[TestLayer],
                                                              tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    digest = image.images[0].layer_digests[1]
    blob_path = OciLayout(image.layout).blob_path(digest)
    data = bytearray(blob_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern inside the deflate stream
    blob_path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=rf"layer 2/3 \({digest}\)"):
        convert(image.reference, f"oci:{tmp_path / 'dst'}:v1", options())
    with pytest.raises(NotFoundError):
        OciLayout(tmp_path / "dst").resolve("v1")  # nothing was tagged


def test_missing_blob_names_the_layer(layers: list[TestLayer], tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    digest = image.images[0].layer_digests[2]
    OciLayout(image.layout).blob_path(digest).unlink()
    with pytest.raises(NotFoundError, match=rf"layer 3/3 \({digest}\).*missing"):
        convert(image.reference, f"oci:{tmp_path / 'dst'}", options())


def test_unsupported_layer_media_type_names_the_layer(layers: list[TestLayer],
                                                      tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    layout = OciLayout(image.layout)
    manifest = json.loads(layout.get_blob(image.digest))
    manifest["layers"][0]["mediaType"] = "application/vnd.in-toto+json"
    layout.put_manifest(json.dumps(manifest).encode(), manifest["mediaType"], "odd")
    with pytest.raises(ConversionError, match=r"layer 1/3 .*application/vnd.in-toto\+json"):
        convert(f"oci:{image.layout}:odd", f"oci:{tmp_path / 'dst'}", options())


def test_destination_must_be_a_tag(tmp_path: Path, layers: list[TestLayer]) -> None:
    image = build_test_image(tmp_path / "src", layers=layers)
    with pytest.raises(InvalidReferenceError, match="needs a tag"):
        convert(image.reference, f"oci:{tmp_path / 'dst'}@sha256:{'0' * 64}", options())


def test_progress_is_drawn_only_to_the_given_stream(layers: list[TestLayer],
                                                    tmp_path: Path) -> None:
    image = build_test_image(tmp_path / "src", layers=layers[:1])
    shown = io.StringIO()
    convert(image.reference, f"oci:{tmp_path / 'dst'}", ConvertOptions(progress=Progress(shown)))
    assert "convert" in shown.getvalue() and "eStargz" in shown.getvalue()
    # Under pytest stdout is not a terminal: the default draws nothing.
    assert not Progress.for_terminal().enabled


def test_open_location_parses_both_kinds(tmp_path: Path, registry: RunningRegistry) -> None:
    with registry.client() as client:
        oci = open_location(f"oci:{tmp_path / 'x'}:v2", client, create=True)
        assert (oci.store.name, oci.target) == (f"oci:{tmp_path / 'x'}", "v2")
        reg = open_location(f"{registry.host}/a/b:t", client)
        assert (reg.store.name, reg.target) == (f"{registry.host}/a/b", "t")
    with pytest.raises(InvalidReferenceError):
        open_location("oci:", None)
    shutil.rmtree(tmp_path / "x")
