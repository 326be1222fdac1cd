"""kube.py, the operator's door to the API server, without a cluster: the rate limiter on an injected
clock, the (verb, resource) of every call the operator makes, the timeouts each request carries, the
fence, and the one-line errors. The real kubernetes client builds every request here; only the last
step, the socket, is replaced (`Transport`). Against a real API server: tests/e2e/test_operator_kube.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.client import RemoteDisconnected
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
from kubernetes import client
from kubernetes.client import rest
from kubernetes.client.rest import ApiException

from kubetune_operator import kube as kube_module
from kubetune_operator.kube import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    POOL_MAXSIZE,
    REQUEST_TIMEOUT,
    WATCH_TIMEOUT_MAX,
    WATCH_TIMEOUT_MIN,
    Fenced,
    Kube,
    RateLimiter,
    classify,
    configure,
    describe_error,
    event_name,
    load_client,
)

# The rate limiter ---------------------------------------------------------------------------------------


class Clock:
    """A clock that moves only when someone sleeps on it (or a test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds


def test_limiter_lets_a_burst_through_then_paces_at_qps() -> None:
    clock = Clock()
    limiter = RateLimiter(qps=10, burst=5, clock=clock, sleep=clock.sleep)
    assert [limiter.acquire() for _ in range(5)] == [0.0] * 5 and clock.now == 1000.0
    waits = [limiter.acquire() for _ in range(20)]
    assert waits == pytest.approx([0.1] * 20)
    assert clock.now == pytest.approx(1002.0)  # 20 more requests at 10 per second


def test_limiter_refills_while_idle_but_never_beyond_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(qps=10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        limiter.acquire()
    clock.now += 0.3  # three tokens back
    assert [limiter.reserve() for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])
    clock.now += 3600  # an hour idle: still only a burst's worth
    assert [limiter.reserve() for _ in range(6)] == pytest.approx([0] * 5 + [0.1])


def test_limiter_queues_concurrent_callers_without_losing_a_token() -> None:
    """Many threads at once, the clock frozen: each caller gets its own turn, 1/qps after the one
    before, none twice, none skipped (the bucket is updated under a lock)."""
    clock = Clock()
    limiter = RateLimiter(qps=50, burst=10, clock=clock, sleep=lambda s: None)
    waits: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for _ in range(25):
            w = limiter.acquire()
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == pytest.approx([0.0] * 10 + [n / 50 for n in range(1, 191)])


def test_limiter_with_no_qps_never_waits() -> None:
    clock = Clock()
    limiter = RateLimiter(qps=0, burst=1, clock=clock, sleep=clock.sleep)
    assert all(limiter.acquire() == 0 for _ in range(1000)) and clock.slept == []


# Requests, as the client builds them --------------------------------------------------------------------


class Body(io.BytesIO):
    """A response body that, like a socket's, reports itself closed once read to the end."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data:
            self.close()
        return data


class Transport:
    """Stands in for the socket under the real client (RESTClientObject.request): records each request
    and answers 200 with `reply` (a body, or a function of the method and URL), or raises `fail`."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.reply: Any = b'{"kind": "Status", "items": [], "metadata": {"resourceVersion": "7"}}'
        self.status = 200
        self.fail: BaseException | None = None

    def __call__(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> rest.RESTResponse:
        self.sent.append(
            {
                "method": method,
                "url": url,
                "headers": dict(headers or {}),
                "body": body,
                "timeout": _request_timeout,
            }
        )
        if self.fail is not None:
            raise self.fail
        data = self.reply(method, url) if callable(self.reply) else self.reply
        resp = urllib3.HTTPResponse(body=Body(data), status=self.status, reason="OK", preload_content=False)
        return rest.RESTResponse(resp)

    @property
    def last(self) -> dict[str, Any]:
        return self.sent[-1]


@pytest.fixture
def transport() -> Transport:
    return Transport()


@pytest.fixture
def kube(transport: Transport) -> Kube:
    api = client.ApiClient(configure(client.Configuration(host="https://kube.invalid:6443")))
    api.rest_client.request = transport
    k = Kube(api, qps=0)
    k.watch_read_timeout = 7.0
    return k


FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "team", "uid": "u-1", "resourceVersion": "5"},
}
JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "demo-1", "namespace": "team"}}


