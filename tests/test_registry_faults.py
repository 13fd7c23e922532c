"""Registry faults under `Layer.read`: a real docker-registry serves the layer blob; the
faults a real registry cannot produce on demand (bursts of 5xx, reset connections,
truncated, slow or corrupted bodies, Range ignored) come from the FaultRelay in front of
it (tests/support/registry.py), the sanctioned stand-in for those. A token invalidated
mid-run, a registry process stopped (or frozen with SIGSTOP) mid-run and started again
are the real thing.

Every read either returns exactly the layer's bytes (the fault was retried away) or
raises a clear error naming the registry; never wrong bytes, never a hang.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from crfs_worker.errors import (
    FormatError,
    RangeNotSupportedError,
    RegistryError,
    VerificationError,
)
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.registry import RegistryClient, RetryPolicy, Timeouts
from tests import blobgen
from tests.blobgen import dir_, reg
from tests.support.registry import FaultRelay, RunningRegistry, start_plain_registry

Relays = Callable[[RunningRegistry], FaultRelay]

RETRY = RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.05, total_max=5.0)
TIMEOUTS = Timeouts(connect=2.0, read=2.0, write=5.0, pool=5.0, range_body=10.0)
# A hang would take the relay's whole slow body (tens of seconds per attempt) or forever;
# the bounds below are many times what a bounded failure takes, so only a hang trips them.
HANG = 20.0


def _files() -> list:
    rng = random.Random(3)
    return [dir_("etc"), reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            reg("big", rng.randbytes(300_000)), reg("mid", rng.randbytes(50_000)),
            reg("small1", b"one" * 100), reg("small2", b"two" * 200), reg("small3", b"three" * 300)]


@dataclass(frozen=True)
class PushedLayer:
    repository: str
    digest: str
    blob: blobgen.Blob


def _push(registry: RunningRegistry, fmt: str) -> PushedLayer:
    kw = {"chunk_size": 64 << 10} if fmt == "estargz" else {"chunk_size": 32 << 10}
    blob = blobgen.BUILDERS[fmt](_files(), **kw)
    repository = f"faults-{fmt.replace(':', '-')}-{os.urandom(3).hex()}"
    return PushedLayer(repository, registry.push_blob(repository, blob.data), blob)


@pytest.fixture(scope="module", params=["estargz", "zstd:chunked"])
def pushed(request: pytest.FixtureRequest, registry: RunningRegistry) -> PushedLayer:
    return _push(registry, request.param)


def _relayed(registry: RunningRegistry, relay: FaultRelay) -> RunningRegistry:
    """The same registry reached through `relay` (its host is the relay's)."""
    process = replace(registry.process)
    process.port = int(relay.netloc.rsplit(":", 1)[1])
    return replace(registry, process=process)


@pytest.fixture
def through(registry: RunningRegistry, fault_relay: Relays) -> tuple[FaultRelay, RunningRegistry]:
    relay = fault_relay(registry)
    return relay, _relayed(registry, relay)


def _client(target: RunningRegistry, **timeouts: float) -> RegistryClient:
    return target.client(retry=RETRY, timeouts=replace(TIMEOUTS, **timeouts))


def _open(client: RegistryClient, target: RunningRegistry, layer: PushedLayer, index_dir: Path) -> Layer:
    blob = client.blob(target.ref(layer.repository), layer.digest, len(layer.blob.data))
    return Layer.open(LayerSource(blob, layer.blob.toc_digest, layer.blob.annotations), index_dir)


def _whole(layer: Layer, pushed: PushedLayer, path: str) -> bytes:
    return layer.read(path, 0, len(pushed.blob.files[path]) + 1)


def _no_index(index_dir: Path) -> bool:
    return not index_dir.exists() or not list(index_dir.iterdir())


def _blob_gets(relay: FaultRelay) -> list[tuple[int, bool]]:
    return [(r.status, r.completed) for r in relay.records() if "/blobs/" in r.path and r.method == "GET"]


def _fails_clearly(layer: Layer, path: str, target: RunningRegistry, *words: str) -> RegistryError:
    with pytest.raises(RegistryError) as caught:
        layer.read(path, 0, 1 << 20)
    message = str(caught.value)
    assert message.startswith(f"{path}: registry {target.host}: "), message
    assert all(w in message for w in words), message
    assert "Traceback" not in message
    return caught.value


# ------------------------------------------------------------------ faults from the relay


def test_bursts_of_5xx_are_retried(through: tuple[FaultRelay, RunningRegistry], pushed: PushedLayer,
                                   tmp_path: Path) -> None:
    relay, target = through
    with _client(target) as client:
        relay.fail_next(2, 503, path_contains="/blobs/")  # the footer read, at open
        layer = _open(client, target, pushed, tmp_path)
        assert _blob_gets(relay)[:3] == [(503, True), (503, True), (206, True)]
        relay.fail_next(2, 500, path_contains="/blobs/")
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]
        relay.fail_next(10, 502, path_contains="/blobs/")
        _fails_clearly(layer, "mid", target, "failed after 3 attempt(s)", "HTTP 502")
        relay.fail_next(0)
        assert _whole(layer, pushed, "mid") == pushed.blob.files["mid"]  # the same Layer recovers


