"""Where a run keeps its files, and the marker that says its training is over (cheap to import).

Every run owns one folder, so an edited spec never picks up another spec's checkpoints::

    <output>/runs/<run>/
        checkpoints/checkpoint-N/   Trainer checkpoints (a restart of the same run resumes from the newest)
        training-complete.json      written once training ended (not preempted): a rerun does not train
        adapter/                    the LoRA adapter, tokenizer (chat template), README.md, loss.png
                                    (full: model/)
        merged/                     base + adapter merged, with its own README.md and loss.png
                                    (output.merged)
        README.md  loss.png         the model card and its loss curve
        metrics.json  samples.json  progress.json
        base-model.json  datasets.json   the commits (and local digests) every process and restart uses
        tensorboard/  mlruns/  wandb/   experiment trackers (training.reportTo)

``<run>`` is ``$KUBETUNE_RUN`` (set by the Job) or, outside a cluster, :func:`kubetune.render.run_name`:
``<name>-<first 8 of the spec hash>``, the same name the operator gives the run's Job. Caches (``HF_HOME``,
the datasets cache) are not in the run folder: runs share them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import ENV_RUN
from kubetune.trainer.errors import SpecError

RUNS_DIR = "runs"
COMPLETE_MARKER = "training-complete.json"
# A run name is one path component: a Kubernetes name (what render.run_name gives) is always one.
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")

CompletionReason = Literal["max_steps", "epochs", "early_stopping"]


def run_name(job: FineTuneJob, env: Mapping[str, str] = os.environ) -> str:
    """``$KUBETUNE_RUN``, else the name the operator gives this spec's run."""
    name = env.get(ENV_RUN, "").strip()
    if not name:
        from kubetune.render import run_name as rendered_run_name

        return rendered_run_name(job)
    if not _RUN_NAME_RE.match(name) or name in (".", ".."):
        raise SpecError(f"${ENV_RUN}={name!r} is not a run name (letters, digits, '.', '_', '-')")
    return name


def run_dir(output: Path, run: str) -> Path:
    return output / RUNS_DIR / run


@dataclass(frozen=True)
class Completion:
    """The contents of ``training-complete.json``."""

    step: int
    max_steps: int
    epoch: float
    reason: CompletionReason
    final_checkpoint: str  # folder name under checkpoints/, e.g. "checkpoint-40"
    best_checkpoint: str | None  # idem, when the run keeps the best model (validation)
    finished_at: str

    @classmethod
    def new(
        cls,
        *,
        step: int,
        max_steps: int,
        epoch: float,
        reason: CompletionReason,
        final_checkpoint: Path,
        best_checkpoint: str | Path | None,
    ) -> Completion:
        return cls(
            step=step,
            max_steps=max_steps,
            epoch=round(epoch, 4),
            reason=reason,
            final_checkpoint=final_checkpoint.name,
            best_checkpoint=Path(best_checkpoint).name if best_checkpoint else None,
            finished_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_completion(run: Path, completion: Completion) -> None:
    from kubetune.trainer.progress import write_json_atomic

    write_json_atomic(run / COMPLETE_MARKER, completion.as_dict())


def read_completion(run: Path) -> Completion | None:
    """The marker, or ``None`` when there is none (or it cannot be read: then training is not known to
    be over, and the newest checkpoint decides)."""
    try:
        data = json.loads((run / COMPLETE_MARKER).read_text(encoding="utf-8"))
        return Completion(
            step=int(data["step"]),
            max_steps=int(data["max_steps"]),
            epoch=float(data["epoch"]),
            reason=data["reason"],
            final_checkpoint=str(data["final_checkpoint"]),
            best_checkpoint=str(data["best_checkpoint"]) if data.get("best_checkpoint") else None,
            finished_at=str(data.get("finished_at", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
