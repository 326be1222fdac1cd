"""Render a FineTuneJob into the Kubernetes objects that run it.

`render()` is a pure function of the FineTuneJob (no I/O, no clock, no randomness): `kubetune render`
prints exactly what the operator applies, and golden-file tests pin it.

Objects of one run share one name, `<job name>-<spec hash>`: a spec edit gives a new run (a new Job),
re-applying the same spec gives the same names, so nothing is created twice. The workspace claim is the
FineTuneJob's, `<job name>-workspace`, shared by its runs. Names, labels, env variables and exit codes
that cross into the trainer are kubetune.contract's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune import __version__
from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob, SecretSource
from kubetune.contract import (
    ANNOTATION_SOURCE_COMMIT,
    ANNOTATION_SOURCE_REPO,
    ANNOTATION_SPEC_HASH,
    ENV_DISTRIBUTED,
    ENV_GPUS_PER_NODE,
    ENV_HF_TOKEN,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_NUM_NODES,
    ENV_RUN,
    ENV_SPEC,
    ENV_TERMINATION_LOG,
    ENV_WORKDIR,
    FAIL_FAST_EXIT_CODES,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_QUEUE,
    LABEL_RUN,
    MANAGED_BY_VALUE,
    RENDEZVOUS_PORT,
    SHM_MOUNT,
    SPEC_FILE,
    SPEC_MOUNT,
    SPEC_PATH,
    TERMINATION_LOG,
    TRAINER_UID,
    Exit,
)

DEFAULT_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"
CONTAINER = "trainer"
# The init container that tokenizes the data into the workspace's cache before the trainer starts
# (kubetune.trainer.prepare): no training process waits on it under a collective's timeout.
PREPARE_CONTAINER = "prepare"
PREPARE_COMMAND = ["python", "-m", "kubetune.trainer.prepare"]
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Time for the trainer to write a checkpoint after SIGTERM (preemption, suspend, spec edit).
TERMINATION_GRACE_SECONDS = 300
WORKSPACE_SUFFIX = "-workspace"


def spec_hash(job: FineTuneJob) -> str:
    """Identity of a run: the spec as written, minus runPolicy (suspend, deadlines, TTL and queue
    steer the run, they do not make it a different run) and storage.reclaimPolicy (what happens to the
    workspace when the FineTuneJob goes). Defaults are left out, so writing a default explicitly, or a
    kubetune upgrade that adds a field, never starts a new run."""
    if job.spec._digest is None:
        job.spec._digest = _digest(job)
    return job.spec._digest


def _digest(job: FineTuneJob) -> str:
    spec = job.spec.model_dump(
        mode="json",
        by_alias=True,
        exclude_defaults=True,
        exclude={"run_policy": True, "storage": {"reclaim_policy"}},
    )
    spec = {k: v for k, v in spec.items() if v != {}}  # a section left empty by the exclusions
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_name(job: FineTuneJob) -> str:
    # 54 + "-" + 8 = 63: a Job name must fit in a label value.
    return f"{job.metadata.name[:54].rstrip('-')}-{spec_hash(job)[:8]}"


def workspace_claim(job: FineTuneJob) -> str | None:
    """The PersistentVolumeClaim mounted as the workspace: the one named in the spec, the one
    kubetune creates (`<name>-workspace`, one per FineTuneJob, shared by its runs), or None for an
    emptyDir."""
    storage = job.spec.storage
    if storage.ephemeral:
        return None
    return storage.claim_name or f"{job.metadata.name}{WORKSPACE_SUFFIX}"


def output_path(job: FineTuneJob) -> str:
    """The folder the run writes into: `<output.path>/runs/<run name>` (relative output paths start
    at the workspace's mount path, as the trainer resolves them)."""
    root = posixpath.join(job.spec.storage.mount_path, job.spec.output.path)
    return posixpath.join(posixpath.normpath(root), "runs", run_name(job))


def _owner(job: FineTuneJob) -> list[dict[str, Any]]:
    if not job.metadata.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.metadata.name,
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def labels(job: FineTuneJob, *, run: bool = True) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "trainer" if run else "workspace",
        LABEL_MANAGED_BY: MANAGED_BY_VALUE,
        "app.kubernetes.io/version": __version__,
        LABEL_JOB: job.metadata.name,
    }
    if run:
        out[LABEL_RUN] = run_name(job)
        if job.spec.run_policy.queue_name:
            out[LABEL_QUEUE] = job.spec.run_policy.queue_name
    return out


