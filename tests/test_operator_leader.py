"""Leader election: the pure `decide()` and the elector's fence, with plain dicts and an injected clock."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune_operator.leader import (
    LEASE_SECONDS,
    Decision,
    LeaderElector,
    Observed,
    decide,
    format_micro,
    record,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def lease(
    holder: str | None, renew: datetime = NOW, *, duration: int = 15, transitions: int = 3
) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "kubetune-operator", "namespace": "ops", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "acquireTime": format_micro(NOW - timedelta(hours=1)),
            "renewTime": format_micro(renew),
            "leaseTransitions": transitions,
        },
    }


def step(current: dict[str, Any] | None, observed: Observed | None, mono: float, me: str = "b") -> Decision:
    return decide(current, NOW, me, observed, mono=mono, name="kubetune-operator", namespace="ops")


# ----------------------------------------------------------------------------------------------- decide


def test_no_lease_is_created_with_us_as_holder() -> None:
    d = step(None, None, 100.0)
    assert d.action == "create" and d.leading
    assert d.lease is not None
    assert d.lease["metadata"] == {"name": "kubetune-operator", "namespace": "ops"}
    assert d.lease["spec"] == {
        "holderIdentity": "b",
        "leaseDurationSeconds": int(LEASE_SECONDS),
        "renewTime": format_micro(NOW),
        "acquireTime": format_micro(NOW),
        "leaseTransitions": 0,
    }


@pytest.mark.parametrize("holder", [None, ""])
def test_a_free_lease_is_taken_at_once(holder: str | None) -> None:
    """Released on a clean shutdown (no holder): nobody has to wait for it to expire."""
    d = step(lease(holder), None, 100.0)
    assert d.action == "update" and d.leading and d.lease is not None
    spec = d.lease["spec"]
    assert spec["holderIdentity"] == "b" and spec["acquireTime"] == format_micro(NOW)
    assert spec["leaseTransitions"] == 4
    assert d.lease["metadata"]["resourceVersion"] == "7"  # the compare-and-swap


def test_our_own_lease_is_renewed_keeping_acquire_time_and_transitions() -> None:
    current = lease("b", NOW - timedelta(seconds=5))
    d = step(current, Observed(record(current), 90.0), 100.0)
    assert d.action == "update" and d.leading and d.lease is not None
    spec = d.lease["spec"]
    assert spec["renewTime"] == format_micro(NOW)
    assert spec["acquireTime"] == current["spec"]["acquireTime"] and spec["leaseTransitions"] == 3


def test_our_lease_is_renewed_even_when_it_looks_expired() -> None:
    """Renewing is always allowed to the holder (the fence decides whether it may still write)."""
    current = lease("b", NOW - timedelta(hours=1))
    d = step(current, Observed(record(current), 0.0), 1000.0)
    assert d.action == "update" and d.leading


def test_another_holder_is_waited_for_while_its_record_changes() -> None:
    current = lease("a")
    d = step(current, None, 100.0)
    assert d.action == "wait" and not d.leading and d.lease is None
    assert d.observed == Observed(record(current), 100.0)  # first seen now
    # The same record, seen again 14.9 s later (by our clock): not yet expired.
    d2 = step(current, d.observed, 114.9)
    assert d2.action == "wait" and d2.observed.since == 100.0


def test_an_unchanged_record_expires_after_its_duration_by_our_clock() -> None:
    current = lease("a")
    first = step(current, None, 100.0).observed
    d = step(current, first, 115.0)
    assert d.action == "update" and d.leading and d.lease is not None
    assert d.lease["spec"]["holderIdentity"] == "b"
    assert d.lease["spec"]["acquireTime"] == format_micro(NOW)
    assert d.lease["spec"]["leaseTransitions"] == 4
    assert "expired" in d.why


def test_a_changed_record_restarts_the_wait() -> None:
    """The holder renewed: it is alive as of when we saw the change, whatever time its renewTime says."""
    old = lease("a", NOW - timedelta(seconds=2))
    seen = Observed(record(old), 100.0)
    renewed = lease("a", NOW)
    d = step(renewed, seen, 120.0)  # 20 s after first seeing the old record, but the record moved
    assert d.action == "wait" and d.observed == Observed(record(renewed), 120.0)


def test_renew_time_far_in_the_past_is_no_expiry() -> None:
    """Clock skew: the holder's clock is an hour behind ours. Comparing renewTime with our clock would
    take a live lease; only an unchanged record counts."""
    current = lease("a", NOW - timedelta(hours=1))
    d = step(current, None, 100.0)
    assert d.action == "wait"


def test_renew_time_in_the_future_does_not_keep_a_dead_holder() -> None:
    """The holder's clock is an hour ahead, and it died: its record expires by our clock all the same."""
    current = lease("a", NOW + timedelta(hours=1))
    first = step(current, None, 100.0).observed
    assert step(current, first, 115.0).action == "update"


