#!/usr/bin/env python3
"""Regenerate jobs/tiny/: a tiny random-weight Llama (+ tokenizer with chat template) and its data.

Deterministic (seeded): running it again rewrites the same files. The model is a real
``LlamaForCausalLM`` (2 layers, hidden size 64, ~110k parameters, < 1 MB) built from a config, and the
tokenizer a byte-level BPE trained here on a small generated corpus; nothing is downloaded.

    .venv/bin/python hack/make_tiny_model.py [--out jobs/tiny]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402  (tests/tiny.py: the builders shared with the tests)

N_ROWS = 220
SEED = 0


def tiny_rows() -> list[dict[str, str]]:
    """Alpaca rows plus, on purpose, a few empty rows and exact duplicates for cleaning to report."""
    rows = tiny.alpaca_rows(N_ROWS, seed=SEED)
    empty = [
        {"instruction": "", "input": "", "output": ""},
        {"instruction": "   ", "input": "", "output": "\n"},
        {"instruction": "Add the two numbers.", "input": "2 + 2", "output": ""},
    ]
    duplicates = [dict(rows[i]) for i in (0, 1, 2, 5, 8)]
    # Spread them through the file (deterministically) rather than at the end.
    for k, row in enumerate(empty + duplicates):
        rows.insert(17 + 23 * k, row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "jobs" / "tiny")
    args = parser.parse_args()
    model_dir = args.out / "llama"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tiny.save_tiny_model(model_dir, "llama", seed=SEED)
    tiny.write_jsonl(args.out / "data.jsonl", tiny_rows())
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    print(f"wrote {model_dir} ({size / 1024:.0f} KiB) and {args.out / 'data.jsonl'}")


if __name__ == "__main__":
    main()
