"""Errors the trainer reports without a traceback, with their exit codes (cheap to import).

Each maps to one of :class:`kubetune.contract.Exit` and to the ``reason`` of the termination message the
operator turns into the FineTuneJob's Failed condition.
"""

from __future__ import annotations

from kubetune.contract import ENV_HF_TOKEN, REASON_BY_EXIT, REASON_PREEMPTED, Exit


class TrainerError(Exception):
    """A problem a person must fix (model not found, Hub access refused, ...): reported as one clear
    line. Subclasses narrow the exit code."""

    exit_code: int = Exit.USER_ERROR

    @property
    def reason(self) -> str:
        return REASON_BY_EXIT[self.exit_code]


class SpecError(TrainerError):
    """The FineTuneJob file is missing or does not validate."""

    exit_code = Exit.INVALID_SPEC


class DataError(TrainerError):
    """The training data cannot be used as the spec says (a missing column, nothing left after
    cleaning, a file that is not there)."""

    exit_code = Exit.DATASET_ERROR


class SecretMissing(TrainerError):
    """The spec needs a Hugging Face token (``output.hub``) and none is available."""

    exit_code = Exit.SECRET_MISSING


class OutOfMemory(TrainerError):
    """CUDA ran out of memory; the message names the knobs that lower memory use."""

    exit_code = Exit.CUDA_OUT_OF_MEMORY


def hub_not_found(
    exc: BaseException, error: type[TrainerError], *, where: str, what: str, repo_id: str, revision: str
) -> TrainerError | None:
    """The error to stop a run with when the Hub says ``repo_id`` or its ``revision`` does not exist (a
    load would fail on it too, later and less clearly), naming ``<where>.id`` / ``<where>.revision``;
    None for any other failure (offline, a mirror without the API), which is only a warning."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return error(f"{where}.revision: {revision!r} is not a revision of {repo_id}")
    if isinstance(exc, RepositoryNotFoundError):  # gated repositories too
        return error(
            f"{where}.id: the Hub has no {what} {repo_id!r} this token may read (a private or gated one "
            f"needs an {ENV_HF_TOKEN} with access)"
        )
    return None


class Preempted(Exception):
    """SIGTERM (or SIGINT) arrived: a checkpoint was saved and the run stops, to resume on the next
    start."""

    exit_code: int = Exit.PREEMPTED  # 128 + SIGTERM, what Kubernetes expects of a terminated container
    reason = REASON_PREEMPTED

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
