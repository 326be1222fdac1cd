"""The operator's only door to the API server: a few calls, plain dicts in and out.

Every request passes one wrapper around `ApiClient.call_api` (see `Kube._call`), which, in this order:
waits for the client-side rate limiter (not for watches), refuses a write when the fence is down
(`Fenced`), counts the request by (verb, resource), and sends it with a timeout. Connections come from
`load_client`: TCP keepalive on, a pool big enough for the workers, an identifying user agent.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.utils.keepalive import tcp_keepalive_socket_options
from urllib3.util.retry import Retry

from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION
from kubetune.contract import PROGRESS_TAIL_BYTES, PROGRESS_TAIL_LINES
from kubetune.redact import redact

log = logging.getLogger("kubetune.operator")

FIELD_MANAGER = "kubetune-operator"
USER_AGENT = "kubetune-operator"

# (connect, read) seconds for every plain request: nothing waits on a silent connection for ever.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
REQUEST_TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)
# Watches: the API server ends each after timeoutSeconds, drawn from this range so that the watches of
# many replicas do not all restart at once; with allowWatchBookmarks it sends a BOOKMARK about every
# minute, so a read that waits longer than WATCH_READ_TIMEOUT means a dead connection, not a quiet one.
WATCH_TIMEOUT_MIN = 240
WATCH_TIMEOUT_MAX = 300
WATCH_READ_TIMEOUT = 90.0
# TCP keepalive: a peer that vanished (host gone, NAT entry dropped) is noticed after about a minute
# (idle + interval * count). A relay that stays up but stops forwarding answers the probes itself:
# only the read timeouts above catch that.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
# Enough connections for the workers and the watches (one each while they run).
POOL_MAXSIZE = 32
# urllib3 retries: a refused or timed-out connect (nothing sent) a few times, a broken read once (a
# pooled connection the server had closed), only for methods urllib3 deems idempotent (never POST or
# PATCH); a timeout is not multiplied further, the work queue retries with backoff.
RETRIES = Retry(total=4, connect=3, read=1, status=0, redirect=0, other=0)

# Client-side rate limit, as client-go's (QPS, burst; the operator's --qps, --burst): a safety net
# against a runaway loop, never the bottleneck. A burst of 1,000 FineTuneJobs sends about 3,000
# requests before the last Job exists and 10,000 over their lives; the API server of the 2-core bench
# answers about 250/s (bench/operator_scale.py), below this. Its own priority and fairness protect it beyond.
DEFAULT_QPS = 500.0
DEFAULT_BURST = 1000

# A metadata-only GET: the API server answers with a PartialObjectMetadata, never the object's data.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# A log read must never hold a worker up: the API server proxies it to the node's kubelet.
LOG_TIMEOUT_SECONDS = 5
# One page of a paginated list.
PAGE_LIMIT = 500

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The leader elector's requests: never fenced (renewing is how a leader keeps its fence up) and never
# queued behind the workers' requests (a late renewal loses the lease).
EXEMPT_RESOURCES = frozenset({"leases"})


class Fenced(Exception):
    """A write refused before it was sent: this replica may no longer hold the lease."""


# The fence is checked twice: in Kube._call, and again as each chunk of a write goes on the wire. The
# second check closes the gap a paused process leaves: a worker that passed the first check just before
# SIGSTOP would otherwise send its write after SIGCONT, when another replica may lead (measured: 2 of 8
# paused-leader runs wrote late with the first check alone, 0 of 8 with both). Only threads inside a
# fenced write have a fence set here, so other connections are untouched.
_sending = threading.local()
_http_send = urllib3.connection.HTTPConnection.send


def _fenced_send(self: urllib3.connection.HTTPConnection, data: Any) -> None:
    fence: Callable[[], bool] | None = getattr(_sending, "fence", None)
    if fence is not None and not fence():
        self.close()  # cut short: the API server never acts on a partial request
        raise Fenced("write not sent: this replica may no longer hold the lease")
    _http_send(self, data)


urllib3.connection.HTTPConnection.send = _fenced_send  # type: ignore[method-assign,assignment]


def load_client(kubeconfig: str | None = None, *, user_agent: str | None = None) -> client.ApiClient:
    """An ApiClient for `kubeconfig` (default: in-cluster, then ~/.kube/config), with TCP keepalive on
    every connection, POOL_MAXSIZE pooled connections, RETRIES and `user_agent` (default USER_AGENT;
    e.g. "kubetune-operator/<identity>", so the audit log tells replicas apart)."""
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            cfg = client.Configuration()
            config.load_kube_config(client_configuration=cfg)
    configure(cfg)
    api = client.ApiClient(cfg)  # builds its connection pool from cfg: configure first
    api.user_agent = user_agent or USER_AGENT
    return api


def configure(cfg: client.Configuration) -> client.Configuration:
    """Set keepalive, pool size and retries on `cfg` (before an ApiClient is made from it)."""
    cfg.socket_options = tcp_keepalive_socket_options(KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    cfg.connection_pool_maxsize = POOL_MAXSIZE
    cfg.retries = RETRIES
    return cfg


# Rate limiting ------------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket (client-go's flowcontrol): `burst` requests at once, then `qps` per second.

    `acquire` blocks until the caller's turn. Each caller reserves its token under the lock (the bucket
    may go negative) and sleeps outside it, so waiters are served in arrival order at exactly `qps`.
    qps <= 0 means unlimited."""

    def __init__(
        self,
        qps: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def acquire(self) -> float:
        """Block until a request may go; the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait


# Verb and resource of a request ------------------------------------------------------------------------

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def classify(method: str, url: str) -> tuple[str, str]:
    """The request's (verb, resource) as RBAC names them: ("list", "jobs"), ("patch",
    "finetunejobs/status"), ("get", "pods/log"), ("watch", "pods"). A path that is not a resource
    (/version, discovery) is its own resource, with the HTTP method lower-cased as verb."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    method = method.upper()
    if segments[:1] == ["api"] and len(segments) >= 2:
        rest = segments[2:]
    elif segments[:1] == ["apis"] and len(segments) >= 3:
        rest = segments[3:]
    else:
        return method.lower(), parts.path or "/"
    watching = rest[:1] == ["watch"]  # the deprecated /watch/ paths
    if watching:
        rest = rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]  # /namespaces/{ns}/{resource}...
    if not rest:
        return method.lower(), parts.path
    resource = f"{rest[0]}/{rest[2]}" if len(rest) >= 3 else rest[0]
    named = len(rest) >= 2
    if method == "GET":
        query = parse_qs(parts.query)
        if watching or query.get("watch", [""])[0].lower() in ("true", "1"):
            return "watch", resource
        return ("get" if named else "list"), resource
    if method == "DELETE":
        return ("delete" if named else "deletecollection"), resource
    return _VERBS.get(method, method.lower()), resource


