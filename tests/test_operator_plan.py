"""plan() (pure): what a pass does, and what the FineTuneJob's status then says, for what the cluster shows.

Plain dicts in, a Plan out: no API server, no clock. `Pass` chains passes the way the operator does, feeding
each plan's status back as the next pass's old status, so transitions (events once, state never backwards,
back-off) are tested as a sequence of observations.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import LABEL_JOB, LABEL_QUEUE, LABEL_RUN, progress_line, termination_message
from kubetune.policy import Limits
from kubetune.render import render_claim, render_job, run_name
from kubetune_operator.plan import (
    BACKOFF_MAX_SECONDS,
    PENDING_RESYNC_SECONDS,
    RUNNING_RESYNC_SECONDS,
    Create,
    Delete,
    Observed,
    Patch,
    Plan,
    plan,
)

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
T0 = "2026-11-28T09:00:00Z"
UID = "u-1"

SPEC: dict[str, Any] = {
    "model": {"id": "meta-llama/Llama-2-7b-hf"},
    "dataset": {"id": "timdettmers/openassistant-guanaco"},
    "resources": {"gpusPerNode": 1, "memory": "64Gi"},
    "output": {"hub": {"repoId": "org/out", "token": {"secretKeyRef": {"name": "hf", "key": "tok"}}}},
}


def ftj(generation: int = 1, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(SPEC)
    for key, value in spec.items():
        body[key] = value
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": UID, "generation": generation},
        "spec": body,
    }
    if status is not None:
        obj["status"] = status
    return obj


def model(obj: dict[str, Any]) -> FineTuneJob:
    return FineTuneJob.model_validate(obj)


def trainer_job(
    obj: dict[str, Any],
    conditions: list[dict[str, Any]] | None = None,
    suspend: bool | None = None,
    **status: Any,
) -> dict[str, Any]:
    """The run's Job as the API server has it: rendered, with a uid and a status."""
    job = render_job(model(obj))
    job["metadata"]["uid"] = "job-uid"
    if suspend is not None:
        job["spec"]["suspend"] = suspend
    job["status"] = {"conditions": conditions or [], **status}
    return job


def pod(
    phase: str,
    created: str = T0,
    name: str = "demo-pod",
    conditions: list[dict[str, Any]] | None = None,
    container: dict[str, Any] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
            **meta,
        },
        "status": {"phase": phase, "conditions": conditions or []},
    }
    if container is not None:
        p["status"]["containerStatuses"] = [{"name": "trainer", "image": "img", "state": container}]
    elif phase == "Running":
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"running": {"startedAt": T0}}}]
    return p


def terminated(code: int, reason: str = "Error", message: str = "") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason, "message": message}}


def failed_pod(
    code: int, reason: str = "Error", message: str = "", created: str = T0, **kw: Any
) -> dict[str, Any]:
    return pod("Failed", created, container=terminated(code, reason, message), **kw)


def disrupted_pod(created: str = T0, phase: str = "Failed") -> dict[str, Any]:
    dt = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "x"}
    return pod(phase, created, name="demo-preempted", conditions=[dt], container=terminated(143))


def observe(obj: dict[str, Any], **kw: Any) -> Observed:
    return Observed(obj, model(obj), **kw)


def cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def kinds(p: Plan) -> list[tuple[str, str, str]]:
    out = []
    for a in p.actions:
        if isinstance(a, Create):
            out.append(("create", a.obj["kind"], a.obj["metadata"]["name"]))
        elif isinstance(a, Delete):
            out.append(("delete", a.kind, a.name))
        else:
            out.append(("patch", a.kind, a.name))
    return out


def reasons(p: Plan) -> list[str]:
    return [e.reason for e in p.events]


