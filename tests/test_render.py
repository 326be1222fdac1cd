"""Properties of rendering that golden files alone would not explain."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.render import ANNOTATION_SPEC_HASH, LABEL_QUEUE, render, render_job, run_name, spec_hash

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
    assert rendered["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"] == [
        {"type": "DisruptionTarget"}
    ]


def test_token_only_through_secret_key_ref() -> None:
    objects = render(job())
    env = by_kind(objects)["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    [token] = [e for e in env if e["name"] == "HF_TOKEN"]
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}
    assert all("value" in e or "valueFrom" in e for e in env)


def test_cpu_only_job_requests_no_gpu_and_tolerates_nothing() -> None:
    rendered = render_job(job(resources={"gpusPerNode": 0}))
    pod = rendered["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]
    assert "tolerations" not in pod


def test_owner_reference_labels_and_deterministic_name() -> None:
    objects = render(job())
    for obj in objects:
        meta = obj["metadata"]
        assert meta["name"] == run_name(job()) and meta["name"].startswith("demo-")
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"][0]["uid"] == "u-1" and meta["ownerReferences"][0]["controller"]
        assert meta["labels"]["kubetune.io/finetunejob"] == "demo"
        assert meta["annotations"][ANNOTATION_SPEC_HASH] == spec_hash(job())
    assert objects == render(job())  # pure: same input, same output


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
    # Metadata is not the spec.
    relabelled = job()
    relabelled.metadata.labels["team"] = "b"
    assert spec_hash(relabelled) == base
    # Anything that changes the training is a new run.
    assert spec_hash(job(training={"learningRate": 1e-4})) != base
    assert spec_hash(job(model={"id": "meta-llama/Llama-2-7b-hf", "revision": "abc123"})) != base


def test_long_names_still_fit_a_label() -> None:
    doc = copy.deepcopy(DOC)
    doc["metadata"]["name"] = "a" * 63
    name = run_name(FineTuneJob.model_validate(doc))
    assert len(name) <= 63


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


def test_configmap_holds_the_resolved_spec_and_no_secret() -> None:
    cm = by_kind(render(job()))["ConfigMap"]
    mounted = yaml.safe_load(cm["data"]["job.yaml"])
    assert FineTuneJob.model_validate(mounted).spec == job().spec
    # Resolved defaults are written out: the run's lineage does not depend on kubetune's version.
    assert mounted["spec"]["method"]["type"] == "qlora"
    assert mounted["spec"]["output"]["hub"]["token"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert "uid" not in mounted["metadata"] and "labels" not in mounted["metadata"]


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
