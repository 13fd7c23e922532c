"""Shared pytest fixtures. Each block says who registers it; add yours in your own block."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

from tests.support.registry import (
    BlobHost,
    FaultRelay,
    RunningRegistry,
    start_plain_registry,
    start_tls_registry,
    start_token_registry,
)

if TYPE_CHECKING:
    from tests.support.plugin_env import PluginSession
    from tests.support.podman import PodmanUser

# ---- registries (tests/support/registry.py) ----


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A real docker-registry on plain HTTP, anonymous, shared by the whole session.
    `registry.client()` gives a RegistryClient; `registry.push_image(...)` pushes."""
    running = start_plain_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """HTTPS (private CA passed through a certs.d dir) with htpasswd Basic auth; the
    client config carries the CA and an auth.json with the credentials."""
    running = start_tls_registry(tmp_path_factory.mktemp("tls-registry"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def _token_registry_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    running = start_token_registry(tmp_path_factory.mktemp("token-registry"))
    yield running
    running.stop()


@pytest.fixture
def token_registry(_token_registry_process: RunningRegistry) -> RunningRegistry:
    """Token (JWT) auth through a TokenServer thread; its hooks are reset for each test."""
    assert _token_registry_process.token_server is not None
    _token_registry_process.token_server.reset()
    return _token_registry_process


@pytest.fixture
def fault_relay() -> Iterator[Callable[[RunningRegistry], FaultRelay]]:
    """Makes a FaultRelay in front of a plain-HTTP registry (stopped after the test)."""
    started: list[FaultRelay] = []

    def make(upstream: RunningRegistry) -> FaultRelay:
        relay = FaultRelay(upstream.host).start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()


@pytest.fixture
def blob_host() -> Iterator[Callable[[RunningRegistry], BlobHost]]:
    """Makes a BlobHost (a redirect target serving a registry's blob files)."""
    started: list[BlobHost] = []

    def make(registry: RunningRegistry) -> BlobHost:
        host = BlobHost(registry).start()
        started.append(host)
        return host

    yield make
    for host in started:
        host.stop()


# ---- crfs.so and the worker (tests/support/plugin_env.py) ----


@pytest.fixture(scope="session")
def plugin_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator["PluginSession"]:
    """crfs.so built, a three-layer eStargz image registered under `session.key`, and a
    private runtime/cache dir; the worker the plugin starts is stopped at the end."""
    from tests.support.plugin_env import start_plugin_session  # imported here: it builds with the writer

    session = start_plugin_session(tmp_path_factory.mktemp("plugin-image"))
    yield session
    session.stop_worker()
    session.cleanup()


@pytest.fixture
def plugin_env(plugin_session: "PluginSession", monkeypatch: pytest.MonkeyPatch) -> "PluginSession":
    """`plugin_session` with its CRFS_* variables set in this process for the test."""
    for name, value in plugin_session.env.items():
        monkeypatch.setenv(name, value)
    return plugin_session


# ---- rootless podman (tests/support/podman.py) ----


@pytest.fixture(scope="module")
def user(request: pytest.FixtureRequest) -> Iterator["PodmanUser"]:
    """The module's own podman user (its USER): each module's worker is its own to stop or kill."""
    from tests.support.podman import podman_user

    with podman_user(request.module.USER) as created:
        yield created


@pytest.fixture(scope="module")
def work(user: "PodmanUser", request: pytest.FixtureRequest) -> Iterator[Path]:
    """A private directory in the user's home, named after the module's WORK_LABEL."""
    from tests.support.podman import work_dir

    with work_dir(user, request.module.WORK_LABEL) as path:
        yield path


# ---- the fuse-overlayfs build a crfs.so test mounts with (tests/support/newer_fuse_overlayfs.py) ----


@pytest.fixture
def fuse_overlayfs(request: pytest.FixtureRequest) -> Path:
    """The suite's fuse-overlayfs; a test runs on each build with
    `@pytest.mark.parametrize("fuse_overlayfs", ["1.10", "1.14"], indirect=True)`."""
    from tests.support.newer_fuse_overlayfs import fuse_overlayfs_build, suite_fuse_overlayfs

    name = getattr(request, "param", None)
    return suite_fuse_overlayfs() if name is None else fuse_overlayfs_build(name)
