"""Properties of rendering that golden files alone would not explain."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubetune.api.v1alpha1 import JOB_NAME_MAX, MAX_NODES, FineTuneJob
from kubetune.contract import (
    ANNOTATION_SOURCE_COMMIT,
    ANNOTATION_SOURCE_REPO,
    ANNOTATION_SPEC_HASH,
    ENV_RUN,
    ENV_TERMINATION_LOG,
    FAIL_FAST_EXIT_CODES,
    LABEL_JOB,
    LABEL_QUEUE,
    LABEL_RUN,
    TERMINATION_LOG,
)
from kubetune.render import (
    output_path,
    render,
    render_claim,
    render_job,
    run_name,
    spec_hash,
    workspace_claim,
)

DOC: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "team-a", "uid": "u-1", "labels": {"team": "a"}},
    "spec": {
        "model": {"id": "meta-llama/Llama-2-7b-hf"},
        "dataset": {"id": "timdettmers/openassistant-guanaco"},
        "resources": {"gpusPerNode": 4, "gpuType": "NVIDIA-H100-80GB-HBM3", "memory": "200Gi"},
        "output": {"hub": {"repoId": "org/out", "token": {"secretKeyRef": {"name": "hf", "key": "tok"}}}},
    },
}


def job(**spec_changes: Any) -> FineTuneJob:
    doc = copy.deepcopy(DOC)
    doc["spec"].update(spec_changes)
    return FineTuneJob.model_validate(doc)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def test_job_requests_gpus_and_lands_on_gpu_nodes() -> None:
    rendered = render_job(job())
    pod = rendered["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    ignore, *by_exit_code = rendered["spec"]["podFailurePolicy"]["rules"]
    # Preemption is not a failure, nor a trainer that checkpointed on SIGTERM (a suspend); errors a
    # retry cannot fix end the run at once, from the trainer or from the prepare init container.
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert by_exit_code == [
        {"action": action, "onExitCodes": {"containerName": name, "operator": "In", "values": values}}
        for action, values in (("Ignore", [143]), ("FailJob", list(FAIL_FAST_EXIT_CODES)))
        for name in ("trainer", "prepare")
    ]
    # The prepare init container: the trainer's image, environment and CPU/memory, no GPU.
    [prepare] = pod["initContainers"]
    assert prepare["name"] == "prepare" and prepare["command"] == ["python", "-m", "kubetune.trainer.prepare"]
    assert prepare["image"] == container["image"] and prepare["env"] == container["env"]
    assert "nvidia.com/gpu" not in prepare["resources"]["requests"]
    assert "nvidia.com/gpu" not in prepare["resources"]["limits"]
    assert {m["name"] for m in prepare["volumeMounts"]} == {"spec", "workspace"}
    assert prepare["terminationMessagePath"] == container["terminationMessagePath"]


def test_token_only_through_secret_key_ref() -> None:
    objects = render(job())
    env = by_kind(objects)["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    [token] = [e for e in env if e["name"] == "HF_TOKEN"]
    # Optional: a missing Secret starts the container, whose trainer says which Secret to create
    # (instead of a pod stuck in CreateContainerConfigError).
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok", "optional": True}},
    }
    assert all("value" in e or "valueFrom" in e for e in env)


TRACKER_SECRETS = {
    "mlflow": {
        "trackingUri": "https://mlflow.example",
        "password": {"secretKeyRef": {"name": "mlflow", "key": "password"}},
        "token": {"secretKeyRef": {"name": "mlflow", "key": "token"}},
    },
    "wandb": {"apiKey": {"secretKeyRef": {"name": "wandb", "key": "apiKey"}}},
}


def test_tracker_credentials_only_through_optional_secret_key_refs_of_trackers_reported_to() -> None:
    def secret_env(**training: Any) -> list[tuple[str, str, str, bool]]:
        env = render_job(job(training=training))["spec"]["template"]["spec"]["containers"][0]["env"]
        return [
            (e["name"], r["name"], r["key"], r["optional"])
            for e in env
            if (r := e.get("valueFrom", {}).get("secretKeyRef"))
        ]

    assert secret_env(reportTo=["tensorboard", "mlflow", "wandb"], trackers=TRACKER_SECRETS) == [
        ("HF_TOKEN", "hf", "tok", True),
        ("MLFLOW_TRACKING_PASSWORD", "mlflow", "password", True),
        ("MLFLOW_TRACKING_TOKEN", "mlflow", "token", True),
        ("WANDB_API_KEY", "wandb", "apiKey", True),
    ]
    # Settings of a tracker not reported to give the pod none of its Secrets.
    assert secret_env(reportTo=["wandb"], trackers=TRACKER_SECRETS) == [
        ("HF_TOKEN", "hf", "tok", True),
        ("WANDB_API_KEY", "wandb", "apiKey", True),
    ]
    assert secret_env(trackers=TRACKER_SECRETS) == [("HF_TOKEN", "hf", "tok", True)]
    # The prepare init container gets the same environment (it reads no tracker, but redacts them).
    rendered = render_job(job(training={"reportTo": ["mlflow"], "trackers": TRACKER_SECRETS}))
    pod = rendered["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["env"] == pod["containers"][0]["env"]
    # Nothing else of the trackers is rendered into the pod: the trainer reads the settings from its spec.
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert {n for n in names if n.startswith(("MLFLOW_", "WANDB_"))} == {
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    }


def test_trainer_pods_have_no_api_access_and_report_through_their_log() -> None:
    rendered = render_job(job())
    pod = rendered["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[ENV_RUN] == run_name(job()) == rendered["metadata"]["name"]
    assert env[ENV_TERMINATION_LOG] == container["terminationMessagePath"] == TERMINATION_LOG
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert not [name for name in env if name.startswith("KUBETUNE_POD_")]
    assert not [e for e in container["env"] if "fieldRef" in e.get("valueFrom", {})]


def test_the_workspace_is_a_claim_per_finetunejob() -> None:
    objects = render(job())
    assert [o["kind"] for o in objects] == ["PersistentVolumeClaim", "ConfigMap", "Job"]
    claim = objects[0]
    assert claim["metadata"]["name"] == workspace_claim(job()) == "demo-workspace"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}}
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    # One claim for all runs of the FineTuneJob: not labelled with a run, not named after one.
    assert LABEL_RUN not in claim["metadata"]["labels"] and claim["metadata"]["labels"][LABEL_JOB] == "demo"
    assert spec_hash(job()) not in str(claim)
    volumes = {v["name"]: v for v in objects[2]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["workspace"] == {
        "name": "workspace",
        "persistentVolumeClaim": {"claimName": "demo-workspace"},
    }
    env = {e["name"]: e.get("value") for e in objects[2]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_HOME"] == "/workspace/.cache/huggingface"  # downloads survive a replaced pod


def test_claim_options() -> None:
    sized = render_claim(job(storage={"size": "200Gi", "storageClassName": "fast-ssd"}))
    assert sized is not None
    assert sized["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert sized["spec"]["storageClassName"] == "fast-ssd"
    # Every pod of a multi-node run mounts it, each on its own node.
    shared = render_claim(job(resources={"gpusPerNode": 8, "nodes": 2}))
    assert shared is not None and shared["spec"]["accessModes"] == ["ReadWriteMany"]
    # Retain: no owner, so it outlives the FineTuneJob (and a new one of the same name uses it).
    kept = render_claim(job(storage={"reclaimPolicy": "Retain"}))
    assert kept is not None and "ownerReferences" not in kept["metadata"]
    # An existing claim, or an emptyDir: nothing to create.
    for storage, volume in (
        ({"claimName": "shared"}, {"persistentVolumeClaim": {"claimName": "shared"}}),
        ({"ephemeral": True}, {"emptyDir": {}}),
    ):
        assert render_claim(job(storage=storage)) is None
        objects = render(job(storage=storage))
        assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]
        volumes = {v["name"]: v for v in objects[-1]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["workspace"] == {"name": "workspace", **volume}


def test_each_run_writes_into_its_own_folder() -> None:
    for changes, root in (
        ({}, "/workspace/output"),
        ({"output": {"path": "out"}}, "/workspace/out"),  # relative: from the mount path
        ({"output": {"path": "/data/x/"}, "storage": {"mountPath": "/data"}}, "/data/x"),
    ):
        assert output_path(job(**changes)) == f"{root}/runs/{run_name(job(**changes))}"


def test_cpu_only_job_requests_no_gpu_and_tolerates_nothing() -> None:
    rendered = render_job(job(resources={"gpusPerNode": 0}))
    pod = rendered["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]
    assert "tolerations" not in pod


def test_owner_reference_labels_and_deterministic_name() -> None:
    objects = [o for o in render(job()) if o["kind"] != "PersistentVolumeClaim"]
    for obj in objects:
        meta = obj["metadata"]
        assert meta["name"] == run_name(job()) and meta["name"].startswith("demo-")
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"][0]["uid"] == "u-1" and meta["ownerReferences"][0]["controller"]
        assert meta["labels"]["kubetune.io/finetunejob"] == "demo"
        assert meta["annotations"][ANNOTATION_SPEC_HASH] == spec_hash(job())
    assert render(job()) == render(job())  # pure: same input, same output


def test_render_does_not_mutate_its_input() -> None:
    original = job()
    before = original.model_dump()
    render(original)
    assert original.model_dump() == before


def test_run_identity_follows_the_spec_only() -> None:
    base = spec_hash(job())
    # Writing a default explicitly is the same run.
    assert spec_hash(job(method={"type": "qlora"}, training={"learningRate": 2e-4})) == base
    # runPolicy steers the run; it is not a new run.
    assert spec_hash(job(runPolicy={"suspend": True, "ttlSecondsAfterFinished": 60})) == base
    # Nor is what happens to the workspace when the FineTuneJob is deleted.
    assert spec_hash(job(storage={"reclaimPolicy": "Retain"})) == base
    # Metadata is not the spec.
    relabelled = job()
    relabelled.metadata.labels["team"] = "b"
    assert spec_hash(relabelled) == base
    # Anything that changes the training is a new run.
    assert spec_hash(job(training={"learningRate": 1e-4})) != base
    assert spec_hash(job(model={"id": "meta-llama/Llama-2-7b-hf", "revision": "abc123"})) != base


def test_long_names_still_fit_a_label() -> None:
    doc = copy.deepcopy(DOC)
    doc["metadata"]["name"] = "a" * JOB_NAME_MAX  # the longest name the API takes
    doc["spec"]["resources"] = {"gpusPerNode": 1, "nodes": MAX_NODES}
    name = run_name(FineTuneJob.model_validate(doc))
    assert len(f"{name}-{MAX_NODES - 1}") <= 63  # the last pod's hostname is a DNS label too


def test_multi_node_gets_a_headless_service_and_ranks() -> None:
    objects = by_kind(render(job(resources={"gpusPerNode": 8, "nodes": 4})))
    name = objects["Job"]["metadata"]["name"]
    assert objects["Service"]["spec"]["clusterIP"] == "None"
    spec = objects["Job"]["spec"]
    assert spec["completions"] == spec["parallelism"] == 4 and spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBETUNE_MASTER_ADDR"] == f"{name}-0.{name}"
    assert env["KUBETUNE_NUM_NODES"] == "4" and env["KUBETUNE_GPUS_PER_NODE"] == "8"


def test_kueue_queue_and_run_policy() -> None:
    rendered = render_job(
        job(
            runPolicy={"queueName": "gpus", "suspend": True, "activeDeadlineSeconds": 3600, "backoffLimit": 1}
        )
    )
    assert rendered["metadata"]["labels"][LABEL_QUEUE] == "gpus"
    assert rendered["spec"]["template"]["metadata"]["labels"][LABEL_QUEUE] == "gpus"
    assert rendered["spec"]["suspend"] is True
    assert rendered["spec"]["activeDeadlineSeconds"] == 3600 and rendered["spec"]["backoffLimit"] == 1
    # With a queue the Job is always created suspended: Kueue admits it by setting suspend to false.
    queued = render_job(job(runPolicy={"queueName": "gpus"}))
    assert queued["spec"]["suspend"] is True
    assert render_job(job())["spec"]["suspend"] is False


def test_configmap_holds_the_resolved_spec_and_no_secret() -> None:
    cm = by_kind(render(job()))["ConfigMap"]
    mounted = yaml.safe_load(cm["data"]["job.yaml"])
    assert FineTuneJob.model_validate(mounted).spec == job().spec
    # Resolved defaults are written out: the run's lineage does not depend on kubetune's version.
    assert mounted["spec"]["method"]["type"] == "qlora"
    assert mounted["spec"]["output"]["hub"]["token"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert mounted["metadata"] == {"name": "demo", "namespace": "team-a", "uid": "u-1"}
    # The resolved spec writes storage.size (a default) next to claimName: still valid, in the models
    # and in the CRD's rule, which both let a default through.
    for storage in ({"claimName": "shared"}, {"ephemeral": True}):
        named = yaml.safe_load(by_kind(render(job(storage=storage)))["ConfigMap"]["data"]["job.yaml"])
        assert named["spec"]["storage"]["size"] == "50Gi"
        assert FineTuneJob.model_validate(named).spec.storage == job(storage=storage).spec.storage


def test_the_spec_file_carries_the_uid_and_the_gitops_source_and_no_other_metadata() -> None:
    doc = copy.deepcopy(DOC)
    doc["metadata"]["annotations"] = {
        ANNOTATION_SOURCE_COMMIT: "0123456789abcdef0123456789abcdef01234567",
        ANNOTATION_SOURCE_REPO: "https://github.com/acme/ml-gitops",
        "kubectl.kubernetes.io/last-applied-configuration": '{"spec": {}}',
        "team.example.com/owner": "nlp",
    }
    doc["metadata"]["generation"] = 3
    mounted = yaml.safe_load(
        by_kind(render(FineTuneJob.model_validate(doc)))["ConfigMap"]["data"]["job.yaml"]
    )
    assert mounted["metadata"] == {
        "name": "demo",
        "namespace": "team-a",
        "uid": "u-1",
        "annotations": {
            ANNOTATION_SOURCE_COMMIT: "0123456789abcdef0123456789abcdef01234567",
            ANNOTATION_SOURCE_REPO: "https://github.com/acme/ml-gitops",
        },
    }
    # The trainer reads it back as it was (kubetune.trainer.lineage.run_info takes them from there).
    back = FineTuneJob.model_validate(mounted)
    assert back.metadata.uid == "u-1" and back.metadata.annotations == mounted["metadata"]["annotations"]
    # Neither is part of the run's identity: a new commit with the same spec is the same run.
    assert spec_hash(back) == spec_hash(job())


def test_pod_metadata_is_added_but_never_overrides_ours() -> None:
    rendered = render_job(
        job(
            podMetadata={
                "labels": {"team": "nlp", "kubetune.io/run": "spoofed"},
                "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
            }
        )
    )
    meta = rendered["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "nlp"
    assert meta["labels"]["kubetune.io/run"] == rendered["metadata"]["name"]
    assert meta["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
