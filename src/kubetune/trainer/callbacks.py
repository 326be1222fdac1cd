"""Trainer callbacks: progress (rich bar / one-line logs + progress.json and progress lines) and
checkpoint-on-SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from transformers import TrainerCallback

from kubetune.durations import format_duration
from kubetune.trainer.progress import ProgressFile
from kubetune.trainer.resume import PreemptionFlag

log = logging.getLogger("kubetune.trainer")


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _tokens_seen(state: Any) -> int:
    """Non-padding tokens trained on so far, all processes together (the Trainer counts them with
    ``include_num_input_tokens_seen="non_padding"``)."""
    value = getattr(state, "num_input_tokens_seen", 0)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class ProgressCallback(TrainerCallback):  # type: ignore[misc]
    """Shows step/total, loss and ETA (a rich bar on a TTY, one line per log otherwise) and keeps
    ``progress.json`` current. Quiet off the main process.

    ``tokens_per_second`` is the throughput since the previous training log: the tokens trained in
    between over the time spent inside training steps, so an evaluation or a checkpoint between two
    logs does not read as a slow GPU."""

    def __init__(self, progress: ProgressFile, *, is_main: bool, tty: bool) -> None:
        self.progress = progress
        self.is_main = is_main
        self.tty = tty
        self._bar: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._step0 = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.tokens_at_start = 0
        self.tokens_per_second: float | None = None
        self._tokens_mark = 0  # tokens seen at the previous training log
        self._step_seconds = 0.0  # time inside training steps since then
        self._step_started: float | None = None

    def eta_seconds(self, step: int, total: int) -> float | None:
        done = step - self._step0
        if done <= 0 or total <= 0:
            return None
        return (time.monotonic() - self._t0) / done * max(0, total - step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self.tokens_at_start = self._tokens_mark = _tokens_seen(state)
        self._step_seconds = 0.0
        if not self.is_main:
            return
        self.progress.update("Training", step=state.global_step, total_steps=state.max_steps)
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=state.max_steps, completed=state.global_step, loss="-"
            )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_started is not None:
            self._step_seconds += time.monotonic() - self._step_started
            self._step_started = None
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self.is_main or not logs:
            return
        loss = _num(logs.get("loss"))
        if loss is not None:
            self.loss = loss
        eval_loss = _num(logs.get("eval_loss"))
        if eval_loss is not None:
            self.eval_loss = eval_loss
        if loss is None and eval_loss is None:
            return  # the final train summary
        if loss is not None:
            self._measure_tokens(state)
        eta = self.eta_seconds(state.global_step, state.max_steps)
        fields: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "loss": self.loss,
            "eta_seconds": None if eta is None else round(eta, 1),
            "tokens_per_second": self.tokens_per_second,
            "epoch": None if state.epoch is None else round(float(state.epoch), 4),
        }
        if self.eval_loss is not None:
            fields["eval_loss"] = self.eval_loss
        self.progress.update("Training", **fields)
        if self._bar is not None:
            self._bar.update(
                self._task, completed=state.global_step, loss=f"{self.loss:.4f}" if self.loss else "-"
            )
            if eval_loss is not None:
                self._bar.console.print(f"step {state.global_step}: eval_loss {eval_loss:.4f}")
            return
        total = state.max_steps or 0
        pct = f" ({100 * state.global_step / total:.0f}%)" if total else ""
        if eval_loss is not None:
            log.info("step %d/%d%s eval_loss %.4f", state.global_step, total, pct, eval_loss)
        else:
            lr = _num(logs.get("learning_rate"))
            tps = self.tokens_per_second
            log.info(
                "step %d/%d%s loss %.4f%s epoch %.2f%s eta %s",
                state.global_step,
                total,
                pct,
                loss,
                f" lr {lr:.2e}" if lr is not None else "",
                float(state.epoch or 0.0),
                f" {tps:.0f} tokens/s" if tps is not None else "",
                format_duration(eta),
            )

    def _measure_tokens(self, state: Any) -> None:
        """Update ``tokens_per_second`` over the window since the previous training log."""
        tokens = _tokens_seen(state)
        if tokens > self._tokens_mark and self._step_seconds > 0:
            self.tokens_per_second = round((tokens - self._tokens_mark) / self._step_seconds, 1)
        self._tokens_mark = tokens
        self._step_seconds = 0.0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step)
            self._bar.stop()
            self._bar = None


class CheckpointCallback(TrainerCallback):  # type: ignore[misc]
    """Saves a checkpoint and stops when SIGTERM/SIGINT arrived, and always checkpoints the step training
    ends at, the last one or the one early stopping stops at (so the run's final weights are on disk
    before ``training-complete.json`` says training is over).

    Put it after ``EarlyStoppingCallback``: its ``on_evaluate`` then sees that early stopping asked to
    stop."""

    def __init__(self, flag: PreemptionFlag) -> None:
        self.flag = flag
        self.preempted_at: int | None = None

    def requested(self, args: Any) -> bool:
        """The flag, agreed on by every process: all must checkpoint and stop at the same step, or the
        others would wait forever in the next collective. (torchrun forwards SIGTERM to every worker, but
        they need not receive it during the same step.) Every process must call it at the same point."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.flag.requested
        flag = torch.tensor([1 if self.flag.requested else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested(args):
            control.should_save = True
            control.should_training_stop = True
            self.preempted_at = state.global_step
            log.warning("preempted: checkpointing step %d and stopping", state.global_step)
        elif state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Early stopping decided to stop at this step: save it, even between two save steps.
        if control.should_training_stop:
            control.should_save = True
