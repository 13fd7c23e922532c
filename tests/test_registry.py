"""The registry client against real docker-registry processes (plain, TLS+Basic, token),
with FaultRelay/BlobHost only where a real registry cannot produce the fault."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from crfs_worker.auth import CredentialStore
from crfs_worker.errors import (
    AuthError,
    FormatError,
    NotFoundError,
    RangeNotSupportedError,
    RegistryError,
    VerificationError,
)
from crfs_worker.reference import ImageReference
from crfs_worker.registries_conf import (
    BlockedRegistryError,
    RegistriesConf,
    RegistriesConfError,
    default_conf_paths,
)
from crfs_worker.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobSourceError,
    RegistryClient,
    SchemeMemo,
    RegistryConfig,
    RetryPolicy,
    _manifest_media_type,
    is_loopback,
)
from tests.support.registry import (
    BlobHost,
    FaultRelay,
    RelayRecord,
    RunningRegistry,
    free_port,
    sha256_digest,
    start_plain_registry,
    start_tls_registry,
    write_auth_file,
)

# A FaultRelay in front of a registry, and that registry reached through the relay.
Relayed = Callable[[RunningRegistry], tuple[FaultRelay, RunningRegistry]]
BlobHosts = Callable[[RunningRegistry], BlobHost]


def _unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


@pytest.fixture(scope="module")
def mirror_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    running = start_plain_registry(tmp_path_factory.mktemp("mirror-registry"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def big_blob(registry: RunningRegistry) -> tuple[str, str, bytes]:
    """24 MiB, more than loopback socket buffers hold: (repository, digest, data)."""
    return _pushed_blob(registry, "big", 24 << 20)


def _api_records(relay: FaultRelay) -> list[RelayRecord]:
    """What the relay passed on, without the client's one-time `GET /v2/` probe."""
    return [record for record in relay.records() if record.path != "/v2/"]


@pytest.fixture
def relayed(fault_relay: Callable[[RunningRegistry], FaultRelay]) -> Relayed:
    """Puts a FaultRelay in front of a registry; gives it and the same registry reached
    through it (its host is the relay's)."""

    def make(registry: RunningRegistry) -> tuple[FaultRelay, RunningRegistry]:
        relay = fault_relay(registry)
        return relay, registry.behind(relay)

    return make


def _pushed_blob(registry: RunningRegistry, name: str, size: int) -> tuple[str, str, bytes]:
    """`size` random bytes pushed to a new repository named after `name`: (repository, digest, data)."""
    data = os.urandom(size)
    repository = _unique(name)
    return repository, registry.push_blob(repository, data), data


# ---- manifests and blobs on the plain registry ----


def test_push_and_pull_an_image(registry: RunningRegistry) -> None:
    layers = [os.urandom(5000), b"second layer" * 1000]
    image = registry.push_image(_unique("app"), "v1", layers)
    with registry.client() as client:
        by_tag = client.get_manifest(image.ref)
        by_digest = client.get_manifest(image.pinned)
        assert by_tag == by_digest
        assert (by_tag.data, by_tag.media_type, by_tag.digest) == (image.manifest, OCI_MANIFEST, image.manifest_digest)
        assert not by_tag.is_index
        for digest, layer in zip(image.layer_digests, layers):
            assert client.blob_size(image.ref, digest) == len(layer)
            assert client.get_blob(image.ref, digest) == layer
            pieces = list(client.stream_blob(image.ref, digest))
            assert b"".join(pieces) == layer
        assert client.blob_size(image.ref, sha256_digest(b"never pushed")) is None


def test_manifest_without_tag_means_latest(registry: RunningRegistry) -> None:
    image = registry.push_image(_unique("app"), "latest", [b"layer"])
    with registry.client() as client:
        assert client.get_manifest(ImageReference(registry.host, image.ref.repository)).digest == image.manifest_digest


def test_docker_schema2_manifests_and_both_index_types(registry: RunningRegistry) -> None:
    repository = _unique("multi")
    image = registry.push_image(repository, "oci", [b"x" * 100])
    docker_manifest = json.loads(image.manifest)
    docker_manifest["mediaType"] = DOCKER_MANIFEST
    docker_manifest["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    for layer in docker_manifest["layers"]:
        layer["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    docker_bytes = json.dumps(docker_manifest).encode()
    with registry.client() as client:
        docker_digest = client.put_manifest(registry.ref(repository, "docker"), docker_bytes, DOCKER_MANIFEST)
        entry = {"digest": docker_digest, "size": len(docker_bytes), "platform": {"architecture": "amd64", "os": "linux"}}
        docker_list = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": [{**entry, "mediaType": DOCKER_MANIFEST}]}).encode()
        oci_index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{**entry, "mediaType": DOCKER_MANIFEST}]}).encode()
        client.put_manifest(registry.ref(repository, "list"), docker_list, DOCKER_MANIFEST_LIST)
        index_digest = client.put_manifest(registry.ref(repository, "index"), oci_index, OCI_INDEX)
        got = {tag: client.get_manifest(registry.ref(repository, tag)) for tag in ("docker", "list", "index")}
        assert got["docker"].media_type == DOCKER_MANIFEST and got["docker"].data == docker_bytes
        assert got["list"].media_type == DOCKER_MANIFEST_LIST and got["list"].is_index
        assert got["index"].media_type == OCI_INDEX and got["index"].digest == index_digest
        assert client.get_manifest(registry.ref(repository, digest=docker_digest)).media_type == DOCKER_MANIFEST


def test_put_manifest_by_digest_checks_the_digest(registry: RunningRegistry) -> None:
    image = registry.push_image(_unique("app"), "v1", [b"l"])
    with registry.client() as client:
        pinned = registry.ref(image.ref.repository, digest=image.manifest_digest)
        assert client.put_manifest(pinned, image.manifest, OCI_MANIFEST) == image.manifest_digest
        with pytest.raises(VerificationError, match="has digest"):
            client.put_manifest(pinned, image.manifest + b" ", OCI_MANIFEST)


def test_missing_manifest_and_blob_are_not_found_errors_naming_them(registry: RunningRegistry) -> None:
    repository = _unique("nothing")
    missing = sha256_digest(b"missing")
    with registry.client() as client:
        with pytest.raises(NotFoundError) as caught:
            client.get_manifest(registry.ref(repository, "nope"))
        assert f"{repository}:nope" in str(caught.value) and registry.host in str(caught.value)
        with pytest.raises(NotFoundError) as caught:
            client.get_blob(registry.ref(repository), missing)
        assert missing in str(caught.value)
        with pytest.raises(NotFoundError):
            client.read_range(registry.ref(repository), missing, 0, 1)


def test_corrupted_manifest_and_blob_are_verification_errors(registry: RunningRegistry) -> None:
    # The registry serves what its storage holds without checking: flipping a byte on
    # disk is a real way to get wrong bytes from a real registry.
    layer = os.urandom(4096)
    image = registry.push_image(_unique("corrupt"), "v1", [layer])
    for digest in (image.manifest_digest, image.layer_digests[0]):
        path = registry.blob_file(digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    with registry.client() as client:
        with pytest.raises(VerificationError, match="requested"):
            client.get_manifest(image.pinned)
        with pytest.raises(VerificationError, match="does not match its digest"):
            client.get_blob(image.ref, image.layer_digests[0])
        pieces = client.stream_blob(image.ref, image.layer_digests[0])
        with pytest.raises(VerificationError):
            list(pieces)


@pytest.mark.parametrize(
    "body, content_type, expected",
    [
        (b'{"schemaVersion":2,"mediaType":"%s"}' % OCI_INDEX.encode(), "application/json", OCI_INDEX),
        (b'{"schemaVersion":2,"manifests":[]}', "", OCI_INDEX),
        (b'{"schemaVersion":2,"config":{},"layers":[]}', "application/octet-stream", OCI_MANIFEST),
        (b'{"schemaVersion":2}', DOCKER_MANIFEST + "; charset=utf-8", DOCKER_MANIFEST),
    ],
)
def test_manifest_media_type_comes_from_header_or_body(body: bytes, content_type: str, expected: str) -> None:
    assert _manifest_media_type(body, content_type, "m") == expected


@pytest.mark.parametrize(
    "body, content_type, complaint",
    [
        (b'{"schemaVersion": 1, "name": "x", "fsLayers": []}', "application/vnd.docker.distribution.manifest.v1+prettyjws", "unsupported manifest type"),
        (b'{"schemaVersion":2,"mediaType":"%s"}' % OCI_INDEX.encode(), OCI_MANIFEST, "served as"),
        (b"[]", OCI_MANIFEST, "not a JSON object"),
        (b"\xff", OCI_MANIFEST, "not JSON"),
        (b'{"mediaType": 5}', OCI_MANIFEST, "not a string"),
    ],
)
def test_unusable_manifests_are_format_errors(body: bytes, content_type: str, complaint: str) -> None:
    with pytest.raises(FormatError, match=complaint):
        _manifest_media_type(body, content_type, "registry r: manifest m")


def test_oversized_manifest_is_refused_before_pushing(registry: RunningRegistry) -> None:
    with registry.client(max_manifest_size=1000) as client:
        with pytest.raises(FormatError, match="larger than"):
            client.put_manifest(registry.ref(_unique("big"), "v1"), b" " * 1001, OCI_MANIFEST)


# ---- ranges ----


def test_read_range_returns_exact_bytes(registry: RunningRegistry) -> None:
    repository, digest, data = _pushed_blob(registry, "ranges", 100_000)
    ref = registry.ref(repository)
    with registry.client() as client:
        for offset, length in [(0, 1), (0, 100_000), (99_999, 1), (12_345, 54_321), (5, 0)]:
            assert client.read_range(ref, digest, offset, length) == data[offset : offset + length]
        blob = client.blob(ref, digest, len(data))
        assert blob.name == f"{registry.host}/{repository}@{digest}"
        assert blob.read_range(70_000, 30_000) == data[70_000:]
        with pytest.raises(FormatError, match="outside the blob"):
            blob.read_range(99_990, 11)
        with pytest.raises(RegistryError, match="shorter"):
            client.read_range(ref, digest, 99_000, 2_000)  # past the real end: clipped 206
        with pytest.raises(RegistryError, match="range not satisfiable"):
            client.read_range(ref, digest, 200_000, 10)  # starts past the end: 416


def test_registry_blob_reads_concurrently(registry: RunningRegistry) -> None:
    repository, digest, data = _pushed_blob(registry, "threads", 1 << 20)
    results: dict[int, bytes] = {}
    with registry.client() as client:
        blob = client.blob(registry.ref(repository), digest, len(data))

        def read(number: int) -> None:
            offset = number * 65_536
            results[number] = blob.read_range(offset, 65_536)

        threads = [threading.Thread(target=read, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert b"".join(results[n] for n in range(16)) == data


def test_range_ignored_is_detected_without_downloading_the_blob(
    registry: RunningRegistry, relayed: Relayed, big_blob: tuple[str, str, bytes]
) -> None:
    repository, digest, data = big_blob
    relay, through = relayed(registry)
    relay.ignore_range = True
    with through.client() as client:
        with pytest.raises(RangeNotSupportedError) as caught:
            client.read_range(through.ref(repository), digest, 1000, 4096)
    assert "ignored the Range header" in str(caught.value) and relay.netloc in str(caught.value)
    relay.wait_for_records(2)  # the /v2/ probe, then the blob GET
    (record,) = _api_records(relay)
    assert record.status == 200 and record.range_header == "bytes=1000-5095"
    assert not record.completed and record.body_bytes_sent < len(data)


def test_whole_blob_range_answered_with_200_is_accepted(registry: RunningRegistry, relayed: Relayed) -> None:
    repository, digest, data = _pushed_blob(registry, "whole", 3000)
    relay, through = relayed(registry)
    relay.ignore_range = True
    with through.client() as client:
        assert client.read_range(through.ref(repository), digest, 0, len(data)) == data
        with pytest.raises(RangeNotSupportedError):
            client.read_range(through.ref(repository), digest, 0, len(data) - 1)


def test_clients_sharing_a_scheme_memo_probe_a_host_once(registry: RunningRegistry, relayed: Relayed) -> None:
    repository, digest, data = _pushed_blob(registry, "memo", 3000)
    relay, through = relayed(registry)
    memo = SchemeMemo()
    with RegistryClient(through.client_config, memo) as first, RegistryClient(through.client_config, memo) as second:
        assert first.read_range(through.ref(repository), digest, 0, 10) == data[:10]
        assert second.read_range(through.ref(repository), digest, 10, 10) == data[10:20]
    probes = [record for record in relay.wait_for_records(3) if record.path == "/v2/"]
    assert len(probes) == 1  # the second client took the first one's answer: http
    # A client that may not speak plain http to the host does not take that answer.
    strict = replace(through.client_config, loopback_plain_http=False)
    with RegistryClient(strict, memo) as client:
        with pytest.raises(RegistryError, match="https"):
            client.read_range(through.ref(repository), digest, 0, 10)


# ---- uploads ----


def test_chunked_upload_from_a_file_and_skip_when_present(
    registry: RunningRegistry, relayed: Relayed, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = sha256_digest(data)
    relay, through = relayed(registry)
    ref = through.ref(_unique("chunked"))
    with through.client(upload_chunk_size=64 * 1024) as client:
        client.put_blob(ref, digest, path)
        methods = [r.method for r in _api_records(relay)]
        assert methods == ["HEAD", "POST"] + ["PATCH"] * 5 + ["PUT"]
        assert client.get_blob(ref, digest) == data
        before = len(_api_records(relay))
        client.put_blob(ref, digest, path)
        assert [r.method for r in _api_records(relay)[before:]] == ["HEAD"]


def test_upload_refuses_content_that_does_not_match(registry: RunningRegistry, tmp_path: Path) -> None:
    ref = registry.ref(_unique("bad"))
    with registry.client(upload_chunk_size=1024) as client:
        with pytest.raises(VerificationError, match="does not match"):
            client.put_blob(ref, sha256_digest(b"other"), b"content")
        path = tmp_path / "blob"
        path.write_bytes(os.urandom(5000))
        with pytest.raises(VerificationError) as caught:
            client.put_blob(ref, sha256_digest(b"other"), path)
        assert str(path) in str(caught.value)
        assert client.blob_size(ref, sha256_digest(b"other")) is None


def test_unreadable_upload_source_is_named(registry: RunningRegistry, tmp_path: Path) -> None:
    with registry.client() as client:
        with pytest.raises(BlobSourceError) as caught:
            client.put_blob(registry.ref(_unique("gone")), sha256_digest(b"x"), tmp_path / "missing")
    assert str(tmp_path / "missing") in str(caught.value)


def test_cross_repository_mount(registry: RunningRegistry, relayed: Relayed) -> None:
    source, digest, data = _pushed_blob(registry, "mount-src", 10_000)
    relay, through = relayed(registry)
    target = through.ref(_unique("mount-dst"))
    with through.client() as client:
        client.put_blob(target, digest, data, mount_from=source)
        assert [(r.method, r.status) for r in _api_records(relay)] == [("HEAD", 404), ("POST", 201)]
        assert "mount=" in _api_records(relay)[1].path
        assert client.get_blob(target, digest) == data


def test_the_relay_forwards_repeated_headers(registry: RunningRegistry, relayed: Relayed) -> None:
    """podman sends one Accept header per manifest type (tests/test_podman_load.py goes
    through the relay): a relay that kept only the last one would make the registry
    refuse an OCI manifest to a client that accepts it."""
    image = registry.push_image(_unique("accept"), "v1", [b"layer"])
    relay, through = relayed(registry)
    url = f"http://{relay.netloc}/v2/{image.ref.repository}/manifests/v1"
    oci, docker = ("Accept", OCI_MANIFEST), ("Accept", DOCKER_MANIFEST)
    assert httpx.get(url, headers=[docker]).status_code == 404  # the registry's rule the test relies on
    answer = httpx.get(url, headers=[oci, docker])
    assert answer.status_code == 200 and answer.headers["content-type"] == OCI_MANIFEST


# ---- faults: 5xx, connection errors, redirects ----


def test_5xx_bursts_are_retried(registry: RunningRegistry, relayed: Relayed) -> None:
    image = registry.push_image(_unique("retry"), "v1", [b"layer"])
    relay, through = relayed(registry)
    relay.fail_next(2, 503, path_contains="/manifests/")
    with through.client(retry=RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.02)) as client:
        manifest = client.get_manifest(through.ref(image.ref.repository, "v1"))
        assert manifest.digest == image.manifest_digest
        assert [r.status for r in _api_records(relay) if "/manifests/" in r.path] == [503, 503, 200]
        relay.fail_next(10, 502, path_contains="/blobs/")
        with pytest.raises(RegistryError) as caught:
            client.read_range(through.ref(image.ref.repository), image.layer_digests[0], 0, 1)
    message = str(caught.value)
    assert relay.netloc in message and "failed after 3 attempt(s)" in message and "HTTP 502" in message
    assert "range [0, 1)" in message


def test_downloads_that_break_off_are_retried(registry: RunningRegistry, relayed: Relayed) -> None:
    repository, digest, data = _pushed_blob(registry, "cut", 200_000)
    relay, through = relayed(registry)
    ref = through.ref(repository)
    with through.client() as client:
        assert client.blob_size(ref, digest) == len(data)  # after the /v2/ probe, so cuts hit blobs
        relay.cut_next(1, after_bytes=70_000)
        assert client.get_blob(ref, digest) == data
        relay.cut_next(1, after_bytes=10)
        assert client.read_range(ref, digest, 1000, 5000) == data[1000:6000]
        relay.wait_for_records(6)  # probe, HEAD, four GETs: the relay logs after sending
        assert [(r.completed, r.body_bytes_sent) for r in _api_records(relay) if r.method == "GET"] == [
            (False, 70_000), (True, 200_000), (False, 10), (True, 5000)]
        relay.cut_next(1, after_bytes=70_000)
        with pytest.raises(RegistryError, match="broke off after"):
            list(client.stream_blob(ref, digest))


def test_uploads_failing_midway_are_restarted(registry: RunningRegistry, relayed: Relayed) -> None:
    data = os.urandom(100_000)
    digest = sha256_digest(data)
    relay, through = relayed(registry)
    ref = through.ref(_unique("restart"))
    with through.client(upload_chunk_size=40_000) as client:
        relay.fail_next(1, 500, path_contains="/blobs/uploads/", method="PATCH")
        client.put_blob(ref, digest, data)
        assert [(r.method, r.status) for r in _api_records(relay)] == [
            ("HEAD", 404), ("POST", 202), ("PATCH", 500),
            ("POST", 202), ("PATCH", 202), ("PATCH", 202), ("PATCH", 202), ("PUT", 201)]
        assert client.get_blob(ref, digest) == data
        relay.fail_next(10, 503, path_contains="/blobs/uploads/", method="POST")
        other = os.urandom(1000)
        with pytest.raises(RegistryError) as caught:
            client.put_blob(ref, sha256_digest(other), other)
    assert "upload of blob" in str(caught.value) and "failed after 3 attempt(s)" in str(caught.value)


def test_retries_stop_at_the_total_time_bound(registry: RunningRegistry, relayed: Relayed) -> None:
    relay, through = relayed(registry)
    relay.fail_next(100, 500)
    policy = RetryPolicy(attempts=50, backoff_base=0.01, backoff_max=0.01, total_max=0.0)
    with through.client(retry=policy) as client:
        with pytest.raises(RegistryError, match="failed after 1 attempt"):
            client.get_manifest(through.ref("x", "v1"))


def test_connection_refused_is_a_registry_error_naming_the_registry(registry: RunningRegistry) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with registry.client() as client:
        with pytest.raises(RegistryError) as caught:
            client.get_manifest(ImageReference(closed, "app", "v1"))
    assert closed in str(caught.value) and "failed after 3 attempt(s)" in str(caught.value)
    assert "ConnectError" in str(caught.value)


def test_redirect_to_another_host_without_our_authorization(
    token_registry: RunningRegistry, relayed: Relayed, blob_host: BlobHosts, tmp_path: Path
) -> None:
    repository, digest, data = _pushed_blob(token_registry, "redirected", 50_000)
    relay, through = relayed(token_registry)
    relay.redirect_blobs_to = blob_host(token_registry)
    assert token_registry.username and token_registry.password
    auth_file = write_auth_file(tmp_path / "auth.json", {relay.netloc: (token_registry.username, token_registry.password)})
    with through.client(credentials=CredentialStore(files=(auth_file,))) as client:
        assert client.read_range(through.ref(repository), digest, 100, 1000) == data[100:1100]
        assert client.get_blob(through.ref(repository), digest) == data
    redirects = [r for r in _api_records(relay) if r.status == 307]
    assert len(redirects) == 2  # the registry accepted our token, then the relay redirected
    seen = relay.redirect_blobs_to.headers()
    assert len(seen) == 2
    assert seen[0].get("range") == "bytes=100-1099"
    assert all("authorization" not in headers for headers in seen)


# ---- TLS + Basic ----


def test_tls_registry_with_certs_d_and_basic_auth(tls_registry: RunningRegistry) -> None:
    layer = os.urandom(20_000)
    image = tls_registry.push_image(_unique("secure"), "v1", [layer])
    with tls_registry.client() as client:
        assert client.get_manifest(image.ref).digest == image.manifest_digest
        assert client.read_range(image.ref, image.layer_digests[0], 10, 10) == layer[10:20]


def test_tls_registry_untrusted_ca_is_not_downgraded_to_http(tls_registry: RunningRegistry) -> None:
    with tls_registry.client(certs_dirs=()) as client:
        with pytest.raises(RegistryError) as caught:
            client.get_manifest(tls_registry.ref("anything", "v1"))
    assert "not trusted" in str(caught.value) and tls_registry.host in str(caught.value)


def test_tls_registry_marked_insecure_skips_verification(tls_registry: RunningRegistry) -> None:
    image = tls_registry.push_image(_unique("insecure"), "v1", [b"abc"])
    conf = RegistriesConf.parse(f'[[registry]]\nlocation = "{tls_registry.host}"\ninsecure = true\n', "test.conf")
    with tls_registry.client(certs_dirs=(), registries=conf) as client:
        assert client.get_manifest(image.ref).digest == image.manifest_digest


def test_tls_registry_without_or_with_wrong_credentials(tls_registry: RunningRegistry, tmp_path: Path) -> None:
    with tls_registry.client(credentials=CredentialStore(files=(tmp_path / "none.json",))) as client:
        with pytest.raises(AuthError, match="needs credentials"):
            client.get_manifest(tls_registry.ref("x", "v1"))
    wrong = write_auth_file(tmp_path / "auth.json", {tls_registry.host: ("crfs", "wrong")})
    with tls_registry.client(credentials=CredentialStore(files=(wrong,))) as client:
        with pytest.raises(AuthError, match="refused the credentials of user 'crfs'"):
            client.get_manifest(tls_registry.ref("x", "v1"))


def test_client_certificate_from_certs_d(tmp_path: Path) -> None:
    mtls = start_tls_registry(tmp_path / "mtls", require_client_cert=True)
    try:
        image = mtls.push_image(_unique("mtls"), "v1", [b"needs a client certificate"])
        with mtls.client() as client:
            assert client.get_manifest(image.ref).digest == image.manifest_digest
        # The same CA but no client certificate: the handshake fails, and the loopback
        # plain-http fallback must not be taken (the TLS server answers http with 400).
        ca_only = tmp_path / "ca-only" / mtls.host
        ca_only.mkdir(parents=True)
        (ca_only / "ca.crt").write_bytes((mtls.workdir / "ca.crt").read_bytes())
        with mtls.client(certs_dirs=(tmp_path / "ca-only",)) as client:
            with pytest.raises(RegistryError) as caught:
                client.get_manifest(image.ref)
        assert mtls.host in str(caught.value) and "HTTP 400" in str(caught.value)
        (ca_only / "client.cert").write_bytes((mtls.workdir / "client.cert").read_bytes())
        with mtls.client(certs_dirs=(tmp_path / "ca-only",)) as client:
            with pytest.raises(RegistryError, match="without its key"):
                client.get_manifest(image.ref)
    finally:
        mtls.stop()


# ---- token auth ----


def test_token_registry_fetches_one_token_per_scope(token_registry: RunningRegistry) -> None:
    repository, digest, data = _pushed_blob(token_registry, "tok", 10_000)
    assert token_registry.token_server is not None
    token_registry.token_server.reset()
    with token_registry.client() as client:
        for offset in range(0, 10_000, 1000):
            assert client.read_range(token_registry.ref(repository), digest, offset, 1000) == data[offset : offset + 1000]
    requests = token_registry.token_server.token_requests()
    assert [r.scopes for r in requests] == [(f"repository:{repository}:pull",)]
    assert requests[0].account == token_registry.username


def test_token_registry_anonymous_is_refused_with_a_clear_message(token_registry: RunningRegistry, tmp_path: Path) -> None:
    with token_registry.client(credentials=CredentialStore(files=(tmp_path / "none.json",))) as client:
        with pytest.raises(AuthError) as caught:
            client.get_manifest(token_registry.ref("x", "v1"))
    assert token_registry.host in str(caught.value)
    assert "refused access" in str(caught.value)


def test_token_invalidated_mid_run_is_refreshed_once(token_registry: RunningRegistry) -> None:
    repository, digest, data = _pushed_blob(token_registry, "midrun", 5000)
    assert token_registry.token_server is not None
    with token_registry.client() as client:
        blob = client.blob(token_registry.ref(repository), digest, len(data))
        assert blob.read_range(0, 100) == data[:100]
        issued = len(token_registry.token_server.token_requests())
        # Every token issued so far becomes invalid (the registry now trusts a new key).
        token_registry.rotate_token_signing_key()
        assert blob.read_range(100, 100) == data[100:200]
        assert len(token_registry.token_server.token_requests()) == issued + 1
        # Now every token the server issues is expired beyond the registry's leeway:
        # after one fresh token is refused too, the client gives up.
        token_registry.token_server.lifetime = -120
        token_registry.rotate_token_signing_key()
        with pytest.raises(AuthError, match="even with a fresh token"):
            blob.read_range(200, 100)
        assert len(token_registry.token_server.token_requests()) == issued + 2


# ---- plain http policy ----


def test_loopback_plain_http_can_be_turned_off(registry: RunningRegistry) -> None:
    with registry.client(loopback_plain_http=False) as client:
        with pytest.raises(RegistryError, match="https"):
            client.get_manifest(registry.ref("x", "v1"))
    conf = RegistriesConf.parse(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n', "t.conf")
    with registry.client(loopback_plain_http=False, registries=conf) as client:
        with pytest.raises(NotFoundError):  # reached over http: the manifest just is not there
            client.get_manifest(registry.ref(_unique("x"), "v1"))


@pytest.mark.parametrize(
    "netloc, loopback",
    [("127.0.0.1:5000", True), ("127.1.2.3", True), ("localhost:80", True), ("[::1]:5000", True),
     ("::1", True), ("10.0.0.1:5000", False), ("example.com", False), ("[::2]:1", False)],
)
def test_is_loopback(netloc: str, loopback: bool) -> None:
    assert is_loopback(netloc) is loopback


# ---- registries.conf: parsing ----


def test_registries_conf_v2_parsing_and_longest_prefix() -> None:
    conf = RegistriesConf.parse(
        """
unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "example.com"
location = "primary.example:5000"
insecure = true
[[registry.mirror]]
location = "mirror1.example/cache"
[[registry.mirror]]
location = "mirror2.example"
insecure = true
pull-from-mirror = "digest-only"

[[registry]]
prefix = "example.com/team"
location = "team.example/t"
blocked = false

[[registry]]
prefix = "*.blocked.example"
blocked = true
""",
        "main.conf",
    )
    assert conf.unqualified_search_registries == ("docker.io",)
    ref = ImageReference.parse("example.com/app:v1")
    sources = conf.pull_sources(ref)
    assert [str(s.reference) for s in sources] == ["mirror1.example/cache/app:v1", "primary.example:5000/app:v1"]
    assert [(s.insecure, s.mirror) for s in sources] == [(False, True), (True, False)]
    pinned = ImageReference.parse("example.com/app@sha256:" + "a" * 64)
    assert [s.reference.registry for s in conf.pull_sources(pinned)] == [
        "mirror1.example", "mirror2.example", "primary.example:5000"]
    team = conf.pull_sources(ImageReference.parse("example.com/team/app:v1"))
    assert [str(s.reference) for s in team] == ["team.example/t/app:v1"]
    # "example.com/teamx" does not continue the "example.com/team" prefix with / : or @
    assert conf.find(ImageReference.parse("example.com/teamx/a")).prefix == "example.com"  # type: ignore[union-attr]
    assert conf.find(ImageReference.parse("other.io/a")) is None
    assert conf.pull_sources(ImageReference.parse("other.io/a"))[0].reference.registry == "other.io"
    with pytest.raises(BlockedRegistryError, match="main.conf"):
        conf.pull_sources(ImageReference.parse("a.blocked.example/x"))
    assert conf.find(ImageReference.parse("blocked.example/x")) is None
    assert conf.push_source(ref).reference.registry == "primary.example:5000"


def test_registries_conf_mirror_modes() -> None:
    conf = RegistriesConf.parse(
        """
[[registry]]
location = "r.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.io"
[[registry]]
location = "s.io"
[[registry.mirror]]
location = "n.io"
pull-from-mirror = "tag-only"
""",
        "m.conf",
    )
    digest = "@sha256:" + "b" * 64
    assert len(conf.pull_sources(ImageReference.parse("r.io/a:t"))) == 1
    assert len(conf.pull_sources(ImageReference.parse("r.io/a" + digest))) == 2
    assert len(conf.pull_sources(ImageReference.parse("s.io/a:t"))) == 2
    assert len(conf.pull_sources(ImageReference.parse("s.io/a" + digest))) == 1


def test_registries_conf_v1_format() -> None:
    conf = RegistriesConf.parse(
        '[registries.search]\nregistries = ["quay.io"]\n[registries.insecure]\nregistries = ["old.io:5000"]\n'
        '[registries.block]\nregistries = ["bad.io"]\n',
        "v1.conf",
    )
    assert conf.unqualified_search_registries == ("quay.io",)
    assert conf.push_source(ImageReference.parse("old.io:5000/a")).insecure
    with pytest.raises(BlockedRegistryError):
        conf.pull_sources(ImageReference.parse("bad.io/a"))


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("[[registry", "not valid TOML"),
        ('[registries.insecure]\nregistries=["a"]\n[[registry]]\nlocation="b"', "mixes"),
        ("registry = 5", "array of tables"),
        ("[[registry]]\ninsecure = true", "needs a prefix or a location"),
        ('[[registry]]\nlocation = "http://a.io"', "must not contain a scheme"),
        ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"', "true or false"),
        ('[[registry]]\nprefix = "*.a.io"\nlocation = "b.io"', "cannot have a location"),
        ('[[registry]]\nprefix = "a*.io"', "only allowed"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true', "location is required"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m.io"\npull-from-mirror = "x"', "pull-from-mirror"),
        ('[[registry]]\nlocation = "a.io"\n[[registry]]\nlocation = "a.io"', "appears twice"),
        ('unqualified-search-registries = "docker.io"', "list of strings"),
    ],
)
def test_registries_conf_errors_name_the_file(text: str, complaint: str) -> None:
    with pytest.raises(RegistriesConfError) as caught:
        RegistriesConf.parse(text, "/etc/bad.conf")
    assert complaint in str(caught.value) and "/etc/bad.conf" in str(caught.value)


def test_registries_conf_files_and_drop_ins(tmp_path: Path) -> None:
    home = tmp_path / "home"
    user_dir = home / ".config/containers"
    (user_dir / "registries.conf.d").mkdir(parents=True)
    (user_dir / "registries.conf").write_text('[[registry]]\nlocation = "a.io"\n[[registry]]\nlocation = "b.io"\n')
    (user_dir / "registries.conf.d/10-b.conf").write_text('[[registry]]\nlocation = "b.io"\ninsecure = true\n')
    (user_dir / "registries.conf.d/20-c.conf").write_text('unqualified-search-registries = ["c.io"]\n')
    paths = default_conf_paths({"HOME": str(home)})
    assert paths[0] == user_dir / "registries.conf"
    assert paths[-2:] == [user_dir / "registries.conf.d/10-b.conf", user_dir / "registries.conf.d/20-c.conf"]
    conf = RegistriesConf.load([p for p in paths if p.is_relative_to(tmp_path)])
    assert conf.push_source(ImageReference.parse("b.io/x")).insecure
    assert not conf.push_source(ImageReference.parse("a.io/x")).insecure
    assert conf.unqualified_search_registries == ("c.io",)
    explicit = tmp_path / "only.conf"
    assert default_conf_paths({"HOME": str(home), "CONTAINERS_REGISTRIES_CONF": str(explicit)}) == [explicit]
    assert RegistriesConf.load([explicit]).registries == ()  # missing file: no configuration


def test_config_from_environment_uses_standard_locations(tmp_path: Path) -> None:
    conf_file = tmp_path / "registries.conf"
    conf_file.write_text('[[registry]]\nlocation = "z.io"\nblocked = true\n')
    config = RegistryConfig.from_environment(
        {"HOME": str(tmp_path), "CONTAINERS_REGISTRIES_CONF": str(conf_file), "REGISTRY_AUTH_FILE": "/x/auth.json"}
    )
    assert config.credentials.files == (Path("/x/auth.json"),)
    assert config.certs_dirs == (
        Path("/etc/containers/certs.d"), tmp_path / ".config/containers/certs.d", Path("/etc/docker/certs.d"))
    with pytest.raises(BlockedRegistryError):
        with RegistryClient(config) as client:
            client.get_manifest(ImageReference.parse("z.io/a:b"))


# ---- registries.conf: mirrors against real registries ----


def _mirror_conf(primary: RunningRegistry, mirror_location: str, mode: str = "all") -> RegistriesConf:
    return RegistriesConf.parse(
        f'[[registry]]\nprefix = "{primary.host}/lib"\nlocation = "{primary.host}/lib"\n'
        f'[[registry.mirror]]\nlocation = "{mirror_location}"\npull-from-mirror = "{mode}"\n',
        "mirrors.conf",
    )


def test_mirror_first_then_primary(registry: RunningRegistry, mirror_registry: RunningRegistry, relayed: Relayed) -> None:
    name = _unique("app")
    on_mirror = mirror_registry.push_image(f"cache/lib/{name}", "v1", [b"mirror layer"])
    on_primary = registry.push_image(f"lib/{name}", "v2", [b"primary layer"])
    relay, primary = relayed(registry)
    conf = _mirror_conf(primary, f"{mirror_registry.host}/cache/lib")
    with primary.client(registries=conf) as client:
        from_mirror = client.get_manifest(primary.ref(f"lib/{name}", "v1"))
        assert from_mirror.digest == on_mirror.manifest_digest
        assert _api_records(relay) == []  # the primary was not asked
        assert client.get_manifest(primary.ref(f"lib/{name}", "v2")).digest == on_primary.manifest_digest
        blob = client.blob(primary.ref(f"lib/{name}", "v1"), on_mirror.layer_digests[0], len(b"mirror layer"))
        assert blob.read_range(0, 6) == b"mirror"
        primary_blob = client.blob(primary.ref(f"lib/{name}", "v2"), on_primary.layer_digests[0], len(b"primary layer"))
        assert primary_blob.read_range(0, 7) == b"primary"
        assert client.blob_size(primary.ref(f"lib/{name}"), on_primary.layer_digests[0]) == len(b"primary layer")
        with pytest.raises(NotFoundError) as caught:
            client.get_manifest(primary.ref(f"lib/{name}", "v3"))
    assert "mirrors tried first" in str(caught.value) and mirror_registry.host in str(caught.value)


def test_blob_leaves_a_mirror_that_goes_away(registry: RunningRegistry, tmp_path: Path) -> None:
    mirror = start_plain_registry(tmp_path / "short-lived-mirror")
    try:
        name = _unique("app")
        data = os.urandom(5000)
        digest = mirror.push_blob(f"cache/lib/{name}", data)
        assert registry.push_blob(f"lib/{name}", data) == digest
        conf = _mirror_conf(registry, f"{mirror.host}/cache/lib")
        with registry.client(registries=conf) as client:
            blob = client.blob(registry.ref(f"lib/{name}", "v1"), digest, len(data))
            assert blob.read_range(0, 100) == data[:100]
            mirror.stop()
            assert blob.read_range(100, 100) == data[100:200]
    finally:
        mirror.stop()


def test_digest_only_mirror_is_skipped_for_tags(registry: RunningRegistry, mirror_registry: RunningRegistry) -> None:
    name = _unique("app")
    on_mirror = mirror_registry.push_image(f"cache/lib/{name}", "v1", [b"only on the mirror"])
    conf = _mirror_conf(registry, f"{mirror_registry.host}/cache/lib", "digest-only")
    with registry.client(registries=conf) as client:
        with pytest.raises(NotFoundError):
            client.get_manifest(registry.ref(f"lib/{name}", "v1"))
        pinned = registry.ref(f"lib/{name}", digest=on_mirror.manifest_digest)
        assert client.get_manifest(pinned).digest == on_mirror.manifest_digest


def test_unreachable_mirror_falls_back_to_primary(registry: RunningRegistry) -> None:
    image = registry.push_image(f"lib/{_unique('app')}", "v1", [b"layer"])
    conf = _mirror_conf(registry, f"127.0.0.1:{free_port()}/cache")
    with registry.client(registries=conf) as client:
        assert client.get_manifest(image.ref).digest == image.manifest_digest


def test_pushes_go_to_the_rewritten_primary_location(registry: RunningRegistry) -> None:
    conf = RegistriesConf.parse(
        f'[[registry]]\nprefix = "alias.example/team"\nlocation = "{registry.host}/real/team"\n', "alias.conf"
    )
    name = _unique("app")
    with registry.client(registries=conf) as client:
        digest = client.put_manifest(ImageReference.parse(f"alias.example/team/{name}:v1"), b'{"schemaVersion":2,"mediaType":"%s","manifests":[]}' % OCI_INDEX.encode(), OCI_INDEX)
    with registry.client() as client:
        assert client.get_manifest(registry.ref(f"real/team/{name}", "v1")).digest == digest
