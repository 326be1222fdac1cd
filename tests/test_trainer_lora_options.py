"""LoRA options (modulesToSave, DoRA, rsLoRA), NEFTune and model.attnImplementation, on tiny models.

Each option is checked for what it should change: the saved adapter holds the trained module, DoRA's
magnitudes move, rsLoRA scales by alpha/sqrt(r), NEFTune's noise is added while training (and only
then), the attention kernel asked for is the one loaded, and a kernel that cannot run is refused before
any weights load.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import tiny  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJobSpec  # noqa: E402
from kubetune.trainer import config as cfg  # noqa: E402
from kubetune.trainer import modeling, packing  # noqa: E402
from kubetune.trainer.errors import TrainerError  # noqa: E402

CPU = cfg.Hardware.cpu()
GPU = cfg.Hardware(cuda=True, bf16_supported=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lora-options")
    return {arch: tiny.save_tiny_model(root / arch, arch) for arch in tiny.ARCHITECTURES}


def make_spec(
    model_path: Path, *, quantized: bool = True, lora: dict[str, Any] | None = None, **sections: Any
) -> Any:
    method: dict[str, Any] = {
        "type": "qlora" if quantized else "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
    }
    if quantized:
        method["quantization"] = {"computeDtype": "float32"}
    spec: dict[str, Any] = {
        "model": {"path": str(model_path), **sections.pop("model", {})},
        "dataset": {"files": ["/data/train.jsonl"]},
        "method": method,
        "training": {"maxSeqLength": 64, **sections.pop("training", {})},
    }
    return FineTuneJobSpec.model_validate(spec)


# --------------------------------------------------------------------------------------------------
# A real run with every LoRA option on
# --------------------------------------------------------------------------------------------------


def test_dora_rslora_modules_to_save_and_neftune_train_and_save(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QDoRA with rsLoRA, the (tied) output head trained in full and NEFTune, through `kubetune run`."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations import neftune

    from kubetune.trainer import run

    # Every call of transformers' NEFTune hook: training mode, the alpha set, the noise it added.
    calls: list[tuple[bool, float | None, float]] = []
    hook = neftune.neftune_post_forward_hook

    def spy(module: Any, inputs: Any, output: Any) -> Any:
        noisy = hook(module, inputs, output)
        noise = float((noisy - output).detach().abs().max())
        calls.append((module.training, getattr(module, "neftune_noise_alpha", None), noise))
        return noisy

    monkeypatch.setattr(neftune, "neftune_post_forward_hook", spy)
    r, alpha = 8, 16
    job = tiny.write_job(
        tmp_path,
        models["llama"],
        method={
            "type": "qlora",
            "lora": {
                "r": r,
                "alpha": alpha,
                "dropout": 0.0,
                "useDora": True,
                "rsLora": True,
                "modulesToSave": ["lm_head"],
            },
            "quantization": {"computeDtype": "float32"},
        },
        training={
            "maxSteps": 6,
            "saveSteps": 6,
            "evalSteps": 6,
            "loggingSteps": 1,
            "neftuneNoiseAlpha": 5,
        },
        # On the CPU the samples need modeling.restore_copy_dtypes in the run (also tested below).
        samples={"prompts": ["Hi"], "maxNewTokens": 4},
    )
    metrics = run(job)
    assert metrics["steps"] == 6

    # NEFTune: the hook ran on every training forward with alpha 5 and added noise of at most
    # alpha/sqrt(L*d); evaluation went through it too but added nothing.
    training = [c for c in calls if c[0]]
    assert len(training) >= 6 and all(a == 5.0 for _, a, _ in training)
    hidden = 64
    assert all(0 < noise <= 5.0 / math.sqrt(hidden) for _, _, noise in training)
    assert any(not c[0] for c in calls) and all(noise == 0 for t, _, noise in calls if not t)

    # The adapter: DoRA and rsLoRA in its config; one tied copy of the embeddings/head, trained.
    adapter = tiny.run_folder(job) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    assert config["ensure_weight_tying"] is True
    saved = load_file(adapter / "adapter_model.safetensors")
    copies = sorted(k for k in saved if "embed_tokens" in k or "lm_head" in k)
    assert copies == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert torch.equal(saved[copies[0]], saved[copies[1]])  # trained as one weight
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 2 * 7  # every adapted linear of both layers

    base = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    base_embed = base.get_input_embeddings().weight.detach().clone()
    assert not torch.allclose(saved["base_model.model.model.embed_tokens.weight"].float(), base_embed)

    # DoRA's magnitudes moved from their start (the row norms of the base weight, as peft initializes them
    # on the same 4-bit base).
    spec = make_spec(models["llama"], lora={"useDora": True, "rsLora": True})
    fresh_model = modeling.load_model(spec, models["llama"], CPU)
    fresh = get_peft_model(fresh_model, modeling.lora_config(spec, fresh_model))
    start = get_peft_model_state_dict(fresh)  # the keys of a saved adapter
    moved = [k for k, v in magnitudes.items() if not torch.allclose(v.float(), start[k].float(), atol=1e-6)]
    assert len(moved) == len(magnitudes)

    # Reloaded: rsLoRA's scale alpha/sqrt(r) (not alpha/r), the head and the embeddings one trained weight.
    tuned = PeftModel.from_pretrained(base, adapter)
    q_proj = tuned.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(alpha / math.sqrt(r))
    assert q_proj.scaling["default"] != pytest.approx(alpha / r)
    merged = tuned.merge_and_unload()
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert torch.allclose(
        merged.get_input_embeddings().weight, saved["base_model.model.model.embed_tokens.weight"].float()
    )


def test_modules_to_save_on_an_untied_head_and_a_norm(models: dict[str, Path], tmp_path: Path) -> None:
    """LoRA (unquantized) training the final norm in full: it is saved with the adapter and changed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kubetune.trainer import run

    job = tiny.write_job(
        tmp_path,
        models["llama"],
        method={
            "type": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "modulesToSave": ["model.norm"]},
            "quantization": None,
        },
        dataset={"validation": None},
        training={"maxSteps": 4, "saveSteps": 4, "loggingSteps": 1},
    )
    metrics = run(job)
    lora_params = 2 * sum(
        4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    )
    assert metrics["trainable_parameters"] == lora_params + 64  # the norm's 64 weights
    adapter = tiny.run_folder(job) / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.model.norm.weight" in saved
    base = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    assert not torch.allclose(saved["base_model.model.model.norm.weight"].float(), base.model.norm.weight)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"] and not config["use_dora"] and not config["use_rslora"]


