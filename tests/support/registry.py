"""Real `docker-registry` processes for tests, and the few fault fronts they need.

Variants (`start_*` functions, each returning a `RunningRegistry`):
- plain HTTP, anonymous;
- TLS (a CA made here, passed to the client through a certs.d dir) with htpasswd Basic
  auth (credentials passed through an auth.json);
- token auth: the registry's `auth.token` config pointing at `TokenServer`, a small
  JWT issuer in a thread (ES256, signing certificate in the `x5c` header, the same
  certificate as the registry's rootcertbundle).

Fault fronts, in threads: a real registry cannot be made to ignore Range, fail with 5xx
on demand or redirect blob downloads to another host, so `FaultRelay` sits in front of a
real registry and does exactly those things on request, and `BlobHost` plays the other
host (a CDN serving blob files straight from the registry's storage). These are the
sanctioned stand-ins for faults; everything else in the tests talks to the real process.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from crfs_worker.auth import CredentialStore
from crfs_worker.reference import ImageReference
from crfs_worker.registry import OCI_MANIFEST, RegistryClient, RegistryConfig, RetryPolicy, Timeouts

REGISTRY_BINARY = "docker-registry"
FAST_RETRIES = RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.05, total_max=5.0)
TEST_TIMEOUTS = Timeouts(connect=5.0, read=30.0, write=30.0, pool=30.0)
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
EMPTY_CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
JWT_LEEWAY = 60  # seconds distribution adds to a token's exp before refusing it


def free_port() -> int:
    # Racy in theory (another process could take the port before the registry binds
    # it); start_* retries with a new port if the registry fails to come up.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- certificates ----


@dataclass(frozen=True)
class KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, cert_path: Path, key_path: Path | None = None) -> None:
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        if key_path is not None:
            key_path.write_bytes(
                self.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: KeyPair | None, ca: bool, hosts: tuple[str, ...] = ()
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        import ipaddress

        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def make_ca(subject: str = "crfs test CA") -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    return KeyPair(key, _certificate(subject, key, None, ca=True))


def make_server_cert(ca: KeyPair, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    return KeyPair(key, _certificate(hosts[0], key, ca, ca=False, hosts=hosts))


# ---- the registry process ----


@dataclass
class RegistryProcess:
    """One `docker-registry serve CONFIG` child process; `prefix` runs it elsewhere
    (`ip netns exec NS`), where it listens on `host`."""

    workdir: Path
    port: int
    config: dict[str, Any]
    scheme: str = "http"
    ca_file: Path | None = None
    client_cert: tuple[Path, Path] | None = None
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def storage_root(self) -> Path:
        return Path(self.config["storage"]["filesystem"]["rootdirectory"])

    def start(self) -> None:
        if shutil.which(REGISTRY_BINARY) is None:
            raise RuntimeError(f"{REGISTRY_BINARY} is not installed (Debian package docker-registry)")
        config_path = self.workdir / "config.yml"
        # JSON is YAML, so no YAML library is needed.
        config_path.write_text(json.dumps(self.config, indent=2))
        log = (self.workdir / "registry.log").open("ab")
        self._process = subprocess.Popen(
            [*self.prefix, REGISTRY_BINARY, "serve", str(config_path)], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self._wait_until_answering()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the registry still accepts connections (the kernel's backlog) but
        answers nothing, like a hung server."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def _wait_until_answering(self) -> None:
        verify: Any = True
        if self.ca_file:
            verify = ssl.create_default_context(cafile=str(self.ca_file))
            if self.client_cert:
                verify.load_cert_chain(str(self.client_cert[0]), str(self.client_cert[1]))
        deadline = time.monotonic() + 30
        url = f"{self.scheme}://{self.netloc}/v2/"
        with httpx.Client(verify=verify, timeout=2.0, trust_env=False) as probe:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"docker-registry exited early: {self._log_tail()}")
                try:
                    probe.get(url)
                    return
                except httpx.TransportError:
                    time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {url}: {self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.workdir / "registry.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


def registry_config(port: int, root: Path, host: str = "127.0.0.1", access_log: bool = False) -> dict[str, Any]:
    return {
        "version": 0.1,
        "log": {"level": "error" if access_log else "warn", "accesslog": {"disabled": not access_log}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{host}:{port}", "secret": "crfs-test-secret"},
    }


# ---- a registry that counts what it served ----

ACCESS_LINE = re.compile(r'"(GET|HEAD) (/v2/[^ ]+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')


@dataclass(frozen=True)
class Fetched:
    """Registry traffic in a window of the access log."""

    blob_bytes: int
    blob_requests: int
    requests: int       # every GET/HEAD: manifests, configs, blobs


@dataclass
class LoggedRegistry:
    """A plain docker-registry whose access log counts what clients fetched (tests, the
    benchmarks and the main job count bytes with it)."""

    process: RegistryProcess

    @classmethod
    def start(cls, workdir: Path, storage: Path | None = None, host: str = "127.0.0.1",
              port: int | None = None, prefix: tuple[str, ...] = ()) -> "LoggedRegistry":
        """On a free loopback port, or on `host:port` under `prefix` (a network namespace)."""
        workdir.mkdir(parents=True, exist_ok=True)
        root = storage or workdir / "storage"

        def make(free: int) -> RegistryProcess:
            listen = port or free
            return RegistryProcess(workdir, listen, registry_config(listen, root, host, access_log=True),
                                   host=host, prefix=prefix)

        return cls(_start(workdir, make, attempts=1 if port else 3))

    @property
    def host(self) -> str:
        """The registry part of an image reference: host:port."""
        return self.process.netloc

    @property
    def log(self) -> Path:
        return self.process.workdir / "registry.log"

    def mark(self) -> int:
        return self.log.stat().st_size

    def fetched_since(self, mark: int, repository: str | None = None) -> Fetched:
        """What the access log shows after byte `mark`; blob figures only for `repository`
        when given."""
        blob_bytes = blob_requests = requests = 0
        with self.log.open("rb") as f:
            f.seek(mark)
            for line in f.read().decode(errors="replace").splitlines():
                m = ACCESS_LINE.search(line)
                if not m:
                    continue
                requests += 1
                method, path, _, size = m.groups()
                if method != "GET" or "/blobs/" not in path or size == "-":
                    continue
                if repository is None or path.startswith(f"/v2/{repository}/blobs/"):
                    blob_bytes += int(size)
                    blob_requests += 1
        return Fetched(blob_bytes, blob_requests, requests)

    def manifest(self, repository: str, tag: str) -> dict[str, Any]:
        with RegistryClient() as client:
            return json.loads(client.get_manifest(ImageReference(self.host, repository, tag)).data)

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> "LoggedRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the token server ----


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TokenRequest:
    account: str | None
    service: str | None
    scopes: tuple[str, ...]


@dataclass
class TokenServer:
    """Issues distribution JWTs. Hooks for tests:
    `lifetime` (seconds from now to `exp`; distribution tolerates 60 s past exp, so a
    lifetime below -60 issues tokens the registry refuses), `users` (Basic credentials
    the server accepts), `anonymous_pull` (grant pull without credentials), and
    `requests` (what was asked for, in order)."""

    service: str = "crfs-test-registry"
    issuer: str = "crfs-test-issuer"
    users: dict[str, str] = field(default_factory=dict)
    anonymous_pull: bool = False
    lifetime: int = 300
    requests: list[TokenRequest] = field(default_factory=list)
    signing: KeyPair = field(default_factory=lambda: make_ca("crfs test token signer"))
    _server: ThreadingHTTPServer | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def reset(self) -> None:
        with self._lock:
            self.lifetime = 300
            self.requests.clear()

    def token_requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self.requests)

    def rotate_signing_key(self) -> None:
        self.signing = make_ca("crfs test token signer")

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, query: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        params = parse_qs(query)
        account = None
        if authorization:
            account = self._check_basic(authorization)
            if account is None:
                return 401, {"details": "wrong credentials"}
        scopes = tuple(scope for value in params.get("scope", []) for scope in value.split(" ") if scope)
        with self._lock:
            self.requests.append(TokenRequest(account, (params.get("service") or [None])[0], scopes))
            lifetime = self.lifetime
        access = [grant for scope in scopes if (grant := self._grant(scope, account)) is not None]
        token = self._sign(account or "", access, lifetime)
        return 200, {"token": token, "access_token": token, "expires_in": max(lifetime, 1)}

    def _check_basic(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return None
        return username if self.users.get(username) == password else None

    def _grant(self, scope: str, account: str | None) -> dict[str, Any] | None:
        parts = scope.split(":")
        if len(parts) != 3 or parts[0] != "repository":
            return None
        wanted = parts[2].split(",")
        allowed = wanted if account else (["pull"] if self.anonymous_pull else [])
        actions = [action for action in wanted if action in allowed]
        return {"type": "repository", "name": parts[1], "actions": actions}

    def _sign(self, subject: str, access: list[dict[str, Any]], lifetime: int) -> str:
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.signing.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self.signing.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        # JWS wants the raw r||s form, not DER.
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _token_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            if url.path != "/token":
                status, body = 404, {"details": "no such path"}
            else:
                status, body = server.answer(url.query, self.headers.get("Authorization"))
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# ---- what tests get ----


@dataclass
class RunningRegistry:
    """A started registry and a client configuration that reaches it."""

    process: RegistryProcess
    workdir: Path
    client_config: RegistryConfig
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        return self.process.netloc

    @property
    def storage_root(self) -> Path:
        return self.process.storage_root

    def ref(self, repository: str, tag: str | None = None, digest: str | None = None) -> ImageReference:
        return ImageReference(self.host, repository, tag, digest)

    def behind(self, relay: FaultRelay) -> RunningRegistry:
        """The same registry reached through `relay` (its host is the relay's)."""
        process = replace(self.process)
        process.port = int(relay.netloc.rsplit(":", 1)[1])
        return replace(self, process=process)

    def client(self, **overrides: Any) -> RegistryClient:
        """A RegistryClient for this registry; `overrides` replace RegistryConfig fields."""
        return RegistryClient(replace(self.client_config, **overrides))

    def blob_file(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":", 1)
        return self.storage_root / "docker/registry/v2/blobs" / algorithm / hexdigest[:2] / hexdigest / "data"

    def push_blob(self, repository: str, data: bytes) -> str:
        digest = sha256_digest(data)
        with self.client() as client:
            client.put_blob(self.ref(repository), digest, data)
        return digest

    def push_image(
        self,
        repository: str,
        tag: str,
        layers: list[bytes],
        config: bytes = EMPTY_CONFIG,
        layer_media_type: str = OCI_LAYER_GZIP,
        layer_annotations: list[dict[str, str]] | None = None,
    ) -> "PushedImage":
        """Pushes blobs and an OCI manifest through crfs' own client."""
        with self.client() as client:
            return push_image(client, self.ref(repository, tag), layers, config, layer_media_type, layer_annotations)

    def rotate_token_signing_key(self) -> None:
        """Token registries only: a new signing key, and the registry restarted to trust
        only it, so every token issued before is refused from now on."""
        assert self.token_server is not None
        self.token_server.rotate_signing_key()
        self.token_server.signing.write(self.workdir / "token-root.crt")
        self.process.restart()

    def stop(self) -> None:
        self.process.stop()
        if self.token_server is not None:
            self.token_server.stop()


@dataclass(frozen=True)
class PushedImage:
    ref: ImageReference  # by tag
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]

    @property
    def pinned(self) -> ImageReference:
        return self.ref.with_digest(self.manifest_digest)


