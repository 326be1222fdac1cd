"""Errors the trainer reports without a traceback (cheap to import)."""

from __future__ import annotations


class TrainerError(Exception):
    """A problem the user can fix (bad data, missing token, ...): reported as one clear line."""

    exit_code = 1


class SpecError(TrainerError):
    """The FineTuneJob file is missing or does not validate."""

    exit_code = 2


class DataError(TrainerError):
    """The training data cannot be used as the spec says."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run stops, to resume on the next start."""

    exit_code = 143  # 128 + SIGTERM, what Kubernetes expects of a terminated container

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
