"""QLoRA training throughput and peak memory on one GPU: plain TRL with padding against kubetune's packing.

One process, one GPU, one run, every figure measured side by side:

- the model: a random-weight Llama-3-8B (hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate
  14336, vocabulary 128256, rope theta 500000) built from its config and quantized to 4-bit nf4 with
  double quantization while it loads (transformers' own bitsandbytes path, ``from_pretrained`` with a
  state dict made on the GPU: nothing is written to disk or downloaded);
- the data: ``bench/data/guanaco_like.npz`` (``hack/make_bench_data.py``), 2,000 pre-tokenized rows
  with openassistant-guanaco's length distribution (median 310 tokens, a tail to 3.4k);
- the configurations, each on a freshly loaded model, in this order:
  ``trl-padded`` (what a user writes: from_pretrained + prepare_model_for_kbit_training + SFTTrainer on
  the tokenized rows, TRL's padded batches, random order), ``kubetune-bfd`` (kubetune's own functions:
  ``modeling.load_model``, ``config.sft_config_kwargs``, ``packing.pack``/``data_collator`` with
  ``training.packing: bfd``), ``kubetune-padded`` (kubetune's default, ``packing: none`` with
  ``groupByLength``) and ``kubetune-bfd-liger`` (bfd plus Liger's kernels; skipped unless the
  ``liger_kernel`` wheel is there). The same LoRA (kubetune's defaults: r 64 on the 7 projections),
  optimizer (paged AdamW 32-bit), batch size 4 x 2048 tokens, gradient checkpointing and bf16 in all;
- per configuration: warm-up steps (excluded), then a fixed time budget (``--seconds``) or step cap.

Reported per configuration: real tokens/s (tokens that are not padding, counted in the batches the
collator built and checked against the Trainer's ``num_input_tokens_seen``), padding efficiency, MFU at
4N FLOPs per token (LoRA on a frozen base: forward and input gradients; N = all parameters, 8.03 B, as
the planner counts them) against the GPU's dense bf16 peak (``kubetune.plan.gpu_info``),
``torch.cuda.max_memory_allocated`` plus the paged optimizer state (bitsandbytes keeps it in CUDA
managed memory, which torch does not count), and ``kubetune.plan.estimate``'s figure for the same spec
beside it (goal: within ±10 %). A table goes to stdout; the JSON to ``--json`` (default ``$OUT/gpu.json``
when ``$OUT`` is set), rewritten after each configuration so a cut-short run still reports.

The GPU machine (an H200; torch 2.11 but no trl, bitsandbytes, datasets or pydantic) gets the missing
wheels from ``hack/gpu_carry.sh`` (which also checks the 64 MiB carry). The device command, one line
(``DEVICE_COMMAND``; ``bench/gpu.py --device-command`` prints it, unwrapped):

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
    --upgrade --target /tmp/site-packages .whl/*.whl && export PYTHONPATH=/tmp/site-packages:$PWD/src || exit;
    nvidia-smi -L; PYTHONUNBUFFERED=1 timeout 570 python3 bench/gpu.py 2>&1 | tee $OUT/gpu.log

(one line, carry ``[".whl"]``, timeout_s 600; ends in ~6 minutes on an H200 with the defaults). The
folder's name holds "site-packages" on purpose: dill, which datasets hashes its maps with, pickles
modules from any other folder by value.

``--tiny`` runs the same code path on the CPU in ~30 s: a 2-layer Llama of hidden size 64 (same
vocabulary, 4-bit through bitsandbytes' CPU kernels, float32 compute), 64 rows, a few steps
(tests/test_bench_gpu.py runs it).

Run: ``.venv/bin/python bench/gpu.py [--tiny] [--seconds S] [--configs a,b] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Nothing is downloaded (the GPU machine has no network: a Hub lookup would only wait for its timeout).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # the device machine runs the checkout, kubetune is not installed there

DATA = ROOT / "bench" / "data" / "guanaco_like.npz"

# meta-llama/Meta-Llama-3-8B's config.json (the shape only; the weights are random).
LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
# The same family at a size a CPU trains in a second a step (--tiny); a 4,096-id vocabulary, as the
# vocabulary-sized loss would take most of a CPU's time (the data's ids are folded into it).
TINY: dict[str, Any] = {
    **LLAMA3_8B,
    "vocab_size": 4096,
    "bos_token_id": 4096 - 256,
    "eos_token_id": 4096 - 255,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

# Llama 3's last 256 ids are special tokens; these three, by offset from the first special id.
SPECIALS = 256
BOS, EOS, PAD = 0, 1, 4
SPECIAL_NAMES = {BOS: "<|begin_of_text|>", EOS: "<|end_of_text|>", PAD: "<|finetune_right_pad_id|>"}
DATA_SPECIAL_BASE = 128000  # in the data file (Llama 3's ids)
DEVICE_COMMAND = (
    "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site-packages .whl/*.whl && export PYTHONPATH=/tmp/site-packages:$PWD/src || exit; "
    "nvidia-smi -L; PYTHONUNBUFFERED=1 timeout 570 python3 bench/gpu.py 2>&1 | tee $OUT/gpu.log"
)
CONFIGS = ("trl-padded", "kubetune-bfd", "kubetune-padded", "kubetune-bfd-liger")
SEED = 42
# Dense bf16 tensor-core peaks, for a GPU kubetune.plan's table does not know (by name substring).
FALLBACK_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
GiB = 1 << 30

log = logging.getLogger("bench.gpu")


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    tiny: bool
    batch_size: int
    seq_length: int
    rows: int
    warmup_steps: int
    seconds: float
    max_steps: int
    deadline: float  # seconds since start after which no configuration starts
    configs: tuple[str, ...]
    json_path: Path | None

    @property
    def model_config(self) -> dict[str, Any]:
        return TINY if self.tiny else LLAMA3_8B


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--tiny", action="store_true", help="a tiny Llama on the CPU: the smoke test of this script"
    )
    p.add_argument("--batch-size", type=int, help="rows (bins with bfd) per step; default 4 (tiny: 2)")
    p.add_argument("--seq-length", type=int, help="training.maxSeqLength; default 2048 (tiny: 256)")
    p.add_argument("--rows", type=int, help="rows of the dataset used; default all 2000 (tiny: 64)")
    p.add_argument("--warmup", type=int, help="steps before the measurement; default 3 (tiny: 1)")
    p.add_argument("--seconds", type=float, help="measured seconds per configuration; default 40")
    p.add_argument(
        "--steps", type=int, help="measured steps per configuration at most; default 200 (tiny: 2)"
    )
    p.add_argument("--deadline", type=float, default=420.0, help="start no configuration after this many s")
    p.add_argument("--configs", help=f"comma-separated, from {','.join(CONFIGS)}; default all")
    p.add_argument("--device-command", action="store_true", help="print the GPU machine's command, exit")
    p.add_argument("--json", type=Path, help="write the results here (default $OUT/gpu.json if $OUT is set)")
    a = p.parse_args(argv)
    if a.device_command:
        print(DEVICE_COMMAND)
        sys.exit(0)
    configs = tuple(c.strip() for c in a.configs.split(",")) if a.configs else CONFIGS
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    json_path = a.json
    if json_path is None and os.environ.get("OUT"):
        json_path = Path(os.environ["OUT"]) / "gpu.json"
    t = a.tiny
    return Settings(
        tiny=t,
        batch_size=a.batch_size or (2 if t else 4),
        seq_length=a.seq_length or (256 if t else 2048),
        rows=a.rows or (64 if t else 2000),
        warmup_steps=max(1, a.warmup if a.warmup is not None else (1 if t else 3)),
        seconds=a.seconds if a.seconds is not None else (60.0 if t else 40.0),
        max_steps=a.steps or (2 if t else 200),
        deadline=a.deadline,
        configs=configs,
        json_path=json_path,
    )


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# --------------------------------------------------------------------------------------------------


def write_model_folder(folder: Path, config: dict[str, Any]) -> None:
    """config.json and a stand-in tokenizer (Llama 3's 128,256 ids and special tokens, no merges: the
    data is already tokenized) — what ``model.path`` points at; the weights come from
    :func:`random_weights`."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    base = config["vocab_size"] - SPECIALS
    vocab = {f"t{i}": i for i in range(base)}
    vocab.update({SPECIAL_NAMES.get(k, f"<|reserved_special_token_{k}|>"): base + k for k in range(SPECIALS)})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_NAMES[EOS])),
        bos_token=SPECIAL_NAMES[BOS],
        eos_token=SPECIAL_NAMES[EOS],
        pad_token=SPECIAL_NAMES[PAD],
        model_max_length=config["max_position_embeddings"],
    )
    tokenizer.save_pretrained(folder)


