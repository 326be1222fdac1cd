"""Spec → BitsAndBytesConfig / LoraConfig / SFTConfig translations (pure: no model, no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from kubetune.durations import format_duration
from kubetune.trainer import config as cfg
from kubetune.trainer.card import check_no_secrets, render_card, spec_yaml
from kubetune.trainer.progress import ProgressFile
from kubetune.trainer.resume import find_resume_checkpoint

GPU_BF16 = cfg.Hardware(cuda=True, bf16_supported=True)
GPU_FP16 = cfg.Hardware(cuda=True, bf16_supported=False)
CPU = cfg.Hardware.cpu()


def make_spec(**overrides: Any) -> FineTuneJobSpec:
    """A spec with the recipe defaults; ``overrides`` are wire-format (camelCase) top-level sections."""
    spec: dict[str, Any] = {
        "model": {"id": "tiiuae/falcon-7b"},
        "dataset": {"id": "timdettmers/openassistant-guanaco"},
    }
    spec.update(overrides)
    job = FineTuneJob.model_validate(
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": spec}
    )
    return job.spec


# --------------------------------------------------------------------------------------------------
# The classic QLoRA recipe (defaults)
# --------------------------------------------------------------------------------------------------


def test_recipe_quantization() -> None:
    assert cfg.bnb_config_kwargs(make_spec()) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }


def test_recipe_lora() -> None:
    kw = cfg.lora_config_kwargs(make_spec(), "falcon")
    assert kw == {
        "r": 64,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "bias": "none",
        "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        "task_type": "CAUSAL_LM",
    }


def test_recipe_training_arguments() -> None:
    kw = cfg.sft_config_kwargs(make_spec(), "/out/checkpoints", has_eval=False, hw=GPU_BF16)
    expected = {
        "output_dir": "/out/checkpoints",
        "optim": "paged_adamw_32bit",
        "max_grad_norm": 0.3,
        "warmup_steps": 0.03,  # transformers 5: a float < 1 is a ratio
        "lr_scheduler_type": "constant",
        "train_sampling_strategy": "group_by_length",
        "activation_checkpointing": True,
        "max_steps": 500,
        "max_length": 512,
        "learning_rate": 2e-4,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "weight_decay": 0.001,
        "bf16": True,
        "fp16": False,
        "seed": 42,
        "logging_steps": 10,
        "save_steps": 100,
        "save_total_limit": 2,
        "report_to": "none",
        "eval_strategy": "no",
        "packing": False,
        "padding_free": False,
        "use_cpu": False,
    }
    assert {k: kw[k] for k in expected} == expected
    assert "warmup_ratio" not in kw and "group_by_length" not in kw and "gradient_checkpointing" not in kw
    assert "load_best_model_at_end" not in kw


@pytest.mark.parametrize(
    ("mixed", "hw", "bf16", "fp16"),
    [
        ("auto", GPU_BF16, True, False),
        ("auto", GPU_FP16, False, True),
        ("auto", CPU, False, False),
        ("fp16", GPU_BF16, False, True),
        ("no", GPU_BF16, False, False),
        ("bf16", CPU, True, False),
    ],
)
def test_mixed_precision(mixed: str, hw: cfg.Hardware, bf16: bool, fp16: bool) -> None:
    kw = cfg.sft_config_kwargs(make_spec(training={"mixedPrecision": mixed}), "o", has_eval=False, hw=hw)
    assert (kw["bf16"], kw["fp16"]) == (bf16, fp16)
    assert kw["use_cpu"] is not hw.cuda


def test_changed_training_values_are_passed_through() -> None:
    spec = make_spec(
        training={
            "learningRate": 1e-5,
            "epochs": 3,
            "perDeviceBatchSize": 2,
            "gradientAccumulationSteps": 8,
            "maxSeqLength": 2048,
            "optimizer": "adamw_torch",
            "lrScheduler": "cosine",
            "warmupRatio": 0.1,
            "maxGradNorm": 1.0,
            "weightDecay": 0.0,
            "groupByLength": False,
            "gradientCheckpointing": False,
            "seed": 7,
            "loggingSteps": 1,
            "saveTotalLimit": 5,
        }
    )
    kw = cfg.sft_config_kwargs(spec, "o", has_eval=False, hw=CPU)
    assert kw["max_steps"] == -1 and kw["num_train_epochs"] == 3
    assert kw["learning_rate"] == 1e-5
    assert kw["per_device_train_batch_size"] == 2 and kw["gradient_accumulation_steps"] == 8
    assert kw["max_length"] == 2048
    assert kw["optim"] == "adamw_torch" and kw["lr_scheduler_type"] == "cosine"
    assert kw["warmup_steps"] == 0.1 and kw["max_grad_norm"] == 1.0 and kw["weight_decay"] == 0.0
    assert kw["train_sampling_strategy"] == "random"
    assert kw["activation_checkpointing"] is False and "activation_checkpointing_kwargs" not in kw
    assert kw["seed"] == 7 and kw["logging_steps"] == 1
    assert kw["save_steps"] == 10  # 10 x loggingSteps
    assert kw["save_total_limit"] == 5


def test_evaluation_and_early_stopping() -> None:
    spec = make_spec(
        dataset={"id": "d/d", "validation": {"split": "test"}},
        training={"earlyStoppingPatience": 3, "evalSteps": 30, "loggingSteps": 5},
    )
    kw = cfg.sft_config_kwargs(spec, "o", has_eval=True, hw=CPU)
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == 30
    assert kw["load_best_model_at_end"] is True
    assert kw["metric_for_best_model"] == "eval_loss" and kw["greater_is_better"] is False
    # saveSteps unset (10 x 5 = 50) is rounded up to a multiple of evalSteps for load_best_model_at_end.
    assert kw["save_steps"] == 60

    plain = cfg.sft_config_kwargs(make_spec(training={"saveSteps": 40}), "o", has_eval=True, hw=CPU)
    assert plain["eval_steps"] == 40  # evalSteps unset: at each checkpoint
    assert "load_best_model_at_end" not in plain


# --------------------------------------------------------------------------------------------------
# Methods, target modules, packing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("llama", cfg.LLAMA_TARGETS),
        ("mistral", cfg.LLAMA_TARGETS),
        ("falcon", cfg.FUSED_QKV_TARGETS),
        ("bloom", cfg.FUSED_QKV_TARGETS),
        ("gpt_neox", "all-linear"),
        (None, "all-linear"),
    ],
)
def test_auto_target_modules(model_type: str | None, expected: Any) -> None:
    kw = cfg.lora_config_kwargs(make_spec(), model_type)
    assert kw is not None and kw["target_modules"] == expected


def test_explicit_target_modules() -> None:
    spec = make_spec(method={"lora": {"targetModules": ["q_proj", "v_proj"]}})
    assert cfg.lora_config_kwargs(spec, "llama")["target_modules"] == ["q_proj", "v_proj"]  # type: ignore[index]
    spec = make_spec(method={"lora": {"targetModules": ["all-linear"]}})
    assert cfg.lora_config_kwargs(spec, "llama")["target_modules"] == "all-linear"  # type: ignore[index]


def test_lora_8bit_and_full() -> None:
    lora8 = make_spec(method={"type": "lora", "quantization": {"bits": 8}})
    assert cfg.bnb_config_kwargs(lora8) == {"load_in_8bit": True}
    assert cfg.lora_config_kwargs(lora8, "llama") is not None

    lora = make_spec(method={"type": "lora"})
    assert cfg.bnb_config_kwargs(lora) is None
    assert cfg.model_dtype(lora, GPU_BF16) == "bfloat16"
    assert cfg.model_dtype(lora, CPU) == "float32"

    full = make_spec(method={"type": "full"})
    assert cfg.bnb_config_kwargs(full) is None and cfg.lora_config_kwargs(full, "llama") is None
    assert cfg.model_dtype(full, GPU_FP16) == "float32"  # fp16 weights cannot be trained with a scaler

    qlora = make_spec(
        method={"quantization": {"computeDtype": "float32", "quantType": "fp4", "doubleQuant": False}}
    )
    assert cfg.bnb_config_kwargs(qlora) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
    }
    assert cfg.model_dtype(qlora, GPU_BF16) == "float32"


def test_fsdp_qlora_sets_quant_storage() -> None:
    kw = cfg.bnb_config_kwargs(make_spec(training={"distributed": "fsdp"}))
    assert kw is not None and kw["bnb_4bit_quant_storage"] == "bfloat16"


@pytest.mark.parametrize(
    ("training", "packing", "sampling"),
    [
        ({}, "none", "group_by_length"),  # the Guanaco recipe: padded batches of similar length
        ({"groupByLength": False}, "none", "random"),
        ({"blockSize": 512}, "wrapped", "group_by_length"),  # AutoTrain: blockSize alone means wrapped
        ({"packing": "wrapped"}, "wrapped", "group_by_length"),
        ({"packing": "bfd"}, "bfd", "random"),  # full bins: grouping them would only sort the data
    ],
)
def test_packing_sft_kwargs(training: dict[str, Any], packing: str, sampling: str) -> None:
    spec = make_spec(training={"maxSeqLength": 2048, **training})
    assert spec.training.effective_packing() == packing
    kw = cfg.sft_config_kwargs(spec, "o", has_eval=False, hw=CPU)
    # kubetune packs (kubetune.trainer.packing) and collates bfd itself: TRL neither packs nor goes
    # padding-free (it would refuse kubetune's collator), and rows are truncated to maxSeqLength.
    assert kw["max_length"] == 2048 and kw["packing"] is False and kw["padding_free"] is False
    assert kw["train_sampling_strategy"] == sampling
    assert not hasattr(cfg, "packing_block_size")


# --------------------------------------------------------------------------------------------------
# Model card, progress, resume (pure parts)
# --------------------------------------------------------------------------------------------------


def test_card_contains_spec_metrics_samples_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_GIT_COMMIT", "0123abc")
    spec = make_spec(
        output={
            "hub": {"repoId": "me/falcon-guanaco", "token": {"secretKeyRef": {"name": "hf", "key": "token"}}}
        }
    )
    card = render_card(
        spec,
        name="falcon",
        metrics={"train_loss_first": 2.5, "eval_loss": 1.25, "data": {"kept": 99}},
        samples=[{"prompt": "Hi?", "completion": "Hello."}],
        versions={"torch": "9.9"},
    )
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiiuae/falcon-7b"
    assert front["library_name"] == "peft"
    assert front["datasets"] == ["timdettmers/openassistant-guanaco"]
    assert front["license"] == "unknown"
    assert "qlora" in front["tags"]
    assert spec_yaml(spec).strip() in card
    assert "secretKeyRef" in card and "name: hf" in card  # the reference, which is fine
    assert "| eval_loss | 1.25 |" in card and "kept=99" in card
    assert "Hi?" in card and "Hello." in card
    assert "torch 9.9" in card and "0123abc" in card
    assert "metadata" not in spec_yaml(spec) and "status" not in spec_yaml(spec)


def test_card_refuses_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match="looks like a Hugging Face token"):
        check_no_secrets("a sample that says hf_" + "a" * 30)
    monkeypatch.setenv("HF_TOKEN", "not-hf-shaped-secret")
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        check_no_secrets("oops not-hf-shaped-secret")
    # A card is redacted where it is made (a sample may repeat a secret), not refused after training.
    card = render_card(
        make_spec(), name="x", metrics={}, samples=[{"prompt": "p", "completion": "not-hf-shaped-secret"}]
    )
    assert "not-hf-shaped-secret" not in card and "```text\n***\n```" in card
    check_no_secrets("nothing to see")


def test_progress_file_is_replaced_atomically(tmp_path: Path) -> None:
    p = ProgressFile(tmp_path / "progress.json")
    p.update("Training", step=3, total_steps=10, loss=1.5, eta_seconds=7.0, epoch=0.3)
    data = json.loads((tmp_path / "progress.json").read_text())
    assert data["state"] == "Training" and data["step"] == 3 and data["total_steps"] == 10
    assert data["loss"] == 1.5 and data["eta_seconds"] == 7.0 and data["epoch"] == 0.3
    assert data["updated_at"].endswith("Z")
    assert [f.name for f in tmp_path.iterdir()] == ["progress.json"]  # no temporary left behind
    ProgressFile(tmp_path / "other.json", enabled=False).update("Training")
    assert not (tmp_path / "other.json").exists()


def test_format_duration() -> None:
    assert format_duration(None) == "?"
    assert format_duration(42.4) == "42s"
    assert format_duration(750) == "12m30s"
    assert format_duration(4 * 3600 + 5 * 60) == "4h05m"


def test_find_resume_checkpoint(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "missing") == (None, [])

    def ckpt(n: int, state: str | None) -> Path:
        d = tmp_path / f"checkpoint-{n}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
        return d

    ckpt(10, json.dumps({"global_step": 10}))
    good = ckpt(20, json.dumps({"global_step": 20}))
    half = ckpt(30, None)  # killed while saving: no trainer_state.json yet
    torn = ckpt(40, '{"global_step": 4')  # killed while writing it
    (tmp_path / "checkpoint-x").mkdir()
    assert find_resume_checkpoint(tmp_path) == (good, [torn, half])


# --------------------------------------------------------------------------------------------------
# The entrypoint stays cheap and rejects bad specs with exit code 2
# --------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parent.parent / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_import_is_cheap() -> None:
    code = (
        "import sys, kubetune.trainer, kubetune.trainer.train, kubetune.trainer.config;"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'datasets', 'accelerate', 'bitsandbytes');"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"


def test_bad_spec_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "bad"},
                "spec": {
                    "model": {"path": "m"},
                    "dataset": {"files": ["d.jsonl"]},
                    "training": {"maxSteps": 0},
                },
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--spec", str(bad)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 2, proc.stderr
    assert "spec.training.maxSteps" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--spec", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


# --------------------------------------------------------------------------------------------------
# LoRA options and NEFTune
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "tied", "extra"),
    [
        ({}, False, {}),
        ({"useDora": True}, False, {"use_dora": True}),
        ({"rsLora": True}, False, {"use_rslora": True}),
        (
            {"modulesToSave": ["embed_tokens", "lm_head"]},
            False,
            {"modules_to_save": ["embed_tokens", "lm_head"]},
        ),
        # A tied model trains one copy for the embeddings and the head (peft's ensure_weight_tying).
        (
            {"modulesToSave": ["lm_head"]},
            True,
            {"modules_to_save": ["lm_head"], "ensure_weight_tying": True},
        ),
        ({"modulesToSave": ["norm"]}, True, {"modules_to_save": ["norm"]}),  # not the tied pair
        (
            {"useDora": True, "rsLora": True, "modulesToSave": ["model.embed_tokens"]},
            True,
            {
                "use_dora": True,
                "use_rslora": True,
                "modules_to_save": ["model.embed_tokens"],
                "ensure_weight_tying": True,
            },
        ),
    ],
)
def test_lora_options(lora: dict[str, Any], tied: bool, extra: dict[str, Any]) -> None:
    spec = make_spec(method={"lora": lora})
    kw = cfg.lora_config_kwargs(spec, "llama", tied_embeddings=tied)
    assert kw is not None
    base = {k: kw.pop(k) for k in ("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "task_type")}
    assert base["r"] == 64 and base["target_modules"] == cfg.LLAMA_TARGETS
    assert kw == extra


def test_lora_options_build_peft_configs() -> None:
    peft = pytest.importorskip("peft")
    spec = make_spec(method={"lora": {"useDora": True, "rsLora": True, "modulesToSave": ["lm_head"]}})
    lora = peft.LoraConfig(**cfg.lora_config_kwargs(spec, "llama", tied_embeddings=True))  # type: ignore[arg-type]
    assert lora.use_dora and lora.use_rslora and lora.ensure_weight_tying
    assert lora.modules_to_save == ["lm_head"]


def test_neftune_noise_alpha() -> None:
    off = cfg.sft_config_kwargs(make_spec(), "o", has_eval=False, hw=CPU)
    assert "neftune_noise_alpha" not in off
    on = cfg.sft_config_kwargs(make_spec(training={"neftuneNoiseAlpha": 5}), "o", has_eval=False, hw=CPU)
    assert on["neftune_noise_alpha"] == 5.0 and isinstance(on["neftune_noise_alpha"], float)
    trl = pytest.importorskip("trl")
    assert trl.SFTConfig(**{**on, "output_dir": "/tmp/o"}).neftune_noise_alpha == 5.0
