"""The reconciler's wiring (read from the cache, act, record events, write status) against an in-memory
stand-in for kube.py and a real cache (kubetune_operator.cache) filled with plain dicts.

plan() is tested on its own (test_operator_plan.py); this checks what the I/O around it does: that it
reads the cache and asks the API server only for the Secret's metadata and rank 0's log, that a refused
run is undone, that an unreadable log costs one quiet request and then nothing for a while, that events
are named so a retry gets 409, and that the status is written only when it changed. The real API
server is in tests/e2e/.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import pytest
from kubernetes.client.rest import ApiException

from kubetune.contract import LABEL_JOB, LABEL_RUN, PROGRESS_TAIL_BYTES, PROGRESS_TAIL_LINES, progress_line
from kubetune_operator.cache import Cache
from kubetune_operator.kube import METADATA_ONLY, Kube
from kubetune_operator.reconcile import DETAIL_DELAY_SECONDS, LOG_RETRY_MIN_SECONDS, Reconciler

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def api_error(status: int, message: str = "") -> ApiException:
    e = ApiException(status=status, reason="Reason")
    e.body = json.dumps({"kind": "Status", "message": message}) if message else None
    return e


class FakeKube:
    """The calls Reconciler makes, on dicts; `fail` maps (verb, kind) to an exception to raise."""

    def __init__(self, ftj: dict[str, Any], secrets: tuple[str, ...] = ("hf",)) -> None:
        self.ftj = ftj
        self.ftj["metadata"].setdefault("resourceVersion", "1")
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.secrets = set(secrets)
        self.calls: list[tuple[str, ...]] = []
        self.fail: dict[tuple[str, str], Exception] = {}
        self.events: list[tuple[str, str, str]] = []
        self.event_names: set[str] = set()
        self.status_patches: list[dict[str, Any]] = []
        self.log: str | Exception = ""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind, name))
        obj = self.objects.get((kind, name))
        return copy.deepcopy(obj) if obj else None

    def secret_exists(self, namespace: str, name: str) -> bool:
        self.calls.append(("get", "Secret", name))
        if ("get", "Secret") in self.fail:
            raise self.fail[("get", "Secret")]
        return name in self.secrets

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        self.calls.append(("log", pod, container))
        if isinstance(self.log, Exception):
            raise self.log
        return self.log

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        self.calls.append(("create", kind, name))
        if ("create", kind) in self.fail:
            raise self.fail[("create", kind)]
        if (kind, name) in self.objects:
            return None
        made = copy.deepcopy(obj)
        made["metadata"]["uid"] = f"uid-{name}"
        self.objects[(kind, name)] = made
        return made

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.calls.append(("delete", kind, name))
        return self.objects.pop((kind, name), None) is not None

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append(("patch", kind, name))

    def patch_ftj_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", "FineTuneJob/status", name))
        self.status_patches.append(status)
        merged = {**(self.ftj.get("status") or {}), **status}
        self.ftj["status"] = {k: v for k, v in merged.items() if v is not None}
        meta = self.ftj["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        return copy.deepcopy(self.ftj)

    def event(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, now: str, *, name: str | None = None
    ) -> bool:
        self.calls.append(("event", "Event", str(name)))
        if name in self.event_names:
            return False  # 409: recorded already
        self.event_names.add(str(name))
        self.events.append((type_, reason, message))
        return True


def ours(obj: dict[str, Any]) -> bool:
    return (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "kubetune"


def sync(cache: Cache, kube: FakeKube) -> Cache:
    """The cache as the watches would have it by now: what the fake API server holds."""
    cache.informers["FineTuneJob"].replace([copy.deepcopy(kube.ftj)])
    for kind in ("Job", "PersistentVolumeClaim"):  # kubetune's only (the cache's label selector)
        cache.informers[kind].replace(
            [copy.deepcopy(o) for (k, _), o in kube.objects.items() if k == kind and ours(o)]
        )
    cache.informers["Pod"].replace(copy.deepcopy(kube.pods))
    return cache


def ftj(name: str = "demo", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"id": "a/b"},
        "dataset": {"id": "c/d"},
        "output": {"hub": {"repoId": "o/r", "token": {"secretKeyRef": {"name": "hf"}}}},
        **spec,
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns", "uid": "ftj-uid", "generation": 1},
        "spec": body,
    }


def reconciler(kube: FakeKube, **kw: Any) -> Reconciler:
    """A reconciler whose cache has caught up with the fake API server."""
    cache = sync(Cache(kube), kube)  # type: ignore[arg-type]
    return Reconciler(kube, cache, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


RUNNING = {
    "phase": "Running",
    "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": "2026-11-28T09:00:00Z"}}}],
}
SCHEDULED = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}


def trainer_pod(run: str, status: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's pod of `run` on node gpu-0, as the Pod informer keeps it (spec.nodeName only)."""
    return {
        "metadata": {
            "name": f"{run}-0-abcde",
            "namespace": "ns",
            "uid": "pod-uid",
            "creationTimestamp": "2026-11-28T09:00:00Z",
            "labels": {LABEL_RUN: run, LABEL_JOB: "demo"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {"nodeName": "gpu-0"},
        "status": copy.deepcopy(status),
    }


def cond_of(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == kind)


def settle(r: Reconciler, name: str = "demo") -> float | None:
    """A pass, and when it created the run's Job, the pass the work queue runs next (it returned 0:
    that pass writes the status and the events)."""
    again = r.reconcile("ns", name)
    return r.reconcile("ns", name) if again == 0.0 else again


def test_a_pass_that_creates_the_job_leaves_the_status_to_the_next() -> None:
    """So that a burst of new FineTuneJobs gets its Jobs first: the creating pass sends the Secret
    check and the creates (and RunCreated), and asks to be run again at once, behind the others."""
    kube = FakeKube(ftj())
    r = reconciler(kube)
    assert r.reconcile("ns", "demo") == 0.0
    assert [c[:2] for c in kube.calls][-1] == ("event", "Event") and "status" not in kube.ftj
    kube.calls.clear()
    assert r.reconcile("ns", "demo") == 30.0
    assert [c[:2] for c in kube.calls] == [("patch", "FineTuneJob/status")]
    assert kube.ftj["status"]["state"] == "Pending"


def test_a_first_pass_checks_the_secret_then_creates_the_run() -> None:
    kube = FakeKube(ftj())
    again = settle(reconciler(kube))
    created = [c for c in kube.calls if c[0] == "create"]
    assert [c[1] for c in created] == ["PersistentVolumeClaim", "ConfigMap", "Job"]
    assert kube.calls.index(("get", "Secret", "hf")) < kube.calls.index(created[0])
    assert [e[1] for e in kube.events] == ["RunCreated"]
    assert kube.ftj["status"]["state"] == "Pending" and again == 30.0
    # The next pass: the Job exists, so no Secret check, no create, and the same status is not written.
    kube.calls.clear()
    patches = len(kube.status_patches)
    settle(reconciler(kube))
    assert not [c for c in kube.calls if c[0] == "create" or c[1] == "Secret"]
    assert len(kube.status_patches) == patches


def test_a_pass_reads_the_cache_and_asks_the_api_server_for_the_secret_only() -> None:
    kube = FakeKube(ftj())
    settle(reconciler(kube))
    verbs = [c[:2] for c in kube.calls]
    assert verbs == [
        ("get", "Secret"),
        ("create", "PersistentVolumeClaim"),
        ("create", "ConfigMap"),
        ("create", "Job"),
        ("event", "Event"),  # RunCreated
        ("patch", "FineTuneJob/status"),
    ]
    # Caught up, nothing changed: a pass costs no request at all.
    kube.calls.clear()
    settle(reconciler(kube))
    assert kube.calls == []


def test_a_spec_is_validated_once_until_it_or_the_metadata_the_model_reads_changes() -> None:
    """Validation (the ConfigMap size check renders the whole spec) runs once per spec, not per pass:
    a status write does not repeat it; a spec edit, or a change of the metadata the model reads, does."""
    from kubetune.api.v1alpha1 import FineTuneJob

    kube = FakeKube(ftj())
    r = reconciler(kube)
    with mock.patch.object(FineTuneJob, "model_validate", wraps=FineTuneJob.model_validate) as validate:
        settle(r)
        first = kube.ftj["status"]["jobName"]
        sync(r.cache, kube)  # the status the pass wrote, back through the watch
        settle(r)
        assert validate.call_count == 1
        kube.ftj["metadata"]["labels"] = {"team": "a"}
        sync(r.cache, kube)
        settle(r)
        assert validate.call_count == 2
        kube.ftj["spec"]["training"] = {"maxSteps": 7}
        kube.ftj["metadata"]["generation"] = 2
        sync(r.cache, kube)
        settle(r)
        assert validate.call_count == 3
    # ... and the edit was decided from the new spec: a new run.
    jobs = [name for kind, name in kube.objects if kind == "Job"]
    assert jobs == [kube.ftj["status"]["jobName"]] and first not in jobs


def test_a_stale_cache_neither_creates_again_nor_writes_the_status_again() -> None:
    """The watch has delivered nothing yet of this pass's writes: what they returned is in the cache."""
    kube = FakeKube(ftj())
    r = reconciler(kube)
    settle(r)
    assert r.cache.ftj("ns", "demo")["status"]["state"] == "Pending"  # type: ignore[index]
    kube.calls.clear()
    settle(r)  # no sync: the cache knows only what the writes returned
    assert kube.calls == []
    # The watch's own copy of the status write, arriving late, changes nothing and is known as ours.
    assert r.wrote(("ns", "demo"), kube.ftj["status"])
    assert not r.wrote(("ns", "demo"), {**kube.ftj["status"], "state": "Running"})


def test_a_late_watch_event_older_than_a_write_does_not_take_the_cache_back() -> None:
    kube = FakeKube(ftj())
    r = reconciler(kube)
    before = copy.deepcopy(kube.ftj)  # resourceVersion 1, no status
    settle(r)
    r.cache.informers["FineTuneJob"].apply("MODIFIED", before)
    assert r.cache.ftj("ns", "demo")["status"]["state"] == "Pending"  # type: ignore[index]


def test_events_go_before_the_status_and_a_retry_after_a_crash_does_not_double_them() -> None:
    kube = FakeKube(ftj(), secrets=())
    crash = RuntimeError("killed between the events and the status patch")
    with mock.patch.object(kube, "patch_ftj_status", side_effect=crash), pytest.raises(RuntimeError):
        settle(reconciler(kube))
    assert [e[1] for e in kube.events] == ["SecretMissing"] and "status" not in kube.ftj
    # A new operator: the same old status, so the same event names; 409, and no second event.
    settle(reconciler(kube))
    assert [e[1] for e in kube.events] == ["SecretMissing"]
    first, again = (c for c in kube.calls if c[0] == "event")
    assert first == again  # the same name, twice
    assert kube.ftj["status"]["reason"] == "SecretMissing"
    # The same reason later, from another status, is another event.
    kube.secrets.add("hf")
    settle(reconciler(kube))
    kube.secrets.clear()
    kube.objects.clear()
    kube.ftj["status"] = {}
    settle(reconciler(kube))
    assert [e[1] for e in kube.events].count("SecretMissing") == 2


def test_a_claim_kubetune_did_not_make_is_in_the_way_though_the_cache_has_none() -> None:
    kube = FakeKube(ftj())
    kube.objects[("PersistentVolumeClaim", "demo-workspace")] = {
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "demo-workspace", "namespace": "ns"},
    }
    settle(reconciler(kube))
    assert ("get", "PersistentVolumeClaim", "demo-workspace") in kube.calls  # after its create got 409
    assert kube.ftj["status"]["reason"] == "WorkspaceConflict"
    assert ("Job", kube.ftj["status"]["jobName"]) not in kube.objects


def test_a_missing_secret_stops_the_pass_before_anything_is_created() -> None:
    kube = FakeKube(ftj(), secrets=())
    again = settle(reconciler(kube))
    assert not [c for c in kube.calls if c[0] == "create"] and kube.objects == {}
    assert kube.ftj["status"]["reason"] == "SecretMissing" and again == 10.0
    assert [e[:2] for e in kube.events] == [("Warning", "SecretMissing")]


TRACKERS = {
    "mlflow": {
        "password": {"secretKeyRef": {"name": "mlflow", "key": "password"}},
        "token": {"secretKeyRef": {"name": "mlflow", "key": "token"}},
    },
    "wandb": {"apiKey": {"secretKeyRef": {"name": "wandb", "key": "apiKey"}}},
}


def test_the_trackers_secrets_are_checked_like_the_hub_tokens() -> None:
    kube = FakeKube(ftj(training={"reportTo": ["mlflow", "wandb"], "trackers": TRACKERS}), secrets=("hf",))
    now = [0.0]
    r = Reconciler(kube, sync(Cache(kube), kube), clock=lambda: NOW, monotonic=lambda: now[0])  # type: ignore[arg-type]
    assert settle(r) == 10.0
    assert not [c for c in kube.calls if c[0] == "create"]
    # Each Secret asked about once, the one holding two of the run's keys too.
    assert [c[2] for c in kube.calls if c[1] == "Secret"] == ["hf", "mlflow", "wandb"]

    def said() -> str:
        [running] = [c for c in kube.ftj["status"]["conditions"] if c["type"] == "Running"]
        assert running["reason"] == kube.ftj["status"]["reason"] == "SecretMissing"
        return str(running["message"])

    message = said()
    assert 'the Secret "mlflow" with keys "password", "token"' in message
    assert "--from-literal=password=<MLflow password> --from-literal=token=<MLflow token>" in message
    assert 'the Secret "wandb" with key "apiKey"' in message
    assert '"hf"' not in message and message.endswith("the run starts once they exist")
    # One created: the other is still missing (a new message only, which waits for DETAIL_DELAY_SECONDS).
    kube.secrets.add("mlflow")
    settle(r)
    now[0] += DETAIL_DELAY_SECONDS
    settle(r)
    message = said()
    assert '"mlflow"' not in message and message.endswith("the run starts once it exists")
    kube.secrets.add("wandb")
    settle(r)
    assert ("Job", kube.ftj["status"]["jobName"]) in kube.objects


def test_the_secrets_of_a_tracker_not_reported_to_are_not_asked_for() -> None:
    kube = FakeKube(ftj(training={"reportTo": ["tensorboard"], "trackers": TRACKERS}), secrets=("hf",))
    settle(reconciler(kube))
    assert [c[2] for c in kube.calls if c[1] == "Secret"] == ["hf"]
    assert ("Job", kube.ftj["status"]["jobName"]) in kube.objects


def test_a_secret_the_operator_may_not_read_does_not_block(caplog: pytest.LogCaptureFixture) -> None:
    kube = FakeKube(ftj(), secrets=())
    kube.fail[("get", "Secret")] = api_error(403)
    with caplog.at_level(logging.DEBUG, logger="kubetune.operator"):
        settle(reconciler(kube))
    assert ("Job", kube.ftj["status"]["jobName"]) in kube.objects
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Turned off: not even asked.
    kube = FakeKube(ftj(), secrets=())
    reconciler(kube, secret_precheck=False).reconcile("ns", "demo")
    assert not [c for c in kube.calls if c[1] == "Secret"]


def test_a_refused_job_is_undone_and_reported_in_the_api_servers_words() -> None:
    kube = FakeKube(ftj(name="tiny"))
    message = 'Job.batch "tiny-1234" is invalid: metadata.name: Invalid value'
    kube.fail[("create", "Job")] = api_error(422, message)
    again = reconciler(kube).reconcile("ns", "tiny")
    assert kube.objects == {}  # the claim and the ConfigMap this pass created are deleted again
    status = kube.ftj["status"]
    assert (status["state"], status["reason"]) == ("Failed", "JobRejected") and again is None
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert message in failed["message"]
    assert [e[:2] for e in kube.events] == [("Warning", "JobRejected")]
    # Not retried: the next pass creates nothing, records nothing.
    kube.calls.clear()
    kube.events.clear()
    assert reconciler(kube).reconcile("ns", "tiny") is None
    assert not [c for c in kube.calls if c[0] in ("create", "delete")] and kube.events == []


def test_a_claim_from_before_survives_a_refused_run() -> None:
    kube = FakeKube(ftj())
    settle(reconciler(kube))
    run = kube.ftj["status"]["jobName"]
    kube.objects.pop(("Job", run))
    kube.fail[("create", "Job")] = api_error(400, "quantities must match the regular expression")
    settle(reconciler(kube))
    assert list(kube.objects) == [("PersistentVolumeClaim", "demo-workspace")]  # its data stays
    assert ("ConfigMap", run) not in kube.objects  # made by the earlier pass: the run's, so deleted


@pytest.mark.parametrize("status", [403, 429, 500])
def test_other_errors_are_not_rejections(status: int) -> None:
    kube = FakeKube(ftj())
    kube.fail[("create", "Job")] = api_error(status)
    with pytest.raises(ApiException):  # retried with back-off by the work queue
        settle(reconciler(kube))
    assert "status" not in kube.ftj


def test_progress_comes_from_rank_0s_log_and_an_unreadable_log_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = FakeKube(ftj())
    settle(reconciler(kube))
    run = kube.ftj["status"]["jobName"]
    kube.pods = [trainer_pod(run, RUNNING)]
    kube.log = progress_line({"state": "Training", "step": 5, "total_steps": 10, "loss": 2.0}) + "\n"
    assert settle(reconciler(kube)) == 10.0
    assert ("log", f"{run}-0-abcde", "trainer") in kube.calls
    assert (kube.ftj["status"]["phase"], kube.ftj["status"]["progress"]) == ("Training", "50%")
    # A node the API server cannot reach for logs (KWOK's): one request, a debug line, nothing else.
    kube.log = api_error(500, "no preferred addresses found; known addresses: []")
    kube.calls.clear()
    with caplog.at_level(logging.DEBUG, logger="kubetune.operator"):
        assert settle(reconciler(kube)) == 10.0
    assert [c for c in kube.calls if c[0] == "log"] == [("log", f"{run}-0-abcde", "trainer")]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert kube.ftj["status"]["progress"] == "50%"  # kept from the last read


def test_a_pod_whose_log_cannot_be_read_is_asked_again_after_a_growing_pause() -> None:
    kube = FakeKube(ftj())
    now = [1000.0]
    r = Reconciler(kube, sync(Cache(kube), kube), clock=lambda: NOW, monotonic=lambda: now[0])  # type: ignore[arg-type]
    settle(r)
    run = kube.ftj["status"]["jobName"]
    kube.pods = [trainer_pod(run, RUNNING)]
    sync(r.cache, kube)
    kube.log = api_error(500, "no preferred addresses found; known addresses: []")

    def reads_after(seconds: float) -> int:
        now[0] += seconds
        kube.calls.clear()
        settle(r)
        return len([c for c in kube.calls if c[0] == "log"])

    assert reads_after(0) == 1
    assert reads_after(10) == 0 and reads_after(10) == 0  # the 10 s passes of a running job
    assert reads_after(LOG_RETRY_MIN_SECONDS) == 1
    assert reads_after(LOG_RETRY_MIN_SECONDS) == 0  # the pause doubled
    assert reads_after(LOG_RETRY_MIN_SECONDS) == 1
    kube.log = progress_line({"state": "Training", "step": 5, "total_steps": 10, "loss": 2.0}) + "\n"
    patches = len(kube.status_patches)
    assert reads_after(4 * LOG_RETRY_MIN_SECONDS) == 1 and reads_after(1) == 1  # readable: every pass
    # Progress is what `kubectl get ftj` shows while it trains: written as soon as it is read.
    assert kube.ftj["status"]["progress"] == "50%" and len(kube.status_patches) == patches + 1


def test_a_detail_waits_for_the_next_state_change_but_not_for_ever() -> None:
    kube = FakeKube(ftj())
    now = [1000.0]
    r = Reconciler(kube, sync(Cache(kube), kube), clock=lambda: NOW, monotonic=lambda: now[0])  # type: ignore[arg-type]
    settle(r)
    assert [p["state"] for p in kube.status_patches] == ["Pending"]
    run = kube.ftj["status"]["jobName"]
    pod = trainer_pod(run, SCHEDULED)
    kube.pods = [pod]
    sync(r.cache, kube)
    again = settle(r)  # scheduled: a condition more, the same state and reason
    assert len(kube.status_patches) == 1 and again == DETAIL_DELAY_SECONDS
    now[0] += 2
    assert settle(r) == DETAIL_DELAY_SECONDS - 2 and len(kube.status_patches) == 1
    # The trainer starts: the state changes, and one patch carries both.
    pod["status"] = copy.deepcopy(RUNNING)
    sync(r.cache, kube)
    settle(r)
    assert [p["state"] for p in kube.status_patches] == ["Pending", "Running"]
    # Progress is not a detail: the columns move as soon as the log is read (which a running job's
    # resync bounds to one read per plan.RUNNING_RESYNC_SECONDS).
    kube.log = progress_line({"state": "Training", "step": 5, "total_steps": 10, "loss": 2.0}) + "\n"
    sync(r.cache, kube)
    settle(r)
    assert len(kube.status_patches) == 3 and kube.ftj["status"]["progress"] == "50%"
    # A detail with no state change after it (the pod is scheduled, nothing else): written when due.
    other = FakeKube(ftj())
    later = [0.0]
    r = Reconciler(other, sync(Cache(other), other), clock=lambda: NOW, monotonic=lambda: later[0])  # type: ignore[arg-type]
    settle(r)
    other.pods = [trainer_pod(run, SCHEDULED)]
    sync(r.cache, other)
    assert settle(r) == DETAIL_DELAY_SECONDS and len(other.status_patches) == 1
    later[0] += DETAIL_DELAY_SECONDS
    settle(r)
    assert len(other.status_patches) == 2
    assert cond_of(other.ftj["status"], "Scheduled")["status"] == "True"


def test_the_secret_check_asks_for_metadata_only() -> None:
    kube = Kube.__new__(Kube)
    kube.core = mock.Mock()
    assert kube.secret_exists("ns", "hf") is True
    _, kwargs = kube.core.read_namespaced_secret.call_args
    assert kwargs["_headers"] == {"Accept": METADATA_ONLY}
    assert METADATA_ONLY == "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    kube.core.read_namespaced_secret.side_effect = api_error(404)
    assert kube.secret_exists("ns", "hf") is False


def test_the_log_read_is_bounded() -> None:
    kube = Kube.__new__(Kube)
    kube.core = mock.Mock()
    kube.core.read_namespaced_pod_log.return_value.data = b"line\n"
    assert kube.pod_log("ns", "p", "trainer") == "line\n"
    _, kwargs = kube.core.read_namespaced_pod_log.call_args
    assert kwargs["container"] == "trainer"
    assert (kwargs["tail_lines"], kwargs["limit_bytes"]) == (PROGRESS_TAIL_LINES, PROGRESS_TAIL_BYTES)
    assert kwargs["_request_timeout"] == 5


TOKEN = "hf_" + "ReconcileNeverLeaks0123456789"


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        pytest.param({"samples": {"prompts": ["ok", f"use {TOKEN}"]}}, "spec.samples.prompts[1]", id="value"),
        pytest.param(
            {"podMetadata": {"annotations": {TOKEN: "x"}}}, "spec.podMetadata.annotations.hf_***", id="key"
        ),
        pytest.param(
            {"samples": {"prompts": [base64.b64encode(TOKEN.encode()).decode()]}},
            "spec.samples.prompts[0]",
            id="base64",
        ),
    ],
)
def test_a_token_in_the_spec_fails_it_by_where_it_is_and_creates_nothing(
    spec: dict[str, Any], where: str, caplog: pytest.LogCaptureFixture
) -> None:
    kube = FakeKube(ftj(**spec))
    with caplog.at_level(logging.INFO, logger="kubetune.operator"):
        assert settle(reconciler(kube)) is None
    assert not [c for c in kube.calls if c[0] == "create"] and kube.objects == {}
    status = kube.ftj["status"]
    assert (status["state"], status["reason"]) == ("Failed", "InvalidSpec")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["message"].startswith(f"{where}: looks like a Hugging Face token")
    assert "secretKeyRef" in failed["message"]
    written = json.dumps([kube.status_patches, kube.events]) + caplog.text
    assert TOKEN not in written and base64.b64encode(TOKEN.encode()).decode() not in written


