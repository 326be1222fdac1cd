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
from kubetune.trainer import lineage, packing
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
    # The commit the revision resolved to when the run started (kubetune.trainer.lineage): the tokenizer,
    # config, weights and the merge all load that commit, even if the branch moves meanwhile.
    kwargs["revision"] = lineage.pinned_revision(spec)
    # huggingface_hub also honours HF_ENDPOINT and HF_HUB_OFFLINE from the environment.
    kwargs["token"] = os.environ.get(ENV_HF_TOKEN) or None
    return m.id, kwargs


def load_tokenizer(spec: FineTuneJobSpec, base_dir: Path) -> Any:
    """The base model's tokenizer, with ``dataset.chatTemplate`` as its chat template when set (so the
    prepared-data key and ``save_pretrained`` carry it: the pushed model chats as it was trained)."""
    from transformers import AutoTokenizer

    from kubetune.trainer import templates

    name, kwargs = model_source(spec, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        # Padding with EOS (masked out of the loss by the attention mask / labels).
        tokenizer.pad_token = tokenizer.eos_token
    templates.apply(tokenizer, spec.dataset.chat_template)
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


def _model_config(name: str, kwargs: dict[str, Any]) -> Any:
    """The model's config alone (config.json: no weights)."""
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "trust_remote_code")}
    return AutoConfig.from_pretrained(name, **config_kwargs)


FLASH_ATTN_FIX = "set model.attnImplementation to sdpa, or leave it unset"


def check_attn_kernel(requested: str | None, hw: cfg.Hardware) -> None:
    """``model.attnImplementation`` against this process: flash-attention needs a CUDA GPU of compute
    capability 8.0 or newer and the flash-attn package. Reads nothing: the first check of a load."""
    if requested != "flash_attention_2":
        return
    if not hw.cuda:
        raise TrainerError(
            "model.attnImplementation: flash_attention_2 needs a CUDA GPU, and this process trains on the "
            f"CPU; {FLASH_ATTN_FIX}"
        )
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise TrainerError(
            "model.attnImplementation: flash_attention_2 needs the flash-attn package, which this trainer "
            "image does not have; build the image with it (pip install flash-attn --no-build-isolation, "
            f"matching its torch and CUDA), or {FLASH_ATTN_FIX}"
        )
    import torch

    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise TrainerError(
            "model.attnImplementation: flash_attention_2 needs an Ampere or newer GPU (compute capability "
            f"8.0+), and this one is {major}.{minor}; {FLASH_ATTN_FIX}"
        )


def check_attn_implementation(requested: str | None, config: Any) -> None:
    """``model.attnImplementation`` against the model family (its transformers class), from the config."""
    if requested is None:
        return
    cls = packing.causal_lm_class(config)
    if cls is None:  # remote code: transformers checks it when the model is built
        return
    model_type = getattr(config, "model_type", None)
    fallback = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    flag = {"flash_attention_2": "_supports_flash_attn", "sdpa": "_supports_sdpa"}.get(requested)
    if flag is not None and not getattr(cls, flag, False):
        raise TrainerError(
            f"model.attnImplementation: {model_type} models ({cls.__name__}) have no {requested} path in "
            f"transformers; set it to {fallback}, or leave it unset"
        )
    if requested == "flash_attention_2" and getattr(config, "alibi", False):
        raise TrainerError(
            f"model.attnImplementation: this {model_type} model uses ALiBi positions, which its "
            f"flash-attention path refuses; set it to {fallback}, or leave it unset"
        )


def attention_setup(
    spec: FineTuneJobSpec, name: str, kwargs: dict[str, Any], hw: cfg.Hardware
) -> tuple[str | None, packing.AttentionPlan | None]:
    """``(attn_implementation for from_pretrained, bfd's plan)``, every check done before any weights load.

    ``model.attnImplementation`` set: that kernel, whatever the packing (``bfd`` then only picks the
    layout, :func:`kubetune.trainer.packing.attention_plan`). Unset: ``bfd`` picks the kernel it needs
    (flash-attention varlen where available, else SDPA with the block mask), other packings leave it to
    transformers (SDPA where the family has it, else eager)."""
    requested = spec.model.attn_implementation
    check_attn_kernel(requested, hw)
    bfd = spec.training.effective_packing() == "bfd"
    if requested is None and not bfd:
        return None, None
    config = _model_config(name, kwargs)
    check_attn_implementation(requested, config)
    if not bfd:
        return requested, None
    plan = packing.attention_plan(config, hw, requested)
    return plan.attn_implementation, plan


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
    attn, plan = attention_setup(spec, name, kwargs, hw)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    with _bnb_compatible_linear_layers(name, kwargs if bnb is not None else None):
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=_dtype(dtype), device_map=device_map(spec, hw), **kwargs
        )
    packing.log_plan(spec, plan)
    if plan is None:
        log.info(
            "attention: %s%s",
            model.config._attn_implementation,
            " (model.attnImplementation)" if attn is not None else "",
        )
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
    check_modules_to_save(spec, model)
    return model