def obj(kind: str, api_version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x", "namespace": "team"}}


# Each call the operator makes, and how the API server (RBAC, audit, our metrics) names it.
CALLS: list[tuple[str, Any, tuple[str, str]]] = [
    ("get_ftj", lambda k: k.get_ftj("team", "demo"), ("get", "finetunejobs")),
    (
        "patch_ftj_status",
        lambda k: k.patch_ftj_status("team", "demo", {"state": "Running"}),
        ("patch", "finetunejobs/status"),
    ),
    ("get claim", lambda k: k.get("PersistentVolumeClaim", "team", "w"), ("get", "persistentvolumeclaims")),
    ("secret_exists", lambda k: k.secret_exists("team", "hf"), ("get", "secrets")),
    ("pod_log", lambda k: k.pod_log("team", "p", "trainer"), ("get", "pods/log")),
    ("create Job", lambda k: k.create(obj("Job", "batch/v1")), ("create", "jobs")),
    ("create ConfigMap", lambda k: k.create(obj("ConfigMap")), ("create", "configmaps")),
    ("create Service", lambda k: k.create(obj("Service")), ("create", "services")),
    ("create claim", lambda k: k.create(obj("PersistentVolumeClaim")), ("create", "persistentvolumeclaims")),
    ("patch Job", lambda k: k.patch("Job", "team", "x", {"a": 1}), ("patch", "jobs")),
    (
        "patch claim",
        lambda k: k.patch("PersistentVolumeClaim", "team", "x", {}),
        ("patch", "persistentvolumeclaims"),
    ),
    ("delete Job", lambda k: k.delete("Job", "team", "x"), ("delete", "jobs")),
    ("delete ConfigMap", lambda k: k.delete("ConfigMap", "team", "x"), ("delete", "configmaps")),
    ("delete Service", lambda k: k.delete("Service", "team", "x"), ("delete", "services")),
    (
        "delete claim",
        lambda k: k.delete("PersistentVolumeClaim", "team", "x"),
        ("delete", "persistentvolumeclaims"),
    ),
    (
        "event",
        lambda k: k.event(FTJ, "Normal", "RunCreated", "m", "2026-01-01T00:00:00Z"),
        ("create", "events"),
    ),
    (
        "list_page policy ConfigMap",
        lambda k: k.list_page("ConfigMap", "kt", None, field_selector="metadata.name=policy"),
        ("list", "configmaps"),
    ),
    (
        "list_page FineTuneJob team",
        lambda k: k.list_page("FineTuneJob", "team", None),
        ("list", "finetunejobs"),
    ),
    ("list_page FineTuneJob", lambda k: k.list_page("FineTuneJob", None, None), ("list", "finetunejobs")),
    ("list_page Job", lambda k: k.list_page("Job", "team", "a"), ("list", "jobs")),
    ("list_page Pod", lambda k: k.list_page("Pod", None, "a"), ("list", "pods")),
    (
        "list_page claim",
        lambda k: k.list_page("PersistentVolumeClaim", None, "a"),
        ("list", "persistentvolumeclaims"),
    ),
]
WRITES = {"create", "update", "patch", "delete"}


@pytest.mark.parametrize(("call", "expected"), [(c, e) for _, c, e in CALLS], ids=[n for n, _, _ in CALLS])
def test_each_call_is_counted_by_verb_and_resource_with_a_timeout(
    kube: Kube, transport: Transport, call: Any, expected: tuple[str, str]
) -> None:
    seen: list[tuple[str, str]] = []
    kube.on_request = lambda verb, resource: seen.append((verb, resource))
    call(kube)
    assert len(transport.sent) == 1
    assert classify(transport.last["method"], transport.last["url"]) == expected
    assert seen == [expected] and kube.by_call == {expected: 1}
    assert (kube.requests, kube.writes) == (1, int(expected[0] in WRITES))
    timeout = transport.last["timeout"]
    assert timeout == (kube_module.LOG_TIMEOUT_SECONDS if expected[1] == "pods/log" else REQUEST_TIMEOUT)


WATCHED = [
    ("FineTuneJob", "finetunejobs", "/apis/kubetune.io/v1alpha1/finetunejobs"),
    ("Job", "jobs", "/apis/batch/v1/namespaces/team/jobs"),
    ("Pod", "pods", "/api/v1/pods"),
    ("PersistentVolumeClaim", "persistentvolumeclaims", "/api/v1/persistentvolumeclaims"),
    ("ConfigMap", "configmaps", "/api/v1/namespaces/team/configmaps"),
]


@pytest.mark.parametrize(("kind", "resource", "path"), WATCHED)
def test_a_watch_asks_for_bookmarks_ends_on_the_server_and_times_out_reads(
    kube: Kube, transport: Transport, kind: str, resource: str, path: str
) -> None:
    namespace = "team" if "/namespaces/" in path else None
    lines = [
        {"type": "ADDED", "object": {"kind": kind, "metadata": {"name": "a", "resourceVersion": "8"}}},
        {"type": "BOOKMARK", "object": {"kind": kind, "metadata": {"resourceVersion": "9"}}},
    ]
    transport.reply = "".join(json.dumps(e) + "\n" for e in lines).encode()
    kube.limiter = RateLimiter(qps=1, burst=1, clock=Clock(), sleep=pytest.fail)  # a watch never waits
    events = list(kube.watch(kind, namespace, "app=x", "5", field_selector="metadata.name=a"))
    assert events == lines  # the JSON as sent, BOOKMARK included
    url = urlsplit(transport.last["url"])
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert url.path == path and classify("GET", transport.last["url"]) == ("watch", resource)
    assert query["watch"] == "true" and query["allowWatchBookmarks"] == "true"
    assert query["resourceVersion"] == "5" and query["labelSelector"] == "app=x"
    assert query["fieldSelector"] == "metadata.name=a"
    assert WATCH_TIMEOUT_MIN <= int(query["timeoutSeconds"]) <= WATCH_TIMEOUT_MAX
    assert transport.last["timeout"] == (REQUEST_TIMEOUT[0], 7.0)
    assert kube.by_call == {("watch", resource): 1} and kube.writes == 0


def test_a_watch_error_event_raises_its_status(kube: Kube, transport: Transport) -> None:
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 5 (9)"}
    transport.reply = (json.dumps({"type": "ERROR", "object": gone}) + "\n").encode()
    with pytest.raises(ApiException) as info:
        list(kube.watch("Job", "team", None, "5"))
    assert info.value.status == 410
    assert describe_error(info.value) == "410 Expired: too old resource version: 5 (9)"


def test_list_page_passes_limit_and_continue_and_returns_the_token(kube: Kube, transport: Transport) -> None:
    transport.reply = json.dumps(
        {"items": [{"metadata": {"name": "a"}}], "metadata": {"continue": "abc", "resourceVersion": "42"}}
    ).encode()
    items, token, rv = kube.list_page("Job", "team", "app=x", limit=1, continue_="prev")
    assert (items, token, rv) == ([{"metadata": {"name": "a"}}], "abc", "42")
    query = {k: v[0] for k, v in parse_qs(urlsplit(transport.last["url"]).query).items()}
    assert query == {"labelSelector": "app=x", "limit": "1", "continue": "prev"}
    transport.reply = b'{"items": [], "metadata": {"continue": "", "resourceVersion": "43"}}'
    assert kube.list_page("Job", "team", None) == ([], None, "43")


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/api/v1/namespaces/team/pods", ("list", "pods")),
        ("GET", "/api/v1/namespaces/team/pods?watch=true&resourceVersion=1", ("watch", "pods")),
        ("GET", "/api/v1/watch/namespaces/team/pods", ("watch", "pods")),
        ("GET", "/api/v1/namespaces/team/pods/p/log?tailLines=5", ("get", "pods/log")),
        ("GET", "/api/v1/namespaces/team", ("get", "namespaces")),
        ("GET", "/api/v1/namespaces", ("list", "namespaces")),
        ("GET", "/api/v1/nodes/n", ("get", "nodes")),
        ("POST", "/api/v1/namespaces/team/events", ("create", "events")),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/kt/leases/kubetune-operator", ("update", "leases")),
        (
            "PATCH",
            "/apis/kubetune.io/v1alpha1/namespaces/t/finetunejobs/d/status",
            ("patch", "finetunejobs/status"),
        ),
        ("DELETE", "/apis/batch/v1/namespaces/team/jobs/j", ("delete", "jobs")),
        ("DELETE", "/apis/batch/v1/namespaces/team/jobs", ("deletecollection", "jobs")),
        ("GET", "/version", ("get", "/version")),
        ("GET", "/apis/batch/v1", ("get", "/apis/batch/v1")),
    ],
)
def test_classify(method: str, path: str, expected: tuple[str, str]) -> None:
    assert classify(method, "https://kube:6443" + path) == expected


