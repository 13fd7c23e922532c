"""podman's additional layer store (ALS): layers podman uses without pulling them.

    STORE/BASE64REF/DIGEST/diff      the layer's tree in overlay form, fetched lazily
    STORE/BASE64REF/DIGEST/info      containers/storage's Layer record (JSON), true DiffID
    STORE/BASE64REF/DIGEST/blob      the raw layer blob (ranged reads: podman push/save)
    STORE/BASE64REF/DIGEST/crfs.key  KEY of `//crfs/KEY//` (for the mount_program wrapper)
    STORE/.layers/NUM/...            the layer view crfs.so takes fds from (fileview.py)

BASE64REF is the standard base64 of the reference podman pulls (`host/repo:tag`: ASCII,
so its base64 never holds a '/'). DIGEST is the layer's
compressed blob digest (containers/storage up to 1.53, podman 4.x) or its TOC digest
(1.54 on): both answer. Only layers with a TOC digest (eStargz, zstd:chunked) are here;
for any other, `diff` does not exist and podman pulls the layer as usual.

Overlay form: a `.wh.NAME` whiteout shows as NAME, a char device 0/0; a directory that
holds `.wh..wh..opq` is opaque by xattr (`trusted.overlay.opaque` for the kernel's
overlay, `user.overlay.opaque` for rootless overlay and fuse-overlayfs, both "y").
Overlay xattrs a tar carries are hidden: they would be instructions to the kernel's
overlay (redirects, metacopy), which a layer must not give.

Use counts: podman creates DIGEST/use when it starts using a layer and rmdir()s DIGEST
when it stops; both answer ENOENT, as containers/storage expects. The counts persist in
RUNTIME/store-uses.json (`crfs stats` readers, and the next worker, find them there).
"""
from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import itertools
import json
import logging
import os
import stat
import threading
import time
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

from .blob import BlobReader
from .errors import FormatError, InvalidReferenceError, NotFoundError, VerificationError
from .fileview import LayerFileHandle, entry_attr, join_path
from .footer import ESTARGZ_UNCOMPRESSED_SIZE
from .fusetree import ATTR_TIMEOUT, BaseNode, BytesFile, FileHandle, Node, NodeAttr, fs_error, refuse_writes
from .image import host_platform, layer_descriptors
from .imagestore import MAX_CONFIG_SIZE, open_location
from .jsondoc import json_object, parse_json
from .layer import EntryStat
from .layerkeys import KeyStore, LayerRecord, compose_ino, key_for
from .reference import ImageReference, is_valid_digest

log = logging.getLogger(__name__)

VIEW_NAME = ".layers"           # never valid base64: cannot clash with a reference
KEY_FILE = "crfs.key"
USES_FILE = "store-uses.json"
LAYER_FILES = ("diff", "info", "blob", KEY_FILE)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
HIDDEN_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
DIFF_INO_FLAG = 1 << 63         # diff trees and the layer view share inode numbers otherwise
MAX_TREES = (1 << 23) - 1       # diff trees: their number goes where the view has a layer number
FIRST_META_INO = 16             # store directories and files; far below any layer's (>= 2**40)
GZIP, ZSTD = 2, 4               # containers/storage's archive.Compression values
MAX_REF_NAME = 1024
REFRESH_AFTER = 5.0             # seconds before a digest miss fetches the manifest again


# ---------------------------------------------------------------------------- configuration