class Pass:
    """Passes of one FineTuneJob, each starting from the status the last one wrote."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def __call__(self, at: datetime = NOW, **kw: Any) -> Plan:
        p = plan(observe(self.obj, **kw), at)
        self.obj = {**self.obj, "status": p.status}
        return p


# ---------------------------------------------------------------------------------------------------
# A new FineTuneJob
# ---------------------------------------------------------------------------------------------------


def test_a_new_job_creates_claim_configmap_and_job_in_order() -> None:
    obj = ftj()
    p = plan(observe(obj, secret="present"), NOW)
    run = run_name(model(obj))
    assert kinds(p) == [
        ("create", "PersistentVolumeClaim", "demo-workspace"),
        ("create", "ConfigMap", run),
        ("create", "Job", run),
    ]
    created = [a for a in p.actions if isinstance(a, Create)]
    assert [a.event.reason if a.event else None for a in created] == [None, None, "RunCreated"]
    s = p.status
    assert (s["state"], s["reason"], s["jobName"], s["observedGeneration"]) == ("Pending", "Starting", run, 1)
    assert s["workspaceClaim"] == "demo-workspace"
    assert s["outputPath"] == f"/workspace/output/runs/{run}"
    assert cond(s, "Valid")["reason"] == "SpecValid" and cond(s, "Running")["status"] == "False"
    assert p.requeue == PENDING_RESYNC_SECONDS and p.events == []


def test_an_existing_claim_or_an_emptydir_creates_no_claim() -> None:
    named = ftj(storage={"claimName": "shared"})
    p = plan(observe(named), NOW)
    assert [k for _, k, _ in kinds(p)] == ["ConfigMap", "Job"]
    assert p.status["workspaceClaim"] == "shared"
    scratch = ftj(storage={"ephemeral": True})
    p = plan(observe(scratch), NOW)
    assert [k for _, k, _ in kinds(p)] == ["ConfigMap", "Job"] and "workspaceClaim" not in p.status


def test_multi_node_adds_the_rendezvous_service() -> None:
    p = plan(observe(ftj(resources={"gpusPerNode": 8, "nodes": 2})), NOW)
    assert [k for _, k, _ in kinds(p)] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]


def test_invalid_spec_fails_once_and_is_not_retried() -> None:
    obj = ftj()
    passes = Pass(obj)
    p = plan(Observed(obj, None, invalid="spec.method: qlora needs 4-bit"), NOW)
    assert p.actions == [] and p.requeue is None
    assert (p.status["state"], p.status["reason"]) == ("Failed", "InvalidSpec")
    assert cond(p.status, "Valid")["status"] == "False"
    assert [(e.type, e.reason, e.message) for e in p.events] == [
        ("Warning", "InvalidSpec", "spec.method: qlora needs 4-bit")
    ]
    passes.obj["status"] = p.status
    again = plan(Observed(passes.obj, None, invalid="spec.method: qlora needs 4-bit"), NOW)
    assert again.status == p.status and again.events == []


# ---------------------------------------------------------------------------------------------------
# Before anything is created: the Secret and the claim
# ---------------------------------------------------------------------------------------------------


def test_missing_secret_creates_nothing_and_backs_off() -> None:
    passes = Pass(ftj())
    p = passes(secret="missing")
    assert p.actions == []
    assert (p.status["state"], p.status["reason"]) == ("Pending", "SecretMissing")
    message = cond(p.status, "Running")["message"]
    assert (
        '"hf"' in message and '"tok"' in message and "kubectl create secret generic hf -n team-a" in message
    )
    assert reasons(p) == ["SecretMissing"] and p.events[0].type == "Warning"
    assert p.requeue == 10.0
    # Level-triggered back-off: as long again as it has been missing, at most BACKOFF_MAX_SECONDS.
    later = passes(NOW + timedelta(seconds=25), secret="missing")
    assert later.requeue == 25.0 and later.events == [] and later.actions == []
    much_later = passes(NOW + timedelta(hours=1), secret="missing")
    assert much_later.requeue == BACKOFF_MAX_SECONDS
    # Once it exists, the run starts.
    found = passes(NOW + timedelta(hours=1, seconds=5), secret="present")
    assert [k for _, k, _ in kinds(found)] == ["PersistentVolumeClaim", "ConfigMap", "Job"]
    assert found.status["reason"] == "Starting"


def test_secret_that_cannot_be_checked_does_not_block() -> None:
    p = plan(observe(ftj(), secret="unknown"), NOW)
    assert [k for _, k, _ in kinds(p)][-1] == "Job"


def claim(obj: dict[str, Any], owners: list[dict[str, Any]] | None = None, **meta: Any) -> dict[str, Any]:
    c = render_claim(model(obj))
    assert c is not None
    if owners is not None:
        c["metadata"]["ownerReferences"] = owners
    c["metadata"].update(meta)
    return c


def test_a_claim_kubetune_did_not_make_is_never_used() -> None:
    obj = ftj()
    foreign = claim(obj)
    foreign["metadata"]["labels"] = {"app": "theirs"}
    p = plan(observe(obj, claim=foreign), NOW)
    assert p.actions == [] and p.status["reason"] == "WorkspaceConflict"
    assert "storage.claimName" in cond(p.status, "Running")["message"]
    assert p.requeue == 10.0 and reasons(p) == ["WorkspaceConflict"]


def test_a_claim_being_deleted_is_waited_for() -> None:
    obj = ftj()
    going = claim(obj, deletionTimestamp=T0)
    p = plan(observe(obj, claim=going), NOW)
    assert p.actions == [] and p.status["reason"] == "WorkspaceDeleting" and p.requeue == 5.0


def test_a_claim_left_by_a_deleted_namesake_is_adopted() -> None:
    obj = ftj()
    stale = claim(obj, owners=[{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "uid": "old"}])
    p = plan(observe(obj, claim=stale), NOW)
    assert kinds(p)[0] == ("patch", "PersistentVolumeClaim", "demo-workspace")
    patch = p.actions[0]
    assert isinstance(patch, Patch)
    assert [r["uid"] for r in patch.patch["metadata"]["ownerReferences"]] == [UID]
    assert ("create", "PersistentVolumeClaim", "demo-workspace") not in kinds(p)  # it exists


def test_retain_keeps_the_claim_unowned() -> None:
    obj = ftj(storage={"reclaimPolicy": "Retain"})
    assert "ownerReferences" not in claim(obj)["metadata"]
    owned = claim(obj, owners=[{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "uid": UID}])
    p = plan(observe(obj, claim=owned), NOW)
    [patch] = [a for a in p.actions if isinstance(a, Patch)]
    assert patch.patch == {"metadata": {"ownerReferences": []}}
    # Unowned already (a Retained claim re-adopted by a new FineTuneJob of the same name): used as it is.
    p = plan(observe(obj, claim=claim(obj)), NOW)
    assert [k for _, k, _ in kinds(p)] == ["ConfigMap", "Job"]


def test_a_claim_deleted_under_a_live_run_is_made_again() -> None:
    obj = ftj()
    p = plan(observe(obj, jobs=[trainer_job(obj)], pods=[pod("Running")]), NOW)
    assert kinds(p) == [("create", "PersistentVolumeClaim", "demo-workspace")]


# ---------------------------------------------------------------------------------------------------
# Spec edits and runPolicy
# ---------------------------------------------------------------------------------------------------


def test_a_spec_edit_stops_the_old_run_and_keeps_finished_ones() -> None:
    old = ftj(training={"learningRate": 1e-4})
    new = ftj()
    running_old = trainer_job(old)
    done_old = trainer_job(ftj(training={"seed": 1}), [{"type": "Complete", "status": "True"}])
    p = plan(observe(new, jobs=[running_old, done_old], claim=claim(new, owners=None)), NOW)
    old_name = running_old["metadata"]["name"]
    assert kinds(p)[:3] == [
        ("delete", "Job", old_name),
        ("delete", "Service", old_name),
        ("delete", "ConfigMap", old_name),
    ]
    first = p.actions[0]
    assert isinstance(first, Delete) and first.event is not None and first.event.reason == "RunReplaced"
    assert ("create", "Job", run_name(model(new))) in kinds(p)
    assert done_old["metadata"]["name"] not in [n for _, _, n in kinds(p)]


def test_run_policy_edits_patch_the_running_job() -> None:
    obj = ftj(runPolicy={"suspend": True, "activeDeadlineSeconds": 3600})
    job = trainer_job(ftj())  # created before the edit
    p = plan(observe(obj, jobs=[job], claim=claim(obj)), NOW)
    [patch] = [a for a in p.actions if isinstance(a, Patch)]
    assert patch.kind == "Job" and patch.patch == {"spec": {"suspend": True, "activeDeadlineSeconds": 3600}}
    assert p.status["state"] == "Suspended" and p.requeue is None
    assert reasons(p) == ["Suspended"]


def test_kueue_creates_suspended_and_owns_suspend() -> None:
    obj = ftj(runPolicy={"queueName": "gpus"})
    first = plan(observe(obj, secret="present"), NOW)
    [job] = [a.obj for a in first.actions if isinstance(a, Create) and a.obj["kind"] == "Job"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][LABEL_QUEUE] == "gpus"
    assert (first.status["state"], first.status["reason"]) == ("Queued", "WaitingForAdmission")
    assert first.requeue is None

    passes = Pass(obj)
    queued = passes(jobs=[trainer_job(obj, suspend=True)], claim=claim(obj))
    assert queued.actions == [] and queued.status["state"] == "Queued"
    assert "LocalQueue gpus" in cond(queued.status, "Queued")["message"]
    assert reasons(queued) == ["Queued"]
    # Kueue admits it: the operator follows, and never patches suspend back.
    admitted = passes(jobs=[trainer_job(obj, suspend=False)], pods=[pod("Running")], claim=claim(obj))
    assert admitted.actions == [] and admitted.status["state"] == "Running"
    # runPolicy.suspend is Kueue's to enforce: ignored, and the condition says so.
    paused = ftj(runPolicy={"queueName": "gpus", "suspend": True}, status=admitted.status)
    p = plan(
        observe(paused, jobs=[trainer_job(obj, suspend=False)], pods=[pod("Running")], claim=claim(obj)), NOW
    )
    assert not [a for a in p.actions if isinstance(a, Patch)]
    ignored = cond(p.status, "Suspended")
    assert (ignored["status"], ignored["reason"]) == ("False", "SuspendIgnored") and "Kueue" in ignored[
        "message"
    ]
    assert p.status["state"] == "Running"


def test_without_kueue_a_suspended_job_is_resumed() -> None:
    obj = ftj()
    p = plan(observe(obj, jobs=[trainer_job(obj, suspend=True)], claim=claim(obj)), NOW)
    assert [a.patch for a in p.actions if isinstance(a, Patch)] == [{"spec": {"suspend": False}}]
    assert p.status["state"] == "Pending"


# ---------------------------------------------------------------------------------------------------
# Running: progress from the log, never backwards
# ---------------------------------------------------------------------------------------------------

LOG = "\n".join(
    [
        "loading model",
        progress_line(
            {
                "state": "Training",
                "step": 37,
                "total_steps": 100,
                "loss": 1.23456,
                "eta_seconds": 4330,
                "tokens_per_second": 2048.4,
            }
        ),
        "{'loss': 1.2}",
    ]
)


def test_running_reads_progress_from_the_log_tail() -> None:
    obj = ftj()
    passes = Pass(obj)
    jobs = [trainer_job(obj, startTime=T0)]
    p = passes(jobs=jobs, pods=[pod("Running")], claim=claim(obj), log_tail=LOG)
    s = p.status
    assert (s["state"], s["reason"], s["phase"]) == ("Running", "TrainerRunning", "Training")
    assert (s["progress"], s["loss"], s["eta"], s["step"], s["totalSteps"]) == (
        "37%",
        "1.2346",
        "1h12m",
        37,
        100,
    )
    assert s["tokensPerSecond"] == 2048
    assert s["startTime"] == T0 and p.requeue == RUNNING_RESYNC_SECONDS
    assert reasons(p) == ["Started"]
    # No log this time (a failed read): the last values stay, every one of them (a field dropped and
    # put back would be two status writes for nothing).
    again = passes(jobs=jobs, pods=[pod("Running")], claim=claim(obj), log_tail=None)
    assert again.status == {**s, "conditions": again.status["conditions"]} and again.events == []


def test_state_never_goes_backwards_within_a_run() -> None:
    obj = ftj()
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj)], pods=[pod("Running")], claim=claim(obj))
    # The pod finished; the Job is not marked Complete yet: still Running, not Pending.
    p = passes(jobs=[trainer_job(obj, succeeded=1)], pods=[pod("Succeeded")], claim=claim(obj))
    assert (p.status["state"], p.status["reason"]) == ("Running", "TrainerRunning") and p.events == []


def test_a_new_run_forgets_the_old_runs_progress() -> None:
    obj = ftj(status={"state": "Succeeded", "specHash": "old", "progress": "100%", "loss": "0.5"})
    p = plan(observe(obj, secret="present"), NOW)
    assert "progress" not in p.status and "loss" not in p.status and p.status["state"] == "Pending"


def test_unschedulable_is_one_warning_and_keeps_a_running_run_running() -> None:
    obj = ftj()
    stuck = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: gpu",
            }
        ],
    )
    passes = Pass(obj)
    p = passes(jobs=[trainer_job(obj)], pods=[stuck], claim=claim(obj))
    assert (p.status["state"], p.status["reason"]) == ("Pending", "Unschedulable")
    assert cond(p.status, "Scheduled")["message"] == "0/3 nodes: gpu" and reasons(p) == ["Unschedulable"]
    assert passes(jobs=[trainer_job(obj)], pods=[stuck], claim=claim(obj)).events == []


def test_a_pod_waiting_for_its_own_new_claim_to_bind_is_starting_not_unschedulable() -> None:
    """A burst of runs binds their claims one after another: the scheduler's "unbound immediate
    PersistentVolumeClaims" while kubetune's own claim is Pending is routine (no warning, no extra
    write), and the same message once the claim is Bound, or for a claim kubetune did not make, is not."""
    obj = ftj()
    message = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    waiting = pod(
        "Pending",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        ],
    )
    pending_claim = {**claim(obj), "status": {"phase": "Pending"}}
    p = Pass(obj)(jobs=[trainer_job(obj)], pods=[waiting], claim=pending_claim)
    assert (p.status["state"], p.status["reason"]) == ("Pending", "Starting") and reasons(p) == []
    assert "waiting for the workspace claim demo-workspace to bind" in cond(p.status, "Running")["message"]
    bound = {**claim(obj), "status": {"phase": "Bound"}}
    p = Pass(obj)(jobs=[trainer_job(obj)], pods=[waiting], claim=bound)
    assert (p.status["reason"], reasons(p)) == ("Unschedulable", ["Unschedulable"])
    p = Pass(obj)(jobs=[trainer_job(obj)], pods=[waiting], claim=None)  # storage.claimName: not ours
    assert p.status["reason"] == "Unschedulable"


# ---------------------------------------------------------------------------------------------------
# Preemption: not a failure, counted once, the replacement resumes
# ---------------------------------------------------------------------------------------------------


def test_preemption_is_counted_once_and_the_replacement_resumes() -> None:
    obj = ftj()
    passes = Pass(obj)
    job = trainer_job(obj)
    passes(jobs=[job], pods=[pod("Running")], claim=claim(obj))
    p = passes(jobs=[job], pods=[disrupted_pod()], claim=claim(obj))
    s = p.status
    assert (s["state"], s["reason"], s["restarts"], s["preemptions"]) == ("Running", "Preempted", 1, 1)
    assert "PreemptionByScheduler" in cond(s, "Running")["message"]
    assert reasons(p) == ["Preempted"] and p.events[0].type == "Warning"
    # The pod is gone before its replacement comes (the Job controller waits): still one preemption.
    gone = passes(jobs=[job], pods=[], claim=claim(obj))
    assert (gone.status["reason"], gone.status["restarts"], gone.events) == ("Preempted", 1, [])
    replacement = pod("Running", "2026-11-28T09:30:00Z", name="demo-2")
    back = passes(jobs=[job], pods=[disrupted_pod(), replacement], claim=claim(obj))
    assert (back.status["reason"], back.status["restarts"]) == ("TrainerRunning", 1)


def test_a_preempted_pod_gone_before_it_was_seen_still_counts() -> None:
    obj = ftj()
    passes = Pass(obj)
    job = trainer_job(obj)
    passes(jobs=[job], pods=[pod("Running")], claim=claim(obj))
    p = passes(jobs=[job], pods=[], claim=claim(obj))  # no pod, and the Job counted no failure
    assert (p.status["state"], p.status["reason"], p.status["preemptions"]) == ("Running", "Preempted", 1)


# ---------------------------------------------------------------------------------------------------
# Failures: a reason a person can act on
# ---------------------------------------------------------------------------------------------------

FAILED = [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "lastTransitionTime": T0}]
BACKOFF = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": T0}]


def failed_run(
    pods: list[dict[str, Any]], conditions: list[dict[str, Any]] = FAILED, failed: int = 1, **spec: Any
) -> Plan:
    obj = ftj(status={"state": "Running"}, **spec)
    obj["status"]["specHash"] = plan(observe(obj), NOW).status["specHash"]
    return plan(
        observe(obj, jobs=[trainer_job(obj, conditions, failed=failed)], pods=pods, claim=claim(obj)), NOW
    )


@pytest.mark.parametrize(
    ("code", "message", "reason", "fragment"),
    [
        (4, termination_message("SecretMissing", 'create the Secret "hf"'), "SecretMissing", 'Secret "hf"'),
        (
            3,
            termination_message("DatasetError", "spec.dataset.textField: no column x"),
            "DatasetError",
            "column x",
        ),
        (5, "", "CUDAOutOfMemory", "perDeviceBatchSize"),
        (3, "", "DatasetError", "spec.dataset"),
        (2, "", "InvalidSpec", "exited with code 2"),
        (6, termination_message("TrainerError", "model org/x not found"), "TrainerError", "org/x not found"),
        (4, "", "SecretMissing", 'create the Secret "hf" with key "tok"'),
        # A termination message that is not the trainer's (FallbackToLogsOnError's log tail): the exit code.
        (
            5,
            "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory",
            "CUDAOutOfMemory",
            "CUDA out of memory",
        ),
        # A reason that is no condition reason is not taken from a pod.
        (6, termination_message("not a reason!", "x"), "TrainerError", "exited with code 6"),
    ],
)
def test_fail_fast_exit_codes_report_the_trainers_reason(
    code: int, message: str, reason: str, fragment: str
) -> None:
    p = failed_run([failed_pod(code, message=message)])
    s = p.status
    assert (s["state"], s["reason"], s["restarts"], s["completionTime"]) == ("Failed", reason, 0, T0)
    assert fragment in cond(s, "Failed")["message"]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", reason)] and p.requeue is None


def test_a_user_error_behind_accelerate_ends_the_run_at_once() -> None:
    """With several processes per pod, accelerate exits 1 whatever the trainer exited with, so the
    Job's podFailurePolicy cannot see a user error: the trainer's termination message ends the run."""
    obj = ftj(status={"state": "Running"})
    obj["status"]["specHash"] = plan(observe(obj), NOW).status["specHash"]
    message = termination_message("DatasetError", "spec.dataset.textField: no column x")
    job = trainer_job(obj, failed=1)
    replacement = pod("Running", "2026-11-28T09:10:00Z", name="demo-pod-2")
    p = plan(
        observe(obj, jobs=[job], pods=[failed_pod(1, message=message), replacement], claim=claim(obj)), NOW
    )
    assert (p.status["state"], p.status["reason"]) == ("Failed", "DatasetError")
    assert "no column x" in cond(p.status, "Failed")["message"]
    assert ("delete", "Job", job["metadata"]["name"]) in kinds(p)
    # An unexpected error (exit 1, no reason of the trainer's that a retry cannot fix) is retried.
    crash = termination_message("UnexpectedError", "RuntimeError: boom")
    p = plan(observe(obj, jobs=[job], pods=[failed_pod(1, message=crash)], claim=claim(obj)), NOW)
    assert p.status["state"] == "Running" and not [k for k in kinds(p) if k[0] == "delete"]


def test_oomkilled_names_the_memory_and_the_knobs() -> None:
    p = failed_run(
        [failed_pod(137, "OOMKilled")], BACKOFF, failed=1, resources={"gpusPerNode": 1, "memory": "200Gi"}
    )
    assert p.status["reason"] == "OOMKilled"
    message = cond(p.status, "Failed")["message"]
    assert "resources.memory: 200Gi" in message and "perDeviceBatchSize" in message


def test_backoff_limit_carries_the_last_failure() -> None:
    pods = [
        failed_pod(1, message="RuntimeError: boom", created=T0),
        failed_pod(1, message="RuntimeError: bang", created="2026-11-28T09:10:00Z"),
    ]
    p = failed_run(pods, BACKOFF, failed=2)
    s = p.status
    assert (s["reason"], s["restarts"]) == ("BackoffLimitExceeded", 1)
    message = cond(s, "Failed")["message"]
    assert "failed 2 time(s)" in message and "bang" in message and "TrainerError" in message


def test_deadline_exceeded() -> None:
    deadline = [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "lastTransitionTime": T0}]
    p = failed_run([], deadline, failed=0, runPolicy={"activeDeadlineSeconds": 60})
    assert p.status["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds (60 s)" in cond(p.status, "Failed")["message"]


def test_a_retried_failure_is_a_warning_and_a_restart() -> None:
    obj = ftj()
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj)], pods=[pod("Running")], claim=claim(obj))
    p = passes(jobs=[trainer_job(obj, failed=1)], pods=[failed_pod(1, message="boom")], claim=claim(obj))
    s = p.status
    assert (s["state"], s["reason"], s["restarts"]) == ("Running", "TrainerError", 1)
    assert "retrying (runPolicy.backoffLimit 3)" in cond(s, "Running")["message"]
    assert reasons(p) == ["TrainerError"]


def test_image_pull_waits_for_the_grace_then_fails_and_deletes_the_job() -> None:
    obj = ftj()
    scheduled = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-28T09:59:00Z"}]
    pulling = pod(
        "Pending",
        conditions=scheduled,
        container={"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
    )
    passes = Pass(obj)
    job = trainer_job(obj)
    p = passes(jobs=[job], pods=[pulling], claim=claim(obj), image_pull_grace=300.0)
    assert (p.status["state"], p.status["reason"]) == ("Pending", "ImagePullFailed")
    assert p.requeue == PENDING_RESYNC_SECONDS and not [a for a in p.actions if isinstance(a, Delete)]
    assert "cannot pull the trainer image img" in cond(p.status, "Running")["message"]
    assert reasons(p) == ["ImagePullFailed"]
    near = passes(NOW + timedelta(seconds=235), jobs=[job], pods=[pulling], claim=claim(obj))
    assert near.requeue == 5.0
    late = passes(NOW + timedelta(seconds=240), jobs=[job], pods=[pulling], claim=claim(obj))
    assert (late.status["state"], late.status["reason"]) == ("Failed", "ImagePullFailed")
    assert kinds(late) == [("delete", "Job", job["metadata"]["name"])] and late.requeue is None
    assert reasons(late) == ["ImagePullFailed"]
    # Level-triggered: while the Job is still there the run is over, and it is deleted again.
    again = passes(NOW + timedelta(seconds=250), jobs=[job], pods=[pulling], claim=claim(obj))
    assert kinds(again) == [("delete", "Job", job["metadata"]["name"])] and again.events == []
    deleting = {**job, "metadata": {**job["metadata"], "deletionTimestamp": T0}}
    settled = passes(NOW + timedelta(seconds=260), jobs=[deleting], pods=[], claim=claim(obj))
    assert settled.actions == [] and settled.status["state"] == "Failed" and settled.requeue is None


def test_an_image_that_can_never_be_pulled_fails_at_once() -> None:
    obj = ftj()
    bad = pod("Pending", container={"waiting": {"reason": "InvalidImageName", "message": "bad ref"}})
    p = plan(observe(obj, jobs=[trainer_job(obj)], pods=[bad], claim=claim(obj)), NOW)
    assert p.status["reason"] == "ImagePullFailed" and p.status["state"] == "Failed"
    assert [k for a, k, _ in kinds(p) if a == "delete"] == ["Job"]


# ---------------------------------------------------------------------------------------------------
# Done, cleaned up, refused
# ---------------------------------------------------------------------------------------------------


def test_succeeded() -> None:
    obj = ftj()
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj)], pods=[pod("Running")], claim=claim(obj), log_tail=LOG)
    done = trainer_job(obj, [{"type": "Complete", "status": "True"}], completionTime="2026-11-28T11:00:00Z")
    p = passes(jobs=[done], pods=[pod("Succeeded")], claim=claim(obj))
    s = p.status
    assert (s["state"], s["reason"], s["phase"], s["progress"], s["eta"]) == (
        "Succeeded",
        "TrainingComplete",
        "Succeeded",
        "100%",
        "0s",
    )
    assert s["completionTime"] == "2026-11-28T11:00:00Z" and s["loss"] == "1.2346"
    assert reasons(p) == ["Succeeded"] and p.requeue is None
    assert passes(jobs=[done], pods=[pod("Succeeded")], claim=claim(obj)).events == []


def test_a_finished_run_whose_job_was_cleaned_up_stays_finished() -> None:
    obj = ftj()
    passes = Pass(obj)
    done = trainer_job(obj, [{"type": "Complete", "status": "True"}])
    finished = passes(jobs=[done], claim=claim(obj)).status
    edited = ftj(generation=2, runPolicy={"ttlSecondsAfterFinished": 60}, status=finished)
    p = plan(observe(edited, claim=claim(edited)), NOW)  # the TTL controller deleted the Job
    assert p.actions == [] and p.events == [] and p.requeue is None
    assert p.status == {**finished, "observedGeneration": 2}


def test_a_rejected_run_fails_once_and_is_retried_only_after_an_edit() -> None:
    obj = ftj()
    rejected = plan(observe(obj, rejected='Job.batch "demo-x" is invalid: metadata.name'), NOW)
    s = rejected.status
    assert rejected.actions == [] and rejected.requeue is None
    assert (s["state"], s["reason"]) == ("Failed", "JobRejected")
    assert (
        cond(s, "Valid")["reason"] == "JobRejected"
        and 'Job.batch "demo-x" is invalid' in cond(s, "Failed")["message"]
    )
    assert reasons(rejected) == ["JobRejected"]
    # The next pass leaves it alone: nothing is created again, no hot loop.
    settled = plan(observe(ftj(status=s), secret="present"), NOW)
    assert settled.actions == [] and settled.events == [] and settled.requeue is None
    # Any edit (a new generation) tries again, even one that keeps the spec hash.
    edited = plan(observe(ftj(generation=2, status=s, runPolicy={"backoffLimit": 1}), secret="present"), NOW)
    assert [k for _, k, _ in kinds(edited)][-1] == "Job"


def test_objects_carry_the_run_labels() -> None:
    obj = ftj()
    p = plan(observe(obj), NOW)
    for a in p.actions:
        assert isinstance(a, Create)
        assert a.obj["metadata"]["labels"][LABEL_JOB] == "demo"
        if a.obj["kind"] != "PersistentVolumeClaim":
            assert a.obj["metadata"]["labels"][LABEL_RUN] == run_name(model(obj))


def test_a_failure_the_job_is_about_to_fail_over_is_no_retry() -> None:
    """The pod failed with a fail-fast exit code; the Job controller has not marked the Job Failed yet."""
    obj = ftj()
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj)], pods=[pod("Running")], claim=claim(obj))
    said = termination_message("DatasetError", "spec.dataset.textField: no column x")
    p = passes(jobs=[trainer_job(obj, failed=1)], pods=[failed_pod(3, message=said)], claim=claim(obj))
    assert (p.status["state"], p.status["reason"], p.status["restarts"]) == ("Running", "DatasetError", 0)
    assert "retrying" not in cond(p.status, "Running")["message"] and reasons(p) == ["DatasetError"]
    # Marked Failed a moment later: the same Warning is not recorded twice.
    done = passes(
        jobs=[trainer_job(obj, FAILED, failed=1)], pods=[failed_pod(3, message=said)], claim=claim(obj)
    )
    assert (done.status["state"], done.status["reason"], done.status["restarts"]) == (
        "Failed",
        "DatasetError",
        0,
    )
    assert done.events == []


def test_a_failed_pod_the_job_has_not_counted_yet_is_no_preemption() -> None:
    obj = ftj(runPolicy={"backoffLimit": 0})
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj)], pods=[pod("Running")], claim=claim(obj))
    p = passes(jobs=[trainer_job(obj)], pods=[failed_pod(137, "OOMKilled")], claim=claim(obj))
    assert (p.status["reason"], p.status["restarts"]) == ("OOMKilled", 0) and "preemptions" not in p.status


# ---------------------------------------------------------------------------------------------------
# The policy's limits (kubetune.policy), checked before a run is created
# ---------------------------------------------------------------------------------------------------

POLICY = "ConfigMap kubetune-system/kubetune-policy"


def test_a_spec_over_the_limits_fails_with_policy_violation_and_creates_nothing() -> None:
    limits = Limits(source=POLICY, max_gpus_per_job=8, allowed_image_prefixes=("registry.example.com/ml/",))
    passes = Pass(ftj(resources={"gpusPerNode": 8, "nodes": 2}, image="evil.example/x:1"))
    p = passes(secret="present", limits=limits)
    assert p.actions == [] and p.requeue is None
    assert (p.status["state"], p.status["reason"]) == ("Failed", "PolicyViolation")
    message = cond(p.status, "Failed")["message"]
    # Both problems, each with its field, the limit and who can change it.
    assert message.startswith('spec.image: "evil.example/x:1" is not allowed'), message
    assert "spec.resources: 16 GPUs (gpusPerNode 8 x nodes 2) is more than the 8" in message
    assert message.count(f"ask your platform team to change {POLICY}") == 2
    assert message.endswith(
        f"No run is created; it is checked again when the FineTuneJob or {POLICY} changes"
    )
    assert (
        cond(p.status, "Valid")["status"] == "False"
        and cond(p.status, "Valid")["reason"] == "PolicyViolation"
    )
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "PolicyViolation")]
    # The next pass with the same limits says the same, and records nothing new.
    again = passes(secret="present", limits=limits)
    assert again.actions == [] and again.events == [] and again.status == p.status


def test_policy_violation_is_decided_again_when_the_limits_change() -> None:
    passes = Pass(ftj(resources={"gpusPerNode": 8, "nodes": 2}))
    assert (
        passes(secret="present", limits=Limits(source=POLICY, max_gpus_per_job=8)).status["state"] == "Failed"
    )
    p = passes(secret="present", limits=Limits(source=POLICY, max_gpus_per_job=16))
    assert ("create", "Job", run_name(model(passes.obj))) in kinds(p)
    assert (p.status["state"], p.status["reason"]) == ("Pending", "Starting")
    assert cond(p.status, "Valid")["reason"] == "SpecValid"
    assert "Failed" not in {c["type"] for c in p.status["conditions"]}


def test_policy_violation_is_decided_again_when_the_spec_changes() -> None:
    limits = Limits(source=POLICY, allowed_priority_classes=("low",))
    passes = Pass(ftj(resources={"gpusPerNode": 1, "priorityClassName": "high"}))
    assert passes(secret="present", limits=limits).status["reason"] == "PolicyViolation"
    passes.obj = {
        **ftj(generation=2, resources={"gpusPerNode": 1, "priorityClassName": "low"}),
        "status": passes.obj["status"],
    }
    p = passes(secret="present", limits=limits)
    assert p.status["state"] == "Pending" and any(k == "Job" for _, k, _ in kinds(p))


def test_limits_that_cannot_be_read_hold_every_new_run() -> None:
    passes = Pass(ftj())
    problem = f"{POLICY}, which holds the limits on FineTuneJobs, does not exist"
    p = passes(secret="present", policy_problem=problem)
    assert p.actions == []
    assert (p.status["state"], p.status["reason"]) == ("Pending", "PolicyUnavailable")
    assert cond(p.status, "Running")["message"] == problem
    assert p.requeue == 10.0 and reasons(p) == ["PolicyUnavailable"]


def test_tighter_limits_leave_a_running_run_alone() -> None:
    obj = ftj(resources={"gpusPerNode": 8, "nodes": 2})
    job = trainer_job(obj, active=2)
    p = plan(observe(obj, jobs=[job], limits=Limits(source=POLICY, max_gpus_per_job=1)), NOW)
    assert p.status["reason"] != "PolicyViolation"
    assert not any(isinstance(a, Delete) for a in p.actions)


# ---------------------------------------------------------------------------------------------------
# State never goes backwards; what the e2e scenarios check, pass by pass
# ---------------------------------------------------------------------------------------------------

COMPLETE = [{"type": "Complete", "status": "True"}]
RANK = {"Pending": 0, "Running": 1, "Succeeded": 2}


def test_a_pod_finished_before_its_job_is_complete_is_running_not_pending() -> None:
    """No pass saw the pod Running (it was quick, or the status read was older than the last write):
    a Succeeded pod under a Job not yet Complete still means the trainer ran."""
    obj = ftj()
    passes = Pass(obj)
    assert passes(jobs=[trainer_job(obj)], claim=claim(obj)).status["state"] == "Pending"
    p = passes(jobs=[trainer_job(obj, succeeded=1)], pods=[pod("Succeeded")], claim=claim(obj))
    assert (p.status["state"], p.status["reason"]) == ("Running", "TrainerRunning")
    assert "waiting for its Job to be marked Complete" in cond(p.status, "Running")["message"]
    assert reasons(p) == ["Started"] and p.requeue == RUNNING_RESYNC_SECONDS
    done = passes(jobs=[trainer_job(obj, COMPLETE, succeeded=1)], pods=[pod("Succeeded")], claim=claim(obj))
    assert done.status["state"] == "Succeeded" and reasons(done) == ["Succeeded"]


def test_a_failure_after_a_finished_pod_is_not_hidden_by_it() -> None:
    obj = ftj()
    pods = [pod("Succeeded", T0), failed_pod(1, message="boom", created="2026-11-28T09:10:00Z", name="b")]
    p = plan(observe(obj, jobs=[trainer_job(obj, failed=1)], pods=pods, claim=claim(obj)), NOW)
    assert p.status["reason"] == "TrainerError" and "retrying" in cond(p.status, "Running")["message"]


STAGES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("job, no pod", [], {}),
    ("pod pending", [pod("Pending")], {"active": 1}),
    ("pod running", [pod("Running")], {"active": 1}),
    ("pod done, job not complete", [pod("Succeeded")], {"succeeded": 1}),
    ("job complete", [pod("Succeeded")], {"succeeded": 1, "conditions": COMPLETE}),
]


@pytest.mark.parametrize("repeat", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
@pytest.mark.parametrize("seen", [m for m in range(1, 32) if m & 1], ids=lambda m: f"{m:05b}")
def test_any_subsequence_of_observations_moves_forward_only(seen: int, stale: bool, repeat: int) -> None:
    """The operator may see any subset of a run's stages (passes are prompted by events, and a busy
    operator merges them), each stage maybe twice, and may read a status one write behind (a cache
    that has not seen its own last patch yet): the state written only moves forward, and each
    transition is one event."""
    obj = ftj()
    written: list[dict[str, Any]] = [{}]
    states, events = [], []
    for i, (_, pods, status) in enumerate(STAGES):
        if not seen & (1 << (len(STAGES) - 1 - i)):
            continue
        for _ in range(repeat):
            conditions = status.get("conditions")
            job = trainer_job(obj, conditions, **{k: v for k, v in status.items() if k != "conditions"})
            read = written[-2] if stale and len(written) > 1 else written[-1]
            p = plan(observe({**obj, "status": read}, jobs=[job], pods=pods, claim=claim(obj)), NOW)
            written.append(p.status)
            states.append(p.status["state"])
            events += reasons(p)
    ranks = [RANK[s] for s in states]
    assert ranks == sorted(ranks), states
    assert states[-1] == "Succeeded"
    if not stale:
        assert events.count("Started") <= 1 and events.count("Succeeded") == 1


def test_a_restarted_operator_creates_nothing_for_a_run_in_progress() -> None:
    """Killed mid-run (test_killing_the_operator_mid_run_creates_no_duplicate_job): the next operator's
    first pass over the same cluster finds the run's objects and changes nothing."""
    obj = ftj()
    passes = Pass(obj)
    passes(secret="present")
    job = trainer_job(obj, active=1)
    running = passes(jobs=[job], pods=[pod("Running")], claim=claim(obj))
    again = passes(jobs=[job], pods=[pod("Running")], claim=claim(obj))
    assert again.actions == [] and again.events == [] and again.status == running.status


