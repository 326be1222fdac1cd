"""A run's whole life on a real node: the trainer image built from our Dockerfile trains in a real pod.

These tests use the `real_node` fixture (tests/e2e/node.py): a kubelet with containerd and runc on this
machine, the images built from the Dockerfile and loaded into containerd, and a local StorageClass whose
volumes live in host folders, so a test can read what the trainer wrote. The operator runs in-process
against the same API server. Each test follows the path a user takes: FineTuneJob → operator →
Job → pod → trainer → status (`kubectl get ftj`) → files on the workspace volume.

Measured numbers (steps lost on preemption, time from the trainer's log line to the status column) are
written to out/e2e-lifecycle.json for the benchmark notes.
"""

from __future__ import annotations

import calendar
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from controlplane import poll
from kueue_standin import FIELD_MANAGER, KueueStandIn, suspend_owner

from kubetune.contract import LABEL_JOB, LABEL_QUEUE, LABEL_RUN, parse_progress
from kubetune_operator.kube import Kube, load_client
from kubetune_operator.operator import Operator

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "out" / "e2e-lifecycle.json"
TINY = "/opt/kubetune/jobs/tiny"  # jobs/tiny, shipped in the trainer image
FAKE_TOKEN = "hf_" + "LifecycleNeverLeaks0123456789abc"


def record(key: str, value: Any) -> None:
    """Keep a measured number for the notes (out/ is not committed)."""
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    data[key] = value
    REPORT.write_text(json.dumps(data, indent=2) + "\n")


