"""Pure translations of a FineTuneJob spec into the keyword arguments of the ML stack.

Nothing here imports torch, transformers, peft or trl: each function returns plain ``dict``s (dtypes as
names such as ``"bfloat16"``) so the translations are testable without loading a model. The caller
(:mod:`kubetune.trainer.modeling`, :mod:`kubetune.trainer.train`) builds ``BitsAndBytesConfig``,
``LoraConfig`` and ``SFTConfig`` from them.

The recipe names that transformers 5 / TRL 1 renamed are mapped here:
``warmup_ratio`` → ``warmup_steps`` (a float ratio), ``group_by_length`` →
``train_sampling_strategy="group_by_length"``, ``gradient_checkpointing`` → ``activation_checkpointing``,
``max_seq_length`` → ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api.v1alpha1 import FineTuneJobSpec, LoraSpec

# LoRA target modules when ``method.lora.targetModules`` is unset, by ``model.config.model_type``.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_QKV_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    "llama": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "falcon": FUSED_QKV_TARGETS,
    "bloom": FUSED_QKV_TARGETS,
}
ALL_LINEAR = "all-linear"

Precision = Literal["bf16", "fp16", "no"]


@dataclass(frozen=True)
class Hardware:
    """What the process runs on (filled from torch at run time; plain values so tests can fake it)."""

    cuda: bool = False
    bf16_supported: bool = False

    @classmethod
    def cpu(cls) -> Hardware:
        return cls(cuda=False, bf16_supported=False)


def resolve_precision(spec: FineTuneJobSpec, hw: Hardware) -> Precision:
    """``training.mixedPrecision``: ``auto`` → bf16 on GPUs with bf16, fp16 on other GPUs, none on CPU."""
    mp = spec.training.mixed_precision
    if mp != "auto":
        return mp
    if not hw.cuda:
        return "no"
    return "bf16" if hw.bf16_supported else "fp16"


def model_dtype(spec: FineTuneJobSpec, hw: Hardware) -> str:
    """dtype name the base weights are loaded in (the non-quantized ones, for 4/8-bit)."""
    quant = spec.method.effective_quantization()
    if quant is not None and quant.bits == 4:
        return quant.compute_dtype
    precision = resolve_precision(spec, hw)
    if spec.method.type == "full":
        # Trained weights stay fp32 unless the run is in bf16 (fp16 weights cannot be trained with a
        # gradient scaler).
        return "bfloat16" if precision == "bf16" else "float32"
    return {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[precision]


def bnb_config_kwargs(spec: FineTuneJobSpec) -> dict[str, Any] | None:
    """``BitsAndBytesConfig`` keyword arguments, or ``None`` when the base is not quantized."""
    quant = spec.method.effective_quantization()
    if quant is None:
        return None
    if quant.bits == 8:
        return {"load_in_8bit": True}
    kwargs: dict[str, Any] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant.quant_type,
        "bnb_4bit_use_double_quant": quant.double_quant,
        "bnb_4bit_compute_dtype": quant.compute_dtype,
    }
    if spec.training.distributed == "fsdp":
        # FSDP shards the packed 4-bit weights as ordinary tensors of this dtype (FSDP-QLoRA).
        kwargs["bnb_4bit_quant_storage"] = quant.compute_dtype
    return kwargs


def resolve_target_modules(lora: LoraSpec, model_type: str | None) -> list[str] | str:
    """``method.lora.targetModules``; unset (``auto``) → chosen from the model's ``model_type``."""
    if lora.target_modules is not None:
        if lora.target_modules == [ALL_LINEAR]:
            return ALL_LINEAR
        return list(lora.target_modules)
    if model_type is not None and model_type in TARGET_MODULES_BY_MODEL_TYPE:
        return list(TARGET_MODULES_BY_MODEL_TYPE[model_type])
    return ALL_LINEAR