def test_a_metadata_edit_starts_no_new_run() -> None:
    obj = ftj()
    passes = Pass(obj)
    job = trainer_job(obj, active=1)
    running = passes(jobs=[job], pods=[pod("Running")], claim=claim(obj)).status
    relabelled = ftj(generation=1, status=running)
    relabelled["metadata"]["labels"] = {"team": "nlp"}
    p = plan(observe(relabelled, jobs=[job], pods=[pod("Running")], claim=claim(obj)), NOW)
    assert p.actions == [] and p.events == [] and p.status["jobName"] == running["jobName"]


def test_a_spec_edit_is_a_new_run_in_its_own_folder_replaced_once() -> None:
    old = ftj(training={"learningRate": 1e-4})
    passes = Pass(old)
    old_job = trainer_job(old, active=1)
    first = passes(jobs=[old_job], pods=[pod("Running")], claim=claim(old)).status
    passes.obj = {**ftj(generation=2), "status": first}
    p = passes(jobs=[old_job], claim=claim(old))
    assert reasons(p) == [] and [e.reason for a in p.actions if (e := getattr(a, "event", None))] == [
        "RunReplaced",
        "RunCreated",
    ]
    s = p.status
    assert s["jobName"] != first["jobName"] and s["outputPath"] != first["outputPath"]
    assert (s["state"], s["reason"]) == ("Pending", "Starting") and "progress" not in s
    # The old Job is going away: not deleted (nor replaced) again.
    going = {**old_job, "metadata": {**old_job["metadata"], "deletionTimestamp": T0}}
    new_job = trainer_job(passes.obj)
    again = passes(jobs=[going, new_job], claim=claim(old))
    assert again.actions == [] and again.events == []


