"""The GPU-memory planner: will this FineTuneJob fit its GPU, how many tokens a step, how long an epoch.

Pure Python at import (the operator image has no torch or transformers): parameter counts come from a
model's ``config.json`` analytically (:func:`shape_from_config`, proven equal to transformers' own counts
by tests) or, where transformers is installed, from the model built on the meta device
(:func:`exact_shape`, any architecture). :func:`estimate` turns a spec and a shape into bytes per GPU,
component by component, as the trainer lays them out:

- the frozen base: nf4/fp4 weights packed two to a byte plus their block constants (an fp32 absmax per
  64 weights, or with double quantization an 8-bit absmax per 64 and an fp32 constant per 256 of those);
  LLM.int8 weights one byte each plus an fp32 scale per row; every weight bitsandbytes does not quantize
  (embeddings, the output head, norms, biases) in float32, because peft's
  ``prepare_model_for_kbit_training`` upcasts them; unquantized LoRA bases in the compute dtype;
- the LoRA matrices in bf16 for quantized bases (TRL 1.16 casts them, as the QLoRA paper does) and in
  fp32 otherwise (peft's ``autocast_adapter_dtype``), their gradients and the optimizer's state;
- activations kept for the backward pass, with gradient checkpointing (one hidden state per layer and
  one layer recomputed at a time) or without (every layer's saved tensors), for SDPA/flash attention
  (no seq² term), plus the scratch of one dequantized weight;
- the logits and the loss buffers (batch × sequence × vocabulary, upcast to fp32: at a 128k vocabulary
  often the largest term);
- the CUDA context and the caching allocator's slack.

Time per step comes from a FLOP model (6N FLOPs per token for full training, 4N for a frozen base with
LoRA: forward and the input gradients, no weight gradients; +2N when checkpointing recomputes the
forward; plus the attention term) against the GPU's dense bf16 peak at an assumed MFU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kubetune.api.v1alpha1 import FineTuneJobSpec

MiB = 1 << 20
GiB = 1 << 30

# Measured peaks of kubetune runs sit near these on CUDA 12: the context (kernels of torch, cuBLAS,
# bitsandbytes) is not counted by torch's allocator but is taken from the GPU's memory.
CUDA_CONTEXT_BYTES = 550 * MiB
# The caching allocator reserves more than it hands out (block rounding, fragmentation).
ALLOCATOR_SLACK = 0.05
# Model FLOPs utilization assumed for time estimates: QLoRA's dequantization and small LoRA matmuls keep
# real runs well below dense-bf16 training (which reaches 0.4-0.5 on A100/H100).
ASSUMED_MFU = 0.35
ASSUMED_MFU_FULL = 0.40

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(Exception):
    """The planner cannot plan this job (unknown architecture, unreadable config); the message names
    the fix."""


# --------------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a causal LM, from its ``config.json``.

    ``layer_linears`` holds ``(name, in_features, out_features)`` of each linear layer in one decoder
    layer (``name`` is the module's own name, as LoRA's ``target_modules`` matches it)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    total_params: int
    quantizable_params: int  # weights of the linear layers bitsandbytes quantizes (not the output head)
    source: Literal["analytic", "meta"]
    head_dim: int = 0
    embedding_params: int = 0  # input (and position) embeddings
    lm_head_params: int = 0  # 0 when tied to the input embeddings
    norm_params: int = 0
    bias_params: int = 0  # biases of the quantized linear layers (never quantized)
    gated_mlp: bool = True
    layer_linears: tuple[tuple[str, int, int], ...] = ()
    # Every module holding parameters of its own, as (name, parameters), the decoder layers' once with
    # "{i}" for the layer index, e.g. ("model.layers.{i}.input_layernorm", 4096): what
    # `method.lora.modulesToSave` names are matched against (see modules_to_save_params).
    modules: tuple[tuple[str, int], ...] = ()
    embedding_module: str = ""  # the input embeddings' name, e.g. "model.embed_tokens"

    @property
    def unquantized_params(self) -> int:
        """Everything bitsandbytes leaves in floating point: embeddings, head, norms, biases."""
        return self.total_params - self.quantizable_params

    @property
    def attention_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name)
        if value is not None:
            return value
    return default


def _require(config: Mapping[str, Any], *names: str) -> int:
    value = _get(config, *names)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(
            f"config.json has no positive integer {names[0]!r}: is it a causal language model's config?"
        )
    return value


LLAMA_LIKE = ("llama", "mistral", "qwen2")
LLAMA_GROUPS = {n: "self_attn" for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    n: "mlp" for n in ("gate_proj", "up_proj", "down_proj")
}
FUSED_GROUPS = {"query_key_value": "self_attention", "dense": "self_attention"} | {
    n: "mlp" for n in ("dense_h_to_4h", "dense_4h_to_h")
}
ANALYTIC_TYPES = (*LLAMA_LIKE, "falcon", "bloom")


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """Analytic parameter counts for llama, mistral, qwen2, falcon (both architectures) and bloom."""
    model_type = str(config.get("model_type") or "")
    if model_type in LLAMA_LIKE:
        return _llama_like(config, model_type)
    if model_type == "falcon":
        return _falcon(config)
    if model_type == "bloom":
        return _bloom(config)
    known = ", ".join(ANALYTIC_TYPES)
    raise PlanError(
        f"no analytic parameter count for model_type {model_type or '(none)'!r} (known: {known}); "
        "install transformers (pip install 'kubetune[trainer]') to count any architecture on the meta device"
    )


def _assemble(
    config: Mapping[str, Any],
    model_type: str,
    *,
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    tied: bool,
    linears: list[tuple[str, int, int, bool]],
    layer_norm_params: int,
    extra_norm_params: int,
    embedding_params: int,
    gated: bool,
    modules: list[tuple[str, int]],
    embedding_module: str,
) -> ModelShape:
    linear_weights = sum(i * o for _, i, o, _ in linears)
    linear_biases = sum(o for _, _, o, has_bias in linears if has_bias)
    lm_head = 0 if tied else vocab * hidden
    norms = layers * layer_norm_params + extra_norm_params
    quantizable = layers * linear_weights
    biases = layers * linear_biases
    total = quantizable + biases + norms + embedding_params + lm_head
    return ModelShape(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        tie_word_embeddings=tied,
        total_params=total,
        quantizable_params=quantizable,
        source="analytic",
        head_dim=head_dim,
        embedding_params=embedding_params,
        lm_head_params=lm_head,
        norm_params=norms,
        bias_params=biases,
        gated_mlp=gated,
        layer_linears=tuple((n, i, o) for n, i, o, _ in linears),
        modules=tuple(modules),
        embedding_module=embedding_module,
    )


def _linear_modules(
    prefix: str, linears: list[tuple[str, int, int, bool]], groups: Mapping[str, str]
) -> list[tuple[str, int]]:
    """The decoder layer's linear modules by name (``groups``: each one's parent, e.g. "self_attn")."""
    return [(f"{prefix}{groups[n]}.{n}", i * o + (o if bias else 0)) for n, i, o, bias in linears]


def _llama_like(config: Mapping[str, Any], model_type: str) -> ModelShape:
    hidden = _require(config, "hidden_size")
    layers = _require(config, "num_hidden_layers")
    heads = _require(config, "num_attention_heads")
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    vocab = _require(config, "vocab_size")
    intermediate = _require(config, "intermediate_size")
    head_dim = int(_get(config, "head_dim", default=hidden // heads))
    # Qwen2 has biases on q/k/v and never on o; llama/mistral have `attention_bias` on all four.
    qkv_bias = True if model_type == "qwen2" else bool(config.get("attention_bias", False))
    o_bias = False if model_type == "qwen2" else bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False)) if model_type == "llama" else False
    linears = [
        ("q_proj", hidden, heads * head_dim, qkv_bias),
        ("k_proj", hidden, kv_heads * head_dim, qkv_bias),
        ("v_proj", hidden, kv_heads * head_dim, qkv_bias),
        ("o_proj", heads * head_dim, hidden, o_bias),
        ("gate_proj", hidden, intermediate, mlp_bias),
        ("up_proj", hidden, intermediate, mlp_bias),
        ("down_proj", intermediate, hidden, mlp_bias),
    ]
    default_tied = False
    return _assemble(
        config,
        model_type,
        vocab=vocab,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        tied=bool(_get(config, "tie_word_embeddings", default=default_tied)),
        linears=linears,
        layer_norm_params=2 * hidden,  # two RMSNorm weights
        extra_norm_params=hidden,  # the final norm
        embedding_params=vocab * hidden,
        gated=True,
        modules=[
            ("model.embed_tokens", vocab * hidden),
            *_linear_modules("model.layers.{i}.", linears, LLAMA_GROUPS),
            ("model.layers.{i}.input_layernorm", hidden),
            ("model.layers.{i}.post_attention_layernorm", hidden),
            ("model.norm", hidden),
            ("lm_head", vocab * hidden),
        ],
        embedding_module="model.embed_tokens",
    )


def _falcon(config: Mapping[str, Any]) -> ModelShape:
    hidden = _require(config, "hidden_size", "n_embed")
    layers = _require(config, "num_hidden_layers", "n_layer")
    heads = _require(config, "num_attention_heads", "n_head")
    vocab = _require(config, "vocab_size")
    head_dim = hidden // heads
    new_arch = bool(config.get("new_decoder_architecture", False))
    multi_query = bool(config.get("multi_query", True))
    parallel = bool(config.get("parallel_attn", True))
    bias = bool(config.get("bias", False))
    ffn = int(_get(config, "ffn_hidden_size", default=4 * hidden))
    if new_arch:
        kv_heads = int(_get(config, "num_kv_heads", default=heads))
        qkv_out = (2 * kv_heads + heads) * head_dim
    elif multi_query:
        kv_heads = 1
        qkv_out = hidden + 2 * head_dim
    else:
        kv_heads = heads
        qkv_out = 3 * hidden
    ln_parallel = config.get("num_ln_in_parallel_attn")
    if ln_parallel is None and new_arch:
        ln_parallel = 2
    # LayerNorms (weight and bias): two per layer unless one is shared by parallel attention and MLP.
    norms_per_layer = 1 if parallel and ln_parallel != 2 else 2
    if norms_per_layer == 1:
        layer_norms = ["input_layernorm"]
    else:
        layer_norms = ["ln_attn", "ln_mlp"] if parallel else ["input_layernorm", "post_attention_layernorm"]
    linears = [
        ("query_key_value", hidden, qkv_out, bias),
        ("dense", hidden, hidden, bias),
        ("dense_h_to_4h", hidden, ffn, bias),
        ("dense_4h_to_h", ffn, hidden, bias),
    ]
    return _assemble(
        config,
        "falcon",
        vocab=vocab,
        hidden=hidden,
        intermediate=ffn,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        tied=bool(_get(config, "tie_word_embeddings", default=True)),
        linears=linears,
        layer_norm_params=norms_per_layer * 2 * hidden,
        extra_norm_params=2 * hidden,  # ln_f
        embedding_params=vocab * hidden,
        gated=False,
        modules=[
            ("transformer.word_embeddings", vocab * hidden),
            *_linear_modules("transformer.h.{i}.", linears, FUSED_GROUPS),
            *[(f"transformer.h.{{i}}.{n}", 2 * hidden) for n in layer_norms],
            ("transformer.ln_f", 2 * hidden),
            ("lm_head", vocab * hidden),
        ],
        embedding_module="transformer.word_embeddings",
    )


def _bloom(config: Mapping[str, Any]) -> ModelShape:
    hidden = _require(config, "hidden_size", "n_embed")
    layers = _require(config, "n_layer", "num_hidden_layers")
    heads = _require(config, "n_head", "num_attention_heads")
    vocab = _require(config, "vocab_size")
    linears = [
        ("query_key_value", hidden, 3 * hidden, True),
        ("dense", hidden, hidden, True),
        ("dense_h_to_4h", hidden, 4 * hidden, True),
        ("dense_4h_to_h", 4 * hidden, hidden, True),
    ]
    return _assemble(
        config,
        "bloom",
        vocab=vocab,
        hidden=hidden,
        intermediate=4 * hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        tied=bool(_get(config, "tie_word_embeddings", default=True)),
        linears=linears,
        layer_norm_params=2 * 2 * hidden,  # input and post-attention LayerNorms
        extra_norm_params=2 * 2 * hidden,  # word_embeddings_layernorm and ln_f
        embedding_params=vocab * hidden,
        gated=False,
        modules=[
            ("transformer.word_embeddings", vocab * hidden),
            ("transformer.word_embeddings_layernorm", 2 * hidden),
            *_linear_modules("transformer.h.{i}.", linears, FUSED_GROUPS),
            ("transformer.h.{i}.input_layernorm", 2 * hidden),
            ("transformer.h.{i}.post_attention_layernorm", 2 * hidden),
            ("transformer.ln_f", 2 * hidden),
            ("lm_head", vocab * hidden),
        ],
        embedding_module="transformer.word_embeddings",
    )


def exact_shape(config: Mapping[str, Any]) -> ModelShape:
    """Counts from the model itself, built from ``config`` on the meta device (no memory, no weights).

    Needs torch and transformers (the trainer extra); works for any architecture transformers knows."""
    try:
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise PlanError(
            f"exact parameter counts need transformers and torch ({e}): pip install 'kubetune[trainer]'"
        ) from None
    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise PlanError("config.json has no model_type: is it a transformers model's config?")
    for key in ("auto_map", "quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # unknown model_type, remote code, a config transformers rejects
        raise PlanError(
            f"transformers cannot build model_type {model_type!r} from this config ({type(e).__name__}: {e})"
        ) from None
    inner = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = inner is not None and embed is not None and inner.weight is embed.weight
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    quantizable = bias = norms = embeddings = 0
    for module in model.modules():
        if module is inner:
            continue
        if isinstance(module, nn.Linear):
            quantizable += module.weight.numel()
            if module.bias is not None:
                bias += module.bias.numel()
        elif isinstance(module, nn.Embedding):
            embeddings += module.weight.numel()
        elif "norm" in type(module).__name__.lower():
            norms += sum(p.numel() for p in module.parameters(recurse=False))
    lm_head = 0 if tied or inner is None else inner.weight.numel()
    layers = next(
        (m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == _num_layers(hf_config)),
        None,
    )
    linears: tuple[tuple[str, int, int], ...] = ()
    if layers is not None and len(layers):
        linears = tuple(
            (name.rsplit(".", 1)[-1], m.in_features, m.out_features)
            for name, m in layers[0].named_modules()
            if isinstance(m, nn.Linear)
        )
    names = {id(m): n for n, m in model.named_modules()}
    layers_name = names.get(id(layers), "") if layers is not None else ""
    layer_prefix = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.") if layers_name else None
    modules: dict[str, int] = {}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not own:
            continue
        if layer_prefix is not None:
            found = layer_prefix.match(name)
            if found:
                if found.group(1) != "0":
                    continue  # the layers are alike: the first one stands for all
                name = f"{layers_name}.{{i}}.{name[found.end() :]}"
        modules[name] = own
    analytic: ModelShape | None
    try:
        analytic = shape_from_config(config)
    except PlanError:
        analytic = None
    hidden = int(getattr(hf_config, "hidden_size", 0) or 0)
    heads = int(getattr(hf_config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(hf_config, "head_dim", 0) or (hidden // heads if heads else 0))
    intermediate = int(
        getattr(hf_config, "intermediate_size", 0) or getattr(hf_config, "ffn_hidden_size", 0) or 4 * hidden
    )
    return ModelShape(
        model_type=str(model_type),
        vocab_size=int(getattr(hf_config, "vocab_size", 0) or 0),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=_num_layers(hf_config),
        num_heads=heads,
        num_kv_heads=analytic.num_kv_heads if analytic else kv_heads,
        tie_word_embeddings=tied,
        total_params=total,
        quantizable_params=quantizable,
        source="meta",
        head_dim=head_dim,
        embedding_params=embeddings,
        lm_head_params=lm_head,
        norm_params=norms,
        bias_params=bias,
        gated_mlp=analytic.gated_mlp if analytic else any(n.startswith("gate") for n, _, _ in linears),
        layer_linears=linears,
        modules=tuple(modules.items()),
        embedding_module=names.get(id(embed), "") if embed is not None else "",
    )


def _num_layers(hf_config: Any) -> int:
    return int(getattr(hf_config, "num_hidden_layers", 0) or getattr(hf_config, "n_layer", 0) or 0)


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """Exact counts where transformers is installed, else analytic ones."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return shape_from_config(config)
    try:
        return exact_shape(config)
    except PlanError:
        try:  # e.g. a model transformers knows only through remote code, of a family counted here
            return shape_from_config(config)
        except PlanError:
            pass
        raise


