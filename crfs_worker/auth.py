"""Authenticating to registries: stored credentials, Basic auth and Bearer tokens.

Credentials come from the files containers/image reads, in its order
(`CredentialStore.from_environment`): `$REGISTRY_AUTH_FILE` alone when set, else
`$XDG_RUNTIME_DIR/containers/auth.json`, `$XDG_CONFIG_HOME/containers/auth.json`
(`~/.config/...`), `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, and the legacy
`~/.dockercfg`. Keys may name a registry or a namespace in it (`host/ns/repo` beats
`host/ns` beats `host`); docker's `https://index.docker.io/v1/` style keys are normalised.
Credential helpers (`credHelpers`, `credsStore`) are not run: crfs says so when a
registry then asks for credentials it does not have.

The token flow is the distribution one: a 401 carries `WWW-Authenticate: Bearer
realm=..,service=..,scope=..`; the token comes from GET realm?service=..&scope=.., sent
with Basic credentials when we have them, anonymously otherwise. Tokens are cached per
(registry, scopes) until shortly before `expires_in`.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from .errors import AuthError, RegistryError

MAX_TOKEN_RESPONSE = 1 << 20
DEFAULT_TOKEN_LIFETIME = 60  # seconds, what the token spec says when expires_in is absent
_DOCKER_HUB_KEYS = ("index.docker.io", "registry-1.docker.io")

Scopes = tuple[str, ...]


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    origin: str  # the file they came from, for messages

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class CredentialLookup:
    """What the credential files say about one repository."""

    credentials: Credentials | None
    helpers: tuple[str, ...]  # "docker-credential-X (from FILE)", configured but not run
    searched: tuple[Path, ...]

    def missing_message(self, registry: str) -> str:
        if self.helpers:
            return (
                f"registry {registry} needs credentials, which are configured through the "
                f"credential helper {self.helpers[0]}; crfs does not run credential helpers: "
                "log in with `podman login` so they are stored in an auth.json"
            )
        files = ", ".join(str(p) for p in self.searched) or "no credential files"
        return f"registry {registry} needs credentials and none were found (searched {files})"


class CredentialsFileError(AuthError):
    """An auth.json / docker config.json is malformed."""


@dataclass(frozen=True)
class CredentialStore:
    """The credential files to consult, most important first."""

    files: tuple[Path, ...] = ()
    legacy_files: tuple[Path, ...] = ()  # ~/.dockercfg: the auths map at the top level

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, home: Path | None = None
    ) -> "CredentialStore":
        env = os.environ if env is None else env
        home = Path(env.get("HOME", "~")).expanduser() if home is None else home
        explicit = env.get("REGISTRY_AUTH_FILE")
        if explicit:
            return cls(files=(Path(explicit),))
        files: list[Path] = []
        if env.get("XDG_RUNTIME_DIR"):
            files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
        config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
        files.append(config_home / "containers" / "auth.json")
        docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
        files.append(docker_dir / "config.json")
        return cls(files=tuple(files), legacy_files=(home / ".dockercfg",))

    def lookup(self, registry: str, repository: str) -> CredentialLookup:
        """Credentials for `registry/repository`; files are read now (a new login counts)."""
        helpers: list[str] = []
        searched: list[Path] = []
        candidates = _candidate_keys(registry, repository)
        for path, legacy in [(p, False) for p in self.files] + [(p, True) for p in self.legacy_files]:
            document = _read_auth_file(path)
            if document is None:
                continue
            searched.append(path)
            found = _find_in_document(document, path, legacy, registry, candidates, helpers)
            if found is not None:
                return CredentialLookup(found, tuple(helpers), tuple(searched))
        return CredentialLookup(None, tuple(helpers), tuple(searched))


def _candidate_keys(registry: str, repository: str) -> list[str]:
    parts = repository.split("/")
    keys = [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    return keys + [registry]


def _normalise_key(key: str) -> str:
    # docker writes "https://index.docker.io/v1/"; such URL keys only ever name a host.
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    host, slash, rest = key.rstrip("/").partition("/")
    if host in _DOCKER_HUB_KEYS:
        host = "docker.io"
    return host + slash + rest


def _read_auth_file(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsFileError(f"{path}: cannot read credentials: {exc}") from None
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CredentialsFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CredentialsFileError(f"{path}: expected a JSON object")
    return document


def _find_in_document(
    document: dict[str, Any],
    path: Path,
    legacy: bool,
    registry: str,
    candidates: list[str],
    helpers: list[str],
) -> Credentials | None:
    auths = document if legacy else document.get("auths", {})
    if not isinstance(auths, dict):
        raise CredentialsFileError(f"{path}: 'auths' must be an object")
    normalised = {_normalise_key(key): (key, value) for key, value in auths.items()}
    for candidate in candidates:
        if candidate in normalised:
            key, entry = normalised[candidate]
            credentials = _decode_entry(entry, path, key)
            if credentials is not None:
                return credentials
    if not legacy:
        _note_helpers(document, path, registry, helpers)
    return None


def _note_helpers(document: dict[str, Any], path: Path, registry: str, helpers: list[str]) -> None:
    per_registry = document.get("credHelpers", {})
    if isinstance(per_registry, dict):
        for key, helper in per_registry.items():
            if _normalise_key(key) == registry and isinstance(helper, str):
                helpers.append(f"docker-credential-{helper} (from {path})")
    store = document.get("credsStore")
    if isinstance(store, str) and store:
        helpers.append(f"docker-credential-{store} (credsStore in {path})")


def _decode_entry(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise CredentialsFileError(f"{path}: the entry for {key!r} must be an object")
    encoded = entry.get("auth", "")
    if not isinstance(encoded, str):
        raise CredentialsFileError(f"{path}: the 'auth' of {key!r} must be a string")
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsFileError(f"{path}: the 'auth' of {key!r} is not base64 of user:password") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise CredentialsFileError(f"{path}: the 'auth' of {key!r} is not base64 of user:password")
        return Credentials(username, password, str(path))
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return Credentials(username, password, str(path))
    return None


@dataclass(frozen=True)
class Challenge:
    """One WWW-Authenticate challenge: `scheme` lowercased, parameter names lowercased."""

    scheme: str
    params: Mapping[str, str]

    @property
    def scopes(self) -> Scopes:
        return tuple(self.params.get("scope", "").split())


_CHALLENGE_TOKEN = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*")
_PARAM = re.compile(
    r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^\s,]*))\s*,?"
)


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Parses WWW-Authenticate header values (RFC 7235) into challenges, in order."""
    challenges: list[Challenge] = []
    for value in values:
        position = 0
        while position < len(value):
            scheme_match = _CHALLENGE_TOKEN.match(value, position)
            if scheme_match is None:
                break
            position = scheme_match.end()
            params: dict[str, str] = {}
            while True:
                param = _PARAM.match(value, position)
                if param is None:
                    break
                quoted, bare = param.group(2), param.group(3)
                params[param.group(1).lower()] = (
                    re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
                )
                position = param.end()
            challenges.append(Challenge(scheme_match.group(1).lower(), params))
            position = _skip_commas(value, position)
    return challenges


