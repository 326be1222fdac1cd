"""``<output>/progress.json``: the run's state, written atomically, read by the operator (and by people).

Fields: ``state``, ``step``, ``total_steps``, ``loss``, ``eta_seconds``, ``epoch``, ``updated_at`` (RFC 3339,
UTC), plus ``eval_loss`` once evaluated and ``message`` on failure. ``state`` is one of :data:`STATES`.
Only the main process writes it.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

ProgressState = Literal[
    "Loading",  # reading the spec, data and model
    "Training",
    "Evaluating",
    "Saving",  # adapter, samples, merged model, card
    "Pushing",  # to the Hub
    "Succeeded",
    "Failed",
    "Preempted",  # SIGTERM: a checkpoint was saved, the next start resumes from it
]
STATES: tuple[str, ...] = ProgressState.__args__  # type: ignore[attr-defined]


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


def format_eta(seconds: float | None) -> str:
    """``4h05m``, ``12m30s``, ``42s`` (``?`` when unknown)."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressFile:
    """The last known progress, rewritten on every update (a no-op off the main process)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.data: dict[str, Any] = {
            "state": "Loading",
            "step": 0,
            "total_steps": None,
            "loss": None,
            "eta_seconds": None,
            "epoch": None,
            "updated_at": None,
        }

    def update(self, state: ProgressState | None = None, **fields: Any) -> None:
        if state is not None:
            self.data["state"] = state
        self.data.update(fields)
        self.data["updated_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.enabled:
            write_json_atomic(self.path, self.data)