def count_params(config: dict[str, Any]) -> int:
    """Parameters of the model of ``config``, counted on the meta device (N in 4N FLOPs per token)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
    return sum(p.numel() for p in model.parameters())


def random_state_dict(config: Any, device: Any, dtype: Any, seed: int) -> dict[str, Any]:
    """Every weight of a model of ``config``: N(0, initializer_range), norms 1, made on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    out = {}
    for name, meta in skeleton.state_dict().items():
        t = torch.empty(meta.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, std, generator=gen)
        out[name] = t
    return out


@contextlib.contextmanager
def random_weights(seed: int) -> Iterator[None]:
    """Make ``AutoModelForCausalLM.from_pretrained(folder, ...)`` load random weights for the folder's
    config.json through the normal loading path (quantization_config, device_map, dtype and
    attn_implementation as given), from a state dict built on the target device. This is how both the
    plain-TRL script and ``kubetune.trainer.modeling.load_model`` get their model unchanged."""
    from unittest import mock

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    def from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
        config = AutoConfig.from_pretrained(name)
        for key in ("trust_remote_code", "revision", "token"):
            kwargs.pop(key, None)
        device_map = kwargs.get("device_map")
        target = device_map.get("") if isinstance(device_map, dict) else device_map
        if isinstance(target, int):
            device = torch.device("cuda", target)
        elif target is None or target == "auto":
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        else:
            device = torch.device(target)
        dtype = kwargs.get("dtype") or torch.bfloat16
        state = random_state_dict(config, device, dtype, seed)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, *args, config=config, state_dict=state, **kwargs
        )
        model.config.name_or_path = name
        del state
        gc.collect()
        return model

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", from_pretrained):
        yield