# The fence ----------------------------------------------------------------------------------------------


def test_a_write_is_fenced_before_it_is_sent_a_read_is_not(kube: Kube, transport: Transport) -> None:
    kube.fence = lambda: False
    for name, call, (verb, _) in CALLS:
        sent = len(transport.sent)
        if verb in WRITES:
            with pytest.raises(Fenced):
                call(kube)
            assert len(transport.sent) == sent, f"{name} reached the API server"
        else:
            call(kube)
            assert len(transport.sent) == sent + 1, name
    assert kube.writes == 0 and kube.requests == len(transport.sent)
    assert not [c for c in kube.by_call if c[0] in WRITES]


def test_the_fence_is_checked_after_the_rate_limit_wait(kube: Kube, transport: Transport) -> None:
    """A write that waited its turn while the lease ran out is refused: the fence is read last."""
    up = [True]

    def sleep(seconds: float) -> None:
        up[0] = False  # the lease is lost while this write waits for the rate limiter

    kube.limiter = RateLimiter(qps=1, burst=1, clock=Clock(), sleep=sleep)
    kube.fence = lambda: up[0]
    kube.create(JOB)
    with pytest.raises(Fenced):
        kube.create(JOB)
    assert [s["method"] for s in transport.sent] == ["POST"]


def test_lease_requests_are_neither_fenced_nor_rate_limited(kube: Kube, transport: Transport) -> None:
    """The elector may share the ApiClient: renewing is what keeps the fence up, and must not queue."""
    kube.fence = lambda: False
    kube.limiter = RateLimiter(qps=1, burst=1, clock=Clock(), sleep=pytest.fail)
    leases = client.CoordinationV1Api(kube.api_client)
    body = {"metadata": {"name": "kubetune-operator"}, "spec": {}}
    for _ in range(3):
        leases.replace_namespaced_lease("kubetune-operator", "kt", body, _preload_content=False)
    assert kube.by_call == {("update", "leases"): 3}


