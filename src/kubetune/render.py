"""Render a FineTuneJob into the Kubernetes objects that run it.

`render()` is a pure function of the FineTuneJob (no I/O, no clock, no randomness): `kubetune render`
prints exactly what the operator applies, and golden-file tests pin it.

Objects of one run share one name, `<job name>-<spec hash>`: a spec edit gives a new run (a new Job),
re-applying the same spec gives the same names, so nothing is created twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from kubetune import __version__
from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob

DEFAULT_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"
SPEC_MOUNT = "/etc/kubetune"
SPEC_FILE = "job.yaml"
RENDEZVOUS_PORT = 29500
TRAINER_UID = 1000  # USER of the trainer image (Dockerfile)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Time for the trainer to write a checkpoint after SIGTERM (preemption, suspend, spec edit).
TERMINATION_GRACE_SECONDS = 300

LABEL_JOB = "kubetune.io/finetunejob"
LABEL_RUN = "kubetune.io/run"
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"
# The trainer reports its progress.json on its own Pod under this annotation; the operator reads it.
ANNOTATION_PROGRESS = "kubetune.io/progress"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"


def spec_hash(job: FineTuneJob) -> str:
    """Identity of a run: the spec as written, minus runPolicy (suspend, deadlines, TTL and queue
    steer the run, they do not make it a different run). Defaults are left out, so writing a default
    explicitly, or a kubetune upgrade that adds a field, never starts a new run."""
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude={"run_policy"})
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_name(job: FineTuneJob) -> str:
    # 54 + "-" + 8 = 63: a Job name must fit in a label value.
    return f"{job.metadata.name[:54].rstrip('-')}-{spec_hash(job)[:8]}"


def labels(job: FineTuneJob) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "kubetune",
        "app.kubernetes.io/version": __version__,
        LABEL_JOB: job.metadata.name,
        LABEL_RUN: run_name(job),
    }
    if job.spec.run_policy.queue_name:
        out[LABEL_QUEUE] = job.spec.run_policy.queue_name
    return out


def _metadata(job: FineTuneJob, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    meta["labels"] = labels(job)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(job)}
    if job.metadata.uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": job.metadata.name,
                "uid": job.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def spec_document(job: FineTuneJob) -> str:
    """The file the trainer reads: the FineTuneJob with every default resolved (full lineage), and
    nothing from metadata but its name, namespace and generation."""
    meta: dict[str, Any] = {"name": job.metadata.name}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def render_configmap(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, run_name(job)),
        "data": {SPEC_FILE: spec_document(job)},
    }


def render_service(job: FineTuneJob) -> dict[str, Any]:
    """Headless Service giving pod 0 a stable DNS name for the multi-node rendezvous."""
    name = run_name(job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _env(job: FineTuneJob, name: str) -> list[dict[str, Any]]:
    spec = job.spec
    res = spec.resources
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_SPEC", "value": f"{SPEC_MOUNT}/{SPEC_FILE}"},
        {"name": "KUBETUNE_NUM_NODES", "value": str(res.nodes)},
        {"name": "KUBETUNE_GPUS_PER_NODE", "value": str(res.gpus_per_node)},
        {"name": "KUBETUNE_DISTRIBUTED", "value": spec.training.distributed},
        {"name": "KUBETUNE_MASTER_ADDR", "value": f"{name}-0.{name}" if res.nodes > 1 else "127.0.0.1"},
        {"name": "KUBETUNE_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "KUBETUNE_WORKDIR", "value": spec.storage.mount_path},
        {"name": "HF_HOME", "value": f"{spec.storage.mount_path}/.cache/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The trainer reports progress on its own Pod (kubetune.io/progress) for `kubectl get ftj`.
        {"name": "KUBETUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBETUNE_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if spec.output.hub is not None:
        ref = spec.output.hub.token.secret_key_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _pod_metadata(job: FineTuneJob) -> dict[str, Any]:
    extra = job.spec.pod_metadata
    meta: dict[str, Any] = {"labels": {**extra.labels, **labels(job)}}
    if extra.annotations:
        meta["annotations"] = dict(extra.annotations)
    return meta


def render_job(job: FineTuneJob, image: str | None = None) -> dict[str, Any]:
    spec, res, policy = job.spec, job.spec.resources, job.spec.run_policy
    name = run_name(job)
    requests: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = res.memory
    if res.gpus_per_node:
        requests[GPU_RESOURCE] = str(res.gpus_per_node)
    container: dict[str, Any] = {
        "name": "trainer",
        "image": spec.image or image or DEFAULT_IMAGE,
        "command": ["python", "-m", "kubetune.launch"],
        "env": _env(job, name),
        "resources": {"requests": dict(requests), "limits": dict(requests)},
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "workspace", "mountPath": spec.storage.mount_path},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if res.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    workspace: dict[str, Any] = {"name": "workspace"}
    if spec.storage.claim_name:
        workspace["persistentVolumeClaim"] = {"claimName": spec.storage.claim_name}
    else:
        workspace["emptyDir"] = {}
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.gpus_per_node:
        tolerations.insert(0, {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    node_selector = dict(res.node_selector)
    if res.gpu_type:
        node_selector[GPU_PRODUCT_LABEL] = res.gpu_type
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer image's user; fsGroup makes a root-owned PersistentVolumeClaim writable to it.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": name}},
            workspace,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}},
        ],
    }
    if res.nodes > 1:
        pod_spec["subdomain"] = name
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    job_spec: dict[str, Any] = {
        "suspend": policy.suspend,
        "backoffLimit": policy.backoff_limit,
        # One pod per node; Indexed gives each a stable hostname and JOB_COMPLETION_INDEX (its rank).
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        # A preempted or evicted pod is not a failure: it is replaced and resumes from its checkpoint.
        "podFailurePolicy": {
            "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
        },
        "template": {"metadata": _pod_metadata(job), "spec": pod_spec},
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(job, name), "spec": job_spec}


def render(job: FineTuneJob, image: str | None = None) -> list[dict[str, Any]]:
    """Every object of the run, in the order they should be applied."""
    objects = [render_configmap(job)]
    if job.spec.resources.nodes > 1:
        objects.append(render_service(job))
    objects.append(render_job(job, image))
    return objects


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the mounted spec) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)