def test_suspend_and_resume_without_kueue() -> None:
    obj = ftj()
    passes = Pass(obj)
    job = trainer_job(obj, active=1)
    passes(jobs=[job], pods=[pod("Running")], claim=claim(obj))
    passes.obj = {**ftj(generation=2, runPolicy={"suspend": True}), "status": passes.obj["status"]}
    p = passes(jobs=[job], pods=[pod("Running")], claim=claim(obj))
    assert [a.patch for a in p.actions if isinstance(a, Patch)] == [{"spec": {"suspend": True}}]
    assert p.status["state"] == "Suspended" and reasons(p) == ["Suspended"] and p.requeue is None
    suspended = trainer_job(obj, suspend=True)
    assert passes(jobs=[suspended], claim=claim(obj)).actions == []
    passes.obj = {**ftj(generation=3), "status": passes.obj["status"]}
    resumed = passes(jobs=[suspended], claim=claim(obj))
    assert [a.patch for a in resumed.actions if isinstance(a, Patch)] == [{"spec": {"suspend": False}}]
    back = passes(jobs=[trainer_job(obj, active=1)], pods=[pod("Running")], claim=claim(obj))
    assert back.status["state"] == "Running" and reasons(back) == ["Started"]


def test_kueue_suspending_an_admitted_run_queues_it_again_and_is_not_undone() -> None:
    obj = ftj(runPolicy={"queueName": "gpus"})
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj, suspend=False, active=1)], pods=[pod("Running")], claim=claim(obj))
    p = passes(jobs=[trainer_job(obj, suspend=True)], claim=claim(obj))
    assert not [a for a in p.actions if isinstance(a, Patch)]
    assert (p.status["state"], p.status["reason"]) == ("Queued", "WaitingForAdmission")
    assert reasons(p) == ["Queued"] and p.requeue is None


