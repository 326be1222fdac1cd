"""Reconcile one FineTuneJob: read, plan (pure), act, write status. Level-triggered and idempotent.

Each pass reads the FineTuneJob, its Jobs, the current run's Pods, its workspace claim, the Hub token
Secret's metadata (only before the run's Job exists) and the end of rank 0's trainer log (only while it
runs); `plan()` decides from that alone (kubetune.controller.plan); the actions are applied through
kube.py; and the status is written in one merge patch, only when it changed. Nothing is remembered
between passes, so a restarted operator carries on where the last one stopped.

GitOps semantics (README "Re-runs and GitOps"):
- same spec re-applied: same spec hash, same run name, nothing changes;
- spec edited: a new hash, so exactly one new run; the old run's Job is deleted;
- metadata-only edits: the hash covers the spec only, so nothing is started;
- a finished run stays finished: if its Job is gone (TTL), it is not created again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune.api.kyaml import field_path
from kubetune.api.load import describe
from kubetune.api.v1alpha1 import TOKEN_MESSAGE, FineTuneJob
from kubetune.contract import LABEL_JOB, LABEL_RUN
from kubetune.controller.kube import Kube, api_message
from kubetune.controller.plan import (
    DEFAULT_IMAGE_PULL_GRACE_SECONDS,
    RECHECKED,
    Create,
    Delete,
    Observed,
    Patch,
    Plan,
    SecretCheck,
    plan,
)
from kubetune.controller.status import TERMINAL, Event, format_time, rank0_log_pod
from kubetune.policy import Limits
from kubetune.redact import find_tokens, redact, redact_data
from kubetune.render import CONTAINER, render_claim, run_name, spec_hash, workspace_claim

log = logging.getLogger("kubetune.operator")

# What the API server says when it refuses an object for what it is (not for load or a conflict):
# 400 Bad Request (it cannot be decoded, e.g. a malformed quantity), 422 Invalid. 409 means it exists
# (fine), 429 and 5xx are retried with back-off.
REJECTED = (400, 422)
# Run-scoped children deleted again when the API server refuses one of the run's objects.
RUN_KINDS = ("Job", "Service", "ConfigMap")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        image: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        *,
        image_pull_grace: float = DEFAULT_IMAGE_PULL_GRACE_SECONDS,
        secret_precheck: bool = True,
        policy: Callable[[], Limits | str] | None = None,
    ) -> None:
        self.kube = kube
        # The policy's limits as last read (kubetune.policy), or why they cannot be; None: no policy.
        self.policy = policy
        self.image = image
        self.clock = clock
        self.image_pull_grace = image_pull_grace
        self.secret_precheck = secret_precheck

    def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds until the next unprompted pass, or None."""
        obs = self.read(namespace, name)
        if obs is None:
            return None  # gone: owner references garbage-collect the children
        now = self.clock()
        result = plan(obs, now)
        rejected = self.act(obs, result)
        if rejected is not None:
            result = plan(replace(obs, rejected=rejected), now)
        self.write_status(obs, result)
        for event in result.events:
            self._event(obs.ftj, event)
        return result.requeue

    # Read ---------------------------------------------------------------------------------------------

    def read(self, namespace: str, name: str) -> Observed | None:
        obj = self.kube.get_ftj(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        settings: dict[str, Any] = {"image": self.image, "image_pull_grace": self.image_pull_grace}
        # A token anywhere in the spec (a key, a value, bytes, base64) is refused before anything else,
        # by where it is, never by what it is: nothing of it may reach a ConfigMap, a Job or a message.
        leaked = find_tokens(obj.get("spec"), ("spec",))
        invalid = _token_message(leaked) if leaked else None
        if invalid is None:
            try:
                job = FineTuneJob.model_validate(obj)
            except ValidationError as e:
                invalid = redact("; ".join(describe(e)))[:2000]
        if invalid is not None:
            log.warning("invalid spec: %s", invalid, extra=_ctx(namespace, name))
            return Observed(obj, None, invalid=invalid, **settings)
        job.metadata.namespace = namespace
        run = run_name(job)
        jobs = self.kube.list_jobs(namespace, f"{LABEL_JOB}={name}")
        current = next((j for j in jobs if j["metadata"]["name"] == run), None)
        pods = self.kube.list_pods(namespace, f"{LABEL_RUN}={run}") if current is not None else []
        claim = None
        if render_claim(job) is not None:
            claim = self.kube.get("PersistentVolumeClaim", namespace, str(workspace_claim(job)))
        old = obj.get("status") or {}
        settled = old.get("specHash") == spec_hash(job) and old.get("state") in TERMINAL
        settled = settled and old.get("reason") not in RECHECKED  # decided again on every pass
        secret = None
        if current is None and not settled:
            secret = self._secret(namespace, name, job)
        return Observed(
            obj,
            job,
            jobs=jobs,
            pods=pods,
            claim=claim,
            secret=secret,
            log_tail=self._log_tail(namespace, name, pods),
            **self._policy(),
            **settings,
        )

    def _policy(self) -> dict[str, Any]:
        """The policy's limits for plan(): `limits`, or `policy_problem` when they cannot be read."""
        state = self.policy() if self.policy is not None else None
        if isinstance(state, str):
            return {"policy_problem": state}
        return {"limits": state}

    def _secret(self, namespace: str, name: str, job: FineTuneJob) -> SecretCheck | None:
        """Whether the Hub token Secret exists: metadata only (its data never reaches the operator)."""
        hub = job.spec.output.hub
        if hub is None or not self.secret_precheck:
            return None
        try:
            found = self.kube.secret_exists(namespace, hub.token.secret_key_ref.name)
        except ApiException as e:
            if e.status != 403:
                raise
            # Not granted (the chart's secretPreCheck.enabled=false): the trainer's exit code says it.
            log.debug(
                "cannot check Secret %s: forbidden",
                hub.token.secret_key_ref.name,
                extra=_ctx(namespace, name),
            )
            return "unknown"
        return "present" if found else "missing"

    def _log_tail(self, namespace: str, name: str, pods: list[dict[str, Any]]) -> str | None:
        """The end of rank 0's trainer log, where the progress lines are. Best effort: one request,
        and a pod without a readable log (a node the API server cannot reach, a fake node) costs
        nothing more than that."""
        pod = rank0_log_pod(pods)
        if pod is None:
            return None
        pod_name = pod["metadata"]["name"]
        try:
            return self.kube.pod_log(namespace, pod_name, CONTAINER)
        except Exception as e:
            log.debug("no log from pod %s: %s", pod_name, str(e)[:200], extra=_ctx(namespace, name))
            return None

    # Act ----------------------------------------------------------------------------------------------

    def act(self, obs: Observed, result: Plan) -> str | None:
        """Apply the plan's actions in order. When the API server refuses to create one of the run's
        objects, delete what this pass created and the run's other objects, and return its message."""
        meta = obs.ftj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        created: list[tuple[str, str]] = []
        for action in result.actions:
            if isinstance(action, Create):
                obj = action.obj
                kind, child = obj["kind"], obj["metadata"]["name"]
                try:
                    made = self.kube.create(obj)
                except ApiException as e:
                    if e.status not in REJECTED:
                        raise
                    message = api_message(e)
                    log.warning(
                        "API server refused %s %s: %s", kind, child, message, extra=_ctx(namespace, name)
                    )
                    self._undo(namespace, created, obs)
                    return message
                if made is not None:
                    created.append((kind, child))
                    log.info("created %s %s", kind, child, extra=_ctx(namespace, name))
                    if action.event is not None:
                        self._event(obs.ftj, action.event)
            elif isinstance(action, Delete):
                if self.kube.delete(action.kind, namespace, action.name):
                    log.info("deleted %s %s", action.kind, action.name, extra=_ctx(namespace, name))
                    if action.event is not None:
                        self._event(obs.ftj, action.event)
            elif isinstance(action, Patch):
                self.kube.patch(action.kind, namespace, action.name, action.patch)
                log.info(
                    "patched %s %s: %s",
                    action.kind,
                    action.name,
                    _keys(action.patch),
                    extra=_ctx(namespace, name),
                )
        return None

    def _undo(self, namespace: str, created: list[tuple[str, str]], obs: Observed) -> None:
        """Nothing of a refused run stays: what this pass created, and the run's own objects (an earlier
        pass may have made some). A claim made before this pass stays: it may hold data."""
        assert obs.job is not None
        run = run_name(obs.job)
        targets = list(reversed(created))
        targets += [(kind, run) for kind in RUN_KINDS if (kind, run) not in created]
        for kind, child in targets:
            self.kube.delete(kind, namespace, child)

    # Status -------------------------------------------------------------------------------------------

    def write_status(self, obs: Observed, result: Plan) -> None:
        old = obs.ftj.get("status") or {}
        # The last stop before the API server: nothing secret in any field (compared redacted, as
        # written, so a redacted message never looks like a change).
        status: dict[str, Any] = redact_data(result.status)
        if _without_times(status) == _without_times(old):
            return
        meta = obs.ftj["metadata"]
        # A merge patch keeps keys it does not name: name the ones to remove, with null.
        patch: dict[str, Any] = {**{k: None for k in old if k not in status}, **status}
        self.kube.patch_ftj_status(meta["namespace"], meta["name"], patch)
        detail = " ".join(str(status[k]) for k in ("reason", "phase", "progress") if status.get(k))
        log.info("status: %s %s", status.get("state"), detail, extra=_ctx(meta["namespace"], meta["name"]))

    def _event(self, obj: dict[str, Any], event: Event) -> None:
        try:
            message = redact(event.message)
            self.kube.event(obj, event.type, event.reason, message, format_time(self.clock()))
        except Exception as e:  # an event is best effort: never fail a reconcile over one
            log.warning("could not record event %s: %s", event.reason, e)


def _token_message(leaked: list[tuple[str | int, ...]]) -> str:
    """Where the spec holds something token-shaped (a key is named by its redacted text)."""
    return f"{', '.join(map(field_path, leaked))}: {TOKEN_MESSAGE}"


def _ctx(namespace: str, name: str) -> dict[str, str]:
    return {"namespace": namespace, "ftj": name}


def _keys(patch: dict[str, Any], prefix: str = "") -> str:
    out = []
    for k, v in patch.items():
        if isinstance(v, dict) and v:
            out.append(_keys(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}")
    return ", ".join(sorted(out))


def _without_times(status: dict[str, Any]) -> dict[str, Any]:
    """Status compared without condition timestamps (they only move when a condition flips)."""
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    return out
