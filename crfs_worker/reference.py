"""Image references: `[HOST[:PORT]/]REPO[:TAG][@DIGEST]`, parsed and normalised.

The grammar is the one of distribution/reference (what docker and containers/image
accept), with one restriction: digests must be `sha256:` (64 hex) or `sha512:`
(128 hex), the algorithms registries actually serve and crfs can verify.

Normalisation follows docker: a first component without `.` or `:`, other than
`localhost` and all lowercase, is a Docker Hub repository (`busybox` ->
`docker.io/library/busybox`), and `index.docker.io` is spelled `docker.io`. Short-name
resolution through registries.conf `unqualified-search-registries` is deliberately not
done here: a reference means one image, whatever the local configuration.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_MAX_NAME_LENGTH = 255

_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def is_valid_digest(text: str) -> bool:
    """True for the digests crfs accepts: lowercase `sha256:`/`sha512:` hex."""
    return _DIGEST_RE.fullmatch(text) is not None


def check_digest(text: str, what: str) -> str:
    """Returns `text` if it is an acceptable digest, else InvalidReferenceError naming `what`."""
    if not is_valid_digest(text):
        raise InvalidReferenceError(
            f"{what}: {text!r} is not a digest (expected sha256:<64 hex> or sha512:<128 hex>)"
        )
    return text


@dataclass(frozen=True)
class ImageReference:
    """One image in one registry repository, by tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ImageReference":
        """Parses and normalises `text`; InvalidReferenceError says what is wrong."""
        if not text or text != text.strip():
            raise InvalidReferenceError(f"invalid image reference {text!r}: empty or padded")
        remainder, digest = _split_digest(text)
        name, tag = _split_tag(text, remainder)
        registry, repository = _split_registry(text, name)
        _check_repository(text, repository)
        if len(registry) + 1 + len(repository) > _MAX_NAME_LENGTH:
            raise InvalidReferenceError(
                f"invalid image reference {text!r}: name longer than {_MAX_NAME_LENGTH} characters"
            )
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """`registry/repository`, the fully qualified name without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_key(self) -> str:
        """What to ask the registry for: the digest if known (it pins the image), else
        the tag, else `latest` (as docker and podman do for a bare name)."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> "ImageReference":
        if _TAG_RE.fullmatch(tag) is None:
            raise InvalidReferenceError(f"{self.name}: invalid tag {tag!r}")
        return replace(self, tag=tag)

    def with_digest(self, digest: str) -> "ImageReference":
        return replace(self, digest=check_digest(digest, self.name))

    def with_name(self, registry: str, repository: str) -> "ImageReference":
        """The same tag/digest in another repository (mirrors, cross-repo pushes)."""
        return ImageReference.parse(str(replace(self, registry=registry, repository=repository)))

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _split_digest(text: str) -> tuple[str, str | None]:
    remainder, sep, digest = text.partition("@")
    if not sep:
        return text, None
    return remainder, check_digest(digest, f"invalid image reference {text!r}")


def _split_tag(text: str, remainder: str) -> tuple[str, str | None]:
    # A ':' after the last '/' starts the tag; one before it belongs to HOST:PORT.
    colon = remainder.rfind(":")
    if colon <= remainder.rfind("/"):
        return remainder, None
    tag = remainder[colon + 1 :]
    if _TAG_RE.fullmatch(tag) is None:
        raise InvalidReferenceError(f"invalid image reference {text!r}: bad tag {tag!r}")
    return remainder[:colon], tag


def _split_registry(text: str, name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    looks_like_host = (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not slash or not looks_like_host:
        registry, repository = DOCKER_HUB, name
    else:
        if _DOMAIN_RE.fullmatch(first) is None:
            raise InvalidReferenceError(f"invalid image reference {text!r}: bad registry {first!r}")
        registry, repository = first, rest
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    return registry, repository


def _check_repository(text: str, repository: str) -> None:
    for component in repository.split("/"):
        if _PATH_COMPONENT_RE.fullmatch(component) is None:
            detail = (
                "repository names must be lowercase"
                if component.lower() != component
                else f"bad repository component {component!r}"
            )
            raise InvalidReferenceError(f"invalid image reference {text!r}: {detail}")
