"""The kubetune trainer: the container entrypoint that fine-tunes a model from a FineTuneJob spec.

Started as ``accelerate launch -m kubetune.trainer --spec /etc/kubetune/job.yaml`` in the trainer Pods,
or through :func:`run` by ``kubetune run --local``. Importing this package is cheap: torch, transformers
and the rest are imported when a run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.trainer.errors import (
    DataError,
    OutOfMemory,
    Preempted,
    SecretMissing,
    SpecError,
    TrainerError,
)

__all__ = ["DataError", "OutOfMemory", "Preempted", "SecretMissing", "SpecError", "TrainerError", "run"]


def run(spec_path: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune as the FineTuneJob file at ``spec_path`` says and return the final metrics.

    ``output_dir`` overrides ``spec.output.path``; the run writes into ``<output>/runs/<run>/`` (see
    :mod:`kubetune.trainer.layout`). Relative paths in the spec (``model.path``, ``dataset.files``,
    ``output.path``) are relative to the spec file's folder. Raises :class:`SpecError` for a bad spec,
    :class:`DataError`, :class:`SecretMissing`, :class:`OutOfMemory` and :class:`TrainerError` for other
    problems the user can fix, and :class:`Preempted` when SIGTERM or SIGINT stopped training (after
    saving a checkpoint).
    """
    from kubetune.trainer.train import run as _run

    return _run(spec_path, output_dir)
