"""Tokenization throughput of the prepare step against a bare batched fast-tokenizer call.

Corpus: 50k generated guanaco-like rows (``### Human: ... ### Assistant: ...``, lognormal lengths of
pseudo-words; nothing is downloaded), tokenized by a byte-level BPE (8k vocabulary) trained in-process.
Reported in one run, as tokens/s and as ratios to the bare call:

- bare: ``tokenizer(texts)["input_ids"]`` in batches of 1,000, one process, the Rust threads pinned to
  one (``TOKENIZERS_PARALLELISM=false``, set before the first call: the batch is then encoded serially);
- kubetune: :func:`kubetune.trainer.data.tokenize` (the prepare step's batched ``Dataset.map``: EOS,
  tokenization, truncation, labels, Arrow files) with ``num_proc`` 1 and 2.

Goals: ≥ 0.9× the bare call with one process, ≥ 1.6× with two (a 2-core machine).
Run: ``.venv/bin/python bench/tokenization.py [rows] [repeats]``.
"""

from __future__ import annotations

import os
import sys

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: one Rust thread

import itertools
import math
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SYLLABLES = [
    "ka", "to", "ri", "an", "el", "mo", "su", "ne", "li", "ta", "ve", "ro", "is", "um", "de", "pa",
    "gi", "or", "en", "qu", "sh", "th", "ch", "ba", "lo", "mi", "ze", "fa", "wu", "ix",
]  # fmt: skip


def corpus(rows: int, seed: int = 0) -> list[str]:
    """Guanaco-like rows: a question and a longer answer, with lognormal lengths (median ~190 words,
    a long tail to ~3,000), punctuation and numbers."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    cum_weights = list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))  # Zipf-like

    def sentence(n: int) -> str:
        picked = rng.choices(words, cum_weights=cum_weights, k=n)
        if rng.random() < 0.2:
            picked.append(str(rng.randint(0, 9999)))
        return " ".join(picked).capitalize() + rng.choice([".", ".", ".", "?", "!", ":"])

    def passage(n_words: int) -> str:
        out, left = [], n_words
        while left > 0:
            n = min(left, rng.randint(5, 25))
            out.append(sentence(n))
            left -= n
        return " ".join(out)

    texts = []
    for _ in range(rows):
        question = max(3, int(rng.lognormvariate(math.log(30), 0.8)))
        answer = max(5, min(3000, int(rng.lognormvariate(math.log(160), 0.9))))
        texts.append(f"### Human: {passage(question)}### Assistant: {passage(answer)}")
    return texts


def build_tokenizer(sample: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bare(tokenizer: Any, texts: list[str]) -> int:
    n = 0
    for i in range(0, len(texts), 1000):
        n += sum(len(ids) for ids in tokenizer(texts[i : i + 1000])["input_ids"])
    return n


def timed(fn: Any, repeats: int) -> tuple[float, float, Any]:
    """(best, median) seconds of ``repeats`` runs: the best is the least disturbed by other load."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def main() -> None:
    import datasets

    from kubetune.trainer import data

    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    datasets.disable_progress_bars()
    datasets.disable_caching()
    texts = corpus(rows)
    tokenizer = build_tokenizer(texts[:5000])
    eos = tokenizer.eos_token

    bare_s, bare_median, tokens = timed(lambda: bare(tokenizer, [t + eos for t in texts]), repeats)
    results = {"bare batched call, 1 process, 1 Rust thread": (bare_s, bare_median)}
    with tempfile.TemporaryDirectory() as tmp:
        # On disk, memory-mapped, as the prepare step's formatted rows are (an in-memory table would be
        # pickled to each worker process).
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(Path(tmp) / "rows"))
        ds = datasets.load_from_disk(str(Path(tmp) / "rows"))
        for procs in (1, 2):

            def ours(procs: int = procs) -> Any:
                name = str(Path(tmp) / f"tok-{procs}-{time.monotonic_ns()}.arrow")
                out, _ = data.tokenize(ds, "text", tokenizer, 1 << 20, num_proc=procs, cache_file_name=name)
                return out

            best, median, out = timed(ours, repeats)
            assert len(out) == rows
            results[f"kubetune prepare tokenization, num_proc={procs}"] = (best, median)

    cpus = len(os.sched_getaffinity(0))
    print(
        f"machine: {cpus} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"corpus: {rows} rows, {tokens} tokens ({tokens / rows:.0f} per row); best of {repeats} runs")
    for name, (seconds, median) in results.items():
        print(
            f"{name:48s} {seconds:7.2f} s  {tokens / seconds / 1e6:6.2f} M tokens/s  "
            f"{bare_s / seconds:5.2f}x bare  (medians: {median:.2f} s, {bare_median / median:.2f}x)"
        )


if __name__ == "__main__":
    main()