def load_rows(path: Path, rows: int, vocab_size: int) -> list[list[int]]:
    """The first ``rows`` rows of the carried pre-tokenized dataset, untruncated, in a vocabulary of
    ``vocab_size`` (Llama 3's: unchanged; a smaller one: regular ids folded, special ids kept)."""
    import numpy as np

    with np.load(path) as data:
        lengths = data["lengths"].astype(np.int64)[:rows]
        tokens = data["tokens"][: int(lengths.sum())].astype(np.int64)
    base = vocab_size - SPECIALS
    if base != DATA_SPECIAL_BASE:
        special = tokens >= DATA_SPECIAL_BASE
        tokens = np.where(special, tokens - DATA_SPECIAL_BASE + base, tokens % base)
    ends = np.cumsum(lengths)
    return [tokens[e - n : e].tolist() for n, e in zip(lengths, ends, strict=True)]


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


@dataclass
class BatchCount:
    real: int  # input tokens that are not padding
    total: int  # input tokens, padding included
    loss: int  # labels != -100
    shape: tuple[int, ...]


class CountingCollator:
    """Wraps the collator the trainer uses and records each batch it builds, in order (one batch per
    optimizer step here: gradient accumulation is 1)."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]], pad_id: int) -> None:
        self.inner = inner
        self.pad_id = pad_id
        self.batches: list[BatchCount] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int((ids != self.pad_id).sum())
        loss = int((batch["labels"] != -100).sum()) if "labels" in batch else real
        self.batches.append(BatchCount(real, int(ids.numel()), loss, tuple(ids.shape)))
        return batch


def _meter_class() -> Any:
    from transformers import TrainerCallback

    class Meter(TrainerCallback):  # type: ignore[misc]
        """Times each optimizer step (GPU synchronized) and stops training after the warm-up steps and
        the measured budget."""

        def __init__(self, warmup: int, seconds: float, max_steps: int, sync: Callable[[], None]) -> None:
            self.warmup, self.seconds, self.max_steps, self.sync = warmup, seconds, max_steps, sync
            self.step_ends: list[float] = []
            self.tokens_seen: list[int] = []
            self.losses: list[float] = []
            self.started = 0.0
            self.cut_short = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sync()
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sync()
            now = time.perf_counter()
            self.step_ends.append(now)
            self.tokens_seen.append(int(getattr(state, "num_input_tokens_seen", 0) or 0))
            n = len(self.step_ends)
            if n == self.warmup:
                print(f"[bench]   warm-up: {n} steps in {now - self.started:.1f} s", flush=True)
            if n > self.warmup:
                window = now - self.step_ends[self.warmup - 1]
                if window >= self.seconds or n - self.warmup >= self.max_steps:
                    control.should_training_stop = True
            elif now - self.started > 4 * self.seconds + 120:
                # Warm-up alone ran past any budget: stop, report what there is.
                self.cut_short = True
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and isinstance(logs.get("loss"), (int, float)):
                self.losses.append(float(logs["loss"]))

    return Meter


def paged_optimizer_bytes(optimizer: Any) -> tuple[int, int]:
    """``(all optimizer state bytes, those in bitsandbytes' paged (CUDA managed) memory)``."""
    import torch

    total = paged = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
                if getattr(value, "is_paged", False):
                    paged += value.numel() * value.element_size()
    return total, paged


# --------------------------------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------------------------------


def job_spec(
    s: Settings, model_dir: Path, *, packing: str, group_by_length: bool, gpu_type: str | None
) -> Any:
    """The FineTuneJob spec a configuration trains (kubetune's defaults but the bench's batch shape)."""
    from kubetune.api.v1alpha1 import FineTuneJob

    spec: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        # Never read: the rows come pre-tokenized (their lengths follow this dataset's).
        "dataset": {"id": "timdettmers/openassistant-guanaco", "format": "text"},
        "method": {"type": "qlora"},
        "training": {
            "maxSteps": 100_000,  # the Meter stops each run
            "perDeviceBatchSize": s.batch_size,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": s.seq_length,
            "packing": packing,
            "groupByLength": group_by_length,
            "gradientCheckpointing": True,
            "loggingSteps": 5,
            "seed": SEED,
        },
        "resources": {"gpusPerNode": 0 if s.tiny else 1, **({"gpuType": gpu_type} if gpu_type else {})},
    }
    if s.tiny:
        spec["method"]["quantization"] = {"computeDtype": "float32"}  # CPUs: no bf16 4-bit matmuls
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench"},
            "spec": spec,
        }
    )
    return job.spec


