"""Resuming: finding the last complete checkpoint, and the SIGTERM (preemption) flag."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger("kubetune.trainer")

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# transformers' just-in-time checkpoints leave this file until they are complete.
_INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"


def checkpoint_step(path: Path) -> int | None:
    """The global step of a complete checkpoint folder, ``None`` if it is not one (or is partial)."""
    m = _CHECKPOINT_RE.match(path.name)
    if m is None or not path.is_dir() or (path / _INCOMPLETE_MARKER).exists():
        return None
    # trainer_state.json is the last file the Trainer writes into a checkpoint.
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = state.get("global_step")
    return step if isinstance(step, int) else None


def find_resume_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete ``checkpoint-N`` under ``checkpoints_dir``, and the partial ones newer than it
    (left by a kill during a save)."""
    if not checkpoints_dir.is_dir():
        return None, []
    found = []
    for p in checkpoints_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    partial: list[Path] = []
    for _, p in sorted(found, reverse=True):
        if checkpoint_step(p) is not None:
            return p, partial
        partial.append(p)
    return None, partial


class PreemptionFlag:
    """Set by SIGTERM (Kubernetes' preemption/eviction notice) or SIGINT (Ctrl-C, or `kubetune run
    --local` forwarding one); the trainer then checkpoints and stops.

    The handler only sets a flag: the checkpoint is written by a callback at the end of the current
    optimizer step, in the main thread, where saving is safe. A second SIGINT raises KeyboardInterrupt
    (stop now, without a checkpoint), as Ctrl-C twice does anywhere else.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested = True
            self.signal_name = name
            log.warning("%s received: saving a checkpoint at the end of this step, then stopping", name)
        elif signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
