"""An image as crfs reads it: one manifest's layers, opened as verified Layers, and the
merged tree they make (the uppermost layer wins; whiteouts and opaque dirs hide).

    with open_image("127.0.0.1:5000/app:esgz", index_dir()) as image:
        layer, path = image.resolve("etc/os-release")
        data = layer.read(path, 0, layer.stat(path).size)
"""
from __future__ import annotations

import platform
import posixpath
import stat as stat_module
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FormatError, InvalidReferenceError, NotFoundError
from .footer import ESTARGZ_TOC_DIGEST, OLD_ZSTD_MANIFEST_CHECKSUM, ZSTD_MANIFEST_CHECKSUM
from .imagestore import ImageLocation, ImageStore, open_location
from .jsondoc import json_object
from .layer import Layer, LayerSource
from .reference import is_valid_digest
from .registry import Manifest, RegistryClient

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_MANIFEST_LAYERS = 1000  # OCI registries cap images far lower; a manifest with more is hostile


@dataclass(frozen=True)
class LayerDescriptor:
    """One layer as a manifest describes it."""

    digest: str
    size: int
    media_type: str
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def toc_digest(self) -> str | None:
        """The digest that vouches for the TOC, from whichever annotation the format uses."""
        for key in (ESTARGZ_TOC_DIGEST, ZSTD_MANIFEST_CHECKSUM, OLD_ZSTD_MANIFEST_CHECKSUM):
            if key in self.annotations:
                return self.annotations[key]
        return None


def host_platform() -> dict[str, str]:
    """The platform a multi-platform index resolves to by default: this machine's."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)
    return {"os": "linux", "architecture": arch}


def parse_platform(text: str) -> dict[str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidReferenceError(f"platform {text!r} is not OS/ARCH[/VARIANT]")
    wanted = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        wanted["variant"] = parts[2]
    return wanted


def select_manifest(store: ImageStore, target: str | None, wanted: dict[str, str] | None,
                    name: str) -> tuple[Manifest, dict[str, Any]]:
    """The image manifest `target` names; an index is resolved to the wanted platform."""
    manifest = store.get_manifest(target)
    doc = json_object(manifest.data, f"{name}: manifest")
    if not manifest.is_index:
        return manifest, doc
    wanted = wanted or host_platform()
    seen = []
    for child in doc.get("manifests") or []:
        plat = child.get("platform") if isinstance(child, dict) else None
        if not isinstance(plat, dict):
            continue
        seen.append("/".join(str(plat.get(k)) for k in ("os", "architecture", "variant") if plat.get(k)))
        if all(plat.get(k) == v for k, v in wanted.items()) and is_valid_digest(str(child.get("digest"))):
            chosen = store.get_manifest(child["digest"])
            return chosen, json_object(chosen.data, f"{name} ({seen[-1]}): manifest")
    raise NotFoundError(f"{name}: no image for platform {'/'.join(wanted.values())} "
                        f"(the index has: {', '.join(seen) or 'none'})")


def layer_descriptors(doc: dict[str, Any], name: str) -> list[LayerDescriptor]:
    """The manifest's layers, lowest first, validated."""
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{name}: the manifest has no layer list")
    if len(layers) > MAX_MANIFEST_LAYERS:
        raise FormatError(f"{name}: {len(layers)} layers, more than {MAX_MANIFEST_LAYERS}")
    out = []
    for i, layer in enumerate(layers):
        where = f"{name}: layer {i}"
        if not isinstance(layer, dict) or not is_valid_digest(str(layer.get("digest"))):
            raise FormatError(f"{where}: no valid digest")
        size = layer.get("size")
        if not isinstance(size, int) or size < 0:
            raise FormatError(f"{where}: no valid size")
        annotations = layer.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise FormatError(f"{where}: annotations are not strings")
        out.append(LayerDescriptor(layer["digest"], size, str(layer.get("mediaType", "")), annotations))
    return out


@dataclass
class OpenedLayer:
    descriptor: LayerDescriptor
    layer: Layer


@dataclass
class Image:
    """The opened layers of one image, lowest first, and the merged view over them."""

    name: str
    manifest_digest: str
    layers: list[OpenedLayer]
    _resources: ExitStack

    def close(self) -> None:
        self._resources.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, path: str) -> tuple[Layer, str]:
        """The layer whose entry is visible at `path` in the merged tree, and the path in it."""
        return resolve_merged([o.layer for o in reversed(self.layers)], path)


def _parts(path: str) -> list[str]:
    norm = posixpath.normpath("/" + path).lstrip("/")
    return [p for p in norm.split("/") if p] if norm else []


def _hidden_below(layer: Layer, parts: list[str]) -> bool:
    """Whether `layer` hides the path from the layers below it: a whiteout of the path or
    of an ancestor, an opaque ancestor, or an ancestor that is not a directory."""
    for depth in range(len(parts)):
        parent, base = "/".join(parts[:depth]), parts[depth]
        if layer.exists(posixpath.join(parent, WHITEOUT_PREFIX + base)):
            return True
        if depth < len(parts) - 1:
            prefix = "/".join(parts[: depth + 1])
            if layer.exists(posixpath.join(prefix, OPAQUE_MARKER)):
                return True
            if layer.exists(prefix) and not stat_module.S_ISDIR(layer.stat(prefix).mode):
                return True
    return False


def resolve_merged(uppermost_first: list[Layer], path: str) -> tuple[Layer, str]:
    parts = _parts(path)
    rel = "/".join(parts)
    if parts and parts[-1].startswith(WHITEOUT_PREFIX):
        raise FileNotFoundError(path)  # whiteouts are instructions, not files of the merged tree
    for layer in uppermost_first:
        if layer.exists(rel):
            return layer, rel
        if _hidden_below(layer, parts):
            break
    raise FileNotFoundError(path)


def open_image(text: str, index_dir: Path, *, client: RegistryClient | None = None,
               platform_text: str | None = None, allow_unverified: bool = False) -> Image:
    """Opens every layer of the image `text` names (a registry reference or `oci:DIR[:TAG]`).
    Only TOCs are fetched; file contents come later, on read."""
    resources = ExitStack()
    try:
        if client is None and not text.startswith("oci:"):
            client = resources.enter_context(RegistryClient())
        location: ImageLocation = open_location(text, client)
        resources.callback(location.store.close)
        wanted = parse_platform(platform_text) if platform_text else None
        manifest, doc = select_manifest(location.store, location.target, wanted, text)
        opened = []
        for desc in layer_descriptors(doc, text):
            blob = location.store.open_blob(desc.digest, desc.size)
            if hasattr(blob, "close"):
                resources.callback(blob.close)
            source = LayerSource(blob, desc.toc_digest, dict(desc.annotations), allow_unverified)
            layer = Layer.open(source, index_dir)
            resources.callback(layer.close)
            opened.append(OpenedLayer(desc, layer))
        return Image(text, manifest.digest, opened, resources)
    except BaseException:
        resources.close()
        raise
