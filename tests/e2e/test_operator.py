"""The operator against a real API server, controller-manager, scheduler and KWOK GPU nodes.

Pods are KWOK's: they are scheduled for real, then Succeed or Fail as their annotations say
(hack/controlplane/stages: exit code, termination reason and message), so no trainer runs. KWOK pods
have no logs (their nodes have no address): progress from the log is tested on the real node
(test_lifecycle.py) and in the unit tests of plan(); here the log read must fail cheaply and quietly.
Workspace claims bind through the session's default StorageClass (tests/e2e/node.py).
"""

from __future__ import annotations

import base64
import copy
import json
import logging
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

from kubetune.contract import LABEL_QUEUE, termination_message
from kubetune_operator.kube import Kube, load_client
from kubetune_operator.operator import Operator

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the invalid-spec table is shared with the unit tests
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

    def claims(self, name: str) -> list[dict[str, Any]]:
        return self.items("persistentvolumeclaims", f"kubetune.io/finetunejob={name}")

    def children(self, name: str) -> dict[str, list[str]]:
        return {
            kind: sorted(o["metadata"]["name"] for o in self.items(kind, f"kubetune.io/finetunejob={name}"))
            for kind in ("jobs", "configmaps", "services", "persistentvolumeclaims")
        }

    def condition(self, name: str, reason: str) -> dict[str, Any]:
        return next(c for c in self.status(name)["conditions"] if c.get("reason") == reason)

    def wait_reason(self, name: str, state: str, reason: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait(  # type: ignore[no-any-return]
            f"{name} to be {state}/{reason}",
            lambda: (s := self.status(name)).get("state") == state and s.get("reason") == reason and s,
            timeout,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl(
            "get", "events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
        return list(json.loads(out)["items"])


@pytest.fixture
def cluster(control_plane: Any, namespace: str, crd: None) -> Cluster:
    c = Cluster(control_plane, namespace)
    c.kubectl(
        "create", "secret", "generic", "hf-token", "-n", namespace, f"--from-literal=token={FAKE_TOKEN}"
    )
    return c


@pytest.fixture
def operator(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> Iterator[Operator]:
    caplog.set_level(logging.INFO, logger="kubetune.operator")
    op = Operator(Kube(load_client(cluster.cp.kubeconfig)), namespace=cluster.ns).start()
    assert op.wait_synced(30)
    yield op
    op.stop()
    # Nothing the operator did was refused or failed, and an unreadable log (KWOK's) stays quiet.
    noisy = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "kubetune.operator"
    ]
    assert not [m for m in noisy if "invalid spec" not in m and "refused" not in m], noisy


def quiet_for(op: Operator, seconds: float = 6.0) -> int:
    """Reconciles in `seconds` of quiet: a hot loop shows as dozens."""
    before = op.reconciles
    time.sleep(seconds)
    return op.reconciles - before


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
    assert running["reason"] == "TrainerRunning"
    [job] = cluster.jobs("falcon")
    assert running["jobName"] == job["metadata"]["name"]
    assert running["outputPath"] == f"/workspace/output/runs/{job['metadata']['name']}"
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
    } in container["env"]
    assert pod_spec["automountServiceAccountToken"] is False
    [pod] = cluster.items("pods", f"kubetune.io/run={job['metadata']['name']}")
    node = cluster.get("node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert (
        "automountServiceAccountToken" not in pod["spec"] or not pod["spec"]["automountServiceAccountToken"]
    )
    assert not [v for v in pod["spec"]["volumes"] if "projected" in v]  # no token mounted

    # The workspace: one claim, the FineTuneJob's, bound through the default StorageClass.
    [claim] = cluster.claims("falcon")
    assert claim["metadata"]["name"] == running["workspaceClaim"] == "falcon-workspace"
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["status"]["phase"] == "Bound"
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "falcon-workspace"}} in pod["spec"][
        "volumes"
    ]

    table = cluster.kubectl("get", "ftj", "falcon", "-n", cluster.ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "PHASE", "PROGRESS", "LOSS", "ETA", "REASON", "AGE"]
    assert table[1].split()[:2] == ["falcon", "Running"] and "TrainerRunning" in table[1]

    done = cluster.wait_state("falcon", "Succeeded")
    assert done["progress"] == "100%" and done["observedGeneration"] == 1 and done["completionTime"]
    assert (done["reason"], done["phase"]) == ("TrainingComplete", "Succeeded")
    table = cluster.kubectl("get", "ftj", "falcon", "-n", cluster.ns).stdout.splitlines()
    assert table[1].split()[:6] == ["falcon", "Succeeded", "Succeeded", "100%", "0s", "TrainingComplete"]
    reasons = [e["reason"] for e in cluster.events("falcon")]
    assert {"RunCreated", "Started", "Succeeded"} <= set(reasons)
    assert reasons.count("Started") == 1 and reasons.count("Succeeded") == 1  # once per transition
    # Nothing the operator wrote carries the token.
    everything = cluster.kubectl("get", "ftj,jobs,configmaps,events", "-n", cluster.ns, "-o", "yaml").stdout
    assert FAKE_TOKEN not in everything
    assert quiet_for(operator) <= 2  # finished: no timers left running


