"""What the cluster says about one run, in the words of a FineTuneJob's status: pure functions of the
Job, its Pods, the trainer's log tail and the old status.

No I/O and no clock (`now` is passed in), so every mapping is unit-tested with plain dicts. The decisions
built on them (what to create, delete or patch) are kubetune_operator.plan's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import (
    ANNOTATION_COMPLETION_INDEX,
    REASON_BY_EXIT,
    Exit,
    ProgressReport,
    parse_progress,
    parse_termination_message,
)
from kubetune.durations import format_duration
from kubetune.redact import redact
from kubetune.render import CONTAINER, PREPARE_CONTAINER, SecretRef, secret_refs

TERMINAL = ("Succeeded", "Failed")
INDEX_ANNOTATION = ANNOTATION_COMPLETION_INDEX
# Container waiting reasons: retried by the kubelet (with back-off), or never going to work.
IMAGE_PULL_RETRYING = ("ErrImagePull", "ImagePullBackOff")
IMAGE_PULL_FATAL = ("ErrImageNeverPull", "InvalidImageName")
# What a condition reason may look like (metav1.Condition); anything else from a pod is not used as one.
_REASON_RE = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
MESSAGE_MAX = 2000


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Failure:
    """Why a trainer pod failed, as a condition reason and a message that says what to do."""

    reason: str
    message: str
    preempted: bool = False
    exit_code: int | None = None  # the trainer container's, when it terminated
    from_trainer: bool = False  # the reason is the trainer's own, from its termination message


# --------------------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------------------


def cond(conditions: list[dict[str, Any]] | None, kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == kind), None)


def is_true(conditions: list[dict[str, Any]] | None, kind: str) -> bool:
    c = cond(conditions, kind)
    return c is not None and c.get("status") == "True"


def job_conditions(job: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list(((job or {}).get("status") or {}).get("conditions") or [])


def job_succeeded(job: dict[str, Any]) -> bool:
    return is_true(job_conditions(job), "Complete")


def job_failure(job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's Failed condition, or FailureTarget (set first, while the last pods stop)."""
    conds = job_conditions(job)
    for kind in ("Failed", "FailureTarget"):
        if is_true(conds, kind):
            return cond(conds, kind)
    return None


def job_finished(job: dict[str, Any]) -> bool:
    return job_succeeded(job) or job_failure(job) is not None


