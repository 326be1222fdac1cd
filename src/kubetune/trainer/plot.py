"""The loss curve (train and eval loss against step) as a PNG beside the model card."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

# Above this many logged train losses the raw line is drawn faint under a smoothed one.
SMOOTH_ABOVE = 60
TRAIN_COLOUR = "#1f77b4"
EVAL_COLOUR = "#d62728"


def _points(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every finite ``key`` in the log, one per step (the last logged wins: a resumed
    run logs the steps after its checkpoint again)."""
    by_step: dict[int, float] = {}
    for entry in log_history:
        value, step = entry.get(key), entry.get("step")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(step, int):
            continue
        if math.isfinite(value):
            by_step[step] = float(value)
    return sorted(by_step.items())


def _smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's exponential moving average, debiased so the start is not pulled towards 0."""
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _headless() -> None:
    """Make importing matplotlib work in a pod: no display, and a read-only HOME (matplotlib keeps its
    config and font cache there; left to itself it warns and picks a temporary folder)."""
    if "MPLCONFIGDIR" not in os.environ:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "matplotlib"
        if not _writable(config):
            os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="matplotlib-")
    os.environ.setdefault("MPLBACKEND", "Agg")


def render_loss_curve(
    log_history: list[dict[str, Any]], path: Path, *, title: str | None = None
) -> Path | None:
    """Draw the ``loss`` and ``eval_loss`` entries of a Trainer's ``log_history`` against step to a PNG
    at ``path``; None when the log has no loss at all, and then no file at ``path`` either (not the curve
    of an earlier attempt)."""
    train = _points(log_history, "loss")
    evals = _points(log_history, "eval_loss")
    if not train and not evals:
        path.unlink(missing_ok=True)
        return None
    _headless()
    # The object API with an Agg canvas: no pyplot, so no global figure state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.2, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, values = zip(*train, strict=True)
        if len(values) > SMOOTH_ABOVE:
            ax.plot(steps, values, color=TRAIN_COLOUR, alpha=0.25, linewidth=1)
            ax.plot(
                steps,
                _smoothed(list(values), 0.9),
                color=TRAIN_COLOUR,
                linewidth=2,
                label="train loss (smoothed)",
            )
        else:
            ax.plot(steps, values, color=TRAIN_COLOUR, linewidth=1.8, label="train loss")
    if evals:
        steps, values = zip(*evals, strict=True)
        best_step, best = min(evals, key=lambda p: p[1])
        # The best value in the legend, not on the plot: a label there would sit on the lines.
        label = f"eval loss (best {best:.3f} at step {best_step})"
        ax.plot(steps, values, color=EVAL_COLOUR, linewidth=1.8, marker="o", markersize=4, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # No "Software" chunk (matplotlib's version): the PNG depends on the log only.
    fig.savefig(tmp, format="png", metadata={"Software": None})
    tmp.replace(path)
    return path