def test_expiry_uses_the_records_duration() -> None:
    current = lease("a", duration=40)
    first = step(current, None, 100.0).observed
    assert step(current, first, 139.0).action == "wait"
    assert step(current, first, 140.0).action == "update"


def test_a_record_without_duration_uses_ours() -> None:
    current = lease("a")
    current["spec"].pop("leaseDurationSeconds")
    first = step(current, None, 100.0).observed
    assert step(current, first, 100.0 + LEASE_SECONDS - 0.1).action == "wait"
    assert step(current, first, 100.0 + LEASE_SECONDS).action == "update"


def test_record_compares_the_leader_fields_only() -> None:
    a, b = lease("a"), lease("a")
    b["metadata"]["resourceVersion"] = "8"
    b["metadata"]["managedFields"] = [{"manager": "x"}]
    assert record(a) == record(b) and record(None) is None
    b["spec"]["renewTime"] = format_micro(NOW + timedelta(seconds=1))
    assert record(a) != record(b)


# ---------------------------------------------------------------------------------- the elector's I/O


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeLeases:
    """CoordinationV1Api on one Lease, with the API server's compare-and-swap on resourceVersion."""

    def __init__(self, clock: Clock, read_takes: float = 0.0) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.clock, self.read_takes = clock, read_takes
        self.writes: list[str] = []
        self.fail: Exception | None = None
        self.on_read: Any = None

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        if self.fail is not None:
            raise self.fail
        self.clock.t += self.read_takes
        if self.on_read is not None:
            self.on_read()
        if self.lease is None:
            raise ApiException(status=404)
        import json

        class Resp:
            data = json.dumps(self.lease)

        return Resp()

    def _store(self, body: dict[str, Any]) -> None:
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any], **_: Any) -> None:
        self.writes.append("create")
        if self.lease is not None:
            raise ApiException(status=409)
        self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any], **_: Any) -> None:
        self.writes.append("replace")
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        self._store(body)


def elector(identity: str, clock: Clock, leases: FakeLeases, **kwargs: Any) -> LeaderElector:
    e = LeaderElector(client.ApiClient(), "ops", identity, clock=clock, wall=lambda: NOW, **kwargs)
    e.api = leases
    return e


def test_durations_must_nest() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(client.ApiClient(), "ops", "a", lease_seconds=10, renew_deadline=10)
    with pytest.raises(ValueError, match="retry period"):
        LeaderElector(client.ApiClient(), "ops", "a", renew_deadline=2, retry_period=2)


def test_may_write_only_within_renew_deadline_of_the_last_renew_start() -> None:
    clock = Clock()
    leases = FakeLeases(clock, read_takes=3.0)  # each read takes 3 s
    a = elector("a", clock, leases)
    assert not a.may_write()  # not leading
    started = clock.t
    assert a._try()
    a.is_leader = True
    # The fence counts from when the request started, not from when it returned (3 s later).
    clock.t = started + 9.99
    assert a.may_write()
    clock.t = started + 10.0
    assert not a.may_write()
    a.is_leader = False
    clock.t = started + 1
    assert not a.may_write()  # holding a fresh renew is not enough: it must lead


def test_the_fence_closes_before_any_other_replica_can_take_over() -> None:
    """a renews at t0 and is then paused; b sees the renewal no earlier than t0 and takes the Lease no
    earlier than lease_seconds after that. a stops writing at t0 + renew_deadline, before."""
    clock = Clock()
    leases = FakeLeases(clock)
    a, b = elector("a", clock, leases), elector("b", clock, leases)
    assert a._try()
    a.is_leader = True
    t0 = clock.t
    taken_at = None
    while taken_at is None:
        if b._try():
            taken_at = clock.t
        else:
            assert a.may_write() == (clock.t < t0 + 10.0)
        clock.t += 0.5
    assert taken_at >= t0 + LEASE_SECONDS
    assert not a.may_write()


