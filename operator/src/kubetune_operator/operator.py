"""`kubetune operator`: keeps FineTuneJobs and their Jobs, Pods and claims in a cache, and reconciles them.

Informers (kubetune_operator.cache) list and watch, keep the objects in memory and turn each change
into the key (namespace, name) of the FineTuneJob it concerns; workers run `Reconciler.reconcile` for one
key at a time, reading from the cache. A failed pass is retried with back-off; one bad object never
stops the others. A pass asks to be looked at again only while time matters (a running job, a wait with
a deadline): the work queue keeps one timer per key, and such a pass reads the cache only.

The informers run on every replica, so a standby's cache is warm when it takes over; workers run only
while this replica leads (--leader-elect), and every write is fenced by the lease (Kube.fence).
Ready: the caches are synced. Alive: every thread runs, and no watch has been silent for longer than
--watch-stall-seconds (a frozen connection then ends with a restart, not with a stuck operator).

With a policy ConfigMap (`--policy-configmap NS/NAME`, kubetune.policy), one more informer keeps its limits
for the reconciler, which checks every new run against them; when they change, the FineTuneJobs they
stopped (PolicyViolation, PolicyUnavailable) are looked at again. Workers start once it has been read.

Before a GPU run's Job is created, kubetune_operator.fit checks that it fits its GPU's memory (`Unfit`
otherwise; --no-fit-check turns it off); a model's config.json is fetched in the background, and its
arrival wakes the FineTuneJobs that waited for it.

Start-up errors (a busy or malformed --health-addr / --metrics-addr, a bad --policy-configmap, a
kubeconfig that cannot be loaded) are one line and exit code 2, before any request to a cluster (`main`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from kubetune.contract import LABEL_JOB
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
from kubetune_operator.cache import DEFAULT_WATCH_STALL_SECONDS, Cache, Informer, Key
from kubetune_operator.fit import FitChecker
from kubetune_operator.kube import DEFAULT_BURST, DEFAULT_QPS, Fenced, Kube, describe_error, is_status
from kubetune_operator.leader import LeaderElector
from kubetune_operator.plan import DEFAULT_IMAGE_PULL_GRACE_SECONDS
from kubetune_operator.queue import WorkQueue
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.serve import AddrError, Metrics, health_server, parse_addr, resolve, start
from kubetune_operator.status import job_finished

log = logging.getLogger("kubetune.operator")

# Passes in parallel. Each pass reads the cache only, so a worker mostly waits on its writes: enough
# workers to keep QPS busy on 2 cores (bench/operator_scale.py), few enough that the GIL is not the queue.
DEFAULT_WORKERS = 16
# Exit code of a start-up error (a flag that cannot work): the operator never started.
EXIT_USAGE = 2


class Operator:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str | None = None,
        workers: int = DEFAULT_WORKERS,
        image: str | None = None,
        image_pull_grace: float = DEFAULT_IMAGE_PULL_GRACE_SECONDS,
        secret_precheck: bool = True,
        policy_configmap: tuple[str, str] | None = None,
        watch_stall_seconds: float = DEFAULT_WATCH_STALL_SECONDS,
        fit_check: bool = True,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.workers = workers
        self.watch_stall_seconds = watch_stall_seconds
        # The policy ConfigMap (namespace, name), its limits as last read (or why they cannot be), and
        # whether it has been read once: workers wait for that, so no pass decides without the limits.
        self.policy_configmap = policy_configmap
        self._policy: Limits | str = "the policy ConfigMap has not been read yet"
        self._policy_read = threading.Event()
        self.cache = Cache(kube, namespace, handler=self._changed)
        self.informers: list[Informer] = list(self.cache.informers.values())
        if policy_configmap is None:
            self._policy_read.set()
        else:
            ns, name = policy_configmap
            # Listed and watched by name (a metadata.name field selector), so that RBAC can grant list
            # and watch on that one object (resourceNames).
            self._policy_informer = Informer(
                kube,
                "ConfigMap",
                namespace=ns,
                field_selector=f"metadata.name={name}",
                handler=lambda _kind, type_, _old, new: self._set_policy(new),
                on_listed=lambda: self._set_policy(self._policy_informer.get(ns, name)),
                on_error=self._policy_failed,
            )
            self.informers.append(self._policy_informer)
        # Whether a new GPU run fits its GPU: a fetch of a model's config.json that ends wakes the
        # FineTuneJobs that waited for it.
        self.fit = FitChecker(kube, on_ready=self._fit_ready) if fit_check else None
        self.reconciler = Reconciler(
            kube,
            self.cache,
            image=image,
            image_pull_grace=image_pull_grace,
            secret_precheck=secret_precheck,
            policy=(lambda: self._policy) if policy_configmap is not None else None,
            fit=self.fit,
        )
        self.queue = WorkQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started: set[str] = set()
        self.reconciles = 0
        # FineTuneJob changes that were this operator's own status write, and caused no pass.
        self.own_writes_skipped = 0
        self.metrics = Metrics(lambda: len(self.queue), self.cache.ftjs)
        kube.on_request = self.metrics.request

    # Lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Operator:
        """The informers and the workers (without leader election)."""
        self.start_informers()
        self.start_workers()
        return self

    def start_informers(self) -> None:
        if "informers" in self._started:
            return
        self._started.add("informers")
        for informer in self.informers:
            self._spawn(f"watch-{informer.kind}", informer.run, self._stop)

    def start_workers(self) -> None:
        if "workers" in self._started:
            return
        self._started.add("workers")
        for i in range(self.workers):
            self._spawn(f"worker-{i}", self._work)
        log.info("operator started (namespace=%s, workers=%d)", self.namespace or "<all>", self.workers)

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    def stalled(self) -> list[str]:
        """The kinds whose watch has made no progress for longer than watch_stall_seconds."""
        now = time.monotonic()
        return [i.kind for i in self.informers if now - i.last_progress > self.watch_stall_seconds]

    def alive(self) -> bool:
        """Every thread that was started still runs, and every watch makes progress."""
        if self._stop.is_set() or not all(t.is_alive() for t in self._threads):
            return False
        stalled = self.stalled()
        if stalled:
            log.warning(
                "no progress from the %s watch for over %.0f s: not healthy",
                ", ".join(stalled),
                self.watch_stall_seconds,
            )
        return not stalled

    def wait_synced(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in self.informers)

    def stop(self) -> None:
        self._stop.set()
        self.queue.shutdown()
        self.cache.stop()  # ends the watches now, wherever they wait
        if self.fit is not None:
            self.fit.stop()
        # Workers finish their current pass.
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
                # A standby keeps its cache warm: it is ready when synced, alive while its watches work.
                servers.append(("health", health_server(health_addr, alive=self.alive, ready=self.synced)))
        except AddrError:
            for _, server in servers:
                server.server_close()
            raise
        for name, server in servers:
            start(server, name)
            log.info("%s on port %d", name, server.server_address[1])
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            self.start_informers()
            if elector is None:
                self.start_workers()
            else:

                def started() -> None:
                    self.metrics.leader.set(1)
                    self.start_workers()

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

    # Changes: each one enqueues the FineTuneJob it concerns ---------------------------------------------

    def _changed(self, kind: str, type_: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        obj = new if new is not None else old
        assert obj is not None
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace")
        if kind == "FineTuneJob":
            key: Key = (str(namespace), str(meta.get("name")))
            if new is None:
                self.reconciler.forget(key)  # gone: its children are garbage-collected
                return
            if (
                old is not None
                and _same_but_status(old, new)
                and self.reconciler.wrote(key, new.get("status"))
            ):
                self.own_writes_skipped += 1  # our own status patch, seen again: nothing new to decide
                return
            name = meta.get("name")
        else:
            if (
                kind == "PersistentVolumeClaim"
                and old is not None
                and new is not None
                and _same_claim(old, new)
            ):
                return  # binding, resizing: decisions read a claim's labels, owner and deletion only
            name = (meta.get("labels") or {}).get(LABEL_JOB)
        # A Job that just finished is news a person waits for: ahead of any backlog (status lag).
        urgent = kind == "Job" and new is not None and job_finished(new) and not (old and job_finished(old))
        if namespace and name:
            self.queue.add((str(namespace), str(name)), urgent=urgent)

    def _fit_ready(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.queue.add(key)

    # The policy ConfigMap: its limits, kept for the reconciler ---------------------------------------

    def _policy_failed(self, e: Exception) -> None:
        assert self.policy_configmap is not None
        if is_status(e, 401, 403) or not self._policy_read.is_set():
            # Not allowed, or never read: no run may start on limits nobody has seen.
            self._set_state(unreadable_message(_source(*self.policy_configmap), describe_error(e)))

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
        # What the old limits stopped is looked at again (from the cache); other passes read the new
        # limits anyway.
        for item in self.cache.ftjs():
            if ((item.get("status") or {}).get("reason")) in (VIOLATION, UNAVAILABLE):
                meta = item["metadata"]
                self.queue.add((meta["namespace"], meta["name"]))

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
            except Fenced:
                # The lease may have passed on: this replica is stepping down, and writes nothing more.
                self.metrics.reconciles.labels("fenced").inc()
                self.queue.add_rate_limited(key)
                log.debug("reconcile stopped: not leading", extra={"namespace": namespace, "ftj": name})
            except Exception as e:
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.add_rate_limited(key)
                log.warning(
                    "reconcile failed: %s; retrying in %.1fs",
                    describe_error(e),
                    delay,
                    extra={"namespace": namespace, "ftj": name},
                )
            finally:
                self.reconciles += 1
                self.queue.done(key)


def _same_but_status(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two versions of an object differ in their status (and resourceVersion) only."""

    def rest(obj: dict[str, Any]) -> dict[str, Any]:
        meta = {
            k: v
            for k, v in (obj.get("metadata") or {}).items()
            if k not in ("resourceVersion", "managedFields")
        }
        return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}

    return rest(old) == rest(new)


