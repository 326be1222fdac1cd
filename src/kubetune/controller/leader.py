"""Leader election on a coordination.k8s.io/v1 Lease, so several replicas can run and only one acts.

The client-go algorithm, small: take the Lease when it is free or expired, renew it every
`retry_period`; a leader that cannot renew within `renew_deadline` stops leading (the process then
exits and its Pod restarts as a candidate). Updates carry the resourceVersion read, so two candidates
can never both win.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("kubetune.operator")

LEASE_NAME = "kubetune-operator"


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(s: str | None) -> datetime | None:
    if not s:
        return None
    s = s.replace("Z", "+00:00")
    return datetime.fromisoformat(s)


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        lease_seconds: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_deadline, self.retry_period = (
            lease_seconds,
            renew_deadline,
            retry_period,
        )
        self.is_leader = False

    def _try(self) -> bool:
        """One attempt to take or renew the Lease; True when we hold it afterwards."""
        now = _now()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_seconds),
            "renewTime": _fmt(now),
        }
        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease: dict[str, Any] = json.loads(resp.data)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _fmt(now), "leaseTransitions": 0},
            }
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
        current = lease.get("spec") or {}
        holder = current.get("holderIdentity")
        renewed = _parse(current.get("renewTime")) or _parse(current.get("acquireTime"))
        duration = float(current.get("leaseDurationSeconds") or self.lease_seconds)
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder and holder != self.identity and not expired:
            return False
        new_spec = {**current, **spec}
        if holder != self.identity:
            new_spec["acquireTime"] = _fmt(now)
            new_spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec
        try:
            # The read resourceVersion makes this a compare-and-swap.
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def run(
        self, on_started: Callable[[], None], on_stopped: Callable[[], None], stop: threading.Event
    ) -> None:
        """Campaign until `stop`; call `on_started` on winning and `on_stopped` on losing the Lease."""
        last_renew = 0.0
        while not stop.is_set():
            try:
                held = self._try()
            except Exception as e:
                log.warning("leader election: %s", str(e)[:200])
                held = False
            now = time.monotonic()
            if held:
                last_renew = now
                if not self.is_leader:
                    self.is_leader = True
                    log.info("became leader (%s/%s as %s)", self.namespace, self.name, self.identity)
                    on_started()
            elif self.is_leader and now - last_renew > self.renew_deadline:
                self.is_leader = False
                log.warning("lost leadership of %s/%s", self.namespace, self.name)
                on_stopped()
                return
            stop.wait(self.retry_period)

    def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        if not self.is_leader:
            return
        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease = json.loads(resp.data)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                lease["spec"]["leaseDurationSeconds"] = 1
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except Exception as e:
            log.warning("could not release the lease: %s", str(e)[:200])
        self.is_leader = False
