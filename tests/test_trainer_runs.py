"""Run identity, finished runs, exit codes and local signal handling, with the real trainer on tiny models.

The processes are real (``python -m kubetune.trainer``, ``kubetune run --local``) wherever the exit code
or a signal is what is tested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")

import tiny  # noqa: E402
from kubetune.contract import parse_progress, parse_termination_message  # noqa: E402
from kubetune.trainer import run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KUBETUNE = Path(sys.executable).with_name("kubetune")
HUB_OUTPUT = {"path": "out", "hub": {"repoId": "me/tiny", "token": {"secretKeyRef": {"name": "hf-token"}}}}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "llama", "llama")


def trainer_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a trainer process: no token, not in a cluster, a termination log to read."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "KUBETUNE_RUN")}
    env["PYTHONPATH"] = str(ROOT / "src")
    env["KUBETUNE_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    env["HF_HUB_OFFLINE"] = "1"
    return {**env, **extra}


def fast(**training: Any) -> dict[str, Any]:
    """A small, quick run: tiny batches, short sequences, no validation, no samples."""
    return {
        "training": {"perDeviceBatchSize": 2, "maxSeqLength": 128, "loggingSteps": 1, **training},
        "dataset": {"validation": None},
        "samples": {"prompts": []},
    }


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file()
    }


def steps_logged(log: str) -> list[int]:
    return [
        int(line.split()[2].split("/")[0])
        for line in log.splitlines()
        if " loss " in line and "step " in line
    ]


# --------------------------------------------------------------------------------------------------
# Each run owns its folder
# --------------------------------------------------------------------------------------------------


def test_spec_edit_trains_afresh_in_its_own_folder(model: Path, tmp_path: Path, capsys: Any) -> None:
    job = tiny.write_job(tmp_path, model, **fast(maxSteps=4, saveSteps=4, learningRate=3e-3))
    first = tiny.run_folder(job)
    metrics = run(job)
    assert metrics["steps"] == 4 and metrics["run"] == first.name
    assert "learningRate: 0.003" in (first / "README.md").read_text()
    before = snapshot(first)

    # The user edits the spec (a new learning rate) and keeps output.path: a new run, from step 0.
    tiny.write_job(tmp_path, model, **fast(maxSteps=4, saveSteps=4, learningRate=1e-3))
    second = tiny.run_folder(job)
    assert second != first and second.parent == first.parent == tmp_path / "out" / "runs"
    capsys.readouterr()
    edited = run(job)
    log = capsys.readouterr().out
    assert f"run {second.name}: writing to {second}" in log
    assert "resuming" not in log and "already complete" not in log
    assert steps_logged(log) == [1, 2, 3, 4]
    assert edited["resumed_from_step"] is None and edited["run"] == second.name
    # Its card claims its own spec, next to its own adapter; the old run is untouched.
    card = (second / "README.md").read_text()
    assert "learningRate: 0.001" in card and "learningRate: 0.003" not in card
    assert f"| run | {second.name} |" in card
    assert (second / "adapter/adapter_model.safetensors").read_bytes() != (
        first / "adapter/adapter_model.safetensors"
    ).read_bytes()
    assert snapshot(first) == before

    # Back to the first spec: that run is found again, finished: nothing is trained.
    tiny.write_job(tmp_path, model, **fast(maxSteps=4, saveSteps=4, learningRate=3e-3))
    assert tiny.run_folder(job) == first
    capsys.readouterr()
    run(job)
    log = capsys.readouterr().out
    assert "training already complete at step 4" in log and steps_logged(log) == []


# --------------------------------------------------------------------------------------------------
# Exit codes and termination messages, from real processes
# --------------------------------------------------------------------------------------------------


def test_bad_column_exits_3_with_a_dataset_error(model: Path, tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(20)]
    job = tiny.write_job(
        tmp_path, model, rows, dataset={"format": "text", "textField": "body", "validation": None}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--spec", str(job)],
        capture_output=True,
        text=True,
        env=trainer_env(tmp_path),
        timeout=600,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    expected = "dataset.textField: column 'body' not in dataset; columns are ['text']"
    assert f"kubetune: error: {expected}" in proc.stderr
    assert parse_termination_message((tmp_path / "termination-log").read_text()) == ("DatasetError", expected)
    report = parse_progress(proc.stdout)
    assert report is not None and report["state"] == "Failed" and report.get("message") == expected


def test_hub_output_without_a_token_exits_4_before_loading_anything(model: Path, tmp_path: Path) -> None:
    job = tiny.write_job(tmp_path, model, output=HUB_OUTPUT, **fast(maxSteps=2))
    code = (
        "import sys\n"
        "from kubetune.trainer.__main__ import main\n"
        f"code = main(['--spec', {str(job)!r}])\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    # In the cluster ($KUBETUNE_RUN set by the Job), and the Secret was not there (optional: true).
    env = trainer_env(tmp_path, KUBETUNE_RUN="t-0123abcd")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "heavy: []" in proc.stdout
    reason, message = parse_termination_message((tmp_path / "termination-log").read_text()) or ("", "")
    assert reason == "SecretMissing"
    assert "spec.output.hub.token.secretKeyRef: Secret 'hf-token', key 'token'" in message
    assert "kubectl create secret generic hf-token -n <namespace> --from-literal=token=" in message
    progress = json.loads((tmp_path / "out/runs/t-0123abcd/progress.json").read_text())
    assert progress["state"] == "Failed" and progress["run"] == "t-0123abcd"


def test_cuda_out_of_memory_exits_5_naming_the_knobs(model: Path, tmp_path: Path) -> None:
    job = tiny.write_job(tmp_path, model, **fast(maxSteps=4, perDeviceBatchSize=3, maxSeqLength=112))
    code = (
        "import runpy, sys, torch, trl\n"
        "def training_step(self, *args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
        "total capacity of 15.77 GiB')\n"
        "trl.SFTTrainer.training_step = training_step\n"
        f"sys.argv = ['kubetune.trainer', '--spec', {str(job)!r}]\n"
        "runpy.run_module('kubetune.trainer', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=trainer_env(tmp_path), timeout=600
    )
    assert proc.returncode == 5, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    reason, message = parse_termination_message((tmp_path / "termination-log").read_text()) or ("", "")
    assert reason == "CUDAOutOfMemory"
    assert message.startswith(
        "CUDA out of memory while training: CUDA out of memory. Tried to allocate 20.00"
    )
    for knob in (
        "training.perDeviceBatchSize (now 3)",
        "training.gradientAccumulationSteps (now 1)",
        "training.maxSeqLength (now 112)",
        "training.gradientCheckpointing is already on",
        "resources.gpuType (now unset)",
    ):
        assert knob in message
    report = parse_progress(proc.stdout)
    assert report is not None and report["state"] == "Failed" and report.get("message") == message


def test_out_of_memory_is_found_when_wrapped() -> None:
    from kubetune.trainer.train import find_out_of_memory

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    try:
        try:
            raise oom
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("the evaluation loop failed") from inner
    except RuntimeError as wrapped:
        assert find_out_of_memory(wrapped) is oom
    assert find_out_of_memory(RuntimeError("CUDA error: out of memory")) is not None
    assert find_out_of_memory(ValueError("a bad value")) is None


def test_checkpoint_callback_saves_the_step_early_stopping_stops_at() -> None:
    from transformers import TrainerControl

    from kubetune.trainer.callbacks import CheckpointCallback
    from kubetune.trainer.resume import PreemptionFlag

    callback, control = CheckpointCallback(PreemptionFlag()), TrainerControl()
    callback.on_evaluate(None, None, control)
    assert not control.should_save
    control.should_training_stop = True  # what EarlyStoppingCallback.on_evaluate does
    callback.on_evaluate(None, None, control)
    assert control.should_save


# --------------------------------------------------------------------------------------------------
# `kubetune run --local` and Ctrl-C
# --------------------------------------------------------------------------------------------------


def start_local_run(job: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    # Its own session, like a command in a terminal: the test's Ctrl-C goes to its process group.
    return subprocess.Popen(
        [str(KUBETUNE), "run", str(job), "--local", "--gpus", "0", "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def wait_for_step(proc: subprocess.Popen[str], folder: Path, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            progress = json.loads((folder / "progress.json").read_text())
        except (OSError, ValueError):
            progress = {}
        if progress.get("state") == "Training" and (progress.get("step") or 0) >= step:
            return int(progress["step"])
        time.sleep(0.02)
    output = proc.communicate(timeout=60)[0] if proc.poll() is not None else "(still running)"
    raise AssertionError(f"no training step {step} in time: {output[-3000:]}")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_checkpoints_and_the_same_command_resumes(model: Path, tmp_path: Path) -> None:
    job = tiny.write_job(tmp_path, model, **fast(maxSteps=30, saveSteps=100))
    out = tmp_path / "out"
    folder = tiny.run_folder(job, out)
    env = trainer_env(tmp_path)
    proc = start_local_run(job, out, env)
    wait_for_step(proc, folder, 2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, output[-3000:]
    assert "Ctrl-C again kills it at once" in output and "SIGINT received" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert f"kubetune: stopped with a checkpoint in {folder / 'checkpoints'}/checkpoint-" in output
    progress = json.loads((folder / "progress.json").read_text())
    stopped = progress["step"]
    assert progress["state"] == "Preempted" and 2 <= stopped < 30
    saved = folder / "checkpoints" / f"checkpoint-{stopped}"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == stopped
    assert not (folder / "training-complete.json").exists() and not (folder / "adapter").exists()

    # The same command again resumes at the next step and finishes.
    again = subprocess.run(
        [str(KUBETUNE), "run", str(job), "--local", "--gpus", "0", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from step {stopped}" in again.stdout, again.stdout[:3000]
    steps = steps_logged(again.stdout)
    assert steps[0] == stopped + 1 and steps[-1] == 30
    assert json.loads((folder / "metrics.json").read_text())["resumed_from_step"] == stopped
    assert (folder / "training-complete.json").is_file()


def test_a_second_ctrl_c_kills_the_trainer_at_once(model: Path, tmp_path: Path) -> None:
    job = tiny.write_job(tmp_path, model, **fast(maxSteps=500, saveSteps=1000))
    out = tmp_path / "out"
    folder = tiny.run_folder(job, out)
    proc = start_local_run(job, out, trainer_env(tmp_path))
    wait_for_step(proc, folder, 1)
    trainers = children(proc.pid) if Path("/proc/self/stat").exists() else []
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert time.monotonic() - started < 30
    assert proc.returncode == 128 + signal.SIGKILL, output[-3000:]
    assert "kubetune: killing the trainer" in output
    for pid in trainers:  # gone, not left running in the background
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