def push_image(
    client: RegistryClient,
    ref: ImageReference,
    layers: list[bytes],
    config: bytes = EMPTY_CONFIG,
    layer_media_type: str = OCI_LAYER_GZIP,
    layer_annotations: list[dict[str, str]] | None = None,
) -> PushedImage:
    config_digest = sha256_digest(config)
    client.put_blob(ref, config_digest, config)
    descriptors = []
    for number, layer in enumerate(layers):
        digest = sha256_digest(layer)
        client.put_blob(ref, digest, layer)
        descriptor: dict[str, Any] = {"mediaType": layer_media_type, "digest": digest, "size": len(layer)}
        if layer_annotations and layer_annotations[number]:
            descriptor["annotations"] = layer_annotations[number]
        descriptors.append(descriptor)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": descriptors,
        }
    ).encode()
    manifest_digest = client.put_manifest(ref, manifest, OCI_MANIFEST)
    return PushedImage(ref, manifest, manifest_digest, config_digest, tuple(d["digest"] for d in descriptors))


def _start(workdir: Path, make: Any, attempts: int = 3) -> RegistryProcess:
    # Retried with a fresh port: free_port() cannot reserve the port it returns.
    last: Exception | None = None
    for _ in range(attempts):
        process: RegistryProcess = make(free_port())
        try:
            process.start()
            return process
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start docker-registry: {last}")


