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
    secret_missing_message,
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


COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_URL = f"https://huggingface.co/org/out/commit/{'f' * 40}"


def test_lineage_from_the_progress_line_is_checked_like_any_untrusted_input() -> None:
    def fields(**report: Any) -> dict[str, Any]:
        out = progress_fields(progress_line({"state": "Succeeded", **report}))
        return {k: v for k, v in out.items() if k in ("baseModelCommit", "hubCommitUrl")}

    assert fields(base_model_commit=COMMIT, hub_commit_url=HUB_URL) == {
        "baseModelCommit": COMMIT,
        "hubCommitUrl": HUB_URL,
    }
    assert fields(hub_commit_url="http://127.0.0.1:8080/me/x/commit/1") == {
        "hubCommitUrl": "http://127.0.0.1:8080/me/x/commit/1"
    }
    # Not a commit: another shape, another type, or one written in capitals.
    for commit in ("main", COMMIT[:39], COMMIT + "0", COMMIT.upper(), 12345, None, ["x"]):
        assert fields(base_model_commit=commit) == {}, commit
    # Not a plain http(s) URL: credentials, a query or fragment (where a token would ride), another scheme,
    # no host, a bad port, spaces or control characters, non-ASCII, too long, a token in the path.
    token = "hf_" + "LeakedToken0123456789abcdef"
    for url in (
        "https://user:secret@huggingface.co/org/out/commit/1",
        "https://user@huggingface.co/org/out",
        "https://huggingface.co/org/out/commit/1?token=abc",
        "https://huggingface.co/org/out/commit/1#frag",
        "ftp://huggingface.co/org/out",
        "javascript:alert(1)",
        "https:///org/out",
        "https://huggingface.co:99999/org/out",
        "https://huggingface.co/org/out commit",
        "https://huggingface.co/org/out\n/commit",
        "https://huggingface.co/örg/out",
        "https://huggingface.co/" + "a" * 500,
        f"https://huggingface.co/org/{token}/commit/1",
        42,
    ):
        assert fields(hub_commit_url=url) == {}, url


def test_the_commit_and_the_hub_url_stay_in_the_status_once_known_within_the_run() -> None:
    """Rank 0's log is read only while its pod runs: the commit comes with every line from the first
    one on, the Hub URL with the last, which the trainer also leaves as its termination message. Both stay
    after the pods (and their logs) are gone; a new run starts without them."""
    from test_operator_plan import Pass, claim, ftj, pod, terminated, trainer_job

    obj = ftj()
    passes = Pass(obj)
    jobs = [trainer_job(obj, startTime="2026-11-28T09:00:00Z")]
    training = progress_line({"state": "Training", "step": 3, "total_steps": 10, "base_model_commit": COMMIT})
    s = passes(jobs=jobs, pods=[pod("Running")], claim=claim(obj), log_tail=training).status
    assert s["baseModelCommit"] == COMMIT and "hubCommitUrl" not in s
    s = passes(jobs=jobs, pods=[pod("Running")], claim=claim(obj), log_tail=None).status
    assert s["baseModelCommit"] == COMMIT

    # The pod succeeded; its last line (with the URL) is its termination message. No log to read now.
    final = progress_line(
        {
            "state": "Succeeded",
            "step": 10,
            "total_steps": 10,
            "base_model_commit": COMMIT,
            "hub_commit_url": HUB_URL,
        }
    )
    done = pod("Succeeded", container=terminated(0, "Completed", final))
    s = passes(jobs=[trainer_job(obj, succeeded=1)], pods=[done], claim=claim(obj)).status
    assert (s["phase"], s["step"], s["baseModelCommit"], s["hubCommitUrl"]) == (
        "Succeeded",
        10,
        COMMIT,
        HUB_URL,
    )

    complete = [{"type": "Complete", "status": "True"}]
    s = passes(jobs=[trainer_job(obj, complete, succeeded=1)], pods=[], claim=claim(obj)).status
    assert (s["state"], s["baseModelCommit"], s["hubCommitUrl"]) == ("Succeeded", COMMIT, HUB_URL)
    s = passes(jobs=[], pods=[], claim=claim(obj)).status  # the Job's TTL took it and its pods
    assert (s["state"], s["baseModelCommit"], s["hubCommitUrl"]) == ("Succeeded", COMMIT, HUB_URL)

    # A pod that succeeded without such a message (an older trainer) takes nothing away.
    other = Pass(ftj(status={**s, "state": "Running", "reason": "TrainerRunning"}))
    quiet = pod("Succeeded", container=terminated(0, "Completed", "not a progress line"))
    s = other(jobs=[trainer_job(obj, succeeded=1)], pods=[quiet], claim=claim(obj)).status
    assert (s["baseModelCommit"], s["hubCommitUrl"]) == (COMMIT, HUB_URL)

    # An edited spec is a new run: what the old run's trainer said is not this run's.
    edited = ftj(status=s, training={"maxSteps": 5})
    s = Pass(edited)(jobs=jobs, pods=[], claim=claim(edited), secret="present").status
    assert "baseModelCommit" not in s and "hubCommitUrl" not in s


