"""`kubetune operator`: watches FineTuneJobs and their Jobs and Pods, and reconciles them.

Watches only turn events into keys (namespace, name); workers run `Reconciler.reconcile` for one key at
a time. A failed pass is retried with back-off; one bad object never stops the others.

With a policy ConfigMap (`--policy-configmap NS/NAME`, kubetune.policy), one more watch keeps its limits
for the reconciler, which checks every new run against them; when they change, the FineTuneJobs they
stopped (PolicyViolation, PolicyUnavailable) are looked at again. Workers start once it has been read.

Start-up errors (a busy or malformed --health-addr / --metrics-addr, a bad --policy-configmap, a
kubeconfig that cannot be loaded) are one line and exit code 2, before any request to a cluster (`main`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubetune.contract import LABEL_JOB, MANAGED_BY
from kubetune.controller.kube import Kube, is_status
from kubetune.controller.leader import LeaderElector
from kubetune.controller.plan import DEFAULT_IMAGE_PULL_GRACE_SECONDS
from kubetune.controller.queue import WorkQueue
from kubetune.controller.reconcile import Reconciler
from kubetune.controller.serve import AddrError, Metrics, health_server, parse_addr, resolve, start
from kubetune.policy import (
    UNAVAILABLE,
    VIOLATION,
    Limits,
    PolicyError,
    load,
    missing_message,
    unreadable_message,
)
from kubetune.redact import install_process_redaction

log = logging.getLogger("kubetune.operator")

WATCH_TIMEOUT_SECONDS = 300
MANAGED = MANAGED_BY
# Exit code of a start-up error (a flag that cannot work): the operator never started.
EXIT_USAGE = 2


class Operator:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str | None = None,
        workers: int = 4,
        image: str | None = None,
        resync_seconds: float = 600.0,
        image_pull_grace: float = DEFAULT_IMAGE_PULL_GRACE_SECONDS,
        secret_precheck: bool = True,
        policy_configmap: tuple[str, str] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.workers = workers
        # The policy ConfigMap (namespace, name), its limits as last read (or why they cannot be), and
        # whether it has been read once: workers wait for that, so no pass decides without the limits.
        self.policy_configmap = policy_configmap
        self._policy: Limits | str = "the policy ConfigMap has not been read yet"
        self._policy_read = threading.Event()
        if policy_configmap is None:
            self._policy_read.set()
        self.reconciler = Reconciler(
            kube,
            image=image,
            image_pull_grace=image_pull_grace,
            secret_precheck=secret_precheck,
            policy=(lambda: self._policy) if policy_configmap is not None else None,
        )
        self.queue = WorkQueue()
        self.resync_seconds = resync_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.reconciles = 0
        kinds = ("FineTuneJob", "Job", "Pod", *(("Policy",) if policy_configmap is not None else ()))
        self._synced = {kind: threading.Event() for kind in kinds}
        self.metrics = Metrics(lambda: kube.requests, lambda: len(self.queue))

    # Lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Operator:
        for kind in ("FineTuneJob", "Job", "Pod"):
            self._spawn(f"watch-{kind}", self._watch, kind)
        if self.policy_configmap is not None:
            self._spawn("watch-Policy", self._watch_policy, *self.policy_configmap)
        for i in range(self.workers):
            self._spawn(f"worker-{i}", self._work)
        log.info("operator started (namespace=%s, workers=%d)", self.namespace or "<all>", self.workers)
        return self

    def synced(self) -> bool:
        return all(e.is_set() for e in self._synced.values())

    def alive(self) -> bool:
        """Every watch and worker thread that was started is still running."""
        return not self._stop.is_set() and all(t.is_alive() for t in self._threads)

    def wait_synced(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self._synced.values())

    def stop(self) -> None:
        self._stop.set()
        self.queue.shutdown()
        # Workers finish their current pass; watch threads may sit in a long read and are daemons.
        for t in self._threads:
            if t.name.startswith("worker-"):
                t.join(timeout=10)

    def run_forever(
        self,
        *,
        health_addr: str | None = None,
        metrics_addr: str | None = None,
        elector: LeaderElector | None = None,
    ) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (1 when leadership was lost)."""
        import signal

        lost = threading.Event()
        # Both ports are bound before anything else happens (AddrError, one line, when one cannot be).
        servers = []
        try:
            if metrics_addr:
                servers.append(("metrics", self.metrics.listen(metrics_addr)))
            if health_addr:
                # A standby replica is healthy and ready: it is doing its job, which is to wait.
                servers.append(
                    (
                        "health",
                        health_server(
                            health_addr,
                            alive=lambda: (elector is not None and not elector.is_leader) or self.alive(),
                            ready=lambda: (elector is not None and not elector.is_leader) or self.synced(),
                        ),
                    )
                )
        except AddrError:
            for _, server in servers:
                server.server_close()
            raise
        for name, server in servers:
            start(server, name)
            log.info("%s on port %d", name, server.server_address[1])
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            if elector is None:
                self.start()
            else:

                def started() -> None:
                    self.metrics.leader.set(1)
                    self.start()

                def stopped() -> None:
                    self.metrics.leader.set(0)
                    lost.set()
                    self._stop.set()

                self._spawn("leader-election", elector.run, started, stopped, self._stop)
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            if elector is not None and not lost.is_set():
                elector.release()
        return 1 if lost.is_set() else 0

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # Watches: list, then watch from the list's resourceVersion; relist on 410 Gone or errors ----------

    def _key(self, kind: str, obj: dict[str, Any]) -> tuple[str, str] | None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace")
        name = meta.get("name") if kind == "FineTuneJob" else (meta.get("labels") or {}).get(LABEL_JOB)
        return (str(namespace), str(name)) if namespace and name else None

    def _list_watch(
        self,
        kind: str,
        list_: Callable[[], dict[str, Any]],
        stream: Callable[[str], Iterable[dict[str, Any]]],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        on_error: Callable[[Exception], None] = lambda e: None,
    ) -> None:
        """List, then watch from the list's resourceVersion until the next resync; relist on 410 Gone,
        and after any other error with back-off (1 s doubling to 60 s)."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                listing = list_()
                on_list(listing.get("items") or [])
                rv = listing["metadata"]["resourceVersion"]
                relist_at = time.monotonic() + self.resync_seconds
                while not self._stop.is_set() and time.monotonic() < relist_at:
                    for event in stream(rv):
                        if self._stop.is_set():
                            return
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise _Gone() if obj.get("code") == 410 else RuntimeError(json.dumps(obj)[:300])
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if event["type"] != "BOOKMARK":
                            on_event(event["type"], obj)
                backoff = 1.0
            except _Gone:
                log.info("%s watch expired; relisting", kind)
            except Exception as e:
                if is_status(e, 410):
                    log.info("%s watch expired; relisting", kind)
                    continue
                if self._stop.is_set():
                    return
                on_error(e)
                log.warning("%s watch failed (%s); retrying in %.0fs", kind, str(e)[:200], backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)

    def _watch(self, kind: str) -> None:
        """FineTuneJobs and their children: every change enqueues the FineTuneJob it belongs to."""
        selector = None if kind == "FineTuneJob" else MANAGED

        def enqueue(obj: dict[str, Any]) -> None:
            key = self._key(kind, obj)
            if key:
                self.queue.add(key)

        def listed(items: list[dict[str, Any]]) -> None:
            for item in items:
                enqueue(item)
            self._synced[kind].set()

        self._list_watch(
            kind,
            lambda: self.kube.list_raw(kind, self.namespace, selector),
            lambda rv: self.kube.stream(kind, self.namespace, selector, rv, WATCH_TIMEOUT_SECONDS),
            listed,
            lambda _type, obj: enqueue(obj),
        )

    # The policy ConfigMap: its limits, kept for the reconciler ---------------------------------------

    def _watch_policy(self, namespace: str, name: str) -> None:
        field = f"metadata.name={name}"

        def listed(items: list[dict[str, Any]]) -> None:
            self._set_policy(items[0] if items else None)
            self._synced["Policy"].set()

        def changed(type_: str, obj: dict[str, Any]) -> None:
            self._set_policy(None if type_ == "DELETED" else obj)

        def failed(e: Exception) -> None:
            if is_status(e, 401, 403) or not self._policy_read.is_set():
                # Not allowed, or never read: no run may start on limits nobody has seen.
                self._set_state(unreadable_message(_source(namespace, name), str(e).splitlines()[0][:200]))

        self._list_watch(
            "policy ConfigMap",
            lambda: self.kube.list_config_map(namespace, name),
            lambda rv: self.kube.stream("ConfigMap", namespace, None, rv, WATCH_TIMEOUT_SECONDS, field),
            listed,
            changed,
            failed,
        )

    def _set_policy(self, obj: dict[str, Any] | None) -> None:
        assert self.policy_configmap is not None
        source = _source(*self.policy_configmap)
        state: Limits | str
        if obj is None:
            state = missing_message(source)
        else:
            try:
                state = load(obj.get("data"), source)
            except PolicyError as e:
                state = str(e)
        self._set_state(state)

    def _set_state(self, state: Limits | str) -> None:
        changed, first = state != self._policy, not self._policy_read.is_set()
        self._policy = state
        self._policy_read.set()
        if not changed:
            return
        if isinstance(state, str):
            log.warning("no run starts: %s", state)
        else:
            log.info("policy: %s", state)
        if first:
            return
        # What the old limits stopped is looked at again; other passes read the new ones anyway. Best
        # effort: the FineTuneJob watch's resync looks at every object again in any case.
        try:
            listing = self.kube.list_raw("FineTuneJob", self.namespace, None)
        except Exception as e:
            log.warning("could not list FineTuneJobs after the policy changed: %s", str(e)[:200])
            return
        for item in listing.get("items") or []:
            if ((item.get("status") or {}).get("reason")) in (VIOLATION, UNAVAILABLE):
                key = self._key("FineTuneJob", item)
                if key:
                    self.queue.add(key)

    # Workers ------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._policy_read.wait(1.0):
            if self._stop.is_set():
                return
        while True:
            item = self.queue.get()
            if item is None:
                return
            key: tuple[str, str] = item  # type: ignore[assignment]
            namespace, name = key
            try:
                with self.metrics.duration.time():
                    again = self.reconciler.reconcile(namespace, name)
                self.metrics.reconciles.labels("ok").inc()
                self.queue.forget(key)
                if again is not None:
                    self.queue.add_after(key, again)
            except Exception as e:
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.add_rate_limited(key)
                log.warning(
                    "reconcile failed: %s; retrying in %.1fs",
                    str(e)[:300],
                    delay,
                    extra={"namespace": namespace, "ftj": name},
                )
            finally:
                self.reconciles += 1
                self.queue.done(key)


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


def _source(namespace: str, name: str) -> str:
    return f"ConfigMap {namespace}/{name}"


# --------------------------------------------------------------------------------------------------
# `kubetune operator`
# --------------------------------------------------------------------------------------------------


class StartupError(Exception):
    """A flag the operator cannot start with; the message is one line that names it."""


def parse_configmap_ref(ref: str, flag: str = "--policy-configmap") -> tuple[str, str]:
    namespace, sep, name = ref.partition("/")
    dns = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    if not sep or not re.fullmatch(dns, namespace) or not re.fullmatch(rf"{dns}(\.{dns})*", name):
        raise StartupError(
            f"{flag} {ref!r}: expected NAMESPACE/NAME of a ConfigMap, e.g. kubetune-system/kubetune-policy"
        )
    return namespace, name


def main(
    *,
    kubeconfig: str | None,
    namespace: str | None,
    workers: int,
    image: str | None,
    log_format: str,
    health_addr: str | None,
    metrics_addr: str | None,
    leader_elect: bool,
    leader_election_namespace: str | None,
    image_pull_grace: float,
    secret_precheck: bool,
    policy_configmap: str | None,
) -> int:
    """Run the operator until SIGTERM; the exit code. A start-up error is one log line and EXIT_USAGE,
    before any request to the API server: flags first, then both ports, then the client."""
    from kubetune.controller.kube import load_client

    setup_logging(log_format)
    try:
        policy = parse_configmap_ref(policy_configmap) if policy_configmap else None
        addrs = [(f, a) for f, a in (("--metrics-addr", metrics_addr), ("--health-addr", health_addr)) if a]
        for flag, addr in addrs:
            resolve(addr, flag)
        ports = {parse_addr(a, f)[1] for f, a in addrs}
        if len(addrs) == 2 and len(ports) == 1 and 0 not in ports:
            raise StartupError(
                f"--metrics-addr {metrics_addr} and --health-addr {health_addr} use the same port "
                f"{ports.pop()}: give each a port of its own"
            )
        if leader_elect and not leader_election_namespace:
            raise StartupError("--leader-elect needs --leader-election-namespace (or $POD_NAMESPACE)")
        try:
            api_client = load_client(kubeconfig)
        except Exception as e:  # the client's own errors: no kubeconfig, a malformed one, no in-cluster token
            where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster config or ~/.kube/config"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise StartupError(f"cannot load the cluster credentials from {where}: {first}") from None
        elector = None
        if leader_elect:
            import socket
            import uuid

            identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
            elector = LeaderElector(api_client, str(leader_election_namespace), identity)
        op = Operator(
            Kube(api_client),
            namespace=namespace,
            workers=workers,
            image=image,
            image_pull_grace=image_pull_grace,
            secret_precheck=secret_precheck,
            policy_configmap=policy,
        )
        return op.run_forever(health_addr=health_addr, metrics_addr=metrics_addr, elector=elector)
    except (StartupError, AddrError) as e:
        log.error("cannot start: %s", e)
        return EXIT_USAGE


class JsonFormatter(logging.Formatter):
    """One JSON object per line, naming the FineTuneJob when the record is about one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key in ("namespace", "ftj"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        who = f"{record.namespace}/{record.ftj} " if hasattr(record, "ftj") else ""  # type: ignore[attr-defined]
        return (
            f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7} {who}{record.getMessage()}"
        )


def setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # No secret in any log line, this logger's or a library's (kubernetes, urllib3), nor in a traceback.
    install_process_redaction(log.name)
