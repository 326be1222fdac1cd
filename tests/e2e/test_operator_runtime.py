"""The operator as a Deployment runs it: leader election on a Lease, health probes, metrics."""

from __future__ import annotations

import json
import os
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
from controlplane import poll

from kubetune.controller.kube import load_client
from kubetune.controller.leader import LeaderElector

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
