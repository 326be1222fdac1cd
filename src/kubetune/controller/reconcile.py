"""Reconcile one FineTuneJob: level-triggered and idempotent.

Each pass reads the FineTuneJob, its Jobs and the current run's Pods, and makes the cluster match the
spec: the current run's objects exist (deterministic names: creating twice is a no-op), runs of older
specs are stopped, the Job's `suspend` follows `runPolicy.suspend`, and status mirrors what was read.
Nothing is remembered between passes, so a restarted operator carries on where the last one stopped.

GitOps semantics (README "Re-runs and GitOps"):
- same spec re-applied: same spec hash, same run name, nothing changes;
- spec edited: a new hash, so exactly one new run; the old run's Job is deleted;
- metadata-only edits: the hash covers the spec only, so nothing is started;
- a finished run stays finished: if its Job is gone (TTL), it is not created again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api.load import describe
from kubetune.api.v1alpha1 import FineTuneJob, find_inline_tokens
from kubetune.controller.kube import Kube
from kubetune.controller.status import TERMINAL, Observed, compute_status, job_finished
from kubetune.render import LABEL_JOB, LABEL_RUN, render, render_job, run_name, spec_hash

log = logging.getLogger("kubetune.operator")

# While a run is active, look again this often even without events (progress, ETA).
ACTIVE_RESYNC_SECONDS = 30.0
# runPolicy fields applied to a running Job (backoffLimit and queueName apply from the next run).
MUTABLE_JOB_FIELDS = ("suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished")


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, kube: Kube, image: str | None = None, clock: Callable[[], str] = utcnow) -> None:
        self.kube = kube
        self.image = image
        self.clock = clock

    def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds until the next unprompted pass, or None."""
        obj = self.kube.get_ftj(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None  # gone: owner references garbage-collect the children
        meta = obj["metadata"]
        old_status = obj.get("status") or {}
        ctx = {"namespace": namespace, "ftj": name}
        try:
            job = FineTuneJob.model_validate(obj)
        except ValidationError as e:
            leaked = find_inline_tokens(obj.get("spec"))
            message = (
                "; ".join(describe(e))[:2000]
                if not leaked
                else (
                    "inline Hugging Face token in the spec; store it in a Secret and use "
                    "spec.output.hub.token.secretKeyRef"
                )
            )
            log.warning("invalid spec: %s", message, extra=ctx)
            obs = Observed(meta.get("generation"), "", "", None, invalid=message)
            self._write_status(obj, obs, old_status)
            return None  # nothing to retry until the object changes
        job.metadata.namespace = namespace
        run = run_name(job)
        digest = spec_hash(job)
        jobs = self.kube.list_jobs(namespace, f"{LABEL_JOB}={name}")
        current = next((j for j in jobs if j["metadata"]["name"] == run), None)

        # Stop runs of older specs (an edited spec replaces its run; finished ones stay for the record).
        for old in jobs:
            old_name = old["metadata"]["name"]
            deleting = old["metadata"].get("deletionTimestamp")
            if old_name != run and not job_finished(old) and not deleting:
                log.info("stopping run %s: the spec changed", old_name, extra=ctx)
                for kind in ("Job", "Service", "ConfigMap"):
                    self.kube.delete(kind, namespace, old_name)
                self._event(
                    obj, "Normal", "RunReplaced", f"spec changed: stopped run {old_name}, starting {run}"
                )

        finished_before = old_status.get("specHash") == digest and old_status.get("state") in TERMINAL
        if current is None and not finished_before:
            created = None
            for child in render(job, image=self.image):
                result = self.kube.create(child)
                if child["kind"] == "Job":
                    created = result
            if created is not None:
                current = created
                log.info("created run %s", run, extra=ctx)
                self._event(obj, "Normal", "RunCreated", f"created Job {run}")
            else:  # another pass (or operator) created it first
                current = next(
                    (
                        j
                        for j in self.kube.list_jobs(namespace, f"{LABEL_JOB}={name}")
                        if j["metadata"]["name"] == run
                    ),
                    None,
                )
        elif current is not None and not job_finished(current):
            # runPolicy steers the run it belongs to: these Job fields may change while it runs.
            desired = render_job(job, image=self.image)["spec"]
            have = current.get("spec", {})
            patch = {k: desired.get(k) for k in MUTABLE_JOB_FIELDS if desired.get(k) != have.get(k)}
            if patch:
                self.kube.patch_job(namespace, run, {"spec": patch})
                have.update(patch)
                log.info("run %s: updated %s", run, ", ".join(sorted(patch)), extra=ctx)

        if current is None and finished_before:
            return None  # the finished run's Job was cleaned up (TTL): keep the recorded status
        pods = self.kube.list_pods(namespace, f"{LABEL_RUN}={run}") if current is not None else []
        obs = Observed(meta.get("generation"), digest, run, current, pods)
        state = self._write_status(obj, obs, old_status)
        return None if state in TERMINAL or state == "Suspended" else ACTIVE_RESYNC_SECONDS

    def _write_status(self, obj: dict[str, Any], obs: Observed, old: dict[str, Any]) -> str:
        status, events = compute_status(obs, old, self.clock())
        status = _drop_none(status)
        if _without_times(status) != _without_times(old):
            meta = obj["metadata"]
            # A merge patch keeps keys it does not name: name the ones to remove, with null.
            patch: dict[str, Any] = {**{k: None for k in old if k not in status}, **status}
            self.kube.patch_ftj_status(meta["namespace"], meta["name"], patch)
            log.info(
                "status: %s%s",
                status["state"],
                f" {status['progress']}" if status.get("progress") else "",
                extra={"namespace": meta["namespace"], "ftj": meta["name"]},
            )
        for ev in events:
            self._event(obj, ev.type, ev.reason, ev.message)
        return str(status["state"])

    def _event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            self.kube.event(obj, type_, reason, message, self.clock())
        except Exception as e:  # an event is best effort: never fail a reconcile over one
            log.warning("could not record event %s: %s", reason, e)


def _drop_none(status: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if v is not None}
    if "conditions" in out:
        out["conditions"] = [{k: v for k, v in c.items() if v is not None} for c in out["conditions"]]
    return out


def _without_times(status: dict[str, Any]) -> dict[str, Any]:
    """Status compared without condition timestamps (they only move when a condition flips)."""
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    return out
