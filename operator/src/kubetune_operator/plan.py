"""Decide what to do about one FineTuneJob: `plan(observed, now)` is a pure function of what reconcile
read, and returns the actions to take, the new status, the events to record and when to look again.

No I/O and no clock, so every branch is unit-tested with plain dicts (tests/test_operator_plan.py).
Nothing is remembered between passes: what a decision needs is in the cluster (the objects, their
conditions and timestamps, and the FineTuneJob's own status), so a restarted operator decides the same.

What a pass makes true, in this order:
1. runs of older specs are stopped (their Job, Service and ConfigMap deleted; finished ones stay);
2. a final status stays final within its run: nothing is created again, and a Job that kubetune ended
   (ImagePullFailed) is deleted, so that it holds no GPU;
3. before a run's objects are created, the spec is within the policy's limits (kubetune.policy; else
   Failed/PolicyViolation, nothing created, decided again on every pass, so a change of the spec or of
   the limits is seen), the run fits the memory of its GPU (kubetune_operator.fit; else Failed/Unfit,
   nothing created, decided again on every pass and every UNFIT_RESYNC_SECONDS; a run whose Job exists is
   never refused), its Hub token Secret exists (else Pending/SecretMissing, nothing
   created, looked at again with back-off) and its workspace claim can be used;
4. the run's objects exist (creating one that exists is a no-op), the workspace claim's owner follows
   storage.reclaimPolicy, and the run's Job follows runPolicy (suspend, unless Kueue owns it;
   activeDeadlineSeconds; ttlSecondsAfterFinished);
5. the status says what the cluster shows, with the reason that explains it, and never goes backwards
   within a run; events mark its transitions, once each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob
from kubetune.contract import FAIL_FAST_EXIT_CODES, LABEL_JOB, LABEL_QUEUE, REASON_BY_EXIT, REASON_UNFIT
from kubetune.policy import UNAVAILABLE, VIOLATION, Limits, check
from kubetune.render import (
    output_path,
    render,
    render_claim,
    render_job,
    run_name,
    secret_refs,
    spec_hash,
    workspace_claim,
)
from kubetune_operator.fit import Fit
from kubetune_operator.status import (
    INDEX_ANNOTATION,
    LINEAGE_FIELDS,
    TERMINAL,
    Conditions,
    Event,
    Failure,
    cond,
    created,
    deleting,
    failed_pods,
    final_progress,
    format_time,
    image_pull_problem,
    job_failure,
    job_finished,
    job_succeeded,
    newest,
    parse_time,
    phase,
    pod_failure,
    preempted,
    preparing,
    progress_fields,
    running_pods,
    secret_missing_message,
    unschedulable,
)

# Look again this often while the trainer runs: progress, loss and ETA come from its log.
RUNNING_RESYNC_SECONDS = 10.0
# ... and while a run waits for its pods (their events wake the operator anyway).
PENDING_RESYNC_SECONDS = 30.0
# A missing Secret, or a claim in the way, is looked at again after as long as it has been so: 10 s,
# 20 s, 40 s ..., at most this.
BACKOFF_MIN_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 120.0
# The claim of a deleted FineTuneJob of the same name is going away: look again soon.
CLAIM_DELETING_RESYNC_SECONDS = 5.0
DEFAULT_IMAGE_PULL_GRACE_SECONDS = 300.0
# runPolicy fields applied to a running Job (backoffLimit and queueName apply from the next run).
MUTABLE_JOB_FIELDS = ("suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished")
# Reasons that are routine; any other reason is news, recorded as a Warning event when it appears.
ROUTINE_REASONS = frozenset(
    {"TrainerRunning", "Starting", "WaitingForAdmission", "Suspended", "TrainingComplete"}
)
# The reasons of the exit codes a retry cannot fix (the trainer's termination message names them).
FAIL_FAST_REASONS = frozenset(REASON_BY_EXIT[code] for code in FAIL_FAST_EXIT_CODES)
# Final reasons retried when the FineTuneJob changes at all (metadata.generation), not only when its
# spec hash does: the API server refused the run's objects, and any edit may be the fix.
RETRY_ON_EDIT = frozenset({"JobRejected"})
# Final reasons decided before any run existed, decided again on every pass: the spec may have changed,
# or the limits (the operator looks again when the policy ConfigMap changes).
RECHECKED = frozenset({VIOLATION, REASON_UNFIT})
# A run refused as Unfit is looked at again this often: a node relabelled (nvidia.com/gpu.memory) is seen
# without any change of the FineTuneJob (kubetune_operator.fit memoizes the listing, so this costs ~0).
UNFIT_RESYNC_SECONDS = 120.0

SecretCheck = Literal["present", "missing", "unknown"]


# --------------------------------------------------------------------------------------------------
# What was read, and what to do
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """Everything one pass read about one FineTuneJob, and the operator settings a decision needs."""

    ftj: dict[str, Any]  # the object as read: metadata, spec, status
    job: FineTuneJob | None  # the validated FineTuneJob; None when invalid
    invalid: str | None = None  # why it is invalid
    jobs: list[dict[str, Any]] = field(default_factory=list)  # every Job of this FineTuneJob, all runs
    pods: list[dict[str, Any]] = field(default_factory=list)  # the current run's pods
    claim: dict[str, Any] | None = None  # the workspace claim kubetune creates, if it exists
    # The Secrets the run reads (kubetune.render.secret_refs), when they were looked at; the fields of the
    # missing ones (SecretRef.field) when some are.
    secret: SecretCheck | None = None
    missing_secrets: tuple[str, ...] = ()
    log_tail: str | None = None  # the end of rank 0's trainer log, when it could be read
    rejected: str | None = None  # the API server refused to create the run's objects, this pass
    image: str | None = None  # the operator's trainer image, for specs that name none
    image_pull_grace: float = DEFAULT_IMAGE_PULL_GRACE_SECONDS
    limits: Limits | None = None  # the policy's limits (kubetune.policy); None: the operator enforces none
    policy_problem: str | None = None  # the limits cannot be read: no run starts
    fit: Fit | None = None  # whether the run fits its GPU (kubetune_operator.fit); None: not asked


@dataclass(frozen=True)
class Create:
    obj: dict[str, Any]
    event: Event | None = None  # recorded when it was created (not when it existed already)


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    event: Event | None = None  # recorded when something was deleted (not when it was gone)


@dataclass(frozen=True)
class Patch:
    kind: str  # Job | PersistentVolumeClaim
    name: str
    patch: dict[str, Any]  # a JSON merge patch


Action = Create | Delete | Patch


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    status: dict[str, Any]  # the whole new status, None values dropped
    events: list[Event]
    requeue: float | None  # seconds to the next unprompted pass; None: wait for a change


# --------------------------------------------------------------------------------------------------
# plan()
# --------------------------------------------------------------------------------------------------


def _refuse(
    before: dict[str, Any],
    status: dict[str, Any],
    conds: Conditions,
    reason: str,
    message: str,
    now: datetime,
) -> None:
    """A run refused before anything is created (RECHECKED reasons): not valid, failed, finished."""
    conds.set("Valid", False, reason, message)
    conds.set("Failed", True, reason, message)
    status.update(
        state="Failed", reason=reason, completionTime=before.get("completionTime") or format_time(now)
    )


def plan(obs: Observed, now: datetime) -> Plan:
    meta = obs.ftj.get("metadata") or {}
    old: dict[str, Any] = obs.ftj.get("status") or {}
    gen = meta.get("generation")
    conds = Conditions(old.get("conditions"), format_time(now), gen)
    if obs.job is None:
        message = obs.invalid or "the spec is invalid"
        conds.set("Valid", False, "InvalidSpec", message)
        conds.set("Failed", True, "InvalidSpec", message)
        return _plan(
            old, {"observedGeneration": gen, "state": "Failed", "reason": "InvalidSpec"}, conds, [], None
        )

    job = obs.job
    run, digest = run_name(job), spec_hash(job)
    same_run = old.get("specHash") == digest
    before = old if same_run else {}  # what this run's status said last pass ({} for a new run)
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "specHash": digest,
        "jobName": run,
        "workspaceClaim": workspace_claim(job),
        "outputPath": output_path(job),
    }
    for key in (
        "phase",
        "progress",
        "loss",
        "eta",
        "step",
        "totalSteps",
        "tokensPerSecond",
        "restarts",
        "preemptions",
        *LINEAGE_FIELDS,  # kept within the run once reported, after its pods and their logs are gone
    ):
        status[key] = before.get(key)
    status.update(startTime=before.get("startTime"), completionTime=before.get("completionTime"))
    actions: list[Action] = []

    # 1. Runs of older specs stop.
    if obs.rejected is None:  # (when rejected, this pass has acted already)
        for other in obs.jobs:
            name = other["metadata"]["name"]
            if name != run and not job_finished(other) and not deleting(other):
                event = Event("Normal", "RunReplaced", f"spec changed: stopped run {name}, starting {run}")
                actions += [Delete("Job", name, event), Delete("Service", name), Delete("ConfigMap", name)]

    # 2. A final status stays final within its run.
    current = next((j for j in obs.jobs if j["metadata"]["name"] == run), None)
    final = before.get("state") in TERMINAL
    if final and before.get("reason") in RETRY_ON_EDIT and before.get("observedGeneration") != gen:
        final = False  # edited since the API server refused it: try again
    if final and before.get("reason") in RECHECKED:
        final = False
    if final and (current is None or deleting(current) or not job_finished(current)):
        if current is not None and not deleting(current):
            actions.append(Delete("Job", run))  # ended by kubetune: it must hold no GPU
        # The Job is gone (TTL) or going: keep what the status said, for the generation now seen.
        return Plan(actions, _drop_none({**old, "observedGeneration": gen}), [], None)

    conds.set("Valid", True, "SpecValid", "the spec is valid")
    if obs.rejected is not None:
        message = (
            f"the API server refused to create the run: {obs.rejected}. Nothing of the run was kept; it is "
            "tried again when the FineTuneJob changes"
        )
        conds.set("Valid", False, "JobRejected", message)
        conds.set("Failed", True, "JobRejected", message)
        status.update(state="Failed", reason="JobRejected", completionTime=format_time(now))
        return _plan(before, status, conds, [], None)

    # 3 and 4. The run's objects.
    if current is None:
        limits = obs.limits
        violations = check(job, limits) if limits is not None else []
        if limits is not None and violations:
            message = (
                "; ".join(violations)
                + f". No run is created; it is checked again when the FineTuneJob or {limits.source} changes"
            )
            _refuse(before, status, conds, VIOLATION, message, now)
            return _plan(before, status, conds, actions, None)
        fit = obs.fit
        if fit is not None and fit.verdict == "waiting":
            # The model's config.json is on its way: decide when it is here (its fetch wakes this key).
            return Plan(actions, _drop_none(old), [], fit.retry)
        if fit is not None and fit.verdict == "unfit":
            message = (
                f"{fit.message}. No run is created; it is checked again when the FineTuneJob or the "
                "nodes' labels change"
            )
            _refuse(before, status, conds, REASON_UNFIT, message, now)
            return _plan(before, status, conds, actions, UNFIT_RESYNC_SECONDS)
        if before.get("reason") in RECHECKED:
            status["completionTime"] = None  # refused before, not any more: not finished
        waiting = _before_create(obs, job, before, now)
        if waiting is not None:
            reason, message, delay = waiting
            conds.set("Running", False, reason, message)
            status.update(state="Pending", reason=reason)
            return _plan(before, status, conds, actions, delay)
        actions += _claim_ownership(obs, job)
        # The fit check's verdict travels with the run's RunCreated event: said once, no extra request.
        note = f"; {fit.message}" if fit is not None else ""
        for obj in render(job, image=obs.image):
            if obj["kind"] == "PersistentVolumeClaim" and obs.claim is not None:
                continue
            created_event = (
                Event("Normal", "RunCreated", f"created Job {run}{note}") if obj["kind"] == "Job" else None
            )
            actions.append(Create(obj, created_event))
        current = render_job(job, image=obs.image)  # as this pass creates it: no status yet
    elif not job_finished(current) and not deleting(current):
        actions += _claim_ownership(obs, job)
        claim = render_claim(job)
        if claim is not None and obs.claim is None:  # deleted under a live run: make it again
            actions.append(Create(claim))
        patch = _job_patch(job, current, obs.image)
        if patch:
            actions.append(Patch("Job", run, {"spec": patch}))
            current = {**current, "spec": {**(current.get("spec") or {}), **patch}}

    # 5. The status.
    ended = _run_status(obs, job, current, status, conds, before, now)
    if ended and (current.get("metadata") or {}).get("uid") and not deleting(current):
        actions.append(Delete("Job", run))
    return _plan(before, status, conds, actions, _requeue(status, obs, now), obs)


# --------------------------------------------------------------------------------------------------
# Before anything is created
# --------------------------------------------------------------------------------------------------


def _before_create(
    obs: Observed, job: FineTuneJob, before: dict[str, Any], now: datetime
) -> tuple[str, str, float] | None:
    """(reason, message, when to look again) if the run cannot start yet; None if it can."""
    namespace = str((obs.ftj.get("metadata") or {}).get("namespace") or job.metadata.namespace or "")
    if obs.policy_problem is not None:
        return UNAVAILABLE, obs.policy_problem, _backoff(before, UNAVAILABLE, now)
    if obs.secret == "missing":
        message = secret_missing_message(job, namespace, obs.missing_secrets)
        several = len({r.name for r in secret_refs(job) if r.field in obs.missing_secrets}) > 1
        message += "; the run starts once " + ("they exist" if several else "it exists")
        return "SecretMissing", message, _backoff(before, "SecretMissing", now)
    claim = obs.claim
    if claim is None or not job.spec.storage.creates_claim:
        return None
    name = claim["metadata"]["name"]
    if (claim["metadata"].get("labels") or {}).get(LABEL_JOB) != job.metadata.name:
        message = (
            f"a PersistentVolumeClaim {name} exists that kubetune did not create: delete or rename it, or "
            "mount it on purpose with spec.storage.claimName"
        )
        return "WorkspaceConflict", message, _backoff(before, "WorkspaceConflict", now)
    if deleting(claim):
        message = (
            f"the workspace claim {name} (of a deleted FineTuneJob of the same name) is still being "
            "deleted; the run starts with a new one once it is gone"
        )
        return "WorkspaceDeleting", message, CLAIM_DELETING_RESYNC_SECONDS
    return None


def _backoff(before: dict[str, Any], reason: str, now: datetime) -> float:
    """Exponential back-off without memory: wait as long again as `reason` has held (its Running
    condition's lastTransitionTime), within bounds."""
    running = cond(before.get("conditions"), "Running")
    since = None
    if running is not None and running.get("reason") == reason and before.get("reason") == reason:
        since = parse_time(running.get("lastTransitionTime"))
    held = (now - since).total_seconds() if since is not None else 0.0
    return float(min(BACKOFF_MAX_SECONDS, max(BACKOFF_MIN_SECONDS, held)))


def _claim_ownership(obs: Observed, job: FineTuneJob) -> list[Action]:
    """storage.reclaimPolicy on the claim kubetune made: Delete, owned by this FineTuneJob (adopting the
    claim a deleted FineTuneJob of the same name left); Retain, owned by no FineTuneJob."""
    claim = obs.claim
    desired = render_claim(job)
    if claim is None or desired is None or deleting(claim) or not job.metadata.uid:
        return []
    refs = list(claim["metadata"].get("ownerReferences") or [])
    others = [r for r in refs if not (r.get("apiVersion") == API_VERSION and r.get("kind") == KIND)]
    wanted = [*others, *(desired["metadata"].get("ownerReferences") or [])]
    if [r.get("uid") for r in refs] == [r.get("uid") for r in wanted]:
        return []
    return [
        Patch("PersistentVolumeClaim", claim["metadata"]["name"], {"metadata": {"ownerReferences": wanted}})
    ]


def _job_patch(job: FineTuneJob, current: dict[str, Any], image: str | None) -> dict[str, Any]:
    """runPolicy fields the running Job lacks. Never `suspend` of a Job Kueue manages (it carries the
    queue label): Kueue admits and preempts it by flipping that field."""
    desired = render_job(job, image=image)["spec"]
    have = current.get("spec") or {}
    fields = [f for f in MUTABLE_JOB_FIELDS if not (f == "suspend" and _kueue_managed(current))]
    return {k: desired.get(k) for k in fields if desired.get(k) != have.get(k)}


def _kueue_managed(job: dict[str, Any]) -> bool:
    return LABEL_QUEUE in ((job.get("metadata") or {}).get("labels") or {})


# --------------------------------------------------------------------------------------------------
# The run's status
# --------------------------------------------------------------------------------------------------


def _run_status(
    obs: Observed,
    job: FineTuneJob,
    current: dict[str, Any],
    status: dict[str, Any],
    conds: Conditions,
    before: dict[str, Any],
    now: datetime,
) -> bool:
    """Fill in the run's status from its Job and Pods; True when kubetune ends the run (and so deletes
    its Job)."""
    jstatus = current.get("status") or {}
    pods = obs.pods
    policy = job.spec.run_policy
    if jstatus.get("startTime"):
        status["startTime"] = jstatus["startTime"]
    # A pod that succeeded left its last progress line as its termination message (read only when no
    # log could be read).
    status.update(progress_fields(obs.log_tail or final_progress(pods)))
    # Failures the Job counted, plus preemptions (which it does not count: podFailurePolicy ignores
    # them), counted once each, when the reason turns Preempted.
    failures = int(jstatus.get("failed") or 0)
    preemptions = int(before.get("preemptions") or 0)
    if policy.suspend and _kueue_managed(current):
        conds.set(
            "Suspended",
            False,
            "SuspendIgnored",
            f"runPolicy.suspend is ignored: Kueue (runPolicy.queueName {policy.queue_name}) owns the Job's "
            "suspend field; to pause the run, deactivate its Workload in Kueue",
        )

    ended = False
    failure = job_failure(current)
    if job_succeeded(current):
        status.update(
            state="Succeeded", reason="TrainingComplete", phase="Succeeded", progress="100%", eta="0s"
        )
        status["completionTime"] = jstatus.get("completionTime") or format_time(now)
        conds.set("Succeeded", True, "TrainingComplete", "training finished")
    elif failure is not None:
        reason, message = _job_failure(failure, pods, job, failures)
        failures = max(0, failures - 1)  # the last failure was not followed by a restart
        status.update(state="Failed", reason=reason, phase="Failed", eta=None)
        status["completionTime"] = failure.get("lastTransitionTime") or format_time(now)
        conds.set("Failed", True, reason, message)
    elif (current.get("spec") or {}).get("suspend"):
        status.update(eta=None, phase=None)
        if _kueue_managed(current):
            message = (
                f"Kueue holds the Job in LocalQueue {policy.queue_name} until it admits it (quota, "
                "priority); the run starts, or resumes from its last checkpoint, then"
            )
            status.update(state="Queued", reason="WaitingForAdmission")
            conds.set("Queued", True, "WaitingForAdmission", message)
        else:
            status.update(state="Suspended", reason="Suspended")
            conds.set(
                "Suspended", True, "Suspended", "runPolicy.suspend is true; the run resumes when it is false"
            )
    else:
        reason, message, ended = _active(obs, job, current, before, now)
        if _final_failure(obs, job, current) is not None:
            failures = max(0, failures - 1)  # not followed by a restart
        if ended:
            status.update(
                state="Failed", reason=reason, phase="Failed", eta=None, completionTime=format_time(now)
            )
            conds.set("Failed", True, reason, message)
        else:
            state = "Running" if reason == "TrainerRunning" else "Pending"
            if state == "Pending" and before.get("state") == "Running":
                # Never backwards within a run: between pods (a retry, a preemption, a pod done
                # before its Job is marked Complete) the run is still running.
                state = "Running"
                previous = cond(before.get("conditions"), "Running")
                if reason == "Starting" and previous is not None and previous.get("status") == "True":
                    reason, message = "TrainerRunning", str(previous.get("message"))
            if reason == "Preempted" and before.get("reason") != "Preempted":
                preemptions += 1
            status.update(state=state, reason=reason)
            conds.set("Running", reason == "TrainerRunning", reason, message)
            scheduling = unschedulable(pods)
            if scheduling is not None:
                conds.set("Scheduled", False, "Unschedulable", scheduling)
            elif pods:
                conds.set("Scheduled", True, "Scheduled", "trainer pods are scheduled")
    # Both counts only grow within a run: the Job's failures and the preemptions counted above.
    status["preemptions"] = preemptions or None
    status["restarts"] = failures + preemptions
    return ended


def _active(
    obs: Observed, job: FineTuneJob, current: dict[str, Any], before: dict[str, Any], now: datetime
) -> tuple[str, str, bool]:
    """(reason, message, whether kubetune ends the run) for a run neither finished nor paused."""
    pods = obs.pods
    # A user error the Job's podFailurePolicy could not see: with several processes per pod,
    # `accelerate launch` exits 1 whatever the trainer exited with. The trainer's termination message
    # still names the reason, and a retry cannot fix it, so kubetune ends the run itself.
    for pod in failed_pods(pods):
        failure = pod_failure(pod, job)
        if failure.from_trainer and failure.reason in FAIL_FAST_REASONS and failure.exit_code == 1:
            return failure.reason, f"{failure.message}; a retry cannot fix this, so the run is ended", True
    running = running_pods(pods)
    latest_run = max((created(p) for p in running), default="")
    # A disrupted pod that no running pod came after: the run waits for its replacement.
    disrupted = [p for p in pods if preempted(p) and created(p) >= latest_run]
    if disrupted:
        failure = pod_failure(max(disrupted, key=created), job)
        return failure.reason, failure.message, False
    if before.get("state") == "Running" and _pod_vanished(pods, job, current, before):
        return "Preempted", PREEMPTED_GONE, False
    if running:
        return "TrainerRunning", "the trainer is running", False
    if _finished_under_job(pods):
        # The Job controller marks the Job Complete a moment after its pods succeed. The trainer ran,
        # whatever this run's last status said (a pass may never have seen the pod Running, or may
        # read a status older than its own last write): Running, never back to Pending.
        return "TrainerRunning", TRAINER_FINISHED, False
    scheduling = unschedulable(pods)
    if scheduling is not None and _waits_for_own_claim(obs, scheduling):
        # Routine, not a warning: the scheduler waits for the claim kubetune just created to bind (a
        # burst of runs binds their claims one after another). Once bound, it schedules the pod.
        claim = workspace_claim(job)
        return "Starting", f"waiting for the workspace claim {claim} to bind ({scheduling})", False
    if scheduling is not None:
        return "Unschedulable", scheduling, False
    pull = image_pull_problem(pods)
    if pull is not None:
        if pull.fatal:
            return "ImagePullFailed", f"{pull.message}. The run's Job is deleted: it holds no resources", True
        waited = (now - pull.since).total_seconds() if pull.since is not None else 0.0
        if waited >= obs.image_pull_grace:
            return (
                "ImagePullFailed",
                f"{pull.message}. Gave up after {obs.image_pull_grace:.0f} s; the run's Job is deleted: it "
                "holds no resources",
                True,
            )
        return (
            "ImagePullFailed",
            f"{pull.message} (still retrying, for up to {obs.image_pull_grace:.0f} s)",
            False,
        )
    last = newest(pods)
    if last is not None and phase(last) == "Failed":
        failure = pod_failure(last, job)
        if _final_failure(obs, job, current) is not None:
            return failure.reason, failure.message, False  # the Job is about to be marked Failed
        limit = job.spec.run_policy.backoff_limit
        return failure.reason, f"{failure.message}; retrying (runPolicy.backoffLimit {limit})", False
    if before.get("reason") == "Preempted":  # the replacement is on its way
        previous = cond(before.get("conditions"), "Running")
        return "Preempted", str((previous or {}).get("message") or PREEMPTED_GONE), False
    if not pods:
        return "Starting", "the Job is created; waiting for its trainer pods", False
    return "Starting", preparing(pods) or "waiting for the trainer pods to start", False


TRAINER_FINISHED = "the trainer finished; waiting for its Job to be marked Complete"


def _finished_under_job(pods: list[dict[str, Any]]) -> bool:
    """A pod of the run succeeded, and no pod failed after it (then the failure decides)."""
    done = [p for p in pods if phase(p) == "Succeeded"]
    if not done:
        return False
    last_done = max(created(p) for p in done)
    return not [p for p in failed_pods(pods) if created(p) > last_done]


PREEMPTED_GONE = (
    "a trainer pod was stopped by a disruption (preemption, eviction, node drain) and is being replaced; "
    "the replacement resumes from the last checkpoint"
)


# What kube-scheduler says of a pod whose PersistentVolumeClaim is not bound yet.
UNBOUND_CLAIM = "unbound immediate PersistentVolumeClaims"


def _waits_for_own_claim(obs: Observed, scheduling: str) -> bool:
    """The pod is unschedulable only because the workspace claim kubetune created is not bound yet."""
    if obs.claim is None or UNBOUND_CLAIM not in scheduling:
        return False
    return (obs.claim.get("status") or {}).get("phase") != "Bound"


def _pod_vanished(
    pods: list[dict[str, Any]], job: FineTuneJob, current: dict[str, Any], before: dict[str, Any]
) -> bool:
    """A running run lost a pod the Job did not count as failed: a disruption its podFailurePolicy
    ignored, whose pod was gone before a pass could see its DisruptionTarget condition. Some rank has
    no pod at all, and the Job counted no new failure."""
    seen = {(p.get("metadata", {}).get("annotations") or {}).get(INDEX_ANNOTATION, "0") for p in pods}
    missing = [i for i in range(job.spec.resources.nodes) if str(i) not in seen]
    failures = int((current.get("status") or {}).get("failed") or 0)
    counted_before = int(before.get("restarts") or 0) - int(before.get("preemptions") or 0)
    return bool(missing) and failures <= counted_before


def _final_failure(obs: Observed, job: FineTuneJob, current: dict[str, Any]) -> Failure | None:
    """The newest pod's failure, when the Job will fail over it (a fail-fast exit code, or no retry
    left) but has not said so yet: it is not followed by a restart."""
    last = newest(obs.pods)
    if last is None or phase(last) != "Failed" or preempted(last):
        return None
    failure = pod_failure(last, job)
    failures = int((current.get("status") or {}).get("failed") or 0)
    if failure.exit_code in FAIL_FAST_EXIT_CODES or failures > job.spec.run_policy.backoff_limit:
        return failure
    return None


def _job_failure(
    failure: dict[str, Any], pods: list[dict[str, Any]], job: FineTuneJob, failures: int
) -> tuple[str, str]:
    """The reason and message of a failed Job: the trainer's own reason when a pod says why."""
    job_reason = str(failure.get("reason") or "JobFailed")
    real = [p for p in failed_pods(pods) if not preempted(p)]
    last: Failure | None = pod_failure(real[-1], job) if real else None
    policy = job.spec.run_policy
    if job_reason == "DeadlineExceeded":
        return (
            "DeadlineExceeded",
            f"the run took longer than runPolicy.activeDeadlineSeconds ({policy.active_deadline_seconds} s) "
            "and was stopped: raise it, or train less (training.maxSteps, training.epochs)",
        )
    if job_reason == "BackoffLimitExceeded":
        if last is not None and last.reason == "OOMKilled":
            return "OOMKilled", last.message
        detail = f"; the last failure, {last.reason}: {last.message}" if last is not None else ""
        return (
            "BackoffLimitExceeded",
            f"the trainer failed {failures} time(s), more than runPolicy.backoffLimit "
            f"({policy.backoff_limit}){detail}",
        )
    if last is not None:  # PodFailurePolicy (a fail-fast exit code), and anything else a pod explains
        return last.reason, last.message
    return job_reason, str(failure.get("message") or "the trainer Job failed")


# --------------------------------------------------------------------------------------------------
# Events, requeue, and the plan
# --------------------------------------------------------------------------------------------------


def _events(before: dict[str, Any], status: dict[str, Any], obs: Observed | None) -> list[Event]:
    """One event per transition of the run: its state, its reason, a restart after a failure."""
    state, reason = status.get("state"), status.get("reason")
    explanation = _explanation(status)
    out: list[Event] = []
    if state != before.get("state") or (state == "Failed" and reason != before.get("reason")):
        if state == "Failed":
            # (unless this very Warning was recorded already, when the failure showed on its pod)
            if (reason, explanation) != (before.get("reason"), _explanation(before)):
                out.append(Event("Warning", str(reason), explanation))
        elif state == "Succeeded":
            out.append(Event("Normal", "Succeeded", f"run {status.get('jobName')} finished"))
        elif state == "Running":
            out.append(Event("Normal", "Started", f"trainer of run {status.get('jobName')} is running"))
        elif state == "Suspended":
            out.append(Event("Normal", "Suspended", f"run {status.get('jobName')} is suspended"))
        elif state == "Queued":
            out.append(Event("Normal", "Queued", explanation))
    if state not in TERMINAL and reason != before.get("reason") and reason not in ROUTINE_REASONS:
        out.append(Event("Warning", str(reason), explanation))
    failures = int(status.get("restarts") or 0) - int(status.get("preemptions") or 0)
    failures_before = int(before.get("restarts") or 0) - int(before.get("preemptions") or 0)
    if obs is not None and state in ("Pending", "Running") and failures > failures_before:
        real = [p for p in failed_pods(obs.pods) if not preempted(p)]
        if real and obs.job is not None:
            failure = pod_failure(real[-1], obs.job)
            out.append(Event("Warning", failure.reason, f"{failure.message} (restart {failures})"))
    unique: dict[str, Event] = {}
    for event in out:
        unique.setdefault(event.reason, event)
    return list(unique.values())


def _explanation(status: dict[str, Any]) -> str:
    """The message of the condition that carries the status's reason."""
    reason = status.get("reason")
    for c in status.get("conditions") or []:
        if c.get("reason") == reason and c.get("type") != "Valid":
            return str(c.get("message") or reason)
    return str(reason)


def _requeue(status: dict[str, Any], obs: Observed, now: datetime) -> float | None:
    state, reason = status.get("state"), status.get("reason")
    if state in TERMINAL or state in ("Suspended", "Queued"):
        return None  # a change of the Job (Kueue admitting it, runPolicy.suspend) wakes the operator
    if reason == "ImagePullFailed":
        pull = image_pull_problem(obs.pods)
        if pull is not None and pull.since is not None:
            left = obs.image_pull_grace - (now - pull.since).total_seconds()
            return float(min(PENDING_RESYNC_SECONDS, max(1.0, left)))
    return RUNNING_RESYNC_SECONDS if state == "Running" else PENDING_RESYNC_SECONDS


def _plan(
    before: dict[str, Any],
    status: dict[str, Any],
    conds: Conditions,
    actions: list[Action],
    requeue: float | None,
    obs: Observed | None = None,
) -> Plan:
    status = _drop_none({**status, "conditions": conds.items})
    return Plan(actions, status, _events(before, status, obs), requeue)


def _drop_none(status: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if v is not None}
    if "conditions" in out:
        out["conditions"] = [{k: v for k, v in c.items() if v is not None} for c in out["conditions"]]
    return out