def test_requests_wait_for_the_rate_limiter(kube: Kube, transport: Transport) -> None:
    clock = Clock()
    kube.limiter = RateLimiter(qps=100, burst=2, clock=clock, sleep=clock.sleep)
    for _ in range(6):
        kube.get_ftj("team", "demo")
    assert clock.slept == pytest.approx([0.01] * 4) and len(transport.sent) == 6


def test_one_kube_per_api_client(kube: Kube) -> None:
    with pytest.raises(ValueError, match="has a Kube already"):
        Kube(kube.api_client)


def test_a_named_event_is_created_once(kube: Kube, transport: Transport) -> None:
    name = event_name(FTJ, "RunCreated", "demo-1")
    assert name == event_name(FTJ, "RunCreated", "demo-1") != event_name(FTJ, "RunCreated", "demo-2")
    assert kube.event(FTJ, "Normal", "RunCreated", "created", "2026-01-01T00:00:00Z", name=name) is True
    assert transport.last["body"]["metadata"] == {"name": name, "namespace": "team"}
    transport.status, transport.reply = 409, b'{"kind": "Status", "reason": "AlreadyExists", "code": 409}'
    assert kube.event(FTJ, "Normal", "RunCreated", "created", "2026-01-01T00:00:00Z", name=name) is False
    with pytest.raises(ApiException):  # unnamed (generateName): a 409 is not "already recorded"
        kube.event(FTJ, "Normal", "RunCreated", "created", "2026-01-01T00:00:00Z")


def test_load_client_sets_keepalive_pool_and_user_agent(tmp_path: Path, transport: Transport) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    api = load_client(str(kubeconfig), user_agent="kubetune-operator/replica-a")
    cfg = api.configuration
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in cfg.socket_options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE) in cfg.socket_options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL) in cfg.socket_options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT) in cfg.socket_options
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in cfg.socket_options  # urllib3's own default kept
    pool = api.rest_client.pool_manager.connection_pool_kw
    assert pool["maxsize"] == POOL_MAXSIZE and pool["socket_options"] == cfg.socket_options
    api.rest_client.request = transport
    Kube(api).get_ftj("team", "demo")
    assert transport.last["headers"]["User-Agent"] == "kubetune-operator/replica-a"
    assert load_client(str(kubeconfig)).user_agent == kube_module.USER_AGENT


# Errors in one line -------------------------------------------------------------------------------------


