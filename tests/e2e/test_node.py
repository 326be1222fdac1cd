"""The real e2e node is a real one: containerd, runc and a kubelet running the images of this checkout.

What KWOK cannot show, shown here: the trainer image's stack imports; a container over its memory limit
is OOMKilled; a missing Secret is CreateContainerConfigError; logs and termination messages come back
through the API server; an eviction SIGTERMs the container within its grace period; a PVC of the
default class binds (on the real node and on a KWOK node) and a pod writes to it as uid 1000.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from controlplane import ControlPlane, poll
from node import STORAGE_CLASS, TRAINER_UID, RealNode

pytestmark = pytest.mark.e2e

POD_TIMEOUT = 180  # the first pod of a session also waits for the kubelet's first sync


def pod(
    real_node: RealNode,
    name: str,
    script: str,
    *,
    memory: str = "256Mi",
    **spec: Any,
) -> dict[str, Any]:
    """A pod on the real node that runs `python -c script` in the trainer image."""
    container: dict[str, Any] = {
        "name": "main",
        "image": real_node.trainer_image,
        "imagePullPolicy": "Never",  # loaded into containerd by hack/node/images.sh; nothing to pull
        "command": ["python", "-c", script],
        "resources": {"requests": {"cpu": "50m", "memory": memory}, "limits": {"memory": memory}},
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **spec.pop("metadata", {})},
        "spec": {"restartPolicy": "Never", **real_node.placement, "containers": [container], **spec},
    }


def pod_until(
    cp: ControlPlane, namespace: str, name: str, ok: Callable[[dict[str, Any]], Any], what: str
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj: dict[str, Any] = cp.get("pod", name, f"--namespace={namespace}")
        if ok(obj):
            return obj
        status = obj.get("status", {})
        states = [c.get("state") for c in status.get("containerStatuses") or []]
        raise AssertionError(f"phase {status.get('phase')}, containers {states}")  # shown on timeout

    return poll(check, timeout=POD_TIMEOUT, what=f"pod {name}: {what}")


def terminated(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The container's terminated state, once the pod's phase says so too (it follows a moment later)."""
    if obj.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
        return None
    statuses = obj["status"].get("containerStatuses") or []
    state = statuses[0].get("state", {}) if statuses else {}
    return state.get("terminated")  # type: ignore[no-any-return]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), None)


def test_node_is_ready_labelled_and_tainted(control_plane: ControlPlane, real_node: RealNode) -> None:
    node = control_plane.get("node", real_node.name)
    assert condition(node, "Ready")["status"] == "True"  # type: ignore[index]
    assert node["metadata"]["labels"]["kubetune.io/e2e-node"] == "real"
    assert node["spec"]["taints"] == [
        {"key": "kubetune.io/e2e-node", "value": "real", "effect": "NoSchedule"}
    ]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == control_plane.version
    assert info["containerRuntimeVersion"].startswith("containerd://1.")
    # The API server reaches the kubelet at the Hostname address, on loopback.
    assert {"type": "Hostname", "address": "localhost"} in node["status"]["addresses"]
    images = {name for image in node["status"].get("images", []) for name in image.get("names") or []}
    assert {real_node.trainer_image, real_node.operator_image, real_node.faults_image} <= images


def test_a_job_imports_the_trainer_stack_to_completion(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    cp = control_plane
    script = (
        "import os, torch, bitsandbytes, kubetune; "
        "print('stack ok', torch.__version__, bitsandbytes.__version__, kubetune.__version__, "
        "'uid', os.getuid())"
    )
    template = pod(real_node, "imports", script, memory="2Gi")
    cp.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "imports"},
            "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}},
        },
        namespace=namespace,
    )
    cp.wait_for_condition("job/imports", "Complete", namespace=namespace, timeout=POD_TIMEOUT)
    [done] = cp.pods(namespace, "job-name=imports")
    assert done["spec"]["nodeName"] == real_node.name
    assert done["status"]["phase"] == "Succeeded"
    assert terminated(done)["exitCode"] == 0  # type: ignore[index]
    log = real_node.logs(namespace, done["metadata"]["name"])
    assert "stack ok 2.13.0" in log, log
    assert log.strip().endswith(f"uid {TRAINER_UID}"), log