@dataclass
class Built:
    """A configuration ready to train."""

    trainer: Any
    model: Any
    spec: Any  # the spec the planner estimates
    collator: CountingCollator
    meter: Any
    attention: str
    dataset_rows: int
    notes: list[str] = field(default_factory=list)


def _bench_overrides(s: Settings, out_dir: str) -> dict[str, Any]:
    """What the bench changes in any SFTConfig: its own stop, no checkpoints, a log every 5 steps."""
    return {
        "output_dir": out_dir,
        "max_steps": s.warmup_steps + s.max_steps + 1,
        "save_strategy": "no",
        "logging_steps": 5,
        "report_to": "none",
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",  # as kubetune's train.py
    }


def build_trl(s: Settings, ctx: Context, name: str, out_dir: str) -> Built:
    """Plain TRL as a user writes it: the QLoRA recipe and SFTTrainer on the tokenized rows, padded."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from kubetune.trainer import config as cfg

    spec = job_spec(s, ctx.model_dir, packing="none", group_by_length=False, gpu_type=ctx.gpu_type)
    compute = torch.float32 if s.tiny else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    with random_weights(SEED):
        model = AutoModelForCausalLM.from_pretrained(
            str(ctx.model_dir),
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            dtype=compute,
            device_map={"": 0 if ctx.cuda else "cpu"},
        )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(**cfg.lora_config_kwargs(spec, "llama"))  # the same adapter as kubetune's
    args = SFTConfig(
        **{
            **_bench_overrides(s, out_dir),
            "max_length": s.seq_length,
            "per_device_train_batch_size": s.batch_size,
            "gradient_accumulation_steps": 1,
            "learning_rate": 2e-4,
            "lr_scheduler_type": "constant",
            "optim": "paged_adamw_32bit",
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": False},
            "bf16": ctx.bf16,
            "fp16": False,
            "use_cpu": not ctx.cuda,
            "seed": SEED,
        }
    )
    meter = ctx.meter(s)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ctx.rows}),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[meter],
    )
    trainer.remove_callback(PrinterCallback)
    collator = CountingCollator(trainer.data_collator, int(tokenizer.pad_token_id))
    trainer.data_collator = collator
    impl = getattr(model.config, "_attn_implementation", None)
    return Built(trainer, model, spec, collator, meter, f"padded rows, {impl}", len(trainer.train_dataset))


def build_kubetune(s: Settings, ctx: Context, name: str, out_dir: str) -> Built:
    """kubetune's trainer pieces, as train.py calls them, on the rows its prepare step would hand over."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from kubetune.trainer import config as cfg
    from kubetune.trainer import modeling, packing

    bfd = name.startswith("kubetune-bfd")
    spec = job_spec(
        s, ctx.model_dir, packing="bfd" if bfd else "none", group_by_length=True, gpu_type=ctx.gpu_type
    )
    tokenizer = modeling.load_tokenizer(spec, ctx.model_dir)
    with random_weights(SEED):
        model = modeling.load_model(spec, ctx.model_dir, ctx.hw)
    # What kubetune's prepare step hands to training: rows truncated to maxSeqLength, labels on every
    # token (text format), then packed as training.packing says.
    rows = [r[: s.seq_length] for r in ctx.rows]
    train = packing.pack(Dataset.from_dict({"input_ids": rows, "labels": rows}), spec)
    kwargs = cfg.sft_config_kwargs(spec, out_dir, has_eval=False, hw=ctx.hw)
    kwargs.update(_bench_overrides(s, out_dir))
    kwargs["dataset_kwargs"] = {"skip_prepare_dataset": True}  # as train.py: tokenized, truncated, packed
    notes: list[str] = []
    if name.endswith("-liger"):
        kwargs["use_liger_kernel"] = True
        notes.append("Liger kernels (RMSNorm, RoPE, SwiGLU; TRL keeps its own chunked loss)")
    meter = ctx.meter(s)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use_liger_kernel.*", category=FutureWarning)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**kwargs),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=modeling.lora_config(spec, model),
            data_collator=packing.data_collator(spec, tokenizer, model),
            callbacks=[meter],
        )
    trainer.remove_callback(PrinterCallback)
    collator = CountingCollator(trainer.data_collator, int(tokenizer.pad_token_id))
    trainer.data_collator = collator
    plan = getattr(model, "kubetune_attention", None)
    if plan is not None and hasattr(plan, "describe"):
        attention = str(plan.describe())
    else:
        attention = f"padded rows, {getattr(model.config, '_attn_implementation', None)}"
    return Built(trainer, model, spec, collator, meter, attention, len(train), notes)


