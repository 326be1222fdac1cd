"""training.packing: padding efficiency on a guanaco-like length distribution, and CPU training throughput.

1. **Padding efficiency** (real tokens / tokens the model computes), for the recipes' shapes:
   maxSeqLength 512 at batch 4 (the Falcon/Guanaco recipe) and 2048 at batch 2 (the AutoTrain Llama
   recipe), for `none` in random batches, `none` with `groupByLength` (transformers' own length-grouped
   sampler), `wrapped` (blocks of maxSeqLength), and `bfd` in its three collator layouts: `flat`
   (padding-free, flash-attention varlen: exactly the real tokens), `bins` (padding-free, one row per
   bin: SDPA with a block mask), `rows` (the padded fallback: BLOOM). Also the attention work: useful
   query-key pairs (each row with itself, causal) / pairs computed (dense, per batch row).
2. **CPU throughput** (real tokens per second, forward + backward + AdamW) of a small Llama on the same
   rows for `none` + `groupByLength`, `wrapped` and `bfd`, interleaved round by round in one process,
   reported as ratios to `none` + `groupByLength`.

The lengths are those of bench/gpu.py's data (hack/make_bench_data.py): log-normal, median 310 tokens,
sigma 0.78, clipped to [16, 4096], fitted so that random batches of 4 pad to the 0.68 / 0.52 efficiency
measured on openassistant-guanaco with the Llama tokenizer at 512 / 2048 tokens. 9,846 rows (guanaco's
train split). Nothing is downloaded.

Run: `.venv/bin/python bench/packing.py [--rows 96] [--rounds 2] [--skip-train]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

GUANACO_ROWS = 9846
SHAPES = (
    (512, 4, "Falcon/Guanaco recipe"),
    (2048, 2, "AutoTrain Llama recipe"),
    (2048, 4, "issue 9's batch"),
)


def _bench_data() -> Any:
    spec = importlib.util.spec_from_file_location("make_bench_data", ROOT / "hack" / "make_bench_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def guanaco_lengths(rows: int = GUANACO_ROWS, seed: int = 0) -> np.ndarray:
    """Tokens per row, drawn as hack/make_bench_data.py draws them (same constants, same first draw)."""
    d = _bench_data()
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(d.MEDIAN_TOKENS), d.SIGMA, rows)).astype(np.int64)
    return lengths.clip(d.MIN_TOKENS, d.MAX_TOKENS)


def _batches(sizes: list[int], batch: int) -> list[list[int]]:
    return [sizes[i : i + batch] for i in range(0, len(sizes), batch)]


def _pairs(n: int) -> int:
    return n * (n + 1) // 2  # causal query-key pairs of an n-token row


def _length_grouped_order(lengths: list[int], batch: int, seed: int) -> list[int]:
    """Row indices in the order transformers' groupByLength sampler yields them."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    return [int(i) for i in get_length_grouped_indices(lengths, batch, generator=generator)]