TRACKED = FineTuneJob.model_validate(
    {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {
            "model": {"id": "a/b"},
            "dataset": {"id": "c/d"},
            "training": {
                "reportTo": ["mlflow", "wandb"],
                "trackers": {
                    "mlflow": {
                        "password": {"secretKeyRef": {"name": "mlflow", "key": "password"}},
                        "token": {"secretKeyRef": {"name": "mlflow", "key": "token"}},
                    },
                    "wandb": {"apiKey": {"secretKeyRef": {"name": "wandb", "key": "apiKey"}}},
                },
            },
            "output": {"hub": {"repoId": "o/r", "token": {"secretKeyRef": {"name": "hf"}}}},
        },
    }
)


def test_a_missing_tracker_secret_is_named_as_the_trainer_said_it_without_the_hub_hint() -> None:
    said = (
        "training.trackers.wandb.apiKey: the WANDB_API_KEY environment variable is not set (or empty), so "
        "the run cannot log to wandb. The trainer Pod reads it from the Secret named in "
        "spec.training.trackers.wandb.apiKey.secretKeyRef: Secret 'wandb', key 'apiKey'"
    )
    state = {
        "terminated": {"exitCode": Exit.SECRET_MISSING, "message": termination_message("SecretMissing", said)}
    }
    failure = pod_failure(pod("Failed", state), TRACKED)
    assert failure.reason == "SecretMissing" and failure.message == said
    # A message that names no Secret of the run gets the first one's hint (the Hub token's here).
    bare = {"terminated": {"exitCode": Exit.SECRET_MISSING}}
    assert pod_failure(pod("Failed", bare), TRACKED).message.endswith(
        'create the Secret "hf" with key "token" holding the Hugging Face token with write access'
    )


def test_the_operators_secret_missing_message_lists_each_secret_once_with_its_keys() -> None:
    assert secret_missing_message(
        TRACKED,
        "ns",
        (
            "spec.training.trackers.mlflow.password",
            "spec.training.trackers.mlflow.token",
            "spec.training.trackers.wandb.apiKey",
        ),
    ) == (
        'the Secret "mlflow" with keys "password", "token" '
        "(spec.training.trackers.mlflow.password.secretKeyRef, "
        "spec.training.trackers.mlflow.token.secretKeyRef) does not exist in namespace ns: create it with "
        "`kubectl create secret generic mlflow -n ns --from-literal=password=<MLflow password> "
        '--from-literal=token=<MLflow token>`; the Secret "wandb" with key "apiKey" '
        "(spec.training.trackers.wandb.apiKey.secretKeyRef) does not exist in namespace ns: create it with "
        "`kubectl create secret generic wandb -n ns --from-literal=apiKey=<W&B API key>`"
    )
    # Not told which: the first Secret the run reads, as before there were trackers.
    assert secret_missing_message(TRACKED, "ns").startswith(
        'the Secret "hf" with key "token" (spec.output.hub.token.secretKeyRef) does not exist'
    )
