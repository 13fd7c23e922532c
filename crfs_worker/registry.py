"""The registry client: distribution v2 over one httpx.Client.

Manifests (OCI and Docker schema 2, images and indexes), whole blobs (digest-verified),
byte ranges of blobs (`Range`, answered 206), pushes (monolithic or chunked uploads,
cross-repository mounts), Basic and Bearer auth (auth.py), mirrors and insecure
registries (registries_conf.py), certs.d CAs and client certificates, bounded retries.

Plain HTTP: a registry is contacted over https first. Plain http is tried when https
cannot be spoken at all (not on a certificate error) and the registry is either marked
`insecure` in registries.conf or on a loopback address (127.0.0.0/8, ::1, localhost).
The loopback exception is a deliberate difference from podman, which insists on
`--tls-verify=false` or `insecure = true` even there: traffic to a loopback address
never leaves the machine, and local test and cache registries are almost always plain
http. Set `RegistryConfig.loopback_plain_http = False` to behave like podman.

TLS: system CAs plus `*.crt` from `certs.d/HOST[:PORT]/` under each configured root
(`/etc/containers/certs.d`, `~/.config/containers/certs.d`, `/etc/docker/certs.d`), and a
client certificate from `*.cert` with its `*.key`. `insecure` turns verification off.
Proxy environment variables are ignored (the TLS settings per host must apply).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import ssl
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import httpx

from .auth import Authenticator, CredentialStore, Scopes, TokenResponse, pull_scope, push_scope
from .blob import check_range
from .errors import (
    AuthError,
    CrfsError,
    FormatError,
    NotFoundError,
    RangeNotSupportedError,
    RegistryError,
    VerificationError,
)
from .reference import DOCKER_HUB, ImageReference, check_digest
from .registries_conf import PullSource, RegistriesConf

T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_ERROR_BODY = 64 * 1024
DOCKER_HUB_API_HOST = "registry-1.docker.io"
USER_AGENT = "crfs/0.1"



def default_certs_dirs(home: Path) -> tuple[Path, ...]:
    """Where containers/image looks for `HOST[:PORT]/` TLS directories, in its order."""
    return (
        Path("/etc/containers/certs.d"),
        home / ".config" / "containers" / "certs.d",
        Path("/etc/docker/certs.d"),
    )


class BlobSourceError(CrfsError):
    """The local file of a blob to push could not be read whole."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 5xx/429 answers and connection errors: at most `attempts` tries,
    sleeping backoff_base * 2**n (capped at backoff_max) between them, and never
    starting a wait that would end more than `total_max` seconds after the first try."""

    attempts: int = 4
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    total_max: float = 30.0

    def delay(self, failed_attempts: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2 ** (failed_attempts - 1))


@dataclass(frozen=True)
class Timeouts:
    """Seconds. `connect`, `read`, `write`, `pool` bound each network step (httpx's
    meaning: `read` is the longest silence while waiting for bytes); `range_body` bounds
    the whole body of one ranged GET, so a registry that trickles bytes just fast enough
    never to be silent for `read` cannot hold a reader forever. A failed attempt is
    retried under the RetryPolicy, whose `total_max` bounds the whole operation."""

    connect: float = 15.0
    read: float = 60.0
    write: float = 60.0
    pool: float = 60.0
    range_body: float = 120.0

    def as_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the client needs to know about registries. The defaults here are
    empty (no files); `RegistryConfig.from_environment()` reads the standard locations."""

    registries: RegistriesConf = field(default_factory=RegistriesConf)
    credentials: CredentialStore = field(default_factory=CredentialStore)
    certs_dirs: tuple[Path, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    loopback_plain_http: bool = True
    upload_chunk_size: int = 16 << 20
    max_manifest_size: int = 4 << 20

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, home: Path | None = None
    ) -> "RegistryConfig":
        env = os.environ if env is None else env
        home = Path(env.get("HOME", "~")).expanduser() if home is None else home
        return cls(
            registries=RegistriesConf.from_environment(env, home),
            credentials=CredentialStore.from_environment(env, home),
            certs_dirs=default_certs_dirs(home),
        )


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES


class _StreamBroken(Exception):
    """One try of a streamed range ended early (connection lost, too slow): the stream
    resumes from the first byte not yet delivered, within the retry policy. Never leaves
    this module."""


