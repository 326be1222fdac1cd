"""The operator against a real API server, controller-manager, scheduler and KWOK GPU nodes.

Pods are KWOK's: they are scheduled for real, then Succeed or Fail as their annotations say
(hack/controlplane/stages), so no trainer runs. Where a test needs what the trainer would report
(progress), it writes the pod annotation the trainer writes.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import poll

from kubetune.controller.kube import Kube, load_client
from kubetune.controller.operator import Operator
from kubetune.controller.status import PROGRESS_ANNOTATION

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the invalid-spec table is shared with the unit tests
CRD = ROOT / "manifests/crd/kubetune.io_finetunejobs.yaml"
FAKE_TOKEN = "hf_" + "E2eNeverLeaks0123456789abcdefgh"
SLOW = {"pod-complete.stage.kwok.x-k8s.io/delay": "600s"}  # stays Running until the test is done


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"id": "tiiuae/falcon-7b"},
        "dataset": {"id": "timdettmers/openassistant-guanaco"},
        "resources": {"gpusPerNode": 1, "gpuType": "NVIDIA-A100-SXM4-80GB", "memory": "16Gi"},
        "output": {"hub": {"repoId": "org/falcon-qlora", "token": {"secretKeyRef": {"name": "hf-token"}}}},
    }
    base.update(copy.deepcopy(overrides))
    return base


def manifest(name: str, namespace: str, body: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": body,
    }


class Cluster:
    def __init__(self, control_plane: Any, namespace: str) -> None:
        self.cp = control_plane
        self.ns = namespace

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = self.cp.kubectl(*args, input=input)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc

    def apply(self, *objs: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", kind, name, "-n", self.ns, "-o", "json").stdout)  # type: ignore[no-any-return]

    def items(self, kind: str, selector: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", kind, "-n", self.ns, "-l", selector, "-o", "json").stdout
        return list(json.loads(out)["items"])

    def status(self, name: str) -> dict[str, Any]:
        return self.get("ftj", name).get("status") or {}

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
        return poll(check, timeout=timeout, what=what)

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(  # type: ignore[no-any-return]
            f"{name} to be {state}",
            lambda: (s := self.status(name)).get("state") == state and s,
            timeout,
        )

    def jobs(self, name: str) -> list[dict[str, Any]]:
        return self.items("jobs", f"kubetune.io/finetunejob={name}")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl(
            "get", "events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
        return list(json.loads(out)["items"])


@pytest.fixture(scope="module")
def crd(control_plane: Any) -> None:
    proc = control_plane.kubectl("apply", "--server-side", "-f", str(CRD))
    assert proc.returncode == 0, proc.stderr
    proc = control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io"
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def cluster(control_plane: Any, namespace: str, crd: None) -> Cluster:
    c = Cluster(control_plane, namespace)
    c.kubectl(
        "create", "secret", "generic", "hf-token", "-n", namespace, f"--from-literal=token={FAKE_TOKEN}"
    )
    return c


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[Operator]:
    op = Operator(Kube(load_client(cluster.cp.kubeconfig)), namespace=cluster.ns, workers=4).start()
    assert op.wait_synced(30)
    yield op
    op.stop()


# ---------------------------------------------------------------------------------------------------
# The API server enforces our API
# ---------------------------------------------------------------------------------------------------


def test_api_server_rejects_invalid_objects_naming_the_field(cluster: Cluster) -> None:
    from test_crd_rules import NOT_IN_CRD
    from test_invalid import BASE, CASES

    for case_id, mutate, path, fragment in CASES:
        if case_id in NOT_IN_CRD:
            continue
        doc = copy.deepcopy(BASE)
        doc["metadata"]["namespace"] = cluster.ns
        mutate(doc)
        proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc), check=False)
        assert proc.returncode != 0, f"{case_id}: the API server accepted it"
        # The API server names the field: the last part of the path, or the CEL rule's message.
        field = path.rsplit(".", 1)[-1].split("[")[0]
        assert field in proc.stderr or fragment in proc.stderr, f"{case_id}: {proc.stderr}"


# ---------------------------------------------------------------------------------------------------
# The full path
# ---------------------------------------------------------------------------------------------------


def test_apply_runs_on_a_gpu_node_and_succeeds(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(
        manifest(
            "falcon",
            cluster.ns,
            spec(podMetadata={"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "4s"}}),
        )
    )
    running = cluster.wait_state("falcon", "Running")
    [job] = cluster.jobs("falcon")
    assert running["jobName"] == job["metadata"]["name"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    } in container["env"]
    [pod] = cluster.items("pods", f"kubetune.io/run={job['metadata']['name']}")
    node = cluster.get("node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"

    # What the trainer reports on its pod shows up in `kubectl get ftj`.
    report = {"step": 120, "total_steps": 500, "loss": 1.0734, "eta_seconds": 1500, "updated_at": "1"}
    cluster.kubectl(
        "annotate",
        "pod",
        "-n",
        cluster.ns,
        pod["metadata"]["name"],
        f"{PROGRESS_ANNOTATION}={json.dumps(report)}",
    )
    cluster.wait("progress columns", lambda: cluster.status("falcon").get("progress") == "24%")
    table = cluster.kubectl("get", "ftj", "falcon", "-n", cluster.ns).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "STATE", "PROGRESS", "LOSS", "ETA"]
    assert table[1].split()[:5] == ["falcon", "Running", "24%", "1.0734", "25m00s"]

    done = cluster.wait_state("falcon", "Succeeded")
    assert done["progress"] == "100%" and done["observedGeneration"] == 1 and done["completionTime"]
    table = cluster.kubectl("get", "ftj", "falcon", "-n", cluster.ns).stdout.splitlines()
    assert table[1].split()[:5] == ["falcon", "Succeeded", "100%", "1.0734", "0s"]
    reasons = [e["reason"] for e in cluster.events("falcon")]
    assert {"RunCreated", "Started", "Succeeded"} <= set(reasons)
    # Nothing the operator wrote carries the token.
    everything = cluster.kubectl("get", "ftj,jobs,configmaps,events", "-n", cluster.ns, "-o", "yaml").stdout
    assert FAKE_TOKEN not in everything


def test_pod_failure_ends_in_failed_with_the_reason(cluster: Cluster, operator: Operator) -> None:
    fail = {
        "kubetune.io/fake-outcome": "fail",
        "kubetune.io/fake-exit-code": "137",
        "kubetune.io/fake-reason": "OOMKilled",
    }
    cluster.apply(
        manifest("oom", cluster.ns, spec(runPolicy={"backoffLimit": 0}, podMetadata={"annotations": fail}))
    )
    status = cluster.wait_state("oom", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "exited with code 137 (OOMKilled)" in failed["message"]
    assert "BackoffLimitExceeded" in [e["reason"] for e in cluster.events("oom")]


def test_too_many_gpus_is_unschedulable(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(manifest("huge", cluster.ns, spec(resources={"gpusPerNode": 16})))

    def unschedulable() -> dict[str, Any] | None:
        conds = cluster.status("huge").get("conditions") or []
        return next((c for c in conds if c["type"] == "Scheduled" and c["status"] == "False"), None)

    cond = cluster.wait("Unschedulable condition", unschedulable)
    assert cond["reason"] == "Unschedulable" and "nvidia.com/gpu" in cond["message"]
    assert cluster.status("huge")["state"] == "Pending"
    assert "Unschedulable" in [e["reason"] for e in cluster.events("huge")]


def test_invalid_object_past_the_schema_fails_without_crashing_the_operator(
    cluster: Cluster, operator: Operator
) -> None:
    # A token pasted into a prompt passes the CRD (no regex over every string) but not the models.
    bad = manifest("leaky", cluster.ns, spec(samples={"prompts": [f"use {FAKE_TOKEN}"]}))
    cluster.apply(bad, manifest("fine", cluster.ns, spec(podMetadata={"annotations": SLOW})))
    status = cluster.wait_state("leaky", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "secretKeyRef" in failed["message"]
    assert FAKE_TOKEN not in json.dumps(status)
    assert cluster.jobs("leaky") == []
    cluster.wait_state("fine", "Running")  # the other object is served all the same
    # No hot loop: an invalid object is not retried until it changes.
    before = operator.reconciles
    time.sleep(3)
    assert operator.reconciles - before <= 2


def test_delete_garbage_collects_the_children(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(manifest("gone", cluster.ns, spec(podMetadata={"annotations": SLOW})))
    cluster.wait_state("gone", "Running")
    assert len(cluster.jobs("gone")) == 1
    cluster.kubectl("delete", "ftj", "gone", "-n", cluster.ns, "--wait=true")
    cluster.wait(
        "children to be collected",
        lambda: not cluster.jobs("gone") and not cluster.items("configmaps", "kubetune.io/finetunejob=gone"),
    )


# ---------------------------------------------------------------------------------------------------
# GitOps semantics
# ---------------------------------------------------------------------------------------------------


def test_reapply_edit_metadata_and_suspend(cluster: Cluster, operator: Operator) -> None:
    body = spec(podMetadata={"annotations": SLOW})
    cluster.apply(manifest("gitops", cluster.ns, body))
    cluster.wait_state("gitops", "Running")
    [job] = cluster.jobs("gitops")
    first = job["metadata"]["name"]

    # Re-applying the same spec changes nothing.
    cluster.apply(manifest("gitops", cluster.ns, body))
    time.sleep(2)
    [same] = cluster.jobs("gitops")
    assert same["metadata"]["uid"] == job["metadata"]["uid"]

    # Metadata-only edits never start a run.
    cluster.apply(manifest("gitops", cluster.ns, body, labels={"team": "nlp"}, annotations={"note": "x"}))
    time.sleep(2)
    assert [j["metadata"]["uid"] for j in cluster.jobs("gitops")] == [job["metadata"]["uid"]]

    # suspend pauses the run (the Job's pods go away) and resumes it.
    paused = copy.deepcopy(body)
    paused["runPolicy"] = {"suspend": True}
    cluster.apply(manifest("gitops", cluster.ns, paused))
    cluster.wait_state("gitops", "Suspended")
    assert cluster.get("job", first)["spec"]["suspend"] is True
    cluster.wait(
        "pods to stop",
        lambda: (
            not [
                p
                for p in cluster.items("pods", f"kubetune.io/run={first}")
                if not p["metadata"].get("deletionTimestamp")
            ]
        ),
    )
    cluster.apply(manifest("gitops", cluster.ns, body))
    cluster.wait_state("gitops", "Running")
    assert [j["metadata"]["name"] for j in cluster.jobs("gitops")] == [first]  # the same run, resumed

    # Editing the spec starts exactly one new run and stops the old one.
    edited = copy.deepcopy(body)
    edited["training"] = {"learningRate": 1e-4}
    cluster.apply(manifest("gitops", cluster.ns, edited))
    cluster.wait(
        "the old run to stop", lambda: [j["metadata"]["name"] for j in cluster.jobs("gitops")] != [first]
    )
    cluster.wait_state("gitops", "Running")
    jobs = cluster.jobs("gitops")
    assert len(jobs) == 1 and jobs[0]["metadata"]["name"] != first
    assert cluster.status("gitops")["jobName"] == jobs[0]["metadata"]["name"]
    reasons = [e["reason"] for e in cluster.events("gitops")]
    assert reasons.count("RunReplaced") == 1 and reasons.count("RunCreated") == 2


def test_finished_run_is_not_rerun_when_its_job_is_cleaned_up(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(manifest("ttl", cluster.ns, spec(runPolicy={"ttlSecondsAfterFinished": 1})))
    cluster.wait_state("ttl", "Succeeded")
    cluster.wait("the TTL controller to delete the Job", lambda: not cluster.jobs("ttl"), timeout=90)
    time.sleep(3)
    assert cluster.jobs("ttl") == []
    assert cluster.status("ttl")["state"] == "Succeeded"


# ---------------------------------------------------------------------------------------------------
# Restarts and load
# ---------------------------------------------------------------------------------------------------


def _start_operator_process(cluster: Cluster) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "operator",
            "--kubeconfig",
            str(cluster.cp.kubeconfig),
            "--namespace",
            cluster.ns,
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


def test_killing_the_operator_mid_run_creates_no_duplicate_job(cluster: Cluster) -> None:
    proc = _start_operator_process(cluster)
    try:
        cluster.apply(
            manifest(
                "restart",
                cluster.ns,
                spec(podMetadata={"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "8s"}}),
            )
        )
        cluster.wait_state("restart", "Running")
    finally:
        proc.send_signal(signal.SIGKILL)
        first_log = proc.communicate(timeout=30)[0]
    [job] = cluster.jobs("restart")
    proc = _start_operator_process(cluster)
    try:
        cluster.wait_state("restart", "Succeeded")
    finally:
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=30)[0]
    assert [j["metadata"]["uid"] for j in cluster.jobs("restart")] == [job["metadata"]["uid"]]
    lines = [json.loads(line) for line in (first_log + log).splitlines() if line.startswith("{")]
    assert any(r.get("namespace") == cluster.ns and r.get("ftj") == "restart" for r in lines)
    assert FAKE_TOKEN not in first_log + log


def test_a_hundred_jobs_at_once(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    n = 100
    cluster.apply(
        *[manifest(f"load-{i:03d}", cluster.ns, spec(resources={"gpusPerNode": 0})) for i in range(n)]
    )
    kube = Kube(load_client(cluster.cp.kubeconfig))
    op = Operator(kube, namespace=cluster.ns, workers=8)
    start = time.monotonic()
    op.start()
    try:
        cluster.wait(
            f"{n} Jobs",
            lambda: len(cluster.items("jobs", "app.kubernetes.io/managed-by=kubetune")) >= n,
            timeout=300,
        )
        elapsed = time.monotonic() - start
        requests = kube.requests
    finally:
        op.stop()
    owners = [
        j["metadata"]["labels"]["kubetune.io/finetunejob"]
        for j in cluster.items("jobs", "app.kubernetes.io/managed-by=kubetune")
    ]
    assert sorted(owners) == [f"load-{i:03d}" for i in range(n)]  # one Job each, none twice
    with capsys.disabled():
        print(
            f"\n[load] {n} FineTuneJobs -> {n} Jobs in {elapsed:.1f} s; "
            f"{requests} API requests ({requests / n:.1f} per object)"
        )
