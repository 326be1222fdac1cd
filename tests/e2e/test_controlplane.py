"""The e2e control plane is a real one: real API server, scheduler, Job and garbage collectors, RBAC.

Pods run on kwok's fake nodes; the stages in hack/controlplane/stages/ make a Job-owned pod succeed
after ~1.5 s, or fail (exit code 1, reason Error) when annotated kubetune.io/fake-outcome: fail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from controlplane import ROOT, ControlPlane, poll

pytestmark = pytest.mark.e2e

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODES = {"gpu-a100-0", "gpu-a100-1"}
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))
CRD = ROOT / "manifests" / "crd" / "kubetune.io_finetunejobs.yaml"


def job(
    name: str,
    *,
    gpus: int = 0,
    tolerate_gpu: bool = False,
    annotations: dict[str, str] | None = None,
    backoff_limit: int = 0,
) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [GPU_TOLERATION] if tolerate_gpu else [],
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "ghcr.io/kubetune/trainer:e2e",
                            "command": ["python", "-m", "kubetune.trainer"],
                            "resources": resources,
                        }
                    ],
                },
            },
        },
    }


def only_pod(cp: ControlPlane, namespace: str, job_name: str) -> dict[str, Any]:
    pods = cp.pods(namespace, f"job-name={job_name}")
    assert len(pods) == 1, f"pods of {job_name}: {[p['metadata']['name'] for p in pods]}"
    return pods[0]


def pod_when(
    cp: ControlPlane, namespace: str, job_name: str, ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the Job's only pod until ok(pod); return it."""

    def check() -> dict[str, Any] | None:
        pod = only_pod(cp, namespace, job_name)
        return pod if ok(pod) else None

    return poll(check, timeout=60, what=f"the pod of Job {job_name}")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), None)


def test_version_is_the_stamped_release(control_plane: ControlPlane) -> None:
    assert re.fullmatch(r"v1\.\d+\.\d+", control_plane.version)
    server = json.loads(control_plane.kubectl("get", "--raw", "/version", check=True).stdout)
    assert server["gitVersion"] == control_plane.version
    assert server["gitTreeState"] == "clean"
    assert f"{server['major']}.{server['minor']}" == control_plane.version[1:].rsplit(".", 1)[0]
    both = json.loads(control_plane.kubectl("version", "-o", "json", check=True).stdout)
    assert both["clientVersion"]["gitVersion"] == control_plane.version
    assert both["serverVersion"]["gitVersion"] == control_plane.version


def test_fake_gpu_nodes(control_plane: ControlPlane) -> None:
    nodes = {n["metadata"]["name"]: n for n in control_plane.get("nodes")["items"]}
    assert set(nodes) >= {*GPU_NODES, "cpu-0"}
    for name in GPU_NODES:
        node = nodes[name]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
        assert node["spec"]["taints"] == [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
        ]
        assert condition(node, "Ready")["status"] == "True"  # type: ignore[index]
    assert "nvidia.com/gpu" not in nodes["cpu-0"]["status"]["allocatable"]
    assert not nodes["cpu-0"]["spec"].get("taints")


