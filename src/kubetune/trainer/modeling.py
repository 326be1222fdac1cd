"""Loading the tokenizer and base model (4/8-bit through bitsandbytes), LoRA config, samples, merging."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.contract import ENV_HF_TOKEN
from kubetune.trainer import config as cfg
from kubetune.trainer import packing
from kubetune.trainer.data import alpaca_prompt
from kubetune.trainer.errors import TrainerError

log = logging.getLogger("kubetune.trainer")


def hardware(state: Any) -> cfg.Hardware:
    """What this process trains on: its accelerate device (``accelerate launch --cpu`` means CPU even on a
    machine with GPUs)."""
    import torch

    cuda = state.device.type == "cuda"
    return cfg.Hardware(cuda=cuda, bf16_supported=bool(cuda and torch.cuda.is_bf16_supported()))


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def model_source(spec: FineTuneJobSpec, base_dir: Path) -> tuple[str, dict[str, Any]]:
    """``(name_or_path, from_pretrained kwargs)`` of the base model (Hub id at a revision, or a folder)."""
    m = spec.model
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.path is not None:
        p = Path(m.path)
        if not p.is_absolute():
            p = base_dir / p
        if not p.is_dir():
            raise TrainerError(f"model.path: {m.path!r} is not a folder (looked for {p})")
        return str(p.resolve()), kwargs
    assert m.id is not None
    kwargs["revision"] = m.revision
    # huggingface_hub also honours HF_ENDPOINT and HF_HUB_OFFLINE from the environment.
    kwargs["token"] = os.environ.get(ENV_HF_TOKEN) or None
    return m.id, kwargs


def load_tokenizer(spec: FineTuneJobSpec, base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    name, kwargs = model_source(spec, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        # Padding with EOS (masked out of the loss by the attention mask / labels).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device_map(spec: FineTuneJobSpec, hw: cfg.Hardware) -> dict[str, Any] | None:
    """CPU: everything on the CPU. GPU: one device per process (DDP); FSDP places (shards) it itself."""
    if not hw.cuda:
        return {"": "cpu"}
    if spec.training.distributed == "fsdp":
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


@contextmanager
def _bnb_compatible_linear_layers(name: str, kwargs: dict[str, Any] | None) -> Iterator[None]:
    """Build Falcon with plain ``nn.Linear`` layers while it is loaded quantized.

    transformers 5 quantizes only modules whose type *is* ``nn.Linear``, and Falcon's layers are
    ``FalconLinear``, a subclass with the same maths (``x @ W.T + b``): left alone, a 4-bit Falcon
    silently stays in full precision. ``kwargs`` is ``None`` when the model is not quantized."""
    if kwargs is None:
        yield
        return
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "trust_remote_code")}
    model_type = getattr(AutoConfig.from_pretrained(name, **config_kwargs), "model_type", None)
    if model_type != "falcon":
        yield
        return
    import torch
    from transformers.models.falcon import modeling_falcon

    saved = modeling_falcon.FalconLinear
    modeling_falcon.FalconLinear = torch.nn.Linear
    try:
        yield
    finally:
        modeling_falcon.FalconLinear = saved


def _is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def _attention_plan(
    spec: FineTuneJobSpec, name: str, kwargs: dict[str, Any], hw: cfg.Hardware
) -> packing.AttentionPlan | None:
    """How ``bfd`` batches reach this model (None for the other packings: transformers' default)."""
    if spec.training.effective_packing() != "bfd":
        return None
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "trust_remote_code")}
    return packing.attention_plan(AutoConfig.from_pretrained(name, **config_kwargs), hw)


