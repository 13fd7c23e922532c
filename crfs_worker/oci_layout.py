"""OCI image-layout directories (`oci:DIR[:TAG]`), read and written.

The layout (OCI image-spec, image-layout.md): an `oci-layout` file
(`{"imageLayoutVersion": "1.0.0"}`), `index.json` (an image index whose
descriptors name tags with the `org.opencontainers.image.ref.name` annotation)
and content-addressed `blobs/ALG/HEX`. Blobs are written to a temp file,
checked against their digest and renamed into place, so a crash never leaves a
blob with the wrong content. index.json is replaced atomically; concurrent
writers to one layout are not coordinated (last write wins), as in skopeo.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .blob import LocalBlob
from .errors import FormatError, InvalidReferenceError, NotFoundError, VerificationError
from .jsondoc import json_object, parse_json
from .reference import check_digest, is_valid_digest
from .registry import OCI_INDEX, OCI_MANIFEST, Manifest

OCI_PREFIX = "oci:"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"
# Manifests and index.json are small JSON documents; refuse absurd ones.
MAX_MANIFEST_SIZE = 16 << 20
_READ_PIECE = 1 << 20

# image-spec's grammar for ref.name: components of alphanumerics joined by
# separators, components joined by "/".
_ALNUM = r"[A-Za-z0-9]+"
_COMPONENT = rf"{_ALNUM}(?:(?:[-._:@+]|--){_ALNUM})*"
_REF_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


@dataclass(frozen=True)
class OciReference:
    """`oci:DIR[:TAG]` or `oci:DIR@DIGEST`; neither tag nor digest: the only image."""

    directory: Path
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "OciReference":
        if not text.startswith(OCI_PREFIX):
            raise InvalidReferenceError(f"{text!r} is not an OCI layout reference (oci:DIR[:TAG])")
        rest = text[len(OCI_PREFIX):]
        digest = None
        if "@" in rest:
            rest, digest = rest.rsplit("@", 1)
            check_digest(digest, f"OCI layout reference {text!r}")
        # Like skopeo, the first ':' ends DIR: directories with ':' cannot be named.
        directory, sep, tag = rest.partition(":")
        if not directory:
            raise InvalidReferenceError(f"OCI layout reference {text!r} names no directory")
        if sep and _REF_NAME_RE.fullmatch(tag) is None:
            raise InvalidReferenceError(f"OCI layout reference {text!r}: invalid tag {tag!r}")
        return cls(Path(directory), tag if sep else None, digest)

    def __str__(self) -> str:
        text = f"{OCI_PREFIX}{self.directory}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _hex_of(digest: str) -> tuple[str, str]:
    algorithm, _, hexpart = digest.partition(":")
    return algorithm, hexpart


class OciLayout:
    """One OCI layout directory; implements imagestore.ImageStore."""

    def __init__(self, root: Path, create: bool = False) -> None:
        self.root = root
        if create:
            self._create()
        self._check_layout()

    @property
    def name(self) -> str:
        return f"{OCI_PREFIX}{self.root}"

    # --- manifests ---

    def resolve(self, tag: str | None) -> dict[str, Any]:
        """The index.json descriptor for `tag` (or the only one if `tag` is None)."""
        descriptors = self._index().get("manifests", [])
        if tag is None:
            if len(descriptors) != 1:
                tags = sorted(self._tags(descriptors))
                raise NotFoundError(
                    f"{self.name}: holds {len(descriptors)} images, name one with "
                    f"oci:DIR:TAG (tags: {', '.join(tags) or 'none'})")
            return descriptors[0]
        for descriptor in descriptors:
            if (descriptor.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag:
                return descriptor
        raise NotFoundError(f"{self.name}: no image tagged {tag!r}")

    def get_manifest(self, target: str | None) -> Manifest:
        """The manifest or index by tag, by digest, or (None) the only image."""
        if target is not None and is_valid_digest(target):
            digest, media_type = target, None
        else:
            descriptor = self.resolve(target)
            digest, media_type = descriptor.get("digest", ""), descriptor.get("mediaType")
            check_digest(digest, f"{self.name}: index.json descriptor")
        data = self.get_blob(digest, MAX_MANIFEST_SIZE)
        return Manifest(data=data, media_type=media_type or _media_type_of(data, self.name),
                        digest=digest)

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        """Stores the manifest blob; with a `tag`, also lists it in index.json under
        that tag (taking the tag from any other image). Without one it is reachable by
        digest only, as the children of an index are."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if tag is not None and _REF_NAME_RE.fullmatch(tag) is None:
            raise InvalidReferenceError(f"{self.name}: invalid tag {tag!r}")
        self.put_blob(digest, data)
        if tag is None:
            return digest
        index = self._index()
        descriptors = [d for d in index.get("manifests", [])
                       if (d.get("annotations") or {}).get(REF_NAME_ANNOTATION) != tag]
        descriptors.append({"mediaType": media_type, "digest": digest, "size": len(data),
                            "annotations": {REF_NAME_ANNOTATION: tag}})
        index["manifests"] = descriptors
        self._write_json_atomically(self.root / "index.json", index)
        return digest

    # --- blobs ---

    def blob_path(self, digest: str) -> Path:
        check_digest(digest, f"{self.name}: blob")
        algorithm, hexpart = _hex_of(digest)
        return self.root / "blobs" / algorithm / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def stream_blob(self, digest: str) -> Iterator[bytes]:
        """The blob in pieces; VerificationError after the last piece on a mismatch."""
        path = self.blob_path(digest)
        hasher = hashlib.new(_hex_of(digest)[0])
        try:
            blob = open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: blob {digest} is missing") from None
        with blob:
            while piece := blob.read(_READ_PIECE):
                hasher.update(piece)
                yield piece
        if hasher.hexdigest() != _hex_of(digest)[1]:
            raise VerificationError(f"{self.name}: blob {digest} does not match its digest "
                                    f"(got {_hex_of(digest)[0]}:{hasher.hexdigest()})")

    def get_blob(self, digest: str, max_size: int | None = None) -> bytes:
        size = self.blob_size(digest)
        if size is None:
            raise NotFoundError(f"{self.name}: blob {digest} is missing")
        if max_size is not None and size > max_size:
            raise FormatError(f"{self.name}: blob {digest} has {size} bytes, more than the "
                              f"{max_size} allowed for a manifest or config")
        return b"".join(self.stream_blob(digest))

    def open_blob(self, digest: str, size: int) -> LocalBlob:
        """Random access to one blob, for lazy layer reads. Not checked whole: the layer
        view checks the TOC and every chunk it reads."""
        path = self.blob_path(digest)
        if not path.is_file():
            raise NotFoundError(f"{self.name}: no blob {digest}")
        blob = LocalBlob(path)
        if blob.size != size:
            blob.close()
            raise FormatError(f"{self.name}: blob {digest} has {blob.size} bytes, its descriptor says {size}")
        return blob

    def put_blob(self, digest: str, source: Path | bytes) -> None:
        """Adds a blob (unless present), checking it against `digest`."""
        if self.has_blob(digest):
            return
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.new(_hex_of(digest)[0])
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in _pieces(source):
                    hasher.update(piece)
                    out.write(piece)
            if hasher.hexdigest() != _hex_of(digest)[1]:
                raise VerificationError(f"{self.name}: blob to store as {digest} has digest "
                                        f"{_hex_of(digest)[0]}:{hasher.hexdigest()}")
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Nothing to release; present for the ImageStore interface."""

    # --- internals ---

    def _create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").exists():
            self._write_json_atomically(self.root / "oci-layout",
                                        {"imageLayoutVersion": LAYOUT_VERSION})
        if not (self.root / "index.json").exists():
            self._write_json_atomically(self.root / "index.json", {
                "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})

    def _check_layout(self) -> None:
        marker = self._read_json(self.root / "oci-layout")
        if not isinstance(marker, dict) or "imageLayoutVersion" not in marker:
            raise FormatError(f"{self.name}: oci-layout has no imageLayoutVersion")

    def _index(self) -> dict[str, Any]:
        index = self._read_json(self.root / "index.json")
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list) \
                or not all(isinstance(d, dict) for d in index.get("manifests", [])):
            raise FormatError(f"{self.name}: index.json is not an OCI image index")
        return index

    def _read_json(self, path: Path) -> Any:
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: not an OCI layout ({path.name} is missing)") \
                from None
        if len(data) > MAX_MANIFEST_SIZE:
            raise FormatError(f"{self.name}: {path.name} is larger than {MAX_MANIFEST_SIZE} bytes")
        return parse_json(data, f"{self.name}: {path.name}")

    @staticmethod
    def _write_json_atomically(path: Path, value: Any) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(value, out, indent=2)
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @staticmethod
    def _tags(descriptors: list[dict[str, Any]]) -> Iterator[str]:
        for descriptor in descriptors:
            tag = (descriptor.get("annotations") or {}).get(REF_NAME_ANNOTATION)
            if isinstance(tag, str):
                yield tag


def _pieces(source: Path | bytes) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    with open(source, "rb") as file:
        while piece := file.read(_READ_PIECE):
            yield piece


def _media_type_of(data: bytes, where: str) -> str:
    """A manifest reached by digest alone: its own mediaType field, or its shape."""
    document = json_object(data, f"{where}: manifest")
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST

