"""Credentials files, WWW-Authenticate parsing, and the token cache against a real token server."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from crfs_worker.auth import (
    Authenticator,
    Challenge,
    CredentialsFileError,
    CredentialStore,
    TokenResponse,
    parse_challenges,
    pull_scope,
)
from crfs_worker.errors import AuthError
from tests.support.registry import RunningRegistry, write_auth_file


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---- where credentials come from ----


def test_default_files_follow_containers_image_order(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/7"}
    store = CredentialStore.from_environment(env)
    assert store.files == (
        Path("/run/user/7/containers/auth.json"),
        tmp_path / ".config/containers/auth.json",
        tmp_path / ".docker/config.json",
    )
    assert store.legacy_files == (tmp_path / ".dockercfg",)
    env.update(XDG_CONFIG_HOME="/xdg", DOCKER_CONFIG="/dockercfg")
    store = CredentialStore.from_environment(env)
    assert store.files[1:] == (Path("/xdg/containers/auth.json"), Path("/dockercfg/config.json"))


def test_registry_auth_file_replaces_the_defaults(tmp_path: Path) -> None:
    store = CredentialStore.from_environment({"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": "/a/auth.json"})
    assert store.files == (Path("/a/auth.json"),)
    assert store.legacy_files == ()


def test_lookup_reads_podman_auth_json_most_specific_key_first(tmp_path: Path) -> None:
    auth = write_auth_file(
        tmp_path / "auth.json",
        {
            "reg.example:5000": ("host-user", "p1"),
            "reg.example:5000/team": ("team-user", "p2"),
            "reg.example:5000/team/app": ("app-user", "p3"),
        },
    )
    store = CredentialStore(files=(auth,))
    found = store.lookup("reg.example:5000", "team/app").credentials
    assert found is not None and (found.username, found.password) == ("app-user", "p3")
    found = store.lookup("reg.example:5000", "team/other").credentials
    assert found is not None and found.username == "team-user"
    found = store.lookup("reg.example:5000", "elsewhere").credentials
    assert found is not None and found.username == "host-user"
    assert store.lookup("other.example", "team/app").credentials is None


def test_lookup_falls_through_files_and_normalises_docker_keys(tmp_path: Path) -> None:
    podman = write_auth_file(tmp_path / "auth.json", {"quay.io": ("q", "q")})
    docker = tmp_path / "config.json"
    docker.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _b64("hub-user:hub:pass")},
                    "http://old.example:5000/v2/": {"username": "plain", "password": "pw"},
                }
            }
        )
    )
    legacy = tmp_path / ".dockercfg"
    legacy.write_text(json.dumps({"legacy.example": {"auth": _b64("leg:acy")}}))
    store = CredentialStore(files=(tmp_path / "missing.json", podman, docker), legacy_files=(legacy,))
    hub = store.lookup("docker.io", "library/busybox")
    assert hub.credentials is not None
    assert (hub.credentials.username, hub.credentials.password) == ("hub-user", "hub:pass")
    assert hub.credentials.origin == str(docker)
    assert hub.searched == (podman, docker)
    plain = store.lookup("old.example:5000", "x").credentials
    assert plain is not None and (plain.username, plain.password) == ("plain", "pw")
    old = store.lookup("legacy.example", "x").credentials
    assert old is not None and old.username == "leg"


def test_credential_helpers_are_reported_not_run(tmp_path: Path) -> None:
    docker = tmp_path / "config.json"
    docker.write_text(json.dumps({"auths": {"ecr.example": {}}, "credHelpers": {"ecr.example": "ecr-login"}}))
    lookup = CredentialStore(files=(docker,)).lookup("ecr.example", "repo")
    assert lookup.credentials is None
    message = lookup.missing_message("ecr.example")
    assert "docker-credential-ecr-login" in message and str(docker) in message
    docker.write_text(json.dumps({"credsStore": "desktop"}))
    assert "docker-credential-desktop" in CredentialStore(files=(docker,)).lookup("x.io", "r").missing_message("x.io")


def test_missing_credentials_message_names_the_files_searched(tmp_path: Path) -> None:
    auth = write_auth_file(tmp_path / "auth.json", {"other.io": ("u", "p")})
    message = CredentialStore(files=(auth,)).lookup("reg.io", "r").missing_message("reg.io")
    assert "reg.io" in message and str(auth) in message


@pytest.mark.parametrize(
    "content, complaint",
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"auths": []}', "'auths' must be an object"),
        ('{"auths": {"reg.io": "x"}}', "must be an object"),
        ('{"auths": {"reg.io": {"auth": "!!!"}}}', "not base64"),
        ('{"auths": {"reg.io": {"auth": "%s"}}}' % _b64("no-colon"), "not base64 of user:password"),
        ('{"auths": {"reg.io": {"auth": 5}}}', "must be a string"),
    ],
)
def test_malformed_credential_files_are_named(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(content)
    with pytest.raises(CredentialsFileError) as caught:
        CredentialStore(files=(path,)).lookup("reg.io", "r")
    assert complaint in str(caught.value) and str(path) in str(caught.value)
    assert isinstance(caught.value, AuthError)


# ---- challenges ----


def test_parse_bearer_challenge_with_quoted_values() -> None:
    header = 'Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push repository:c:pull"'
    (challenge,) = parse_challenges([header])
    assert challenge.scheme == "bearer"
    assert challenge.params["realm"] == "https://auth.example/token"
    assert challenge.params["service"] == "reg.example"
    assert challenge.scopes == ("repository:a/b:pull,push", "repository:c:pull")


def test_parse_several_challenges_tokens_and_escapes() -> None:
    challenges = parse_challenges(['Basic realm="a \\"quoted\\" realm", charset=UTF-8, Bearer realm=x,error="invalid_token"'])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].params == {"realm": 'a "quoted" realm', "charset": "UTF-8"}
    assert challenges[1].params == {"realm": "x", "error": "invalid_token"}
    assert parse_challenges(["", "   "]) == []


# ---- tokens against the real token server and registry ----


class _Clock:
    """Controls the Authenticator's notion of time, so token expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _token_sender(client: httpx.Client):  # type: ignore[no-untyped-def]
    def send(request: httpx.Request) -> TokenResponse:
        response = client.send(request)
        return TokenResponse(response.status_code, response.content)

    return send


def _challenge_of(registry: RunningRegistry, repository: str) -> list[str]:
    with httpx.Client(trust_env=False) as client:
        response = client.get(f"http://{registry.host}/v2/{repository}/tags/list")
    assert response.status_code == 401
    return response.headers.get_list("WWW-Authenticate")


def test_tokens_are_cached_per_scope_until_they_expire(token_registry: RunningRegistry) -> None:
    assert token_registry.token_server is not None
    token_registry.token_server.lifetime = 120
    clock = _Clock()
    with httpx.Client(trust_env=False) as http:
        auth = Authenticator(token_registry.client_config.credentials, _token_sender(http), clock)
        scopes = (pull_scope("cache/me"),)
        header = auth.after_unauthorized(token_registry.host, "cache/me", scopes, _challenge_of(token_registry, "cache/me"), None)
        assert header.startswith("Bearer ")
        assert auth.authorization(token_registry.host, "cache/me", scopes) == header
        clock.now += 100  # inside expires_in minus the renewal margin
        assert auth.authorization(token_registry.host, "cache/me", scopes) == header
        clock.now += 15  # past expires_in - 10 s: renewed before use
        renewed = auth.authorization(token_registry.host, "cache/me", scopes)
        assert renewed is not None and renewed != header
        other = auth.authorization(token_registry.host, "cache/other", (pull_scope("cache/other"),))
        assert other is not None and other not in (header, renewed)
        # the registry accepts what was issued
        response = http.get(f"http://{token_registry.host}/v2/cache/me/tags/list", headers={"Authorization": renewed})
        assert response.status_code in (200, 404)  # 404: repository unknown, but authorized
    requests = token_registry.token_server.token_requests()
    assert [r.scopes for r in requests] == [scopes, scopes, (pull_scope("cache/other"),)]
    assert all(r.account == token_registry.username for r in requests)
    assert all(r.service == token_registry.token_server.service for r in requests)


def test_token_server_refusing_credentials_is_an_auth_error(token_registry: RunningRegistry, tmp_path: Path) -> None:
    auth_file = write_auth_file(tmp_path / "auth.json", {token_registry.host: ("crfs", "wrong")})
    with httpx.Client(trust_env=False) as http:
        auth = Authenticator(CredentialStore(files=(auth_file,)), _token_sender(http))
        with pytest.raises(AuthError) as caught:
            auth.after_unauthorized(
                token_registry.host, "x", (pull_scope("x"),), _challenge_of(token_registry, "x"), None
            )
    assert "refused the credentials of user 'crfs'" in str(caught.value)
    assert str(auth_file) in str(caught.value)


def test_bad_realms_and_unknown_schemes_are_auth_errors() -> None:
    auth = Authenticator(CredentialStore(), lambda request: TokenResponse(500, b""))
    with pytest.raises(AuthError, match="unusable token realm"):
        auth.after_unauthorized("r.io", "x", ("s",), ['Bearer realm="ftp://x/token"'], None)
    with pytest.raises(AuthError, match="unsupported authentication 'negotiate'"):
        auth.after_unauthorized("r.io", "x", ("s",), ["Negotiate abc"], None)
    with pytest.raises(AuthError, match="without a WWW-Authenticate"):
        auth.after_unauthorized("r.io", "x", ("s",), [], None)
    with pytest.raises(AuthError, match="needs credentials"):
        auth.after_unauthorized("r.io", "x", ("s",), ['Basic realm="r"'], None)


@pytest.mark.parametrize(
    "status, body, complaint",
    [
        (500, b"", "answered HTTP 500"),
        (200, b"[1]", "not a JSON object"),
        (200, b"not json", "not a JSON object"),
        (200, b'{"expires_in": 30}', "without a token"),
        (200, b'{"token": "a\\r\\nb"}', "without a token"),
    ],
)
def test_unusable_token_answers_are_registry_errors(status: int, body: bytes, complaint: str) -> None:
    # A token server that answers garbage on demand does not exist; these canned
    # answers stand in for one (the sanctioned kind of fake: a fault).
    auth = Authenticator(CredentialStore(), lambda request: TokenResponse(status, body))
    with pytest.raises(Exception) as caught:
        auth.after_unauthorized("r.io", "x", ("s",), ['Bearer realm="http://t.io/token"'], None)
    assert complaint in str(caught.value)
    assert "r.io" in str(caught.value)


def test_challenge_dataclass_scopes_empty_without_scope() -> None:
    assert Challenge("bearer", {"realm": "x"}).scopes == ()
