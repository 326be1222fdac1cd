"""The models themselves: recipe defaults, resolved values, and the checks the operator and trainer rely
on when they validate a spec without going through `kubetune validate`."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec

MINIMAL: dict[str, Any] = {
    "model": {"id": "tiiuae/falcon-7b"},
    "dataset": {"id": "timdettmers/openassistant-guanaco"},
}


def test_defaults_are_the_guanaco_qlora_recipe() -> None:
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    q = spec.method.effective_quantization()
    lora = spec.method.effective_lora()
    t = spec.training
    assert spec.method.type == "qlora"
    assert q is not None and (q.bits, q.quant_type) == (4, "nf4")
    assert lora is not None and (lora.r, lora.alpha, lora.dropout) == (64, 16, 0.1)
    assert lora.target_modules is None  # resolved per architecture by the trainer
    assert (t.optimizer, t.max_grad_norm, t.warmup_ratio, t.lr_scheduler) == (
        "paged_adamw_32bit",
        0.3,
        0.03,
        "constant",
    )
    assert t.group_by_length and t.gradient_checkpointing and t.upcast_norms
    assert (t.effective_max_steps(), t.max_seq_length, t.learning_rate) == (500, 512, 2e-4)


def test_epochs_replace_the_default_step_count() -> None:
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"epochs": 3}})
    assert spec.training.effective_max_steps() == -1


def test_lora_without_quantization_and_full_without_adapter() -> None:
    lora = FineTuneJobSpec.model_validate({**MINIMAL, "method": {"type": "lora"}}).method
    assert lora.effective_quantization() is None and lora.effective_lora() is not None
    full = FineTuneJobSpec.model_validate({**MINIMAL, "method": {"type": "full"}}).method
    assert full.effective_quantization() is None and full.effective_lora() is None


def test_block_size_turns_packing_on() -> None:
    t = FineTuneJobSpec.model_validate(
        {**MINIMAL, "training": {"maxSeqLength": 2048, "blockSize": 512}}
    ).training
    assert t.uses_packing and t.effective_block_size() == 512
    assert FineTuneJobSpec.model_validate(MINIMAL).training.effective_block_size() == 512


def test_save_and_eval_steps_resolve() -> None:
    t = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"loggingSteps": 5}}).training
    assert (t.effective_save_steps(), t.effective_eval_steps()) == (50, 50)


def test_the_model_rejects_inline_tokens_itself() -> None:
    """The operator and the trainer validate with the model directly: the token check is in it."""
    token = "hf_" + "x" * 34
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t", "annotations": {"note": token}},
        "spec": MINIMAL,
    }
    with pytest.raises(ValidationError) as e:
        FineTuneJob.model_validate(doc)
    assert "metadata.annotations.note" in str(e.value)
    assert token not in str(e.value)


def test_python_names_and_wire_names_both_work() -> None:
    a = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"maxSteps": 7}})
    b = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"max_steps": 7}})
    assert a == b
    assert a.model_dump(by_alias=True)["training"]["maxSteps"] == 7
