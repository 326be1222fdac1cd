"""The operator as a Deployment runs it: leader election on a Lease, health probes, metrics, and two
replicas whose leader is killed (SIGKILL) or paused (SIGSTOP) while FineTuneJobs come in.

Who wrote what, and when, is read server-side from the API server's audit log (controlplane.sh logs
every write at Metadata level): each replica sends the user agent kubetune-operator/<identity>.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import ControlPlane, poll

from kubetune.contract import LABEL_JOB
from kubetune_operator.kube import load_client
from kubetune_operator.leader import LEASE_SECONDS, RETRY_PERIOD_SECONDS, LeaderElector

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    return poll(check, timeout=timeout, what=what)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def test_one_leader_at_a_time_and_takeover(control_plane: Any, namespace: str) -> None:
    api = load_client(control_plane.kubeconfig)
    a, b = (
        LeaderElector(api, namespace, name, lease_seconds=2.0, renew_deadline=1.5, retry_period=0.2)
        for name in ("replica-a", "replica-b")
    )
    stop_a, stop_b = threading.Event(), threading.Event()
    led: list[str] = []
    ta = threading.Thread(target=a.run, args=(lambda: led.append("a"), lambda: None, stop_a), daemon=True)
    ta.start()
    wait("a to lead", lambda: a.is_leader)
    tb = threading.Thread(target=b.run, args=(lambda: led.append("b"), lambda: None, stop_b), daemon=True)
    tb.start()
    time.sleep(3)  # longer than the lease: a renews it, so b must not take it
    assert led == ["a"] and not b.is_leader

    stop_a.set()  # a dies without releasing: b takes over once the lease expires
    ta.join(timeout=5)
    wait("b to take over", lambda: b.is_leader, timeout=10)
    assert led == ["a", "b"]
    lease = json.loads(
        control_plane.kubectl(
            "get", "lease", "kubetune-operator", "-n", namespace, "-o", "json", check=True
        ).stdout
    )
    assert lease["spec"]["holderIdentity"] == "replica-b" and lease["spec"]["leaseTransitions"] == 1
    stop_b.set()
    tb.join(timeout=5)
    assert b.is_leader  # stopping is not losing: it still holds the lease until it releases it
    b.release()
    lease = json.loads(
        control_plane.kubectl(
            "get", "lease", "kubetune-operator", "-n", namespace, "-o", "json", check=True
        ).stdout
    )
    assert not lease["spec"].get("holderIdentity")


def test_operator_process_probes_metrics_and_leader_lease(control_plane: Any, namespace: str) -> None:
    crd = ROOT / "manifests/crd/kubetune.io_finetunejobs.yaml"
    control_plane.kubectl("apply", "--server-side", "-f", str(crd), check=True)
    control_plane.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", check=True)
    health, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "operator",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--namespace",
            namespace,
            "--health-addr",
            f"127.0.0.1:{health}",
            "--metrics-addr",
            f"127.0.0.1:{metrics}",
            "--leader-elect",
            "--leader-election-namespace",
            namespace,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        wait("/readyz", lambda: get(f"http://127.0.0.1:{health}/readyz")[0] == 200)
        assert get(f"http://127.0.0.1:{health}/healthz")[0] == 200
        wait("leadership", lambda: "kubetune_leader 1.0" in get(f"http://127.0.0.1:{metrics}/metrics")[1])
        job = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "probed", "namespace": namespace},
            "spec": {
                "model": {"id": "tiiuae/falcon-7b"},
                "dataset": {"id": "timdettmers/openassistant-guanaco"},
                "resources": {"gpusPerNode": 1},
            },
        }
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(job), check=True)

        def state() -> str:
            out = control_plane.kubectl(
                "get", "ftj", "probed", "-n", namespace, "-o", "jsonpath={.status.state}"
            )
            return str(out.stdout)

        wait("Succeeded", lambda: state() == "Succeeded", timeout=60)
        text = get(f"http://127.0.0.1:{metrics}/metrics")[1]
        assert 'kubetune_reconciles_total{result="ok"}' in text
        requests = next(line for line in text.splitlines() if line.startswith("kubetune_api_requests_total"))
        assert float(requests.split()[-1]) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    lease = json.loads(
        control_plane.kubectl(
            "get", "lease", "kubetune-operator", "-n", namespace, "-o", "json", check=True
        ).stdout
    )
    assert not lease["spec"].get("holderIdentity")  # released on shutdown: a standby takes over at once


# --------------------------------------------------------------------------------------------------
# Two operator processes: kill or pause the leader
# --------------------------------------------------------------------------------------------------

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
# A loaded 2-core machine: the takeover may come this much later than the lease allows.
TAKEOVER_SLACK_SECONDS = 6.0


class Replica:
    """`python -m kubetune_operator --leader-elect` against the test control plane, logging to a file."""

    def __init__(self, control_plane: ControlPlane, namespace: str, log: Path) -> None:
        self.health, self.metrics_port = free_port(), free_port()
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kubetune_operator",
                    "--kubeconfig",
                    str(control_plane.kubeconfig),
                    "--namespace",
                    namespace,
                    "--health-addr",
                    f"127.0.0.1:{self.health}",
                    "--metrics-addr",
                    f"127.0.0.1:{self.metrics_port}",
                    "--leader-elect",
                    "--leader-election-namespace",
                    namespace,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.identity: str = wait(f"{log.stem}'s identity", self._identity)

    def _identity(self) -> str | None:
        assert self.proc.poll() is None, f"{self.log.stem} exited {self.proc.returncode}:\n{self.output()}"
        m = re.search(r"campaigning for \S+ as (\S+)", self.output())
        return m.group(1) if m else None

    @property
    def user_agent(self) -> str:
        return f"kubetune-operator/{self.identity}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str) -> float | None:
        """The sum of a metric's samples; None when /metrics does not answer (paused, gone)."""
        code, text = get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        if code != 200:
            return None
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )

    def leading(self) -> bool:
        return self.metric("kubetune_leader") == 1.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def ftj(namespace: str, name: str, lr: float = 2e-4) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"id": "tiiuae/falcon-7b"},
            "dataset": {"id": "timdettmers/openassistant-guanaco"},
            "resources": {"gpusPerNode": 1},
            "training": {"learningRate": lr},
        },
    }


