"""kube.py against a real API server: keepalive on the real sockets, lists across pages, Events
recorded once by name, the API server's own refusals in one line, and no watch or request that waits
for ever on a connection gone silent (tests/e2e/relay.py stops forwarding without closing)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from controlplane import ControlPlane, poll
from kubernetes.client.rest import ApiException
from relay import Relay

from kubetune_operator.kube import (
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    WATCH_READ_TIMEOUT,
    Kube,
    describe_error,
    event_name,
    load_client,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[Kube]:
    k = Kube(load_client(str(control_plane.kubeconfig), user_agent="kubetune-operator/e2e"))
    yield k
    k.stop_watches()
    k.api_client.close()


def job(namespace: str, name: str) -> dict[str, Any]:
    """A suspended Job: an object to list and watch, that never makes a pod."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubetune-test": "kube"}},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
            },
        },
    }


def pooled_sockets(kube: Kube) -> list[socket.socket]:
    manager = kube.api_client.rest_client.pool_manager
    sockets = []
    for key in manager.pools.keys():  # noqa: SIM118 (the container refuses plain iteration)
        pool = manager.pools[key]
        sockets += [c.sock for c in list(pool.pool.queue) if c is not None and c.sock is not None]
    return sockets


def test_every_connection_has_tcp_keepalive(kube: Kube, namespace: str) -> None:
    kube.list_page("Job", namespace, None)
    sockets = pooled_sockets(kube)
    assert sockets, "the request left no connection in the pool"
    for s in sockets:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT


def test_a_list_across_pages_then_a_watch_from_its_resource_version(kube: Kube, namespace: str) -> None:
    names = {f"job-{i:02d}" for i in range(30)}
    for name in sorted(names):
        assert kube.create(job(namespace, name)) is not None
    assert kube.create(job(namespace, "job-00")) is None  # already there: creation is idempotent

    pages: list[list[str]] = []
    versions: set[str] = set()
    token: str | None = None
    while True:
        items, token, rv = kube.list_page("Job", namespace, "kubetune-test=kube", limit=7, continue_=token)
        pages.append([i["metadata"]["name"] for i in items])
        versions.add(rv)
        if token is None:
            break
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert {n for p in pages for n in p} == names
    assert len(versions) == 1  # every page is of one snapshot: watch from its resourceVersion

    kube.create(job(namespace, "job-late"))
    added = []
    for event in kube.watch("Job", namespace, "kubetune-test=kube", versions.pop(), timeout_seconds=60):
        if event["type"] == "ADDED":  # (the job controller's MODIFIED events come in between)
            added.append(event["object"]["metadata"]["name"])
            if added[-1] == "job-late":
                break
    assert added == ["job-late"]  # nothing listed is added again, the new Job is
    assert kube.by_call[("list", "jobs")] == 5 and kube.by_call[("watch", "jobs")] == 1
    assert kube.by_call[("create", "jobs")] == 32 and kube.writes == 32


def test_a_named_event_is_recorded_once(kube: Kube, control_plane: ControlPlane, namespace: str) -> None:
    ftj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": namespace, "uid": "0c5e7a9e-0000-4000-8000-000000000001"},
    }
    name = event_name(ftj, "RunCreated", "demo-1")
    now = "2026-12-01T10:00:00Z"
    assert kube.event(ftj, "Normal", "RunCreated", "created demo-1", now, name=name) is True
    assert kube.event(ftj, "Normal", "RunCreated", "created demo-1", now, name=name) is False  # 409
    assert kube.event(ftj, "Normal", "Started", "unnamed", now) is True
    events = control_plane.get("events", f"--namespace={namespace}")["items"]
    assert sorted((e["reason"], e["metadata"]["name"] == name) for e in events) == [
        ("RunCreated", True),
        ("Started", False),
    ]


def test_a_refusal_is_one_line_with_the_api_servers_message(kube: Kube, namespace: str) -> None:
    kube.api_client.set_default_header("Impersonate-User", "nobody")
    with pytest.raises(ApiException) as info:
        kube.list_page("Job", namespace, None)
    assert describe_error(info.value) == (
        f'403 Forbidden: jobs.batch is forbidden: User "nobody" cannot list resource "jobs" '
        f'in API group "batch" in the namespace "{namespace}"'
    )
    assert "Audit-Id" in str(info.value)  # the client's own str(): what no log line shows any more