def _skip_commas(value: str, position: int) -> int:
    while position < len(value) and value[position] in ", \t":
        position += 1
    return position


@dataclass(frozen=True)
class _Token:
    header: str
    valid_until: float


@dataclass(frozen=True)
class TokenResponse:
    """A fully read answer of a token server."""

    status_code: int
    body: bytes


TokenSender = Callable[[httpx.Request], TokenResponse]


@dataclass
class Authenticator:
    """Decides the Authorization header for each registry request.

    `send` performs a token request (with the client's retries and TLS settings) and
    returns the whole, size-limited answer. Thread-safe: one lock guards the caches,
    and token fetches happen under it so concurrent readers do not stampede the token
    server.
    """

    credentials: CredentialStore
    send: TokenSender
    clock: Callable[[], float] = time.monotonic
    _challenges: dict[str, Challenge] = field(default_factory=dict, init=False)
    _tokens: dict[tuple[str, Scopes], _Token] = field(default_factory=dict, init=False)
    _basic: dict[tuple[str, str], str] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def authorization(self, registry: str, repository: str, scopes: Scopes) -> str | None:
        """The header to send before any 401, from what this registry asked for earlier."""
        with self._lock:
            challenge = self._challenges.get(registry)
            if challenge is None:
                return None
            if challenge.scheme == "basic":
                # Cached: the credential files are read again only after a 401.
                if (registry, repository) not in self._basic:
                    found = self.credentials.lookup(registry, repository).credentials
                    if found is None:
                        return None
                    self._basic[(registry, repository)] = found.basic_header()
                return self._basic[(registry, repository)]
            token = self._tokens.get((registry, scopes))
            if token is not None and token.valid_until > self.clock():
                return token.header
            return self._new_token(registry, repository, challenge, scopes)

    def after_unauthorized(
        self,
        registry: str,
        repository: str,
        scopes: Scopes,
        challenge_headers: list[str],
        sent: str | None,
    ) -> str:
        """The header to retry with after a 401, or AuthError if retrying cannot help."""
        challenge = _pick_challenge(registry, challenge_headers)
        with self._lock:
            self._challenges[registry] = challenge
            self._tokens.pop((registry, scopes), None)
            if challenge.scheme == "basic":
                header = self._basic_header(registry, repository, sent)
                self._basic[(registry, repository)] = header
                return header
            wanted = scopes + tuple(s for s in challenge.scopes if s not in scopes)
            return self._new_token(registry, repository, challenge, scopes, wanted)

    def refusal(self, registry: str, repository: str, scopes: Scopes, sent: str, detail: str) -> AuthError:
        """The error for a registry that refused the header `after_unauthorized` gave."""
        if sent.lower().startswith("basic "):
            credentials = self.credentials.lookup(registry, repository).credentials
            who = f"user {credentials.username!r} from {credentials.origin}" if credentials else "user"
            return AuthError(f"registry {registry} refused the credentials of {who}: {detail}")
        return AuthError(
            f"registry {registry} refused access to {repository} ({' '.join(scopes)}) "
            f"even with a fresh token: {detail}"
        )

    def _basic_header(self, registry: str, repository: str, sent: str | None) -> str:
        lookup = self.credentials.lookup(registry, repository)
        if lookup.credentials is None:
            raise AuthError(lookup.missing_message(registry))
        header = lookup.credentials.basic_header()
        if header == sent:
            raise AuthError(
                f"registry {registry} refused the credentials of user "
                f"{lookup.credentials.username!r} from {lookup.credentials.origin}"
            )
        return header

    def _new_token(
        self,
        registry: str,
        repository: str,
        challenge: Challenge,
        scopes: Scopes,
        wanted: Scopes | None = None,
    ) -> str:
        lookup = self.credentials.lookup(registry, repository)
        request = _token_request(registry, challenge, wanted or scopes, lookup.credentials)
        answer = self.send(request)
        header, lifetime = _parse_token_answer(registry, request, answer, lookup)
        # Renew a little early so a token does not expire between check and use.
        margin = min(10.0, lifetime / 2)
        self._tokens[(registry, scopes)] = _Token(header, self.clock() + lifetime - margin)
        return header


