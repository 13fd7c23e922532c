"""`crfs convert SRC DST`: an image (or a whole multi-platform index) -> eStargz.

Every tar layer (gzip, zstd or uncompressed; OCI or Docker media types) is
rewritten by estargz_writer; layers that already carry a TOC digest are copied
as they are. The config gets the new `rootfs.diff_ids` (history untouched),
layer descriptors get the gzip media type of their manifest's flavour and the
`containerd.io/snapshot/stargz/toc.digest` and
`io.containers.estargz.uncompressed-size` annotations. Child manifests are
stored by digest, then the top manifest or index under DST's tag (`latest` if
DST names none).

Source blobs are digest-checked as they stream in; a converted blob is only
stored after its source has been verified to the last byte.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from .errors import CrfsError, FormatError, InvalidReferenceError
from .estargz_writer import EstargzOptions, EstargzResult, write_estargz
from .footer import ESTARGZ_TOC_DIGEST, ESTARGZ_UNCOMPRESSED_SIZE
from .image import parse_platform
from .imagestore import (
    DEFAULT_TAG,
    MAX_CONFIG_SIZE,
    BlobStream,
    ImageLocation,
    ImageStore,
    copy_blob,
    open_location,
)
from .jsondoc import json_object
from .progress import Progress, ProgressTask
from .reference import check_digest
from .registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
    RegistryClient,
)

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TAR_LAYER_MEDIA_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
})
# Annotations that describe the old blob's layout and would lie about the new one.
_STALE_ANNOTATION_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.",
                              "containerd.io/snapshot/stargz/", "io.containers.estargz.")
# BuildKit attaches provenance/SBOM "attestation manifests" to indexes; their
# layers are in-toto JSON, not tars, so they are copied, not converted.
_REFERENCE_TYPE_ANNOTATION = "vnd.docker.reference.type"
_REFERENCE_DIGEST_ANNOTATION = "vnd.docker.reference.digest"


class ConversionError(CrfsError):
    """The image cannot be converted (unsupported media type, no such platform...)."""


@dataclass(frozen=True)
class ConvertOptions:
    estargz: EstargzOptions = field(default_factory=EstargzOptions)
    platform: str | None = None     # "os/arch[/variant]": convert only that image of an index
    work_dir: Path | None = None    # temp files (converted blobs before upload)
    progress: Progress = field(default_factory=Progress.for_terminal)
    # Set by `crfs optimize`: every layer is rewritten (eStargz ones too), each with the
    # files listed under its source digest placed first (instead of estargz.prioritized_files).
    prioritized_by_layer: Mapping[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class ConvertedLayer:
    source_digest: str
    digest: str
    size: int
    toc_digest: str
    diff_id: str
    uncompressed_size: int | None   # None for a copied layer without the annotation
    copied: bool                    # already eStargz: copied as it was


@dataclass(frozen=True)
class ConvertResult:
    digest: str                     # the manifest or index stored under DST
    media_type: str
    reference: str                  # DST as stored (with its tag)
    layers: tuple[ConvertedLayer, ...]  # each distinct layer once
    # Prioritized files found in no converted layer (the list serves all layers).
    missing_prioritized: tuple[str, ...] = ()


def convert(src: str, dst: str, options: ConvertOptions | None = None,
            client: RegistryClient | None = None) -> ConvertResult:
    """Converts the image `src` names and stores it as `dst` (both `oci:DIR[:TAG]` or
    registry references)."""
    options = options or ConvertOptions()
    owned_client = client is None and not (src.startswith("oci:") and dst.startswith("oci:"))
    if owned_client:
        client = RegistryClient()
    try:
        source = open_location(src, client)
        dest = open_location(dst, client, create=True)
        if dest.target is not None and dest.tag is None:
            raise InvalidReferenceError(f"{dst}: a destination needs a tag, not a digest")
        # One prioritized list serves every layer: each holds some of the files.
        options = replace(options, estargz=replace(options.estargz, require_prioritized=False))
        with tempfile.TemporaryDirectory(dir=options.work_dir, prefix="crfs-convert-") as work:
            job = _Conversion(source, dest, options, Path(work))
            return job.run()
    finally:
        if owned_client and client is not None:
            client.close()


def _dump_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8")


def _descriptor(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("mediaType"), str) \
            or not isinstance(value.get("size"), int) or value["size"] < 0:
        raise FormatError(f"{what}: not a valid descriptor")
    check_digest(value.get("digest", ""), what)
    return value


class _Conversion:
    """One `convert` call: remembers converted layers so shared ones convert once."""

    def __init__(self, source: ImageLocation, dest: ImageLocation, options: ConvertOptions,
                 work_dir: Path) -> None:
        self._source = source
        self._src: ImageStore = source.store
        self._dst: ImageStore = dest.store
        self._tag = dest.tag or DEFAULT_TAG
        self._dest_text = dest.text
        self._options = options
        self._work_dir = work_dir
        self._layers: dict[str, ConvertedLayer] = {}
        # Starts as every prioritized file; each converted layer removes what it has.
        self._missing = set(options.estargz.prioritized_files)

    def run(self) -> ConvertResult:
        top = self._src.get_manifest(self._source.target)
        name = f"{self._source.text}"
        if top.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
            if self._options.platform is not None:
                child = self._pick_platform(top, name)
                data, media_type = self._convert_manifest(child, f"{name} ({self._options.platform})")
            else:
                data, media_type = self._convert_index(top, name), top.media_type
        elif top.media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
            if self._options.platform is not None:
                self._check_platform(top, name)
            data, media_type = self._convert_manifest(top, name)
        else:
            raise ConversionError(f"{name}: unsupported manifest media type {top.media_type!r}")
        digest = self._dst.put_manifest(data, media_type, self._tag)
        reference = self._dest_text if self._dest_text.endswith(f":{self._tag}") else \
            f"{self._dest_text}:{self._tag}"
        missing = tuple(p for p in self._options.estargz.prioritized_files if p in self._missing)
        return ConvertResult(digest, media_type, reference, tuple(self._layers.values()), missing)

    # --- indexes ---

    def _convert_index(self, index: Manifest, name: str) -> bytes:
        document = json_object(index.data, f"{name}: index")
        children = document.get("manifests")
        if not isinstance(children, list):
            raise FormatError(f"{name}: index has no manifests list")
        descriptors = [_descriptor(value, f"{name}: index entry {number}")
                       for number, value in enumerate(children)]
        new_digests: dict[str, str] = {}
        converted: list[dict[str, Any] | None] = [None] * len(descriptors)
        for number, child in enumerate(descriptors):
            if not _is_attestation(child):
                converted[number] = self._convert_child(child, f"{name}: {_platform_text(child)}")
                new_digests[child["digest"]] = converted[number]["digest"]  # type: ignore[index]
        for number, child in enumerate(descriptors):
            if _is_attestation(child):
                converted[number] = self._copy_attestation(child, new_digests, name)
        return _dump_json({**document, "manifests": converted})

    def _copy_attestation(self, child: dict[str, Any], new_digests: dict[str, str],
                          name: str) -> dict[str, Any]:
        """Attestations are copied; the image they describe now has a new digest."""
        self._copy_manifest_as_is(child, f"{name}: attestation {child['digest']}")
        annotations = dict(child.get("annotations") or {})
        subject = annotations.get(_REFERENCE_DIGEST_ANNOTATION)
        if subject in new_digests:
            annotations[_REFERENCE_DIGEST_ANNOTATION] = new_digests[subject]
        return {**child, "annotations": annotations}

    def _convert_child(self, child: dict[str, Any], name: str) -> dict[str, Any]:
        manifest = self._src.get_manifest(child["digest"])
        if manifest.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
            data, media_type = self._convert_index(manifest, name), manifest.media_type
        else:
            data, media_type = self._convert_manifest(manifest, name)
        digest = self._dst.put_manifest(data, media_type, None)
        return {**child, "mediaType": media_type, "digest": digest, "size": len(data)}

    def _copy_manifest_as_is(self, child: dict[str, Any], name: str) -> None:
        manifest = self._src.get_manifest(child["digest"])
        document = json_object(manifest.data, f"{name}: manifest")
        for blob in [document.get("config"), *(document.get("layers") or [])]:
            if blob is not None:
                desc = _descriptor(blob, f"{name}: descriptor")
                copy_blob(self._src, self._dst, desc["digest"], desc["size"], self._work_dir)
        self._dst.put_manifest(manifest.data, manifest.media_type, None)

    def _pick_platform(self, index: Manifest, name: str) -> Manifest:
        wanted = parse_platform(self._options.platform or "")
        document = json_object(index.data, f"{name}: index")
        available = []
        for value in document.get("manifests") or []:
            platform = value.get("platform") if isinstance(value, dict) else None
            if isinstance(platform, dict):
                available.append(_platform_text(value))
                if all(platform.get(key) == wanted[key] for key in wanted):
                    child = _descriptor(value, f"{name}: index entry")
                    return self._src.get_manifest(child["digest"])
        raise ConversionError(f"{name}: no image for platform {self._options.platform} "
                              f"(available: {', '.join(available) or 'none'})")

    def _check_platform(self, manifest: Manifest, name: str) -> None:
        wanted = parse_platform(self._options.platform or "")
        document = json_object(manifest.data, f"{name}: manifest")
        config_desc = _descriptor(document.get("config"), f"{name}: config")
        config = json_object(self._src.get_blob(config_desc["digest"], MAX_CONFIG_SIZE),
                            f"{name}: config")
        if any(config.get(key) != wanted[key] for key in wanted):
            have = "/".join(str(config.get(k)) for k in ("os", "architecture", "variant")
                            if config.get(k))
            raise ConversionError(f"{name}: the image is for {have}, "
                                  f"not {self._options.platform}")

    # --- manifests ---

    def _convert_manifest(self, manifest: Manifest, name: str) -> tuple[bytes, str]:
        if manifest.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise ConversionError(f"{name}: unsupported manifest media type "
                                  f"{manifest.media_type!r}")
        document = json_object(manifest.data, f"{name}: manifest")
        docker = manifest.media_type == DOCKER_MANIFEST
        config_desc = _descriptor(document.get("config"), f"{name}: config")
        config = json_object(self._src.get_blob(config_desc["digest"], MAX_CONFIG_SIZE),
                            f"{name}: config")
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise FormatError(f"{name}: manifest has no layers list")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise FormatError(f"{name}: config has {len(diff_ids or [])} diff_ids for "
                              f"{len(layers)} layers")
        new_layers, new_diff_ids = [], []
        for number, value in enumerate(layers):
            what = f"{name}: layer {number + 1}/{len(layers)}"
            desc = _descriptor(value, what)
            what = f"{what} ({desc['digest']})"
            converted = self._layer(desc, what, docker)
            new_layers.append(self._layer_descriptor(desc, converted, docker))
            new_diff_ids.append(diff_ids[number] if converted.copied else converted.diff_id)
        config["rootfs"] = {**config["rootfs"], "diff_ids": new_diff_ids}
        config_bytes = _dump_json(config)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        self._dst.put_blob(config_digest, config_bytes)
        new_document = {**document, "layers": new_layers,
                        "config": {**config_desc, "digest": config_digest,
                                   "size": len(config_bytes)}}
        return _dump_json(new_document), manifest.media_type

    @staticmethod
    def _layer_descriptor(desc: dict[str, Any], layer: ConvertedLayer,
                          docker: bool) -> dict[str, Any]:
        if layer.copied:
            return desc
        annotations = {key: value for key, value in (desc.get("annotations") or {}).items()
                       if not key.startswith(_STALE_ANNOTATION_PREFIXES)}
        annotations[ESTARGZ_TOC_DIGEST] = layer.toc_digest
        annotations[ESTARGZ_UNCOMPRESSED_SIZE] = str(layer.uncompressed_size)
        new = {key: value for key, value in desc.items()
               if key not in ("urls", "annotations", "data")}
        new.update(mediaType=DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP,
                   digest=layer.digest, size=layer.size, annotations=annotations)
        return new

    # --- layers ---

    def _layer(self, desc: dict[str, Any], what: str, docker: bool) -> ConvertedLayer:
        source_digest = desc["digest"]
        if source_digest in self._layers:
            return self._layers[source_digest]
        annotations = desc.get("annotations") or {}
        try:
            by_layer = self._options.prioritized_by_layer
            if ESTARGZ_TOC_DIGEST in annotations and by_layer is None:
                layer = self._copy_layer(desc, annotations)
            elif desc["mediaType"] in TAR_LAYER_MEDIA_TYPES:
                estargz = self._options.estargz
                if by_layer is not None:
                    estargz = replace(estargz, prioritized_files=tuple(by_layer.get(source_digest, ())))
                layer = self._convert_layer(desc, what, estargz)
            else:
                raise ConversionError(f"{what}: unsupported layer media type "
                                      f"{desc['mediaType']!r}")
        except CrfsError as exc:
            if what in str(exc):
                raise
            raise type(exc)(f"{what}: {exc}") from exc
        self._layers[source_digest] = layer
        return layer

    def _copy_layer(self, desc: dict[str, Any], annotations: dict[str, str]) -> ConvertedLayer:
        task = self._options.progress.task(f"copy {desc['digest'][7:19]}", desc["size"])
        copy_blob(self._src, self._dst, desc["digest"], desc["size"], self._work_dir)
        task.finish("already eStargz")
        size_text = annotations.get(ESTARGZ_UNCOMPRESSED_SIZE, "")
        return ConvertedLayer(
            source_digest=desc["digest"], digest=desc["digest"], size=desc["size"],
            toc_digest=annotations[ESTARGZ_TOC_DIGEST], diff_id="",
            uncompressed_size=int(size_text) if size_text.isdigit() else None, copied=True)

    def _convert_layer(self, desc: dict[str, Any], what: str, estargz: EstargzOptions) -> ConvertedLayer:
        task = self._options.progress.task(f"convert {desc['digest'][7:19]}", desc["size"])
        fd, name = tempfile.mkstemp(dir=self._work_dir, prefix="layer-", suffix=".esgz")
        out_path = Path(name)
        try:
            with open(fd, "wb") as out, BlobStream(self._src, desc["digest"], desc["size"]) as blob:
                try:
                    result = write_estargz(_Counting(blob, task), out, estargz, what)
                except FormatError:
                    blob.finish()  # a blob that fails its digest explains a broken tar better
                    raise
                blob.finish()  # the source's digest is checked only once all of it is read
            self._dst.put_blob(result.blob_digest, out_path)
        finally:
            out_path.unlink(missing_ok=True)
        task.finish(f"-> {result.blob_size / 1e6:.1f} MB eStargz")
        if estargz.prioritized_files and self._options.prioritized_by_layer is None:
            self._missing &= set(result.missing_prioritized)
        return _converted(desc["digest"], result)


def _converted(source_digest: str, result: EstargzResult) -> ConvertedLayer:
    return ConvertedLayer(source_digest=source_digest, digest=result.blob_digest,
                          size=result.blob_size, toc_digest=result.toc_digest,
                          diff_id=result.diff_id, uncompressed_size=result.uncompressed_size,
                          copied=False)


class _Counting:
    """A reader that reports how much was read to a progress task."""

    def __init__(self, inner: BinaryIO | BlobStream, task: ProgressTask) -> None:
        self._inner = inner
        self._task = task

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._task.advance(len(data))
        return data


def _is_attestation(descriptor: dict[str, Any]) -> bool:
    return _REFERENCE_TYPE_ANNOTATION in (descriptor.get("annotations") or {})


def _platform_text(descriptor: dict[str, Any]) -> str:
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return str(descriptor.get("digest"))
    return "/".join(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))