# The names peft ties when the model shares its input embeddings and output head
# (peft.utils.constants.EMBEDDING_LAYER_NAMES): with `ensure_weight_tying` one trained copy serves both.
TIED_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def lora_config_kwargs(
    spec: FineTuneJobSpec, model_type: str | None, *, tied_embeddings: bool = False
) -> dict[str, Any] | None:
    """``peft.LoraConfig`` keyword arguments, or ``None`` for full fine-tuning.

    ``tied_embeddings``: the model's ``tie_word_embeddings``. Listing the embeddings or the head in
    ``modulesToSave`` then trains one copy shared by both (peft's ``ensure_weight_tying``): two copies
    trained apart would be saved as one by a merge whose config still says the weights are tied."""
    lora = spec.method.effective_lora()
    if lora is None:
        return None
    kwargs: dict[str, Any] = {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": lora.bias,
        "target_modules": resolve_target_modules(lora, model_type),
        "task_type": "CAUSAL_LM",
    }
    if lora.modules_to_save:
        kwargs["modules_to_save"] = list(lora.modules_to_save)
        if tied_embeddings and any(
            n.rsplit(".", 1)[-1] in TIED_EMBEDDING_NAMES for n in lora.modules_to_save
        ):
            kwargs["ensure_weight_tying"] = True
    if lora.use_dora:
        kwargs["use_dora"] = True
    if lora.rs_lora:
        # The update is scaled by alpha / sqrt(r) instead of alpha / r.
        kwargs["use_rslora"] = True
    return kwargs


def sft_config_kwargs(
    spec: FineTuneJobSpec,
    output_dir: str,
    *,
    has_eval: bool,
    hw: Hardware,
) -> dict[str, Any]:
    """``trl.SFTConfig`` keyword arguments from ``spec.training``."""
    t = spec.training
    precision = resolve_precision(spec, hw)
    max_steps = t.effective_max_steps()
    save_steps = t.effective_save_steps()
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "learning_rate": t.learning_rate,
        "max_steps": max_steps,
        "num_train_epochs": t.epochs if t.epochs is not None else 1.0,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # Rows are truncated to maxSeqLength and packed by kubetune (kubetune.trainer.packing) when the
        # data is prepared, so TRL itself does not pack. padding_free stays off even for bfd: TRL then
        # refuses a custom collator, and kubetune's (packing.PackedCollator) builds the padding-free
        # batches itself, or padded rows for the models that cannot take them.
        "max_length": t.max_seq_length,
        "packing": False,
        "padding_free": False,
        "optim": t.optimizer,
        "lr_scheduler_type": t.lr_scheduler,
        # transformers 5: warmup_ratio is gone, a float in [0, 1) is a ratio of the steps.
        "warmup_steps": float(t.warmup_ratio),
        "max_grad_norm": t.max_grad_norm,
        "weight_decay": t.weight_decay,
        # transformers 5: group_by_length=True became a sampling strategy. bfd bins are all nearly
        # maxSeqLength long (and padding-free has no padding): grouping them would only sort the data.
        "train_sampling_strategy": (
            "group_by_length" if t.group_by_length and t.effective_packing() != "bfd" else "random"
        ),
        # transformers 5: gradient_checkpointing is a deprecated alias of activation_checkpointing.
        "activation_checkpointing": t.gradient_checkpointing,
        # TRL's SFTConfig defaults bf16 to True: always set both explicitly.
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": t.save_total_limit,
        "report_to": "none",
        # kubetune shows its own progress (rich bar on a TTY, one-line logs otherwise).
        "disable_tqdm": True,
        "eval_strategy": "no",
        "dataloader_pin_memory": hw.cuda,
        "use_cpu": not hw.cuda,
    }
    if t.neftune_noise_alpha is not None:
        # transformers' Trainer adds the noise in a forward hook on the input embeddings, in training mode
        # only (evaluation and the samples see clean embeddings).
        kwargs["neftune_noise_alpha"] = float(t.neftune_noise_alpha)
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen (quantized) inputs and with DDP.
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if has_eval:
        kwargs["eval_strategy"] = "steps"
        kwargs["eval_steps"] = t.effective_eval_steps()
    if t.early_stopping_patience is not None and has_eval:
        # Keeping the best model needs a checkpoint at evaluation steps: round an unset saveSteps up to a
        # multiple of evalSteps (a set one is checked by the spec).
        eval_steps = t.effective_eval_steps()
        if t.save_steps is None and save_steps % eval_steps:
            kwargs["save_steps"] = eval_steps * -(-save_steps // eval_steps)
        kwargs["load_best_model_at_end"] = True
        kwargs["metric_for_best_model"] = "eval_loss"
        kwargs["greater_is_better"] = False
    return kwargs