def test_paused_between_read_and_write_the_leader_does_not_renew() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    a = elector("a", clock, leases)
    assert a._try()
    a.is_leader = True
    leases.on_read = lambda: setattr(clock, "t", clock.t + 11.0)  # SIGSTOP during the read
    writes = len(leases.writes)
    assert not a._try()
    assert len(leases.writes) == writes  # no renewal sent
    assert not a.may_write()


def test_create_conflict_means_not_held() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    b = elector("b", clock, leases)
    # a creates the Lease between b's read (404) and b's create.
    original = leases.read_namespaced_lease

    def read_then_sneak(name: str, namespace: str, **kw: Any) -> Any:
        try:
            return original(name, namespace, **kw)
        finally:
            leases._store(lease("a"))

    leases.read_namespaced_lease = read_then_sneak  # type: ignore[method-assign]
    assert not b._try()
    assert leases.writes == ["create"]
    assert leases.lease is not None and leases.lease["spec"]["holderIdentity"] == "a"


def test_replace_conflict_means_not_held() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    b = elector("b", clock, leases)
    leases._store(lease(None))

    def sneak() -> None:  # a takes the free Lease between b's read and b's write
        assert leases.lease is not None
        leases._store({**leases.lease, "spec": {**leases.lease["spec"], "holderIdentity": "a"}})

    leases.on_read = sneak
    assert not b._try()
    assert leases.lease is not None and leases.lease["spec"]["holderIdentity"] == "a"


def test_other_api_errors_propagate() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    leases.fail = ApiException(status=500)
    with pytest.raises(ApiException):
        elector("a", clock, leases)._try()


def run_in_thread(e: LeaderElector) -> tuple[threading.Thread, list[str], threading.Event]:
    calls: list[str] = []
    stop = threading.Event()
    t = threading.Thread(
        target=e.run,
        args=(lambda: calls.append("started"), lambda: calls.append("stopped"), stop),
        daemon=True,
    )
    t.start()
    return t, calls, stop


def test_run_leads_and_steps_down_when_renewals_fail_past_the_deadline() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    a = elector("a", clock, leases, lease_seconds=1.0, renew_deadline=0.5, retry_period=0.01)
    t, calls, stop = run_in_thread(a)
    for _ in range(500):
        if a.is_leader:
            break
        threading.Event().wait(0.01)
    assert calls == ["started"] and a.may_write()
    leases.fail = ApiException(status=503)  # the API server is gone
    clock.t += 0.4
    threading.Event().wait(0.1)
    assert a.is_leader  # still within the deadline: keeps trying
    clock.t += 0.2
    t.join(timeout=5)
    assert not t.is_alive() and calls == ["started", "stopped"]
    assert not a.is_leader and not a.may_write()
    stop.set()


def test_run_steps_down_after_a_pause_without_writing() -> None:
    """SIGSTOP past the deadline, then SIGCONT: the first thing the loop does is step down."""
    clock = Clock()
    leases = FakeLeases(clock)
    a = elector("a", clock, leases, lease_seconds=1.0, renew_deadline=0.5, retry_period=0.2)
    assert a._try()
    a.is_leader = True
    writes = len(leases.writes)
    clock.t += 5.0  # paused
    calls: list[str] = []
    a.run(lambda: calls.append("started"), lambda: calls.append("stopped"), threading.Event())
    assert calls == ["stopped"] and len(leases.writes) == writes


def test_run_waits_as_standby_and_stop_ends_it() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    leases._store(lease("a"))
    b = elector("b", clock, leases, lease_seconds=1.0, renew_deadline=0.5, retry_period=0.01)
    t, calls, stop = run_in_thread(b)
    threading.Event().wait(0.1)
    assert calls == [] and not b.is_leader and "replace" not in leases.writes
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive() and calls == []


def test_release_frees_our_lease_and_leaves_anothers() -> None:
    clock = Clock()
    leases = FakeLeases(clock)
    a = elector("a", clock, leases)
    a.release()  # not leading: nothing sent
    assert leases.writes == []
    assert a._try()
    a.is_leader = True
    a.release()
    assert leases.lease is not None
    assert (
        leases.lease["spec"]["holderIdentity"] is None and leases.lease["spec"]["leaseDurationSeconds"] == 1
    )
    assert not a.is_leader and not a.may_write()
    # Someone else holds it now: release sends nothing.
    leases._store(lease("b"))
    a.is_leader = True
    writes = len(leases.writes)
    a.release()
    assert len(leases.writes) == writes and leases.lease["spec"]["holderIdentity"] == "b"