def apply(control_plane: ControlPlane, *objs: dict[str, Any]) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": list(objs)}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(items), check=True)


def lease(control_plane: ControlPlane, namespace: str) -> dict[str, Any]:
    out = control_plane.kubectl("get", "lease", "kubetune-operator", "-n", namespace, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else {}


def holder(control_plane: ControlPlane, namespace: str) -> str | None:
    return (lease(control_plane, namespace).get("spec") or {}).get("holderIdentity")


def jobs_by_ftj(control_plane: ControlPlane, namespace: str) -> dict[str, list[str]]:
    jobs = control_plane.get("jobs", "-n", namespace, "-l", LABEL_JOB)["items"]
    out: dict[str, list[str]] = {}
    for j in jobs:
        out.setdefault(j["metadata"]["labels"][LABEL_JOB], []).append(j["metadata"]["name"])
    return out


def ts(value: str) -> float:
    """An RFC 3339 (micro)time as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def writes(control_plane: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    """The audit log's write events in `namespace` (leader election's Lease included)."""
    events = []
    for path in sorted(control_plane.dir.glob("audit*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # (a line being written)
            if e.get("verb") in WRITE_VERBS and (e.get("objectRef") or {}).get("namespace") == namespace:
                events.append(e)
    return events


def describe(e: dict[str, Any]) -> str:
    ref = e.get("objectRef") or {}
    code = (e.get("responseStatus") or {}).get("code")
    sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
    return f"{e['stageTimestamp']} {e['verb']} {ref.get('resource')}{sub} {ref.get('name')} -> {code}"


def takeover(control_plane: ControlPlane, namespace: str, new: Replica, timeout: float) -> float:
    """Wait for `new` to hold the Lease and count as leader; the takeover time (the Lease's
    acquireTime, written by `new`), as seconds since the epoch."""
    wait(
        f"{new.identity} to take the Lease", lambda: holder(control_plane, namespace) == new.identity, timeout
    )
    return ts(lease(control_plane, namespace)["spec"]["acquireTime"])


def two_replicas(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> tuple[Replica, Replica]:
    a = Replica(control_plane, namespace, tmp_path / "replica-a.log")
    wait("replica a to lead", a.leading, timeout=60)
    b = Replica(control_plane, namespace, tmp_path / "replica-b.log")
    wait("replica b's metrics", lambda: b.metric("kubetune_leader") == 0.0, timeout=60)
    assert holder(control_plane, namespace) == a.identity
    return a, b


def test_killed_leader_fails_over_within_the_lease_one_reconciler_throughout(
    control_plane: ControlPlane, crd: None, namespace: str, tmp_path: Path
) -> None:
    a, b = two_replicas(control_plane, namespace, tmp_path)
    try:
        before = [f"before-{i}" for i in range(5)]
        apply(control_plane, *(ftj(namespace, n) for n in before))
        wait(
            "Jobs for the first FineTuneJobs",
            lambda: set(before) <= set(jobs_by_ftj(control_plane, namespace)),
        )
        assert b.metric("kubetune_reconciles_total") == 0  # the standby reconciles nothing
        transitions = int(lease(control_plane, namespace)["spec"].get("leaseTransitions") or 0)

        a.proc.kill()  # SIGKILL: no release, the standby must wait for the lease to expire
        killed = time.monotonic()
        a.proc.wait(timeout=10)
        after = [f"after-{i}" for i in range(5)]
        apply(control_plane, *(ftj(namespace, n) for n in after))
        limit = LEASE_SECONDS + RETRY_PERIOD_SECONDS + TAKEOVER_SLACK_SECONDS
        taken = takeover(control_plane, namespace, b, timeout=limit + 30)
        failover = time.monotonic() - killed
        wait("replica b to lead", b.leading, timeout=10)
        print(f"failover after SIGKILL: {failover:.1f} s (lease {LEASE_SECONDS:.0f} s)")
        assert failover <= limit, f"failover took {failover:.1f} s"
        assert lease(control_plane, namespace)["spec"]["leaseTransitions"] == transitions + 1

        everyone = before + after
        wait(
            "a Job for every FineTuneJob",
            lambda: set(everyone) <= set(jobs_by_ftj(control_plane, namespace)),
            60,
        )
        time.sleep(3)  # a duplicate would show by now
        jobs = jobs_by_ftj(control_plane, namespace)
        assert {n: len(jobs[n]) for n in everyone} == dict.fromkeys(everyone, 1), jobs
        assert (b.metric("kubetune_reconciles_total") or 0) > 0

        # One reconciler at any time, by the API server's record: a wrote only before b took over,
        # b (its Lease writes aside) only after.
        log = [
            e for e in writes(control_plane, namespace) if e.get("userAgent") in (a.user_agent, b.user_agent)
        ]
        by_a = [e for e in log if e["userAgent"] == a.user_agent]
        by_b = [e for e in log if e["userAgent"] == b.user_agent and e["objectRef"]["resource"] != "leases"]
        assert by_a and by_b, "no write recorded for a replica's user agent: is audit logging on?"
        assert [describe(e) for e in by_a if ts(e["stageTimestamp"]) >= taken] == []
        assert [describe(e) for e in by_b if ts(e["requestReceivedTimestamp"]) < taken] == []
    except BaseException:
        for r in (a, b):  # (pytest shows this with the failure)
            print(f"--- {r.log.stem} ({r.identity}), the end of its log:\n{r.output()[-6000:]}")
        raise
    finally:
        a.stop()
        b.stop()


def test_paused_leader_sends_no_write_after_the_standby_took_over(
    control_plane: ControlPlane, crd: None, namespace: str, tmp_path: Path
) -> None:
    a, b = two_replicas(control_plane, namespace, tmp_path)
    try:
        first = [f"first-{i}" for i in range(3)]
        apply(control_plane, *(ftj(namespace, n) for n in first))
        wait(
            "Jobs for the first FineTuneJobs",
            lambda: set(first) <= set(jobs_by_ftj(control_plane, namespace)),
        )
        # A burst, and the leader paused in the middle of it: its queue, and maybe a write, in flight.
        burst = [f"burst-{i}" for i in range(20)]
        apply(control_plane, *(ftj(namespace, n) for n in burst))
        a.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        # While it is paused: edits (new runs) and new FineTuneJobs, work that a's watches will show it
        # as soon as it runs again.
        apply(control_plane, *(ftj(namespace, n, lr=3e-4) for n in first))
        during = [f"during-{i}" for i in range(5)]
        apply(control_plane, *(ftj(namespace, n) for n in during))
        taken = takeover(
            control_plane,
            namespace,
            b,
            timeout=LEASE_SECONDS + RETRY_PERIOD_SECONDS + TAKEOVER_SLACK_SECONDS + 30,
        )
        assert time.monotonic() - paused >= LEASE_SECONDS - RETRY_PERIOD_SECONDS - 1
        wait("replica b to lead", b.leading, timeout=10)
        time.sleep(2)

        a.proc.send_signal(signal.SIGCONT)
        # More work for both while a wakes up.
        apply(control_plane, *(ftj(namespace, n, lr=4e-4) for n in burst[:5]))
        late = [f"late-{i}" for i in range(5)]
        apply(control_plane, *(ftj(namespace, n) for n in late))

        # a had a queue of work and its watches deliver more: whatever it would send, it sends now.
        time.sleep(3 * RETRY_PERIOD_SECONDS + 4)
        log = writes(control_plane, namespace)
        by_a = [e for e in log if e.get("userAgent") == a.user_agent]
        assert by_a, "no write recorded for a's user agent: is audit logging on?"
        late_writes = [describe(e) for e in by_a if ts(e["stageTimestamp"]) > taken]
        assert late_writes == [], f"the paused leader wrote after the takeover:\n{a.output()[-3000:]}"
        assert any(e.get("userAgent") == b.user_agent for e in log)
        # ... and it stood down: exited (and its Pod restarts as a candidate) or waits as a standby.

        def a_gone_or_standby() -> bool:
            return a.proc.poll() is not None or a.metric("kubetune_leader") == 0.0

        wait("the old leader to exit or stand by", a_gone_or_standby, timeout=30)
        if a.proc.poll() is not None:
            assert a.proc.returncode != 0, a.output()
        outcome = "standby" if a.proc.poll() is None else f"exit {a.proc.returncode}"
        print(f"paused leader after SIGCONT: {outcome}")
        everyone = first + burst + during + late
        wait(
            "a Job for every FineTuneJob",
            lambda: set(everyone) <= set(jobs_by_ftj(control_plane, namespace)),
            90,
        )

        # Every FineTuneJob's status names its current run, whose Job exists; the ones never edited
        # have that one Job only.
        edited = set(first) | set(burst[:5])

        def settled() -> bool:
            jobs = jobs_by_ftj(control_plane, namespace)
            ftjs = control_plane.get("ftj", "-n", namespace)["items"]
            runs = {f["metadata"]["name"]: (f.get("status") or {}).get("jobName") for f in ftjs}
            return set(runs) == set(everyone) and all(
                runs[n] in jobs.get(n, []) and (n in edited or len(jobs[n]) == 1) for n in everyone
            )

        wait("every FineTuneJob's current run", settled, 90)
    except BaseException:
        for r in (a, b):  # (pytest shows this with the failure)
            print(f"--- {r.log.stem} ({r.identity}), the end of its log:\n{r.output()[-6000:]}")
        raise
    finally:
        a.stop()
        b.stop()