@pytest.fixture
def operator_log() -> Iterator[io.StringIO]:
    """The operator's own logging set-up (JSON lines), written to a buffer; undone afterwards."""
    from kubetune import redact as rd
    from kubetune_operator.operator import log, setup_logging

    saved = (log.handlers[:], log.level, log.propagate, logging.getLogRecordFactory(), set(rd._INSTALLED))
    hooks = (sys.excepthook, threading.excepthook, warnings.showwarning, logging.Handler.handleError)
    setup_logging("json")
    buffer = io.StringIO()
    handler = log.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
        logging.setLogRecordFactory(saved[3])
        rd._INSTALLED.clear()
        rd._INSTALLED.update(saved[4])
        sys.excepthook, threading.excepthook, warnings.showwarning = hooks[:3]
        logging.Handler.handleError = hooks[3]  # type: ignore[method-assign]


def test_what_the_api_server_echoes_is_redacted_in_status_events_and_logs(operator_log: io.StringIO) -> None:
    """A refusal whose message repeats a secret (a value the API server quotes back): the condition,
    the event and the operator's log line carry it masked."""
    kube = FakeKube(ftj())
    echo = f'Job.batch "demo-1" is invalid: spec.template.metadata.annotations: Invalid value: "{TOKEN}"'
    kube.fail[("create", "Job")] = api_error(422, echo)
    settle(reconciler(kube))
    failed = next(c for c in kube.ftj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "JobRejected" and 'Invalid value: "hf_***"' in failed["message"]
    assert [e[1] for e in kube.events] == ["JobRejected"] and "hf_***" in kube.events[0][2]
    err = operator_log.getvalue()
    lines = [json.loads(line) for line in err.splitlines()]
    assert any("API server refused Job" in r["msg"] and "hf_***" in r["msg"] for r in lines), lines
    assert TOKEN not in json.dumps([kube.status_patches, kube.events]) + err