def start_plain_registry(workdir: Path) -> RunningRegistry:
    workdir.mkdir(parents=True, exist_ok=True)
    process = _start(
        workdir, lambda port: RegistryProcess(workdir, port, registry_config(port, workdir / "storage"))
    )
    config = RegistryConfig(retry=FAST_RETRIES, timeouts=TEST_TIMEOUTS)
    return RunningRegistry(process, workdir, config)


def write_auth_file(path: Path, entries: dict[str, tuple[str, str]]) -> Path:
    """An auth.json as `podman login` writes it: {"auths": {KEY: {"auth": base64(user:pass)}}}."""
    auths = {
        key: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for key, (user, password) in entries.items()
    }
    path.write_text(json.dumps({"auths": auths}))
    return path


def start_tls_registry(
    workdir: Path,
    username: str = "crfs",
    password: str = "s3cret-pass",
    require_client_cert: bool = False,
) -> RunningRegistry:
    """HTTPS with a private CA and htpasswd (bcrypt) Basic auth. With
    `require_client_cert`, the registry also demands a client certificate signed by
    that CA; the client config then carries one in certs.d (client.cert/client.key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    server = make_server_cert(ca)
    ca.write(workdir / "ca.crt")
    server.write(workdir / "server.crt", workdir / "server.key")
    client_cert = make_server_cert(ca, hosts=("crfs-test-client",))
    htpasswd = subprocess.run(
        ["htpasswd", "-Bbn", username, password], check=True, capture_output=True, text=True
    ).stdout
    (workdir / "htpasswd").write_text(htpasswd)

    def make(port: int) -> RegistryProcess:
        config = registry_config(port, workdir / "storage")
        config["http"]["tls"] = {"certificate": str(workdir / "server.crt"), "key": str(workdir / "server.key")}
        if require_client_cert:
            config["http"]["tls"]["clientcas"] = [str(workdir / "ca.crt")]
        config["auth"] = {"htpasswd": {"realm": "crfs-test", "path": str(workdir / "htpasswd")}}
        return RegistryProcess(
            workdir, port, config, scheme="https", ca_file=workdir / "ca.crt",
            client_cert=(workdir / "client.cert", workdir / "client.key") if require_client_cert else None,
        )

    client_cert.write(workdir / "client.cert", workdir / "client.key")
    process = _start(workdir, make)
    certs_dir = workdir / "certs.d" / process.netloc
    certs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(workdir / "ca.crt", certs_dir / "ca.crt")
    if require_client_cert:
        shutil.copy(workdir / "client.cert", certs_dir / "client.cert")
        shutil.copy(workdir / "client.key", certs_dir / "client.key")
    auth_file = write_auth_file(workdir / "auth.json", {process.netloc: (username, password)})
    config = RegistryConfig(
        credentials=CredentialStore(files=(auth_file,)),
        certs_dirs=(workdir / "certs.d",),
        retry=FAST_RETRIES,
        timeouts=TEST_TIMEOUTS,
    )
    return RunningRegistry(process, workdir, config, username, password)


def start_token_registry(workdir: Path, username: str = "crfs", password: str = "t0ken-pass") -> RunningRegistry:
    """Plain HTTP with `auth.token` pointing at a TokenServer in this process."""
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = TokenServer(users={username: password})
    tokens.start()
    tokens.signing.write(workdir / "token-root.crt")

    def make(port: int) -> RegistryProcess:
        config = registry_config(port, workdir / "storage")
        config["auth"] = {
            "token": {
                "realm": tokens.realm,
                "service": tokens.service,
                "issuer": tokens.issuer,
                "rootcertbundle": str(workdir / "token-root.crt"),
            }
        }
        return RegistryProcess(workdir, port, config)

    try:
        process = _start(workdir, make)
    except RuntimeError:
        tokens.stop()
        raise
    auth_file = write_auth_file(workdir / "auth.json", {process.netloc: (username, password)})
    config = RegistryConfig(
        credentials=CredentialStore(files=(auth_file,)), retry=FAST_RETRIES, timeouts=TEST_TIMEOUTS
    )
    return RunningRegistry(process, workdir, config, username, password, tokens)


# ---- fault fronts ----

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)
_BLOB_PATH = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class RelayRecord:
    method: str
    path: str
    status: int
    range_header: str | None
    body_bytes_sent: int
    completed: bool  # False if the client hung up before the whole body was sent


@dataclass
class FaultRelay:
    """An HTTP front for a real plain-HTTP registry that misbehaves on request:
    `ignore_range` (forward without the Range header: the registry answers 200 with
    the whole blob), `fail_next(n, status, path_contains, method)` (answer the next n
    matching requests with `status` instead of forwarding), `cut_next(n, after_bytes)`
    (hang up on the next n GET answers after that many body bytes, the full length
    announced), `redirect_blobs_to` (answer blob GET/HEAD with 307 to a BlobHost once
    the registry has accepted them), `reset_next(n)` (reset the next n connections
    (TCP RST) instead of answering; the `/v2/` probe is spared), `slow_next(n, piece, interval)` (send the next n GET
    bodies `piece` bytes at a time, `interval` seconds apart), `corrupt_next(n, at)` (flip
    the byte at body offset `at` of the next n GET answers longer than that: wrong bytes
    with right headers)."""

    upstream: str
    ignore_range: bool = False
    redirect_blobs_to: "BlobHost | None" = None
    _failures_left: int = field(default=0, init=False)
    _fail_status: int = field(default=503, init=False)
    _fail_path: str = field(default="", init=False)
    _fail_method: str | None = field(default=None, init=False)
    _cuts_left: int = field(default=0, init=False)
    _cut_after: int = field(default=0, init=False)
    _resets_left: int = field(default=0, init=False)
    _slow_left: int = field(default=0, init=False)
    _slow: tuple[int, float] = field(default=(1, 0.0), init=False)
    _corrupt_left: int = field(default=0, init=False)
    _corrupt_at: int = field(default=0, init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)
    _in_flight: int = field(default=0, init=False)
    _records: list[RelayRecord] = field(default_factory=list, init=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, init=False)
    _server: ThreadingHTTPServer | None = field(default=None, init=False)

    @property
    def netloc(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, count: int, status: int = 503, path_contains: str = "", method: str | None = None) -> None:
        with self._changed:
            self._failures_left, self._fail_status = count, status
            self._fail_path, self._fail_method = path_contains, method

    def cut_next(self, count: int, after_bytes: int) -> None:
        with self._changed:
            self._cuts_left, self._cut_after = count, after_bytes

    def reset_next(self, count: int) -> None:
        with self._changed:
            self._resets_left = count

    def slow_next(self, count: int, piece: int, interval: float) -> None:
        with self._changed:
            self._slow_left, self._slow = count, (max(1, piece), interval)

    def corrupt_next(self, count: int, at: int = 0) -> None:
        with self._changed:
            self._corrupt_left, self._corrupt_at = count, at

    def records(self, timeout: float = 30.0) -> list[RelayRecord]:
        """Every finished request, once none is in flight: the relay logs a request after
        its last byte is sent, which can be after the client has already moved on."""
        with self._changed:
            self._changed.wait_for(lambda: self._in_flight == 0, timeout)
            return list(self._records)

    def wait_in_flight(self, count: int = 1, timeout: float = 30.0) -> bool:
        """Blocks until at least `count` requests are being relayed (e.g. waiting on a
        paused registry); False after `timeout`."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight >= count, timeout)

    def wait_for_records(self, count: int, timeout: float = 30.0) -> list[RelayRecord]:
        """Blocks until `count` requests have finished (bodies included) or `timeout`."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._records) >= count, timeout)
            return list(self._records)

    def start(self) -> "FaultRelay":
        server = _QuietServer(("127.0.0.1", 0), _relay_handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        self._stopped.set()  # ends the pauses of slow bodies
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _take_failure(self, method: str, path: str) -> int | None:
        with self._changed:
            if self._failures_left > 0 and self._fail_path in path and self._fail_method in (None, method):
                self._failures_left -= 1
                return self._fail_status
            return None

    def _take_cut(self, method: str) -> int | None:
        with self._changed:
            if self._cuts_left > 0 and method == "GET":
                self._cuts_left -= 1
                return self._cut_after
            return None

    def _take_reset(self) -> bool:
        with self._changed:
            if self._resets_left > 0:
                self._resets_left -= 1
                return True
            return False

    def _take_slow(self, method: str) -> tuple[int, float] | None:
        with self._changed:
            if self._slow_left > 0 and method == "GET":
                self._slow_left -= 1
                return self._slow
            return None

    def _take_corruption(self, method: str, length: str | None) -> int | None:
        with self._changed:
            long_enough = length is not None and length.isdigit() and int(length) > self._corrupt_at
            if self._corrupt_left > 0 and method == "GET" and long_enough:
                self._corrupt_left -= 1
                return self._corrupt_at
            return None

    def _begin(self) -> None:
        with self._changed:
            self._in_flight += 1
            self._changed.notify_all()

    def _record(self, record: RelayRecord) -> None:
        with self._changed:
            self._records.append(record)
            self._in_flight -= 1
            self._changed.notify_all()


class _QuietServer(ThreadingHTTPServer):
    """Clients hanging up on the relay is what the fault tests do: not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _relay_handler(relay: FaultRelay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self._relay()

        do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _relay(self) -> None:
            relay._begin()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v2/" and relay._take_reset():
                # SO_LINGER 0: close() sends a TCP RST, what a crashing peer or proxy does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                relay._record(RelayRecord(self.command, self.path, 0, self.headers.get("Range"), 0, False))
                return
            failure = relay._take_failure(self.command, self.path)
            if failure is not None:
                self._answer(failure, b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}')
                return
            range_header = self.headers.get("Range")
            dropped = _HOP_BY_HOP | ({"range"} if relay.ignore_range else set())
            # Every header as sent, repeated ones too (podman sends several Accept headers).
            headers = [(k, v) for k, v in self.headers.items() if k.lower() not in dropped]
            # The registry builds Locations from the Host the client sent.
            headers.append(("Host", self.headers.get("Host", relay.netloc)))
            upstream = http.client.HTTPConnection(relay.upstream, timeout=30)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    upstream.putheader(key, value)
                upstream.endheaders(body or None)
                response = upstream.getresponse()
            except OSError as exc:
                upstream.close()
                self._answer(502, json.dumps({"errors": [{"code": "RELAY", "message": str(exc)}]}).encode())
                return
            try:
                self._pass_on(response, range_header)
            finally:
                upstream.close()

        def _pass_on(self, response: http.client.HTTPResponse, range_header: str | None) -> None:
            blob = _BLOB_PATH.match(urlsplit(self.path).path)
            if relay.redirect_blobs_to is not None and blob and self.command in ("GET", "HEAD") and response.status in (200, 206):
                location = relay.redirect_blobs_to.url_for(blob.group(2))
                self.send_response(307)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                relay._record(RelayRecord(self.command, self.path, 307, range_header, 0, True))
                return
            self.send_response(response.status)
            length = response.getheader("Content-Length")
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            if length is None and self.command != "HEAD":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            sent, completed = 0, True
            ok = response.status in (200, 206)
            cut_after = relay._take_cut(self.command) if ok else None
            slow = relay._take_slow(self.command) if ok else None
            corrupt_at = relay._take_corruption(self.command, length) if ok else None
            if self.command != "HEAD":
                try:
                    while piece := response.read(64 * 1024):
                        if corrupt_at is not None and sent <= corrupt_at < sent + len(piece):
                            flipped = bytearray(piece)
                            flipped[corrupt_at - sent] ^= 0xFF
                            piece = bytes(flipped)
                        if cut_after is not None and sent + len(piece) > cut_after:
                            self.wfile.write(piece[: cut_after - sent])
                            sent, completed = cut_after, False
                            self.close_connection = True
                            break
                        if slow is not None:
                            self._write_slowly(piece, *slow)
                        else:
                            self.wfile.write(piece)
                        sent += len(piece)
                except (BrokenPipeError, ConnectionResetError):
                    completed = False
                    self.close_connection = True
            relay._record(RelayRecord(self.command, self.path, response.status, range_header, sent, completed))

        def _write_slowly(self, data: bytes, piece: int, interval: float) -> None:
            for start in range(0, len(data), piece):
                if relay._stopped.wait(interval):
                    raise BrokenPipeError("relay stopped")
                self.wfile.write(data[start : start + piece])
                self.wfile.flush()

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            relay._record(RelayRecord(self.command, self.path, status, self.headers.get("Range"), len(payload), True))

    return Handler


@dataclass
class BlobHost:
    """Another host serving blob files out of a registry's storage (what an S3 or CDN
    redirect target does), with Range support. Records the headers of every request."""

    registry: RunningRegistry
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def url_for(self, digest: str) -> str:
        assert self._server is not None
        return f"http://localhost:{self._server.server_address[1]}/blobs/{digest}"

    def headers(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.seen_headers)

    def start(self) -> "BlobHost":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _blob_host_handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _note(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.seen_headers.append(headers)


def _blob_host_handler(host: BlobHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            host._note({k.lower(): v for k, v in self.headers.items()})
            digest = self.path.rsplit("/", 1)[-1]
            path = host.registry.blob_file(digest)
            if not path.is_file():
                self._send(404, b"", None)
                return
            data = path.read_bytes()
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            if match is None:
                self._send(200, data, None)
                return
            first, last = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
            self._send(206, data[first : last + 1], f"bytes {first}-{last}/{len(data)}")

        do_HEAD = do_GET  # noqa: N815

        def _send(self, status: int, payload: bytes, content_range: str | None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            if content_range:
                self.send_header("Content-Range", content_range)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