def test_a_container_over_its_memory_limit_is_oomkilled(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    cp = control_plane
    # 400 MB of touched pages against a 64 Mi limit: the kernel's OOM killer, not a Python MemoryError.
    cp.apply(
        pod(real_node, "hog", "b = b'x' * (400 << 20); print(len(b))", memory="64Mi"), namespace=namespace
    )
    done = pod_until(cp, namespace, "hog", terminated, "terminated")
    state = terminated(done)
    assert (state["reason"], state["exitCode"]) == ("OOMKilled", 137), state  # type: ignore[index]
    assert done["status"]["phase"] == "Failed"


def test_a_missing_secret_is_create_container_config_error(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    cp = control_plane
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "nosuch", "key": "token"}}}]
    cp.apply(pod(real_node, "nosecret", "print('never')", container={"env": env}), namespace=namespace)

    def waiting(obj: dict[str, Any]) -> dict[str, Any] | None:
        statuses = obj.get("status", {}).get("containerStatuses") or []
        state = statuses[0].get("state", {}).get("waiting") if statuses else None
        return state if state and state.get("reason") == "CreateContainerConfigError" else None

    state = waiting(pod_until(cp, namespace, "nosecret", waiting, "CreateContainerConfigError"))
    assert state is not None and state["message"] == 'secret "nosuch" not found', state