def test_restore_copy_dtypes_lets_the_samples_run(models: dict[str, Path], tmp_path: Path) -> None:
    """TRL casts the trained copies of a quantized model to bf16; without autocast they must match the
    fp32 activations again, or the samples fail."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    spec = make_spec(models["llama"], lora={"modulesToSave": ["lm_head"]})
    tokenizer = modeling.load_tokenizer(spec, models["llama"])
    model = modeling.load_model(spec, models["llama"], CPU)
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[5, 6, 7, 8]] * 4})
    kwargs = cfg.sft_config_kwargs(spec, str(tmp_path / "ckpt"), has_eval=False, hw=CPU)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**kwargs, dataset_kwargs={"skip_prepare_dataset": True}),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=modeling.lora_config(spec, model),
    )
    head = trainer.model.base_model.model.lm_head
    assert head.modules_to_save["default"].weight.dtype == torch.bfloat16  # TRL's cast
    sample_spec = spec.model_copy(update={"samples": spec.samples.model_copy(update={"prompts": ["Hi"]})})
    with pytest.raises(RuntimeError, match="same dtype"):
        modeling.generate_samples(trainer.model, tokenizer, sample_spec, CPU)
    assert modeling.restore_copy_dtypes(trainer.model, spec, CPU) == 1  # one copy, shared by the tied pair
    assert head.modules_to_save["default"].weight.dtype == torch.float32
    embed = trainer.model.base_model.model.get_input_embeddings()
    assert embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    assert [s["prompt"] for s in modeling.generate_samples(trainer.model, tokenizer, sample_spec, CPU)] == [
        "Hi"
    ]
    # With mixed precision the trainer autocasts: TRL's bf16 copies stay.
    assert modeling.restore_copy_dtypes(trainer.model, spec, GPU) == 0


# --------------------------------------------------------------------------------------------------
# modulesToSave refused with the field and the fix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "quantized", "lora", "message"),
    [
        (
            "llama",
            False,
            {"modulesToSave": ["embed_tokenz"]},
            "'embed_tokenz' names no module of this llama model",
        ),
        (
            "llama",
            True,
            {"modulesToSave": ["o_proj"], "targetModules": ["q_proj"]},
            "bitsandbytes holds quantized",
        ),
        (
            "llama",
            False,
            {"modulesToSave": ["q_proj"], "targetModules": ["q_proj", "v_proj"]},
            "which LoRA adapts",
        ),
        (
            "llama",
            False,
            {"modulesToSave": ["mlp"]},
            "which LoRA adapts",
        ),  # all of them: a container of targets
        ("falcon", False, {"modulesToSave": ["word_embeddings"]}, "share one weight (tie_word_embeddings)"),
    ],
)
def test_modules_to_save_refused(
    arch: str, quantized: bool, lora: dict[str, Any], message: str, models: dict[str, Path]
) -> None:
    spec = make_spec(models[arch], quantized=quantized, lora=lora)
    with pytest.raises(TrainerError, match=r"method\.lora\.modulesToSave") as e:
        modeling.load_model(spec, models[arch], CPU)
    assert message in str(e.value)
    if "names no module" in message:
        # The fix lists what can be trained in full, and no quantized or adapted module.
        assert "embed_tokens" in str(e.value) and "lm_head" in str(e.value) and "q_proj" not in str(e.value)


def test_falcon_tied_head_by_its_peft_name_trains_one_copy(models: dict[str, Path]) -> None:
    from peft import get_peft_model

    spec = make_spec(models["falcon"], quantized=False, lora={"modulesToSave": ["lm_head"]})
    model = modeling.load_model(spec, models["falcon"], CPU)
    peft_model = get_peft_model(model, modeling.lora_config(spec, model))
    inner = peft_model.base_model.model
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    assert embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    assert embed.modules_to_save["default"].weight.requires_grad


# --------------------------------------------------------------------------------------------------
# model.attnImplementation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "requested", "packing_", "loaded", "layout"),
    [
        ("llama", "eager", "none", "eager", None),
        ("llama", "sdpa", "none", "sdpa", None),
        ("llama", None, "none", "sdpa", None),
        ("bloom", "eager", "none", "eager", None),
        ("llama", "eager", "bfd", "eager", "bins"),  # padding-free with the block mask, in eager attention
        ("llama", None, "bfd", "sdpa", "bins"),
        ("bloom", "eager", "bfd", "eager", "rows"),  # BLOOM cannot take padding-free batches
    ],
)
def test_attn_implementation_is_the_one_loaded(
    arch: str,
    requested: str | None,
    packing_: str,
    loaded: str,
    layout: str | None,
    models: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = make_spec(
        models[arch], quantized=False, model={"attnImplementation": requested}, training={"packing": packing_}
    )
    with caplog.at_level(logging.INFO, logger="kubetune.trainer"):
        model = modeling.load_model(spec, models[arch], CPU)
    assert model.config._attn_implementation == loaded
    collator = packing.data_collator(spec, modeling.load_tokenizer(spec, models[arch]), model)
    assert (collator.layout if collator is not None else None) == layout
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("attention", "packing bfd"))]
    if packing_ == "bfd":  # the plan's line names the kernel, and why it is that one
        assert len(said) == 1 and said[0].startswith("packing bfd")
        assert ("model.attnImplementation" in said[0] or f"({loaded})" in said[0]) == (requested is not None)
    else:
        assert said == [f"attention: {loaded}" + (" (model.attnImplementation)" if requested else "")]


def test_eager_bfd_run_trains(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from kubetune.trainer import run

    job = tiny.write_job(
        tmp_path,
        models["llama"],
        dataset={"validation": None},
        training={"packing": "bfd", "maxSteps": 3, "saveSteps": 3, "loggingSteps": 1},
    )
    body = yaml.safe_load(job.read_text())
    body["spec"]["model"]["attnImplementation"] = "eager"
    job.write_text(yaml.safe_dump(body, sort_keys=False))
    assert run(job)["steps"] == 3
    assert (
        "packing bfd: padding-free, eager attention with block mask (model.attnImplementation)"
        in capsys.readouterr().out
    )


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights fails the test: the attention checks come first."""
    from transformers import AutoModelForCausalLM

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the attention check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_flash_attention_without_a_gpu_is_refused_before_loading(
    models: dict[str, Path], no_weights: None
) -> None:
    spec = make_spec(models["llama"], model={"attnImplementation": "flash_attention_2"})
    with pytest.raises(TrainerError) as e:
        modeling.load_model(spec, models["llama"], CPU)
    assert str(e.value) == (
        "model.attnImplementation: flash_attention_2 needs a CUDA GPU, and this process trains on the CPU; "
        "set model.attnImplementation to sdpa, or leave it unset"
    )