def _same_claim(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a claim changed in nothing plan() reads: its labels, owners and deletion."""
    fields = ("labels", "ownerReferences", "deletionTimestamp")
    a, b = old.get("metadata") or {}, new.get("metadata") or {}
    return all(a.get(f) == b.get(f) for f in fields)


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
    qps: float = DEFAULT_QPS,
    burst: int = DEFAULT_BURST,
    watch_stall_seconds: float = DEFAULT_WATCH_STALL_SECONDS,
    fit_check: bool = True,
) -> int:
    """Run the operator until SIGTERM; the exit code. A start-up error is one log line and EXIT_USAGE,
    before any request to the API server: flags first, then both ports, then the client."""
    from kubetune_operator.kube import load_client

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
        kube = Kube(api_client, qps=qps, burst=burst)
        elector = None
        if leader_elect:
            import socket
            import uuid

            identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
            # The audit log tells the replicas apart by user agent.
            api_client.user_agent = f"kubetune-operator/{identity}"
            elector = LeaderElector(api_client, str(leader_election_namespace), identity)
            # Every write is checked against the lease first: a paused leader writes nothing once its
            # renew deadline has passed, before the lease can pass to another replica.
            kube.fence = elector.may_write
        op = Operator(
            kube,
            namespace=namespace,
            workers=workers,
            image=image,
            image_pull_grace=image_pull_grace,
            secret_precheck=secret_precheck,
            policy_configmap=policy,
            watch_stall_seconds=watch_stall_seconds,
            fit_check=fit_check,
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
    # The fit check's fetches (kubetune_operator.fit): huggingface_hub's retry warnings are noise, the
    # outcome is one line of ours.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # No secret in any log line, this logger's or a library's (kubernetes, urllib3), nor in a traceback.
    install_process_redaction(log.name)
