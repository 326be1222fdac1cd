"""An informer-style cache: one list+watch per kind, kept in memory, so that reconcile reads nothing.

Each `Informer` lists its kind in pages (PAGE_SIZE objects, continue tokens), then watches from the
list's resourceVersion with bookmarks, which move its resume point on while nothing changes. A watch
that expired (410 Gone) is followed by a relist that is diffed against the store: vanished objects are
handed on as deletions, unchanged ones not at all. Any other error is retried with back-off (1 s
doubling to 30 s), logged once per outage, with one line when it is over. There is no periodic relist:
the watch is the source of truth, and the operator's timed passes read the store only.

The stream is the kubernetes client's `watch.Watch` (kube.Kube.watch); this module is the glue. Objects are
kept as the API server sent them (plain dicts), less their managedFields and kubectl's last-applied
copy of the spec, which nothing here reads. Children (Jobs, Pods, claims) are indexed by the
FineTuneJob they belong to (its label), so "which children do I have" is a dict lookup.

`last_progress` is when an informer last heard from the API server (a page, an event, a bookmark, a
watch (re)started): /healthz fails when one falls silent for longer than --watch-stall-seconds, so a
frozen connection ends with a restart rather than an operator that looks alive and does nothing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.rest import ApiException
from urllib3.exceptions import ReadTimeoutError

from kubetune.contract import LABEL_JOB, LABEL_RUN, MANAGED_BY
from kubetune_operator.kube import WATCH_READ_TIMEOUT, Kube, describe_error

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]
# handler(kind, type, old, new): ADDED (old None), MODIFIED, DELETED (new None).
Handler = Callable[[str, str, dict[str, Any] | None, dict[str, Any] | None], None]

PAGE_SIZE = 500
# /healthz fails when an informer has heard nothing for this long. A watch hears a bookmark about once
# a minute when nothing changes; a silent connection ends with a read timeout (kube.WATCH_READ_TIMEOUT)
# and a new watch, whose first bookmark may take another minute.
DEFAULT_WATCH_STALL_SECONDS = WATCH_READ_TIMEOUT + 60.0
BACKOFF_MIN_SECONDS, BACKOFF_MAX_SECONDS = 1.0, 30.0
KINDS = ("FineTuneJob", "Job", "Pod", "PersistentVolumeClaim")
# Dropped from every stored object: large, and read by nobody here.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def slim(obj: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """The object as stored (in place): without managedFields and the last-applied annotation; a
    Pod without its spec (decisions read its metadata and status) and a Job without its pod template
    (decisions read the Job's own fields and status). A list's items carry no kind: `kind` says it."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED in annotations:
            del annotations[LAST_APPLIED]
    kind = kind or obj.get("kind")
    spec = obj.get("spec")
    if isinstance(spec, dict):
        if kind == "Pod":
            obj["spec"] = {k: spec[k] for k in ("nodeName",) if k in spec}
        elif kind == "Job":
            spec.pop("template", None)
    return obj


def newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether `a` is a later version than `b` of the same object. resourceVersions are opaque, but
    those of one object only grow: compared as numbers when both are, else `a` wins."""
    ra = (a.get("metadata") or {}).get("resourceVersion")
    rb = (b.get("metadata") or {}).get("resourceVersion")
    try:
        return int(ra) >= int(rb)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True


class _Gone(Exception):
    """The resourceVersion is too old (410 Gone): list again."""


class Informer:
    """One kind's list+watch and its store; `run` until `stop` is set."""

    def __init__(
        self,
        kube: Kube,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        handler: Handler | None = None,
        on_error: Callable[[Exception], None] | None = None,
        on_listed: Callable[[], None] | None = None,
        index_label: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.kind = kube, kind
        self.namespace = namespace
        self.label_selector, self.field_selector = label_selector, field_selector
        self.handler = handler
        self.on_error = on_error
        self.on_listed = on_listed
        self.index_label = index_label
        self.clock = clock
        self._lock = threading.Lock()
        self._store: dict[Key, dict[str, Any]] = {}
        self._index: dict[Key, set[Key]] = {}
        self.synced = threading.Event()
        self.last_progress = clock()
        self._failing_since: float | None = None

    # Reading ------------------------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._store.get((namespace, name))

    def indexed(self, namespace: str, value: str) -> list[dict[str, Any]]:
        """The objects whose index label is `value`, in `namespace`, by name."""
        with self._lock:
            keys = sorted(self._index.get((namespace, value), ()))
            return [self._store[k] for k in keys]

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._store.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._store)

    # Writing: from the API server's answers, the watch, a relist --------------------------------------

    def store(self, obj: dict[str, Any]) -> None:
        """Keep an object the API server returned to a write (a create, a patch), so that the next pass
        sees it even when the watch has not delivered it yet. No handler: it is our own doing."""
        obj = slim(obj, self.kind)
        key = key_of(obj)
        with self._lock:
            old = self._store.get(key)
            if old is None or newer(obj, old):
                self._put(key, old, obj)

    def apply(self, type_: str, obj: dict[str, Any]) -> None:
        """One watch event: into the store, then to the handler."""
        obj = slim(obj, self.kind)
        key = key_of(obj)
        new: dict[str, Any] | None
        with self._lock:
            old = self._store.get(key)
            if type_ == "DELETED":
                if old is None:
                    return
                self._put(key, old, None)
                new = None
            else:
                if old is not None and not newer(obj, old):
                    return  # older than what a write returned already
                self._put(key, old, obj)
                new = obj
        self._handle("ADDED" if old is None else type_, old, new)

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        """A full listing: the store becomes it, and what changed goes to the handler (what vanished
        as a deletion, what did not change not at all)."""
        listed = {key_of(o): slim(o, self.kind) for o in items}
        with self._lock:
            before = self._store
            self._store = {}
            self._index = {}
            for key, obj in listed.items():
                self._put(key, None, obj)
        for key, gone in before.items():
            if key not in listed:
                self._handle("DELETED", gone, None)
        for key, obj in listed.items():
            was = before.get(key)
            if was is None:
                self._handle("ADDED", None, obj)
            elif (was.get("metadata") or {}).get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._handle("MODIFIED", was, obj)

    def _put(self, key: Key, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if self.index_label is not None:
            if old is not None:
                owner = (key[0], (old["metadata"].get("labels") or {}).get(self.index_label, ""))
                keys = self._index.get(owner)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._index[owner]
            if new is not None:
                owner = (key[0], (new["metadata"].get("labels") or {}).get(self.index_label, ""))
                self._index.setdefault(owner, set()).add(key)
        if new is None:
            self._store.pop(key, None)
        else:
            self._store[key] = new

    def _handle(self, type_: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if self.handler is None:
            return
        try:
            self.handler(self.kind, type_, old, new)
        except Exception:  # a handler's bug must not end the watch
            log.exception("%s %s handler failed", self.kind, type_)

    # The loop -----------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        backoff = BACKOFF_MIN_SECONDS
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    rv = self._list(stop)
                    self.synced.set()
                began = self.clock()
                rv = self._stream(rv, stop)
                backoff = BACKOFF_MIN_SECONDS
                if self.clock() - began < BACKOFF_MIN_SECONDS:
                    stop.wait(BACKOFF_MIN_SECONDS)  # a watch that ends at once, again and again: no busy loop
            except _Gone:
                log.info("%s watch expired (410 Gone); relisting", self.kind)
                rv = None
            except Exception as e:
                if stop.is_set():
                    return
                if isinstance(e, ApiException) and e.status == 410:
                    log.info("%s watch expired (410 Gone); relisting", self.kind)
                    rv = None
                    continue
                if rv is not None and isinstance(e, ReadTimeoutError | TimeoutError):
                    # Not even a bookmark for a whole read timeout: this connection is dead. A new
                    # watch from the same point (no progress is recorded until it hears something).
                    log.info(
                        "%s watch heard nothing for too long (%s); watching again",
                        self.kind,
                        describe_error(e),
                    )
                    continue
                self._failed(e, backoff)
                stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    def _progress(self) -> None:
        self.last_progress = self.clock()
        if self._failing_since is not None:
            log.info("%s watch recovered after %.0f s", self.kind, self.clock() - self._failing_since)
            self._failing_since = None

    def _failed(self, e: Exception, backoff: float) -> None:
        if self.on_error is not None:
            self.on_error(e)
        if self._failing_since is None:
            self._failing_since = self.clock()
            log.warning(
                "%s watch failed (%s); retrying with back-off (1 s to %.0f s)",
                self.kind,
                describe_error(e),
                BACKOFF_MAX_SECONDS,
            )
        else:
            log.debug("%s watch failed again (%s); retrying in %.0f s", self.kind, describe_error(e), backoff)

    def _list(self, stop: threading.Event) -> str:
        """List every page; the store becomes the listing. Returns its resourceVersion."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            try:
                page, token, rv = self.kube.list_page(
                    self.kind,
                    self.namespace,
                    self.label_selector,
                    limit=PAGE_SIZE,
                    continue_=token,
                    field_selector=self.field_selector,
                )
            except ApiException as e:
                if e.status == 410 and token:  # the continue token expired: from the start
                    items, token = [], None
                    continue
                raise
            self._progress()
            items += page
            if not token or stop.is_set():
                self.replace(items)
                if self.on_listed is not None:
                    self.on_listed()
                return rv

    def _stream(self, rv: str, stop: threading.Event) -> str:
        """Watch from `rv` until the API server ends the watch; returns the resourceVersion to resume
        from (the last event's or bookmark's)."""
        events = self.kube.watch(
            self.kind, self.namespace, self.label_selector, rv, field_selector=self.field_selector
        )
        try:
            for event in events:
                if stop.is_set():
                    break
                type_, obj = event["type"], event["object"]
                if type_ == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
                self._progress()
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if type_ != "BOOKMARK":
                    self.apply(type_, obj)
            else:
                self._progress()  # the API server ended the watch on time: the connection works
        finally:
            close = getattr(events, "close", None)  # a generator: ends its watch now
            if close is not None:
                close()
        return rv


class Cache:
    """The informers the operator reads from: FineTuneJobs (all, or one namespace), and the Jobs, Pods
    and claims kubetune made (MANAGED_BY), indexed by their FineTuneJob."""

    def __init__(self, kube: Kube, namespace: str | None = None, handler: Handler | None = None) -> None:
        self.kube = kube
        self.informers = {
            kind: Informer(
                kube,
                kind,
                namespace=namespace,
                label_selector=None if kind == "FineTuneJob" else MANAGED_BY,
                handler=handler,
                index_label=None if kind == "FineTuneJob" else LABEL_JOB,
            )
            for kind in KINDS
        }

    def ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.informers["FineTuneJob"].get(namespace, name)

    def ftjs(self) -> list[dict[str, Any]]:
        return self.informers["FineTuneJob"].items()

    def jobs(self, namespace: str, ftj: str) -> list[dict[str, Any]]:
        return self.informers["Job"].indexed(namespace, ftj)

    def pods(self, namespace: str, ftj: str, run: str) -> list[dict[str, Any]]:
        pods = self.informers["Pod"].indexed(namespace, ftj)
        return [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_RUN) == run]

    def claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.informers["PersistentVolumeClaim"].get(namespace, name)

    def store(self, obj: dict[str, Any]) -> None:
        """Keep what a write returned (a kind the cache holds; others are ignored)."""
        informer = self.informers.get(str(obj.get("kind")))
        if informer is not None:
            informer.store(obj)

    def stop(self) -> None:
        """End the watches now (each informer's loop then sees its stop event)."""
        self.kube.stop_watches()

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in self.informers.values())

    def stalled(self, seconds: float) -> list[str]:
        """The kinds whose informer has heard nothing from the API server for longer than `seconds`."""
        return [k for k, i in self.informers.items() if i.clock() - i.last_progress > seconds]