def tiny_spec(node: Any, *, steps: int = 30, save_steps: int = 10, lr: float = 0.003, **over: Any) -> dict:
    """The shipped cluster smoke test (jobs/tiny-cluster.yaml: the tiny QLoRA example, from the files the
    trainer image carries) on the real node, with the step counts and logging a test needs."""
    spec: dict[str, Any] = yaml.safe_load((ROOT / "jobs" / "tiny-cluster.yaml").read_text())["spec"]
    spec.pop("samples")
    assert spec["model"]["path"].startswith(TINY) and spec["dataset"]["files"][0].startswith(TINY)
    spec |= {
        "training": {
            "maxSteps": steps,
            "learningRate": lr,
            "perDeviceBatchSize": 8,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": 128,
            "maxGradNorm": 1.0,
            "loggingSteps": 2,
            "saveSteps": save_steps,
            "evalSteps": save_steps,
        },
        "resources": {
            "gpusPerNode": 0,
            "memory": "3Gi",
            "tolerations": node.tolerations,
            "nodeSelector": node.node_selector,
        },
        "storage": {"size": "1Gi"},
        "output": {"path": "output"},
        "image": node.trainer_image,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


class Run:
    """Drives one namespace of the real node's cluster through kubectl."""

    def __init__(self, cp: Any, node: Any, namespace: str) -> None:
        self.cp, self.node, self.ns = cp, node, namespace

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = self.cp.kubectl(*args, "-n", self.ns, input=input)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return str(proc.stdout)

    def apply(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"}
        body |= {"metadata": {"name": name, "namespace": self.ns}, "spec": spec}
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(body))

    def ftj(self, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "ftj", name, "-o", "json"))  # type: ignore[no-any-return]

    def status(self, name: str) -> dict[str, Any]:
        return self.ftj(name).get("status") or {}

    def wait_state(self, name: str, *states: str, timeout: float = 300) -> dict[str, Any]:
        def check() -> dict[str, Any]:
            s = self.status(name)
            assert s.get("state") in states, f"state {s.get('state')} reason {s.get('reason')}"
            return s

        return poll(check, timeout=timeout, what=f"{name} to be {'/'.join(states)}", interval=0.5)  # type: ignore[no-any-return]

    def items(self, kind: str, selector: str) -> list[dict[str, Any]]:
        return list(json.loads(self.kubectl("get", kind, "-l", selector, "-o", "json"))["items"])

    def pods(self, name: str) -> list[dict[str, Any]]:
        return self.items("pods", f"{LABEL_JOB}={name}")

    def running_pod(self, name: str) -> dict[str, Any]:
        def check() -> dict[str, Any]:
            running = [p for p in self.pods(name) if p["status"].get("phase") == "Running"]
            assert running, [p["status"].get("phase") for p in self.pods(name)]
            return running[0]

        return poll(check, timeout=180, what=f"a running trainer pod of {name}", interval=0.5)  # type: ignore[no-any-return]

    def events(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json")
        return list(json.loads(out)["items"])

    def warning(self, name: str, reason: str) -> dict[str, Any]:
        def check() -> dict[str, Any]:
            evs = [e for e in self.events(name) if e.get("reason") == reason and e.get("type") == "Warning"]
            assert evs, sorted({e.get("reason") for e in self.events(name)})
            return evs[0]

        return poll(check, timeout=60, what=f"a {reason} Warning event on {name}")  # type: ignore[no-any-return]

    def run_dir(self, name: str) -> Path:
        """The run's folder on the workspace volume, as the host sees it."""
        status = self.status(name)
        claim, out = status["workspaceClaim"], status["outputPath"]
        rel = Path(out).relative_to("/workspace")
        return Path(self.node.volume_dir(self.ns, claim)) / rel

    def children(self, name: str) -> dict[str, list[str]]:
        out = {}
        for kind in ("jobs", "configmaps", "services", "persistentvolumeclaims"):
            out[kind] = [o["metadata"]["name"] for o in self.items(kind, f"{LABEL_JOB}={name}")]
        return out


@pytest.fixture
def run(control_plane: Any, real_node: Any, namespace: str, crd: None) -> Run:
    return Run(control_plane, real_node, namespace)


@pytest.fixture
def operator(run: Run) -> Iterator[Operator]:
    op = Operator(
        Kube(load_client(run.cp.kubeconfig)),
        namespace=run.ns,
        workers=2,
        image=run.node.trainer_image,
        image_pull_grace=5.0,
    ).start()
    assert op.wait_synced(30)
    yield op
    op.stop()


def quiet_for(op: Operator, seconds: float = 12.0) -> int:
    """Reconciles the operator made in `seconds` of quiet: a hot loop shows as dozens."""
    before = op.reconciles
    time.sleep(seconds)
    return op.reconciles - before


# ---------------------------------------------------------------------------------------------------
# A run all the way, and what `kubectl get ftj` shows meanwhile
# ---------------------------------------------------------------------------------------------------


def test_tiny_qlora_run_goes_all_the_way(run: Run, operator: Operator) -> None:
    run.apply("tiny", tiny_spec(run.node, steps=300))
    pod = run.running_pod("tiny")
    assert pod["spec"]["automountServiceAccountToken"] is False  # the trainer has no API access

    # Progress, loss and ETA move in the columns while it trains; the time from the trainer's log line to
    # the column is measured against the report's own timestamp.
    seen: list[tuple[int, str, str]] = []
    lags: list[float] = []

    def columns() -> bool:
        s = run.status("tiny")
        if s.get("state") == "Succeeded":
            return True
        moving = s.get("phase") == "Training" and s.get("progress") and s.get("loss") and s.get("eta")
        if moving and (not seen or seen[-1][0] != s.get("step")):
            seen.append((int(s["step"]), s["progress"], s["loss"]))
            log = run.node.logs(run.ns, pod["metadata"]["name"])
            report = parse_progress(log)
            if report and report.get("step") == s["step"] and report.get("updated_at"):
                stamp = time.strptime(report["updated_at"], "%Y-%m-%dT%H:%M:%SZ")
                lags.append(time.time() - calendar.timegm(stamp))
        return len(seen) >= 3

    poll(columns, timeout=240, what="three different progress readings", interval=0.5)
    assert len({p for _, p, _ in seen}) >= 2, seen
    table = run.kubectl("get", "ftj", "tiny")
    assert "PHASE" in table and "PROGRESS" in table and "LOSS" in table and "ETA" in table, table

    status = run.wait_state("tiny", "Succeeded", timeout=300)
    assert status["progress"] == "100%" and status["reason"] == "TrainingComplete", status
    out = run.run_dir("tiny")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "learningRate: 0.003" in card or "learning_rate: 0.003" in card, card[:2000]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 300 and metrics["train_loss_last"] < metrics["train_loss_first"], metrics
    # The card's lineage came through the whole path: the FineTuneJob's UID and spec hash (render's spec
    # file, the ConfigMap, the trainer), the base model's digests pinned by the prepare init container
    # for the run, and the loss curve drawn in the pod (headless, a read-only HOME) beside each card.
    uid = run.ftj("tiny")["metadata"]["uid"]
    assert metrics["lineage"]["run"]["uid"] == uid and f"UID `{uid}`" in card, metrics["lineage"]["run"]
    assert metrics["lineage"]["run"]["spec_hash"] == status["specHash"]
    pinned = json.loads((out / "base-model.json").read_text())
    assert pinned["files_sha256"] == metrics["lineage"]["base_model"]["files_sha256"] != {}
    for folder in (out, out / "adapter"):
        assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", folder
        assert "![Train and eval loss against step](loss.png)" in (folder / "README.md").read_text()
    assert not (out / "adapter" / "training_args.bin").exists()  # no pickle beside the weights
    # The pod's prepare init container tokenized the data into the workspace; the trainer only loaded it.
    [done] = [p for p in run.pods("tiny") if p["status"].get("phase") == "Succeeded"]
    [init] = done["status"]["initContainerStatuses"]
    assert init["name"] == "prepare" and init["state"]["terminated"]["exitCode"] == 0, init
    prepare_log = run.node.logs(run.ns, done["metadata"]["name"], container="prepare")
    trainer_log = run.node.logs(run.ns, done["metadata"]["name"], container="trainer")
    assert "data: prepared " in prepare_log, prepare_log[-2000:]
    key = prepare_log.split("data: prepared ")[1].split()[0]
    assert f"data: cache hit {key} " in trainer_log and "data: prepared" not in trainer_log, trainer_log
    assert metrics["prepared"] == {**metrics["prepared"], "key": key, "cache_hit": True}
    if lags:
        record(
            "log_to_column_seconds",
            {"max": round(max(lags), 1), "median": round(sorted(lags)[len(lags) // 2], 1)},
        )
    assert not [o for o in run.children("tiny")["configmaps"] if o != status["jobName"]]


# ---------------------------------------------------------------------------------------------------
# Preemption, spec edits and reruns
# ---------------------------------------------------------------------------------------------------


def test_evicted_pod_is_replaced_and_resumes(run: Run, operator: Operator) -> None:
    run.apply("preempt", tiny_spec(run.node, steps=160, save_steps=10))
    pod = run.running_pod("preempt")
    status = poll(
        lambda: (s := run.status("preempt")).get("step", 0) >= 20 and s,
        timeout=240,
        what="training past step 20",
        interval=0.5,
    )
    first = pod["metadata"]["name"]
    # The evicted pod is deleted once it has stopped: follow its log to the end to keep it.
    follow = subprocess.Popen(
        [str(run.cp.bin / "kubectl"), f"--kubeconfig={run.cp.kubeconfig}", "logs", "-f", first, "-n", run.ns],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(1.0)
    run.node.evict(run.ns, first)
    reported_before = status["step"]

    replacement = poll(
        lambda: next(
            (
                p
                for p in run.pods("preempt")
                if p["metadata"]["name"] != first and p["status"].get("phase") == "Running"
            ),
            None,
        ),
        timeout=240,
        what="the replacement pod",
    )
    old_log, _ = follow.communicate(timeout=120)
    assert "SIGTERM" in old_log, old_log[-2000:]
    s = run.wait_state("preempt", "Succeeded", timeout=400)
    assert s["restarts"] >= 1, s
    assert any(e.get("reason") == "Preempted" for e in run.events("preempt"))

    new_log = run.node.logs(run.ns, replacement["metadata"]["name"])
    metrics = json.loads((run.run_dir("preempt") / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert resumed is not None and resumed >= reported_before - 10, (resumed, reported_before)
    assert f"resuming from step {resumed}" in new_log
    # The step the first pod had reached when it stopped (its last progress line).
    last_old = parse_progress(old_log)
    assert last_old is not None
    lost = int(last_old.get("step") or 0) - resumed
    record("preemption", {"reached": last_old.get("step"), "resumed_from": resumed, "steps_lost": lost})
    assert lost <= 10, f"lost {lost} steps (saveSteps is 10)"


def test_spec_edit_trains_afresh_in_its_own_folder(run: Run, operator: Operator) -> None:
    run.apply("edit", tiny_spec(run.node, steps=12, lr=0.003))
    first = run.wait_state("edit", "Succeeded")
    run.apply("edit", tiny_spec(run.node, steps=12, lr=0.001))
    second = poll(
        lambda: (
            (s := run.status("edit")).get("jobName") != first["jobName"]
            and s.get("state") == "Succeeded"
            and s
        ),
        timeout=300,
        what="the edited spec's run to succeed",
    )
    old_dir, new_dir = run.run_dir("edit").parent / first["jobName"], run.run_dir("edit")
    assert old_dir != new_dir and old_dir.is_dir() and new_dir.is_dir()
    new_metrics = json.loads((new_dir / "metrics.json").read_text())
    assert new_metrics["resumed_from_step"] is None and new_metrics["steps"] == 12, new_metrics
    assert "0.001" in (new_dir / "README.md").read_text()
    assert "0.003" in (old_dir / "README.md").read_text()
    assert second["specHash"] != first["specHash"]


def test_finished_run_is_not_trained_again(run: Run, operator: Operator) -> None:
    """The pod dies after training (in the slow samples step): the retry must only save and card."""
    # Many samples: the tiny model's post-training step must last long enough to be interrupted.
    samples = {"prompts": [f"Tell me about thing number {i}." for i in range(32)], "maxNewTokens": 600}
    run.apply("rerun", tiny_spec(run.node, steps=10, samples=samples, runPolicy={"backoffLimit": 2}))
    pod = run.running_pod("rerun")
    # Training is over once the completion marker is on the volume; the slow samples step follows.
    poll(lambda: run.status("rerun").get("outputPath"), timeout=120, what="the run folder")
    marker = run.run_dir("rerun") / "training-complete.json"
    poll(marker.is_file, timeout=240, what="the completion marker", interval=0.1)
    assert run.pods("rerun")[0]["status"].get("phase") == "Running", "the samples step ended too soon"
    run.kubectl("delete", "pod", pod["metadata"]["name"], "--grace-period=0", "--force")
    status = run.wait_state("rerun", "Succeeded", timeout=300)
    # The deleted pod is gone; the Job's replacement ran the same run again.
    second = next(p for p in run.pods("rerun") if p["metadata"]["name"] != pod["metadata"]["name"])
    log = run.node.logs(run.ns, second["metadata"]["name"])
    assert "training already complete" in log, log[-3000:]
    states = [line.split(" ", 1)[1] for line in log.splitlines() if line.startswith("kubetune.io/progress ")]
    assert not [s for s in states if '"state":"Training"' in s], "the retry trained again"
    metrics = json.loads((run.run_dir("rerun") / "metrics.json").read_text())
    assert metrics["steps"] == 10, metrics
    assert status["progress"] == "100%"


# ---------------------------------------------------------------------------------------------------
# Failure reasons a person can act on
# ---------------------------------------------------------------------------------------------------


def failed_with(run: Run, op: Operator, name: str, reason: str, *, state: str = "Failed") -> dict[str, Any]:
    status = poll(
        lambda: (s := run.status(name)).get("reason") == reason and s.get("state") == state and s,
        timeout=300,
        what=f"{name}: {state}/{reason}",
        interval=0.5,
    )
    cond = next(c for c in status["conditions"] if c.get("reason") == reason)
    assert cond["message"], cond
    event = run.warning(name, reason)
    assert FAKE_TOKEN not in json.dumps(status) + json.dumps(event)
    # Settled once its pods are gone: their deletion's updates (an init container's status among them)
    # are watch events, each one pass; a hot loop would show as dozens of passes after that.
    poll(
        lambda: not [p for p in run.pods(name) if p["status"].get("phase") in ("Pending", "Running")],
        timeout=120,
        what=f"{name}: no pod left pending or running",
    )
    assert quiet_for(op) <= 3, "the operator keeps reconciling a settled failure"
    return status


def test_missing_secret_is_reported_before_anything_is_created(run: Run, operator: Operator) -> None:
    hub = {"hub": {"repoId": "org/tiny", "token": {"secretKeyRef": {"name": "hf-nosuch"}}}}
    run.apply("nosecret", tiny_spec(run.node, output={"path": "output", **hub}))
    status = failed_with(run, operator, "nosecret", "SecretMissing", state="Pending")
    assert "hf-nosuch" in next(
        c["message"] for c in status["conditions"] if c.get("reason") == "SecretMissing"
    )
    assert run.children("nosecret") == {
        "jobs": [],
        "configmaps": [],
        "services": [],
        "persistentvolumeclaims": [],
    }


def test_secret_without_the_key_fails_on_the_pod(run: Run, operator: Operator) -> None:
    run.kubectl("create", "secret", "generic", "hf-wrongkey", f"--from-literal=other={FAKE_TOKEN}")
    hub = {"hub": {"repoId": "org/tiny", "token": {"secretKeyRef": {"name": "hf-wrongkey"}}}}
    run.apply("wrongkey", tiny_spec(run.node, output={"path": "output", **hub}))
    status = failed_with(run, operator, "wrongkey", "SecretMissing")
    assert status["restarts"] == 0  # a user error fails at once, without retries


def test_image_that_does_not_exist(run: Run, operator: Operator) -> None:
    run.apply("noimage", tiny_spec(run.node, image="localhost/kubetune-nosuch-image:0"))
    failed_with(run, operator, "noimage", "ImagePullFailed")
    assert run.children("noimage")["jobs"] == []  # stopped: it holds no node resources


def test_bad_dataset_column(run: Run, operator: Operator) -> None:
    run.apply("badcol", tiny_spec(run.node, dataset={"format": "text", "textField": "no_such_column"}))
    status = failed_with(run, operator, "badcol", "DatasetError")
    message = next(c["message"] for c in status["conditions"] if c.get("reason") == "DatasetError")
    assert "no_such_column" in message and "instruction" in message, message
    assert status["restarts"] == 0


def test_memory_over_the_limit_is_oomkilled(run: Run, operator: Operator) -> None:
    run.apply("oom", tiny_spec(run.node, resources={"memory": "160Mi"}, runPolicy={"backoffLimit": 0}))
    status = failed_with(run, operator, "oom", "OOMKilled")
    message = next(c["message"] for c in status["conditions"] if c.get("reason") == "OOMKilled")
    assert "resources.memory" in message, message


def test_cuda_out_of_memory(run: Run, operator: Operator) -> None:
    run.apply("cudaoom", tiny_spec(run.node, image=run.node.faults_image))
    status = failed_with(run, operator, "cudaoom", "CUDAOutOfMemory")
    message = next(c["message"] for c in status["conditions"] if c.get("reason") == "CUDAOutOfMemory")
    assert "perDeviceBatchSize" in message, message
    assert status["restarts"] == 0  # retrying cannot help: the Job fails at once


# ---------------------------------------------------------------------------------------------------
# Kueue's contract
# ---------------------------------------------------------------------------------------------------


def test_kueue_suspends_and_admits_and_the_operator_never_flips_suspend(run: Run, operator: Operator) -> None:
    kueue = KueueStandIn(run.cp.bin / "kubectl", run.cp.kubeconfig, run.ns, admit_after=4.0).start()
    try:
        run.apply("queued", tiny_spec(run.node, steps=12, runPolicy={"queueName": "team-a"}))
        queued = run.wait_state("queued", "Queued", "Running", "Succeeded", timeout=60)
        assert queued["state"] == "Queued", queued
        done = run.wait_state("queued", "Succeeded", timeout=300)
        job = json.loads(run.kubectl("get", "job", done["jobName"], "-o", "json", "--show-managed-fields"))
        assert job["metadata"]["labels"][LABEL_QUEUE] == "team-a"
        assert kueue.created_suspended == {done["jobName"]: True}
        # One change of spec.suspend (Kueue's admission), owned by Kueue, never one back by the operator.
        assert [(s, owner) for _, s, owner in kueue.suspend_changes] == [(False, FIELD_MANAGER)], (
            kueue.suspend_changes
        )
        assert suspend_owner(job) == FIELD_MANAGER
        assert job["metadata"]["labels"][LABEL_RUN] == done["jobName"]
    finally:
        kueue.stop()