def test_logs_and_termination_messages_come_back(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    cp = control_plane
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    # Writes no termination message and fails: the log's tail stands in for it.
    cp.apply(
        pod(
            real_node,
            "crash",
            # One stream: the kubelet keeps the order of lines within a stream, not across stdout
            # and stderr (they were seen swapped in CI).
            "import sys; print('loading', file=sys.stderr, flush=True); "
            "print('bad column: text', file=sys.stderr); sys.exit(3)",
            container=fallback,
        ),
        # Writes one (as the trainer does) and fails: that message wins over the log.
        pod(
            real_node,
            "message",
            "import sys; open('/dev/termination-log', 'w').write('DatasetError: no column text'); "
            "sys.exit(3)",
            container=fallback,
        ),
        namespace=namespace,
    )
    crash = terminated(pod_until(cp, namespace, "crash", terminated, "terminated"))
    assert crash is not None and crash["exitCode"] == 3 and crash["reason"] == "Error", crash
    assert crash["message"] == "loading\nbad column: text\n", crash
    assert real_node.logs(namespace, "crash") == "loading\nbad column: text\n"
    message = terminated(pod_until(cp, namespace, "message", terminated, "terminated"))
    assert message is not None and message["message"] == "DatasetError: no column text", message


def test_the_faults_image_fails_the_first_training_step(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    """The faults image's hook is live in the image (its .pth), and only there."""
    cp = control_plane
    script = (
        "import torch, transformers\n"
        "try:\n"
        "    transformers.Trainer.training_step(None, None, None)\n"
        "except torch.OutOfMemoryError as e:\n"
        "    print('OOM:', e)\n"
    )
    faulty = pod(real_node, "faulty", script, memory="2Gi", container={"image": real_node.faults_image})
    plain = pod(real_node, "plain", script, memory="2Gi")
    cp.apply(faulty, plain, namespace=namespace)
    state = terminated(pod_until(cp, namespace, "faulty", terminated, "terminated"))
    assert state is not None and state["exitCode"] == 0, (state, real_node.logs(namespace, "faulty"))
    log = real_node.logs(namespace, "faulty")
    oom = "CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the kubetune e2e faults image)"
    assert f"OOM: {oom}\n" in log, log

    state = terminated(pod_until(cp, namespace, "plain", terminated, "terminated"))
    assert state is not None and state["exitCode"] == 1, state  # the real training_step, on None
    assert "OOM:" not in real_node.logs(namespace, "plain")


def test_eviction_sigterms_the_container_within_its_grace_period(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    cp = control_plane
    script = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        "    print('SIGTERM: checkpointing', flush=True)\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('training', flush=True)\n"
        "time.sleep(600)\n"
    )
    # The finalizer keeps the evicted pod's object, with its final status, until the test has read it.
    hold = "kubetune.io/e2e-hold"
    spec = pod(
        real_node, "evictee", script, terminationGracePeriodSeconds=23, metadata={"finalizers": [hold]}
    )
    cp.apply(spec, namespace=namespace)
    try:
        pod_until(cp, namespace, "evictee", lambda p: p["status"].get("phase") == "Running", "Running")
        poll(
            lambda: "training" in real_node.logs(namespace, "evictee"),
            timeout=60,
            what="the script to be running",
        )
        started = time.monotonic()
        real_node.evict(namespace, "evictee")
        done = pod_until(cp, namespace, "evictee", terminated, "terminated")
        took = time.monotonic() - started
        state = terminated(done)
        assert state is not None and state["exitCode"] == 143, state  # its own handler, not SIGKILL (137)
        assert took < 23, f"SIGTERM came {took:.1f} s after the eviction"
        assert done["metadata"]["deletionGracePeriodSeconds"] == 23
        disruption = condition(done, "DisruptionTarget")
        assert disruption is not None and disruption["status"] == "True", done["status"].get("conditions")
        assert disruption["reason"] == "EvictionByEvictionAPI", disruption
        assert "SIGTERM: checkpointing" in real_node.logs(namespace, "evictee")
    finally:
        cp.kubectl(
            "patch", "pod", "evictee", f"--namespace={namespace}", "--type=json",
            "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]',
        )  # fmt: skip


def pvc(name: str) -> dict[str, Any]:
    # No storageClassName: the DefaultStorageClass admission plugin gives it kubetune-local.
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def bound(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj: dict[str, Any] = cp.get("pvc", name, f"--namespace={namespace}")
        return obj if obj.get("status", {}).get("phase") == "Bound" else None

    return poll(check, timeout=60, what=f"PVC {name} to be Bound")


def test_a_pvc_binds_and_the_trainer_uid_writes_to_it(
    control_plane: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    cp = control_plane
    cp.apply(pvc("workspace"), namespace=namespace)
    claim = bound(cp, namespace, "workspace")
    assert claim["spec"]["storageClassName"] == STORAGE_CLASS
    script = (
        "import os; open('/workspace/out.txt', 'w').write(f'written by {os.getuid()}:{os.getgid()}'); "
        "os.makedirs('/workspace/output/checkpoints')"
    )
    volume = [{"name": "workspace", "persistentVolumeClaim": {"claimName": "workspace"}}]
    mount = {"volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}]}
    cp.apply(pod(real_node, "writer", script, volumes=volume, container=mount), namespace=namespace)
    state = terminated(pod_until(cp, namespace, "writer", terminated, "terminated"))
    assert state is not None and state["exitCode"] == 0, (state, real_node.logs(namespace, "writer"))

    host = real_node.volume_dir(namespace, "workspace")
    assert host.is_relative_to(real_node.volumes)
    written = host / "out.txt"
    assert written.read_text() == f"written by {TRAINER_UID}:{TRAINER_UID}"
    assert (written.stat().st_uid, written.stat().st_gid) == (TRAINER_UID, TRAINER_UID)
    assert (host / "output" / "checkpoints").is_dir()

    # Reclaim policy Delete: once the claim is gone (its pod first), so are the PV and the folder.
    volume_name = claim["spec"]["volumeName"]
    cp.kubectl("delete", "pod", "writer", f"--namespace={namespace}", "--wait=true", check=True)
    cp.kubectl("delete", "pvc", "workspace", f"--namespace={namespace}", "--wait=true", check=True)
    poll(
        lambda: cp.kubectl("get", "pv", volume_name).returncode != 0 and not host.exists(),
        timeout=60,
        what=f"PV {volume_name} and {host} to be deleted",
    )


def test_a_pvc_binds_for_a_pod_on_a_kwok_node(control_plane: ControlPlane, namespace: str) -> None:
    cp = control_plane
    cp.apply(
        pvc("data"),
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "kwok-with-volume"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                        "containers": [
                            {
                                "name": "main",
                                "image": "ghcr.io/kubetune/trainer:e2e",
                                "volumeMounts": [{"name": "data", "mountPath": "/workspace"}],
                            }
                        ],
                    }
                },
            },
        },
        namespace=namespace,
    )
    bound(cp, namespace, "data")
    cp.wait_for_condition("job/kwok-with-volume", "Complete", namespace=namespace, timeout=60)
    [done] = cp.pods(namespace, "job-name=kwok-with-volume")
    assert done["spec"]["nodeName"] == "cpu-0"  # not the real node: it is tainted
