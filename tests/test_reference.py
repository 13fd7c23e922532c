"""ImageReference parsing and printing (distribution/reference grammar, docker normalisation)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crfs_worker.errors import InvalidReferenceError
from crfs_worker.reference import ImageReference

D256 = "sha256:" + "ab" * 32
D512 = "sha512:" + "cd" * 64


@pytest.mark.parametrize(
    "text, registry, repository, tag, digest, canonical",
    [
        ("busybox", "docker.io", "library/busybox", None, None, "docker.io/library/busybox"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "docker.io/library/busybox:1.36"),
        ("user/app", "docker.io", "user/app", None, None, "docker.io/user/app"),
        ("docker.io/busybox", "docker.io", "library/busybox", None, None, "docker.io/library/busybox"),
        ("index.docker.io/library/x:y", "docker.io", "library/x", "y", None, "docker.io/library/x:y"),
        ("127.0.0.1:5000/app:esgz", "127.0.0.1:5000", "app", "esgz", None, "127.0.0.1:5000/app:esgz"),
        ("localhost/a/b/c", "localhost", "a/b/c", None, None, "localhost/a/b/c"),
        ("localhost:5000/a", "localhost:5000", "a", None, None, "localhost:5000/a"),
        ("quay.io/org/img@" + D256, "quay.io", "org/img", None, D256, "quay.io/org/img@" + D256),
        ("r.example/a:t@" + D512, "r.example", "a", "t", D512, "r.example/a:t@" + D512),
        ("[::1]:5000/x", "[::1]:5000", "x", None, None, "[::1]:5000/x"),
        ("Example.COM/a.b_c__d-e--f", "Example.COM", "a.b_c__d-e--f", None, None, "Example.COM/a.b_c__d-e--f"),
        ("localhost:5000", "docker.io", "library/localhost", "5000", None, "docker.io/library/localhost:5000"),
    ],
)
def test_parse_normalises_like_docker(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, canonical: str
) -> None:
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert str(ref) == canonical
    assert ImageReference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("", "empty"),
        (" busybox", "padded"),
        ("Busybox", "lowercase"),
        ("host.io/App", "lowercase"),
        ("host.io/a//b", "component"),
        ("host.io/a/", "component"),
        ("host.io/-a", "component"),
        ("busybox:", "tag"),
        ("busybox:-x", "tag"),
        ("busybox:" + "x" * 129, "tag"),
        ("busybox@sha256:abc", "not a digest"),
        ("busybox@md5:" + "ab" * 16, "not a digest"),
        ("busybox@sha256:" + "AB" * 32, "not a digest"),
        ("ho_st.io/a", "registry"),
        ("host.io:port/a", "registry"),
        ("host.io/" + "a" * 260, "longer than"),
    ],
)
def test_parse_rejects_bad_references_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        ImageReference.parse(text)
    assert complaint in str(caught.value)


def test_with_tag_and_with_digest() -> None:
    ref = ImageReference.parse("127.0.0.1:5000/app")
    assert str(ref.with_tag("v2")) == "127.0.0.1:5000/app:v2"
    assert str(ref.with_tag("v2").with_digest(D256)) == f"127.0.0.1:5000/app:v2@{D256}"
    with pytest.raises(InvalidReferenceError):
        ref.with_tag("bad tag")
    with pytest.raises(InvalidReferenceError):
        ref.with_digest("sha256:short")


def test_manifest_key_prefers_digest_then_tag_then_latest() -> None:
    assert ImageReference.parse("a.io/x").manifest_key == "latest"
    assert ImageReference.parse("a.io/x:v1").manifest_key == "v1"
    assert ImageReference.parse(f"a.io/x:v1@{D256}").manifest_key == D256


def test_with_name_moves_tag_and_digest_to_another_repository() -> None:
    ref = ImageReference.parse(f"a.io/x:v1@{D256}")
    moved = ref.with_name("docker.io", "busybox")
    assert str(moved) == f"docker.io/library/busybox:v1@{D256}"


_component = st.from_regex(r"[a-z0-9]{1,5}([._-][a-z0-9]{1,5}){0,2}", fullmatch=True)
_host = st.from_regex(r"[a-z][a-z0-9]{0,8}\.[a-z]{2,4}(:[0-9]{1,5})?", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(
    host=_host,
    path=st.lists(_component, min_size=1, max_size=4),
    tag=st.none() | _tag,
    digest=st.none() | st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True),
)
def test_round_trip_of_fully_qualified_references(
    host: str, path: list[str], tag: str | None, digest: str | None
) -> None:
    text = f"{host}/{'/'.join(path)}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = ImageReference.parse(text)
    assert str(ref) == text
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (host, "/".join(path), tag, digest)