def fail_with(exit_code: int, message: str = "", reason: str = "Error") -> dict[str, str]:
    """KWOK's pod-fail stage: the trainer container terminates with this exit code, reason, message."""
    out = {
        "kubetune.io/fake-outcome": "fail",
        "kubetune.io/fake-exit-code": str(exit_code),
        "kubetune.io/fake-reason": reason,
    }
    if message:
        out["kubetune.io/fake-message"] = message
    return out


def test_oomkilled_is_reported_as_such(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(
        manifest(
            "oom",
            cluster.ns,
            spec(
                runPolicy={"backoffLimit": 0}, podMetadata={"annotations": fail_with(137, reason="OOMKilled")}
            ),
        )
    )
    status = cluster.wait_reason("oom", "Failed", "OOMKilled")
    message = cluster.condition("oom", "OOMKilled")["message"]
    assert "resources.memory: 16Gi" in message and "perDeviceBatchSize" in message
    assert "OOMKilled" in [e["reason"] for e in cluster.events("oom") if e["type"] == "Warning"]
    assert status["restarts"] == 0


def test_a_user_error_fails_at_once_with_the_trainers_reason(cluster: Cluster, operator: Operator) -> None:
    """Exit code 4 (contract.Exit.SECRET_MISSING) is one of the Job's FailJob codes: no retries, even with
    backoffLimit 3, and the reason and message come from the trainer's termination message."""
    said = termination_message("SecretMissing", 'Secret "hf-token" has no key "token": add it')
    cluster.apply(manifest("nokey", cluster.ns, spec(podMetadata={"annotations": fail_with(4, said)})))
    status = cluster.wait_reason("nokey", "Failed", "SecretMissing")
    assert status["restarts"] == 0
    assert 'has no key "token": add it' in cluster.condition("nokey", "SecretMissing")["message"]
    assert len(cluster.items("pods", "kubetune.io/finetunejob=nokey")) == 1  # it never retried
    [job] = cluster.jobs("nokey")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"


def test_an_exit_code_alone_names_the_reason(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(manifest("baddata", cluster.ns, spec(podMetadata={"annotations": fail_with(3)})))
    cluster.wait_reason("baddata", "Failed", "DatasetError")
    assert "exited with code 3" in cluster.condition("baddata", "DatasetError")["message"]


def test_too_many_gpus_is_unschedulable(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(manifest("huge", cluster.ns, spec(resources={"gpusPerNode": 16})))

    def unschedulable() -> dict[str, Any] | None:
        # (The scheduler's first word may be about the workspace claim, bound half a second later.)
        conds = cluster.status("huge").get("conditions") or []
        return next(
            (
                c
                for c in conds
                if c["type"] == "Scheduled" and c["status"] == "False" and "gpu" in c["message"]
            ),
            None,
        )

    cond = cluster.wait("Unschedulable condition", unschedulable)
    assert cond["reason"] == "Unschedulable" and "nvidia.com/gpu" in cond["message"]
    assert (cluster.status("huge")["state"], cluster.status("huge")["reason"]) == ("Pending", "Unschedulable")
    assert [e["reason"] for e in cluster.events("huge")].count("Unschedulable") == 1


def test_invalid_object_past_the_schema_fails_without_crashing_the_operator(
    cluster: Cluster, operator: Operator
) -> None:
    # A token base64-encoded into a prompt passes the CRD (CEL cannot decode base64) but not the
    # operator's scan, which names where it is and never what.
    hidden = base64.b64encode(FAKE_TOKEN.encode()).decode()
    bad = manifest("leaky", cluster.ns, spec(samples={"prompts": ["fine", hidden]}))
    cluster.apply(bad, manifest("fine", cluster.ns, spec(podMetadata={"annotations": SLOW})))
    status = cluster.wait_state("leaky", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "secretKeyRef" in failed["message"]
    assert failed["message"].startswith("spec.samples.prompts[1]: looks like a Hugging Face token")
    assert FAKE_TOKEN not in json.dumps(status) and hidden not in json.dumps(status)
    assert cluster.jobs("leaky") == []
    cluster.wait_state("fine", "Running")  # the other object is served all the same
    # No hot loop: an invalid object is not retried until it changes.
    before = operator.reconciles
    time.sleep(3)
    assert operator.reconciles - before <= 2


def test_delete_garbage_collects_the_children(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(manifest("gone", cluster.ns, spec(podMetadata={"annotations": SLOW})))
    cluster.wait_state("gone", "Running")
    assert len(cluster.jobs("gone")) == 1 and len(cluster.claims("gone")) == 1
    cluster.kubectl("delete", "ftj", "gone", "-n", cluster.ns, "--wait=true")
    empty = {"jobs": [], "configmaps": [], "services": [], "persistentvolumeclaims": []}
    cluster.wait("children, the claim too, to be collected", lambda: cluster.children("gone") == empty)


def test_a_retained_claim_outlives_its_finetunejob_and_is_used_again(
    cluster: Cluster, operator: Operator
) -> None:
    body = spec(storage={"reclaimPolicy": "Retain"}, podMetadata={"annotations": SLOW})
    cluster.apply(manifest("kept", cluster.ns, body))
    cluster.wait_state("kept", "Running")
    [claim] = cluster.claims("kept")
    assert not claim["metadata"].get("ownerReferences")
    cluster.kubectl("delete", "ftj", "kept", "-n", cluster.ns, "--wait=true")
    cluster.wait("the run to be collected", lambda: not cluster.jobs("kept"))
    assert [c["metadata"]["uid"] for c in cluster.claims("kept")] == [claim["metadata"]["uid"]]
    # A FineTuneJob of the same name finds it: the same claim, with its caches and checkpoints.
    cluster.apply(manifest("kept", cluster.ns, body))
    cluster.wait_state("kept", "Running")
    assert [c["metadata"]["uid"] for c in cluster.claims("kept")] == [claim["metadata"]["uid"]]
    # Switched to Delete, it is adopted (and would go with the FineTuneJob).
    adopted = copy.deepcopy(body)
    adopted["storage"] = {"reclaimPolicy": "Delete"}
    cluster.apply(manifest("kept", cluster.ns, adopted))
    uid = cluster.get("ftj", "kept")["metadata"]["uid"]
    cluster.wait(
        "the claim to be adopted",
        lambda: (
            [r["uid"] for r in cluster.claims("kept")[0]["metadata"].get("ownerReferences") or []] == [uid]
        ),
    )


def test_missing_secret_creates_nothing_until_it_exists(cluster: Cluster, operator: Operator) -> None:
    body = spec(podMetadata={"annotations": SLOW})
    body["output"]["hub"]["token"] = {"secretKeyRef": {"name": "hf-later", "key": "token"}}
    cluster.apply(manifest("nosecret", cluster.ns, body))
    cluster.wait_reason("nosecret", "Pending", "SecretMissing")
    message = cluster.condition("nosecret", "SecretMissing")["message"]
    assert (
        'Secret "hf-later"' in message
        and f"kubectl create secret generic hf-later -n {cluster.ns}" in message
    )
    assert cluster.children("nosecret") == {
        "jobs": [],
        "configmaps": [],
        "services": [],
        "persistentvolumeclaims": [],
    }
    assert quiet_for(operator) <= 2  # re-checked with back-off, not in a loop
    assert [e["reason"] for e in cluster.events("nosecret")].count("SecretMissing") == 1
    cluster.kubectl(
        "create", "secret", "generic", "hf-later", "-n", cluster.ns, f"--from-literal=token={FAKE_TOKEN}"
    )
    cluster.wait_state("nosecret", "Running", timeout=60)  # the next check, at most 10-20 s later
    assert FAKE_TOKEN not in json.dumps(cluster.get("ftj", "nosecret"))


@pytest.fixture
def jobs_refused(cluster: Cluster) -> Iterator[str]:
    """A cluster admission policy of the platform's own (a ValidatingAdmissionPolicy on batch/v1 Jobs in
    the test namespace) that refuses Jobs of FineTuneJobs named `refused-*`: what a Gatekeeper or
    Kyverno rule does to a Job that passed our CRD. Its message, in the API server's words (422)."""
    name = f"e2e-refuse-jobs-{cluster.ns}"[:63]
    message = "Jobs named refused-* are not allowed in this namespace"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["batch"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["jobs"],
                    }
                ]
            },
            "validations": [
                {"expression": "!object.metadata.name.startsWith('refused-')", "message": message}
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.ns}}
            },
        },
    }
    cluster.apply(policy, binding)
    probe = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "refused-probe", "namespace": cluster.ns},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
            },
        },
    }

    def active() -> bool:  # a new policy takes a moment to reach the admission plugin
        proc = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        return proc.returncode != 0 and message in proc.stderr

    cluster.wait("the Job admission policy to be active", active)
    try:
        yield message
    finally:
        cluster.kubectl(
            "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False
        )