def default_store_dir(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_DATA_HOME/crfs/store, else ~/.local/share/crfs/store: a directory that exists
    even while no worker serves it (podman refuses to start if a configured store is missing)."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "share")
    return Path(base) / "crfs" / "store"


def storage_conf_path(env: Mapping[str, str] | None = None) -> Path | None:
    """The storage.conf podman reads for this user (the first that exists)."""
    env = os.environ if env is None else env
    candidates = []
    if env.get("CONTAINERS_STORAGE_CONF"):
        candidates.append(Path(env["CONTAINERS_STORAGE_CONF"]))
    # Inside rootless podman's user namespace we are uid 0 but still that user (podman
    # exports _CONTAINERS_ROOTLESS_UID there): a worker crfs.so restarts runs so.
    if os.getuid() != 0 or env.get("_CONTAINERS_ROOTLESS_UID"):
        config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
        candidates.append(Path(config_home) / "containers" / "storage.conf")
    candidates += [Path("/etc/containers/storage.conf"), Path("/usr/share/containers/storage.conf")]
    return next((path for path in candidates if path.is_file()), None)


def configured_store_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The layer store this worker serves: $CRFS_STORE_DIR, else the default store
    directory if podman's storage.conf lists it in `additionallayerstores`."""
    env = os.environ if env is None else env
    if env.get("CRFS_STORE_DIR"):
        return Path(env["CRFS_STORE_DIR"])
    conf = storage_conf_path(env)
    if conf is None:
        return None
    try:
        data = tomllib.loads(conf.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read: %s", conf, exc)
        return None
    stores = data.get("storage", {}).get("options", {}).get("additionallayerstores", [])
    wanted = default_store_dir(env)
    for entry in stores if isinstance(stores, list) else []:
        if isinstance(entry, str) and Path(entry.split(":", 1)[0]) == wanted:
            return wanted
    return None


# ---------------------------------------------------------------------------- images


@dataclass(frozen=True)
class StoreLayer:
    """One layer of one image, as podman asks for it."""

    ref: str                    # the reference podman pulls, as it wrote it
    digest: str                 # what podman named the layer by: blob or TOC digest
    repository: str             # host/repo the blob comes from
    blob_digest: str
    size: int
    toc_digest: str
    annotations: Mapping[str, str]
    diff_id: str
    media_type: str

    @property
    def record(self) -> LayerRecord:
        return LayerRecord("registry", self.repository, self.blob_digest, self.size, self.toc_digest,
                           dict(self.annotations))

    @property
    def key(self) -> str:
        # The TOC digest too: two manifests may name one blob with different TOC digests,
        # and one that does not verify must not stand for the other.
        return key_for(f"store:{self.repository}@{self.blob_digest}|toc:{self.toc_digest}")

    @classmethod
    def of(cls, ref: str, digest: str, repository: str, desc: Any, diff_id: str) -> "StoreLayer":
        """The layer a manifest's descriptor `desc` describes (`diff_id` "" while unknown)."""
        return cls(ref, digest, repository, desc.digest, desc.size, desc.toc_digest or "", dict(desc.annotations),
                   diff_id, desc.media_type)

    def info(self) -> bytes:
        """containers/storage's Layer JSON: podman derives layer IDs from diff-digest."""
        record: dict[str, Any] = {
            "compressed-diff-digest": self.blob_digest,
            "compressed-size": self.size,
            "diff-digest": self.diff_id,
            "compression": ZSTD if "zstd" in self.media_type else GZIP,
        }
        size = self.annotations.get(ESTARGZ_UNCOMPRESSED_SIZE, "")
        if size.isdigit():
            record["diff-size"] = int(size)
        return json.dumps(record).encode() + b"\n"


@dataclass(frozen=True)
class ImageLayers:
    """A resolved image manifest: its layers with their DiffIDs."""

    repository: str
    layers: tuple[tuple[Any, str], ...]   # (image.LayerDescriptor, diff_id), lowest first
    fetched_at: float

    def find(self, ref: str, digest: str) -> StoreLayer | None:
        for desc, diff_id in self.layers:
            if digest in (desc.digest, desc.toc_digest):
                return StoreLayer.of(ref, digest, self.repository, desc, diff_id)
        return None


def _diff_ids(config: bytes, name: str, count: int) -> list[str]:
    doc = parse_json(config, f"{name}: image config")
    try:
        diff_ids = doc["rootfs"]["diff_ids"]
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{name}: image config has no rootfs.diff_ids ({exc})") from None
    if not isinstance(diff_ids, list) or len(diff_ids) != count or not all(
            isinstance(d, str) and is_valid_digest(d) for d in diff_ids):
        raise FormatError(f"{name}: image config lists {len(diff_ids) if isinstance(diff_ids, list) else 0} "
                          f"valid diff_ids for {count} layers")
    return diff_ids


@dataclass
class ImageResolver:
    """Manifests and configs of the images podman pulls, fetched once per reference
    (again when a layer is asked for that the cached manifest does not list)."""

    client_factory: Callable[[], Any]
    # Told of an image's seekable layers as soon as its manifest names them, before its
    # config is fetched: the store starts opening them then (LayerStore.open_early).
    on_manifest: Callable[[list[StoreLayer]], None] | None = None
    _client: Any = field(default=None, init=False, repr=False)
    _images: dict[str, list[ImageLayers]] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def find(self, ref: str, digest: str) -> StoreLayer:
        """The layer `digest` of image `ref`; FileNotFoundError if there is no such image,
        the image has no such layer, or the layer is not seekable."""
        with self._lock:
            cached = self._images.get(ref)
        if cached is not None:
            found = _find_in(cached, ref, digest)
            if found is not None or time.monotonic() - cached[0].fetched_at < REFRESH_AFTER:
                return _found_or_missing(found, ref, digest)
        try:
            images = self._resolve(ref, digest)
        except NotFoundError as exc:
            log.info("store: %s", exc)
            raise fs_error(errno.ENOENT, str(exc)) from None  # podman reports the missing image itself
        with self._lock:
            self._images[ref] = images
        return _found_or_missing(_find_in(images, ref, digest), ref, digest)

    def known_refs(self) -> list[str]:
        with self._lock:
            return sorted(self._images)

    def _client_once(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self.client_factory()
            return self._client

    def _resolve(self, ref: str, digest: str) -> list[ImageLayers]:
        """The image `ref` names; of an index, this machine's image first, the others
        (podman --arch) only until one lists `digest`."""
        location = open_location(ref, self._client_once())
        repository = ImageReference.parse(ref).name
        top = location.store.get_manifest(location.target)
        if not top.is_index:
            return [self._image(location.store, json_object(top.data, f"{ref}: manifest"), ref, repository, digest)]
        images = []
        for child in _index_children(json_object(top.data, f"{ref}: manifest"), ref):
            manifest = location.store.get_manifest(child)
            images.append(self._image(location.store, json_object(manifest.data, f"{ref}: manifest"), ref, repository,
                                      digest))
            if images[-1].find(ref, digest) is not None:
                break
        return images

    def _image(self, store: Any, doc: dict[str, Any], ref: str, repository: str, digest: str) -> ImageLayers:
        descriptors = layer_descriptors(doc, ref)
        if self.on_manifest is not None and any(digest in (d.digest, d.toc_digest) for d in descriptors):
            self.on_manifest([StoreLayer.of(ref, d.digest, repository, d, "") for d in descriptors if d.toc_digest])
        config_digest = (doc.get("config") or {}).get("digest")
        if not isinstance(config_digest, str) or not is_valid_digest(config_digest):
            raise FormatError(f"{ref}: the manifest names no valid config digest")
        diff_ids = _diff_ids(store.get_blob(config_digest, MAX_CONFIG_SIZE), ref, len(descriptors))
        return ImageLayers(repository, tuple(zip(descriptors, diff_ids)), time.monotonic())


def _index_children(index: dict[str, Any], ref: str) -> list[str]:
    """The image digests of an index, this machine's platform first."""
    mine = host_platform()
    children = [c for c in index.get("manifests") or []
                if isinstance(c, dict) and is_valid_digest(str(c.get("digest")))]
    if not children:
        raise FormatError(f"{ref}: image index lists no manifests")

    def is_mine(child: dict[str, Any]) -> bool:
        plat = child.get("platform")
        return isinstance(plat, dict) and all(plat.get(k) == v for k, v in mine.items())

    return [c["digest"] for c in sorted(children, key=lambda c: not is_mine(c))]


def _find_in(images: list[ImageLayers], ref: str, digest: str) -> StoreLayer | None:
    return next((found for image in images if (found := image.find(ref, digest)) is not None), None)


def _found_or_missing(found: StoreLayer | None, ref: str, digest: str) -> StoreLayer:
    if found is None:
        raise fs_error(errno.ENOENT, f"{ref}: no layer {digest}")
    if not found.toc_digest:
        # Not seekable (plain gzip...): podman pulls it as usual.
        raise fs_error(errno.ENOENT, f"{ref}: layer {digest} has no TOC digest")
    return found


# ---------------------------------------------------------------------------- use counts


@dataclass
class UseCounts:
    """podman's references to store layers, kept in a JSON file across workers."""

    path: Path
    _counts: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._counts = self._load()

    def _load(self) -> dict[tuple[str, str], int]:
        try:
            rows = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, use counts start at zero: %s", self.path, exc)
            return {}
        counts = {}
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and isinstance(row.get("uses"), int) and row["uses"] > 0:
                counts[(str(row.get("ref")), str(row.get("digest")))] = row["uses"]
        return counts

    def change(self, ref: str, digest: str, delta: int) -> int:
        with self._lock:
            count = max(0, self._counts.get((ref, digest), 0) + delta)
            if count:
                self._counts[(ref, digest)] = count
            else:
                self._counts.pop((ref, digest), None)
            rows = [{"ref": r, "digest": d, "uses": n} for (r, d), n in sorted(self._counts.items())]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, self.path)
            return count

    def get(self, ref: str, digest: str) -> int:
        with self._lock:
            return self._counts.get((ref, digest), 0)

    def digests(self, ref: str) -> list[str]:
        with self._lock:
            return [d for (r, d) in self._counts if r == ref]

    def refs(self) -> list[str]:
        with self._lock:
            return sorted({r for r, _ in self._counts})

    def all(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


def read_use_counts(runtime: Path) -> dict[tuple[str, str], int]:
    """(reference, digest) -> uses, as the worker serving the store last wrote them."""
    return UseCounts(runtime / USES_FILE).all()


# ---------------------------------------------------------------------------- the store


class LayerSource(Protocol):
    """What the store needs from the worker's layers (lowerlayer.LayerTable provides it)."""

    keys: KeyStore

    def get(self, num: int) -> Any: ...
    def mount(self, num: int) -> Any: ...
    def mount_soon(self, num: int) -> None: ...
    def stat(self, num: int, path: str) -> EntryStat: ...
    def exists(self, num: int, path: str) -> bool: ...
    def readdir(self, num: int, path: str) -> list[tuple[str, EntryStat]]: ...
    def readlink(self, num: int, path: str) -> str: ...
    def listxattr(self, num: int, path: str) -> list[str]: ...
    def getxattr(self, num: int, path: str, name: str) -> bytes: ...
    def read(self, num: int, path: str, offset: int, size: int) -> bytes: ...


@dataclass
class LayerStore:
    """The store's state: resolved images, opened layers, use counts, inode numbers."""

    layers: LayerSource
    resolver: ImageResolver
    uses: UseCounts
    _inos: dict[tuple[str, ...], int] = field(default_factory=dict, init=False, repr=False)
    _next_ino: Iterator[int] = field(default_factory=lambda: itertools.count(FIRST_META_INO), init=False,
                                     repr=False)
    _opened: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _trees: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False)
    bad_blobs: set[str] = field(default_factory=set, init=False)  # blobs that did not match their digest
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def ino_for(self, *key: str) -> int:
        """A stable inode number for a store directory or file, for the worker's life."""
        with self._lock:
            ino = self._inos.get(key)
            if ino is None:
                ino = self._inos[key] = next(self._next_ino)
            return ino

    def tree_for(self, ref: str, digest: str) -> int:
        """A number for the diff tree at STORE/REF/DIGEST. Not the layer's: a directory
        the kernel met under two parents (one layer, two references) would be moved
        from one to the other, under a running container."""
        with self._lock:
            tree = self._trees.get((ref, digest))
            if tree is None:
                tree = len(self._trees) + 1
                if tree > MAX_TREES:
                    raise fs_error(errno.ENOSPC, "the layer store is out of inode numbers")
                self._trees[(ref, digest)] = tree
            return tree

    def layer(self, ref: str, digest: str) -> StoreLayer:
        return self.resolver.find(ref, digest)

    def __post_init__(self) -> None:
        self.resolver.on_manifest = self.open_early

    def open_early(self, layers: list[StoreLayer]) -> None:
        """Starts opening the seekable layers of an image whose manifest just came in: the
        TOCs come in beside the config fetch, all layers at once."""
        for layer in layers:
            try:
                self.open_layer(layer, wait=False)
            except Exception as exc:  # the layer podman asked for must not fail for another's sake
                log.warning("store: %s@%s not opened early: %s", layer.repository, layer.blob_digest, exc)

    def open_layer(self, layer: StoreLayer, wait: bool = True) -> int:
        """Registers the layer under its KEY and opens it (fetching and checking its TOC),
        or with `wait` False starts opening it beside the caller; returns its number in the
        worker's layer table.

        podman's stat of `diff`, `info` and `blob` waits for the open: a layer that cannot
        be opened or verified must fail that stat, so that podman pulls it instead
        (containers/storage takes any stat error for "not in this store")."""
        record = layer.record
        with self._lock:
            num = self._opened.get(record.identity())
        if num is None:
            self.layers.keys.register(f"{layer.repository}@{layer.blob_digest}", [record], key=layer.key)
            num = self.layers.keys.number_for(record)
            with self._lock:
                self._opened[record.identity()] = num
        if wait:
            self.layers.mount(num)  # opens it, prefetches what the image prioritised
        else:
            self.layers.mount_soon(num)
        return num

    def use(self, ref: str, digest: str) -> None:
        count = self.uses.change(ref, digest, +1)
        log.info("store: %s %s in use (%d)", ref, digest, count)

    def release(self, ref: str, digest: str) -> None:
        count = self.uses.change(ref, digest, -1)
        log.info("store: %s %s released (%d left)", ref, digest, count)

    def known_refs(self) -> list[str]:
        return sorted(set(self.resolver.known_refs()) | set(self.uses.refs()))


# ---------------------------------------------------------------------------- diff trees


def diff_ino(tree: int, ino: int) -> int:
    return DIFF_INO_FLAG | compose_ino(tree, ino)


@dataclass(frozen=True)
class DiffEntry(BaseNode):
    """An entry of a layer's `diff` tree: the tar's entry, or a whiteout shown as char 0/0
    (then `path` is the `.wh.NAME` entry). `num` is the layer, `tree` the diff tree."""

    layers: LayerSource
    num: int
    tree: int
    path: str
    whiteout: bool = False
    miss_timeout = ATTR_TIMEOUT  # a layer never changes

    def attr(self) -> NodeAttr:
        return self._attr(self.layers.stat(self.num, self.path))

    def _attr(self, st: EntryStat) -> NodeAttr:
        ino = diff_ino(self.tree, st.ino)
        if self.whiteout:
            return NodeAttr(ino, stat.S_IFCHR, 1, st.uid, st.gid, 0, st.mtime_ns, 0)
        return entry_attr(ino, st)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        if name.startswith(WHITEOUT_PREFIX):
            raise fs_error(errno.ENOENT, name)  # instructions, not entries
        path = join_path(self.path, name)
        if self.layers.exists(self.num, path):
            child = DiffEntry(self.layers, self.num, self.tree, path)
        elif self.layers.exists(self.num, join_path(self.path, WHITEOUT_PREFIX + name)):
            child = DiffEntry(self.layers, self.num, self.tree, join_path(self.path, WHITEOUT_PREFIX + name),
                              whiteout=True)
        else:
            raise fs_error(errno.ENOENT, name)
        return child, child.attr()

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        entries = self.layers.readdir(self.num, self.path)
        names = {name for name, _ in entries}
        if not self.whiteout:
            # Overlay asks whether a directory is opaque right after listing it: the answer
            # is in the listing (fills the cached_property, no query of its own).
            self.__dict__["_opaque"] = OPAQUE_MARKER in names
        out: list[tuple[str, Node, NodeAttr]] = []
        for name, st in entries:
            child = DiffEntry(self.layers, self.num, self.tree, join_path(self.path, name))
            if name.startswith(WHITEOUT_PREFIX):
                target = name[len(WHITEOUT_PREFIX):]
                # The opaque marker, aufs' own `.wh..wh.*` entries, and a whiteout next to
                # an entry of the same name (the entry wins) show as nothing.
                if not target or target.startswith(WHITEOUT_PREFIX) or target in names:
                    continue
                child = DiffEntry(self.layers, self.num, self.tree, child.path, whiteout=True)
                name = target
            out.append((name, child, child._attr(st)))
        return out

    def readlink(self) -> str:
        return self.layers.readlink(self.num, self.path)

    @cached_property
    def _opaque(self) -> bool:
        # Once per node: overlay asks for three opaque xattrs of every directory it merges.
        return not self.whiteout and self.layers.exists(self.num, join_path(self.path, OPAQUE_MARKER))

    @cached_property
    def _xattrs(self) -> dict[str, bytes]:
        """The xattrs the tree shows, read once per node (the kernel caches no xattr)."""
        if self.whiteout:
            return {}
        shown = {name: self.layers.getxattr(self.num, self.path, name)
                 for name in self.layers.listxattr(self.num, self.path) if not name.startswith(HIDDEN_XATTR_PREFIXES)}
        return {**shown, **dict.fromkeys(OPAQUE_XATTRS, b"y")} if self._opaque else shown

    def xattr_names(self) -> list[str]:
        return list(self._xattrs)

    def xattr(self, name: str) -> bytes:
        if name in OPAQUE_XATTRS and self._opaque:
            return b"y"
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            # The tree carries no overlay xattrs: "not supported" rather than "no such
            # xattr" makes fuse-overlayfs's opaque test ask one name of three and go on to
            # `.wh..wh..opq` (a miss the kernel keeps). The kernel's overlay and
            # fuse-overlayfs's origin and override_stat probes take ENOTSUP for "none".
            # No query either way.
            raise fs_error(errno.EOPNOTSUPP, name)
        return self._xattrs[name]

    def open(self, flags: int) -> FileHandle:
        refuse_writes(flags, self.path)
        if self.whiteout:
            raise fs_error(errno.EACCES, self.path)
        return LayerFileHandle(self.layers, self.num, self.path)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- blob


BLOB_WINDOW = 4 << 20     # one Range request per 4 MiB, not per kernel read (128 KiB)
EARLY_LIMIT = 64 << 20    # bytes read ahead of the hashed prefix kept for the digest check


@dataclass
class DigestCheck:
    """Hashes a blob from the pieces readers get, in whatever order they come (the kernel
    reads ahead in parallel), so that whoever completes the blob learns whether it matched.
    A mismatch is remembered in `bad` (shared by the store): every later read fails too."""

    size: int
    digest: str
    bad: set[str]
    _hasher: Any = field(default_factory=hashlib.sha256, init=False, repr=False)
    _hashed: int = field(default=0, init=False, repr=False)
    _early: dict[int, bytes] = field(default_factory=dict, init=False, repr=False)
    _early_bytes: int = field(default=0, init=False, repr=False)

    def check_known(self, name: str) -> None:
        if self.digest in self.bad:
            raise VerificationError(f"{name}: blob does not match its digest {self.digest}")

    def add(self, offset: int, data: bytes, name: str) -> None:
        if offset > self._hashed:
            if offset not in self._early and self._early_bytes + len(data) <= EARLY_LIMIT:
                self._early[offset] = data
                self._early_bytes += len(data)
            return
        self._take(offset, data)
        while True:
            start = next((o for o in self._early if o <= self._hashed), None)
            if start is None:
                break
            piece = self._early.pop(start)
            self._early_bytes -= len(piece)
            self._take(start, piece)
        if self._hashed == self.size and "sha256:" + self._hasher.hexdigest() != self.digest:
            self.bad.add(self.digest)
            self.check_known(name)

    def _take(self, offset: int, data: bytes) -> None:
        new = data[self._hashed - offset:]
        if new:
            self._hasher.update(new)
            self._hashed += len(new)


@dataclass
class BlobHandle:
    """The raw blob, read through a window and checked against its digest."""

    blob: BlobReader
    check: DigestCheck
    _window: bytes = field(default=b"", init=False, repr=False)
    _window_start: int = field(default=0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.check.check_known(self.blob.name)
            size = max(0, min(size, self.blob.size - offset))
            if size == 0:
                return b""
            data = self._from_window(offset, size)
            self.check.add(offset, data, self.blob.name)
            return data

    def _from_window(self, offset: int, size: int) -> bytes:
        start, end = self._window_start, self._window_start + len(self._window)
        if not (start <= offset and offset + size <= end):
            length = min(max(size, BLOB_WINDOW), self.blob.size - offset)
            self._window, self._window_start = self.blob.read_range(offset, length), offset
            start = offset
        return self._window[offset - start:offset - start + size]


@dataclass(frozen=True)
class BlobFile(BaseNode):
    store: LayerStore
    layer: StoreLayer
    num: int
    ino: int

    def attr(self) -> NodeAttr:
        return NodeAttr.regular(self.ino, self.layer.size)

    def open(self, flags: int) -> FileHandle:
        refuse_writes(flags, "blob")
        blob = self.store.layers.get(self.num).blob
        check = DigestCheck(blob.size, self.layer.blob_digest, self.store.bad_blobs)
        check.check_known(blob.name)
        return BlobHandle(blob, check)


# ---------------------------------------------------------------------------- store nodes


def decode_ref(name: str) -> str | None:
    """The reference a (base64) directory name stands for, or None."""
    try:
        text = base64.b64decode(name, validate=True).decode()
        ImageReference.parse(text)
    except (binascii.Error, ValueError, UnicodeDecodeError, InvalidReferenceError):
        return None
    return text


def encode_ref(ref: str) -> str:
    return base64.b64encode(ref.encode()).decode()


@dataclass(frozen=True)
class LayerDir(BaseNode):
    """STORE/BASE64REF/DIGEST: everything in it needs the image's manifest."""

    store: LayerStore
    ref: str
    digest: str
    may_block = True

    def attr(self) -> NodeAttr:
        return NodeAttr.directory(self.store.ino_for("layer", self.ref, self.digest), 0o555)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        if name not in LAYER_FILES:
            raise fs_error(errno.ENOENT, name)  # `use` included: it never exists
        layer = self.store.layer(self.ref, self.digest)
        if name == "info":
            node: Node = BytesFile(self.store.ino_for("info", self.ref, self.digest), layer.info())
        else:
            num = self.store.open_layer(layer)
            if name == "diff":
                node = DiffEntry(self.store.layers, num, self.store.tree_for(self.ref, self.digest), "")
            elif name == "blob":
                node = BlobFile(self.store, layer, num, self.store.ino_for("blob", self.ref, self.digest))
            else:
                node = BytesFile(self.store.ino_for("key", self.ref, self.digest), layer.key.encode() + b"\n")
        return node, node.attr()

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        return [(name, *self.lookup(name)) for name in LAYER_FILES]

    def create(self, name: str) -> None:
        if name == "use":
            self.store.use(self.ref, self.digest)
        raise fs_error(errno.ENOENT, name)  # what containers/storage expects of a counting store


@dataclass(frozen=True)
class RefDir(BaseNode):
    """STORE/BASE64REF: the layers of one image reference."""

    store: LayerStore
    name: str   # the base64 text
    ref: str    # what it decodes to

    def attr(self) -> NodeAttr:
        return NodeAttr.directory(self.store.ino_for("ref", self.name), 0o555)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        if not is_valid_digest(name):
            raise fs_error(errno.ENOENT, name)
        node = LayerDir(self.store, self.ref, name)
        return node, node.attr()

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        out: list[tuple[str, Node, NodeAttr]] = []
        for digest in sorted(set(self.store.uses.digests(self.ref))):
            node = LayerDir(self.store, self.ref, digest)
            out.append((digest, node, node.attr()))
        return out

    def rmdir(self, name: str) -> None:
        if is_valid_digest(name):
            self.store.release(self.ref, name)
        raise fs_error(errno.ENOENT, name)  # what containers/storage expects of a counting store


@dataclass(frozen=True)
class StoreRoot(BaseNode):
    """The store's root (the mount's root): references, and the layer view as `.layers`."""

    store: LayerStore
    view: Node

    def attr(self) -> NodeAttr:
        return NodeAttr.directory(1, 0o555, timeout=0)

    def lookup(self, name: str) -> tuple[Node, NodeAttr]:
        if name == VIEW_NAME:
            return self.view, self.view.attr()
        ref = decode_ref(name) if len(name) < MAX_REF_NAME else None
        if ref is None:
            raise fs_error(errno.ENOENT, name)
        node = RefDir(self.store, name, ref)
        return node, node.attr()

    def children(self) -> list[tuple[str, Node, NodeAttr]]:
        out: list[tuple[str, Node, NodeAttr]] = []
        for ref in self.store.known_refs():
            node = RefDir(self.store, encode_ref(ref), ref)
            out.append((node.name, node, node.attr()))
        return out


def open_store(layers: LayerSource, runtime: Path, client_factory: Callable[[], Any]) -> LayerStore:
    """The store over the worker's layer table; use counts live in `runtime`."""
    return LayerStore(layers, ImageResolver(client_factory), UseCounts(runtime / USES_FILE))