def test_unschedulable_replacement_keeps_a_running_run_running() -> None:
    obj = ftj()
    stuck = pod(
        "Pending",
        name="demo-2",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no gpu"}
        ],
    )
    passes = Pass(obj)
    passes(jobs=[trainer_job(obj)], pods=[pod("Running")], claim=claim(obj))
    p = passes(jobs=[trainer_job(obj)], pods=[stuck], claim=claim(obj))
    assert (p.status["state"], p.status["reason"]) == ("Running", "Unschedulable")
    assert cond(p.status, "Scheduled")["status"] == "False" and reasons(p) == ["Unschedulable"]


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        ({"jobs": "plain"}, PENDING_RESYNC_SECONDS),  # Starting: pod events wake it anyway
        ({"jobs": "plain", "pods": [pod("Running")]}, RUNNING_RESYNC_SECONDS),  # progress and ETA
        ({"jobs": "suspended"}, None),  # a change of the Job wakes it
        ({"jobs": "complete"}, None),
        ({"jobs": "failed", "pods": [failed_pod(3)]}, None),
        ({"secret": "missing"}, 10.0),  # back-off, from 10 s
        ({"claim": "deleting"}, 5.0),
    ],
    ids=["starting", "running", "suspended", "succeeded", "failed", "secret-missing", "claim-deleting"],
)
def test_requeue_delays(observed: dict[str, Any], expected: float | None) -> None:
    obj = ftj()
    jobs = {
        "plain": [trainer_job(obj)],
        "suspended": [trainer_job(obj, suspend=True)],
        "complete": [trainer_job(obj, COMPLETE)],
        "failed": [trainer_job(obj, FAILED, failed=1)],
    }
    kw: dict[str, Any] = {"claim": claim(obj)}
    if "jobs" in observed:
        kw["jobs"] = jobs[observed["jobs"]]
    if "pods" in observed:
        kw["pods"] = observed["pods"]
    if "secret" in observed:
        kw = {"secret": "missing"}
    if observed.get("claim") == "deleting":
        kw = {"claim": claim(obj, deletionTimestamp=T0)}
    if observed.get("jobs") == "suspended":
        obj = ftj(runPolicy={"suspend": True})
    assert plan(observe(obj, **kw), NOW).requeue == expected