class Consumer(threading.Thread):
    """Iterates a watch in a thread of its own, so that a test can wait on it with a limit."""

    def __init__(self, events: Iterator[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.events = events
        self.seen: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            for event in self.events:
                if event["type"] != "BOOKMARK":
                    self.seen.append((event["type"], event["object"]["metadata"]["name"]))
        except BaseException as e:
            self.error = e
        self.ended_at = time.monotonic()


def test_a_silent_connection_ends_a_watch_and_a_request_instead_of_hanging(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    with Relay(("127.0.0.1", control_plane.port)) as relay:
        kubeconfig = control_plane.kubeconfig_via(relay.url, tmp_path / "via-relay")
        relayed = Kube(load_client(str(kubeconfig)), request_timeout=(3.0, 3.0), watch_read_timeout=4.0)
        _, _, rv = relayed.list_page("Job", namespace, None)
        watcher = Consumer(relayed.watch("Job", namespace, None, rv))
        watcher.start()
        kube.create(job(namespace, "before"))  # straight to the API server, not through the relay
        poll(lambda: ("ADDED", "before") in watcher.seen, timeout=60, what="the first event via the relay")

        relay.blackhole()
        silenced = time.monotonic()
        kube.create(job(namespace, "during"))
        watcher.join(timeout=120)
        assert not watcher.is_alive(), "the watch hangs on a silent connection"
        assert isinstance(watcher.error, urllib3.exceptions.ReadTimeoutError), repr(watcher.error)
        assert describe_error(watcher.error) == "ReadTimeoutError: Read timed out."
        assert ("ADDED", "during") not in watcher.seen
        # Ended by the 4 s read timeout given, long before WATCH_READ_TIMEOUT (90 s) could have.
        print(f"watch on a silent relay ended after {watcher.ended_at - silenced:.1f} s")
        assert watcher.ended_at - silenced < WATCH_READ_TIMEOUT / 2

        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError) as info:  # a plain request: its own timeout
            relayed.get_ftj(namespace, "demo")
        took = time.monotonic() - started
        print(f"request on a silent relay failed after {took:.1f} s: {describe_error(info.value)}")
        assert took < 60

        # A new connection to the silent relay: the TLS handshake is bounded by the connect timeout
        # (5 s, twice), not by the watch's 90 s read timeout.
        patient = Kube(load_client(str(kubeconfig)))
        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.HTTPError):
            next(iter(patient.watch("Job", namespace, None, rv)))
        took = time.monotonic() - started
        print(f"a new watch on a silent relay failed after {took:.1f} s")
        assert took < WATCH_READ_TIMEOUT / 2
        patient.api_client.close()

        relay.forward()  # new connections pass again: the same client resumes from where it was
        again = Consumer(relayed.watch("Job", namespace, None, rv, timeout_seconds=30))
        again.start()
        poll(lambda: ("ADDED", "during") in again.seen, timeout=60, what="the missed event after recovery")
        relayed.stop_watches()
        again.join(timeout=30)
        assert not again.is_alive(), "stop_watches() left a watch running"
        relayed.api_client.close()


def test_an_idle_watch_hears_a_bookmark_within_the_read_timeout(kube: Kube, namespace: str) -> None:
    """The premise of WATCH_READ_TIMEOUT: with allowWatchBookmarks the API server sends a BOOKMARK
    about every minute even when nothing changes, so only a dead connection is silent for 90 s."""
    _, _, rv = kube.list_page("Job", namespace, None)
    started = time.monotonic()
    first = next(iter(kube.watch("Job", namespace, None, rv)))  # raises ReadTimeoutError after 90 s
    waited = time.monotonic() - started
    print(f"first BOOKMARK after {waited:.1f} s")
    assert first["type"] == "BOOKMARK" and first["object"]["metadata"]["resourceVersion"]