def test_a_job_the_api_server_refuses_leaves_nothing_behind(
    cluster: Cluster, operator: Operator, jobs_refused: str
) -> None:
    """The API server refuses the run's Job (here a platform admission policy; a dotted name no longer
    gets this far: the CRD refuses it): its own message is the condition's, and everything the pass
    created is deleted again."""
    cluster.apply(manifest("refused-tune", cluster.ns, spec()))
    cluster.wait_reason("refused-tune", "Failed", "JobRejected")
    message = cluster.condition("refused-tune", "JobRejected")["message"]
    assert jobs_refused in message, message
    empty = {"jobs": [], "configmaps": [], "services": [], "persistentvolumeclaims": []}
    cluster.wait("what the pass created to be deleted", lambda: cluster.children("refused-tune") == empty)
    assert quiet_for(operator) <= 2  # not retried until the object changes
    assert [e["reason"] for e in cluster.events("refused-tune")].count("JobRejected") == 1


def test_preemption_is_not_a_failure_and_the_replacement_runs(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(
        manifest(
            "evicted", cluster.ns, spec(runPolicy={"backoffLimit": 0}, podMetadata={"annotations": SLOW})
        )
    )
    cluster.wait_state("evicted", "Running")
    [pod] = cluster.items("pods", "kubetune.io/finetunejob=evicted")
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod["metadata"]["name"]}}
    cluster.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{cluster.ns}/pods/{pod['metadata']['name']}/eviction",
        "-f",
        "-",
        input=json.dumps(eviction),
    )
    cluster.wait(
        "a Preempted event",
        lambda: "Preempted" in [e["reason"] for e in cluster.events("evicted") if e["type"] == "Warning"],
    )
    # backoffLimit 0, and still running: a disruption uses up no retry.
    status = cluster.wait(
        "the replacement to run",
        lambda: (
            (s := cluster.status("evicted")).get("reason") == "TrainerRunning"
            and [
                p
                for p in cluster.items("pods", "kubetune.io/finetunejob=evicted")
                if p["metadata"]["name"] != pod["metadata"]["name"]
            ]
            and s
        ),
        timeout=60,
    )
    assert (status["state"], status["restarts"], status["preemptions"]) == ("Running", 1, 1)


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


