"""Where images live: one interface over a registry repository and an OCI layout.

    location = open_location("oci:/srv/images:app", client)      # or "127.0.0.1:5000/app:v1"
    manifest = location.store.get_manifest(location.target)
    with BlobStream(location.store, digest, size) as blob: ...     # verified while read

A store is one repository (registry) or one layout directory. Manifests are
addressed by `target`: a tag, a digest, or None (the store's default: `latest`
in a registry, the only image of a layout). Blobs are always digest-checked:
streams raise VerificationError once their last byte is read, so callers must
read to the end (`BlobStream.finish`) before trusting what they produced.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from .blob import BlobReader
from .errors import FormatError, InvalidReferenceError
from .oci_layout import OCI_PREFIX, OciLayout, OciReference
from .reference import ImageReference, is_valid_digest
from .registry import Manifest, RegistryClient, digest_of

DEFAULT_TAG = "latest"
MAX_CONFIG_SIZE = 16 << 20


class ImageStore(Protocol):
    @property
    def name(self) -> str:
        """What to call the store in messages (`host/repo` or `oci:DIR`)."""
        ...

    def get_manifest(self, target: str | None) -> Manifest: ...

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        """Stores a manifest; under `tag`, or (None) by digest only. Returns its digest."""
        ...

    def blob_size(self, digest: str) -> int | None: ...

    def has_blob(self, digest: str) -> bool: ...

    def stream_blob(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes; VerificationError after the last piece on a digest mismatch."""
        ...

    def get_blob(self, digest: str, max_size: int | None = None) -> bytes: ...

    def open_blob(self, digest: str, size: int) -> BlobReader:
        """Random access to one blob (ranged reads), for reading layers lazily."""
        ...

    def put_blob(self, digest: str, source: Path | bytes) -> None: ...

    def close(self) -> None: ...


@dataclass
class RegistryStore:
    """One repository of a registry, through RegistryClient."""

    client: RegistryClient
    repository: ImageReference  # registry and repository; tag/digest unused

    @property
    def name(self) -> str:
        return self.repository.name

    def reference(self, target: str | None) -> ImageReference:
        base = ImageReference(self.repository.registry, self.repository.repository)
        if target is None:
            return base.with_tag(DEFAULT_TAG)
        return base.with_digest(target) if is_valid_digest(target) else base.with_tag(target)

    def get_manifest(self, target: str | None) -> Manifest:
        return self.client.get_manifest(self.reference(target))

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        # Without a tag, the manifest's own digest names it.
        ref = self.reference(tag if tag is not None else digest_of(data))
        return self.client.put_manifest(ref, data, media_type)

    def blob_size(self, digest: str) -> int | None:
        return self.client.blob_size(self.reference(None), digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_size(digest) is not None

    def stream_blob(self, digest: str) -> Iterator[bytes]:
        return self.client.stream_blob(self.reference(None), digest)

    def get_blob(self, digest: str, max_size: int | None = None) -> bytes:
        size = self.blob_size(digest)
        if max_size is not None and size is not None and size > max_size:
            raise FormatError(f"{self.name}: blob {digest} has {size} bytes, more than the "
                              f"{max_size} allowed for a manifest or config")
        return self.client.get_blob(self.reference(None), digest)

    def open_blob(self, digest: str, size: int) -> BlobReader:
        return self.client.blob(self.reference(None), digest, size)

    def put_blob(self, digest: str, source: Path | bytes, mount_from: str | None = None) -> None:
        self.client.put_blob(self.reference(None), digest, source, mount_from=mount_from)

    def close(self) -> None:
        """The client belongs to the caller."""


@dataclass(frozen=True)
class ImageLocation:
    """An image the user named: a store and a target within it."""

    store: ImageStore
    target: str | None  # tag, digest, or None for the store's default
    text: str           # as written by the user, for messages

    @property
    def tag(self) -> str | None:
        return None if self.target is None or is_valid_digest(self.target) else self.target


def open_location(text: str, client: RegistryClient | None, create: bool = False) -> ImageLocation:
    """`oci:DIR[:TAG]`, `oci:DIR@DIGEST` or a registry reference. `create` makes a
    missing OCI layout (for destinations); a registry needs `client`."""
    if text.startswith(OCI_PREFIX):
        oci = OciReference.parse(text)
        if oci.tag is not None and oci.digest is not None:
            raise InvalidReferenceError(f"{text!r}: give a tag or a digest, not both")
        return ImageLocation(OciLayout(oci.directory, create=create), oci.digest or oci.tag, text)
    ref = ImageReference.parse(text)
    if client is None:
        raise InvalidReferenceError(f"{text!r}: a registry reference needs a registry client")
    store = RegistryStore(client, ImageReference(ref.registry, ref.repository))
    return ImageLocation(store, ref.digest or ref.tag, text)


class BlobStream(io.RawIOBase):
    """A readable file over a store's blob, verified (digest, and `size` if given)
    as it is read. `finish()` reads whatever the consumer left, so the check runs."""

    def __init__(self, store: ImageStore, digest: str, size: int | None = None) -> None:
        super().__init__()
        self._name = f"{store.name}: blob {digest}"
        self._pieces = store.stream_blob(digest)
        self._buffer = memoryview(b"")
        self._expected = size
        self.received = 0
        self._done = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._buffer and not self._done:
            self._next_piece()
        count = min(len(buffer), len(self._buffer))
        buffer[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def finish(self) -> None:
        """Drains the rest; raises VerificationError/FormatError if the blob is not what
        its descriptor says."""
        self._buffer = memoryview(b"")
        while not self._done:
            self._next_piece()
            self._buffer = memoryview(b"")

    def _next_piece(self) -> None:
        try:
            piece = next(self._pieces)
        except StopIteration:
            self._done = True
            if self._expected is not None and self.received != self._expected:
                raise FormatError(f"{self._name}: has {self.received} bytes, its descriptor "
                                  f"says {self._expected}") from None
            return
        self.received += len(piece)
        if self._expected is not None and self.received > self._expected:
            raise FormatError(f"{self._name}: longer than the {self._expected} bytes its "
                              "descriptor says")
        self._buffer = memoryview(piece)

    def __enter__(self) -> "BlobStream":
        return self

    def __exit__(self, *exc: object) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()  # lets a registry response go back to its pool early
        self.close()


def copy_blob(source: ImageStore, dest: ImageStore, digest: str, size: int | None,
              work_dir: Path) -> None:
    """Makes `dest` hold the blob: nothing if it has it, a cross-repository mount
    within one registry, else a verified copy through a temp file."""
    if dest.has_blob(digest):
        return
    # RegistryClient.put_blob needs the bytes even when it can mount, in case
    # the registry refuses the mount; so the blob is spooled either way.
    spooled = _spool(source, digest, size, work_dir)
    try:
        if isinstance(source, RegistryStore) and isinstance(dest, RegistryStore) \
                and source.repository.registry == dest.repository.registry:
            dest.put_blob(digest, spooled, mount_from=source.repository.repository)
        else:
            dest.put_blob(digest, spooled)
    finally:
        spooled.unlink(missing_ok=True)


def _spool(source: ImageStore, digest: str, size: int | None, work_dir: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=work_dir, prefix="blob-")
    try:
        with os.fdopen(fd, "wb") as out, BlobStream(source, digest, size) as blob:
            while piece := blob.read(1 << 20):
                out.write(piece)
            blob.finish()
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)
