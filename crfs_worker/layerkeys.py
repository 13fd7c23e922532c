"""Durable names for lower layers: KEY -> layers, and layer -> number.

`//crfs/KEY//` in a lowerdir names an image (or a single layer) registered here. Both
tables live in the worker's runtime directory so that a restarted worker, and a plugin
that reconnects to it, find the same layers under the same numbers:

    keys/KEY.json      {"name": ..., "layers": [LayerRecord, ...]}   lowest layer first
    layers/NUM.json    one LayerRecord: how to fetch and trust that layer
    layers/ids/ID      NUM, where ID names the layer's content (TOC digest or blob)

A layer number goes into the high bits of every inode number the plugin reports, so it
must never change while a mount lives; numbers are allocated once, under a file lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .dirs import ensure_private_dir, new_private_file, runtime_dir, write_all
from .errors import CrfsError, FormatError
from .image import LayerDescriptor, layer_descriptors, parse_platform, select_manifest
from .imagestore import ImageLocation, open_location
from .oci_layout import OCI_PREFIX, OciLayout
from .registry import RegistryClient

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # no ':', ',' or '/': see the plugin ABI
INO_BITS = 40                      # an entry's own inode number lives in the low bits
MAX_LAYER_NUMBER = (1 << 24) - 1   # the layer number in the 24 high bits


def compose_ino(num: int, ino: int) -> int:
    """The inode number the plugin and the view report: unique across a mount's layers."""
    if not 0 < ino < (1 << INO_BITS):
        raise FormatError(f"layer {num}: inode number {ino} does not fit in {INO_BITS} bits")
    return (num << INO_BITS) | ino


class UnknownKeyError(CrfsError):
    """No image or layer is registered under this key."""


