"""The real trainer stack (torch, bitsandbytes 4-bit, peft, TRL) on tiny random-weight models, on the CPU.

The models are built from configs (tests/tiny.py): nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from kubetune.contract import PROGRESS_PREFIX, parse_progress, parse_termination_message  # noqa: E402
from kubetune.trainer import run  # noqa: E402
from kubetune.trainer.errors import Preempted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_" + "FakeTestToken0123456789abcdef"  # looks like a real one, for leak checks

# Decoder linear layers of the tiny models (2 layers each), all 4-bit under QLoRA.
LINEAR_PER_ARCH = {"llama": 2 * 7, "falcon": 2 * 4, "bloom": 2 * 4}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: tiny.save_tiny_model(root / arch, arch) for arch in tiny.ARCHITECTURES}


def logged_losses(checkpoint: Path) -> list[tuple[int, float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]


# --------------------------------------------------------------------------------------------------
# The translations build the real objects
# --------------------------------------------------------------------------------------------------


def test_translations_are_accepted_by_the_libraries(tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune.trainer import config as cfg

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "recipe"},
            "spec": {
                "model": {"id": "tiiuae/falcon-7b"},
                "dataset": {"id": "timdettmers/openassistant-guanaco"},
            },
        }
    )
    bnb = BitsAndBytesConfig(**cfg.bnb_config_kwargs(job.spec))  # type: ignore[arg-type]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    lora = LoraConfig(**cfg.lora_config_kwargs(job.spec, "falcon"))  # type: ignore[arg-type]
    assert lora.r == 64 and lora.lora_alpha == 16 and lora.lora_dropout == 0.1
    args = SFTConfig(**cfg.sft_config_kwargs(job.spec, str(tmp_path), has_eval=True, hw=cfg.Hardware.cpu()))
    assert args.optim == "paged_adamw_32bit" and args.max_grad_norm == 0.3
    assert args.warmup_steps == 0.03 and args.lr_scheduler_type == "constant"
    assert args.train_sampling_strategy == "group_by_length" and args.activation_checkpointing
    assert args.max_steps == 500 and args.max_length == 512
    assert not args.bf16 and not args.fp16  # CPU: no mixed precision


# --------------------------------------------------------------------------------------------------
# 4-bit QLoRA on tiny Llama, Falcon and BLOOM
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_qlora_trains_saves_and_reloads(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer import config as cfg
    from kubetune.trainer.modeling import load_model
    from kubetune.trainer.spec import load_job

    job_file = tiny.write_job(tmp_path, tiny_models[arch])

    # The base really is 4-bit: every decoder linear layer is a bitsandbytes Linear4bit.
    spec = load_job(job_file).spec
    model = load_model(spec, tmp_path, cfg.Hardware.cpu())
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert len(four_bit) == LINEAR_PER_ARCH[arch]
    assert plain == ["lm_head"]
    del model

    metrics = run(job_file)
    out = tiny.run_folder(job_file)
    assert out.parent == tmp_path / "out" / "runs" and out.name.startswith("t-")
    assert metrics["steps"] == 40 and metrics["quantized_layers"] == LINEAR_PER_ARCH[arch]
    assert metrics["data"]["kept"] == 200 and metrics["data"]["validation_rows"] == 20
    assert 0 < metrics["eval_loss"] < 20 and metrics["perplexity"] > 1

    # The loss goes down: mean of the first five logged losses vs the last five.
    losses = [loss for _, loss in logged_losses(out / "checkpoints" / "checkpoint-40")]
    assert len(losses) == 21  # step 1, then every 2 steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses

    # The adapter reloads on a freshly loaded base and changes its outputs; the tokenizer keeps its template.
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.chat_template == tiny.CHAT_TEMPLATE
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    ids = tokenizer("### Instruction:\nReverse the word.\n\n### Input:\napple", return_tensors="pt")
    with torch.no_grad():
        tuned_logits = tuned(**ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(**ids).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)
    generated = tuned.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)

    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["What is the capital of Peru?"]
    assert isinstance(samples[0]["completion"], str)


# --------------------------------------------------------------------------------------------------
# Other formats and methods, through the same entry point
# --------------------------------------------------------------------------------------------------


def test_chat_format_with_lora(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["instruction"] + " " + r["input"]},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in tiny.alpaca_rows(64)
    ]
    job = tiny.write_job(
        tmp_path,
        tiny_models["llama"],
        rows,
        dataset={"format": "chat", "validation": None},
        method={"type": "lora", "lora": {"r": 8, "alpha": 16}, "quantization": None},
        training={"maxSteps": 4, "saveSteps": 4, "loggingSteps": 1},
    )
    metrics = run(job)
    assert metrics["steps"] == 4 and metrics["quantized_layers"] == 0 and "eval_loss" not in metrics
    assert (tiny.run_folder(job) / "adapter/adapter_config.json").is_file()


def test_text_format_packed_full_finetune(tiny_models: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    rows = [{"text": f"{r['instruction']} {r['input']} -> {r['output']}"} for r in tiny.alpaca_rows(64)]
    job = tiny.write_job(
        tmp_path,
        tiny_models["bloom"],
        rows,
        dataset={"format": "text", "validation": None},
        method={"type": "full", "lora": None, "quantization": None},
        training={"maxSteps": 3, "saveSteps": 3, "loggingSteps": 1, "blockSize": 32, "maxSeqLength": 64},
    )
    metrics = run(job)
    assert metrics["steps"] == 3 and metrics["trainable_parameters"] == metrics["total_parameters"]
    assert (tiny.run_folder(job) / "model/model.safetensors").is_file()
    assert not (tiny.run_folder(job) / "adapter").exists()
    assert "packed 64 rows into" in capsys.readouterr().out


def checkpoint_states(folder: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in (folder / "checkpoints").glob("*/trainer_state.json")}


def finished_rerun(job: Path, capsys: Any) -> tuple[dict[str, Any], str]:
    """Run a finished run again, with its card, adapter and metrics deleted; check it did no training."""
    folder = tiny.run_folder(job)
    checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
    states = checkpoint_states(folder)
    marker = (folder / "training-complete.json").read_bytes()
    for name in ("README.md", "metrics.json", "samples.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "adapter")
    capsys.readouterr()
    metrics = run(job)
    log = capsys.readouterr().out
    assert "training already complete at step" in log and "not training again" in log
    # No training step logged (the evaluation of the loaded weights logs an eval_loss line).
    assert not [line for line in log.splitlines() if line.startswith("[kubetune] step ") and " loss " in line]
    # No optimizer step: no new checkpoint, the ones there unchanged, the marker as it was.
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == checkpoints
    assert checkpoint_states(folder) == states
    assert (folder / "training-complete.json").read_bytes() == marker
    # Saved, carded and reported again.
    for name in ("README.md", "metrics.json", "samples.json", "adapter/adapter_model.safetensors"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    assert json.loads((folder / "progress.json").read_text())["state"] == "Succeeded"
    return metrics, log


def test_early_stopping_keeps_the_best_adapter_and_never_trains_again(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    # A learning rate far too high makes the validation loss stop improving within a few evaluations.
    job = tiny.write_job(
        tmp_path,
        tiny_models["llama"],
        training={
            "learningRate": 0.3,
            "maxSteps": 40,
            "loggingSteps": 2,
            "evalSteps": 2,
            "saveSteps": 2,
            "earlyStoppingPatience": 1,
        },
        samples={"prompts": []},
    )
    metrics = run(job)
    folder = tiny.run_folder(job)
    assert metrics["steps"] < 40 and metrics["completion_reason"] == "early_stopping"
    state = json.loads((folder / f"checkpoints/checkpoint-{metrics['steps']}/trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert evals[-1] > min(evals)  # it stopped because the last evaluation was no better
    assert metrics["eval_loss"] == pytest.approx(min(evals), abs=1e-3)  # and kept the best adapter
    marker = json.loads((folder / "training-complete.json").read_text())
    assert marker["reason"] == "early_stopping" and marker["step"] == metrics["steps"]
    assert marker["final_checkpoint"] == f"checkpoint-{metrics['steps']}"
    assert marker["best_checkpoint"] is not None and marker["best_checkpoint"] != marker["final_checkpoint"]

    # Started again (a pod restart, a retry after a failed push): the old `global_step >= max_steps`
    # test says "not finished", but the marker does: no training, the best weights, the same eval loss.
    again, log = finished_rerun(job, capsys)
    assert "loading the best weights of " + marker["best_checkpoint"] in log
    assert again["steps"] == metrics["steps"] and again["completion_reason"] == "early_stopping"
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Preemption and resume
# --------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_and_the_rerun_resumes(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    job = tiny.write_job(
        tmp_path,
        tiny_models["llama"],
        training={"maxSteps": 60, "saveSteps": 10, "loggingSteps": 1},
        samples={"prompts": []},
    )
    out = tiny.run_folder(job)
    termination_log = tmp_path / "termination-log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "KUBETUNE_TERMINATION_LOG": str(termination_log),
    }
    env.pop("KUBETUNE_RUN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.trainer", "--spec", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    first = out / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == Preempted.exit_code == 143, output
    assert "SIGTERM received" in output
    assert f"run {out.name}: writing to {out}" in output

    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "Preempted" and progress["run"] == out.name
    assert parse_progress(output) == {k: v for k, v in progress.items() if v is not None}
    stopped = progress["step"]
    assert 10 <= stopped < 60
    assert parse_termination_message(termination_log.read_text()) == (
        "Preempted",
        f"preempted (SIGTERM) at step {stopped}/60; checkpoint saved, the next start resumes from it",
    )
    saved = out / "checkpoints" / f"checkpoint-{stopped}"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == stopped
    assert not (out / "adapter").exists()  # training did not finish
    assert not (out / "training-complete.json").exists()

    capsys.readouterr()
    metrics = run(job)
    log = capsys.readouterr().out
    assert f"resuming from step {stopped}" in log
    steps_run = [int(line.split()[2].split("/")[0]) for line in log.splitlines() if " loss " in line]
    assert steps_run[0] == stopped + 1 and steps_run[-1] == 60  # no step is done twice
    assert metrics["steps"] == 60 and metrics["resumed_from_step"] == stopped
    history = [step for step, _ in logged_losses(out / "checkpoints" / "checkpoint-60")]
    assert history == sorted(set(history)) and history[-1] == 60
    assert json.loads((out / "progress.json").read_text())["state"] == "Succeeded"
    marker = json.loads((out / "training-complete.json").read_text())
    assert marker["reason"] == "max_steps" and marker["step"] == 60 and marker["best_checkpoint"] is None

    # A finished run started again does not train again.
    again, log = finished_rerun(job, capsys)
    assert "loading the final weights of checkpoint-60" in log
    assert again["resumed_from_step"] == 60 and again["steps"] == 60
    assert again["train_loss_last"] == metrics["train_loss_last"]


# --------------------------------------------------------------------------------------------------
# The example job, the model card, progress lines and secrets
# --------------------------------------------------------------------------------------------------


def test_tiny_local_job_card_and_no_token_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("KUBETUNE_GIT_COMMIT", "deadbeef")
    monkeypatch.delenv("KUBETUNE_RUN", raising=False)
    root = tmp_path / "out"
    metrics = run(ROOT / "jobs/tiny-local.yaml", root)  # its wall time is measured in bench/tiny_run.py
    out = tiny.run_folder(ROOT / "jobs/tiny-local.yaml", root)
    assert [p.name for p in root.iterdir()] == ["runs"] and out.name.startswith("tiny-local-")
    assert metrics["steps"] == 40 and metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["run"] == out.name
    data = dict(metrics["data"])
    [source] = data.pop("sources")
    assert data == {
        "rows_read": 228,
        "empty_dropped": 3,
        "duplicates_dropped": 5,
        "kept": 220,
        "train_rows": 198,
        "validation_rows": 22,
    }
    assert (source["name"], source["format"], source["train_on"], source["kept"], source["train_rows"]) == (
        "data.jsonl",
        "alpaca",
        "completion",
        220,
        198,
    )
    for name in (
        "README.md",
        "metrics.json",
        "samples.json",
        "progress.json",
        "adapter/README.md",
        "training-complete.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "progress.json").read_text())["state"] == "Succeeded"
    assert len(json.loads((out / "samples.json").read_text())) == 2

    # Progress went out as log lines the operator can read back, in order, from the main process.
    stdout = capsys.readouterr().out
    lines = [line for line in stdout.splitlines() if line.startswith(PROGRESS_PREFIX)]
    reports = [parse_progress(line) for line in lines]
    assert all(r is not None and r["run"] == out.name for r in reports)
    states = [r["state"] for r in reports if r is not None]
    assert states[0] == "Loading" and states[-1] == "Succeeded"
    assert [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s] == [
        "Loading",
        "Training",
        "Evaluating",
        "Saving",
        "Succeeded",
    ]
    last = parse_progress(stdout)
    assert last is not None and last["step"] == 40 and last["total_steps"] == 40
    assert last == {k: v for k, v in json.loads((out / "progress.json").read_text()).items() if v is not None}

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "path: tiny/llama" in card and "format: alpaca" in card and "maxSteps: 40" in card  # the spec
    assert "metadata" not in card.split("## Training spec")[1].split("## Software")[0]
    assert f"| train_loss_last | {metrics['train_loss_last']:.4g} |" in card
    assert f"| run | {out.name} |" in card
    assert "deadbeef" in card and "bitsandbytes" in card and "trl" in card
    assert "What is the capital of France?" in card
    # Lineage: the exact bytes trained on.
    digest = hashlib.sha256((ROOT / "jobs/tiny/data.jsonl").read_bytes()).hexdigest()
    assert metrics["lineage"]["datasets"] == [{"files": {"tiny/data.jsonl": digest}}]
    assert f"(sha256 `{digest}`)" in card

    token = FAKE_TOKEN.encode()
    leaked = [str(p) for p in root.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert leaked == [] and token not in stdout.encode()
