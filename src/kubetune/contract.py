"""The wire contract between the operator, the objects it renders, the launcher and the trainer.

Everything that crosses a process or container boundary is named here once: labels, annotations,
environment variables, mount paths, exit codes, the termination message and the progress line. Cheap to
import (standard library only): the CLI, the operator and the trainer all use it.
"""

from __future__ import annotations

import json
import math
import re
from enum import IntEnum
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

# --------------------------------------------------------------------------------------------------
# Labels and annotations
# --------------------------------------------------------------------------------------------------

LABEL_JOB = "kubetune.io/finetunejob"
LABEL_RUN = "kubetune.io/run"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"
# The GitOps source of a FineTuneJob, set on it by whoever applies it (Argo CD through
# kustomize.commonAnnotations with ${ARGOCD_APP_REVISION}, a CI job): recorded in the model card.
ANNOTATION_SOURCE_COMMIT = "kubetune.io/source-commit"
ANNOTATION_SOURCE_REPO = "kubetune.io/source-repo"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "kubetune"
# The label selector of everything kubetune creates (the operator watches only these Jobs and Pods).
MANAGED_BY = f"{LABEL_MANAGED_BY}={MANAGED_BY_VALUE}"

# --------------------------------------------------------------------------------------------------
# Environment of the trainer container (set by the Job; `kubetune run --local` sets the same)
# --------------------------------------------------------------------------------------------------

ENV_SPEC = "KUBETUNE_SPEC"  # the FineTuneJob file
ENV_RUN = "KUBETUNE_RUN"  # the run name (`<name>-<spec hash>`): its outputs live in <output>/runs/<run>/
ENV_WORKDIR = "KUBETUNE_WORKDIR"  # relative paths in the spec start here (storage.mountPath)
ENV_NUM_NODES = "KUBETUNE_NUM_NODES"
ENV_GPUS_PER_NODE = "KUBETUNE_GPUS_PER_NODE"
ENV_DISTRIBUTED = "KUBETUNE_DISTRIBUTED"
ENV_MASTER_ADDR = "KUBETUNE_MASTER_ADDR"
ENV_MASTER_PORT = "KUBETUNE_MASTER_PORT"
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # where the trainer writes its termination message
ENV_GIT_COMMIT = "KUBETUNE_GIT_COMMIT"
ENV_HF_TOKEN = "HF_TOKEN"
# The prepared-data cache (kubetune.trainer.prepare; default: $KUBETUNE_WORKDIR/.cache/kubetune/prepared)
# and the number of tokenizing processes (default: one per CPU).
ENV_PREPARED_DIR = "KUBETUNE_PREPARED_DIR"
ENV_PREPARE_NUM_PROC = "KUBETUNE_PREPARE_NUM_PROC"
# Set by Kubernetes in every pod of an Indexed Job (also as the annotation): the pod's machine rank.
ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# --------------------------------------------------------------------------------------------------
# Mount paths and ports
# --------------------------------------------------------------------------------------------------

SPEC_MOUNT = "/etc/kubetune"
SPEC_FILE = "job.yaml"
SPEC_PATH = f"{SPEC_MOUNT}/{SPEC_FILE}"  # the value of $KUBETUNE_SPEC in a trainer Pod
# The defaults of storage.mountPath and output.path (the trainer image's WORKDIR is the same folder).
WORKSPACE_MOUNT = "/workspace"
DEFAULT_OUTPUT_PATH = f"{WORKSPACE_MOUNT}/output"
TERMINATION_LOG = "/dev/termination-log"  # the Kubernetes default terminationMessagePath
SHM_MOUNT = "/dev/shm"  # the memory-backed emptyDir data loaders and NCCL use
# Paths the trainer container gets from kubetune itself: no user path (storage.mountPath, output.path)
# may be one of them, lie inside one, or (for a mount) hide one.
RESERVED_PATHS: tuple[str, ...] = (SPEC_MOUNT, SHM_MOUNT, TERMINATION_LOG)
RENDEZVOUS_PORT = 29500
TRAINER_UID = 1000  # USER of the trainer image (Dockerfile)

# --------------------------------------------------------------------------------------------------
# Exit codes of the trainer, and the condition reasons they map to
# --------------------------------------------------------------------------------------------------


class Exit(IntEnum):
    OK = 0
    ERROR = 1  # unexpected: retried up to runPolicy.backoffLimit
    INVALID_SPEC = 2
    DATASET_ERROR = 3
    SECRET_MISSING = 4
    CUDA_OUT_OF_MEMORY = 5
    USER_ERROR = 6  # another problem a person must fix (model not found, Hub access refused, ...)
    PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was saved; the replacement pod resumes


# Exit codes a retry cannot fix: the Job's podFailurePolicy fails the Job at once on these.
FAIL_FAST_EXIT_CODES: tuple[int, ...] = (
    Exit.INVALID_SPEC,
    Exit.DATASET_ERROR,
    Exit.SECRET_MISSING,
    Exit.CUDA_OUT_OF_MEMORY,
    Exit.USER_ERROR,
)

