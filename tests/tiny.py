"""Tiny random-weight models of real architectures, built offline from configs, for the trainer tests.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in-process with ``tokenizers``
on a small generated corpus, and the models are ``LlamaForCausalLM`` / ``FalconForCausalLM`` /
``BloomForCausalLM`` built from small configs with seeded random weights, saved with ``save_pretrained``.

Also used by ``hack/make_tiny_model.py`` to (re)generate ``jobs/tiny/`` deterministically.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

# A ChatML-style template (the tokenizer saves it in tokenizer_config.json / chat_template.jinja).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

ARCHITECTURES = ("llama", "falcon", "bloom")

# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
}
_WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "garden", "rocket",
    "silver", "forest", "window", "pencil", "dragon", "orange", "planet", "bridge", "castle", "meadow",
]  # fmt: skip


def alpaca_rows(n: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct, deterministic Alpaca-style rows (instruction/input/output): arithmetic, word
    reversal, capital letters, letter counts, capitals. At most 236."""
    rng = random.Random(seed)
    pool: list[dict[str, str]] = []
    for word in _WORDS:
        pool.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        pool.append(
            {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}
        )
        pool.append(
            {"instruction": "How many letters are in the word?", "input": word, "output": str(len(word))}
        )
    for country, capital in _CAPITALS.items():
        pool.append(
            {
                "instruction": f"What is the capital of {country}?",
                "input": "",
                "output": f"The capital of {country} is {capital}.",
            }
        )
    for a, b in rng.sample([(x, y) for x in range(30) for y in range(30)], 100):
        pool.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
    for a, b in rng.sample([(x, y) for x in range(40) for y in range(x + 1)], 60):
        pool.append(
            {
                "instruction": "Subtract the second number from the first.",
                "input": f"{a} - {b}",
                "output": str(a - b),
            }
        )
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} distinct rows")
    rng.shuffle(pool)
    return pool[:n]


def corpus_lines(extra: Iterable[str] = ()) -> list[str]:
    """Text the tiny tokenizers are trained on: the generated rows in every format, plus ``extra``."""
    lines = []
    for r in alpaca_rows(236, seed=1):
        lines.append(f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n")
        lines.append(r["output"])
    lines += [f"<|im_start|>user\n{w}<|im_end|>\n<|im_start|>assistant\n{w[::-1]}<|im_end|>" for w in _WORDS]
    lines += [
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.",
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.",
        "The quick brown fox jumps over the lazy dog. Hello world! 0123456789",
    ]
    lines += list(extra)
    return lines


# --------------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int = 512, extra_corpus: Iterable[str] = ()) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(extra_corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(arch: str, tokenizer: Any) -> Any:
    """A ~100k-parameter config of a real architecture."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
        # Larger than the usual 0.02: the random model's logits are then not all ~0, and a few LoRA steps
        # visibly lower the loss.
        "initializer_range": 0.1,
    }
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    if arch == "falcon":
        return transformers.FalconConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            **common,
        )
    if arch == "bloom":
        return transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHITECTURES}")


def build_model(arch: str, tokenizer: Any, seed: int = 0) -> Any:
    import torch
    import transformers

    config = build_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, vocab_size: int = 512) -> Path:
    """Build and save a tiny ``arch`` model + tokenizer (with chat template) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    model = build_model(arch, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_job(folder: Path, model: Path, rows: list[dict[str, Any]] | None = None, **spec: Any) -> Path:
    """A FineTuneJob for a tiny model in ``folder`` (data in ``folder/data.jsonl``); ``spec`` sections
    (camelCase) are merged over a small QLoRA run that learns visibly in a few CPU seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data.jsonl", rows if rows is not None else alpaca_rows(200))
    base: dict[str, Any] = {
        "model": {"path": str(model)},
        "dataset": {"files": ["data.jsonl"], "format": "alpaca", "validation": {"fraction": 0.1}},
        "method": {
            "type": "qlora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "quantization": {"computeDtype": "float32"},
        },
        "training": {
            "maxSteps": 40,
            "learningRate": 3e-3,
            "perDeviceBatchSize": 8,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": 128,
            "maxGradNorm": 1.0,
            "loggingSteps": 2,
            "saveSteps": 20,
        },
        "output": {"path": "out"},
        "samples": {"prompts": ["What is the capital of Peru?"], "maxNewTokens": 8},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": base,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_folder(job_file: Path, output: Path | None = None) -> Path:
    """Where the trainer writes the run of ``job_file``: ``<output>/runs/<name>-<spec hash>/``."""
    from kubetune.trainer.layout import run_dir, run_name
    from kubetune.trainer.spec import base_dir, load_job, resolve_output

    job = load_job(job_file)
    return run_dir(resolve_output(job.spec, base_dir(job_file), output), run_name(job, env={}))
