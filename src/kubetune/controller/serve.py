"""The operator's HTTP endpoints: /healthz and /readyz for the kubelet, /metrics for Prometheus.

An address that cannot be served (a port in use, a host that does not resolve, a malformed HOST:PORT)
is an AddrError whose message is one line naming the flag, the address and the port: the operator prints
it and exits with code 2 before it talks to any cluster (kubetune.controller.operator.main).
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector


class AddrError(Exception):
    """An address flag the operator cannot listen on; the message is one line that names the flag."""


def parse_addr(addr: str, flag: str = "address") -> tuple[str, int]:
    """HOST:PORT (an empty host: every interface; an IPv6 host in brackets, [::1]:8080)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise AddrError(f"{flag} {addr!r}: expected HOST:PORT with a port from 0 to 65535, e.g. 0.0.0.0:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def resolve(addr: str, flag: str) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The socket family and address to bind for `addr`; AddrError when its host does not resolve."""
    host, port = parse_addr(addr, flag)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise AddrError(
            f"{flag} {addr}: cannot resolve host {host!r} ({why}); use an IP address or a known name"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def listen(addr: str, flag: str, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A server bound to `addr`, not serving yet; AddrError (one line, naming `flag`) when it cannot be."""
    family, sockaddr = resolve(addr, flag)
    port = sockaddr[1]

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        return Server(sockaddr, handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = (
                f"port {port} is already in use (another process listens on it); stop it, or pick "
                "another port"
            )
        elif e.errno == errno.EACCES:
            why = (
                f"not allowed to listen on port {port} (below 1024 needs privileges); pick a port above 1023"
            )
        elif e.errno == errno.EADDRNOTAVAIL:
            why = (
                f"{sockaddr[0]} is not an address of this machine (port {port}); use 0.0.0.0 or one of "
                "its addresses"
            )
        else:
            why = f"cannot listen on port {port}: {e.strerror or e}"
        raise AddrError(f"{flag} {addr}: {why}") from None


def start(server: ThreadingHTTPServer, name: str) -> None:
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()


class Metrics:
    """The operator's metrics, in a registry of their own (several operators can share a process)."""

    def __init__(self, requests: Callable[[], int], queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "kubetune_reconciles", "Reconcile passes, by result.", ["result"], registry=self.registry
        )
        self.duration = Histogram(
            "kubetune_reconcile_duration_seconds", "Time of one reconcile pass.", registry=self.registry
        )
        self.leader = Gauge("kubetune_leader", "1 while this replica leads.", registry=self.registry)
        depth = Gauge("kubetune_workqueue_depth", "Objects waiting to be reconciled.", registry=self.registry)
        depth.set_function(lambda: float(queue_depth()))

        class Requests(Collector):  # type: ignore[misc]
            def collect(self) -> Iterator[Any]:
                yield CounterMetricFamily(
                    "kubetune_api_requests", "Requests sent to the API server.", value=float(requests())
                )

        self.registry.register(Requests())

    def listen(self, addr: str, flag: str = "--metrics-addr") -> ThreadingHTTPServer:
        """/metrics, bound to `addr` (not serving until `start`)."""
        handler: type[BaseHTTPRequestHandler] = MetricsHandler.factory(self.registry)
        return listen(addr, flag, handler)

    def serve(self, addr: str, flag: str = "--metrics-addr") -> int:
        server = self.listen(addr, flag)
        start(server, "metrics")
        return int(server.server_address[1])


def health_server(
    addr: str, alive: Callable[[], bool], ready: Callable[[], bool], flag: str = "--health-addr"
) -> ThreadingHTTPServer:
    """/healthz answers 200 while `alive()`, /readyz while `ready()`; 503 otherwise. Bound, not serving."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass  # the kubelet probes every few seconds: no log line each time

        def do_GET(self) -> None:
            check = {"/healthz": alive, "/readyz": ready}.get(self.path.split("?")[0])
            if check is None:
                code, body = 404, b"not found\n"
            else:
                ok = check()
                code, body = (200, b"ok\n") if ok else (503, b"not ready\n")
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return listen(addr, flag, Handler)


def serve_health(
    addr: str, alive: Callable[[], bool], ready: Callable[[], bool], flag: str = "--health-addr"
) -> ThreadingHTTPServer:
    server = health_server(addr, alive, ready, flag)
    start(server, "health")
    return server
