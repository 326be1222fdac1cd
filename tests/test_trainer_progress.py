"""The trainer's side of the wire contract, without the ML stack: progress lines, the termination
message, run folders and the completion marker, the signal flag, the token check."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.contract import (
    PHASES,
    PROGRESS_PREFIX,
    TERMINATION_MESSAGE_MAX,
    parse_progress,
    parse_termination_message,
    termination_message,
)
from kubetune.redact import redact
from kubetune.render import run_name as rendered_run_name
from kubetune.trainer import hub, layout
from kubetune.trainer.errors import DataError, OutOfMemory, Preempted, SecretMissing, SpecError, TrainerError
from kubetune.trainer.progress import ProgressFile
from kubetune.trainer.resume import PreemptionFlag
from kubetune.trainer.termination import write_termination_log

FAKE_TOKEN = "hf_" + "FakeProgressToken0123456789abc"


def job(**spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "my-tune", "namespace": "team-a"},
            "spec": {"model": {"id": "org/base"}, "dataset": {"id": "org/data"}, **spec},
        }
    )


# --------------------------------------------------------------------------------------------------
# Progress lines: what the trainer prints is what the operator reads back
# --------------------------------------------------------------------------------------------------


def test_progress_lines_round_trip_through_the_operator_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = ProgressFile(tmp_path / "progress.json", run="my-tune-0123abcd", line=True)
    progress.update("Loading")
    progress.update("Training", step=0, total_steps=40)
    progress.update(step=10, loss=1.25, eta_seconds=30.0, tokens_per_second=2048.5, epoch=0.25)
    progress.update("Training", step=20, loss=math.nan, eval_loss=math.inf)  # a diverged loss: null
    progress.update("Failed", eta_seconds=None, message=f"boom\nwith {FAKE_TOKEN} inside")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 5 and all(line.startswith(PROGRESS_PREFIX) for line in lines)

    reports = [parse_progress(line) for line in lines]
    assert [r["state"] if r else None for r in reports] == [
        "Loading",
        "Training",
        "Training",
        "Training",
        "Failed",
    ]
    assert reports[2] is not None and reports[2]["step"] == 10 and reports[2]["loss"] == 1.25
    assert reports[2]["tokens_per_second"] == 2048.5
    assert reports[2]["run"] == "my-tune-0123abcd" and str(reports[2].get("updated_at")).endswith("Z")
    assert reports[3] is not None and "loss" not in reports[3] and "eval_loss" not in reports[3]
    # The newest line wins, also behind a runtime's timestamp prefix and among other log lines.
    tail = "\n".join(f"2026-01-01T00:00:00.0Z stdout F {line}" for line in lines) + "\n[kubetune] done\n"
    last = parse_progress(tail)
    assert last == reports[-1]
    assert last is not None and last["message"] == "boom\nwith hf_*** inside"
    # progress.json holds the same report (nulls included).
    on_disk = json.loads((tmp_path / "progress.json").read_text())
    assert {k: v for k, v in on_disk.items() if v is not None} == last


def test_progress_parser_keeps_only_well_typed_fields() -> None:
    """A log line is untrusted input: a field of the wrong type, negative or non-finite is left out."""
    line = PROGRESS_PREFIX + json.dumps(
        {
            "state": "Training",
            "step": True,
            "total_steps": -1,
            "loss": "1.0",
            "eta_seconds": -5,
            "tokens_per_second": 1e400,  # json.dumps writes Infinity
            "epoch": 0.5,
            "run": 7,
        }
    )
    assert parse_progress(line) == {"state": "Training", "epoch": 0.5}
    line = PROGRESS_PREFIX + json.dumps({"state": "Training", "tokens_per_second": 12, "eta_seconds": 0})
    report = parse_progress(line)
    assert report == {"state": "Training", "tokens_per_second": 12.0, "eta_seconds": 0.0}
    assert report is not None and isinstance(report["tokens_per_second"], float)
    assert parse_progress(PROGRESS_PREFIX + json.dumps({"state": "Dancing"})) is None


def test_tokens_per_second_is_measured_over_training_steps_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tokens the Trainer counted (num_input_tokens_seen) over the time inside training steps since the
    previous training log: an evaluation or a checkpoint between two logs does not count as training."""
    pytest.importorskip("transformers")
    from kubetune.trainer import callbacks

    clock = [1000.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0, num_input_tokens_seen=500)
    cb = callbacks.ProgressCallback(ProgressFile(tmp_path / "p.json", line=True), is_main=True, tty=False)

    def step(tokens: int, seconds: float) -> None:
        cb.on_step_begin(None, state, None)
        clock[0] += seconds
        state.num_input_tokens_seen += tokens
        state.global_step += 1
        cb.on_step_end(None, state, None)

    def reported() -> float | None:
        report = parse_progress(capsys.readouterr().out)
        assert report is not None and report["step"] == state.global_step
        return report.get("tokens_per_second")

    cb.on_train_begin(None, state, None)  # resumed: 500 tokens were trained before this session
    capsys.readouterr()
    step(1000, 0.25)
    clock[0] += 30  # a checkpoint, data loading, anything outside a step
    step(1000, 0.75)
    cb.on_log(None, state, None, logs={"loss": 1.5})
    assert reported() == 2000.0 == cb.tokens_per_second
    clock[0] += 60  # an evaluation: its log keeps the last figure and starts no new window
    cb.on_log(None, state, None, logs={"eval_loss": 1.4})
    assert reported() == 2000.0
    step(300, 0.1)
    cb.on_log(None, state, None, logs={"loss": 1.2})
    assert reported() == 3000.0
    cb.on_log(None, state, None, logs={"loss": 1.1})  # no step since: the last figure stays
    assert reported() == 3000.0
    assert json.loads((tmp_path / "p.json").read_text())["tokens_per_second"] == 3000.0

    # A Trainer that counts no tokens reports no figure (rather than 0 tokens/s).
    state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0)
    cb = callbacks.ProgressCallback(ProgressFile(tmp_path / "q.json", line=True), is_main=True, tty=False)
    cb.on_train_begin(None, state, None)
    capsys.readouterr()
    step_begin = clock[0]
    cb.on_step_begin(None, state, None)
    clock[0] = step_begin + 1
    state.global_step = 1
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 2.0})
    assert reported() is None