def _pick_challenge(registry: str, headers: list[str]) -> Challenge:
    challenges = parse_challenges(headers)
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    if not challenges:
        raise AuthError(f"registry {registry} answered 401 without a WWW-Authenticate challenge")
    raise AuthError(
        f"registry {registry} asks for unsupported authentication {challenges[0].scheme!r}"
    )


def _token_request(
    registry: str, challenge: Challenge, scopes: Scopes, credentials: Credentials | None
) -> httpx.Request:
    realm = challenge.params.get("realm", "")
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise AuthError(f"registry {registry} names an unusable token realm {realm!r}")
    params: list[tuple[str, str]] = []
    if challenge.params.get("service"):
        params.append(("service", challenge.params["service"]))
    params.extend(("scope", scope) for scope in scopes)
    headers = {"Authorization": credentials.basic_header()} if credentials else {}
    return httpx.Request("GET", url, params=params, headers=headers)


def _parse_token_answer(
    registry: str, request: httpx.Request, answer: TokenResponse, lookup: CredentialLookup
) -> tuple[str, float]:
    realm = str(request.url.copy_with(query=None))
    if answer.status_code in (401, 403):
        if lookup.credentials is None:
            raise AuthError(f"{lookup.missing_message(registry)} (token server {realm} refused an anonymous token)")
        raise AuthError(
            f"token server {realm} for registry {registry} refused the credentials of user "
            f"{lookup.credentials.username!r} from {lookup.credentials.origin}"
        )
    if answer.status_code != 200:
        raise RegistryError(f"token server {realm} for registry {registry} answered HTTP {answer.status_code}")
    try:
        document = json.loads(answer.body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise RegistryError(f"token server {realm} for registry {registry} answered something that is not a JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise RegistryError(f"token server {realm} for registry {registry} answered without a token")
    lifetime = document.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return f"Bearer {token}", float(lifetime)
