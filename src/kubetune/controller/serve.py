"""The operator's HTTP endpoints: /healthz and /readyz for the kubelet, /metrics for Prometheus."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "0.0.0.0", int(port)


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

    def serve(self, addr: str) -> int:
        host, port = parse_addr(addr)
        server, _ = start_http_server(port, host, registry=self.registry)
        return int(server.server_port)


def serve_health(addr: str, alive: Callable[[], bool], ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """/healthz answers 200 while `alive()`, /readyz while `ready()`; 503 otherwise."""

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

    server = ThreadingHTTPServer(parse_addr(addr), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