@pytest.mark.trainer
def test_a_real_run_reports_tokens_per_second(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny model on the CPU: every training report after the first log carries a throughput."""
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    import tiny
    from kubetune.trainer import run

    model = tiny.save_tiny_model(tmp_path / "model", "llama")
    spec = tiny.write_job(
        tmp_path / "job",
        model,
        tiny.alpaca_rows(32),
        dataset={"validation": None},
        method={"type": "lora", "lora": {"r": 4, "alpha": 8}, "quantization": None},
        training={"maxSteps": 3, "saveSteps": 3, "loggingSteps": 1, "perDeviceBatchSize": 4},
        samples=None,
    )
    capsys.readouterr()
    metrics = run(spec)
    reports = [parse_progress(line) for line in capsys.readouterr().out.splitlines()]
    training = [r for r in reports if r is not None and r["state"] == "Training" and r.get("loss")]
    assert [r["step"] for r in training] == [1, 2, 3]
    assert all((r.get("tokens_per_second") or 0) > 0 for r in training), training
    # The figure counts real tokens: the run's own total agrees that tokens were counted.
    assert metrics["train_tokens"] > 0 and metrics["train_tokens_per_second"] > 0


def test_progress_line_only_on_the_main_process_and_not_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ProgressFile(tmp_path / "a.json", enabled=False, line=True).update("Training")
    assert capsys.readouterr().out == "" and not (tmp_path / "a.json").exists()
    ProgressFile(tmp_path / "b.json", line=False).update("Training")
    assert capsys.readouterr().out == "" and (tmp_path / "b.json").is_file()
    ProgressFile(tmp_path / "c.json").update("Training")  # default: stdout is not a terminal here
    assert capsys.readouterr().out.startswith(PROGRESS_PREFIX)
    with pytest.raises(ValueError, match="unknown progress state"):
        ProgressFile(tmp_path / "d.json").update("Running")  # type: ignore[arg-type]
    assert set(PHASES) >= {"Loading", "Training", "Evaluating", "Saving", "Pushing", "Succeeded"}


# --------------------------------------------------------------------------------------------------
# Exit codes and the termination message
# --------------------------------------------------------------------------------------------------


def test_errors_map_to_the_contract_exit_codes_and_reasons() -> None:
    assert (SpecError("x").exit_code, SpecError("x").reason) == (2, "InvalidSpec")
    assert (DataError("x").exit_code, DataError("x").reason) == (3, "DatasetError")
    assert (SecretMissing("x").exit_code, SecretMissing("x").reason) == (4, "SecretMissing")
    assert (OutOfMemory("x").exit_code, OutOfMemory("x").reason) == (5, "CUDAOutOfMemory")
    assert (TrainerError("x").exit_code, TrainerError("x").reason) == (6, "TrainerError")
    assert (Preempted.exit_code, Preempted.reason) == (143, "Preempted")


def test_termination_message_is_redacted_bounded_and_only_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    assert redact(f"a {FAKE_TOKEN} and plain-secret-value") == "a hf_*** and ***"

    target = tmp_path / "termination-log"
    assert write_termination_log("DatasetError", "nowhere") is None  # $KUBETUNE_TERMINATION_LOG unset
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(target))
    assert write_termination_log("DatasetError", f"column 'x' ({FAKE_TOKEN}, plain-secret-value)") == target
    assert parse_termination_message(target.read_text()) == ("DatasetError", "column 'x' (hf_***, ***)")

    # An unexpected error of another process does not overwrite the actual cause...
    assert write_termination_log("UnexpectedError", "NCCL timeout", overwrite=False) is None
    assert parse_termination_message(target.read_text()) == ("DatasetError", "column 'x' (hf_***, ***)")
    # ... and long messages (quotes, newlines, non-ASCII: JSON makes them longer) still fit.
    for text in ("é" * 5000, '"\n' * 3000, "a" * 10_000):
        write_termination_log("TrainerError", text)
        raw = target.read_bytes()
        assert len(raw) <= TERMINATION_MESSAGE_MAX
        parsed = parse_termination_message(raw.decode())
        assert parsed is not None and text.startswith(parsed[1].removesuffix("..."))
    assert json.loads(termination_message("R", "short")) == {"reason": "R", "message": "short"}


# --------------------------------------------------------------------------------------------------
# Run folders and the completion marker
# --------------------------------------------------------------------------------------------------


def test_run_name_is_the_operators_unless_the_job_sets_it(tmp_path: Path) -> None:
    j = job()
    assert layout.run_name(j, env={}) == rendered_run_name(j)
    assert layout.run_name(j, env={}).startswith("my-tune-")
    assert layout.run_name(j, env={"KUBETUNE_RUN": "my-tune-cafe0123"}) == "my-tune-cafe0123"
    # A spec edit is another run; runPolicy (and writing a default explicitly) is not.
    edited = job(training={"learningRate": 1e-3})
    assert layout.run_name(edited, env={}) != layout.run_name(j, env={})
    assert layout.run_name(job(runPolicy={"suspend": True}), env={}) == layout.run_name(j, env={})
    for bad in ("../escape", "a/b", ".."):
        with pytest.raises(SpecError, match="KUBETUNE_RUN"):
            layout.run_name(j, env={"KUBETUNE_RUN": bad})
    assert layout.run_dir(tmp_path, "r-1") == tmp_path / "runs" / "r-1"


def test_completion_marker_round_trip(tmp_path: Path) -> None:
    assert layout.read_completion(tmp_path) is None
    done = layout.Completion.new(
        step=12,
        max_steps=40,
        epoch=0.123456,
        reason="early_stopping",
        final_checkpoint=tmp_path / "checkpoints" / "checkpoint-12",
        best_checkpoint="/elsewhere/checkpoints/checkpoint-8",
    )
    layout.write_completion(tmp_path, done)
    assert [p.name for p in tmp_path.iterdir()] == ["training-complete.json"]  # no temporary left
    back = layout.read_completion(tmp_path)
    assert back == done and back.best_checkpoint == "checkpoint-8" and back.epoch == 0.1235
    (tmp_path / "training-complete.json").write_text('{"step": 1')  # torn: not a marker
    assert layout.read_completion(tmp_path) is None


# --------------------------------------------------------------------------------------------------
# Signals and the token check
# --------------------------------------------------------------------------------------------------


def test_preemption_flag_handles_sigint_like_sigterm_and_twice_interrupts() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # a second, different signal: still just the flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: stop now
    finally:
        flag.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    flag = PreemptionFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # Kubernetes sends one; a second changes nothing
        assert flag.requested and flag.signal_name == "SIGTERM"
    finally:
        flag.uninstall()


def test_hub_output_without_a_token_fails_fast_naming_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert hub.require_token(job(), local=False) is None  # no output.hub: no token needed
    pushing = job(output={"hub": {"repoId": "org/out", "token": {"secretKeyRef": {"name": "hf-write"}}}})
    with pytest.raises(SecretMissing) as missing:
        hub.require_token(pushing, local=False)
    message = str(missing.value)
    assert (
        "spec.output.hub.token.secretKeyRef: Secret 'hf-write', key 'token', in namespace 'team-a'" in message
    )
    assert "kubectl create secret generic hf-write -n team-a --from-literal=token=<" in message
    monkeypatch.setenv("HF_TOKEN", "  ")  # an empty Secret value is no token either
    with pytest.raises(SecretMissing):
        hub.require_token(pushing, local=True)

    # Locally, the token of `hf auth login` counts; in the cluster only $HF_TOKEN does.
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_" + "LoginToken0123456789abcdef")
    assert hub.require_token(pushing, local=True) == "hf_" + "LoginToken0123456789abcdef"
    with pytest.raises(SecretMissing):
        hub.require_token(pushing, local=False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert hub.require_token(pushing, local=False) == FAKE_TOKEN