def test_gpu_job_runs_on_a_gpu_node_and_completes(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(job("gpu", gpus=1, tolerate_gpu=True), namespace=namespace)

    # Running lasts only ~1.5 s: accept a pod that already finished, so a slow poll cannot miss it.
    started = pod_when(cp, namespace, "gpu", lambda p: p["status"].get("phase") in ("Running", "Succeeded"))
    assert started["spec"]["nodeName"] in GPU_NODES

    done = cp.wait_for_condition("job/gpu", "Complete", namespace=namespace, timeout=60)
    assert done["status"]["succeeded"] == 1
    pod = only_pod(cp, namespace, "gpu")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_cpu_pod_keeps_off_the_tainted_gpu_nodes(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(job("cpu"), namespace=namespace)
    pod = pod_when(cp, namespace, "cpu", lambda p: bool(p["spec"].get("nodeName")))
    assert pod["spec"]["nodeName"] == "cpu-0"
    cp.wait_for_condition("job/cpu", "Complete", namespace=namespace, timeout=60)


def test_fail_annotation_fails_the_job(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(
        job("crash", gpus=1, tolerate_gpu=True, annotations={"kubetune.io/fake-outcome": "fail"}),
        namespace=namespace,
    )
    failed = cp.wait_for_condition("job/crash", "Failed", namespace=namespace, timeout=60)
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"  # type: ignore[index]
    assert failed["status"].get("failed") == 1
    assert not failed["status"].get("succeeded")
    pod = only_pod(cp, namespace, "crash")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 1
    assert terminated["reason"] == "Error"


def test_fake_exit_code_drives_the_pod_failure_policy(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    spec = job(
        "oom",
        gpus=8,
        tolerate_gpu=True,
        backoff_limit=3,
        annotations={
            "kubetune.io/fake-outcome": "fail",
            "kubetune.io/fake-exit-code": "42",
            "kubetune.io/fake-reason": "OOMKilled",
        },
    )
    spec["spec"]["podFailurePolicy"] = {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [42]},
            }
        ]
    }
    cp.apply(spec, namespace=namespace)
    failed = cp.wait_for_condition("job/oom", "Failed", namespace=namespace, timeout=60)
    assert condition(failed, "Failed")["reason"] == "PodFailurePolicy"  # type: ignore[index]
    terminated = only_pod(cp, namespace, "oom")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (42, "OOMKilled")


def test_ttl_after_finished_deletes_the_job(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    spec = job("shortlived")
    spec["spec"]["ttlSecondsAfterFinished"] = 0
    cp.apply(spec, namespace=namespace)
    poll(
        lambda: cp.kubectl("get", "job", "shortlived", f"--namespace={namespace}").returncode != 0,
        timeout=60,
        what="ttl-after-finished-controller to delete the finished Job",
    )


def test_too_many_gpus_stays_pending_unschedulable(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(job("greedy", gpus=100, tolerate_gpu=True), namespace=namespace)

    def unschedulable() -> dict[str, Any] | None:
        pod = only_pod(cp, namespace, "greedy")
        cond = condition(pod, "PodScheduled")
        assert cond, "no PodScheduled condition yet"
        return pod if cond["status"] == "False" and cond["reason"] == "Unschedulable" else None

    pod = poll(unschedulable, timeout=60, what="PodScheduled=False/Unschedulable")
    assert pod["status"]["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in condition(pod, "PodScheduled")["message"]  # type: ignore[index]
    status = cp.get("job/greedy", f"--namespace={namespace}")["status"]
    assert not status.get("succeeded") and not status.get("failed")


def test_rbac_is_enforced_for_service_account_tokens(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    cp = control_plane
    cp.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
        namespace=namespace,
    )
    # TokenRequest API (what a projected service-account token volume gets).
    token = cp.kubectl("create", "token", "reader", f"--namespace={namespace}", "--duration=10m", check=True)
    as_reader = cp.kubeconfig_for_token(token.stdout.strip(), tmp_path / "reader.kubeconfig")

    whoami = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=as_reader, check=True).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"

    # Allowed by the RoleBinding (RBAC caches may lag a moment behind the binding's creation).
    poll(
        lambda: cp.kubectl("get", "pods", f"--namespace={namespace}", kubeconfig=as_reader).returncode == 0,
        timeout=30,
        what="the reader to list pods",
    )
    denied = cp.kubectl("get", "secrets", f"--namespace={namespace}", kubeconfig=as_reader)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr or "forbidden" in denied.stderr, denied.stderr
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr
    assert (
        cp.kubectl(
            "auth", "can-i", "list", "secrets", f"--namespace={namespace}", kubeconfig=as_reader
        ).stdout.strip()
        == "no"
    )

    garbage = cp.kubeconfig_for_token("not-a-token", tmp_path / "garbage.kubeconfig")
    rejected = cp.kubectl("get", "pods", f"--namespace={namespace}", kubeconfig=garbage)
    assert rejected.returncode != 0 and "Unauthorized" in rejected.stderr, rejected.stderr


def test_deleting_a_job_garbage_collects_its_pods(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    # A pod that would run for an hour: it is still Running when the Job goes.
    cp.apply(
        job(
            "doomed", gpus=1, tolerate_gpu=True, annotations={"pod-complete.stage.kwok.x-k8s.io/delay": "1h"}
        ),
        namespace=namespace,
    )
    pod = pod_when(cp, namespace, "doomed", lambda p: p["status"].get("phase") == "Running")
    assert pod["spec"]["nodeName"] in GPU_NODES
    assert condition(pod, "Ready")["status"] == "True"  # type: ignore[index]
    owners = pod["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o.get("controller")) for o in owners] == [("Job", "doomed", True)]

    cp.kubectl("delete", "job", "doomed", f"--namespace={namespace}", "--wait=false", check=True)
    poll(
        lambda: not cp.pods(namespace, "job-name=doomed"),
        timeout=60,
        what="the garbage collector to delete the Job's pod",
    )
    assert cp.kubectl("get", "job", "doomed", f"--namespace={namespace}").returncode != 0


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> str:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD), check=True)
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s", check=True
    )
    return "finetunejobs.kubetune.io"


def test_crd_explain_shows_field_docs(control_plane: ControlPlane, crd: str) -> None:
    # The OpenAPI document that explain reads is published a moment after the CRD is Established.
    def explained() -> str | None:
        proc = control_plane.kubectl("explain", "finetunejob.spec")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout if "FIELDS:" in proc.stdout else None

    out = poll(explained, timeout=60, what="kubectl explain finetunejob.spec")
    assert "GROUP:      kubetune.io" in out
    for field in ("model", "dataset", "method", "training", "resources", "output"):
        assert re.search(rf"^  {field}\t", out, re.M), f"{field} missing from:\n{out}"
    # Field documentation, not just names: every field line is followed by its description.
    descriptions = [line for line in out.splitlines() if line.startswith("    ") and line.strip()]
    assert len(descriptions) >= 6, out


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_server_side_validation(
    control_plane: ControlPlane, crd: str, namespace: str, example: Path
) -> None:
    proc = control_plane.kubectl("apply", "--dry-run=server", f"--namespace={namespace}", "-f", str(example))
    assert proc.returncode == 0, proc.stderr
    assert "(server dry run)" in proc.stdout


def test_invalid_finetunejob_is_rejected_by_the_server(
    control_plane: ControlPlane, crd: str, namespace: str
) -> None:
    bad = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bad"},
        "spec": {},
    }
    proc = control_plane.kubectl(
        "apply", "--dry-run=server", f"--namespace={namespace}", "-f", "-", input=json.dumps(bad)
    )
    assert proc.returncode != 0
    assert "Invalid" in proc.stderr or "invalid" in proc.stderr, proc.stderr
