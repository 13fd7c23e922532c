"""The benchmark's link emulation (bench/netlink.py): the delaying relay carries bytes
intact both ways with half-closes, never delivers early; the namespace link is rate
limited by tbf and leaves nothing behind; the self-check measures what the link does.
Real sockets, a real network namespace and real tc (root only for those)."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench import report
from bench.common import Figure, Machine, Run, Target
from bench.netlink import (
    SUBNET_POOL,
    DelayRelay,
    LinkError,
    NetnsLink,
    check_link,
    free_subnet,
    remove_stale_links,
)

needs_root_net = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None,
                                    reason="network namespaces and tc need root")


# ---------------------------------------------------------------------------- helpers


class _Echo:
    """A loopback server that sends back what it reads, then half-closes after EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[_Echo]:
    server = _Echo()
    yield server
    server.close()


def _serve_files(files: dict[str, bytes]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------- relay


def test_relay_carries_bytes_both_ways_and_passes_the_half_close(echo: _Echo) -> None:
    payload = os.urandom(3 << 20)  # many relay pieces
    with DelayRelay(echo.address, one_way_delay=0.005) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as conn:
            sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
            sender.start()
            received = bytearray()
            while data := conn.recv(1 << 16):
                received += data
            sender.join()
    assert bytes(received) == payload  # all of it, in order, then EOF


def test_relay_never_delivers_before_the_delay(echo: _Echo) -> None:
    delay = 0.05
    with DelayRelay(echo.address, one_way_delay=delay) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as conn:
            started = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            round_trip = time.monotonic() - started
    assert round_trip >= 2 * delay  # once each way; a lower bound, so not load-dependent


def test_relay_to_a_closed_port_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()  # bound but not listening: connections are refused
        with DelayRelay(dead, one_way_delay=0.0) as relay:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as conn:
                assert conn.recv(16) == b""


# ---------------------------------------------------------------------------- addresses


def test_free_subnet_avoids_networks_in_use() -> None:
    pool = list(SUBNET_POOL.subnets(new_prefix=30))
    taken = [pool[7], ipaddress.ip_network("10.237.0.32/29")]  # covers pool[8] and pool[9] too
    assert free_subnet(taken, seed=7) == pool[10]
    assert free_subnet([], seed=len(pool) + 3) == pool[3]  # the seed wraps around


def test_free_subnet_refuses_a_full_pool() -> None:
    with pytest.raises(LinkError, match="no free /30"):
        free_subnet([ipaddress.ip_network("10.0.0.0/8")], seed=0)


# ---------------------------------------------------------------------------- self-check


def test_check_link_measures_the_relay_round_trip() -> None:
    server = _serve_files({"/small": b"{}", "/large": os.urandom(1 << 20)})
    try:
        with DelayRelay(server.server_address, one_way_delay=0.01) as relay:
            check = check_link(relay.netloc, "/small", "/large", asked_rate_mbit=100, asked_rtt_ms=20, probes=3)
    finally:
        server.shutdown()
    assert check.rtt_ms >= 20
    assert not check.ok or check.rate_mbit <= 105  # loopback runs far above the asked rate


def test_check_link_reports_a_failed_request() -> None:
    server = _serve_files({"/small": b"{}"})
    try:
        with pytest.raises(LinkError, match="/missing"):
            check_link(f"127.0.0.1:{server.server_address[1]}", "/small", "/missing", 100, 0, probes=1)
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------- the namespace

# http.server's file handler, speaking HTTP/1.1 (keep-alive) as a registry does.
_KEEP_ALIVE_FILE_SERVER = """
import functools, http.server, sys
http.server.SimpleHTTPRequestHandler.protocol_version = "HTTP/1.1"
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
"""


@needs_root_net
def test_netns_link_limits_the_rate_and_cleans_up(tmp_path: Path) -> None:
    size = 4 << 20
    (tmp_path / "big").write_bytes(os.urandom(size))
    (tmp_path / "small").write_bytes(b"{}")
    with NetnsLink.create(rate_mbit=50, tag=f"t{os.getpid()}") as link:
        assert "tbf" in link.qdiscs() and "50Mbit" in link.qdiscs()
        server = subprocess.Popen([*link.exec_prefix(), "python3", "-c", _KEEP_ALIVE_FILE_SERVER, link.ns_addr,
                                   "8000", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:  # wait until it serves; the deadline only bounds a server that never does
                try:
                    socket.create_connection((link.ns_addr, 8000), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "http.server in the namespace did not start"
                    time.sleep(0.05)
            check = check_link(f"{link.ns_addr}:8000", "/small", "/big", 50, 0, probes=2)
        finally:
            server.terminate()
            server.wait()
        name, host_if = link.name, link.host_if
    # tbf cannot let more through than its rate (plus one burst, small against 4 MiB).
    assert check.rate_mbit <= 50 * 1.05
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0


@needs_root_net
def test_stale_namespaces_of_dead_runs_are_removed_live_ones_kept() -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale, live = f"crfsb-t{finished.pid}", f"crfsb-t{os.getpid()}"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = remove_stale_links()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    assert stale in removed and stale not in names
    assert live not in removed and live in names


# ---------------------------------------------------------------------------- figures


def test_figure_ratio_and_targets() -> None:
    faster = Figure("B0", "x", "s", [1.0, 9.0, 2.0], [10.0, 20.0, 30.0], "base", Target("<=", 0.1))
    assert faster.crfs_median == 2.0 and faster.baseline_median == 20.0
    assert faster.ratio == 0.1 and faster.met is True
    absolute = Figure("B0", "y", "s", [12.0, 11.0, 13.0], [1.0, 1.0, 1.0], "base", Target("<=", 10, on="crfs"))
    assert absolute.met is False and absolute.as_dict()["target"] == "crfs <= 10 s"
    throughput = Figure("B0", "z", "MB/s", [60.0, 70.0, 80.0], [100.0, 100.0, 100.0], "base", Target(">=", 0.7))
    assert throughput.met is True


def _figure(bench: str, name: str, crfs: float) -> Figure:
    return Figure(bench, name, "s", [crfs] * 3, [10.0] * 3, "baseline", Target("<=", 0.1))


def test_update_keeps_other_benchmarks_with_their_own_run(tmp_path: Path) -> None:
    """`bench/run.py --only B1 --update`: B1 is replaced, B2 kept, each stamped with its run."""
    first, second = Machine.now(), Machine.now()
    first.finish()
    second.finish()
    second.commit = "second-commit"
    report.write(tmp_path, Run(["B1", "B2"], first, 3), [_figure("B1", "old b1", 5.0), _figure("B2", "b2", 0.5)],
                 [], {"B2": {"fact": 1}})
    report.write(tmp_path, Run(["B1"], second, 3), [_figure("B1", "new b1", 0.9)], [], {"B1": {"fact": 2}},
                 update=True)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(f["bench"], f["name"]) for f in data["figures"]] == [("B1", "new b1"), ("B2", "b2")]
    assert [r["benchmarks"] for r in data["runs"]] == [["B2"], ["B1"]]
    assert data["runs"][1]["machine"]["commit"] == "second-commit"
    assert data["facts"] == {"B2": {"fact": 1}, "B1": {"fact": 2}}
    kept = Figure.from_dict(data["figures"][1])
    assert kept.met is True and kept.target == Target("<=", 0.1)
    text = (tmp_path / "results.md").read_text()
    assert "- B1: date:" in text and "commit second-commit" in text and "- B2: date:" in text


def test_without_update_a_run_replaces_the_results(tmp_path: Path) -> None:
    machine = Machine.now()
    report.write(tmp_path, Run(["B2"], machine, 3), [_figure("B2", "b2", 0.5)], [], {})
    report.write(tmp_path, Run(["B1"], machine, 3), [_figure("B1", "b1", 0.9)], [], {})
    data = json.loads((tmp_path / "results.json").read_text())
    assert [f["bench"] for f in data["figures"]] == ["B1"]


def test_verify_floor_inflates_every_member_across_read_boundaries() -> None:
    """The B2 floor must do the whole work: every gzip member, also those that start or
    end inside a read (pieces of 1000 bytes against members of ~3 KiB)."""
    import gzip
    import hashlib

    from bench.b2_throughput import inflate_and_hash

    plain = [os.urandom(3000 + n) for n in range(7)] + [b"a" * 50_000]
    blob = b"".join(gzip.compress(part) for part in plain)
    assert inflate_and_hash(blob, piece=1000) == hashlib.sha256(b"".join(plain)).digest()
    assert inflate_and_hash(blob[:-len(gzip.compress(plain[-1]))], piece=1000) != \
        hashlib.sha256(b"".join(plain)).digest()