def test_reset_connections_are_retried(through: tuple[FaultRelay, RunningRegistry], pushed: PushedLayer,
                                       tmp_path: Path) -> None:
    relay, target = through
    with _client(target) as client:
        relay.reset_next(2)
        layer = _open(client, target, pushed, tmp_path)
        relay.reset_next(2)
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]
        relay.reset_next(10)
        _fails_clearly(layer, "mid", target, "failed after 3 attempt(s)")
        relay.reset_next(0)
        assert _whole(layer, pushed, "mid") == pushed.blob.files["mid"]
    assert sum(1 for status, _ in _blob_gets(relay) if status == 0) == 7


def test_truncated_bodies_are_retried(through: tuple[FaultRelay, RunningRegistry], pushed: PushedLayer,
                                      tmp_path: Path) -> None:
    relay, target = through
    with _client(target) as client:
        layer = _open(client, target, pushed, tmp_path)
        relay.cut_next(1, after_bytes=1000)
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]
        assert _blob_gets(relay)[-2:] == [(206, False), (206, True)]
        relay.cut_next(10, after_bytes=10)
        _fails_clearly(layer, "mid", target, "failed after 3 attempt(s)")
        relay.cut_next(0, 0)
        assert _whole(layer, pushed, "mid") == pushed.blob.files["mid"]


def test_a_stalled_body_is_cut_by_the_read_timeout_and_retried(
        through: tuple[FaultRelay, RunningRegistry], pushed: PushedLayer, tmp_path: Path) -> None:
    relay, target = through
    with _client(target, read=0.5) as client:
        layer = _open(client, target, pushed, tmp_path)
        relay.slow_next(1, piece=1 << 20, interval=1.0)  # headers, then 1 s of silence
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]
        # (logged as they end: the stalled answer ends after the retry's)
        assert sorted(_blob_gets(relay)[-2:]) == [(206, False), (206, True)]


def test_a_trickling_body_is_bounded_by_range_body(
        through: tuple[FaultRelay, RunningRegistry], pushed: PushedLayer, tmp_path: Path) -> None:
    relay, target = through
    # 512 bytes every 50 ms never leaves the client silent for `read`; only range_body
    # bounds it (the whole file at that pace would take 30 s per attempt).
    with _client(target, read=2.0, range_body=0.3) as client:
        layer = _open(client, target, pushed, tmp_path)
        relay.slow_next(10, piece=512, interval=0.05)
        started = time.monotonic()
        error = _fails_clearly(layer, "big", target, "failed after 3 attempt(s)", "body too slow")
        print(f"trickling body: read failed after {time.monotonic() - started:.2f} s: {error}")
        assert time.monotonic() - started < HANG
        relay.slow_next(0, 1, 0.0)
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]


