"""Status mapping (pure): pods, log tails and conditions, in the words of a FineTuneJob's status."""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import Exit, progress_line, termination_message
from kubetune.durations import format_duration
from kubetune_operator.status import (
    Conditions,
    image_pull_problem,
    pod_failure,
    progress_fields,
    rank0_log_pod,
    unschedulable,
)

NOW = "2026-11-28T10:00:00Z"
JOB = FineTuneJob.model_validate(
    {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"id": "a/b"},
            "dataset": {"id": "c/d"},
            "resources": {"memory": "48Gi"},
            "output": {"hub": {"repoId": "o/r", "token": {"secretKeyRef": {"name": "hf"}}}},
        },
    }
)


def pod(phase: str, state: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "image": "img:1", "state": state}]
    return {"metadata": {"name": "p", "creationTimestamp": NOW, **meta}, "status": status}


def test_progress_from_the_newest_well_formed_line() -> None:
    tail = "\n".join(
        [
            progress_line({"state": "Loading"}),
            progress_line(
                {"state": "Training", "step": 37, "total_steps": 100, "loss": 1.23456, "eta_seconds": 4330}
            ),
            "kubetune.io/progress {not json",
            "some other line",
        ]
    )
    assert progress_fields(tail) == {
        "phase": "Training",
        "step": 37,
        "totalSteps": 100,
        "progress": "37%",
        "loss": "1.2346",
        "eta": "1h12m",
    }
    assert progress_fields("no report here") == {} and progress_fields(None) == {}
    # Untrusted input: wrong types are dropped, the percentage never passes 100.
    odd = progress_line({"state": "Training", "step": 120, "total_steps": 100, "loss": "x"})
    assert progress_fields(odd) == {"phase": "Training", "step": 120, "totalSteps": 100, "progress": "100%"}


def test_pod_failure_reasons() -> None:
    def reason(state: dict[str, Any]) -> str:
        return pod_failure(pod("Failed", state), JOB).reason

    assert reason({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}) == "OOMKilled"
    assert reason({"terminated": {"exitCode": Exit.DATASET_ERROR}}) == "DatasetError"
    assert reason({"terminated": {"exitCode": Exit.SECRET_MISSING}}) == "SecretMissing"
    assert reason({"terminated": {"exitCode": Exit.CUDA_OUT_OF_MEMORY}}) == "CUDAOutOfMemory"
    assert reason({"terminated": {"exitCode": Exit.INVALID_SPEC}}) == "InvalidSpec"
    assert reason({"terminated": {"exitCode": Exit.ERROR}}) == "TrainerError"
    assert reason({"terminated": {"exitCode": 1, "message": termination_message("DatasetError", "x")}}) == (
        "DatasetError"
    )
    oom = pod_failure(pod("Failed", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}), JOB)
    assert "resources.memory: 48Gi" in oom.message
    evicted = {
        "metadata": {"name": "p"},
        "status": {"phase": "Failed", "reason": "Evicted", "message": "low"},
    }
    assert pod_failure(evicted, JOB).message == "trainer pod p failed (Evicted: low)"


def test_a_messageless_failure_keeps_the_end_of_its_log() -> None:
    # FallbackToLogsOnError: no termination message file, so the kubelet put the log's end there.
    failure = pod_failure(
        pod("Failed", {"terminated": {"exitCode": 1, "message": "Traceback\nValueError: bad"}}), JOB
    )
    assert failure.reason == "TrainerError" and "ValueError: bad" in failure.message


def test_unschedulable_and_image_pull() -> None:
    stuck = pod("Pending")
    stuck["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
    ]
    assert unschedulable([stuck]) == "0/3 nodes" and unschedulable([pod("Running")]) is None
    pulling = pod("Pending", {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}})
    problem = image_pull_problem([pulling])
    assert problem is not None and not problem.fatal and "img:1" in problem.message
    assert "manifest unknown" in problem.message
    fatal = image_pull_problem([pod("Pending", {"waiting": {"reason": "InvalidImageName"}})])
    assert fatal is not None and fatal.fatal
    assert image_pull_problem([pod("Pending", {"waiting": {"reason": "ContainerCreating"}})]) is None


def test_the_log_is_read_from_rank_0_only_while_its_trainer_runs() -> None:
    running = {"running": {"startedAt": NOW}}
    rank1 = pod("Running", running, annotations={"batch.kubernetes.io/job-completion-index": "1"})
    rank0 = pod("Running", running, annotations={"batch.kubernetes.io/job-completion-index": "0"})
    assert rank0_log_pod([rank1, rank0]) is rank0
    assert rank0_log_pod([rank1]) is None
    assert rank0_log_pod([pod("Pending", {"waiting": {"reason": "ContainerCreating"}})]) is None


def test_transition_times_move_only_on_flips() -> None:
    first = Conditions([], NOW, 1)
    first.set("Running", True, "TrainerRunning", "running")
    later = Conditions(first.items, "2026-11-28T12:00:00Z", 2)
    later.set("Running", True, "TrainerRunning", "still running")
    assert later.items[0]["lastTransitionTime"] == NOW and later.items[0]["observedGeneration"] == 2
    flipped = Conditions(later.items, "2026-11-28T13:00:00Z", 2)
    flipped.set("Running", False, "Preempted", "gone")
    assert flipped.items[0]["lastTransitionTime"] == "2026-11-28T13:00:00Z"


def test_durations() -> None:
    assert [format_duration(s) for s in (5, 65, 3600, 4330, None)] == ["5s", "1m05s", "1h00m", "1h12m", "?"]


TOKEN = "hf_" + "StatusNeverLeaks0123456789ab"


def test_no_secret_in_any_message_even_when_the_log_end_cuts_a_token() -> None:
    # The kubelet's copy of the log's end; kept to its last 600 characters, which here start inside
    # the token: cut first and its tail would no longer look like one.
    tail = "x" * 900 + f" Authorization: Bearer {TOKEN} " + "y" * 580
    failure = pod_failure(pod("Failed", {"terminated": {"exitCode": 1, "message": tail}}), JOB)
    assert TOKEN[-12:] not in failure.message and failure.message.endswith("y")
    # The trainer's own message, and a known secret of another shape in a condition.
    said = termination_message("TrainerError", f"the Hub said: token {TOKEN} refused")
    failure = pod_failure(pod("Failed", {"terminated": {"exitCode": 6, "message": said}}), JOB)
    assert failure.reason == "TrainerError" and "token hf_*** refused" in failure.message
    pulling = pod(
        "Pending",
        {"waiting": {"reason": "ErrImagePull", "message": "pull https://bot:s3cr3t-pw@registry.example/x"}},
    )
    problem = image_pull_problem([pulling])
    assert problem is not None and "s3cr3t-pw" not in problem.message and "bot:***@" in problem.message
    conds = Conditions([], NOW, 1)
    conds.set("Failed", True, "TrainerError", f"echo: {TOKEN}")
    assert conds.items[0]["message"] == "echo: hf_***"