def deleting(obj: dict[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def created(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp") or "")


def phase(pod: dict[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((cs for cs in statuses if cs.get("name") == CONTAINER), statuses[0] if statuses else {})


def _failed_status(pod: dict[str, Any]) -> dict[str, Any]:
    """The status of the container that failed the pod: an init container (``prepare``) that exited
    non-zero, after which the trainer never started, else the trainer's."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if term and term.get("exitCode") != 0:
            return dict(cs)
    return _trainer_status(pod)


def preparing(pods: list[dict[str, Any]]) -> str | None:
    """What a pod whose ``prepare`` init container is running is doing (the pod is Pending meanwhile)."""
    for pod in pods:
        if deleting(pod) or phase(pod) != "Pending":
            continue
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if cs.get("name") == PREPARE_CONTAINER and "running" in (cs.get("state") or {}):
                name = (pod.get("metadata") or {}).get("name", "?")
                return (
                    f"preparing data: pod {name} is tokenizing the dataset into the workspace's cache "
                    "(init container prepare); training starts when it is done"
                )
    return None


def preempted(pod: dict[str, Any]) -> bool:
    """Stopped by a disruption (preemption, eviction, node drain; DisruptionTarget): the Job's
    podFailurePolicy does not count it as a failure, and the replacement resumes from the last
    checkpoint."""
    return is_true((pod.get("status") or {}).get("conditions"), "DisruptionTarget")


def running_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if phase(p) == "Running" and not deleting(p)]


def failed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed pods, oldest first."""
    return sorted((p for p in pods if phase(p) == "Failed"), key=created)


def newest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(pods, key=created) if pods else None


def rank0_log_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod whose log carries the progress lines: rank 0 (completion index 0), with its trainer
    container running. The newest, when a replacement overlaps the pod it replaces."""
    candidates = [
        p
        for p in running_pods(pods)
        if (p.get("metadata", {}).get("annotations") or {}).get(INDEX_ANNOTATION, "0") == "0"
        and "running" in (_trainer_status(p).get("state") or {})
    ]
    return max(candidates, key=created) if candidates else None


# --------------------------------------------------------------------------------------------------
# Failures, with a message that says what to do
# --------------------------------------------------------------------------------------------------


def _clip(text: str, limit: int = MESSAGE_MAX) -> str:
    """One line of at most ``limit`` characters, secrets redacted first (every condition message, and
    every Failure's, is made here): a token cut in half may no longer look like one."""
    text = " ".join(redact(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def secret_missing_message(job: FineTuneJob, namespace: str, missing: Sequence[str] = ()) -> str:
    """What to create: each missing Secret (``missing``: the fields of kubetune.render.secret_refs whose
    Secret does not exist; empty: the first the run reads), with every key the run reads from it."""
    refs = [r for r in secret_refs(job) if r.field in missing] or secret_refs(job)[:1]
    by_secret: dict[str, list[SecretRef]] = {}
    for ref in refs:
        by_secret.setdefault(ref.name, []).append(ref)
    if not by_secret:
        return f"a Secret the run reads does not exist in namespace {namespace}"
    parts = []
    for name, group in by_secret.items():
        keys = list(dict.fromkeys(r.key for r in group))
        keys_text = f'key "{keys[0]}"' if len(keys) == 1 else "keys " + ", ".join(f'"{k}"' for k in keys)
        fields = ", ".join(f"{r.field}.secretKeyRef" for r in group)
        literals = " ".join(
            f"--from-literal={key}=<{next(r.holds for r in group if r.key == key)}>" for key in keys
        )
        parts.append(
            f'the Secret "{name}" with {keys_text} ({fields}) does not exist in namespace {namespace}: '
            f"create it with `kubectl create secret generic {name} -n {namespace} {literals}`"
        )
    return "; ".join(parts)


def _hint(reason: str, job: FineTuneJob | None, message: str) -> tuple[str, str] | None:
    """(a word the message must already contain, or the hint to add) per reason."""
    if reason == "CUDAOutOfMemory":
        return (
            "perDeviceBatchSize",
            "lower training.perDeviceBatchSize (raise gradientAccumulationSteps to keep the batch) or "
            "training.maxSeqLength, keep training.gradientCheckpointing on, or use larger GPUs "
            "(resources.gpuType)",
        )
    if reason == "SecretMissing" and job is not None:
        # The trainer names the Secret it missed (the Hub token's, or a tracker's); a message that names
        # none of the run's Secrets gets the first one's.
        refs = secret_refs(job)
        if refs and not any(f'"{r.name}"' in message or f"'{r.name}'" in message for r in refs):
            ref = refs[0]
            return (ref.name, f'create the Secret "{ref.name}" with key "{ref.key}" holding the {ref.holds}')
    if reason == "DatasetError":
        return ("spec.dataset", "check spec.dataset (id, files, format and its field names)")
    return None


def oom_message(job: FineTuneJob | None) -> str:
    memory = job.spec.resources.memory if job is not None else None
    limit = (
        f"more memory than its limit (resources.memory: {memory})"
        if memory
        else "more memory than the node could give it (resources.memory is unset, so none is reserved)"
    )
    return (
        f"the trainer used {limit} and was killed (OOMKilled): raise resources.memory, or lower "
        "training.perDeviceBatchSize and training.maxSeqLength (smaller batches of shorter rows)"
    )


def pod_failure(pod: dict[str, Any], job: FineTuneJob | None = None) -> Failure:
    """Why one failed pod failed: its trainer's termination message (contract.termination_message),
    else the container's termination reason and exit code (contract.REASON_BY_EXIT)."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    if preempted(pod):
        dt = cond(status.get("conditions"), "DisruptionTarget") or {}
        why = ": ".join(str(x) for x in (dt.get("reason"), dt.get("message")) if x)
        return Failure(
            "Preempted",
            f"trainer pod {name} was preempted ({why or 'DisruptionTarget'}); its replacement resumes "
            "from the last checkpoint",
            preempted=True,
        )
    failed = _failed_status(pod)
    # "the trainer" or, when preparing the data failed, the init container that did it.
    who = "the trainer" if failed.get("name", CONTAINER) == CONTAINER else "preparing the data"
    term = (failed.get("state") or {}).get("terminated")
    if not term:
        detail = ": ".join(str(x) for x in (status.get("reason"), status.get("message")) if x)
        return Failure("TrainerError", _clip(f"trainer pod {name} failed ({detail or 'no reason given'})"))
    # Redacted before the log's end is cut off: a cut could keep a token and lose its hf_ prefix.
    code, treason, text = term.get("exitCode"), term.get("reason"), redact(str(term.get("message") or ""))
    exit_code = code if isinstance(code, int) else None
    if treason == "OOMKilled":
        return Failure("OOMKilled", oom_message(job), exit_code=exit_code)
    parsed = parse_termination_message(text)
    if parsed is not None and _REASON_RE.match(parsed[0]) and len(parsed[0]) <= 64:
        reason, message = parsed
    elif isinstance(code, int) and code in REASON_BY_EXIT:
        reason = REASON_BY_EXIT[code]
        message = f"{who} exited with code {code} ({Exit(code).name.lower().replace('_', ' ')})"
        if text.strip():
            message += f"; the end of its log: {text.strip()[-600:]}"
    else:
        reason = "TrainerError"
        message = f"{who} exited with code {code}" + (f" ({treason})" if treason else "")
        if text.strip():
            message += f"; the end of its log: {text.strip()[-600:]}"
    hint = _hint(reason, job, message)
    if hint is not None and hint[0] not in message:
        message = f"{message.rstrip('.')}: {hint[1]}"
    return Failure(
        reason, _clip(message), exit_code=exit_code, from_trainer=parsed is not None and reason == parsed[0]
    )


def last_failure(pods: list[dict[str, Any]], job: FineTuneJob | None = None) -> Failure | None:
    failed = failed_pods(pods)
    return pod_failure(failed[-1], job) if failed else None


def unschedulable(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        if deleting(pod):
            continue
        c = cond((pod.get("status") or {}).get("conditions"), "PodScheduled")
        if c and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message") or "no node fits the trainer pod")
    return None


@dataclass(frozen=True)
class ImagePull:
    message: str
    fatal: bool  # the kubelet will never pull it (InvalidImageName, ErrImageNeverPull)
    since: datetime | None  # when the pod was scheduled: pulling began then


def image_pull_problem(pods: list[dict[str, Any]]) -> ImagePull | None:
    for pod in pods:
        if deleting(pod) or phase(pod) != "Pending":
            continue
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason not in IMAGE_PULL_RETRYING + IMAGE_PULL_FATAL:
                continue
            scheduled = cond(status.get("conditions"), "PodScheduled") or {}
            since = parse_time(scheduled.get("lastTransitionTime")) or parse_time(created(pod))
            detail = _clip(str(waiting.get("message") or reason), 600)
            return ImagePull(
                f"cannot pull the trainer image {cs.get('image')!s} ({reason}: {detail}): check spec.image "
                "(or the operator's --image), that the registry is reachable from the nodes, and the "
                "pull secret of the namespace's default ServiceAccount",
                fatal=reason in IMAGE_PULL_FATAL,
                since=since,
            )
    return None


# --------------------------------------------------------------------------------------------------
# Progress from the log tail
# --------------------------------------------------------------------------------------------------


def progress_fields(log_tail: str | None) -> dict[str, Any]:
    """Status fields from the newest progress line in rank 0's log tail ({} when there is none)."""
    report: ProgressReport | None = parse_progress(log_tail) if log_tail else None
    if report is None:
        return {}
    out: dict[str, Any] = {"phase": report["state"]}
    step, total = report.get("step"), report.get("total_steps")
    if isinstance(step, int):
        out["step"] = step
        if isinstance(total, int) and total > 0:
            out.update(totalSteps=total, progress=f"{min(100, 100 * step // total)}%")
    if report.get("loss") is not None:
        out["loss"] = f"{report['loss']:.4f}"
    if report.get("eta_seconds") is not None:
        out["eta"] = format_duration(report["eta_seconds"])
    if report.get("tokens_per_second") is not None:
        out["tokensPerSecond"] = round(report["tokens_per_second"] or 0)
    # Lineage (checked by contract._clean: a 40-hex commit, a plain http(s) URL). A URL that holds
    # anything secret-shaped is left out, not masked: a masked URL leads nowhere.
    if report.get("base_model_commit"):
        out["baseModelCommit"] = report["base_model_commit"]
    url = report.get("hub_commit_url")
    if url and redact(url) == url:
        out["hubCommitUrl"] = url
    return out


# Status fields that, once a run's trainer reported them, stay for the rest of the run: a later pass may
# find no log to read (the pod succeeded, or its replacement has not said it yet).
LINEAGE_FIELDS = ("baseModelCommit", "hubCommitUrl")


def final_progress(pods: list[dict[str, Any]]) -> str | None:
    """The trainer's last progress line, from the termination message of rank 0's newest succeeded pod.

    The log of a pod is read only while it runs, and the final line (the one with the Hub commit URL)
    comes just before the trainer exits; so a trainer that succeeds also leaves that line as its
    termination message, which the Pod's status keeps after the container is gone."""
    done = [
        p
        for p in pods
        if phase(p) == "Succeeded"
        and (p.get("metadata", {}).get("annotations") or {}).get(INDEX_ANNOTATION, "0") == "0"
    ]
    pod = newest(done)
    if pod is None:
        return None
    term = (_trainer_status(pod).get("state") or {}).get("terminated") or {}
    message = term.get("message")
    return message if isinstance(message, str) and message else None


# --------------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------------


class Conditions:
    """The conditions of the new status; a condition keeps its lastTransitionTime until its status
    flips (the Kubernetes convention)."""

    def __init__(self, old: list[dict[str, Any]] | None, now: str, generation: int | None) -> None:
        self.old = old or []
        self.now = now
        self.generation = generation
        self.items: list[dict[str, Any]] = []

    def set(self, kind: str, status: bool, reason: str, message: str) -> None:
        value = "True" if status else "False"
        previous = cond(self.old, kind)
        since = self.now
        if previous is not None and previous.get("status") == value:
            since = str(previous.get("lastTransitionTime") or self.now)
        self.items = [c for c in self.items if c["type"] != kind]
        self.items.append(
            {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": _clip(message),
                "lastTransitionTime": since,
                "observedGeneration": self.generation,
            }
        )

    def get(self, kind: str) -> dict[str, Any] | None:
        return cond(self.items, kind)