def api_exception(status: int, reason: str, message: str) -> ApiException:
    """As the client raises it from a refused request: headers and body attached."""
    body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status}).encode()
    resp = urllib3.HTTPResponse(
        body=body, status=status, reason=reason, headers={"Audit-Id": "abc", "Set-Cookie": "s=1"}
    )
    http_resp = rest.RESTResponse(resp)
    http_resp.read()  # as the client does before it raises
    try:
        ApiException.from_response(http_resp=http_resp, body=None, data=None)
    except ApiException as e:
        return e
    raise AssertionError("from_response always raises")


def test_describe_error_gives_the_status_and_the_servers_message_only() -> None:
    e = api_exception(403, "Forbidden", 'jobs.batch is forbidden: User "x" cannot create resource "jobs"')
    assert "Audit-Id" in str(e)  # what the client's own str() dumps
    assert (
        describe_error(e) == '403 Forbidden: jobs.batch is forbidden: User "x" cannot create resource "jobs"'
    )
    assert describe_error(ApiException(status=503, reason="Service Unavailable")) == "503 Service Unavailable"
    ssl = ApiException(
        status=0, reason="SSLError\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    assert (
        describe_error(ssl)
        == "ApiException: SSLError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )


def test_describe_error_is_short_and_redacted() -> None:
    token = "hf_" + "a1B2" * 10
    e = api_exception(422, "Unprocessable Entity", f"env HF_TOKEN={token} " + "x" * 1000)
    line = describe_error(e)
    assert token not in line and "hf_***" in line and len(line) <= 300 and "\n" not in line
    assert describe_error(ValueError(f"first {token}\nsecond")) == "ValueError: first hf_***"
    assert describe_error(Fenced("patch jobs: not sent")) == "Fenced: patch jobs: not sent"
    assert describe_error(KeyError()) == "KeyError"


def test_describe_error_of_connection_errors() -> None:
    pool = urllib3.HTTPSConnectionPool("127.0.0.1", 6443)
    conn = urllib3.connection.HTTPSConnection("127.0.0.1", 6443)
    refused = urllib3.exceptions.NewConnectionError(
        conn, "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    assert (
        describe_error(urllib3.exceptions.MaxRetryError(pool, "/api/v1/pods", refused))
        == "NewConnectionError: Failed to establish a new connection: [Errno 111] Connection refused"
    )
    timeout = urllib3.exceptions.ReadTimeoutError(pool, "/api", "Read timed out. (read timeout=30)")
    assert describe_error(timeout) == "ReadTimeoutError: Read timed out. (read timeout=30)"
    aborted = urllib3.exceptions.ProtocolError(
        "Connection aborted.", RemoteDisconnected("Remote end closed connection without response")
    )
    assert describe_error(aborted) == (
        "ProtocolError: Connection aborted. "
        "(RemoteDisconnected: Remote end closed connection without response)"
    )
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert describe_error(reset) == "ConnectionResetError: [Errno 104] Connection reset by peer"


@pytest.fixture
def silent_server() -> Iterator[tuple[str, int]]:
    """Accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[:2]
    stop.set()
    thread.join()
    for s in (*held, server):
        s.close()


def test_a_silent_server_times_out_a_request_and_is_described_in_one_line(
    silent_server: tuple[str, int],
) -> None:
    """Real sockets, the client's own errors: no request waits on a silent server for ever."""
    host, port = silent_server
    api = client.ApiClient(configure(client.Configuration(host=f"http://{host}:{port}")))
    kube = Kube(api, request_timeout=(1.0, 0.3))
    with pytest.raises(urllib3.exceptions.MaxRetryError) as info:
        kube.get_ftj("team", "demo")
    assert describe_error(info.value) == "ReadTimeoutError: Read timed out. (read timeout=0.3)"
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):  # a POST is never retried by urllib3
        kube.create(JOB)
    assert kube.requests == 2


def test_a_write_whose_fence_closes_before_it_goes_on_the_wire_is_never_sent() -> None:
    """The second fence check, on the socket: a fence that passes Kube's check but has closed by the
    time the request's bytes are sent (a process paused in between) sends nothing at all."""
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    received.append(chunk)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    host, port = server.getsockname()[:2]
    api = client.ApiClient(configure(client.Configuration(host=f"http://{host}:{port}")))
    kube = Kube(api, request_timeout=(1.0, 1.0))
    checks: list[bool] = []

    def fence() -> bool:  # open for Kube's own check, closed from then on
        checks.append(not checks)
        return checks[-1]

    kube.fence = fence
    with pytest.raises(Fenced):
        kube.create(JOB)
    thread.join(timeout=5)
    server.close()
    assert len(checks) >= 2 and received == [], received
