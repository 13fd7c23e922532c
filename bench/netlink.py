"""Link emulation for the benchmarks: a rate-limited network namespace and a delaying relay.

The kernel here has no netem, so rate and delay come from two places:

- `NetnsLink`: a network namespace of our own joined to this one by a veth pair, with
  `tc qdisc tbf` at the given rate on both ends (download and upload). A server started
  with `link.exec_prefix()` listens on `link.ns_addr`; nothing but that pair is touched.
- `DelayRelay`: a TCP relay on 127.0.0.1 that holds every piece of data for a one-way
  delay in each direction (RTT = 2 x delay) without limiting throughput: data read is
  queued with its due time, so many delays are in flight at once, as on a long wire.

Clients talk to the relay on loopback (crfs and podman use plain HTTP only for
loopback/insecure registries), the relay to the server in the namespace:

    client -> 127.0.0.1:relay --(delay)--> veth (tbf) -> netns: registry

`check_link` measures what the pair achieves (rate over a large GET, RTT of small
requests on a kept-alive connection).
"""
from __future__ import annotations

import ipaddress
import os
import queue
import re
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

SUBNET_POOL = ipaddress.ip_network("10.237.0.0/16")   # /30s for our veth pairs are taken from here
PUMP_PIECE = 256 * 1024
TBF_BURST_BYTES = 64 * 1024     # >= one GSO packet; small against a second's worth at 100 Mbit
TBF_LATENCY_MS = 100            # queue allowance before tbf drops


class LinkError(RuntimeError):
    """The emulated link could not be set up (names the command that failed)."""


def _run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise LinkError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