def load_model(spec: FineTuneJobSpec, base_dir: Path, hw: cfg.Hardware) -> Any:
    """The base model, quantized and prepared for k-bit training as the method asks."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name, kwargs = model_source(spec, base_dir)
    dtype = cfg.model_dtype(spec, hw)
    bnb = cfg.bnb_config_kwargs(spec)
    if bnb is not None:
        bnb = dict(bnb)
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if key in bnb:
                bnb[key] = _dtype(bnb[key])
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
    log.info(
        "loading %s (%s, weights %s%s)",
        spec.model.id or spec.model.path,
        spec.method.type,
        dtype,
        ", 4-bit" if bnb and bnb.get("load_in_4bit") else ", 8-bit" if bnb else "",
    )
    plan = _attention_plan(spec, name, kwargs, hw)
    if plan is not None and plan.attn_implementation is not None:
        kwargs["attn_implementation"] = plan.attn_implementation
    with _bnb_compatible_linear_layers(name, kwargs if bnb is not None else None):
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=_dtype(dtype), device_map=device_map(spec, hw), **kwargs
        )
    packing.log_plan(spec, plan)
    if plan is not None:
        # packing.data_collator reads it. transformers builds the block mask from position_ids only
        # without a KV cache: a training forward with use_cache on would let packed rows see each other.
        model.kubetune_attention = plan
        if plan.padding_free:
            model.config.use_cache = False
    if bnb is not None and count_quantized_layers(model) == 0:
        raise TrainerError(
            f"method.quantization: bitsandbytes quantized no layer of this {model.config.model_type} model "
            "(its linear layers are not torch.nn.Linear); use method.type lora without quantization"
        )
    upcast = spec.training.upcast_norms
    if bnb is not None:
        import warnings

        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():
            # peft still calls transformers' deprecated gradient_checkpointing_enable().
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=spec.training.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        # prepare_model_for_kbit_training keeps every non-quantized weight in float32.
        if not upcast and dtype != "float32":
            for module in model.modules():
                if _is_norm(module):
                    module.to(_dtype(dtype))
    elif upcast and dtype != "float32":
        for module in model.modules():
            if _is_norm(module):
                module.to(torch.float32)
    if spec.training.gradient_checkpointing:
        model.config.use_cache = False
    return model


def count_quantized_layers(model: Any) -> int:
    """Linear layers held by bitsandbytes (4-bit ``Linear4bit`` or 8-bit ``Linear8bitLt``)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a trainer dependency
        return 0
    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def lora_config(spec: FineTuneJobSpec, model: Any) -> Any:
    kwargs = cfg.lora_config_kwargs(spec, getattr(model.config, "model_type", None))
    if kwargs is None:
        return None
    from peft import LoraConfig

    log.info("LoRA r=%d alpha=%d on %s", kwargs["r"], kwargs["lora_alpha"], kwargs["target_modules"])
    return LoraConfig(**kwargs)


def sample_input_ids(prompt: str, spec: FineTuneJobSpec, tokenizer: Any) -> list[int]:
    """A sample prompt as the model saw prompts in training (Alpaca template, chat template or raw)."""
    fmt = spec.dataset.format
    if fmt == "chat" and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])
    text = alpaca_prompt(prompt) if fmt == "alpaca" else prompt
    return list(tokenizer(text)["input_ids"])


def generate_samples(
    model: Any, tokenizer: Any, spec: FineTuneJobSpec, hw: cfg.Hardware
) -> list[dict[str, str]]:
    """Completions of ``spec.samples.prompts`` (sampled with the spec's top-k/top-p/temperature, seeded)."""
    from contextlib import nullcontext

    import torch
    from transformers import set_seed

    s = spec.samples
    if not s.prompts:
        return []
    set_seed(spec.training.seed)
    device = next(p.device for p in model.parameters())
    # As in training: half-precision weights next to float32 norms need autocast on the GPU.
    precision = cfg.resolve_precision(spec, hw)
    autocast: Any = nullcontext()
    if device.type == "cuda" and precision != "no":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in s.prompts:
            ids = sample_input_ids(prompt, spec, tokenizer)
            input_ids = torch.tensor([ids], device=device)
            with torch.no_grad(), autocast:
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    top_k=s.top_k,
                    top_p=s.top_p,
                    temperature=s.temperature,
                    max_new_tokens=s.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            completion = tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True)
            out.append({"prompt": prompt, "completion": completion})
    finally:
        if was_training:
            model.train()
    return out


def merge_adapter(
    spec: FineTuneJobSpec, base_dir: Path, adapter_dir: Path, out_dir: Path, hw: cfg.Hardware
) -> None:
    """Reload the base model unquantized, apply the adapter, merge it into the weights and save."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, kwargs = model_source(spec, base_dir)
    dtype = torch.bfloat16 if hw.bf16_supported else torch.float16 if hw.cuda else torch.float32
    log.info(
        "merging the adapter into %s (%s)",
        spec.model.id or spec.model.path,
        str(dtype).removeprefix("torch."),
    )
    base = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, device_map="auto" if hw.cuda else {"": "cpu"}, **kwargs
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