def test_flash_attention_without_the_package_is_refused_before_loading(
    models: dict[str, Path], no_weights: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a)
    )
    spec = make_spec(models["llama"], model={"attnImplementation": "flash_attention_2"})
    with pytest.raises(TrainerError, match=r"needs the flash-attn package.*pip install flash-attn.*sdpa"):
        modeling.load_model(spec, models["llama"], GPU)


def test_flash_attention_checks_on_a_gpu(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the package and a GPU (faked: the checks read only these): the GPU's generation, the family."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(
        TrainerError, match=r"Ampere or newer GPU \(compute capability 8.0\+\), and this one is 7.5"
    ):
        modeling.check_attn_kernel("flash_attention_2", GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    modeling.check_attn_kernel("flash_attention_2", GPU)

    tok = tiny.build_tokenizer()
    modeling.check_attn_implementation("flash_attention_2", tiny.build_config("llama", tok))
    with pytest.raises(
        TrainerError, match=r"bloom models \(BloomForCausalLM\) have no flash_attention_2 path.*eager"
    ):
        modeling.check_attn_implementation("flash_attention_2", tiny.build_config("bloom", tok))
    with pytest.raises(
        TrainerError, match=r"bloom models \(BloomForCausalLM\) have no sdpa path.*set it to eager"
    ):
        modeling.check_attn_implementation("sdpa", tiny.build_config("bloom", tok))
    alibi = tiny.build_config("falcon", tok)
    alibi.alibi = True
    with pytest.raises(TrainerError, match=r"ALiBi.*set it to sdpa"):
        modeling.check_attn_implementation("flash_attention_2", alibi)

    # bfd with flash-attention asked for: one flattened varlen row per batch.
    plan = packing.attention_plan(tiny.build_config("llama", tok), GPU, "flash_attention_2")
    assert plan == packing.AttentionPlan(True, "flash_attention_2", "model.attnImplementation")
    model = type("M", (), {"kubetune_attention": plan})()
    spec = make_spec(Path("/m"), training={"packing": "bfd"})
    collator = packing.data_collator(spec, tok, model)
    assert collator is not None and collator.layout == "flat"