def test_range_ignored_is_a_clear_error(through: tuple[FaultRelay, RunningRegistry], pushed: PushedLayer,
                                        tmp_path: Path) -> None:
    relay, target = through
    with _client(target) as client:
        layer = _open(client, target, pushed, tmp_path / "a")
        relay.ignore_range = True
        error = _fails_clearly(layer, "big", target, "ignored the Range header")
        assert isinstance(error, RangeNotSupportedError)
        with pytest.raises(RangeNotSupportedError):  # at open too: the footer is a range
            _open(client, target, pushed, tmp_path / "b")
        assert _no_index(tmp_path / "b")
        relay.ignore_range = False
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]


def test_corrupted_bodies_never_reach_the_reader(through: tuple[FaultRelay, RunningRegistry],
                                                 pushed: PushedLayer, tmp_path: Path) -> None:
    relay, target = through
    with _client(target) as client:
        layer = _open(client, target, pushed, tmp_path / "a")
        relay.corrupt_next(1, at=100)  # right status, right headers, one wrong byte
        with pytest.raises(VerificationError, match="big"):
            _whole(layer, pushed, "big")
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]
        # The TOC read at open (the footer read, 72 bytes, is spared): refused, no index kept.
        assert layer.footer.toc_length > 100
        relay.corrupt_next(1, at=100)
        reads_before = len(_blob_gets(relay))
        with pytest.raises((VerificationError, FormatError)):
            _open(client, target, pushed, tmp_path / "b")
        assert len(_blob_gets(relay)) == reads_before + 2  # the footer, then the TOC
        assert _no_index(tmp_path / "b")
        assert _whole(_open(client, target, pushed, tmp_path / "b"), pushed, "mid") == pushed.blob.files["mid"]


# ------------------------------------------------------------------ real processes


def test_token_invalidated_mid_run_is_refreshed(token_registry: RunningRegistry, tmp_path: Path) -> None:
    layer_blob = _push(token_registry, "estargz")
    assert token_registry.token_server is not None
    with _client(token_registry) as client:
        layer = _open(client, token_registry, layer_blob, tmp_path)
        assert _whole(layer, layer_blob, "small1") == layer_blob.blob.files["small1"]
        issued = len(token_registry.token_server.token_requests())
        # Every token issued so far stops being accepted (the registry now trusts a new
        # key): the next read gets a 401, fetches one fresh token and carries on.
        token_registry.rotate_token_signing_key()
        assert _whole(layer, layer_blob, "big") == layer_blob.blob.files["big"]
        assert len(token_registry.token_server.token_requests()) == issued + 1


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    """A registry this test may stop, freeze and start again."""
    running = start_plain_registry(tmp_path / "registry")
    yield running
    running.stop()


def test_registry_stopped_mid_run_fails_in_bounded_time_then_recovers(
        own_registry: RunningRegistry, tmp_path: Path) -> None:
    pushed = _push(own_registry, "estargz")
    policy = RetryPolicy(attempts=3, backoff_base=0.05, backoff_max=0.2, total_max=2.0)
    with own_registry.client(retry=policy, timeouts=replace(TIMEOUTS, connect=1.0, read=1.0)) as client:
        layer = _open(client, own_registry, pushed, tmp_path / "index")
        assert _whole(layer, pushed, "small1") == pushed.blob.files["small1"]

        own_registry.process.stop()  # the process is gone: connections are refused
        started = time.monotonic()
        _fails_clearly(layer, "big", own_registry, "failed after")
        print(f"stopped registry: read failed after {time.monotonic() - started:.2f} s")
        assert time.monotonic() - started < HANG
        own_registry.process.start()  # same port, same storage
        assert _whole(layer, pushed, "big") == pushed.blob.files["big"]  # the same Layer, no reopen

        own_registry.process.pause()  # frozen: connections are accepted, nothing answers
        try:
            started = time.monotonic()
            error = _fails_clearly(layer, "mid", own_registry, "failed after")
            assert "Timeout" in str(error)
            print(f"frozen registry: read failed after {time.monotonic() - started:.2f} s: {error}")
            assert time.monotonic() - started < HANG
        finally:
            own_registry.process.resume()
        assert _whole(layer, pushed, "mid") == pushed.blob.files["mid"]
        assert _whole(layer, pushed, "small2") == pushed.blob.files["small2"]
