"""Leader election on a coordination.k8s.io/v1 Lease, so several replicas can run and only one acts.

client-go's algorithm, with the decision pure (`decide`) and the API I/O thin (`LeaderElector`):

- The holder's record counts as expired only when this replica has seen it unchanged for the record's
  leaseDurationSeconds by its own monotonic clock. renewTime is never compared with the local clock:
  the replicas' clocks may disagree, and a skewed clock would take a live lease or keep a dead one.
- A free (no holder), expired or own Lease is taken or renewed; otherwise the replica waits.
- Writes carry the resourceVersion read, so two candidates can never both win.

Fencing: the leader may write (`may_write`) only until `renew_deadline` after the *start* of its last
successful renew. Any other replica saw that renewal at the earliest when it was written, after that
start, so it waits at least `lease_seconds` from then before it takes over; with renew_deadline <
lease_seconds, a leader that was paused (SIGSTOP) or cut off stops writing before anyone could take the
Lease. Once the fence closes the elector steps down (`on_stopped`: the process exits and restarts).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("kubetune.operator")

LEASE_NAME = "kubetune-operator"
LEASE_SECONDS = 15.0
RENEW_DEADLINE_SECONDS = 10.0
RETRY_PERIOD_SECONDS = 2.0
# The fields of a Lease's spec that make up the leader's record (what "changed" compares).
RECORD_FIELDS = ("holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime", "leaseTransitions")


def _now() -> datetime:
    return datetime.now(UTC)


def format_micro(t: datetime) -> str:
    """A MicroTime, as the Lease's acquireTime and renewTime are."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(lease: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """The leader's record in a Lease, comparable across reads; None when there is no Lease."""
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    return tuple(spec.get(k) for k in RECORD_FIELDS)


@dataclass(frozen=True)
class Observed:
    """The record this replica last saw, and when it first saw it, by its own monotonic clock."""

    record: tuple[Any, ...] | None
    since: float


@dataclass(frozen=True)
class Decision:
    action: Literal["create", "update", "wait"]
    lease: dict[str, Any] | None  # the whole Lease to create or replace (resourceVersion kept); None: wait
    leading: bool  # whether we lead once the write succeeds (False for wait)
    observed: Observed  # what to remember for the next decision, if no write succeeds
    why: str  # for the log: free, expired, ours, held by X, new


def decide(
    lease: dict[str, Any] | None,
    now: datetime,
    identity: str,
    observed: Observed | None,
    *,
    mono: float,
    lease_seconds: float = LEASE_SECONDS,
    name: str = LEASE_NAME,
    namespace: str = "",
) -> Decision:
    """One step of the election from the Lease as read (None: there is none).

    `now` is only written (acquireTime, renewTime: for people and other tools to read); `mono` is this
    replica's monotonic clock, the only clock expiry is judged by."""
    ours = {
        "holderIdentity": identity,
        "leaseDurationSeconds": max(1, int(lease_seconds)),
        "renewTime": format_micro(now),
    }
    if lease is None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {**ours, "acquireTime": format_micro(now), "leaseTransitions": 0},
        }
        return Decision("create", body, True, Observed(None, mono), "no Lease yet")

    seen = record(lease)
    if observed is None or observed.record != seen:
        observed = Observed(seen, mono)  # the record changed: its holder is alive, as of now
    spec: dict[str, Any] = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    duration = float(spec.get("leaseDurationSeconds") or lease_seconds)
    if not holder:
        why = "free"
    elif holder == identity:
        why = "ours"
    elif mono - observed.since >= duration:
        why = f"expired (held by {holder}, unchanged for {mono - observed.since:.1f} s)"
    else:
        return Decision("wait", None, False, observed, f"held by {holder}")
    new_spec = {**spec, **ours}
    if holder != identity:
        new_spec["acquireTime"] = format_micro(now)
        new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
    return Decision("update", {**lease, "spec": new_spec}, True, observed, why)


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        lease_seconds: float = LEASE_SECONDS,
        renew_deadline: float = RENEW_DEADLINE_SECONDS,
        retry_period: float = RETRY_PERIOD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _now,
    ) -> None:
        if not retry_period < renew_deadline < lease_seconds:
            raise ValueError(
                f"leader election needs retry period ({retry_period} s) < renew deadline "
                f"({renew_deadline} s) < lease duration ({lease_seconds} s)"
            )
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_deadline, self.retry_period = (
            lease_seconds,
            renew_deadline,
            retry_period,
        )
        self.clock, self.wall = clock, wall
        # A hung request must not outlast the fence: the next attempt starts well within it.
        self.request_timeout = max(1.0, renew_deadline / 2)
        self.is_leader = False
        self._observed: Observed | None = None
        self._renewed_at: float | None = None  # when the last successful take/renew request started

    def may_write(self) -> bool:
        """Whether this replica may write now: it leads, and its last renewal started less than
        renew_deadline ago (see the module's docstring)."""
        at = self._renewed_at
        return self.is_leader and at is not None and self.clock() < at + self.renew_deadline

    def _read(self) -> dict[str, Any] | None:
        try:
            resp = self.api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=self.request_timeout
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        lease: dict[str, Any] = json.loads(resp.data)
        return lease

    def _try(self) -> bool:
        """One attempt to take or renew the Lease; True when we hold it afterwards."""
        started = self.clock()
        lease = self._read()
        d = decide(
            lease,
            self.wall(),
            self.identity,
            self._observed,
            mono=self.clock(),
            lease_seconds=self.lease_seconds,
            name=self.name,
            namespace=self.namespace,
        )
        self._observed = d.observed
        if d.lease is None:
            return False
        if self.is_leader and not self.may_write():
            return False  # paused between the read and now: too late to renew, step down instead
        try:
            if d.action == "create":
                self.api.create_namespaced_lease(
                    self.namespace, d.lease, _request_timeout=self.request_timeout
                )
            else:
                # The read resourceVersion makes this a compare-and-swap.
                self.api.replace_namespaced_lease(
                    self.name, self.namespace, d.lease, _request_timeout=self.request_timeout
                )
        except ApiException as e:
            if e.status == 409:  # someone else wrote first
                return False
            raise
        self._observed = Observed(record(d.lease), self.clock())
        if not self.is_leader:
            log.info("leader election: took %s/%s (%s)", self.namespace, self.name, d.why)
        self._renewed_at = started
        return True

    def run(
        self, on_started: Callable[[], None], on_stopped: Callable[[], None], stop: threading.Event
    ) -> None:
        """Campaign until `stop`; call `on_started` on winning and `on_stopped` on losing the Lease
        (the fence closed: no renewal within renew_deadline)."""
        log.info("leader election: campaigning for %s/%s as %s", self.namespace, self.name, self.identity)
        while not stop.is_set():
            if self.is_leader and not self.may_write():
                self._step_down(on_stopped)
                return
            try:
                held = self._try()
            except Exception as e:
                log.warning("leader election: %s", str(e)[:200])
                held = False
            if held and not self.is_leader:
                self.is_leader = True
                log.info("became leader (%s/%s as %s)", self.namespace, self.name, self.identity)
                on_started()
            elif not held and self.is_leader and not self.may_write():
                self._step_down(on_stopped)
                return
            stop.wait(self.retry_period)

    def _step_down(self, on_stopped: Callable[[], None]) -> None:
        self.is_leader = False
        log.warning(
            "lost leadership of %s/%s: not renewed within %.0f s",
            self.namespace,
            self.name,
            self.renew_deadline,
        )
        on_stopped()

    def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        # Safe after the fence closed too: the replace is a compare-and-swap on a record still ours.
        if not self.is_leader:
            return
        try:
            lease = self._read()
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                lease["spec"]["leaseDurationSeconds"] = 1
                self.api.replace_namespaced_lease(
                    self.name, self.namespace, lease, _request_timeout=self.request_timeout
                )
        except Exception as e:
            log.warning("could not release the lease: %s", str(e)[:200])
        self.is_leader = False
        self._renewed_at = None