def _bfd_bins(lengths: list[int], max_len: int) -> list[list[int]]:
    """The bins kubetune.trainer.packing.pack makes (TRL's BFD over the whole split), as row lengths."""
    import datasets

    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.trainer.packing import pack

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"id": "org/model"},
            "dataset": {"id": "org/data"},
            "training": {"maxSeqLength": max_len, "packing": "bfd"},
        }
    )
    rows = datasets.Dataset.from_dict(
        {"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths]}
    )
    return [list(x) for x in pack(rows, spec)["seq_lengths"]]


def efficiency(
    lengths: np.ndarray, max_len: int, batch: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """strategy -> (padding efficiency, attention efficiency) for rows truncated to ``max_len``."""
    rows = [int(n) for n in np.minimum(lengths, max_len)]
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    out: dict[str, tuple[float, float]] = {}

    def padded(batches: list[list[int]]) -> tuple[float, float]:
        real = sum(sum(b) for b in batches)
        computed = sum(len(b) * max(b) for b in batches)
        useful = sum(_pairs(n) for b in batches for n in b)
        dense = sum(len(b) * _pairs(max(b)) for b in batches)
        return real / computed, useful / dense

    out["none"] = padded(_batches(shuffled, batch))
    grouped = [rows[i] for i in _length_grouped_order(rows, batch, seed)]
    out["none + groupByLength"] = padded(_batches(grouped, batch))
    total = sum(rows)
    blocks = [max_len] * (total // max_len) + ([total % max_len] if total % max_len else [])
    # wrapped: its attention is one causal window per block; "useful" would be per document (it is not).
    out["wrapped (rows share windows)"] = (padded(_batches(blocks, batch))[0], float("nan"))
    bins = _bfd_bins(rows, max_len)
    random.Random(seed).shuffle(bins)
    bin_batches = _batches(bins, batch)
    useful = sum(_pairs(n) for b in bins for n in b)
    out["bfd flat (flash varlen)"] = (1.0, 1.0)  # the kernel sees the real tokens and rows only
    real = sum(sum(b) for b in bins)
    computed = sum(len(bb) * max(sum(b) for b in bb) for bb in bin_batches)
    dense = sum(len(bb) * _pairs(max(sum(b) for b in bb)) for bb in bin_batches)
    out["bfd bins (sdpa, block mask)"] = (real / computed, useful / dense)
    row_batches = [[n for b in bb for n in b] for bb in bin_batches]
    out["bfd rows (padded fallback)"] = padded(row_batches)
    out[f"  (bfd: {len(bins)} bins, fill {real / (len(bins) * max_len):.4f})"] = (float("nan"), float("nan"))
    return out


# --------------------------------------------------------------------------------------------------
# CPU throughput
# --------------------------------------------------------------------------------------------------


def _small_llama(vocab: int) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        use_cache=False,  # as load_model sets it for bfd (and gradient checkpointing does)
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="sdpa"
    )


def throughput(n_rows: int, max_len: int, batch: int, rounds: int) -> dict[str, list[float]]:
    """strategy -> real tokens per second of each of ``rounds`` interleaved passes over the same rows."""
    import datasets
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.trainer.packing import PackedCollator, pack

    vocab = 2048
    d = _bench_data()
    lengths, tokens = d.generate(n_rows)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]).tolist()
    ids = [
        [int(t) % vocab for t in tokens[s : s + min(int(n), max_len)]]
        for s, n in zip(starts, lengths, strict=True)
    ]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    def spec(packing: str) -> FineTuneJobSpec:
        return FineTuneJobSpec.model_validate(
            {
                "model": {"id": "org/model"},
                "dataset": {"id": "org/data"},
                "training": {"maxSeqLength": max_len, "packing": packing},
            }
        )

    pad = DataCollatorForLanguageModeling(pad_token_id=0)
    grouped = [rows[i] for i in _length_grouped_order([len(x) for x in ids], batch, seed=0)]
    wrapped = list(pack(rows, spec("wrapped")))
    bins = list(pack(rows, spec("bfd")))
    random.Random(0).shuffle(bins)
    plans = {
        "none + groupByLength": [pad(grouped[i : i + batch]) for i in range(0, len(grouped), batch)],
        "wrapped": [pad(wrapped[i : i + batch]) for i in range(0, len(wrapped), batch)],
        "bfd (bins, sdpa block mask)": [
            PackedCollator(0, "bins")(bins[i : i + batch]) for i in range(0, len(bins), batch)
        ],
    }
    real = {k: sum(len(x) for x in ids) for k in plans}  # every strategy trains on exactly these tokens
    model = _small_llama(vocab)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds: dict[str, list[float]] = {k: [] for k in plans}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    warm = plans["none + groupByLength"][0]
    model(**warm).loss.backward()
    opt.zero_grad()
    for _ in range(rounds):
        for name, batches in plans.items():
            start = time.perf_counter()
            for b in batches:
                model(**b).loss.backward()
                opt.step()
                opt.zero_grad()
            seconds[name].append(time.perf_counter() - start)
    return {k: [real[k] / t for t in seconds[k]] for k in plans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96, help="rows of the throughput run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes per strategy")
    parser.add_argument("--skip-train", action="store_true", help="padding efficiency only")
    parser.add_argument("--skip-padding", action="store_true", help="throughput only")
    args = parser.parse_args()
    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    lengths = guanaco_lengths()
    print(
        f"lengths: {len(lengths)} guanaco-like rows, mean {lengths.mean():.0f}, "
        f"median {np.median(lengths):.0f}, {(lengths > 512).mean():.1%} over 512, "
        f"{(lengths > 2048).mean():.1%} over 2048"
    )
    for max_len, batch, recipe in () if args.skip_padding else SHAPES:
        print(f"\nmaxSeqLength {max_len}, batch {batch} ({recipe}): padding eff. | attention eff.")
        for name, (pad_eff, attn_eff) in efficiency(lengths, max_len, batch).items():
            if np.isnan(pad_eff):
                print(f"  {name}")
                continue
            attn = "   -  " if np.isnan(attn_eff) else f"{attn_eff:.3f}"
            print(f"  {name:32s} {pad_eff:.4f} | {attn}")
    if args.skip_train:
        return
    max_len, batch = 512, 4
    rates = throughput(args.rows, max_len, batch, args.rounds)
    base = rates["none + groupByLength"]
    print(
        f"\nCPU training throughput, 4-layer 256-wide Llama, {args.rows} rows at maxSeqLength {max_len}, "
        f"batch {batch}, {args.rounds} interleaved rounds (real tokens/s; ratio to none + groupByLength, "
        "overall and per round):"
    )
    for name, per_round in rates.items():
        mean = len(per_round) / sum(1 / r for r in per_round)
        ratios = " ".join(f"{r / b:.2f}" for r, b in zip(per_round, base, strict=True))
        overall = mean / (len(base) / sum(1 / r for r in base))
        print(f"  {name:32s} {mean:8.0f} tokens/s  {overall:.2f}x  (rounds: {ratios})")


if __name__ == "__main__":
    main()