def _tied_embeddings(model: Any) -> bool:
    """The input embeddings and the output head are one weight (``tie_word_embeddings``)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    return embed is not None and head is not None and head.weight is embed.weight


def check_modules_to_save(spec: FineTuneJobSpec, model: Any) -> None:
    """``method.lora.modulesToSave`` against the loaded model, with peft's rule (a module whose name ends
    with the entry is trained in full): peft itself ignores an entry that matches nothing and fails
    cryptically on a quantized one."""
    lora = spec.method.effective_lora()
    if lora is None or not lora.modules_to_save:
        return
    import bitsandbytes as bnb
    import torch

    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    head = model.get_output_embeddings()
    targets = cfg.resolve_target_modules(lora, getattr(model.config, "model_type", None))

    def adapted(name: str, module: Any) -> bool:
        if targets == cfg.ALL_LINEAR:
            return isinstance(module, torch.nn.Linear) and module is not head
        return any(name == t or name.endswith("." + t) for t in targets)

    modules = dict(model.named_modules(remove_duplicate=False))
    trainable_leaves = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in modules.items()
            if n
            and any(True for _ in m.parameters(recurse=False))
            and not isinstance(m, quantized)
            and not adapted(n, m)
        }
    )
    model_type = getattr(model.config, "model_type", "this")
    tied_ids = {id(model.get_input_embeddings()), id(head)} if _tied_embeddings(model) else set()
    for entry in lora.modules_to_save:
        matched = {n: m for n, m in modules.items() if n and n.endswith(entry)}
        if not matched:
            raise TrainerError(
                f"method.lora.modulesToSave: {entry!r} names no module of this {model_type} model; "
                f"modules it can train in full: {', '.join(trainable_leaves)}"
            )
        for name, module in matched.items():
            for sub_name, sub in module.named_modules():
                full = f"{name}.{sub_name}" if sub_name else name
                if isinstance(sub, quantized):
                    raise TrainerError(
                        f"method.lora.modulesToSave: {entry!r} takes in {full}, which bitsandbytes holds "
                        "quantized and cannot be trained in full; list unquantized modules (e.g. "
                        f"{', '.join(trainable_leaves)}), or train without method.quantization"
                    )
                if adapted(full, sub):
                    raise TrainerError(
                        f"method.lora.modulesToSave: {entry!r} takes in {full}, which LoRA adapts "
                        "(method.lora.targetModules); a module is either adapted or trained in full: drop it "
                        "from one of the two"
                    )
        if entry.rsplit(".", 1)[-1] not in cfg.TIED_EMBEDDING_NAMES and any(
            id(m) in tied_ids for m in matched.values()
        ):
            raise TrainerError(
                f"method.lora.modulesToSave: {entry!r}: this model's input embeddings and output head share "
                "one weight (tie_word_embeddings), which peft keeps tied only under the names "
                f"{' and '.join(cfg.TIED_EMBEDDING_NAMES)}; list lm_head instead (one copy, trained for both)"
            )


def count_quantized_layers(model: Any) -> int:
    """Linear layers held by bitsandbytes (4-bit ``Linear4bit`` or 8-bit ``Linear8bitLt``)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a trainer dependency
        return 0
    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def lora_config(spec: FineTuneJobSpec, model: Any) -> Any:
    kwargs = cfg.lora_config_kwargs(
        spec, getattr(model.config, "model_type", None), tied_embeddings=_tied_embeddings(model)
    )
    if kwargs is None:
        return None
    from peft import LoraConfig

    extras = [k for k, on in (("DoRA", "use_dora"), ("rsLoRA", "use_rslora")) if kwargs.get(on)]
    if kwargs.get("modules_to_save"):
        tied = ", tied" if kwargs.get("ensure_weight_tying") else ""
        extras.append(f"modulesToSave {kwargs['modules_to_save']}{tied}")
    log.info(
        "LoRA r=%d alpha=%d on %s%s",
        kwargs["r"],
        kwargs["lora_alpha"],
        kwargs["target_modules"],
        "".join(f"; {e}" for e in extras),
    )
    return LoraConfig(**kwargs)


def restore_copy_dtypes(model: Any, spec: FineTuneJobSpec, hw: cfg.Hardware) -> int:
    """Give the ``modulesToSave`` copies back the dtype of the modules they copy, when nothing autocasts.

    TRL casts every trainable parameter of a quantized model to bf16 (QLoRA's recipe for the LoRA
    matrices), the full copies of ``modulesToSave`` too. Under autocast (mixed precision on) that is
    fine; without it (``mixedPrecision: no``, and every CPU run) the bf16 head meets fp32 hidden states
    and the first forward outside the trainer's (the samples) fails with a dtype mismatch. Call it on
    ``trainer.model`` once SFTTrainer is built, before training. Returns the copies changed."""
    if cfg.resolve_precision(spec, hw) != "no":
        return 0
    from peft.utils.other import ModulesToSaveWrapper

    changed = 0
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        original = next(module.original_module.parameters(), None)
        for copy in module.modules_to_save.values():
            current = next(copy.parameters(), None)
            if original is not None and current is not None and current.dtype != original.dtype:
                copy.to(original.dtype)  # in place: a copy shared by tied embeddings stays shared
                changed += 1
    return changed


def sample_input_ids(prompt: str, spec: FineTuneJobSpec, tokenizer: Any) -> list[int]:
    """A sample prompt as the model saw prompts in training: through the chat template when a source
    is chat data (the template is saved with the model, so that is how it will be prompted), else
    in the first source's format (the Alpaca prompt, or raw text and completion prompts)."""
    formats = [part.format for part in spec.dataset.parts()]
    fmt = "chat" if "chat" in formats else formats[0]
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