# --------------------------------------------------------------------------------------------------
# Model config: a folder or the Hub
# --------------------------------------------------------------------------------------------------


def hub_config(
    repo_id: str,
    revision: str = "main",
    *,
    token: str | None = None,
    timeout: float = 10.0,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """``config.json`` of a Hub model repository, alone (no weights), through huggingface_hub.

    ``HF_ENDPOINT`` (a mirror, or a stand-in in tests) is read at each call; ``token`` None means
    huggingface_hub's own (``HF_TOKEN``, or the ``hf auth login`` cache)."""
    import json
    import os

    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise PlanError(
            "reading a Hub model's config needs huggingface_hub: pip install huggingface_hub"
        ) from None
    try:
        path = hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            token=token,
            etag_timeout=timeout,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            cache_dir=cache_dir,
        )
    except GatedRepoError:
        raise PlanError(
            f"model {repo_id} is gated: accept its terms on the Hub, then set HF_TOKEN or run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise PlanError(
            f"model {repo_id} not found on the Hub (or private: set HF_TOKEN or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise PlanError(f"model {repo_id} has no revision {revision!r}: check model.revision") from None
    except EntryNotFoundError:
        raise PlanError(
            f"model {repo_id}@{revision} has no config.json: is it a transformers model?"
        ) from None
    except Exception as e:  # network, timeouts, offline mode without a cached copy
        raise PlanError(
            f"cannot read config.json of {repo_id}@{revision} ({type(e).__name__}); check the network, "
            "HF_ENDPOINT, or set model.path to a local folder"
        ) from None
    return _read_json(path, f"{repo_id}@{revision}", json)


def _read_json(path: Any, where: str, json: Any) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read config.json of {where} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise PlanError(f"config.json of {where} is not a JSON object")
    return data


def local_config(folder: str) -> dict[str, Any]:
    """``config.json`` of a model folder."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PlanError(f"model.path: no config.json in {folder}")
    return _read_json(path, folder, json)


# --------------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """A GPU model: memory as the driver reports it (what GPU feature discovery's
    ``nvidia.com/gpu.memory`` label holds, in MiB) and its dense (no sparsity) tensor-core peak."""

    product: str
    memory_bytes: int
    bf16_flops: float | None  # None: no bf16 (pre-Ampere); fp16_flops then times the run
    fp16_flops: float | None = None


def _gpu(product: str, mib: int, bf16_tflops: float | None, fp16_tflops: float | None = None) -> GpuInfo:
    fp16 = fp16_tflops if fp16_tflops is not None else bf16_tflops
    return GpuInfo(
        product,
        mib * MiB,
        None if bf16_tflops is None else bf16_tflops * 1e12,
        None if fp16 is None else fp16 * 1e12,
    )


# Keyed by the `nvidia.com/gpu.product` label (NVML's name with spaces as dashes). Memory: nvidia-smi's
# total in MiB; peaks: NVIDIA datasheets, dense tensor-core bf16 (fp16 for pre-Ampere GPUs), with FP32
# accumulation on GeForce cards.
GPUS: dict[str, GpuInfo] = {
    g.product: g
    for g in (
        _gpu("NVIDIA-H200", 143771, 989),
        _gpu("NVIDIA-H200-NVL", 143771, 835),
        _gpu("NVIDIA-H100-80GB-HBM3", 81559, 989),
        _gpu("NVIDIA-H100-PCIe", 81559, 756),
        _gpu("NVIDIA-H100-NVL", 95830, 835),
        _gpu("NVIDIA-A100-SXM4-80GB", 81920, 312),
        _gpu("NVIDIA-A100-80GB-PCIe", 81920, 312),
        _gpu("NVIDIA-A100-SXM4-40GB", 40960, 312),
        _gpu("NVIDIA-A100-PCIE-40GB", 40960, 312),
        _gpu("NVIDIA-A10G", 23028, 70),
        _gpu("NVIDIA-A10", 23028, 125),
        _gpu("NVIDIA-L4", 23034, 121),
        _gpu("NVIDIA-L40S", 46068, 362),
        _gpu("NVIDIA-L40", 46068, 181),
        _gpu("NVIDIA-A40", 46068, 150),
        _gpu("NVIDIA-RTX-A6000", 49140, 155),
        _gpu("NVIDIA-GeForce-RTX-4090", 24564, 165),
        _gpu("NVIDIA-GeForce-RTX-3090", 24576, 71),
        _gpu("Tesla-T4", 15360, None, 65),
        _gpu("Tesla-V100-SXM2-16GB", 16384, None, 125),
        _gpu("Tesla-V100-SXM2-32GB", 32768, None, 125),
        _gpu("Tesla-V100-PCIE-16GB", 16384, None, 112),
        _gpu("Tesla-V100-PCIE-32GB", 32768, None, 112),
    )
}


def gpu_info(gpu_type: str) -> GpuInfo | None:
    """The table entry for a ``nvidia.com/gpu.product`` value (time-sliced GPUs' ``-SHARED`` suffix is
    ignored); None for an unknown product or a MIG slice (its memory is its own label's)."""
    name = gpu_type.strip()
    if name.endswith("-SHARED"):
        name = name[: -len("-SHARED")]
    if "-MIG-" in name:
        return None
    found = GPUS.get(name)
    if found is None:
        lower = name.lower()
        found = next((g for key, g in GPUS.items() if key.lower() == lower), None)
    return found


def parse_memory(text: str) -> int:
    """``24GiB``, ``24Gi``, ``80GB``, ``23028MiB`` or plain MiB (as the ``nvidia.com/gpu.memory``
    label) → bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|[KMGT]B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB, 23028MiB)")
    number = float(m.group(1))
    unit = (m.group(2) or "MiB").upper()
    prefix = unit[0]
    binary = "I" in unit or unit == prefix  # "24G" and "24Gi" are binary, as for Kubernetes quantities
    power = "KMGT".index(prefix) + 1
    return int(number * ((1024 if binary else 1000) ** power))


# --------------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything the memory model depends on, resolved from a spec by :func:`settings`.

    Tests of published figures set these to the measured setup's own choices (another trainer may keep
    its embeddings in bf16, or chunk its loss)."""

    method: Literal["qlora", "lora", "full"] = "qlora"
    bits: int | None = 4  # 4, 8 or None (unquantized base)
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # activations and matmuls
    weight_dtype: str = "bfloat16"  # the unquantized base (lora, full)
    frozen_dtype: str = "float32"  # weights bitsandbytes leaves unquantized, on a quantized base
    norm_dtype: str | None = "float32"  # None: as the other weights
    lora_r: int = 64
    lora_targets: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    lora_dtype: str = "bfloat16"
    lora_dropout: bool = True
    lora_dora: bool = False  # DoRA: a magnitude per output feature, and its forward's extra tensors
    modules_to_save: tuple[str, ...] = ()  # method.lora.modulesToSave: trained in full, as copies
    modules_to_save_dtype: str = "bfloat16"  # TRL casts them to bf16 on a quantized base
    attn_implementation: str = "sdpa"  # eager keeps the seq x seq attention probabilities
    optimizer: str = "paged_adamw_32bit"
    batch_size: int = 4
    seq_length: int = 512  # tokens per sequence the GPU sees (the block when packing)
    gradient_accumulation: int = 4
    gradient_checkpointing: bool = True
    gpus: int = 1
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # How the loss meets the vocabulary: "fused" is TRL 1.16's chunked LM head (SFTTrainer patches the model:
    # log-probabilities in 4096-token x 32768-vocabulary tiles, never the whole logits); "chunked" is
    # torchtune's CEWithChunkedOutputLoss under torch.compile (whole bf16 logits, fp32 one chunk at a time);
    # "full" is a plain cross-entropy on whole logits (bf16 logits, fp32 upcast, log-softmax and its
    # gradient: 12 bytes per entry at the backward's start).
    loss: Literal["fused", "chunked", "full"] = "fused"
    loss_chunks: int = 8
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    allocator_slack: float = ALLOCATOR_SLACK
    real_token_fraction: float = 1.0  # tokens that are not padding (packing: ~1)


def settings(spec: FineTuneJobSpec, model_type: str | None = None, gpu: GpuInfo | None = None) -> Settings:
    """The memory model's inputs for a spec, as the trainer lays the run out on ``gpu``."""
    t = spec.training
    m = spec.method
    quant = m.effective_quantization()
    lora = m.effective_lora()
    precision = t.mixed_precision
    if precision == "auto":  # as trainer.config.resolve_precision on a GPU
        precision = "fp16" if gpu is not None and gpu.bf16_flops is None else "bf16"
    compute = quant.compute_dtype if quant is not None and quant.bits == 4 else _precision_dtype(precision)
    # Full fine-tuning trains fp32 weights unless the run is bf16 (as trainer.config.model_dtype).
    weight_dtype = ("bfloat16" if precision == "bf16" else "float32") if m.type == "full" else compute
    targets: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    if lora is not None:
        from kubetune.trainer.config import ALL_LINEAR, resolve_target_modules

        resolved = resolve_target_modules(lora, model_type)
        targets = "all-linear" if resolved == ALL_LINEAR else tuple(resolved)
    packing = _packing_mode(t)
    gpus = max(1, spec.resources.gpus_per_node) * spec.resources.nodes
    # modulesToSave copies: TRL casts those of a quantized base to bf16; with nothing autocasting
    # (mixedPrecision no) the trainer gives them back the dtype of what they copy, float32
    # (kubetune.trainer.modeling.restore_copy_dtypes). On an unquantized base: the base's dtype.
    quantized_copies = "bfloat16" if precision != "no" else "float32"
    copies_dtype = quantized_copies if quant is not None else weight_dtype
    return Settings(
        method=m.type,
        bits=quant.bits if quant is not None else None,
        double_quant=bool(quant.double_quant) if quant is not None else False,
        compute_dtype=compute,
        weight_dtype=weight_dtype,
        frozen_dtype="float32",
        # peft's prepare_model_for_kbit_training upcasts the norms with the rest; without upcastNorms the
        # trainer casts them back to the compute dtype.
        norm_dtype="float32" if t.upcast_norms else compute,
        lora_r=lora.r if lora is not None else 0,
        lora_targets=targets,
        lora_dtype="bfloat16" if quant is not None else "float32",
        lora_dropout=bool(lora is not None and lora.dropout > 0),
        lora_dora=bool(lora is not None and lora.use_dora),
        modules_to_save=tuple(lora.modules_to_save or ()) if lora is not None else (),
        modules_to_save_dtype=copies_dtype,
        attn_implementation=getattr(spec.model, "attn_implementation", None) or "sdpa",
        optimizer=t.optimizer,
        batch_size=t.per_device_batch_size,
        seq_length=t.effective_block_size() if packing != "none" else t.max_seq_length,
        gradient_accumulation=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        gpus=gpus,
        distributed=t.distributed,
        real_token_fraction=1.0 if packing != "none" else (0.99 if t.group_by_length else 0.6),
    )


def _precision_dtype(precision: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def _packing_mode(training: Any) -> str:
    """``training.packing``, read by name: a bool before issue 9, none|wrapped|bfd after."""
    packing = getattr(training, "packing", False)
    if packing is True:
        return "wrapped"
    if packing in (False, None):
        return "wrapped" if getattr(training, "block_size", None) is not None else "none"
    return str(packing)


@dataclass(frozen=True)
class Estimate:
    """Peak memory per GPU, component by component (bytes), and the step's size and time."""

    components: dict[str, int]
    total_bytes: int  # peak per GPU, context and slack included
    tokens_per_step: int
    step_seconds: float | None
    epoch_seconds: float | None
    params: dict[str, int] = field(default_factory=dict)
    assumptions: dict[str, Any] = field(default_factory=dict)
    gpu: GpuInfo | None = None

    @property
    def allocated_bytes(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` counts: the peak without the context and slack."""
        c = self.components
        return self.total_bytes - c.get("cuda_context", 0) - c.get("allocator_slack", 0)

    def fits(self, memory_bytes: int) -> bool:
        return self.total_bytes <= memory_bytes

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "components": dict(self.components),
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "tokens_per_step": self.tokens_per_step,
            "step_seconds": self.step_seconds,
            "epoch_seconds": self.epoch_seconds,
            "params": dict(self.params),
            "assumptions": dict(self.assumptions),
        }
        if self.gpu is not None:
            out["gpu_info"] = asdict(self.gpu)
            out["fits"] = self.fits(self.gpu.memory_bytes)
        return out


def estimate(
    spec: FineTuneJobSpec,
    shape: ModelShape,
    gpu: GpuInfo | None = None,
    *,
    dataset_tokens: int | None = None,
) -> Estimate:
    """Peak memory per GPU, tokens per optimizer step and time per step for ``spec`` on ``gpu``.

    ``dataset_tokens``: tokens in one epoch, for the epoch time (unknown before the data is prepared:
    then the epoch time covers ``maxSteps`` steps)."""
    s = settings(spec, shape.model_type, gpu)
    steps = spec.training.effective_max_steps()
    return estimate_settings(
        s, shape, gpu, dataset_tokens=dataset_tokens, max_steps=steps if steps > 0 else None
    )


def _adapted(s: Settings, shape: ModelShape) -> tuple[tuple[str, int, int], ...]:
    """The decoder layer's linears LoRA adapts."""
    if s.method == "full" or s.lora_r <= 0:
        return ()
    if s.lora_targets == "all-linear":
        return shape.layer_linears
    targets = set(s.lora_targets)
    return tuple(lin for lin in shape.layer_linears if lin[0] in targets)


def _lora_params(s: Settings, shape: ModelShape) -> int:
    return shape.num_layers * sum(s.lora_r * (i + o) for _, i, o in _adapted(s, shape))


def _dora_params(s: Settings, shape: ModelShape) -> int:
    """DoRA's magnitude vectors: one entry per output feature of every adapted linear."""
    return shape.num_layers * sum(o for _, _, o in _adapted(s, shape)) if s.lora_dora else 0


def modules_to_save_params(shape: ModelShape, names: Sequence[str]) -> int:
    """Parameters of the full copies ``method.lora.modulesToSave`` trains, matched as peft matches them: a
    module is copied when its name, or one of its parents', ends with an entry (the outermost match holds
    the copy). On a model whose input embeddings and output head are one weight, naming either under
    peft's names trains one copy for both (peft's ``ensure_weight_tying``, which the trainer sets)."""
    if not names:
        return 0
    from kubetune.trainer.config import TIED_EMBEDDING_NAMES

    tied_copy = shape.tie_word_embeddings and any(n.rsplit(".", 1)[-1] in TIED_EMBEDDING_NAMES for n in names)
    total = 0
    for template, params in shape.modules:
        layers = range(shape.num_layers) if "{i}" in template else (None,)
        for i in layers:
            path = template.replace("{i}", str(i)) if i is not None else template
            parts = path.split(".")
            matched = any(".".join(parts[:k]).endswith(n) for n in names for k in range(1, len(parts) + 1))
            if tied_copy and path == shape.embedding_module:
                matched = True  # peft adds the embeddings, and ties the head to their copy
            elif tied_copy and path == "lm_head":
                matched = False
            if matched:
                total += params
    return total


def _optimizer_bytes(
    optimizer: str, params: int, matrices: Sequence[tuple[int, int]], dtype_bytes: int
) -> int:
    """State of the optimizer for ``params`` trainable parameters (``matrices``: their 2-D shapes)."""
    if optimizer in ("paged_adamw_32bit",):
        return 8 * params  # bitsandbytes keeps both moments in fp32 whatever the parameter dtype
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return 2 * dtype_bytes * params  # torch keeps the moments in the parameter's dtype
    if optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        return 2 * params + 2 * 4 * math.ceil(params / 256)  # int8 moments + an fp32 absmax per block
    if optimizer == "adafactor":
        # Factored second moment (a row and a column vector per matrix), no first moment.
        factored = sum(r + c for r, c in matrices)
        in_matrices = sum(r * c for r, c in matrices)
        return 4 * (factored + (params - in_matrices))
    if optimizer == "sgd":
        return 0  # transformers' "sgd" is torch SGD without momentum
    return 8 * params


def estimate_settings(
    s: Settings,
    shape: ModelShape,
    gpu: GpuInfo | None = None,
    *,
    dataset_tokens: int | None = None,
    max_steps: int | None = None,
) -> Estimate:
    """:func:`estimate` on resolved :class:`Settings`."""
    act_bytes = DTYPE_BYTES[s.compute_dtype]
    shard = s.gpus if s.distributed == "fsdp" and s.gpus > 1 else 1
    h, layers = shape.hidden_size, shape.num_layers
    tokens = s.batch_size * s.seq_length  # per GPU per forward pass

    # Weights.
    unquant = shape.unquantized_params
    norms = shape.norm_params
    if s.bits == 4:
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64)
        quantized = shape.quantizable_params * per_param
        frozen = (unquant - norms) * DTYPE_BYTES[s.frozen_dtype] + norms * DTYPE_BYTES[
            s.norm_dtype or s.frozen_dtype
        ]
    elif s.bits == 8:
        rows = layers * sum(o for _, _, o in shape.layer_linears)
        quantized = shape.quantizable_params * 1 + 4 * rows
        frozen = (unquant - norms) * DTYPE_BYTES[s.frozen_dtype] + norms * DTYPE_BYTES[
            s.norm_dtype or s.frozen_dtype
        ]
    else:
        quantized = 0
        wb = DTYPE_BYTES[s.weight_dtype]
        frozen = (shape.total_params - norms) * wb + norms * DTYPE_BYTES[s.norm_dtype or s.weight_dtype]
    weights = int((quantized + frozen) / shard)

    # Trainable parameters, their gradients and the optimizer state.
    if s.method == "full":
        trainable = shape.total_params
        tbytes = DTYPE_BYTES[s.weight_dtype]
        matrices = [(o, i) for _, i, o in shape.layer_linears] * layers
        lora = 0
    else:
        trainable = _lora_params(s, shape)
        tbytes = DTYPE_BYTES[s.lora_dtype]
        linears = _adapted(s, shape)
        matrices = [m for _, i, o in linears for m in ((s.lora_r, i), (o, s.lora_r))] * layers
        lora = trainable * tbytes
    gradients = trainable * tbytes
    optimizer = _optimizer_bytes(s.optimizer, trainable, matrices, tbytes)
    # DoRA's magnitudes stay float32 (TRL leaves them out of its bf16 cast: bf16 would freeze them).
    dora = _dora_params(s, shape) if s.method != "full" else 0
    copies = modules_to_save_params(shape, s.modules_to_save) if s.method != "full" else 0
    cbytes = DTYPE_BYTES[s.modules_to_save_dtype]
    lora += dora * 4
    gradients += dora * 4 + copies * cbytes
    optimizer += _optimizer_bytes(s.optimizer, dora, [], 4) + _optimizer_bytes(
        s.optimizer, copies, [], cbytes
    )
    trainable += dora + copies
    if s.distributed == "ddp" and s.gpus > 1:
        gradients *= 2  # DDP all-reduces through bucket buffers of its own, as large as the gradients
    gradients, optimizer, lora = gradients // shard, optimizer // shard, lora // shard
    modules_to_save = copies * cbytes // shard

    # Activations saved for the backward pass (SDPA/flash attention: no seq² scores).
    per_layer = _layer_activation_bytes(s, shape, act_bytes)
    grad_flow = tokens * h * 4 * 2  # the hidden-state gradient flowing back (fp32 in, compute dtype out)
    if s.gradient_checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; the backward recomputes one layer at a time
        # and holds that layer's saved tensors and the gradient flowing through it.
        activations = tokens * layers * h * act_bytes
        recompute = int(tokens * per_layer) + grad_flow
    else:
        activations = int(tokens * layers * per_layer)
        recompute = grad_flow
    # bitsandbytes dequantizes one weight at a time into a compute-dtype scratch (forward and backward).
    largest = max((i * o for _, i, o in shape.layer_linears), default=0)
    dequant = 2 * largest * act_bytes if s.bits is not None else 0
    dora_scratch = 0
    if s.lora_dora and s.method != "full":
        # peft's DoRA forward builds, per adapted linear, the update as a dense matrix (from an in x in
        # identity), the base weight (dequantized) and their sum for its row norms: transient, one linear
        # at a time. With dropout it also runs the base linear again on the dequantized weight, which
        # autograd keeps for the backward pass: a dense copy of every adapted weight of a layer.
        adapted = _adapted(s, shape)
        dora_scratch = max(((i * i + 3 * i * o) * act_bytes for _, i, o in adapted), default=0)
        if s.lora_dropout and s.bits is not None:
            kept = sum(i * o for _, i, o in adapted) * act_bytes
            if s.gradient_checkpointing:
                recompute += kept
            else:
                activations += layers * kept
    if shard > 1:
        # FSDP gathers one layer's full weights at a time (forward, and again in backward).
        dequant += int(2 * (weights * shard) / max(layers, 1))
    logits = _logits_bytes(s, shape, tokens, act_bytes)

    components = {
        "weights": weights,
        "lora": lora,
        "modules_to_save": modules_to_save,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": int(activations),
        "recompute": int(recompute),
        "dequant_scratch": int(dequant),
        "dora_scratch": int(dora_scratch),
        "logits": logits,
    }
    # The loss's buffers live at the end of the forward pass; the recomputed layer and the dequantization
    # scratch during the backward pass, after the loss's are freed: the peak holds the larger of the two.
    steady = weights + lora + modules_to_save + gradients + optimizer + int(activations)
    # bitsandbytes' dequantization and DoRA's dense matrices are each one linear's at a time.
    backward = int(recompute) + max(int(dequant), int(dora_scratch))
    peak_phase = "loss" if logits >= backward else "backward"
    allocated = steady + max(logits, backward)
    components["cuda_context"] = s.cuda_context_bytes
    components["allocator_slack"] = int(allocated * s.allocator_slack)
    total = allocated + components["cuda_context"] + components["allocator_slack"]

    tokens_per_step = tokens * s.gradient_accumulation * s.gpus
    step_seconds, epoch_seconds, flops_per_token = _timing(
        s, shape, gpu, tokens_per_step, dataset_tokens, max_steps
    )
    return Estimate(
        components=components,
        total_bytes=total,
        tokens_per_step=tokens_per_step,
        step_seconds=step_seconds,
        epoch_seconds=epoch_seconds,
        params={
            "total": shape.total_params,
            "quantized": shape.quantizable_params if s.bits else 0,
            "trainable": trainable,
        },
        assumptions={
            "counts": shape.source,
            "mfu": _mfu(s),
            "flops_per_token": flops_per_token,
            "batch_size": s.batch_size,
            "seq_length": s.seq_length,
            "gradient_accumulation": s.gradient_accumulation,
            "gpus": s.gpus,
            "gradient_checkpointing": s.gradient_checkpointing,
            "optimizer": s.optimizer,
            "bits": s.bits,
            "sharded_by": shard,
            "loss": s.loss,
            "peak_phase": peak_phase,
            "epoch_basis": "dataset_tokens"
            if dataset_tokens is not None
            else "max_steps"
            if max_steps
            else None,
        },
        gpu=gpu,
    )


def _logits_bytes(s: Settings, shape: ModelShape, tokens: int, b: int) -> int:
    """The LM head's output and the loss's buffers at their peak (the start of the backward pass)."""
    h, vocab = shape.hidden_size, shape.vocab_size
    if s.loss == "full":
        return tokens * vocab * 12
    if s.loss == "chunked":
        # Every chunk's bf16 logits are kept for backward; the fp32 upcast and its gradient one chunk at once.
        return tokens * vocab * b + 2 * 4 * tokens * vocab // max(s.loss_chunks, 1)
    # TRL's fused head: one [4096, 32768] tile and one weight slice in the compute dtype, the final hidden
    # state it saves (fp32: the fp32 final norm's output) and its fp32 gradient, and ~10 fp32 per-token stats.
    tile_tokens, tile_vocab = min(tokens, 4096), min(vocab, 32768)
    return tile_tokens * tile_vocab * b + tile_vocab * h * b + tokens * h * 8 + tokens * 40


def _layer_activation_bytes(s: Settings, shape: ModelShape, b: int) -> float:
    """Bytes one decoder layer saves for backward, per token (SDPA/flash: no seq² attention scores)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.attention_dim or h, shape.kv_dim or h
    norm = 4 * h + b * h  # the fp32 input the norm saves and its compute-dtype output
    attention = b * (q + 2 * kv) + b * q + 4 * shape.num_heads  # q, k, v, output; fp32 log-sum-exp
    mlp = 4 * b * i if shape.gated_mlp else 2 * b * i  # gate, act(gate), up, product / fc1, act
    total = 2 * norm + attention + mlp
    if s.attn_implementation == "eager":
        # Eager attention keeps seq x seq probabilities per head: its softmax's fp32 output, and under
        # autocast their cast to the compute dtype for the product with the values (measured: fp32 keeps
        # one, tests/test_plan.py), plus a repeated key/value head set.
        cast = b if b < 4 else 0
        total += shape.num_heads * s.seq_length * (4 + cast) + q * b
    for _, fan_in, fan_out in _adapted(s, shape):
        # Each adapter keeps its dropped-out input (cast to the compute dtype by autocast), the dropout
        # mask (1 byte) and its r-wide middle. Frozen linears keep no input: they need no weight gradient.
        total += ((b + 1) * fan_in if s.lora_dropout else 0) + b * s.lora_r
        if s.lora_dora:
            # DoRA scales the base output and the update by the magnitude: both kept for its gradient.
            total += 2 * b * fan_out
    return total


def _mfu(s: Settings) -> float:
    return ASSUMED_MFU_FULL if s.method == "full" else ASSUMED_MFU


def _timing(
    s: Settings,
    shape: ModelShape,
    gpu: GpuInfo | None,
    tokens_per_step: int,
    dataset_tokens: int | None,
    max_steps: int | None,
) -> tuple[float | None, float | None, float]:
    n = shape.total_params
    # Forward 2N; backward 2N for the input gradients, +2N for weight gradients when they are trained.
    per_token = (6.0 if s.method == "full" else 4.0) * n
    if s.gradient_checkpointing:
        per_token += 2.0 * n
    # Attention scores: 2 matmuls of seq x seq x heads x head_dim, causal (half), forward + backward.
    attn_fwd = 2 * 2 * shape.num_layers * s.seq_length * (shape.attention_dim or shape.hidden_size) / 2
    per_token += attn_fwd * (3 + (1 if s.gradient_checkpointing else 0))
    peak = None
    if gpu is not None:
        peak = gpu.bf16_flops if s.compute_dtype == "bfloat16" else gpu.fp16_flops
        if s.compute_dtype == "float32" and gpu.bf16_flops:
            peak = gpu.bf16_flops / 2  # TF32 tensor cores: half the bf16 rate
    if not peak:
        return None, None, per_token
    real = tokens_per_step * s.real_token_fraction
    step = tokens_per_step * per_token / (peak * _mfu(s) * s.gpus)
    epoch: float | None = None
    if dataset_tokens is not None:
        epoch = step * dataset_tokens / max(real, 1)
    elif max_steps is not None:
        epoch = step * max_steps
    return step, epoch, per_token


def unfit_message(est: Estimate, gpu_memory_bytes: int, source: str) -> str:
    """One line: needed vs available, the largest components, the fields to change."""
    biggest = sorted(
        ((k, v) for k, v in est.components.items() if k not in ("allocator_slack",)),
        key=lambda kv: kv[1],
        reverse=True,
    )[:3]
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in biggest)
    fixes = ["lower training.perDeviceBatchSize or training.maxSeqLength"]
    if not est.assumptions.get("gradient_checkpointing", False):
        fixes.append("turn training.gradientCheckpointing on")
    if est.assumptions.get("bits") != 4:
        fixes.append("use 4-bit method.quantization (method.type qlora)")
    fixes.append("pick a larger resources.gpuType")
    return (
        f"needs about {fmt_bytes(est.total_bytes)} per GPU but the GPU has {fmt_bytes(gpu_memory_bytes)} "
        f"({source}); largest: {parts}; {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# `kubetune plan FILE`
# --------------------------------------------------------------------------------------------------

# GPUs shown when neither the spec nor the command names one.
COMMON_GPUS = (
    "Tesla-T4",
    "NVIDIA-L4",
    "NVIDIA-A10G",
    "NVIDIA-GeForce-RTX-4090",
    "NVIDIA-L40S",
    "NVIDIA-A100-SXM4-40GB",
    "NVIDIA-A100-SXM4-80GB",
    "NVIDIA-H100-80GB-HBM3",
    "NVIDIA-H200",
)


@dataclass(frozen=True)
class Target:
    """A GPU to plan for: its memory, where that number came from, and its table entry (for its peak)."""

    name: str
    memory_bytes: int
    source: str
    info: GpuInfo | None


@dataclass(frozen=True)
class Report:
    """What `kubetune plan` prints: one estimate per GPU target."""

    job: str
    model: str
    shape: ModelShape
    targets: tuple[Target, ...]
    estimates: tuple[Estimate, ...]
    gated: bool  # a GPU was named (spec or command line): the exit code says whether it fits

    @property
    def fits(self) -> bool:
        return all(e.fits(t.memory_bytes) for t, e in zip(self.targets, self.estimates, strict=True))

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "model": self.model,
            "counts": self.shape.source,
            "shape": {k: v for k, v in asdict(self.shape).items() if k not in ("layer_linears", "modules")},
            "gpus": [
                {
                    **e.as_dict(),
                    "gpu": t.name,  # the table entry stays under "gpu_info"
                    "memory_bytes": t.memory_bytes,
                    "memory_source": t.source,
                    "fits": e.fits(t.memory_bytes),
                }
                for t, e in zip(self.targets, self.estimates, strict=True)
            ],
            "gated": self.gated,
            "fits": self.fits if self.gated else None,
        }


def model_config(
    spec: FineTuneJobSpec, base_dir: Any, *, token: str | None = None
) -> tuple[str, dict[str, Any]]:
    """``(model name, config.json)`` for ``model.path`` (relative to ``base_dir``, as the trainer resolves
    it) or ``model.id`` at ``model.revision`` from the Hub."""
    from pathlib import Path

    m = spec.model
    if m.path is not None:
        p = Path(m.path)
        if not p.is_absolute():
            p = Path(base_dir) / p
        return m.path, local_config(str(p))
    assert m.id is not None
    return f"{m.id}@{m.revision}", hub_config(m.id, m.revision, token=token)


def targets(spec: FineTuneJobSpec, gpu_type: str | None, gpu_memory: int | None) -> tuple[list[Target], bool]:
    """The GPUs to plan for, and whether one was named (so the fit gates the exit code)."""
    name = gpu_type or spec.resources.gpu_type
    info = gpu_info(name) if name else None
    if gpu_memory is not None:
        label = name or "GPU"
        return [Target(label, gpu_memory, "--gpu-memory", info)], True
    if name:
        if info is None:
            known = ", ".join(GPUS)
            where = "--gpu-type" if gpu_type else "resources.gpuType"
            raise PlanError(
                f"{where} {name!r} is not in the GPU table (known: {known}); pass --gpu-memory, e.g. 24GiB"
            )
        where = "--gpu-type" if gpu_type else "resources.gpuType"
        return [Target(info.product, info.memory_bytes, f"{where}, GPU table", info)], True
    return [Target(g, GPUS[g].memory_bytes, "GPU table", GPUS[g]) for g in COMMON_GPUS], False


def plan_job(
    job: Any,
    base_dir: Any,
    *,
    gpu_type: str | None = None,
    gpu_memory: int | None = None,
    token: str | None = None,
    dataset_tokens: int | None = None,
    shape: ModelShape | None = None,
) -> Report:
    """Plan a loaded FineTuneJob: the model's config, its shape (exact where transformers is installed),
    one estimate per GPU target. Raises PlanError when it cannot."""
    spec = job.spec
    gpus, gated = targets(spec, gpu_type, gpu_memory)
    model = spec.model.id or spec.model.path or ""
    if shape is None:
        model, config = model_config(spec, base_dir, token=token)
        shape = model_shape(config)
    estimates = tuple(estimate(spec, shape, t.info, dataset_tokens=dataset_tokens) for t in gpus)
    return Report(job.metadata.name, model, shape, tuple(gpus), estimates, gated)


LABELS = {
    "weights": "base weights",
    "lora": "LoRA parameters",
    "modules_to_save": "modulesToSave copies",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations (kept)",
    "recompute": "backward: recomputed layer",
    "dequant_scratch": "backward: dequant/gather scratch",
    "dora_scratch": "DoRA: dense update and weight norms",
    "logits": "logits and loss",
    "cuda_context": "CUDA context",
    "allocator_slack": "allocator slack",
}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(report: Report) -> Any:
    """The report as rich renderables (the CLI prints them)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    first = report.estimates[0]
    a = first.assumptions
    shape = report.shape
    head = Text(
        f"{report.job}: {report.model} ({shape.model_type}, {_count(shape.total_params)} parameters, "
        f"counts: {'exact, meta device' if shape.source == 'meta' else 'analytic, from config.json'}); "
        f"{_count(first.params['trainable'])} trainable; batch {a['batch_size']} x {a['seq_length']} tokens"
        f" x {a['gradient_accumulation']} accumulation x {a['gpus']} GPU(s)"
    )
    table = Table(title="memory per GPU", title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for key, value in first.components.items():
        table.add_row(LABELS.get(key, key), f"{value / GiB:.2f}")
    table.add_row(
        Text("peak (loss or backward buffers: the larger)", style="bold"),
        Text(f"{first.total_bytes / GiB:.2f}", style="bold"),
    )
    gpus = Table(title="per GPU", title_justify="left")
    last = {"dataset_tokens": "epoch", "max_steps": "maxSteps"}.get(
        first.assumptions["epoch_basis"] or "", "epoch"
    )
    for col in ("GPU", "memory GiB", "from", "peak GiB", "fits", "tokens/step", "step", last):
        gpus.add_column(col, justify="left" if col in ("GPU", "from", "fits") else "right")
    for t, e in zip(report.targets, report.estimates, strict=True):
        fits = e.fits(t.memory_bytes)
        gpus.add_row(
            t.name,
            f"{t.memory_bytes / GiB:.1f}",
            t.source,
            f"{e.total_bytes / GiB:.2f}",
            Text("yes" if fits else "NO", style="green" if fits else "bold red"),
            f"{e.tokens_per_step:,}",
            _duration(e.step_seconds),
            _duration(e.epoch_seconds),
        )
    note = Text(
        f"time: {a['flops_per_token'] / shape.total_params:.1f}N FLOPs per token at an assumed MFU of "
        f"{a['mfu']:.2f} of the GPU's dense bf16 peak; epoch: "
        + {"dataset_tokens": "one pass over --dataset-tokens", "max_steps": "the run's maxSteps steps"}.get(
            a["epoch_basis"] or "", "pass --dataset-tokens (tokens in one epoch) to estimate"
        )
        + ("" if report.gated else "; no GPU named: set resources.gpuType or pass --gpu-type to gate on it")
    )
    return Group(head, table, gpus, note)


__all__ = [
    "COMMON_GPUS",
    "GPUS",
    "LABELS",
    "Estimate",
    "GpuInfo",
    "ModelShape",
    "PlanError",
    "Report",
    "Settings",
    "Target",
    "estimate",
    "estimate_settings",
    "exact_shape",
    "fmt_bytes",
    "gpu_info",
    "hub_config",
    "local_config",
    "model_config",
    "model_shape",
    "parse_memory",
    "plan_job",
    "render",
    "settings",
    "shape_from_config",
    "targets",
    "unfit_message",
]
