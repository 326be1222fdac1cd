"""FineTuneJob status from what the cluster shows: a pure function of the Job, its Pods and the old status.

No I/O and no clock (`now` is passed in), so every mapping is unit-tested with plain dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubetune.durations import format_duration
from kubetune.render import ANNOTATION_PROGRESS

PROGRESS_ANNOTATION = ANNOTATION_PROGRESS

TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Observed:
    """Everything reconcile read about one run."""

    generation: int | None
    spec_hash: str
    run_name: str
    job: dict[str, Any] | None
    pods: list[dict[str, Any]] = field(default_factory=list)
    invalid: str | None = None  # the validation message when the spec is invalid


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def _cond(conditions: list[dict[str, Any]] | None, kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == kind), None)


def _is_true(conditions: list[dict[str, Any]] | None, kind: str) -> bool:
    c = _cond(conditions, kind)
    return c is not None and c.get("status") == "True"


def job_finished(job: dict[str, Any]) -> bool:
    conds = job.get("status", {}).get("conditions")
    return _is_true(conds, "Complete") or _is_true(conds, "Failed")


def _pod_failure(pods: list[dict[str, Any]]) -> str | None:
    """A person-readable reason from the newest failed trainer container."""
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    for pod in reversed(failed):
        status = pod.get("status", {})
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term:
                parts = [f"container {cs.get('name')} exited with code {term.get('exitCode')}"]
                if term.get("reason"):
                    parts.append(f"({term['reason']})")
                if term.get("message"):
                    parts.append(f": {str(term['message']).strip()[:500]}")
                return " ".join(parts).replace(" :", ":")
        if status.get("reason") or status.get("message"):
            return f"pod {status.get('reason', 'Failed')}: {status.get('message', '')}".strip()
    return None


def _unschedulable(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        c = _cond(pod.get("status", {}).get("conditions"), "PodScheduled")
        if c and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message") or "no node fits the trainer pod")
    return None


def _progress(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest progress report of the rank-0 pod (or any pod)."""
    reports = []
    for pod in pods:
        raw = (pod.get("metadata", {}).get("annotations") or {}).get(PROGRESS_ANNOTATION)
        if not raw:
            continue
        try:
            report = json.loads(raw)
        except ValueError:
            continue
        if isinstance(report, dict):
            reports.append((str(report.get("updated_at") or ""), report))
    return max(reports, key=lambda r: r[0])[1] if reports else None


def _set_condition(
    conditions: list[dict[str, Any]],
    old: list[dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> None:
    value = "True" if status else "False"
    previous = _cond(old, kind)
    changed = previous is None or previous.get("status") != value
    conditions.append(
        {
            "type": kind,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now if changed else previous.get("lastTransitionTime", now),  # type: ignore[union-attr]
            "observedGeneration": generation,
        }
    )


def compute_status(obs: Observed, old: dict[str, Any], now: str) -> tuple[dict[str, Any], list[Event]]:
    """The new status and the events its changes deserve (events only on transitions)."""
    old = old or {}
    old_conds = old.get("conditions") or []
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "specHash": obs.spec_hash,
        "jobName": obs.run_name,
    }
    same_run = old.get("specHash") == obs.spec_hash
    for key in ("progress", "loss", "eta", "step", "totalSteps", "startTime", "completionTime"):
        if same_run and old.get(key) is not None:
            status[key] = old[key]
    conds: list[dict[str, Any]] = []
    events: list[Event] = []
    gen = obs.generation

    if obs.invalid is not None:
        status.update(state="Failed", jobName=None)
        _set_condition(conds, old_conds, "Valid", False, "InvalidSpec", obs.invalid, now, gen)
        _set_condition(conds, old_conds, "Failed", True, "InvalidSpec", obs.invalid, now, gen)
    else:
        job = obs.job or {}
        jstatus = job.get("status", {})
        jconds = jstatus.get("conditions") or []
        pods = obs.pods
        _set_condition(conds, old_conds, "Valid", True, "SpecValid", "the spec is valid", now, gen)
        if jstatus.get("startTime"):
            status["startTime"] = jstatus["startTime"]
        report = _progress(pods)
        if report is not None:
            step, total = report.get("step"), report.get("total_steps")
            if isinstance(step, int) and isinstance(total, int) and total > 0:
                status.update(step=step, totalSteps=total, progress=f"{min(100, 100 * step // total)}%")
            if isinstance(report.get("loss"), (int, float)):
                status["loss"] = f"{report['loss']:.4f}"
            if isinstance(report.get("eta_seconds"), (int, float)):
                status["eta"] = format_duration(report["eta_seconds"])
        status["restarts"] = int(jstatus.get("failed") or 0)

        unschedulable = _unschedulable(pods)
        if _is_true(jconds, "Complete"):
            state = "Succeeded"
            status.update(progress="100%", eta="0s", completionTime=jstatus.get("completionTime") or now)
            _set_condition(
                conds, old_conds, "Succeeded", True, "TrainingComplete", "training finished", now, gen
            )
        elif _is_true(jconds, "Failed"):
            state = "Failed"
            jc = _cond(jconds, "Failed") or {}
            reason = str(jc.get("reason") or "JobFailed")
            detail = _pod_failure(pods) or str(jc.get("message") or "the trainer Job failed")
            status["completionTime"] = jc.get("lastTransitionTime") or now
            status["restarts"] = max(0, status["restarts"] - 1)  # the last failure is not a restart
            _set_condition(conds, old_conds, "Failed", True, reason, detail, now, gen)
        elif job.get("spec", {}).get("suspend"):
            state = "Suspended"
            status.pop("eta", None)
            _set_condition(
                conds,
                old_conds,
                "Suspended",
                True,
                "Suspended",
                "runPolicy.suspend is true (or Kueue has not admitted the Job yet)",
                now,
                gen,
            )
        elif any(p.get("status", {}).get("phase") == "Running" for p in pods):
            state = "Running"
            _set_condition(
                conds, old_conds, "Running", True, "TrainerRunning", "the trainer is running", now, gen
            )
        else:
            state = "Pending"
        if state in ("Pending", "Running"):
            if unschedulable is not None:
                _set_condition(conds, old_conds, "Scheduled", False, "Unschedulable", unschedulable, now, gen)
            elif pods:
                _set_condition(
                    conds, old_conds, "Scheduled", True, "Scheduled", "trainer pods are scheduled", now, gen
                )
        status["state"] = state

    status["conditions"] = conds

    # Events for what changed.
    state, before = status["state"], old.get("state") if same_run else None
    scheduled = _cond(conds, "Scheduled")
    old_scheduled = _cond(old_conds, "Scheduled") if same_run else None
    if scheduled and scheduled["status"] == "False" and (old_scheduled or {}).get("status") != "False":
        events.append(Event("Warning", "Unschedulable", scheduled["message"]))
    if state != before:
        if state == "Running":
            events.append(Event("Normal", "Started", f"trainer of run {obs.run_name} is running"))
        elif state == "Succeeded":
            events.append(Event("Normal", "Succeeded", f"run {obs.run_name} finished"))
        elif state == "Failed":
            failed = _cond(conds, "Failed") or {}
            events.append(Event("Warning", str(failed.get("reason")), str(failed.get("message"))))
        elif state == "Suspended":
            events.append(Event("Normal", "Suspended", f"run {obs.run_name} is suspended"))
    return status, events