def _resuming(open_at: Callable[[int, int], Iterator[bytes]], offset: int, length: int,
              retry: RetryPolicy, name: str) -> Iterator[bytes]:
    """The pieces of [offset, offset+length) from tries of `open_at(at, count)`; a try
    that raises _StreamBroken is followed by one from the first byte not yet delivered,
    within `retry`. Extra bytes a try sends are an error, never delivered."""
    started = time.monotonic()
    done = failures = 0
    while True:
        pieces = open_at(offset + done, length - done)
        try:
            for piece in pieces:
                if done + len(piece) > length:
                    raise FormatError(f"{name}: range [{offset}, {offset + length}): more bytes than asked for")
                done += len(piece)
                yield piece
            if done == length:
                return
            raise _StreamBroken(f"ended after {done} of {length} bytes")
        except _StreamBroken as exc:
            failures += 1
            delay = retry.delay(failures)
            if failures >= retry.attempts or time.monotonic() - started + delay > retry.total_max:
                raise RegistryError(f"{name}: range [{offset}, {offset + length}) broke off after "
                                    f"{done} bytes, {failures} attempt(s): {exc}") from None
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        time.sleep(delay)


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, connection trouble). Never leaves this module."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _hasher(digest: str) -> "hashlib._Hash":
    return hashlib.new(digest.split(":", 1)[0])


def _api_host(registry: str) -> str:
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


def is_loopback(netloc: str) -> bool:
    host = netloc
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class _HostTransports(httpx.BaseTransport):
    """Dispatches each request to a pooled transport for its scheme and host, with that
    host's TLS settings (certs.d, insecure), so one httpx.Client serves every registry."""

    def __init__(self, certs_dirs: tuple[Path, ...]) -> None:
        self._certs_dirs = certs_dirs
        self._insecure: set[str] = set()
        self._transports: dict[tuple[str, str, bool], httpx.HTTPTransport] = {}
        self._lock = threading.Lock()

    def trust_insecurely(self, netloc: str) -> None:
        with self._lock:
            self._insecure.add(netloc)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._transport_for(request.url).handle_request(request)

    def close(self) -> None:
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()

    def _transport_for(self, url: httpx.URL) -> httpx.HTTPTransport:
        netloc = url.netloc.decode("ascii")
        with self._lock:
            # Keyed by the insecure mark too: marking a host later takes effect.
            key = (url.scheme, netloc, netloc in self._insecure) if url.scheme == "https" else ("http", "", False)
            transport = self._transports.get(key)
            if transport is None:
                verify: ssl.SSLContext | bool = self._ssl_context(netloc, key[2]) if url.scheme == "https" else True
                transport = httpx.HTTPTransport(verify=verify, retries=0)
                self._transports[key] = transport
            return transport

    def _ssl_context(self, netloc: str, insecure: bool) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        names = [netloc, DOCKER_HUB] if netloc == DOCKER_HUB_API_HOST else [netloc]
        for root in self._certs_dirs:
            for name in names:
                _load_certs_dir(context, root / name)
        return context


def _load_certs_dir(context: ssl.SSLContext, directory: Path) -> None:
    if not directory.is_dir():
        return
    try:
        for ca_file in sorted(directory.glob("*.crt")):
            context.load_verify_locations(cafile=str(ca_file))
        for cert_file in sorted(directory.glob("*.cert")):
            key_file = cert_file.with_suffix(".key")
            if not key_file.exists():
                raise RegistryError(f"{cert_file}: client certificate without its key {key_file.name}")
            context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise RegistryError(f"{directory}: cannot load TLS certificates: {exc}") from None


