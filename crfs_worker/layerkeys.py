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
import platform
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .dirs import ensure_private_dir, runtime_dir
from .errors import CrfsError, FormatError

ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ZSTD_CHUNKED_CHECKSUMS = (
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
)
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


def _current_architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _pick_from_index(data: Any, name: str) -> str:
    """The digest of the index entry for this machine (linux)."""
    manifests = data.get("manifests") if isinstance(data, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise FormatError(f"{name}: image index lists no manifests")
    arch = _current_architecture()
    for entry in manifests:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(plat, dict) and plat.get("os") == "linux" and plat.get("architecture") == arch:
            digest = entry.get("digest")
            if isinstance(digest, str) and _DIGEST.match(digest):
                return digest
    raise FormatError(f"{name}: image index has no linux/{arch} manifest")


def _layer_record(repository: str, descriptor: Any, where: str, allow_unverified: bool) -> LayerRecord:
    if not isinstance(descriptor, dict):
        raise FormatError(f"{where}: layer descriptor is not an object")
    digest, size = descriptor.get("digest"), descriptor.get("size")
    annotations = descriptor.get("annotations") or {}
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise FormatError(f"{where}: layer digest {digest!r} is not sha256:<64 hex>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{where}: layer {digest} has no valid size")
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise FormatError(f"{where}: layer {digest} has malformed annotations")
    toc = annotations.get(ESTARGZ_TOC_DIGEST)
    if toc is None:
        toc = next((annotations[k] for k in ZSTD_CHUNKED_CHECKSUMS if k in annotations), None)
    if toc is None and not allow_unverified:
        raise CrfsError(
            f"{where}: layer {digest} carries no TOC digest annotation (not eStargz or "
            f"zstd:chunked?): it cannot be served lazily and verified"
        )
    return LayerRecord("registry", repository, digest, size, toc, dict(annotations), allow_unverified)


def register_image(reference: str, store: KeyStore, client: Any, allow_unverified: bool = False) -> str:
    """Resolves `reference` (a registry image) and records its layers; returns the KEY."""
    from .reference import ImageReference

    ref = ImageReference.parse(reference)
    manifest = client.get_manifest(ref)
    if manifest.is_index:
        manifest = client.get_manifest(ref.with_digest(_pick_from_index(json.loads(manifest.data), str(ref))))
    try:
        data = json.loads(manifest.data)
    except ValueError as exc:
        raise FormatError(f"{ref}: manifest is not JSON: {exc}") from exc
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise FormatError(f"{ref}: manifest {manifest.digest} lists no layers")
    records = [_layer_record(ref.name, d, f"{ref}@{manifest.digest}", allow_unverified) for d in layers]
    return store.register(f"{ref.name}@{manifest.digest}", records, key=key_for(manifest.digest))


def lowerdir_for(reference: str, *, allow_unverified: bool = False, runtime: Path | None = None,
                 client: Any = None) -> str:
    """`//crfs/KEY//` for a registry image: the lowerdir entry fuse-overlayfs needs with
    `-o plugins=.../crfs.so` (the worker finds the image again by KEY)."""
    store = KeyStore(runtime or runtime_dir())
    if client is not None:
        key = register_image(reference, store, client, allow_unverified)
    else:
        from .registry import RegistryClient

        with RegistryClient() as own:
            key = register_image(reference, store, own, allow_unverified)
    return f"//crfs/{key}//"
