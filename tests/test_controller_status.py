"""Status mapping (pure): what `kubectl get ftj` shows for what the cluster reports."""

from __future__ import annotations

import json
from typing import Any

from kubetune.controller.status import PROGRESS_ANNOTATION, Observed, compute_status
from kubetune.durations import format_duration

NOW = "2026-11-28T10:00:00Z"


def job(
    conditions: list[dict[str, Any]] | None = None, suspend: bool = False, **status: Any
) -> dict[str, Any]:
    return {"spec": {"suspend": suspend}, "status": {"conditions": conditions or [], **status}}


def pod(phase: str, **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"metadata": {"annotations": {}}, "status": {"phase": phase, **extra}}
    return p


def observe(j: dict[str, Any] | None, pods: list[dict[str, Any]] | None = None, **kw: Any) -> Observed:
    return Observed(generation=3, spec_hash="abc", run_name="demo-abc", job=j, pods=pods or [], **kw)


def cond(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_pending_then_running_with_progress_columns() -> None:
    status, events = compute_status(observe(job(), [pod("Pending")]), {}, NOW)
    assert (
        status["state"] == "Pending" and status["observedGeneration"] == 3 and status["jobName"] == "demo-abc"
    )
    assert events == []

    running = pod("Running")
    running["metadata"]["annotations"][PROGRESS_ANNOTATION] = json.dumps(
        {"step": 37, "total_steps": 100, "loss": 1.23456, "eta_seconds": 4330, "updated_at": "t"}
    )
    status2, events2 = compute_status(observe(job(startTime=NOW), [running]), status, NOW)
    assert (status2["state"], status2["progress"], status2["loss"], status2["eta"]) == (
        "Running",
        "37%",
        "1.2346",
        "1h12m",
    )
    assert [e.reason for e in events2] == ["Started"]


def test_succeeded() -> None:
    done = job([{"type": "Complete", "status": "True"}], completionTime="2026-11-28T11:00:00Z")
    status, events = compute_status(
        observe(done, [pod("Succeeded")]), {"state": "Running", "specHash": "abc"}, NOW
    )
    assert status["state"] == "Succeeded" and status["progress"] == "100%"
    assert status["completionTime"] == "2026-11-28T11:00:00Z"
    assert [e.reason for e in events] == ["Succeeded"]


def test_failure_reason_names_the_container_exit() -> None:
    failed_pod = pod(
        "Failed",
        containerStatuses=[
            {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
        ],
    )
    failed = job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], failed=2)
    status, events = compute_status(
        observe(failed, [failed_pod]), {"state": "Running", "specHash": "abc"}, NOW
    )
    assert status["state"] == "Failed"
    c = cond(status, "Failed")
    assert c["reason"] == "BackoffLimitExceeded" and "exited with code 137 (OOMKilled)" in c["message"]
    assert status["restarts"] == 1
    assert events[0].type == "Warning" and events[0].reason == "BackoffLimitExceeded"


def test_unschedulable_is_a_condition_and_one_warning() -> None:
    stuck = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    status, events = compute_status(observe(job(), [stuck]), {}, NOW)
    assert status["state"] == "Pending"
    assert cond(status, "Scheduled")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond(status, "Scheduled")["message"]
    assert [e.reason for e in events] == ["Unschedulable"]
    # Level-triggered: the same observation again gives the same status and no new event.
    again, events2 = compute_status(observe(job(), [stuck]), status, "2026-11-28T10:05:00Z")
    assert again == status and events2 == []


def test_suspended_and_invalid() -> None:
    status, _ = compute_status(observe(job(suspend=True)), {}, NOW)
    assert status["state"] == "Suspended"
    bad, events = compute_status(observe(None, invalid="spec.method: qlora needs 4-bit"), {}, NOW)
    assert bad["state"] == "Failed" and cond(bad, "Failed")["reason"] == "InvalidSpec"
    assert events[0].message == "spec.method: qlora needs 4-bit"


def test_transition_times_move_only_on_flips() -> None:
    first, _ = compute_status(observe(job(), [pod("Running")]), {}, NOW)
    later, _ = compute_status(observe(job(), [pod("Running")]), first, "2026-11-28T12:00:00Z")
    assert cond(later, "Running")["lastTransitionTime"] == NOW


def test_a_new_run_forgets_the_old_runs_progress() -> None:
    old = {"state": "Succeeded", "specHash": "old", "progress": "100%", "loss": "0.5"}
    status, _ = compute_status(observe(job(), [pod("Pending")]), old, NOW)
    assert "progress" not in status and "loss" not in status and status["state"] == "Pending"


def test_durations() -> None:
    assert [format_duration(s) for s in (5, 65, 3600, 4330, None)] == ["5s", "1m05s", "1h00m", "1h12m", "?"]