@dataclass
class RegistryBlob:
    """A `BlobReader` over one registry blob: each read is one ranged GET. The first
    source (mirror or primary) that answers is kept for later reads; if that mirror
    fails later, the sources are tried in order again."""

    client: "RegistryClient"
    ref: ImageReference
    digest: str
    size: int
    _source: PullSource | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.ref.name}@{self.digest}"

    def read_range(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        if length == 0:
            return b""
        return self._from_sources(lambda source: self.client._read_range_from(source, self.digest, offset, length))

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        """Bytes [offset, offset+length) in pieces as they arrive: one ranged GET, resumed
        from the first byte not yet delivered when its body breaks off, within the client's
        retry bound (opening each try is retried as any request is)."""
        check_range(self, offset, length)
        if length == 0:
            return
        yield from _resuming(self._stream_once, offset, length, self.client.config.retry, self.name)

    def _stream_once(self, offset: int, length: int) -> Iterator[bytes]:
        response = self._from_sources(lambda source: self.client._open_range_from(source, self.digest, offset, length))
        yield from self.client._range_pieces(response, length)

    def _from_sources(self, fetch: Callable[[PullSource], T]) -> T:
        """`fetch` from the source that answered before; if that was a mirror and it fails
        now, or none answered yet, from each source in order."""
        source = self._source
        if source is not None:
            try:
                return fetch(source)
            except RegistryError:
                if not source.mirror:
                    raise
        result, self._source = self.client._from_pull_sources_with_source(self.ref, fetch)
        return result


@dataclass
class SchemeMemo:
    """The scheme (https or http) each registry host was found to speak. Clients of one
    process that share it probe a host once: a probe of a plain-http registry costs a
    TLS context (20-70 ms of CPU here) and two round trips, on a container's cold start."""

    _schemes: dict[tuple[str, bool], str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # Keyed by whether plain http was allowed too: a client that may not speak http to a
    # host never takes the answer of one that may.
    def get(self, host: str, allow_http: bool) -> str | None:
        with self._lock:
            return self._schemes.get((host, allow_http))

    def put(self, host: str, allow_http: bool, scheme: str) -> None:
        with self._lock:
            self._schemes[(host, allow_http)] = scheme


class RegistryClient:
    """Talks distribution v2 to any number of registries through one httpx.Client.
    `schemes`: what other clients of this process learnt of each host's scheme."""

    def __init__(self, config: RegistryConfig | None = None, schemes: SchemeMemo | None = None) -> None:
        self._config = config if config is not None else RegistryConfig.from_environment()
        self._transports = _HostTransports(self._config.certs_dirs)
        self._http = httpx.Client(
            transport=self._transports,
            timeout=self._config.timeouts.as_httpx(),
            follow_redirects=True,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._auth = Authenticator(self._config.credentials, self._send_token_request)
        self._schemes = schemes if schemes is not None else SchemeMemo()

    @property
    def config(self) -> RegistryConfig:
        return self._config

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- manifests ----

    def get_manifest(self, ref: ImageReference) -> Manifest:
        """The manifest or index `ref` names; verified against `ref.digest` when given."""
        return self._from_pull_sources(ref, self._get_manifest_from)

    def put_manifest(self, ref: ImageReference, data: bytes, media_type: str) -> str:
        """Stores `data` under `ref`'s tag (or digest); returns the manifest's digest."""
        digest = digest_of(data, ref.digest.split(":")[0] if ref.digest else "sha256")
        if ref.digest is not None and ref.digest != digest:
            raise VerificationError(f"{ref}: the manifest to push has digest {digest}, not {ref.digest}")
        if len(data) > self._config.max_manifest_size:
            raise FormatError(f"{ref}: manifest of {len(data)} bytes is larger than the allowed {self._config.max_manifest_size}")
        source = self._config.registries.push_source(ref)
        target = source.reference
        key = target.tag or digest
        what = f"PUT manifest {target.repository}:{key}" if target.tag else f"PUT manifest {target.repository}@{key}"
        self._call(
            source,
            "PUT",
            f"manifests/{key}",
            (push_scope(target.repository),),
            what,
            headers={"Content-Type": media_type},
            content=data,
            accept={200, 201, 202},
            handle=lambda response: None,
        )
        return digest

    # ---- blobs ----

    def blob_size(self, ref: ImageReference, digest: str) -> int | None:
        """The blob's size from a HEAD request; None if no source has it."""
        check_digest(digest, f"{ref.name}: blob")
        failures: list[str] = []
        sources = self._config.registries.pull_sources(ref)
        for number, source in enumerate(sources):
            try:
                size = self._head_blob(source, digest)
            except RegistryError as exc:
                if number == len(sources) - 1:
                    raise _with_mirror_failures(exc, failures) from None
                failures.append(f"{source.describe()}: {exc}")
                continue
            if size is not None:
                return size
        return None

    def get_blob(self, ref: ImageReference, digest: str) -> bytes:
        """The whole blob, verified against `digest`; a download that breaks off is retried."""
        check_digest(digest, f"{ref.name}: blob")
        return self._from_pull_sources(ref, lambda source: self._get_blob_from(source, digest))

    def stream_blob(self, ref: ImageReference, digest: str) -> Iterator[bytes]:
        """The whole blob in pieces; VerificationError after the last piece if it does not
        match `digest` (callers must not trust the pieces before the end)."""
        check_digest(digest, f"{ref.name}: blob")
        response, source = self._from_pull_sources_with_source(
            ref, lambda src: self._open_blob(src, digest)
        )
        return self._verified_pieces(response, source, digest)

    def put_blob(
        self,
        ref: ImageReference,
        digest: str,
        source: Path | bytes,
        mount_from: str | None = None,
    ) -> None:
        """Uploads a blob unless the repository has it. `mount_from` names another
        repository on the same registry to mount it from without uploading."""
        check_digest(digest, f"{ref.name}: blob")
        if isinstance(source, bytes) and digest_of(source, digest.split(":")[0]) != digest:
            raise VerificationError(f"{ref.name}: the blob to push does not match {digest}")
        target = self._config.registries.push_source(ref)
        if self._head_blob(target, digest) is not None:
            return
        size = len(source) if isinstance(source, bytes) else _file_size(source)
        what = f"upload of blob {target.reference.repository}@{digest}"
        registry = target.reference.registry
        self._retrying(
            lambda: self._upload_once(target, digest, source, size, mount_from),
            what,
            registry,
        )

    def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        """Exactly bytes [offset, offset+length) of the blob, with one ranged GET."""
        check_digest(digest, f"{ref.name}: blob")
        if offset < 0 or length < 0:
            raise FormatError(f"{ref.name}@{digest}: invalid range offset {offset} length {length}")
        if length == 0:
            return b""
        return self._read_range_any(ref, digest, offset, length)[0]

    def blob(self, ref: ImageReference, digest: str, size: int) -> RegistryBlob:
        check_digest(digest, f"{ref.name}: blob")
        if size < 0:
            raise FormatError(f"{ref.name}@{digest}: negative blob size {size}")
        return RegistryBlob(self, ref, digest, size)

    # ---- pull sources (mirrors, then the primary) ----

    def _from_pull_sources(self, ref: ImageReference, fetch: Callable[[PullSource], T]) -> T:
        return self._from_pull_sources_with_source(ref, fetch)[0]

    def _from_pull_sources_with_source(
        self, ref: ImageReference, fetch: Callable[[PullSource], T]
    ) -> tuple[T, PullSource]:
        sources = self._config.registries.pull_sources(ref)
        failures: list[str] = []
        for number, source in enumerate(sources):
            try:
                return fetch(source), source
            except RegistryError as exc:
                if number == len(sources) - 1:
                    raise _with_mirror_failures(exc, failures) from None
                failures.append(f"{source.describe()}: {exc}")
        raise AssertionError("pull_sources always yields the primary location")

    # ---- single operations against one source ----

    def _get_manifest_from(self, source: PullSource) -> Manifest:
        ref = source.reference
        key = ref.manifest_key
        what = f"manifest {ref.repository}@{key}" if ref.digest else f"manifest {ref.repository}:{key}"
        limit = self._config.max_manifest_size
        data, content_type = self._call(
            source,
            "GET",
            f"manifests/{key}",
            (pull_scope(ref.repository),),
            f"GET {what}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
            accept={200},
            handle=lambda response: (
                _read_limited(response, limit, f"{ref.registry}: {what}"),
                response.headers.get("Content-Type", ""),
            ),
        )
        digest = digest_of(data, ref.digest.split(":")[0] if ref.digest else "sha256")
        if ref.digest is not None and digest != ref.digest:
            raise VerificationError(
                f"registry {ref.registry}: {what} has digest {digest}, not the requested {ref.digest}"
            )
        return Manifest(data, _manifest_media_type(data, content_type, f"{ref.registry}: {what}"), digest)

    def _head_blob(self, source: PullSource, digest: str) -> int | None:
        ref = source.reference
        what = f"blob {ref.repository}@{digest}"

        def size_of(response: httpx.Response) -> int | None:
            if response.status_code == 404:
                return None
            length = response.headers.get("Content-Length", "")
            if not length.isdigit():
                raise RegistryError(f"registry {ref.registry}: HEAD {what} answered without a size")
            return int(length)

        return self._call(
            source, "HEAD", f"blobs/{digest}", (pull_scope(ref.repository),), f"HEAD {what}",
            accept={200, 404}, handle=size_of,
        )

    def _get_blob_from(self, source: PullSource, digest: str) -> bytes:
        ref = source.reference
        what = f"blob {ref.repository}@{digest}"

        def verified(response: httpx.Response) -> bytes:
            data = b"".join(response.iter_bytes(1 << 20))
            announced = response.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) != len(data):
                raise _Transient(f"got {len(data)} bytes, the registry announced {announced}")
            actual = digest_of(data, digest.split(":")[0])
            if actual != digest:
                raise VerificationError(f"registry {ref.registry}: {what}: content does not match its digest (got {actual})")
            return data

        return self._call(
            source, "GET", f"blobs/{digest}", (pull_scope(ref.repository),), f"GET {what}",
            accept={200}, handle=verified,
        )

    def _open_blob(self, source: PullSource, digest: str) -> httpx.Response:
        ref = source.reference
        what = f"GET blob {ref.repository}@{digest}"
        response: httpx.Response = self._call(
            source, "GET", f"blobs/{digest}", (pull_scope(ref.repository),), what,
            accept={200}, handle=lambda r: r, keep_open=True,
        )
        return response

    def _verified_pieces(self, response: httpx.Response, source: PullSource, digest: str) -> Iterator[bytes]:
        ref = source.reference
        name = f"registry {ref.registry}: blob {ref.repository}@{digest}"
        hasher = _hasher(digest)
        expected = response.headers.get("Content-Length")
        received = 0
        try:
            for piece in response.iter_bytes(1 << 20):
                hasher.update(piece)
                received += len(piece)
                yield piece
        except httpx.HTTPError as exc:
            raise RegistryError(f"{name}: download broke off after {received} bytes: {_describe(exc)}") from None
        finally:
            response.close()
        if expected is not None and expected.isdigit() and int(expected) != received:
            raise RegistryError(f"{name}: got {received} bytes, the registry announced {expected}")
        actual = f"{digest.split(':')[0]}:{hasher.hexdigest()}"
        if actual != digest:
            raise VerificationError(f"{name}: content does not match its digest (got {actual})")

    def _read_range_any(
        self, ref: ImageReference, digest: str, offset: int, length: int
    ) -> tuple[bytes, PullSource]:
        return self._from_pull_sources_with_source(
            ref, lambda source: self._read_range_from(source, digest, offset, length)
        )

    def _open_range_from(self, source: PullSource, digest: str, offset: int, length: int) -> httpx.Response:
        """The open answer to a ranged GET, its Content-Range checked, to be read as it
        streams (`_range_pieces` closes it)."""
        ref = source.reference
        last = offset + length - 1
        what = f"blob {ref.repository}@{digest} range [{offset}, {offset + length})"

        def check(response: httpx.Response) -> httpx.Response:
            if response.status_code == 200:
                announced = response.headers.get("Content-Length", "")
                if offset == 0 and announced.isdigit() and int(announced) == length:
                    return response  # the whole blob was asked for
                response.close()
                raise _range_ignored(ref.registry, what)
            _check_content_range(response, ref.registry, what, offset, last)
            return response

        return self._call(
            source, "GET", f"blobs/{digest}", (pull_scope(ref.repository),), f"GET {what}",
            headers={"Range": f"bytes={offset}-{last}"}, accept={200, 206}, handle=check, keep_open=True,
        )

    def _range_pieces(self, response: httpx.Response, length: int) -> Iterator[bytes]:
        """One try's body, piece by piece; a body that breaks off, is silent for the read
        timeout or takes longer than `range_body` seconds is _StreamBroken (the caller resumes)."""
        limit = self._config.timeouts.range_body
        deadline = time.monotonic() + limit
        received = 0
        try:
            for piece in response.iter_bytes():  # as received: a chunk size would copy each piece once more
                received += len(piece)
                yield piece
                if received < length and time.monotonic() > deadline:
                    raise _StreamBroken(f"body too slow: {received} of {length} bytes in {limit} s")
        except httpx.HTTPError as exc:
            raise _StreamBroken(f"{type(exc).__name__}: {exc}") from None
        finally:
            response.close()

    def _read_range_from(self, source: PullSource, digest: str, offset: int, length: int) -> bytes:
        ref = source.reference
        last = offset + length - 1
        what = f"blob {ref.repository}@{digest} range [{offset}, {offset + length})"

        def take(response: httpx.Response) -> bytes:
            if response.status_code == 200:
                return _whole_blob_as_range(response, ref.registry, what, offset, length)
            _check_content_range(response, ref.registry, what, offset, last)
            data = _read_limited(response, length, f"registry {ref.registry}: {what}",
                                 time_limit=self._config.timeouts.range_body)
            if len(data) != length:
                raise RegistryError(f"registry {ref.registry}: {what}: got {len(data)} bytes")
            return data

        return self._call(
            source, "GET", f"blobs/{digest}", (pull_scope(ref.repository),), f"GET {what}",
            headers={"Range": f"bytes={offset}-{last}"}, accept={200, 206}, handle=take,
        )

    # ---- uploads ----

    def _upload_once(
        self, target: PullSource, digest: str, source: Path | bytes, size: int, mount_from: str | None
    ) -> None:
        ref = target.reference
        scopes: Scopes = (push_scope(ref.repository),)
        params: dict[str, str] = {}
        if mount_from and mount_from != ref.repository:
            scopes += (pull_scope(mount_from),)
            params = {"mount": digest, "from": mount_from}
        start = self._send_authorized(
            target, "POST", self._url(target, "blobs/uploads/"), scopes, params=params
        )
        with closing(start):
            if start.status_code == 201:
                return  # mounted from the other repository, nothing to upload
            location = self._upload_location(start, ref, f"start upload of {digest}", expect={202})
        chunk_size = self._config.upload_chunk_size
        if size <= chunk_size:
            data = source if isinstance(source, bytes) else _read_file_exactly(source, size)
            if digest_of(data, digest.split(":")[0]) != digest:
                raise VerificationError(f"{source if isinstance(source, Path) else ref.name}: content does not match {digest}")
            self._finish_upload(target, scopes, location, digest, data, source)
            return
        location = self._upload_chunks(target, scopes, location, digest, source, size, chunk_size)
        self._finish_upload(target, scopes, location, digest, b"", source)

    def _upload_chunks(
        self,
        target: PullSource,
        scopes: Scopes,
        location: httpx.URL,
        digest: str,
        source: Path | bytes,
        size: int,
        chunk_size: int,
    ) -> httpx.URL:
        ref = target.reference
        hasher = _hasher(digest)
        for offset, chunk in _chunks(source, size, chunk_size):
            hasher.update(chunk)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            }
            response = self._send_authorized(target, "PATCH", location, scopes, headers=headers, content=chunk)
            with closing(response):
                location = self._upload_location(response, ref, f"upload of {digest} at {offset}", expect={202})
        if f"{digest.split(':')[0]}:{hasher.hexdigest()}" != digest:
            self._cancel_upload(target, scopes, location)
            raise VerificationError(f"{source if isinstance(source, Path) else ref.name}: content does not match {digest}")
        return location

    def _finish_upload(
        self, target: PullSource, scopes: Scopes, location: httpx.URL, digest: str, data: bytes, source: Path | bytes
    ) -> None:
        ref = target.reference
        url = location.copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        response = self._send_authorized(target, "PUT", url, scopes, headers=headers, content=data)
        with closing(response):
            if response.status_code == 201:
                return
            detail = _error_detail(response)
            if response.status_code == 400 and "DIGEST_INVALID" in detail:
                origin = source if isinstance(source, Path) else ref.name
                raise VerificationError(f"registry {ref.registry}: uploaded content of {origin} does not match {digest}")
            if response.status_code == 404:
                raise _Transient(f"upload session vanished: {detail}")
            raise _status_error(response.status_code, ref.registry, f"finish upload of {digest}", detail)

    def _cancel_upload(self, target: PullSource, scopes: Scopes, location: httpx.URL) -> None:
        # Best effort: an abandoned upload session is garbage-collected by the registry anyway.
        try:
            self._send_authorized(target, "DELETE", location, scopes).close()
        except (_Transient, CrfsError):
            pass

    def _upload_location(
        self, response: httpx.Response, ref: ImageReference, what: str, expect: set[int]
    ) -> httpx.URL:
        if response.status_code not in expect:
            raise _status_error(response.status_code, ref.registry, what, _error_detail(response))
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {ref.registry}: {what}: answered without a Location")
        try:
            return response.url.join(location)
        except httpx.InvalidURL:
            raise RegistryError(f"registry {ref.registry}: {what}: unusable Location {location!r}") from None

    # ---- the request machinery ----

    def _call(
        self,
        source: PullSource,
        method: str,
        path: str,
        scopes: Scopes,
        what: str,
        *,
        accept: set[int],
        handle: Callable[[httpx.Response], T],
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        keep_open: bool = False,
    ) -> T:
        """One logical request with retries: `handle` gets the streaming response when its
        status is in `accept` (and may read it); other statuses become errors."""
        registry = source.reference.registry

        def attempt() -> T:
            response = self._send_authorized(source, method, self._url(source, path), scopes, headers=headers, content=content)
            try:
                if response.status_code not in accept:
                    raise _status_error(response.status_code, registry, what, _error_detail(response))
                result = handle(response)
            except httpx.HTTPError as exc:
                response.close()
                raise _Transient(f"reading the answer failed: {_describe(exc)}") from None
            except BaseException:
                response.close()
                raise
            if not keep_open:
                response.close()
            return result

        return self._retrying(attempt, what, registry)

    def _send_authorized(
        self,
        source: PullSource,
        method: str,
        url: httpx.URL,
        scopes: Scopes,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Sends once with the right Authorization; on a 401 gets fresh credentials and
        sends once more. Our Authorization only goes to the registry's own origin."""
        ref = source.reference
        base = httpx.URL(self._base_url(source))
        same_origin = (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
        authorization = self._auth.authorization(ref.registry, ref.repository, scopes) if same_origin else None
        response = self._send_once(method, url, headers, content, params, authorization)
        if response.status_code != 401 or not same_origin:
            return response
        challenges = response.headers.get_list("WWW-Authenticate")
        detail = _error_detail(response)
        response.close()
        authorization = self._auth.after_unauthorized(ref.registry, ref.repository, scopes, challenges, authorization)
        response = self._send_once(method, url, headers, content, params, authorization)
        if response.status_code == 401:
            detail = _error_detail(response)
            response.close()
            raise self._auth.refusal(ref.registry, ref.repository, scopes, authorization, detail)
        return response

    def _send_once(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str] | None,
        content: bytes | None,
        params: dict[str, str] | None,
        authorization: str | None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if authorization:
            all_headers["Authorization"] = authorization
        request = self._http.build_request(method, url, headers=all_headers, content=content, params=params)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            if _is_certificate_error(exc):
                raise RegistryError(
                    f"TLS certificate of {url.netloc.decode()} is not trusted ({_describe(exc)}); "
                    "put its CA in certs.d/HOST:PORT/ca.crt or mark the registry insecure"
                ) from None
            raise _Transient(_describe(exc)) from None
        except httpx.HTTPError as exc:
            raise RegistryError(f"{method} {url}: {_describe(exc)}") from None
        if response.status_code in RETRY_STATUSES:
            retry_after = _retry_after(response)
            detail = _error_detail(response)
            response.close()
            raise _Transient(f"HTTP {response.status_code} {detail}".rstrip(), retry_after)
        return response

    def _retrying(self, attempt: Callable[[], T], what: str, registry: str) -> T:
        policy = self._config.retry
        started = time.monotonic()
        failures: list[str] = []
        for number in range(1, max(1, policy.attempts) + 1):
            try:
                return attempt()
            except _Transient as exc:
                failures.append(str(exc))
                delay = policy.delay(number)
                if exc.retry_after is not None:
                    delay = min(policy.backoff_max, max(delay, exc.retry_after))
            if number >= policy.attempts or time.monotonic() - started + delay > policy.total_max:
                break
            time.sleep(delay)
        raise RegistryError(
            f"registry {registry}: {what} failed after {len(failures)} attempt(s): {failures[-1]}"
        )

    def _send_token_request(self, request: httpx.Request) -> TokenResponse:
        realm = request.url.netloc.decode("ascii")

        def attempt() -> TokenResponse:
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                if _is_certificate_error(exc):
                    raise RegistryError(f"token server {realm}: TLS certificate not trusted ({_describe(exc)})") from None
                raise _Transient(_describe(exc)) from None
            except httpx.HTTPError as exc:
                raise RegistryError(f"token server {realm}: {_describe(exc)}") from None
            with closing(response):
                if response.status_code in RETRY_STATUSES:
                    raise _Transient(f"HTTP {response.status_code}", _retry_after(response))
                try:
                    body = _read_limited(response, 1 << 20, f"token server {realm}")
                except httpx.HTTPError as exc:
                    raise _Transient(_describe(exc)) from None
                return TokenResponse(response.status_code, body)

        return self._retrying(attempt, "token request", realm)

    def _url(self, source: PullSource, path: str) -> httpx.URL:
        return httpx.URL(f"{self._base_url(source)}/v2/{source.reference.repository}/{path}")

    def _base_url(self, source: PullSource) -> str:
        registry = source.reference.registry
        host = _api_host(registry)
        if source.insecure:
            self._transports.trust_insecurely(host)
        allow_http = source.insecure or (self._config.loopback_plain_http and is_loopback(host))
        scheme = self._schemes.get(host, allow_http)
        if scheme is None:
            scheme = self._retrying(lambda: self._probe_scheme(host, allow_http), "connecting", registry)
            self._schemes.put(host, allow_http, scheme)
        return f"{scheme}://{host}"

    def _probe_scheme(self, host: str, allow_http: bool) -> str:
        """https if the host speaks TLS at all; http only where allowed (see module doc)."""
        try:
            self._http.get(f"https://{host}/v2/").close()
            return "https"
        except httpx.TransportError as exc:
            if _is_certificate_error(exc):
                raise RegistryError(
                    f"TLS certificate of {host} is not trusted ({_describe(exc)}); put its CA in "
                    f"certs.d/{host}/ca.crt or mark the registry insecure in registries.conf"
                ) from None
            https_failure = _describe(exc)
            if not allow_http:
                raise _Transient(f"https: {https_failure}") from None
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry {host}: {_describe(exc)}") from None
        try:
            response = self._http.get(f"http://{host}/v2/")
        except httpx.HTTPError as exc:
            raise _Transient(f"https: {https_failure}; http: {_describe(exc)}") from None
        # Only a registry's own answers count: a TLS server rejecting plain http (Go
        # answers 400) must not turn a TLS failure (say, a missing client
        # certificate) into a plain-http conversation.
        if response.status_code in (200, 401):
            return "http"
        failure = f"https: {https_failure}; http: /v2/ answered HTTP {response.status_code}"
        if response.status_code in RETRY_STATUSES:
            raise _Transient(failure)
        raise RegistryError(f"registry {host}: cannot connect ({failure})")


# ---- helpers on responses ----


def _with_mirror_failures(exc: RegistryError, failures: list[str]) -> RegistryError:
    if not failures:
        return exc
    return type(exc)(f"{exc} (mirrors tried first: {'; '.join(failures)})")


def _read_limited(response: httpx.Response, limit: int, what: str, time_limit: float | None = None) -> bytes:
    """The body, at most `limit` bytes; with `time_limit`, a body that takes longer than
    that many seconds is a transient failure (retried like a broken-off download)."""
    pieces: list[bytes] = []
    total = 0
    deadline = None if time_limit is None else time.monotonic() + time_limit
    for piece in response.iter_bytes():
        total += len(piece)
        if total > limit:
            raise FormatError(f"{what}: answer larger than the expected {limit} bytes")
        pieces.append(piece)
        if deadline is not None and time.monotonic() > deadline and total < limit:
            raise _Transient(f"body too slow: {total} of {limit} bytes in {time_limit} s")
    return b"".join(pieces)


def _error_detail(response: httpx.Response) -> str:
    """The registry's own words about an error (its JSON `errors`), briefly."""
    if response.request.method == "HEAD":
        return ""
    try:
        body = _read_limited(response, MAX_ERROR_BODY, "error")
    except (httpx.HTTPError, FormatError):
        return ""
    try:
        document = json.loads(body)
        errors = document.get("errors") if isinstance(document, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return f"{first.get('code', '')}: {first.get('message', '')}"[:300]
    except (ValueError, RecursionError):  # an error body is only a hint
        pass
    return body[:200].decode("utf-8", "replace").strip()


def _status_error(status: int, registry: str, what: str, detail: str) -> RegistryError:
    suffix = f" ({detail})" if detail else ""
    if status == 404:
        return NotFoundError(f"registry {registry}: {what}: not found{suffix}")
    if status in (401, 403):
        return AuthError(f"registry {registry}: {what}: access denied (HTTP {status}){suffix}")
    if status == 416:
        return RegistryError(f"registry {registry}: {what}: range not satisfiable, the blob is shorter{suffix}")
    return RegistryError(f"registry {registry}: {what}: HTTP {status}{suffix}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _check_content_range(response: httpx.Response, registry: str, what: str, first: int, last: int) -> None:
    header = response.headers.get("Content-Range", "")
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise RegistryError(f"registry {registry}: {what}: 206 answer with bad Content-Range {header!r}")
    if (int(match.group(1)), int(match.group(2))) != (first, last):
        raise RegistryError(
            f"registry {registry}: {what}: answered {header!r}, the blob is shorter than its descriptor says"
            if int(match.group(2)) < last
            else f"registry {registry}: {what}: answered the wrong range {header!r}"
        )


def _whole_blob_as_range(response: httpx.Response, registry: str, what: str, offset: int, length: int) -> bytes:
    # A 200 to a Range request is the whole blob. That is only acceptable when the
    # range asked for was the whole blob; otherwise close without reading the body.
    announced = response.headers.get("Content-Length", "")
    if offset == 0 and announced.isdigit() and int(announced) == length:
        data = _read_limited(response, length, f"registry {registry}: {what}")
        if len(data) == length:
            return data
    response.close()
    raise _range_ignored(registry, what)


def _range_ignored(registry: str, what: str) -> RangeNotSupportedError:
    return RangeNotSupportedError(
        f"registry {registry}: {what}: the registry ignored the Range header and answered "
        "with the whole blob (HTTP 200); crfs needs registries that serve byte ranges"
    )


def _manifest_media_type(data: bytes, content_type: str, what: str) -> str:
    declared = content_type.split(";", 1)[0].strip()
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        raise FormatError(f"{what}: not JSON") from None
    if not isinstance(document, dict):
        raise FormatError(f"{what}: not a JSON object")
    inner = document.get("mediaType")
    if inner is not None and not isinstance(inner, str):
        raise FormatError(f"{what}: mediaType is not a string")
    if declared in MANIFEST_MEDIA_TYPES:
        if inner and inner != declared:
            raise FormatError(f"{what}: served as {declared} but says it is {inner}")
        return declared
    if inner in MANIFEST_MEDIA_TYPES:
        return inner
    if not inner and document.get("schemaVersion") == 2:
        # OCI allows omitting mediaType; the shape tells an index from an image.
        if isinstance(document.get("manifests"), list):
            return OCI_INDEX
        if isinstance(document.get("layers"), list) and isinstance(document.get("config"), dict):
            return OCI_MANIFEST
    raise FormatError(f"{what}: unsupported manifest type {inner or declared or 'unknown'!r}")


# ---- helpers on upload sources ----


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise BlobSourceError(f"{path}: cannot read the blob to push: {exc}") from None


def _read_file_exactly(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(size + 1)
    except OSError as exc:
        raise BlobSourceError(f"{path}: cannot read the blob to push: {exc}") from None
    if len(data) != size:
        raise BlobSourceError(f"{path}: changed size while being pushed")
    return data


def _chunks(source: Path | bytes, size: int, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    if isinstance(source, bytes):
        for offset in range(0, size, chunk_size):
            yield offset, source[offset : offset + chunk_size]
        return
    try:
        with source.open("rb") as handle:
            offset = 0
            while offset < size:
                chunk = handle.read(min(chunk_size, size - offset))
                if not chunk:
                    raise BlobSourceError(f"{source}: changed size while being pushed")
                yield offset, chunk
                offset += len(chunk)
    except OSError as exc:
        raise BlobSourceError(f"{source}: cannot read the blob to push: {exc}") from None
