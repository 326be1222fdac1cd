"""The run's progress: ``<run folder>/progress.json`` and one structured line on stdout per update.

Fields (:class:`kubetune.contract.ProgressReport`): ``state`` (one of :data:`kubetune.contract.PHASES`),
``step``, ``total_steps``, ``loss``, ``eta_seconds``, ``tokens_per_second``, ``epoch``, ``updated_at``
(RFC 3339, UTC), ``run``, plus ``eval_loss`` once evaluated and ``message`` on failure.

The operator learns about the run from the log of rank 0 (no API access from the trainer Pod): every
update prints :func:`kubetune.contract.progress_line`, ``kubetune.io/progress {...json...}``, which
:func:`kubetune.contract.parse_progress` reads back from the log tail. Only the main process writes
either.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.contract import PHASES, Phase, progress_line
from kubetune.redact import redact

__all__ = ["PHASES", "Phase", "ProgressFile", "write_json_atomic"]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_once(path: Path, data: Any) -> Any:
    """Write ``data`` to ``path`` unless a file is there already, atomically, also on NFS (a link, which
    fails when the name exists); returns what the file holds: ``data``, or what another process wrote
    first. Raises OSError when the folder cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)
        return data
    except FileExistsError:
        return json.loads(path.read_text(encoding="utf-8"))
    finally:
        tmp.unlink(missing_ok=True)


def _finite(value: Any) -> Any:
    """NaN and infinities as ``None`` (JSON has neither; a diverged loss must not stop the run)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ProgressFile:
    """The last known progress of a run: rewritten on every update and printed as one progress line on
    stdout (both no-ops off the main process).

    ``line`` (default: when stdout is not a terminal) controls the progress line: in a Pod stdout is
    the container log the operator reads; at a terminal the progress bar shows the same."""

    def __init__(
        self, path: Path, enabled: bool = True, *, run: str | None = None, line: bool | None = None
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.line = line
        self.data: dict[str, Any] = {
            "state": "Loading",
            "step": 0,
            "total_steps": None,
            "loss": None,
            "eta_seconds": None,
            "tokens_per_second": None,
            "epoch": None,
            "updated_at": None,
            "run": run,
        }

    def update(self, state: Phase | None = None, **fields: Any) -> None:
        if state is not None:
            if state not in PHASES:
                raise ValueError(f"unknown progress state {state!r}; one of {PHASES}")
            self.data["state"] = state
        for key, value in fields.items():
            # Every text that reaches progress.json and the progress line is redacted (the message most
            # of all: it repeats an error).
            self.data[key] = redact(value) if isinstance(value, str) else _finite(value)
        self.data["updated_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if not self.enabled:
            return
        write_json_atomic(self.path, self.data)
        line = self.line if self.line is not None else not sys.stdout.isatty()
        if line:
            print(progress_line(self.data), file=sys.stdout, flush=True)
