"""The operator's HTTP endpoints: /healthz and /readyz for the kubelet, /metrics for Prometheus.

An address that cannot be served (a port in use, a host that does not resolve, a malformed HOST:PORT)
is an AddrError whose message is one line naming the flag, the address and the port: the operator prints
it and exits with code 2 before it talks to any cluster (kubetune_operator.operator.main).
"""

from __future__ import annotations

import errno
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from kubetune.api.v1alpha1 import State


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


# Per-job series kept at most per metric (Prometheus cost grows with label sets, not with jobs).
JOB_SERIES_MAX = 200
STATES: tuple[str, ...] = get_args(State)
UNKNOWN_STATE = "Unknown"  # not reconciled yet, or a state this version does not know
_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def duration_seconds(text: Any) -> float | None:
    """Seconds of a status duration as kubetune.durations.format_duration writes it (`4h05m`, `12m30s`,
    `42s`); None for `?` or anything else."""
    if not isinstance(text, str) or not text:
        return None
    m = _DURATION_RE.match(text)
    if m is None:
        return None
    h, mins, secs = (int(g) if g else 0 for g in m.groups())
    return float(h * 3600 + mins * 60 + secs)


def _number(value: Any) -> float | None:
    """A finite number from a status field (loss is a string there, step an integer); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


# The per-job gauges: (metric name, help, the status field it shows, how to read that field).
JOB_GAUGES: tuple[tuple[str, str, str, Callable[[Any], float | None]], ...] = (
    ("kubetune_job_loss", "Latest training loss of a running FineTuneJob.", "loss", _number),
    ("kubetune_job_step", "Optimizer steps done by a running FineTuneJob.", "step", _number),
    ("kubetune_job_total_steps", "Optimizer steps a running FineTuneJob will do.", "totalSteps", _number),
    (
        "kubetune_job_eta_seconds",
        "Estimated seconds until a running FineTuneJob finishes training.",
        "eta",
        duration_seconds,
    ),
    (
        "kubetune_job_tokens_per_second",
        "Non-padding tokens a running FineTuneJob trains on per second (all its GPUs).",
        "tokensPerSecond",
        _number,
    ),
)


class _FineTuneJobs:
    """FineTuneJobs by state and the training gauges of running ones, computed from the operator's cache
    at scrape time: nothing is kept per job, so a finished or deleted job leaves /metrics by itself."""

    def __init__(self, ftjs: Callable[[], Iterable[dict[str, Any]]], series_max: int) -> None:
        self.ftjs = ftjs
        self.series_max = series_max

    def collect(self) -> Iterator[Any]:
        counts = dict.fromkeys((*STATES, UNKNOWN_STATE), 0)
        running: list[tuple[str, str, str, dict[str, Any]]] = []
        for obj in self.ftjs():
            status = obj.get("status")
            status = status if isinstance(status, dict) else {}
            state = status.get("state")
            counts[state if isinstance(state, str) and state in counts else UNKNOWN_STATE] += 1
            if state == "Running":
                meta = obj.get("metadata") or {}
                started = status.get("startTime")
                running.append(
                    (
                        started if isinstance(started, str) else "",
                        str(meta.get("namespace") or ""),
                        str(meta.get("name") or ""),
                        status,
                    )
                )
        by_state = GaugeMetricFamily("kubetune_finetunejobs", "FineTuneJobs by state.", labels=["state"])
        for state, n in counts.items():
            by_state.add_metric([state], float(n))
        yield by_state

        # The most recently started first (RFC 3339 UTC times sort as text); ties by namespace/name, so
        # the chosen series stay the same from one scrape to the next.
        running.sort(key=lambda r: (r[1], r[2]))
        running.sort(key=lambda r: r[0], reverse=True)
        shown = running[: self.series_max]
        for name, help_text, field, read in JOB_GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=["namespace", "name"])
            for _, namespace, job, status in shown:
                value = read(status.get(field))
                if value is not None:
                    gauge.add_metric([namespace, job], value)
            yield gauge
        yield GaugeMetricFamily(
            "kubetune_job_series_dropped",
            f"Running FineTuneJobs left out of the kubetune_job_* gauges (at most {self.series_max} shown).",
            value=float(len(running) - len(shown)),
        )


class Metrics:
    """The operator's metrics, in a registry of their own (several operators can share a process).

    `queue_depth()` is the work queue's length; `ftjs()` the FineTuneJobs of the operator's cache (raw
    dicts), read at each scrape. `request(verb, resource)` counts one API request (Kube.on_request)."""

    def __init__(
        self,
        queue_depth: Callable[[], int],
        ftjs: Callable[[], Iterable[dict[str, Any]]],
        *,
        job_series_max: int = JOB_SERIES_MAX,
    ) -> None:
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
        self.requests = Counter(
            "kubetune_api_requests",
            "Requests sent to the API server, by verb and resource (watches count once each).",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.registry.register(_FineTuneJobs(ftjs, job_series_max))

    def request(self, verb: str, resource: str) -> None:
        self.requests.labels(verb, resource).inc()

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
