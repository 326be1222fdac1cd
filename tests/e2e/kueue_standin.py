"""A stand-in for Kueue's job integration, for testing kubetune's side of the contract without Kueue.

Kueue manages a plain batch/v1 Job that carries the `kueue.x-k8s.io/queue-name` label: the Job must be
created suspended, Kueue admits it by setting `spec.suspend: false` (and may suspend it again to preempt
it). The workload controller does nothing else to the Job that kubetune could notice, so this stand-in
does exactly that, with its own field manager, and records what it saw:

- `created_suspended[name]`: whether the Job was suspended when it first appeared;
- `suspend_changes`: every change of `spec.suspend` seen on the watch, with the field manager that owns
  `spec.suspend` afterwards (from managedFields), so a test can prove no one else flipped it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.contract import LABEL_QUEUE

FIELD_MANAGER = "kueue-standin"


def suspend_owner(job: dict[str, Any]) -> str | None:
    """The field manager that owns spec.suspend, read from the Job's managedFields."""
    for entry in job.get("metadata", {}).get("managedFields") or []:
        spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if "f:suspend" in spec:
            return str(entry.get("manager"))
    return None


@dataclass
class KueueStandIn:
    kubectl: Path
    kubeconfig: Path
    namespace: str
    admit_after: float = 3.0
    created_suspended: dict[str, bool] = field(default_factory=dict)
    suspend_changes: list[tuple[str, bool, str | None]] = field(default_factory=list)
    admitted: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def start(self) -> KueueStandIn:
        t = threading.Thread(target=self._loop, name="kueue-standin", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _loop(self) -> None:
        last: dict[str, bool] = {}
        while not self._stop.is_set():
            proc = self._run(
                "get", "jobs", "-n", self.namespace, "-l", LABEL_QUEUE, "-o", "json", "--show-managed-fields"
            )  # fmt: skip
            if proc.returncode == 0:
                for job in json.loads(proc.stdout)["items"]:
                    self._observe(job, last)
            self._stop.wait(0.3)

    def _observe(self, job: dict[str, Any], last: dict[str, bool]) -> None:
        name = job["metadata"]["name"]
        suspended = bool(job["spec"].get("suspend"))
        if name not in self.created_suspended:
            self.created_suspended[name] = suspended
            # Kueue admits after its quota check; the delay lets the test see the Queued state.
            timer = threading.Timer(self.admit_after, self.admit, args=(name,))
            timer.daemon = True
            timer.start()
        elif last.get(name) != suspended:
            self.suspend_changes.append((name, suspended, suspend_owner(job)))
        last[name] = suspended

    def admit(self, name: str) -> None:
        patch = json.dumps({"spec": {"suspend": False}})
        proc = self._run(
            "patch", "job", name, "-n", self.namespace, "--type=merge", "-p", patch,
            f"--field-manager={FIELD_MANAGER}",
        )  # fmt: skip
        if proc.returncode == 0:
            self.admitted[name] = time.monotonic()