def _metadata(job: FineTuneJob, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    meta["labels"] = labels(job)
    meta["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(job)}
    owner = _owner(job)
    if owner:
        meta["ownerReferences"] = owner
    return meta


# The annotations of the FineTuneJob that reach the trainer's spec file (for the model card's lineage).
SPEC_FILE_ANNOTATIONS = (ANNOTATION_SOURCE_COMMIT, ANNOTATION_SOURCE_REPO)


def spec_document(job: FineTuneJob) -> str:
    """The file the trainer reads: the FineTuneJob with every default resolved (full lineage), and
    from metadata only its name, namespace, UID and GitOps source annotations (SPEC_FILE_ANNOTATIONS):
    no labels, no other annotation (kubectl's last-applied copy of the object, anyone's notes)."""
    meta: dict[str, Any] = {"name": job.metadata.name}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    if job.metadata.uid:
        meta["uid"] = job.metadata.uid
    annotations = {
        k: job.metadata.annotations[k] for k in SPEC_FILE_ANNOTATIONS if k in job.metadata.annotations
    }
    if annotations:
        meta["annotations"] = annotations
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return yaml.dump(doc, Dumper=_FastDumper, sort_keys=False)


def render_configmap(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, run_name(job)),
        "data": {SPEC_FILE: spec_document(job)},
    }


# The API server refuses a ConfigMap whose data (keys and values, in bytes) pass 1 MiB.
CONFIGMAP_MAX_BYTES = 1024 * 1024


def configmap_bytes(job: FineTuneJob) -> int:
    """The size of the run's ConfigMap data as the API server counts it (`kubetune validate` and the
    operator refuse a spec whose ConfigMap would not fit)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in render_configmap(job)["data"].items())


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


def render_claim(job: FineTuneJob) -> dict[str, Any] | None:
    """The workspace PersistentVolumeClaim kubetune creates, or None (storage.claimName names an
    existing one, or storage.ephemeral asks for an emptyDir). One per FineTuneJob, not per run, so a
    new run (a spec edit) finds the model and data caches of the last one. Owned by the FineTuneJob
    (deleted with it) unless reclaimPolicy is Retain."""
    storage = job.spec.storage
    if not storage.creates_claim:
        return None
    meta: dict[str, Any] = {"name": workspace_claim(job)}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    meta["labels"] = labels(job, run=False)
    owner = _owner(job) if storage.reclaim_policy == "Delete" else []
    if owner:
        meta["ownerReferences"] = owner
    # Every pod of a multi-node run mounts it, each on its own node.
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany" if job.spec.resources.nodes > 1 else "ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


# The tracker credentials' environment variables: the names MLflow and W&B read themselves.
ENV_MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
ENV_WANDB_API_KEY = "WANDB_API_KEY"


@dataclass(frozen=True)
class SecretRef:
    """A Secret the trainer reads, through one environment variable of its container."""

    field: str  # the spec field of the SecretSource, e.g. spec.output.hub.token
    env: str  # the environment variable that holds the value
    name: str  # the Secret
    key: str  # the key inside it
    holds: str  # what the value is, for messages: "Hugging Face token with write access"


def secret_refs(job: FineTuneJob) -> list[SecretRef]:
    """Every Secret the run's pods read, in the order of their env: the Hub token, and the credentials
    of the trackers in training.reportTo (a tracker not reported to gets none of its Secrets). The
    operator's SecretMissing check and the trainer's fail-fast check go through the same list."""
    spec = job.spec
    found: list[tuple[str, str, SecretSource | None, str]] = []  # field, env, source, what it holds
    if spec.output.hub is not None:
        found.append(
            (
                "spec.output.hub.token",
                ENV_HF_TOKEN,
                spec.output.hub.token,
                "Hugging Face token with write access",
            )
        )
    trackers, report_to = spec.training.trackers, spec.training.report_to
    if "mlflow" in report_to and trackers.mlflow is not None:
        found.append(
            (
                "spec.training.trackers.mlflow.password",
                ENV_MLFLOW_PASSWORD,
                trackers.mlflow.password,
                "MLflow password",
            )
        )
        found.append(
            ("spec.training.trackers.mlflow.token", ENV_MLFLOW_TOKEN, trackers.mlflow.token, "MLflow token")
        )
    if "wandb" in report_to and trackers.wandb is not None:
        found.append(
            ("spec.training.trackers.wandb.apiKey", ENV_WANDB_API_KEY, trackers.wandb.api_key, "W&B API key")
        )
    return [
        SecretRef(field, env, source.secret_key_ref.name, source.secret_key_ref.key, holds)
        for field, env, source, holds in found
        if source is not None
    ]


def _env(job: FineTuneJob, name: str) -> list[dict[str, Any]]:
    spec = job.spec
    res = spec.resources
    env: list[dict[str, Any]] = [
        {"name": ENV_SPEC, "value": SPEC_PATH},
        {"name": ENV_RUN, "value": name},
        {"name": ENV_NUM_NODES, "value": str(res.nodes)},
        {"name": ENV_GPUS_PER_NODE, "value": str(res.gpus_per_node)},
        {"name": ENV_DISTRIBUTED, "value": spec.training.distributed},
        {"name": ENV_MASTER_ADDR, "value": f"{name}-0.{name}" if res.nodes > 1 else "127.0.0.1"},
        {"name": ENV_MASTER_PORT, "value": str(RENDEZVOUS_PORT)},
        {"name": ENV_WORKDIR, "value": spec.storage.mount_path},
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        # Model and dataset downloads are cached on the workspace: a replaced pod does not fetch again.
        {"name": "HF_HOME", "value": f"{spec.storage.mount_path}/.cache/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # TRL and huggingface_hub report usage to the Hub on every run: a training pod sends nothing but
        # what its spec asks for.
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    # Optional: a missing Secret starts the container anyway, and the trainer exits with
    # Exit.SECRET_MISSING and says which Secret to create (a required one would leave the pod in
    # CreateContainerConfigError, holding its GPUs, with no reason on the FineTuneJob).
    env.extend(
        {"name": ref.env, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": True}}}
        for ref in secret_refs(job)
    )
    return env


def _pod_metadata(job: FineTuneJob) -> dict[str, Any]:
    extra = job.spec.pod_metadata
    meta: dict[str, Any] = {"labels": {**extra.labels, **labels(job)}}
    if extra.annotations:
        meta["annotations"] = dict(extra.annotations)
    return meta


def _workspace_volume(job: FineTuneJob) -> dict[str, Any]:
    claim = workspace_claim(job)
    if claim is None:
        return {"name": "workspace", "emptyDir": {}}
    return {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}}


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
        "name": CONTAINER,
        "image": spec.image or image or DEFAULT_IMAGE,
        "command": ["python", "-m", "kubetune.launch"],
        "env": _env(job, name),
        "resources": {"requests": dict(requests), "limits": dict(requests)},
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "workspace", "mountPath": spec.storage.mount_path},
            {"name": "dshm", "mountPath": SHM_MOUNT},
        ],
        # The trainer writes why it failed (contract.termination_message) to this file; a crash that
        # leaves none still explains itself through the end of its log.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    # The same image, environment (Hub token, HF_HOME), spec and workspace; CPU and memory alike, no GPU
    # (the pod's request is the larger of an init container's and the containers' sum, so this adds
    # nothing). It exits with the trainer's codes and termination message (a DatasetError fails fast).
    prepare = {
        **copy.deepcopy(container),  # its own objects: shared ones would be YAML anchors
        "name": PREPARE_CONTAINER,
        "command": list(PREPARE_COMMAND),
        "resources": {
            "requests": {k: v for k, v in requests.items() if k != GPU_RESOURCE},
            "limits": {k: v for k, v in requests.items() if k != GPU_RESOURCE},
        },
        "volumeMounts": [dict(m) for m in container["volumeMounts"] if m["name"] in ("spec", "workspace")],
    }
    if res.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.gpus_per_node:
        tolerations.insert(0, {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    node_selector = dict(res.node_selector)
    if res.gpu_type:
        node_selector[GPU_PRODUCT_LABEL] = res.gpu_type
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer talks to no API server: progress travels through its log, which the operator reads.
        "automountServiceAccountToken": False,
        # The trainer image's user; fsGroup makes a root-owned PersistentVolumeClaim writable to it.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [prepare],
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": name}},
            _workspace_volume(job),
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
        # With a queue, Kueue admits the Job by setting suspend to false: it is created suspended, and
        # from then on its suspend field is Kueue's (runPolicy.suspend is ignored).
        "suspend": bool(policy.queue_name) or policy.suspend,
        "backoffLimit": policy.backoff_limit,
        # One pod per node; Indexed gives each a stable hostname and JOB_COMPLETION_INDEX (its rank).
        "completionMode": "Indexed",
        "completions": res.nodes,
        "parallelism": res.nodes,
        "podFailurePolicy": {
            "rules": [
                # A preempted or evicted pod is not a failure: it is replaced and resumes from its
                # checkpoint.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                # Nor is a trainer that saved a checkpoint on SIGTERM and exited (Exit.PREEMPTED): a pod
                # deleted by a suspend, or stopped without a DisruptionTarget condition. Counted, these
                # would use up runPolicy.backoffLimit (a suspend per retry) without anything failing.
                # (143 from the prepare container: SIGTERM while tokenizing; the next pod prepares again.)
                # Errors a retry cannot fix (invalid spec, bad dataset, missing Secret, CUDA out of
                # memory, ...) end the run at once instead of using up runPolicy.backoffLimit. A rule's
                # containerName may name an init container, so each rule is there for both.
                *(
                    {
                        "action": action,
                        "onExitCodes": {"containerName": name, "operator": "In", "values": list(values)},
                    }
                    for action, values in (
                        ("Ignore", [int(Exit.PREEMPTED)]),
                        ("FailJob", [int(c) for c in FAIL_FAST_EXIT_CODES]),
                    )
                    for name in (CONTAINER, PREPARE_CONTAINER)
                ),
            ]
        },
        "template": {"metadata": _pod_metadata(job), "spec": pod_spec},
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(job, name), "spec": job_spec}


def render(job: FineTuneJob, image: str | None = None) -> list[dict[str, Any]]:
    """Every object of the run, in the order they should be applied: the workspace claim (when
    kubetune creates one), the ConfigMap, the headless Service (multi-node) and the Job."""
    claim = render_claim(job)
    objects = [claim] if claim is not None else []
    objects.append(render_configmap(job))
    if job.spec.resources.nodes > 1:
        objects.append(render_service(job))
    objects.append(render_job(job, image))
    return objects


# libyaml's emitter where PyYAML has it (its wheels do): the same document, several times faster, and
# `kubetune validate` and every operator pass that renders a run dump the whole spec.
_FastDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the mounted spec) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)