REASON_BY_EXIT: dict[int, str] = {
    Exit.INVALID_SPEC: "InvalidSpec",
    Exit.DATASET_ERROR: "DatasetError",
    Exit.SECRET_MISSING: "SecretMissing",
    Exit.CUDA_OUT_OF_MEMORY: "CUDAOutOfMemory",
    Exit.USER_ERROR: "TrainerError",
}
# Reasons of the two exits REASON_BY_EXIT leaves out (the trainer writes a termination message on every
# non-zero exit): an unexpected error (Exit.ERROR, retried) and a preemption (Exit.PREEMPTED).
REASON_UNEXPECTED = "UnexpectedError"
REASON_PREEMPTED = "Preempted"
# The operator's refusal of a run that cannot fit the memory of its GPU (kubetune.plan's estimate against
# the nodes' nvidia.com/gpu.memory label or the gpuType table): nothing is created.
REASON_UNFIT = "Unfit"

# The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_MAX = 4096


def termination_message(reason: str, message: str) -> str:
    """The trainer's termination message: one JSON object the operator turns into a condition."""
    text = json.dumps({"reason": reason, "message": message})
    if len(text.encode()) <= TERMINATION_MESSAGE_MAX:
        return text
    # JSON escapes (quotes, newlines, non-ASCII as \uXXXX) make the encoded message longer than the
    # text: cut the text at the longest prefix whose encoding, with "...", still fits.
    lo, hi = 0, len(message)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(json.dumps({"reason": reason, "message": message[:mid] + "..."})) <= TERMINATION_MESSAGE_MAX:
            lo = mid
        else:
            hi = mid - 1
    return json.dumps({"reason": reason, "message": message[:lo] + "..."})


def parse_termination_message(text: str | None) -> tuple[str, str] | None:
    """(reason, message) from a termination message the trainer wrote; None for anything else (for
    example the log tail that FallbackToLogsOnError puts there)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if (
        isinstance(data, dict)
        and isinstance(data.get("reason"), str)
        and isinstance(data.get("message"), str)
    ):
        return data["reason"], data["message"]
    return None


# --------------------------------------------------------------------------------------------------
# Progress: the trainer prints one structured line per update; the operator reads rank 0's log tail
# --------------------------------------------------------------------------------------------------

Phase = Literal[
    "Loading",  # reading the spec, data and model
    "Training",
    "Evaluating",
    "Saving",  # adapter, samples, merged model, card
    "Pushing",  # to the Hub
    "Succeeded",
    "Failed",
    "Preempted",  # SIGTERM: a checkpoint was saved, the next start resumes from it
]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class ProgressReport(TypedDict, total=False):
    """`progress.json` and the progress line: what the trainer knows of its run."""

    state: Phase
    step: int
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    eta_seconds: float | None
    tokens_per_second: float | None  # non-padding tokens trained per second, all processes together
    epoch: float | None
    updated_at: str | None  # RFC 3339, UTC
    message: str | None  # on failure
    run: str | None
    # Lineage, once known: the Hub commit model.revision resolved to (every update from then on carries
    # it), and the URL of the commit the push made (on the final update).
    base_model_commit: str | None
    hub_commit_url: str | None


# A log line that starts with this, followed by the report as JSON on the same line.
PROGRESS_PREFIX = "kubetune.io/progress "
# The operator reads this many lines from the end of rank 0's log to find the newest report.
PROGRESS_TAIL_LINES = 200
PROGRESS_TAIL_BYTES = 256 * 1024


def progress_line(report: ProgressReport | dict[str, Any]) -> str:
    return PROGRESS_PREFIX + json.dumps(report, separators=(",", ":"), allow_nan=False, default=str)


def parse_progress(log_tail: str) -> ProgressReport | None:
    """The newest well-formed progress report in a log tail, or None."""
    for line in reversed(log_tail.splitlines()):
        # The container runtime may prefix lines (timestamps); the report starts at the prefix.
        at = line.find(PROGRESS_PREFIX)
        if at < 0:
            continue
        try:
            data = json.loads(line[at + len(PROGRESS_PREFIX) :])
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("state") in PHASES:
            return _clean(data)
    return None


def _clean(data: dict[str, Any]) -> ProgressReport:
    """Only fields of the right type (a log line is untrusted input)."""
    out: dict[str, Any] = {"state": data["state"]}
    for key in ("step", "total_steps"):
        v = data.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[key] = v
    for key in ("loss", "eval_loss", "eta_seconds", "tokens_per_second", "epoch"):
        v = data.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            if key in ("eta_seconds", "tokens_per_second") and v < 0:
                continue
            out[key] = float(v)
    for key in ("updated_at", "message", "run"):
        v = data.get(key)
        if isinstance(v, str):
            out[key] = v[:1000]
    commit = data.get("base_model_commit")
    if is_commit(commit):
        out["base_model_commit"] = commit
    url = data.get("hub_commit_url")
    if isinstance(url, str) and _plain_url(url):
        out["hub_commit_url"] = url
    return out  # type: ignore[return-value]


_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def is_commit(value: Any) -> bool:
    """A full git commit id as the Hub gives it (40 lowercase hex digits)."""
    return isinstance(value, str) and _COMMIT_RE.fullmatch(value) is not None


URL_MAX = 500


def _plain_url(url: str) -> bool:
    """An http(s) URL of at most URL_MAX printable ASCII characters, with a host and without credentials
    (user:password@), a query or a fragment: what a Hub commit URL looks like, and nothing that could
    carry a secret into the status."""
    if len(url) > URL_MAX or not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    return (
        parts.scheme in ("https", "http")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and not parts.query
        and not parts.fragment
    )
