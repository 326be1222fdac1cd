"""Data loading, formatting and cleaning (datasets + a tiny in-process tokenizer; no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import tiny  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec  # noqa: E402
from kubetune.trainer.data import (  # noqa: E402
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    format_and_clean,
    prepare,
)
from kubetune.trainer.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.build_tokenizer()


def spec_for(files: list[str], **dataset: Any) -> FineTuneJobSpec:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "d"},
            "spec": {"model": {"path": "m"}, "dataset": {"files": files, **dataset}},
        }
    ).spec


def clean(rows: list[dict[str, Any]], tokenizer: Any, **dataset: Any) -> tuple[Any, Any]:
    spec = spec_for(["x.jsonl"], **dataset)
    return format_and_clean(datasets.Dataset.from_list(rows), spec.dataset, tokenizer)


def test_text_format_drops_empty_and_duplicates(tokenizer: Any) -> None:
    rows: list[dict[str, Any]] = [
        {"text": "hello world", "other": 1},
        {"text": "   ", "other": 2},
        {"text": "second row", "other": 3},
        {"text": "hello world", "other": 4},  # exact duplicate of the training text
        {"text": None, "other": 5},
        {"text": "hello world ", "other": 6},  # not exact: kept
        {"text": "", "other": 7},
    ]
    ds, stats = clean(rows, tokenizer, format="text")
    assert ds["text"] == ["hello world", "second row", "hello world "]
    assert ds.column_names == ["text"]
    assert (stats.rows_read, stats.empty_dropped, stats.duplicates_dropped, stats.kept) == (7, 3, 1, 3)


def test_text_field_and_dedup_off(tokenizer: Any) -> None:
    rows = [{"body": "a"}, {"body": "a"}, {"body": "b"}]
    ds, stats = clean(rows, tokenizer, format="text", textField="body", dedup=False)
    assert ds["text"] == ["a", "a", "b"]
    assert stats.duplicates_dropped == 0 and stats.kept == 3


def test_alpaca_format(tokenizer: Any) -> None:
    rows = [
        {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},  # duplicate
        {"instruction": "No answer.", "input": "", "output": "  "},  # nothing to learn
        {"instruction": "", "input": "x", "output": "y"},  # no instruction
    ]
    ds, stats = clean(rows, tokenizer, format="alpaca")
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0]["prompt"] == ALPACA_PROMPT_WITH_INPUT.format(instruction="Add the numbers.", input="2 + 3")
    assert ds[0]["prompt"].endswith("### Input:\n2 + 3\n\n### Response:\n")
    assert ds[0]["completion"] == "5"
    assert ds[1]["prompt"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input" not in ds[1]["prompt"]
    assert "messages" not in ds.column_names
    assert (stats.rows_read, stats.empty_dropped, stats.duplicates_dropped, stats.kept) == (5, 2, 1, 2)


def test_alpaca_without_input_column(tokenizer: Any) -> None:
    ds, _ = clean([{"instruction": "Say hi.", "output": "Hi."}], tokenizer, format="alpaca")
    assert ds[0]["prompt"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")


def test_chat_format_uses_the_chat_template(tokenizer: Any) -> None:
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rows: list[dict[str, Any]] = [
        {"conv": conv},
        {"conv": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]},
        {"conv": []},
        {"conv": conv},
        {"conv": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]},
    ]
    ds, stats = clean(rows, tokenizer, format="chat", messagesField="conv")
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == conv
    assert (stats.rows_read, stats.empty_dropped, stats.duplicates_dropped, stats.kept) == (5, 2, 1, 2)
    rendered = tokenizer.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"


def test_chat_accepts_sharegpt_messages(tokenizer: Any) -> None:
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    ds, _ = clean(rows, tokenizer, format="chat", messagesField="conversations")
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert ds[0]["messages"] == expected


def test_chat_needs_a_chat_template(tokenizer: Any) -> None:
    plain = tiny.build_tokenizer()
    plain.chat_template = None
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(DataError, match=r"dataset\.format chat needs a tokenizer with a chat template"):
        clean(rows, plain, format="chat")


@pytest.mark.parametrize(
    ("dataset", "row", "message"),
    [
        (
            {"format": "text"},
            {"body": "x"},
            "dataset.textField: column 'text' not in dataset; columns are ['body']",
        ),
        (
            {"format": "text", "textField": "content"},
            {"text": "x"},
            "dataset.textField: column 'content' not in dataset; columns are ['text']",
        ),
        (
            {"format": "chat"},
            {"conversations": []},
            "dataset.messagesField: column 'messages' not in dataset; columns are ['conversations']",
        ),
        (
            {"format": "alpaca"},
            {"instruction": "x", "response": "y"},
            "dataset.format alpaca: column 'output' not in dataset; columns are ['instruction', 'response']",
        ),
    ],
)
def test_missing_column_names_the_field(
    tokenizer: Any, dataset: dict[str, str], row: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError) as err:
        clean([row], tokenizer, **dataset)
    assert str(err.value) == message


def test_bad_messages_name_the_field(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"dataset\.messagesField: column 'messages' must hold a list"):
        clean([{"messages": "just text"}], tokenizer, format="chat")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_local_files_with_validation_fraction(tmp_path: Path, tokenizer: Any) -> None:
    rows = [*tiny.alpaca_rows(100), {"instruction": "", "input": "", "output": ""}, *tiny.alpaca_rows(3)]
    write_jsonl(tmp_path / "a.jsonl", rows[:50])
    write_jsonl(tmp_path / "b.jsonl", rows[50:])
    spec = spec_for(["a.jsonl", str(tmp_path / "b.jsonl")], format="alpaca", validation={"fraction": 0.2})
    data = prepare(spec, tmp_path, tokenizer)
    s = data.stats
    assert (s.rows_read, s.empty_dropped, s.duplicates_dropped, s.kept) == (104, 1, 3, 100)
    assert (s.train_rows, s.validation_rows) == (80, 20)
    assert data.eval is not None
    assert len(data.train) == 80 and len(data.eval) == 20
    assert set(data.train["prompt"]).isdisjoint(data.eval["prompt"])
    # Seeded: the same split every time.
    again = prepare(spec, tmp_path, tokenizer)
    assert again.eval is not None and again.eval["prompt"] == data.eval["prompt"]
    assert (
        s.summary()
        == "104 rows read, 1 empty dropped, 3 duplicates dropped, 100 kept (80 train, 20 validation)"
    )


def test_prepare_csv_and_parquet(tmp_path: Path, tokenizer: Any) -> None:
    ds = datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}, {"text": "one"}])
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.csv", "d.parquet"):
        data = prepare(spec_for([name]), tmp_path, tokenizer)
        assert data.train["text"] == ["one", "two"] and data.eval is None


def test_prepare_errors(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"dataset\.files: 'missing\.jsonl' not found"):
        prepare(spec_for(["missing.jsonl"]), tmp_path, tokenizer)
    write_jsonl(tmp_path / "empty.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(DataError, match="no training rows left after cleaning"):
        prepare(spec_for(["empty.jsonl"]), tmp_path, tokenizer)
    write_jsonl(tmp_path / "few.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"dataset\.validation\.fraction 0\.1 of 2 rows leaves 0"):
        prepare(spec_for(["few.jsonl"], validation={"fraction": 0.1}), tmp_path, tokenizer)