# Errors, in one line ------------------------------------------------------------------------------------

# What urllib3 puts before its reason: "HTTPSConnectionPool(host=..., port=...): " or the like
_POOL_PREFIX = re.compile(r"^\w*Connection(Pool)?\([^)]*\):\s*")
_OBJECT_PREFIX = re.compile(r"^<[^>]*object at 0x[0-9a-f]+>:\s*")
ERROR_CHARS = 300


def describe_error(exc: BaseException) -> str:
    """One short, redacted line for a log or a status message: "403 Forbidden: <the API server's
    message>", "ReadTimeoutError: Read timed out. (read timeout=30)", never headers or a body dump."""
    if isinstance(exc, ApiException):
        if exc.status:
            message = _status_message(exc)
            reason = str(exc.reason or "").strip().splitlines()
            head = f"{exc.status} {reason[0]}" if reason else str(exc.status)
            text = f"{head}: {message}" if message else head
        else:  # raised by the client itself (an SSL error): the reason holds the story, over lines
            text = "ApiException: " + ": ".join(s.strip() for s in str(exc.reason).splitlines() if s.strip())
    elif isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return describe_error(exc.reason)
    elif isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        text = f"{type(exc).__name__}: {_short(exc)}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc).strip() else type(exc).__name__
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    line = redact(first)
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 3] + "..."


def _short(exc: BaseException) -> str:
    """An urllib3 or socket error's own reason, without the pool or connection object it names."""
    if isinstance(exc, urllib3.exceptions.ProtocolError) and len(exc.args) == 2:
        # ("Connection aborted.", RemoteDisconnected(...)) or ("Connection broken: IncompleteRead(...)", ...)
        text, cause = str(exc.args[0]), exc.args[1]
        if isinstance(cause, BaseException) and type(cause).__name__ not in text:
            text = f"{text} ({type(cause).__name__}: {_short(cause)})"
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else exc.strerror
    else:
        text = str(exc)
    text = _OBJECT_PREFIX.sub("", _POOL_PREFIX.sub("", text))
    return text or type(exc).__name__


def _status_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return ""
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return ""