BUILDERS: dict[str, Callable[[Settings, Context, str, str], Built]] = {
    "trl-padded": build_trl,
    "kubetune-bfd": build_kubetune,
    "kubetune-padded": build_kubetune,
    "kubetune-bfd-liger": build_kubetune,
}
DESCRIPTIONS = {
    "trl-padded": "plain TRL: padded batches in random order",
    "kubetune-bfd": "kubetune, training.packing bfd (no attention across rows)",
    "kubetune-padded": "kubetune, training.packing none with groupByLength (the default)",
    "kubetune-bfd-liger": "kubetune bfd with Liger kernels",
}


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every configuration shares."""

    model_dir: Path
    rows: list[list[int]]
    cuda: bool
    bf16: bool
    hw: Any  # kubetune.trainer.config.Hardware
    gpu_type: str | None  # the nvidia.com/gpu.product form of the GPU's name
    peak_flops: float | None
    flops_params: int  # N in 4N FLOPs per token
    shape: Any  # kubetune.plan.ModelShape
    gpu: Any  # kubetune.plan.GpuInfo | None
    meter_cls: Any

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def meter(self, s: Settings) -> Any:
        return self.meter_cls(s.warmup_steps, s.seconds, s.max_steps, self.sync)


def skip_reason(name: str, ctx: Context) -> str | None:
    if name.endswith("-liger"):
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed (carry its wheel: hack/gpu_carry.sh)"
        if not ctx.cuda:
            return "Liger's kernels need a GPU"
    return None


def run_config(s: Settings, ctx: Context, name: str) -> dict[str, Any]:
    """Build, train for the budget, measure; the result row (status failed with the error on an
    exception: the other configurations still run)."""
    import torch

    result: dict[str, Any] = {"name": name, "description": DESCRIPTIONS[name], "status": "failed"}
    started = time.perf_counter()
    # What an earlier configuration left allocated (none, unless something leaked) is not this one's.
    before = torch.cuda.memory_allocated() if ctx.cuda else 0
    result["allocated_before_bytes"] = before if ctx.cuda else None
    built: Built | None = None
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as out_dir:
            built = BUILDERS[name](s, ctx, name, out_dir)
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            static = torch.cuda.memory_allocated() if ctx.cuda else None
            result["setup_seconds"] = round(time.perf_counter() - started, 1)
            built.trainer.train()
            result.update(measure(s, ctx, built, static, before))
            result["status"] = "ok" if not built.meter.cut_short else "cut_short"
    except Exception as exc:  # one configuration failing must not lose the others' figures
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
        print(f"[bench] {name} failed:\n{result['traceback']}", file=sys.stderr)
    finally:
        if built is not None:
            del built.trainer, built.model
        built = None
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
            result["allocated_after_cleanup_bytes"] = torch.cuda.memory_allocated()
        result["config_seconds"] = round(time.perf_counter() - started, 1)
    return result


def measure(s: Settings, ctx: Context, b: Built, static: int | None, before: int) -> dict[str, Any]:
    import torch

    meter, batches = b.meter, b.collator.batches
    n = len(meter.step_ends)
    w = min(s.warmup_steps, n)
    measured = batches[w:n]
    seconds = meter.step_ends[n - 1] - meter.step_ends[w - 1] if n > w else 0.0
    real = sum(x.real for x in measured)
    total = sum(x.total for x in measured)
    trainer_real = meter.tokens_seen[n - 1] - meter.tokens_seen[w - 1] if n > w else 0
    tps = real / seconds if seconds > 0 else None
    out: dict[str, Any] = {
        "attention": b.attention,
        "notes": b.notes,
        "dataset_rows": b.dataset_rows,
        "warmup_steps": w,
        "steps_measured": n - w,
        "seconds_measured": round(seconds, 3),
        "step_seconds_mean": round(seconds / (n - w), 4) if n > w else None,
        "real_tokens": real,
        "padded_tokens": total,
        "loss_tokens": sum(x.loss for x in measured),
        "trainer_tokens_seen": trainer_real,
        "tokens_agree": trainer_real == real,
        "largest_batch_tokens": max((x.total for x in measured), default=0),
        "tokens_per_second": round(tps, 1) if tps is not None else None,
        "padded_tokens_per_second": round(total / seconds, 1) if seconds > 0 else None,
        "padding_efficiency": round(real / total, 4) if total else None,
        "mfu": round(tps * 4 * ctx.flops_params / ctx.peak_flops, 4) if tps and ctx.peak_flops else None,
        "losses": [round(x, 4) for x in meter.losses],
    }
    opt_total, opt_paged = paged_optimizer_bytes(b.trainer.optimizer)
    out["optimizer_state_bytes"] = opt_total
    out["paged_optimizer_bytes"] = opt_paged
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated()
        free, total_mem = torch.cuda.mem_get_info()
        out.update(
            static_allocated_bytes=static,
            max_memory_allocated=peak,
            max_memory_reserved=torch.cuda.max_memory_reserved(),
            device_used_bytes=total_mem - free,
            measured_peak_bytes=peak - before + opt_paged,
        )
    else:
        out.update(
            static_allocated_bytes=None,
            max_memory_allocated=None,
            max_memory_reserved=None,
            device_used_bytes=None,
            measured_peak_bytes=None,
        )
    out.update(planner(b.spec, ctx, out["measured_peak_bytes"], out["step_seconds_mean"]))
    return out


def planner(spec: Any, ctx: Context, measured: int | None, step_seconds: float | None) -> dict[str, Any]:
    """kubetune.plan's estimate for the configuration's spec, and how far it is from the measurement."""
    try:
        from kubetune import plan

        est = plan.estimate(spec, ctx.shape, ctx.gpu)
        components = dict(est.components)
        allocated = getattr(est, "allocated_bytes", None)
        if allocated is None:
            allocated = (
                est.total_bytes - components.get("cuda_context", 0) - components.get("allocator_slack", 0)
            )
        return {
            "estimate": est.as_dict(),
            "estimate_allocated_bytes": int(allocated),
            "estimate_total_bytes": int(est.total_bytes),
            "estimate_error": round(allocated / measured - 1, 4) if measured else None,
            "estimate_step_seconds": est.step_seconds,
            "estimate_step_error": round(est.step_seconds / step_seconds - 1, 4)
            if est.step_seconds and step_seconds
            else None,
        }
    except Exception as exc:  # the planner is optional to the throughput figures
        return {
            "estimate": {"error": f"{type(exc).__name__}: {exc}"},
            "estimate_allocated_bytes": None,
            "estimate_total_bytes": None,
            "estimate_error": None,
            "estimate_step_seconds": None,
            "estimate_step_error": None,
        }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "liger-kernel",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine(cuda: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "versions": versions()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_bytes=int(props.total_memory),
            cuda=torch.version.cuda,
        )
    else:
        info.update(gpu=None, capability=None, gpu_memory_bytes=None, cuda=None)
    return info


def peak_flops(gpu: Any, name: str | None) -> float | None:
    if gpu is not None and getattr(gpu, "bf16_flops", None):
        return float(gpu.bf16_flops)
    if name:
        return next((v for k, v in FALLBACK_PEAKS.items() if k in name.upper()), None)
    return None


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    base = next((r for r in results if r["name"] == "trl-padded" and r.get("tokens_per_second")), None)
    out: dict[str, float] = {}
    if base is None:
        return out
    for r in results:
        if r is not base and r.get("tokens_per_second"):
            out[f"{r['name']} / trl-padded tokens/s"] = round(
                r["tokens_per_second"] / base["tokens_per_second"], 3
            )
            if r.get("measured_peak_bytes") and base.get("measured_peak_bytes"):
                out[f"{r['name']} / trl-padded peak memory"] = round(
                    r["measured_peak_bytes"] / base["measured_peak_bytes"], 3
                )
    return out


def _gib(n: Any) -> str:
    return f"{n / GiB:.2f}" if isinstance(n, (int, float)) else "-"


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def table(report: dict[str, Any]) -> str:
    head = ("config", "status", "steps", "real tok/s", "pad eff", "MFU", "peak GiB", "plan GiB", "plan err")
    lines = [head]
    for r in report["configs"]:
        lines.append(
            (
                r["name"],
                r["status"],
                _cell(r, "steps_measured", "d"),
                _cell(r, "tokens_per_second", ",.0f"),
                _cell(r, "padding_efficiency", ".3f"),
                _cell(r, "mfu", ".3f"),
                _gib(r.get("measured_peak_bytes")),
                _gib(r.get("estimate_allocated_bytes")),
                _cell(r, "estimate_error", "+.1%"),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines)
    for key, value in report["ratios"].items():
        text += f"\n{key}: {value:.2f}x"
    return text


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    s = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not s.tiny
    if not s.tiny and not cuda:
        print("bench/gpu.py needs a CUDA GPU (or --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    quiet_libraries()
    from kubetune import plan
    from kubetune.trainer import config as cfg

    info = machine(cuda)
    gpu_type = str(info["gpu"]).replace(" ", "-") if cuda else None
    gpu = plan.gpu_info(gpu_type) if gpu_type else None
    shape = plan.shape_from_config(s.model_config)
    params = count_params(s.model_config)
    rows = load_rows(DATA, s.rows, int(s.model_config["vocab_size"]))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = Path(tmp) / ("llama-tiny" if s.tiny else "llama-3-8b-random")
        write_model_folder(model_dir, s.model_config)
        ctx = Context(
            model_dir=model_dir,
            rows=rows,
            cuda=cuda,
            bf16=bool(cuda and torch.cuda.is_bf16_supported()),
            hw=cfg.Hardware(cuda=cuda, bf16_supported=bool(cuda and torch.cuda.is_bf16_supported())),
            gpu_type=gpu_type,
            peak_flops=peak_flops(gpu, info["gpu"]),
            flops_params=params,
            shape=shape,
            gpu=gpu,
            meter_cls=_meter_class(),
        )
        lengths = [len(r) for r in rows]
        report: dict[str, Any] = {
            "bench": "gpu",
            "tiny": s.tiny,
            "machine": info,
            "model": {
                "config": s.model_config,
                "total_params": params,
                "planner_total_params": shape.total_params,
                "quantizable_params": shape.quantizable_params,
                "flops_per_token": 4 * ctx.flops_params,
                "peak_flops": ctx.peak_flops,
            },
            "data": {
                "file": str(DATA.relative_to(ROOT)),
                "rows": len(rows),
                "tokens": sum(lengths),
                "mean_length": round(sum(lengths) / len(lengths), 1),
                "max_length": max(lengths),
            },
            "settings": {
                "batch_size": s.batch_size,
                "seq_length": s.seq_length,
                "warmup_steps": s.warmup_steps,
                "seconds": s.seconds,
                "max_steps": s.max_steps,
                "deadline": s.deadline,
            },
            "configs": [],
            "ratios": {},
        }
        gpu_line = f"{info['gpu']} (sm_{info['capability']})" if cuda else "CPU only"
        print(f"machine: {gpu_line}, {os.cpu_count()} CPUs, {json.dumps(info['versions'])}", flush=True)
        longest = 0.0
        for name in s.configs:
            elapsed = time.perf_counter() - start
            reason = skip_reason(name, ctx)
            if reason is None and elapsed + longest > s.deadline:
                reason = f"deadline: {elapsed:.0f} s spent, the longest configuration took {longest:.0f} s"
            if reason is not None:
                result: dict[str, Any] = {
                    "name": name,
                    "description": DESCRIPTIONS[name],
                    "status": "skipped",
                }
                result["reason"] = reason
            else:
                print(f"[bench] {name}: {DESCRIPTIONS[name]} (at {elapsed:.0f} s)", flush=True)
                result = run_config(s, ctx, name)
                longest = max(longest, float(result.get("config_seconds", 0)))
            report["configs"].append(result)
            report["ratios"] = ratios(report["configs"])
            report["elapsed_seconds"] = round(time.perf_counter() - start, 1)
            write_json(s.json_path, report)
            brief = {k: result.get(k) for k in ("status", "tokens_per_second", "mfu", "measured_peak_bytes")}
            print(f"[bench] {name}: {json.dumps(brief)} {result.get('reason') or result.get('error') or ''}")
    print(table(report), flush=True)
    print(f"elapsed {report['elapsed_seconds']:.0f} s", flush=True)
    return 0 if any(r["status"] == "ok" for r in report["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