def test_kueue_owns_suspend_and_the_operator_never_flips_it(cluster: Cluster, operator: Operator) -> None:
    """No Kueue here: the test admits the Job itself, as Kueue would (suspend: false)."""
    body = spec(runPolicy={"queueName": "a100"}, podMetadata={"annotations": SLOW})
    cluster.apply(manifest("queued", cluster.ns, body))
    queued = cluster.wait_reason("queued", "Queued", "WaitingForAdmission")
    [job] = cluster.jobs("queued")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][LABEL_QUEUE] == "a100"
    assert "LocalQueue a100" in cluster.condition("queued", "WaitingForAdmission")["message"]
    assert queued["jobName"] == job["metadata"]["name"]
    assert quiet_for(operator) <= 2
    assert cluster.get("job", job["metadata"]["name"])["spec"]["suspend"] is True  # left to Kueue

    name = job["metadata"]["name"]
    cluster.kubectl(
        "patch", "job", name, "-n", cluster.ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    cluster.wait_state("queued", "Running")
    # runPolicy.suspend with a queue: ignored (Kueue owns the field), and the condition says why.
    paused = copy.deepcopy(body)
    paused["runPolicy"]["suspend"] = True
    cluster.apply(manifest("queued", cluster.ns, paused))
    cluster.wait(
        "SuspendIgnored",
        lambda: any(
            c.get("reason") == "SuspendIgnored" for c in cluster.status("queued").get("conditions") or []
        ),
    )
    time.sleep(2)
    assert cluster.get("job", name)["spec"]["suspend"] is False
    assert cluster.status("queued")["state"] == "Running"
    # Kueue preempts the workload (suspends the Job): Queued again, and the operator does not undo it.
    cluster.kubectl("patch", "job", name, "-n", cluster.ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    cluster.wait_state("queued", "Queued")
    time.sleep(2)
    assert cluster.get("job", name)["spec"]["suspend"] is True


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
    """One Job each, none twice; a dozen requests per FineTuneJob over its life, from create to
    Succeeded (counted by Kube, the informers' lists and watches included); none at rest."""
    n = 100
    # No workspace claim: a hundred claims binding at once keep pods Unschedulable ("unbound immediate
    # PersistentVolumeClaims") for a while, a state change of its own (and its event) that is the
    # provisioner's pace, not the operator's economy.
    body = spec(resources={"gpusPerNode": 0}, storage={"ephemeral": True})
    cluster.apply(*[manifest(f"load-{i:03d}", cluster.ns, body) for i in range(n)])
    kube = Kube(load_client(cluster.cp.kubeconfig))
    op = Operator(kube, namespace=cluster.ns)
    start = time.monotonic()
    op.start()
    try:
        cluster.wait(
            f"{n} Jobs",
            lambda: len(cluster.items("jobs", "app.kubernetes.io/managed-by=kubetune")) >= n,
            timeout=300,
        )
        elapsed = time.monotonic() - start
        to_jobs = kube.requests

        def succeeded() -> bool:
            out = cluster.kubectl("get", "ftj", "-n", cluster.ns, "-o", "json").stdout
            states = [(o.get("status") or {}).get("state") for o in json.loads(out)["items"]]
            return states.count("Succeeded") == n

        cluster.wait(f"{n} FineTuneJobs to succeed", succeeded, timeout=300)
        time.sleep(3)  # the last events and passes
        lifetime, writes = kube.requests, kube.writes
        by_call = dict(kube.by_call)
        at_rest = quiet_requests(kube, 6.0)
    finally:
        op.stop()
    owners = [
        j["metadata"]["labels"]["kubetune.io/finetunejob"]
        for j in cluster.items("jobs", "app.kubernetes.io/managed-by=kubetune")
    ]
    assert sorted(owners) == [f"load-{i:03d}" for i in range(n)]  # one Job each, none twice
    with capsys.disabled():
        print(
            f"\n[load] {n} FineTuneJobs -> {n} Jobs in {elapsed:.1f} s ({to_jobs / n:.1f} requests each); "
            f"to Succeeded: {lifetime / n:.1f} requests, {writes / n:.1f} writes each; "
            f"{at_rest} requests in 6 s at rest; skipped own status writes: {op.own_writes_skipped}\n"
            f"[load] {sorted(by_call.items(), key=lambda kv: -kv[1])}"
        )
    assert lifetime / n <= 12, by_call
    assert at_rest == 0, kube.by_call


def quiet_requests(kube: Kube, seconds: float) -> int:
    """Requests sent in `seconds` while nothing changes (watches already open send none)."""
    before = kube.requests
    time.sleep(seconds)
    return kube.requests - before


def test_the_operators_own_status_write_causes_no_second_pass(cluster: Cluster, operator: Operator) -> None:
    """An object that needs one pass (an invalid spec: Failed, nothing created): its status patch comes
    back as a watch event, which is recognised as the operator's own and causes no pass."""
    hidden = base64.b64encode(FAKE_TOKEN.encode()).decode()
    before = operator.reconciles
    cluster.apply(manifest("once", cluster.ns, spec(samples={"prompts": [hidden]})))
    cluster.wait_reason("once", "Failed", "InvalidSpec")
    time.sleep(3)  # the patch's own watch event has arrived by now
    assert operator.reconciles - before == 1
    assert operator.own_writes_skipped >= 1
    # A change by someone else (a label) is looked at: one more pass, and no write.
    patches = operator.kube.by_call[("patch", "finetunejobs/status")]
    cluster.kubectl("label", "ftj", "once", "-n", cluster.ns, "team=ml")
    cluster.wait("a pass for the label", lambda: operator.reconciles - before == 2)
    time.sleep(2)
    assert operator.reconciles - before == 2
    assert operator.kube.by_call[("patch", "finetunejobs/status")] == patches