def is_status(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


def api_message(exc: ApiException) -> str:
    """The API server's own words from a refused request (its Status object's message)."""
    message = _status_message(exc)
    return message[:2000] if message else f"{exc.status} {exc.reason}"


def event_name(ftj: dict[str, Any], *key: str) -> str:
    """A deterministic Event name for `ftj` and `key` (e.g. the reason and the state it reports): the
    same transition always names the same Event, so a second attempt gets 409 instead of a duplicate."""
    meta = ftj["metadata"]
    digest = hashlib.sha256("\0".join((meta.get("uid", ""), *key)).encode()).hexdigest()[:16]
    return f"{meta['name'][:200]}.{digest}"


def _json(resp: Any) -> Any:
    return json.loads(resp.data)


class _RawWatch(watch.Watch):  # type: ignore[misc]
    """A Watch that yields the events as sent: no model classes built per event (their cost dominates a
    busy watch), and ERROR events still raised as ApiException (410 included)."""

    def get_return_type(self, func: Any) -> None:
        return None


class Kube:
    """The API calls the operator makes. Attributes the operator wires:

    - `requests`, `writes`: requests sent (writes: POST, PUT, PATCH, DELETE);
    - `by_call`: a Counter of (verb, resource) -> requests sent;
    - `on_request(verb, resource)`: called for each request sent (the metrics);
    - `fence()`: checked right before each write; False raises `Fenced` and nothing is sent.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
        watch_read_timeout: float = WATCH_READ_TIMEOUT,
    ) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.limiter = RateLimiter(qps, burst)
        self.request_timeout = request_timeout
        self.watch_read_timeout = watch_read_timeout
        self.fence: Callable[[], bool] = lambda: True
        self.on_request: Callable[[str, str], None] | None = None
        self.requests = 0
        self.writes = 0
        self.by_call: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._watches: set[watch.Watch] = set()
        if isinstance(getattr(api_client.call_api, "__self__", None), Kube):
            # Wrapped twice, every request would be counted, rate-limited and fenced twice.
            raise ValueError("this ApiClient has a Kube already: give each Kube its own (load_client)")
        self._send = api_client.call_api
        api_client.call_api = self._call

    def _call(self, method: str, url: str, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        verb, resource = classify(method, url)
        exempt = resource in EXEMPT_RESOURCES
        if verb != "watch" and not exempt:
            self.limiter.acquire()
        mutating = method.upper() in MUTATING
        if mutating and not exempt and not self.fence():
            raise Fenced(f"{verb} {resource}: not sent, this replica may no longer hold the lease")
        with self._lock:
            self.requests += 1
            self.writes += mutating
            self.by_call[verb, resource] += 1
        if self.on_request is not None:
            self.on_request(verb, resource)
        if _request_timeout is None:
            _request_timeout = (
                (self.request_timeout[0], self.watch_read_timeout)
                if verb == "watch"
                else self.request_timeout
            )
        if not mutating or exempt:
            return self._send(method, url, *args, _request_timeout=_request_timeout, **kwargs)
        _sending.fence = self.fence
        try:
            return self._send(method, url, *args, _request_timeout=_request_timeout, **kwargs)
        finally:
            _sending.fence = None

    def stop_watches(self) -> None:
        """End every watch now running (from any thread): each raises or ends in its own thread."""
        with self._lock:
            running = list(self._watches)
        for w in running:
            w.stop()

    # FineTuneJobs ------------------------------------------------------------------------------------

    def get_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(  # type: ignore[no-any-return]
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the status subresource; the FineTuneJob as it is now (its new
        resourceVersion tells the cache that the event this write causes is our own)."""
        resp = self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            field_manager=FIELD_MANAGER,
            _preload_content=False,
        )
        return _json(resp)  # type: ignore[no-any-return]

    # Children ------------------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        read = {"PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim}[kind]
        try:
            return _json(read(name, namespace, _preload_content=False))  # type: ignore[no-any-return]
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def secret_exists(self, namespace: str, name: str) -> bool:
        """Whether the Secret exists, from its metadata alone (its data never reaches the operator)."""
        try:
            resp = self.core.read_namespaced_secret(
                name, namespace, _headers={"Accept": METADATA_ONLY}, _preload_content=False
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        # Discarded unread: even metadata may carry a Secret's data (kubectl apply's last-applied annotation).
        resp.drain_conn()
        return True

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """The end of a container's log: the last PROGRESS_TAIL_LINES lines, at most
        PROGRESS_TAIL_BYTES, within LOG_TIMEOUT_SECONDS."""
        resp = self.core.read_namespaced_pod_log(
            pod,
            namespace,
            container=container,
            tail_lines=PROGRESS_TAIL_LINES,
            limit_bytes=PROGRESS_TAIL_BYTES,
            _request_timeout=LOG_TIMEOUT_SECONDS,
            _preload_content=False,
        )
        return bytes(resp.data).decode("utf-8", errors="replace")

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; None when it already exists (creation is idempotent by name)."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "Job": self.batch.create_namespaced_job,
        }[kind]
        try:
            resp = create(ns, obj, field_manager=FIELD_MANAGER, _preload_content=False)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        return _json(resp)  # type: ignore[no-any-return]

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (lists, such as ownerReferences, are replaced whole); the object after."""
        call = {
            "Job": self.batch.patch_namespaced_job,
            "PersistentVolumeClaim": self.core.patch_namespaced_persistent_volume_claim,
        }[kind]
        resp = call(
            name,
            namespace,
            patch,
            field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
        return _json(resp)  # type: ignore[no-any-return]

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete, with the children (pods) going in the background; False when it was not there."""
        body = client.V1DeleteOptions(propagation_policy="Background")
        delete = {
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
            "PersistentVolumeClaim": self.core.delete_namespaced_persistent_volume_claim,
            "Job": self.batch.delete_namespaced_job,
        }[kind]
        try:
            delete(name, namespace, body=body, _preload_content=False).drain_conn()
        except ApiException as e:
            if e.status != 404:
                raise
            return False
        return True

    def event(
        self,
        ftj: dict[str, Any],
        type_: str,
        reason: str,
        message: str,
        now: str,
        *,
        name: str | None = None,
    ) -> bool:
        """Record an Event on `ftj`; False when `name` (see `event_name`) was recorded already (409), so
        an Event retried after a crash or a lost reply is never doubled."""
        meta = ftj["metadata"]
        metadata = {"name": name} if name else {"generateName": f"{meta['name']}."}
        body = {
            "metadata": {**metadata, "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": ftj["apiVersion"],
                "kind": ftj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False).drain_conn()
        except ApiException as e:
            if name and e.status == 409:
                return False
            raise
        return True

    # Lists and watches, for the cache ------------------------------------------------------------------

    def _lister(self, kind: str, namespace: str | None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The list function for `kind` (FineTuneJob, Job, Pod, PersistentVolumeClaim, ConfigMap) in
        `namespace`, or in all namespaces when it is None; watches use the same with watch=true."""
        if kind == "FineTuneJob":
            if namespace:
                return self.custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, PLURAL)
            return self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        namespaced, everywhere = {
            "Job": (self.batch.list_namespaced_job, self.batch.list_job_for_all_namespaces),
            "Pod": (self.core.list_namespaced_pod, self.core.list_pod_for_all_namespaces),
            "PersistentVolumeClaim": (
                self.core.list_namespaced_persistent_volume_claim,
                self.core.list_persistent_volume_claim_for_all_namespaces,
            ),
            "ConfigMap": (self.core.list_namespaced_config_map, self.core.list_config_map_for_all_namespaces),
        }[kind]
        return (namespaced, (namespace,)) if namespace else (everywhere, ())

    @staticmethod
    def _selectors(selector: str | None, field_selector: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if selector:
            kwargs["label_selector"] = selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        return kwargs

    def list_page(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        *,
        limit: int = PAGE_LIMIT,
        continue_: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None, str]:
        """One page of a list: (items, the continue token or None after the last page, resourceVersion).
        Every page of one list carries the resourceVersion of the same snapshot: watch from the last
        page's. An expired continue token is ApiException 410: start the list again."""
        func, args = self._lister(kind, namespace)
        kwargs = self._selectors(selector, field_selector)
        if limit > 0:
            kwargs["limit"] = limit
        if continue_:
            kwargs["_continue"] = continue_
        body = _json(func(*args, _preload_content=False, **kwargs))
        meta = body.get("metadata") or {}
        return (
            list(body.get("items") or []),
            meta.get("continue") or None,
            str(meta.get("resourceVersion", "")),
        )

    def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        resource_version: str,
        *,
        field_selector: str | None = None,
        timeout_seconds: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Raw watch events ({"type", "object"}, BOOKMARK included) from `resource_version` on, until the
        API server ends the watch (after `timeout_seconds`, default drawn from WATCH_TIMEOUT_MIN..MAX).
        Raises ApiException (410 Gone: list again) or an urllib3 error, ReadTimeoutError when the
        connection stays silent past `watch_read_timeout`."""
        kwargs = self._selectors(selector, field_selector)
        kwargs.update(
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds or random.randint(WATCH_TIMEOUT_MIN, WATCH_TIMEOUT_MAX),
            _request_timeout=(self.request_timeout[0], self.watch_read_timeout),
        )
        func, args = self._lister(kind, namespace)
        w = _RawWatch()
        with self._lock:
            self._watches.add(w)
        events = w.stream(func, *args, **kwargs)
        try:
            for event in events:
                yield {"type": event["type"], "object": event["raw_object"]}
        finally:
            with self._lock:
                self._watches.discard(w)
            w.stop()
            events.close()
