"""Reconcile one FineTuneJob: read, plan (pure), act, write status. Level-triggered and idempotent.

Each pass reads the FineTuneJob, its Jobs, the current run's Pods and its workspace claim from the
cache (kubetune_operator.cache), which costs no request. Two reads remain: the Hub token Secret's
metadata (only before the run's Job exists) and the end of rank 0's trainer log (only while it runs;
a pod whose log cannot be read is asked again after a growing pause). Before a GPU run's Job exists,
the fit check (kubetune_operator.fit) reads the matching nodes' labels and the model's config.json,
both memoized and shared by every FineTuneJob that asks the same. `plan()` decides from that alone
(kubetune_operator.plan); the actions are applied through kube.py; then the events, each under a
deterministic name, so a retry after a crash gets 409 rather than a duplicate; then the status, in one
merge patch, only when it changed. Events go first: a crash between the two loses nothing, as the next
pass derives the same events from the same old status.

The cache may lag behind this operator's own writes: what a create or the status patch returns goes
into it at once, and a create of something that exists is a no-op (409). What the operator remembers
between passes is only an optimisation (the last status it wrote, so its own write's watch event does
not cause another pass; when to read a silent pod's log again); a restarted operator decides the same.

GitOps semantics (README "Re-runs and GitOps"):
- same spec re-applied: same spec hash, same run name, nothing changes;
- spec edited: a new hash, so exactly one new run; the old run's Job is deleted;
- metadata-only edits: the hash covers the spec only, so nothing is started;
- a finished run stays finished: if its Job is gone (TTL), it is not created again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune.api.kyaml import field_path
from kubetune.api.load import describe
from kubetune.api.v1alpha1 import TOKEN_MESSAGE, FineTuneJob
from kubetune.contract import LABEL_JOB
from kubetune.policy import Limits
from kubetune.redact import find_tokens, redact, redact_data
from kubetune.render import CONTAINER, render_claim, run_name, secret_refs, spec_hash, workspace_claim
from kubetune_operator.cache import Cache, Key
from kubetune_operator.fit import Fit, FitChecker
from kubetune_operator.kube import Fenced, Kube, api_message, describe_error, event_name
from kubetune_operator.plan import (
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
from kubetune_operator.status import TERMINAL, Event, format_time, rank0_log_pod

log = logging.getLogger("kubetune.operator")

# What the API server says when it refuses an object for what it is (not for load or a conflict):
# 400 Bad Request (it cannot be decoded, e.g. a malformed quantity), 422 Invalid. 409 means it exists
# (fine), 429 and 5xx are retried with back-off.
REJECTED = (400, 422)
# Run-scoped children deleted again when the API server refuses one of the run's objects.
RUN_KINDS = ("Job", "Service", "ConfigMap")
# A pod whose log cannot be read (a node the API server cannot reach; KWOK's have no logs) is asked
# again after this long, doubling to the most; the progress it would show waits that long.
LOG_RETRY_MIN_SECONDS = 30.0
LOG_RETRY_MAX_SECONDS = 600.0
# The status fields whose change is written at once: the state and what explains it, and the trainer's
# progress (what `kubectl get ftj` shows while it trains; it is read from the log at most every
# plan.RUNNING_RESYNC_SECONDS, which bounds those writes). Any other change (a condition's message, a
# new condition that does not change the reason, startTime) is a detail: it waits up to
# DETAIL_DELAY_SECONDS, so that the next state change carries it in the same patch. One status write
# per state change, and a detail is shown at most that late.
SIGNIFICANT = (
    "state",
    "reason",
    "specHash",
    "jobName",
    "observedGeneration",
    "restarts",
    "preemptions",
    "completionTime",
    "phase",
    "progress",
    "step",
    "loss",
    "eta",
)
DETAIL_DELAY_SECONDS = 15.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        cache: Cache,
        image: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        *,
        image_pull_grace: float = DEFAULT_IMAGE_PULL_GRACE_SECONDS,
        secret_precheck: bool = True,
        policy: Callable[[], Limits | str] | None = None,
        fit: FitChecker | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.monotonic = monotonic
        self._lock = threading.Lock()
        # The status this operator last wrote for each FineTuneJob, as written (redacted).
        self._written: dict[Key, dict[str, Any]] = {}
        # Since when a change of details only has waited to be written, by FineTuneJob.
        self._detail_since: dict[Key, float] = {}
        # The last validation of each FineTuneJob: (what it read, the model or why it is invalid). A pass
        # validates again only when the spec or the metadata the model reads changed: validating (the
        # ConfigMap size check renders the whole spec) was a third of the operator's CPU at 1,000 jobs.
        self._validated: dict[Key, tuple[str, FineTuneJob | None, str | None]] = {}
        # Pods whose log could not be read, by uid: (when to try again, the pause after that).
        self._log_retry: dict[str, tuple[float, float]] = {}
        # The policy's limits as last read (kubetune.policy), or why they cannot be; None: no policy.
        self.policy = policy
        # Whether a new run fits its GPU (kubetune_operator.fit); None: not checked.
        self.fit = fit
        self.image = image
        self.clock = clock
        self.image_pull_grace = image_pull_grace
        self.secret_precheck = secret_precheck

    def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds until the next unprompted pass, or None."""
        obs = self.read(namespace, name)
        if obs is None:
            self.forget((namespace, name))
            return None  # gone: owner references garbage-collect the children
        now = self.clock()
        result = plan(obs, now)
        created_job = any(isinstance(a, Create) and a.obj["kind"] == "Job" for a in result.actions)
        again = self.act(obs, result)
        if again is not None:
            obs = again
            result = plan(obs, now)
        elif created_job:
            # The run's Job is created: its status and events are the next pass's, queued behind the
            # FineTuneJobs still waiting for theirs. A burst of new FineTuneJobs gets its Jobs first
            # (3 requests each, not 5), and that pass often sees the pods and writes Running at once,
            # not Pending and then Running. Alone, it is a moment later.
            return 0.0
        for event in result.events:
            self._event(obs.ftj, event)
        due = self.write_status(obs, result)
        if due is not None:
            return due if result.requeue is None else min(due, result.requeue)
        return result.requeue

    def wrote(self, key: Key, status: dict[str, Any] | None) -> bool:
        """Whether `status` is what this operator last wrote for `key` (its own write, seen again)."""
        with self._lock:
            return key in self._written and self._written[key] == (status or {})

    def forget(self, key: Key) -> None:
        with self._lock:
            self._written.pop(key, None)
            self._detail_since.pop(key, None)
            self._validated.pop(key, None)

    # Read ---------------------------------------------------------------------------------------------

    def read(self, namespace: str, name: str) -> Observed | None:
        obj = self.cache.ftj(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        settings: dict[str, Any] = {"image": self.image, "image_pull_grace": self.image_pull_grace}
        job, invalid = self._validate(namespace, name, obj)
        if job is None:
            return Observed(obj, None, invalid=invalid, **settings)
        run = run_name(job)
        jobs = self.cache.jobs(namespace, name)
        current = next((j for j in jobs if j["metadata"]["name"] == run), None)
        pods = self.cache.pods(namespace, name, run) if current is not None else []
        claim = None
        if render_claim(job) is not None:
            claim = self.cache.claim(namespace, str(workspace_claim(job)))
        old = obj.get("status") or {}
        settled = old.get("specHash") == spec_hash(job) and old.get("state") in TERMINAL
        settled = settled and old.get("reason") not in RECHECKED  # decided again on every pass
        secret: SecretCheck | None = None
        missing: tuple[str, ...] = ()
        fit = None
        if current is None and not settled:
            # Only before the run's Job exists: running work is never refused.
            fit = self._fit(namespace, name, job)
            if fit is None or fit.verdict not in ("unfit", "waiting"):  # else the pass would not use it
                secret, missing = self._secrets(namespace, name, job)
        return Observed(
            obj,
            job,
            jobs=jobs,
            pods=pods,
            claim=claim,
            secret=secret,
            missing_secrets=missing,
            fit=fit,
            log_tail=self._log_tail(namespace, name, pods),
            **self._policy(),
            **settings,
        )

    def _validate(
        self, namespace: str, name: str, obj: dict[str, Any]
    ) -> tuple[FineTuneJob, None] | tuple[None, str]:
        """The FineTuneJob model of `obj`, or why it is invalid; from the last pass when what the model
        reads is unchanged (a status write changes none of it)."""
        meta = obj.get("metadata") or {}
        read = json.dumps(
            [obj.get("spec"), [meta.get(k) for k in ("name", "uid", "generation", "labels", "annotations")]],
            sort_keys=True,
            default=str,
        )
        with self._lock:
            last = self._validated.get((namespace, name))
        if last is not None and last[0] == read:
            return (last[1], None) if last[1] is not None else (None, str(last[2]))
        # A token anywhere in the spec (a key, a value, bytes, base64) is refused before anything else,
        # by where it is, never by what it is: nothing of it may reach a ConfigMap, a Job or a message.
        leaked = find_tokens(obj.get("spec"), ("spec",))
        invalid = _token_message(leaked) if leaked else None
        job = None
        if invalid is None:
            try:
                job = FineTuneJob.model_validate(obj)
            except ValidationError as e:
                invalid = redact("; ".join(describe(e)))[:2000]
        if job is not None:
            job.metadata.namespace = namespace
        else:
            log.warning("invalid spec: %s", invalid, extra=_ctx(namespace, name))
        with self._lock:
            self._validated[(namespace, name)] = (read, job, invalid)
        return (job, None) if job is not None else (None, str(invalid))

    def _policy(self) -> dict[str, Any]:
        """The policy's limits for plan(): `limits`, or `policy_problem` when they cannot be read."""
        state = self.policy() if self.policy is not None else None
        if isinstance(state, str):
            return {"policy_problem": state}
        return {"limits": state}

    def _fit(self, namespace: str, name: str, job: FineTuneJob) -> Fit | None:
        """Whether the run fits its GPU; never raises (a check that fails is "not checked")."""
        if self.fit is None:
            return None
        try:
            return self.fit.check((namespace, name), job)
        except Exception as e:
            log.warning("fit check failed: %s", describe_error(e), extra=_ctx(namespace, name))
            return Fit("unchecked", f"GPU memory not checked: {describe_error(e)}")

    def _secrets(
        self, namespace: str, name: str, job: FineTuneJob
    ) -> tuple[SecretCheck | None, tuple[str, ...]]:
        """Whether the Secrets the run reads exist (the Hub token's, the trackers' in reportTo), and the
        fields of those that do not: metadata only (their data never reaches the operator)."""
        refs = secret_refs(job)
        if not refs or not self.secret_precheck:
            return None, ()
        missing: list[str] = []
        for secret in dict.fromkeys(r.name for r in refs):  # each Secret once, in the order of the env
            try:
                found = self.kube.secret_exists(namespace, secret)
            except ApiException as e:
                if e.status != 403:
                    raise
                # Not granted (the chart's secretPreCheck.enabled=false): the trainer's exit code says it.
                log.debug("cannot check Secret %s: forbidden", secret, extra=_ctx(namespace, name))
                return "unknown", ()
            if not found:
                missing += [r.field for r in refs if r.name == secret]
        return ("missing" if missing else "present"), tuple(missing)

    def _log_tail(self, namespace: str, name: str, pods: list[dict[str, Any]]) -> str | None:
        """The end of rank 0's trainer log, where the progress lines are. Best effort: one request,
        and a pod without a readable log (a node the API server cannot reach, a fake node) is not
        asked again for a while (LOG_RETRY_MIN_SECONDS, doubling)."""
        pod = rank0_log_pod(pods)
        if pod is None:
            return None
        pod_name, uid = pod["metadata"]["name"], str(pod["metadata"].get("uid") or pod["metadata"]["name"])
        now = self.monotonic()
        with self._lock:
            retry = self._log_retry.get(uid)
        if retry is not None and now < retry[0]:
            return None
        try:
            tail = self.kube.pod_log(namespace, pod_name, CONTAINER)
        except Fenced:
            raise
        except Exception as e:
            pause = retry[1] if retry is not None else LOG_RETRY_MIN_SECONDS
            with self._lock:
                if len(self._log_retry) > 10_000:  # pods long gone: forget the stale ones
                    self._log_retry = {k: v for k, v in self._log_retry.items() if v[0] > now}
                self._log_retry[uid] = (now + pause, min(pause * 2, LOG_RETRY_MAX_SECONDS))
            log.debug(
                "no log from pod %s (%s); next try in %.0f s",
                pod_name,
                str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
                pause,
                extra=_ctx(namespace, name),
            )
            return None
        with self._lock:
            self._log_retry.pop(uid, None)
        return tail

    # Act ----------------------------------------------------------------------------------------------

    def act(self, obs: Observed, result: Plan) -> Observed | None:
        """Apply the plan's actions in order; what they showed that the pass did not know, as the
        Observed to plan again from (None: nothing). When the API server refuses to create one of the
        run's objects, delete what this pass created and the run's other objects (`rejected`, in its
        words). A claim that exists though the cache has none is not kubetune's (the cache holds ours
        only): it is read once (`claim`), and the plan says it is in the way."""
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
                    return replace(obs, rejected=message)
                if made is None and kind == "PersistentVolumeClaim" and obs.claim is None:
                    found = self.kube.get(kind, namespace, child)
                    if found is not None and (found["metadata"].get("labels") or {}).get(LABEL_JOB) != name:
                        return replace(obs, claim=found)
                if made is not None:
                    self.cache.store(made)
                    created.append((kind, child))
                    log.info("created %s %s", kind, child, extra=_ctx(namespace, name))
                    if action.event is not None:
                        self._event(obs.ftj, action.event, child)
            elif isinstance(action, Delete):
                if self.kube.delete(action.kind, namespace, action.name):
                    log.info("deleted %s %s", action.kind, action.name, extra=_ctx(namespace, name))
                    if action.event is not None:
                        self._event(obs.ftj, action.event, action.name)
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

    def write_status(self, obs: Observed, result: Plan) -> float | None:
        """Patch the status when it changed; a change of details only waits (DETAIL_DELAY_SECONDS) for
        the next state change to carry it. Returns the seconds until a waiting detail is due."""
        old = obs.ftj.get("status") or {}
        meta = obs.ftj["metadata"]
        key = (meta["namespace"], meta["name"])
        # The last stop before the API server: nothing secret in any field (compared redacted, as
        # written, so a redacted message never looks like a change).
        status: dict[str, Any] = redact_data(result.status)
        if _without_times(status) == _without_times(old):
            with self._lock:
                self._detail_since.pop(key, None)
            return None
        if all(status.get(k) == old.get(k) for k in SIGNIFICANT):
            now = self.monotonic()
            with self._lock:
                since = self._detail_since.setdefault(key, now)
            if now - since < DETAIL_DELAY_SECONDS:
                return since + DETAIL_DELAY_SECONDS - now
        with self._lock:
            self._detail_since.pop(key, None)
        # A merge patch keeps keys it does not name: name the ones to remove, with null.
        patch: dict[str, Any] = {**{k: None for k in old if k not in status}, **status}
        with self._lock:
            self._written[key] = status  # before the write: its watch event may come before the reply
        written = self.kube.patch_ftj_status(meta["namespace"], meta["name"], patch)
        with self._lock:
            self._written[key] = written.get("status") or {}  # as the API server keeps it
        self.cache.store(written)
        detail = " ".join(str(status[k]) for k in ("reason", "phase", "progress") if status.get(k))
        log.info("status: %s %s", status.get("state"), detail, extra=_ctx(meta["namespace"], meta["name"]))
        return None

    def _event(self, obj: dict[str, Any], event: Event, *about: str) -> None:
        """Record `event`, named for the FineTuneJob's version it was derived from: a pass that derives
        it again from the same version (a retry after a crash) gets 409, and no duplicate."""
        name = event_name(obj, str(obj["metadata"].get("resourceVersion") or ""), event.reason, *about)
        try:
            message = redact(event.message)
            self.kube.event(obj, event.type, event.reason, message, format_time(self.clock()), name=name)
        except Fenced:
            raise
        except Exception as e:  # an event is best effort: never fail a reconcile over one
            log.warning("could not record event %s: %s", event.reason, describe_error(e))


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