@dataclass(frozen=True)
class LayerRecord:
    """Everything needed to open one layer again, in any later worker."""

    kind: str                      # "file" (a local blob) or "registry"
    location: str                  # the blob file path, or the repository reference
    digest: str | None = None      # the blob digest (registry layers)
    size: int | None = None        # the blob size (registry layers)
    toc_digest: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    allow_unverified: bool = False

    def identity(self) -> str:
        """What makes two records the same layer: the same tree from the same blob (a
        number stands for one source, so its counters and failures are that source's)."""
        source = f"{self.location}@{self.digest}" if self.kind == "registry" else self.location
        return f"{self.kind}:{source}|toc:{self.toc_digest}"

    def describe(self) -> str:
        if self.kind == "registry":
            return f"{self.location}@{self.digest}"
        return self.location

    @classmethod
    def from_json(cls, data: Any, where: str) -> "LayerRecord":
        if not isinstance(data, dict) or data.get("kind") not in ("file", "registry"):
            raise FormatError(f"{where}: not a layer record")
        try:
            record = cls(
                kind=data["kind"],
                location=str(data["location"]),
                digest=data.get("digest"),
                size=data.get("size"),
                toc_digest=data.get("toc_digest"),
                annotations={str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
                allow_unverified=bool(data.get("allow_unverified", False)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{where}: malformed layer record ({exc})") from exc
        return record


@dataclass(frozen=True)
class KeyRecord:
    key: str
    name: str                           # what the user registered, for messages
    layers: tuple[LayerRecord, ...]     # lowest first, as in a manifest


def key_for(name: str) -> str:
    """A KEY the lowerdir syntax accepts: 32 hex digits of sha256(name)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _write_atomic(path: Path, data: bytes) -> None:
    with new_private_file(path.parent) as (fd, tmp):
        write_all(fd, data)
        os.replace(tmp, path)


@dataclass
class KeyStore:
    """The KEY and layer-number tables under one runtime directory."""

    root: Path

    def __post_init__(self) -> None:
        ensure_private_dir(self.root)
        ensure_private_dir(self.root / "keys")
        ensure_private_dir(self.root / "layers" / "ids")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / "layers" / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def register(self, name: str, layers: Sequence[LayerRecord], key: str | None = None) -> str:
        """Records `layers` (lowest first) under KEY (default: derived from `name`); returns KEY."""
        key = key or key_for(name)
        if not KEY_PATTERN.match(key):
            raise CrfsError(f"invalid key {key!r}: use letters, digits, '.', '_' or '-'")
        if not layers:
            raise CrfsError(f"{name}: an image needs at least one layer")
        body = {"name": name, "layers": [asdict(layer) for layer in layers]}
        _write_atomic(self.root / "keys" / f"{key}.json", json.dumps(body, indent=1).encode())
        for layer in layers:
            self.number_for(layer)
        return key

    def lookup(self, key: str) -> KeyRecord:
        if not KEY_PATTERN.match(key):
            raise UnknownKeyError(f"invalid key {key!r}")
        path = self.root / "keys" / f"{key}.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise UnknownKeyError(f"no image is registered as {key} (run `crfs lowerdir REF`)") from exc
        except ValueError as exc:
            raise FormatError(f"{path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or not data["layers"]:
            raise FormatError(f"{path}: no layers")
        layers = tuple(LayerRecord.from_json(item, str(path)) for item in data["layers"])
        return KeyRecord(key=key, name=str(data.get("name", key)), layers=layers)

    def layer_numbers(self, key: str) -> list[int]:
        """The numbers of KEY's layers, uppermost first (the order fuse-overlayfs stacks)."""
        record = self.lookup(key)
        return [self.number_for(layer) for layer in reversed(record.layers)]

    def number_for(self, layer: LayerRecord) -> int:
        """The layer's number, allocated on first sight and never changed afterwards."""
        ident = hashlib.sha256(layer.identity().encode()).hexdigest()[:32]
        id_path = self.root / "layers" / "ids" / ident
        existing = self._read_number(id_path)
        if existing is not None:
            return existing
        with self._locked():
            existing = self._read_number(id_path)
            if existing is not None:
                return existing
            used = [int(p.stem) for p in (self.root / "layers").glob("*.json") if p.stem.isdigit()]
            num = max(used, default=0) + 1
            if num > MAX_LAYER_NUMBER:
                raise CrfsError(f"{self.root}: out of layer numbers")
            _write_atomic(self.root / "layers" / f"{num}.json", json.dumps(asdict(layer)).encode())
            _write_atomic(id_path, str(num).encode())
            return num

    def layer(self, num: int) -> LayerRecord:
        path = self.root / "layers" / f"{num}.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise UnknownKeyError(f"no layer number {num} in {self.root}") from exc
        except ValueError as exc:
            raise FormatError(f"{path}: {exc}") from exc
        return LayerRecord.from_json(data, str(path))

    @staticmethod
    def _read_number(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise FormatError(f"{path}: not a layer number")
        return int(text)


# ---------------------------------------------------------------------------- images


def _layer_record(location: ImageLocation, desc: LayerDescriptor, where: str,
                  allow_unverified: bool) -> LayerRecord:
    toc = desc.toc_digest
    if toc is None and not allow_unverified:
        raise CrfsError(
            f"{where}: layer {desc.digest} carries no TOC digest annotation (not eStargz or "
            f"zstd:chunked?): it cannot be served lazily and verified"
        )
    if isinstance(location.store, OciLayout):
        path = location.store.blob_path(desc.digest)
        return LayerRecord("file", str(path), desc.digest, desc.size, toc, dict(desc.annotations),
                           allow_unverified)
    return LayerRecord("registry", location.store.name, desc.digest, desc.size, toc,
                       dict(desc.annotations), allow_unverified)


def register_image(reference: str, store: KeyStore, client: RegistryClient | None,
                   allow_unverified: bool = False, platform_text: str | None = None) -> str:
    """Resolves `reference` (a registry image or `oci:DIR[:TAG]`) and records its layers;
    returns the KEY."""
    location = open_location(reference, client)
    wanted = parse_platform(platform_text) if platform_text else None
    manifest, doc = select_manifest(location.store, location.target, wanted, reference)
    where = f"{location.store.name}@{manifest.digest}"
    descriptors = layer_descriptors(doc, where)
    if not descriptors:
        raise FormatError(f"{where}: the manifest lists no layers")
    records = [_layer_record(location, d, where, allow_unverified) for d in descriptors]
    return store.register(where, records, key=key_for(manifest.digest))


def lowerdir_for(reference: str, *, allow_unverified: bool = False, runtime: Path | None = None,
                 client: Any = None) -> str:
    """`//crfs/KEY//` for a registry image: the lowerdir entry fuse-overlayfs needs with
    `-o plugins=.../crfs.so` (the worker finds the image again by KEY)."""
    store = KeyStore(runtime or runtime_dir())
    if client is not None or reference.startswith(OCI_PREFIX):
        key = register_image(reference, store, client, allow_unverified)
    else:
        with RegistryClient() as own:
            key = register_image(reference, store, own, allow_unverified)
    return f"//crfs/{key}//"
