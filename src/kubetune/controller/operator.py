"""`kubetune operator`: watches FineTuneJobs and their Jobs and Pods, and reconciles them.

Watches only turn events into keys (namespace, name); workers run `Reconciler.reconcile` for one key at
a time. A failed pass is retried with back-off; one bad object never stops the others.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from kubetune.contract import LABEL_JOB, MANAGED_BY
from kubetune.controller.kube import Kube, is_status
from kubetune.controller.leader import LeaderElector
from kubetune.controller.plan import DEFAULT_IMAGE_PULL_GRACE_SECONDS
from kubetune.controller.queue import WorkQueue
from kubetune.controller.reconcile import Reconciler
from kubetune.controller.serve import Metrics, serve_health

log = logging.getLogger("kubetune.operator")

WATCH_TIMEOUT_SECONDS = 300
MANAGED = MANAGED_BY


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
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.workers = workers
        self.reconciler = Reconciler(
            kube, image=image, image_pull_grace=image_pull_grace, secret_precheck=secret_precheck
        )
        self.queue = WorkQueue()
        self.resync_seconds = resync_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.reconciles = 0
        self._synced = {kind: threading.Event() for kind in ("FineTuneJob", "Job", "Pod")}
        self.metrics = Metrics(lambda: kube.requests, lambda: len(self.queue))

    # Lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Operator:
        for kind in ("FineTuneJob", "Job", "Pod"):
            self._spawn(f"watch-{kind}", self._watch, kind)
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
        if metrics_addr:
            port = self.metrics.serve(metrics_addr)
            log.info("metrics on %s (port %d)", metrics_addr, port)
        if health_addr:
            # A standby replica is healthy and ready: it is doing its job, which is to wait.
            serve_health(
                health_addr,
                alive=lambda: (elector is not None and not elector.is_leader) or self.alive(),
                ready=lambda: (elector is not None and not elector.is_leader) or self.synced(),
            )
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

    def _watch(self, kind: str) -> None:
        selector = None if kind == "FineTuneJob" else MANAGED
        backoff = 1.0
        while not self._stop.is_set():
            try:
                listing = self.kube.list_raw(kind, self.namespace, selector)
                for item in listing.get("items") or []:
                    key = self._key(kind, item)
                    if key:
                        self.queue.add(key)
                self._synced[kind].set()
                rv = listing["metadata"]["resourceVersion"]
                relist_at = time.monotonic() + self.resync_seconds
                while not self._stop.is_set() and time.monotonic() < relist_at:
                    for event in self.kube.stream(kind, self.namespace, selector, rv, WATCH_TIMEOUT_SECONDS):
                        if self._stop.is_set():
                            return
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise _Gone() if obj.get("code") == 410 else RuntimeError(json.dumps(obj)[:300])
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if event["type"] == "BOOKMARK":
                            continue
                        key = self._key(kind, obj)
                        if key:
                            self.queue.add(key)
                backoff = 1.0
            except _Gone:
                log.info("%s watch expired; relisting", kind)
            except Exception as e:
                if is_status(e, 410):
                    log.info("%s watch expired; relisting", kind)
                    continue
                if self._stop.is_set():
                    return
                log.warning("%s watch failed (%s); retrying in %.0fs", kind, str(e)[:200], backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)

    # Workers ------------------------------------------------------------------------------------------

    def _work(self) -> None:
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