# ---------------------------------------------------------------------------- addresses


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network routed or addressed on this host (all tables)."""
    found: list[ipaddress.IPv4Network] = []
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        words = line.split()
        if not words:
            continue
        dest = words[1] if words[0] in ("local", "broadcast", "unicast", "multicast") else words[0]
        if dest != "default":
            try:
                found.append(ipaddress.ip_network(dest, strict=False))
            except ValueError:
                continue
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        words = line.split()
        if "inet" in words:
            found.append(ipaddress.ip_network(words[words.index("inet") + 1], strict=False))
    return found


def free_subnet(in_use: list[ipaddress.IPv4Network], seed: int) -> ipaddress.IPv4Network:
    """A /30 of SUBNET_POOL that overlaps nothing in `in_use`, starting the search at `seed`
    (the pid, so that concurrent runs pick different ones)."""
    candidates = list(SUBNET_POOL.subnets(new_prefix=30))
    for step in range(len(candidates)):
        net = candidates[(seed + step) % len(candidates)]
        if not any(net.overlaps(other) for other in in_use):
            return net
    raise LinkError(f"no free /30 left in {SUBNET_POOL}")


# ---------------------------------------------------------------------------- the namespace

NETNS_PREFIX = "crfsb-"
_STALE_NAME = re.compile(rf"^{NETNS_PREFIX}t?(\d+)$")


def remove_stale_links() -> list[str]:
    """Deletes our namespaces left by runs that were killed (the pid in the name is gone)."""
    removed = []
    for line in _run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE_NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


@dataclass
class NetnsLink:
    """A network namespace joined to ours by a veth pair, rate-limited both ways."""

    name: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str
    rate_mbit: float
    _up: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, rate_mbit: float, tag: str | None = None) -> "NetnsLink":
        if os.geteuid() != 0:
            raise LinkError("creating a network namespace needs root")
        tag = tag or str(os.getpid())
        remove_stale_links()
        net = free_subnet(networks_in_use(), os.getpid())
        host_addr, ns_addr = (str(a) for a in list(net.hosts())[:2])
        link = cls(f"{NETNS_PREFIX}{tag}", f"cb{tag}h"[:15], f"cb{tag}n"[:15], host_addr, ns_addr, rate_mbit)
        try:
            link._set_up(net.prefixlen)
        except BaseException:
            link.close()
            raise
        return link

    def _set_up(self, prefix: int) -> None:
        self._up = True
        _run(["ip", "netns", "add", self.name])
        _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
              "netns", self.name])
        _run(["ip", "addr", "add", f"{self.host_addr}/{prefix}", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        inside = ["ip", "netns", "exec", self.name]
        _run([*inside, "ip", "addr", "add", f"{self.ns_addr}/{prefix}", "dev", self.ns_if])
        _run([*inside, "ip", "link", "set", self.ns_if, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        for prefix_args in ([], inside):  # egress of each end: upload and download
            dev = self.host_if if not prefix_args else self.ns_if
            _run([*prefix_args, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                  "rate", f"{self.rate_mbit:g}mbit", "burst", str(TBF_BURST_BYTES),
                  "latency", f"{TBF_LATENCY_MS}ms"])

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def qdiscs(self) -> str:
        """`tc qdisc show` of both ends, for the record."""
        return (_run(["tc", "qdisc", "show", "dev", self.host_if])
                + _run([*self.exec_prefix(), "tc", "qdisc", "show", "dev", self.ns_if]))

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        # Deleting the namespace destroys its veth end, and with it our peer.
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> "NetnsLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- the relay


@dataclass
class DelayRelay:
    """Listens on 127.0.0.1 and forwards each connection to `upstream`, delivering every
    piece of data `one_way_delay` seconds after it was read, in both directions."""

    upstream: tuple[str, int]
    one_way_delay: float
    _listener: socket.socket | None = field(default=None, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _connections: list[socket.socket] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.getsockname()[1]

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "DelayRelay":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> "DelayRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for conn in (client, server):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += [client, server]
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """One direction: a reader stamps each piece with its due time, a writer delivers it
        then; an empty piece carries the EOF (half-close) along, delayed like data."""
        pieces: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        self._spawn(self._read, source, pieces)
        self._spawn(self._write, sink, pieces, source)

    def _read(self, source: socket.socket, pieces: "queue.SimpleQueue[tuple[float, bytes]]") -> None:
        while True:
            try:
                data = source.recv(PUMP_PIECE)
            except OSError:
                data = b""
            pieces.put((time.monotonic() + self.one_way_delay, data))
            if not data:
                return

    def _write(self, sink: socket.socket, pieces: "queue.SimpleQueue[tuple[float, bytes]]",
               source: socket.socket) -> None:
        while True:
            due, data = pieces.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                sink.sendall(data)
            except OSError:
                # The far side is gone: stop reading the near side too.
                try:
                    source.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return


# ---------------------------------------------------------------------------- self-check


@dataclass(frozen=True)
class LinkCheck:
    """What the emulated link achieved, against what was asked."""

    rate_mbit: float
    rtt_ms: float
    asked_rate_mbit: float
    asked_rtt_ms: float

    @property
    def ok(self) -> bool:
        # tbf counts Ethernet frames, a download carries TCP/IP headers too: ~5% less payload.
        return (0.85 * self.asked_rate_mbit <= self.rate_mbit <= 1.05 * self.asked_rate_mbit
                and self.asked_rtt_ms <= self.rtt_ms <= self.asked_rtt_ms + 5)

    def text(self) -> str:
        return (f"{self.rate_mbit:.1f} Mbit/s (asked {self.asked_rate_mbit:g}), RTT {self.rtt_ms:.1f} ms "
                f"(asked {self.asked_rtt_ms:g})")


def _http_get(conn: socket.socket, reader: BinaryIO, host: str, path: str) -> tuple[float, float, int]:
    """One keep-alive GET; returns (seconds to first byte, seconds to last byte, body bytes)."""
    started = time.monotonic()
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode())
    status = reader.readline()
    first = time.monotonic() - started
    if status.split(b" ")[1:2] != [b"200"]:
        raise LinkError(f"GET {path} through the link answered {status!r}")
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    left = length
    while left:
        piece = reader.read(min(left, 1 << 20))
        if not piece:
            raise LinkError(f"GET {path}: connection closed with {left} bytes to go")
        left -= len(piece)
    return first, time.monotonic() - started, length


def check_link(netloc: str, small_path: str, large_path: str, asked_rate_mbit: float,
               asked_rtt_ms: float, probes: int = 10) -> LinkCheck:
    """RTT: median time to first byte of `small_path` on a kept-alive connection (the
    server's own time is well under a millisecond). Rate: `large_path`'s body over the
    time from its first to its last byte (so the round trip is not counted twice)."""
    host, port = netloc.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb")
        _http_get(conn, reader, netloc, small_path)  # connection set up, server caches warm
        rtts = [_http_get(conn, reader, netloc, small_path)[0] for _ in range(probes)]
        first, last, size = _http_get(conn, reader, netloc, large_path)
    rate = size * 8 / (last - first) / 1e6
    return LinkCheck(rate, statistics.median(rtts) * 1000, asked_rate_mbit, asked_rtt_ms)
