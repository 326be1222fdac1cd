"""Training data: load (Hub or local files), format (text / alpaca / chat), clean, split, tokenize.

Formatting gives the rows TRL's own dataset types:

- ``text``   → a ``text`` column (language modelling on the whole text);
- ``alpaca`` → ``prompt`` / ``completion`` columns (the Alpaca prompt; the loss is on the response only);
- ``chat``   → a ``messages`` column, which TRL renders with the tokenizer's chat template.

Cleaning drops rows whose training text is empty or blank and (``dataset.dedup``) exact duplicates of the
formatted text, and counts both. Every step is a ``datasets`` ``map``/``filter``/``select`` with
module-level functions, so the results are cached by fingerprint (a restarted Pod does not redo them).

:func:`tokenize` then turns those rows into ``input_ids`` / ``labels`` exactly as TRL 1.16's
``SFTTrainer._prepare_dataset`` does (EOS appended to text and completions, the chat template rendered
and tokenized without special tokens, the prompt masked with -100 up to where the tokenized prompt and
prompt+completion diverge, truncation to ``max_length`` keeping the start, rows left without a label
dropped), in batches of Arrow columns: :mod:`kubetune.trainer.prepare` caches the result.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import DatasetSource, FineTuneJobSpec
from kubetune.contract import ENV_HF_TOKEN
from kubetune.trainer.errors import DataError

log = logging.getLogger("kubetune.trainer")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_KEY = "_kubetune_hash"
_EMPTY = "_kubetune_empty"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataStats:
    """What cleaning did, reported in the logs, metrics.json and the model card."""

    rows_read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    kept: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    validation: dict[str, int] = field(default_factory=dict)
    """Cleaning counts of a separate validation split (``validation.split``)."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.validation:
            out.pop("validation")
        return out

    def summary(self) -> str:
        return (
            f"{self.rows_read} rows read, {self.empty_dropped} empty dropped, "
            f"{self.duplicates_dropped} duplicates dropped, {self.kept} kept "
            f"({self.train_rows} train, {self.validation_rows} validation)"
        )


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset
    eval: Any | None  # datasets.Dataset | None
    stats: DataStats


# --------------------------------------------------------------------------------------------------
# Formatting (pure functions, unit-tested)
# --------------------------------------------------------------------------------------------------


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    """The Alpaca prompt (up to ``### Response:\\n``); the output is the completion."""
    if input_text is not None and input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _as_str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: expected text, got {type(value).__name__} ({value!r:.80})")


def normalize_messages(value: Any, field_name: str) -> list[dict[str, str]]:
    """A row's chat messages as ``[{role, content}, ...]`` (``None`` → no messages; ShareGPT's
    ``{from: human|gpt|system, value}`` items are accepted too)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(
            f"dataset.messagesField: column {field_name!r} must hold a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    out = []
    for m in value:
        if isinstance(m, dict) and "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif isinstance(m, dict) and "from" in m and "value" in m:  # ShareGPT style
            role, content = _SHAREGPT_ROLES.get(str(m["from"]), m["from"]), m["value"]
        else:
            raise DataError(
                f"dataset.messagesField: column {field_name!r} must hold a list of {{role, content}} "
                f"messages, got an item {m!r:.80}"
            )
        out.append({"role": str(role), "content": _as_str(content, "dataset.messagesField")})
    return out


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def format_text_batch(batch: dict[str, list[Any]], text_field: str) -> dict[str, list[Any]]:
    texts = [_as_str(v, f"dataset.textField {text_field!r}") for v in batch[text_field]]
    return {"text": texts, _EMPTY: [_blank(t) for t in texts], _KEY: [_hash(t) for t in texts]}


def format_alpaca_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    n = len(batch["instruction"])
    inputs = batch.get("input") or [None] * n
    prompts, completions, empty, keys = [], [], [], []
    for instruction, input_text, output in zip(batch["instruction"], inputs, batch["output"], strict=True):
        ins = _as_str(instruction, "dataset.format alpaca: 'instruction'")
        inp = _as_str(input_text, "dataset.format alpaca: 'input'")
        out = _as_str(output, "dataset.format alpaca: 'output'")
        prompt = alpaca_prompt(ins, inp)
        prompts.append(prompt)
        completions.append(out)
        # No instruction or no response: nothing to learn.
        empty.append(_blank(ins) or _blank(out))
        keys.append(_hash(prompt + "\x00" + out))
    return {"prompt": prompts, "completion": completions, _EMPTY: empty, _KEY: keys}


def format_chat_batch(
    batch: dict[str, list[Any]], messages_field: str, tokenizer: Any
) -> dict[str, list[Any]]:
    messages, empty, keys = [], [], []
    for value in batch[messages_field]:
        msgs = normalize_messages(value, messages_field)
        blank = all(_blank(m["content"]) for m in msgs)
        rendered = "" if blank else tokenizer.apply_chat_template(msgs, tokenize=False)
        messages.append(msgs)
        empty.append(blank)
        keys.append(_hash(rendered))
    return {"messages": messages, _EMPTY: empty, _KEY: keys}


def _not_empty(batch: dict[str, list[Any]]) -> list[bool]:
    return [not e for e in batch[_EMPTY]]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_files(files: list[str], base_dir: Path) -> list[str]:
    out = []
    for f in files:
        p = Path(f)
        if not p.is_absolute():
            p = base_dir / p
        if not p.is_file():
            raise DataError(f"dataset.files: {f!r} not found (looked for {p})")
        out.append(str(p.resolve()))
    return out


def load_raw(source: DatasetSource, base_dir: Path, split: str | None = None) -> Any:
    """The raw rows of a Hub split (``split`` or ``dataset.split``) or of the local files."""
    import os

    import datasets

    if source.files is not None:
        files = resolve_files(source.files, base_dir)
        builder = _FILE_BUILDERS[next(s for s in _FILE_BUILDERS if files[0].lower().endswith(s))]
        return datasets.load_dataset(builder, data_files=files, split="train")
    assert source.id is not None
    return datasets.load_dataset(
        source.id,
        revision=source.revision,
        split=split or source.split,
        token=os.environ.get(ENV_HF_TOKEN) or None,
    )


def lineage(source: DatasetSource, base_dir: Path) -> dict[str, Any]:
    """What exactly was trained on: the Hub commit the revision resolved to, or each file's sha256."""
    import hashlib
    import os

    if source.files is not None:
        digests = {}
        for spec_path, path in zip(source.files, resolve_files(source.files, base_dir), strict=True):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digests[spec_path] = h.hexdigest()
        return {"dataset_files_sha256": digests}
    from huggingface_hub import HfApi

    try:
        info = HfApi(token=os.environ.get(ENV_HF_TOKEN) or None).dataset_info(
            source.id or "", revision=source.revision
        )
        return {"dataset_commit": info.sha}
    except Exception as exc:  # lineage is best effort: offline mirrors and HF_HUB_OFFLINE still train
        log.warning(
            "could not resolve dataset revision %r to a commit: %s", source.revision, type(exc).__name__
        )
        return {"dataset_commit": None}


def _require_columns(ds: Any, source: DatasetSource) -> None:
    columns = list(ds.column_names)
    if source.format == "text":
        needed = [("dataset.textField", source.text_field)]
    elif source.format == "chat":
        needed = [("dataset.messagesField", source.messages_field)]
    else:
        needed = [("dataset.format alpaca", "instruction"), ("dataset.format alpaca", "output")]
    for where, column in needed:
        if column not in columns:
            raise DataError(f"{where}: column {column!r} not in dataset; columns are {columns}")


def format_and_clean(
    ds: Any, source: DatasetSource, tokenizer: Any, what: str = "train"
) -> tuple[Any, DataStats]:
    """Format rows for TRL, drop empty ones and (``dedup``) exact duplicates. Returns the rows and counts."""
    _require_columns(ds, source)
    if source.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "dataset.format chat needs a tokenizer with a chat template, and this model's tokenizer has "
            "none; use dataset.format text or alpaca, or a model whose tokenizer ships a chat template"
        )
    stats = DataStats(rows_read=len(ds))
    columns = list(ds.column_names)
    map_kwargs: dict[str, Any] = {
        "batched": True,
        "remove_columns": columns,
        "desc": f"Formatting {what} rows",
    }
    if source.format == "text":
        ds = ds.map(format_text_batch, fn_kwargs={"text_field": source.text_field}, **map_kwargs)
    elif source.format == "alpaca":
        ds = ds.map(format_alpaca_batch, **map_kwargs)
    else:
        import datasets

        # Typed: datasets infers a Json column from mixed raw messages (ShareGPT items, extra keys),
        # which Arrow batches would then hold as strings.
        message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
        typed = {"messages": datasets.List(message), _EMPTY: datasets.Value("bool")}
        features = datasets.Features({**typed, _KEY: datasets.Value("string")})
        ds = ds.map(
            format_chat_batch,
            fn_kwargs={"messages_field": source.messages_field, "tokenizer": tokenizer},
            features=features,
            **map_kwargs,
        )
    ds = ds.filter(_not_empty, batched=True, desc=f"Dropping empty {what} rows")
    stats.empty_dropped = stats.rows_read - len(ds)
    if source.dedup:
        seen: set[str] = set()
        keep: list[int] = []
        for i, key in enumerate(ds[_KEY]):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        stats.duplicates_dropped = len(ds) - len(keep)
        if stats.duplicates_dropped:
            ds = ds.select(keep)
    ds = ds.remove_columns([_KEY, _EMPTY])
    stats.kept = len(ds)
    return ds, stats


def prepare(
    spec: FineTuneJobSpec, base_dir: Path, tokenizer: Any, raw: Any = None, raw_eval: Any = None
) -> PreparedData:
    """Load (unless ``raw`` / ``raw_eval`` are the rows already loaded), format, clean and split the
    training data of ``spec``. The rows are not tokenized (see :func:`tokenize`)."""
    source = spec.dataset
    if raw is None:
        raw = load_raw(source, base_dir)
    train, stats = format_and_clean(raw, source, tokenizer)
    if stats.kept == 0:
        raise DataError(f"dataset: no training rows left after cleaning ({stats.summary()})")
    evaluation = None
    v = source.validation
    if v is not None and v.fraction is not None:
        n_eval = round(stats.kept * v.fraction)
        if n_eval < 1 or n_eval >= stats.kept:
            raise DataError(
                f"dataset.validation.fraction {v.fraction} of {stats.kept} rows leaves "
                f"{n_eval} validation rows; use a larger fraction or more data"
            )
        split = train.train_test_split(test_size=n_eval, seed=spec.training.seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    elif v is not None and v.split is not None:
        if raw_eval is None:
            raw_eval = load_raw(source, base_dir, split=v.split)
        evaluation, eval_stats = format_and_clean(raw_eval, source, tokenizer, what="validation")
        stats.validation = {
            k: getattr(eval_stats, k) for k in ("rows_read", "empty_dropped", "duplicates_dropped", "kept")
        }
        if eval_stats.kept == 0:
            raise DataError(f"dataset.validation.split {v.split!r}: no rows left after cleaning")
    stats.train_rows = len(train)
    stats.validation_rows = len(evaluation) if evaluation is not None else 0
    return PreparedData(train=train, eval=evaluation, stats=stats)


# --------------------------------------------------------------------------------------------------
# Tokenization (what TRL 1.16's SFTTrainer._prepare_dataset does, batched over Arrow columns)
# --------------------------------------------------------------------------------------------------


def _int_lists(ids: list[list[int]]) -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    return pa.array(ids, type=pa.list_(pa.int32()))


def _labelled(input_ids: Any, labels: Any, keep: Any, max_length: int) -> Any:
    """The batch as a table: both columns truncated to ``max_length`` (keeping the start, TRL's
    ``keep_start``), rows ``keep`` says have no label left dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc  # type: ignore[import-untyped]

    table = pa.table(
        {"input_ids": pc.list_slice(input_ids, 0, max_length), "labels": pc.list_slice(labels, 0, max_length)}
    )
    return table if keep is None else table.filter(pa.array(keep, type=pa.bool_()))


def encode(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``, for a fast tokenizer straight from its Rust backend's
    ``encode_batch_fast`` (no offsets: a quarter less work), which is what transformers' call does
    once its settings are applied; the settings are checked to be the ones that call would apply
    (no truncation or padding, special tokens not split, no input/target mode), else the call is made."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
        and not hasattr(tokenizer, "_switch_to_input_mode")
    ):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    out = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)
    return list(out["input_ids"])


def _with_eos(texts: list[str], eos: str | None) -> list[str]:
    # TRL's add_eos: only where the text does not end with the EOS token already.
    if not eos:
        return texts
    return [t if t.endswith(eos) else t + eos for t in texts]


def tokenize_text_batch(batch: Any, tokenizer: Any, max_length: int) -> Any:
    """``text`` rows → every token is learned (labels == input_ids)."""
    texts = _with_eos(batch.column("text").to_pylist(), tokenizer.eos_token)
    ids = _int_lists(encode(tokenizer, texts))
    return _labelled(ids, ids, None, max_length)


def tokenize_chat_batch(batch: Any, tokenizer: Any, max_length: int) -> Any:
    """``messages`` rows → the chat template rendered, then tokenized without special tokens, as
    ``apply_chat_template(tokenize=True)`` does; every token is learned. No EOS is added (TRL adds none
    to conversations)."""
    rendered = tokenizer.apply_chat_template(batch.column("messages").to_pylist(), tokenize=False)
    ids = _int_lists(encode(tokenizer, rendered, add_special_tokens=False))
    return _labelled(ids, ids, None, max_length)


def _common_prefix(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:  # the usual case, compared in C
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompt_completion_batch(batch: Any, tokenizer: Any, max_length: int) -> Any:
    """``prompt`` / ``completion`` rows → the loss on the completion only: the prompt and
    prompt+completion are tokenized apart, and the tokens they share (TRL's ``common_prefix_length``)
    get label -100."""
    import numpy as np
    import pyarrow as pa

    prompts = batch.column("prompt").to_pylist()
    completions = _with_eos(batch.column("completion").to_pylist(), tokenizer.eos_token)
    prompt_ids = encode(tokenizer, prompts)
    full_ids = encode(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    masked = np.fromiter(
        (_common_prefix(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)), np.int64, len(full_ids)
    )
    ids = _int_lists(full_ids)
    offsets = ids.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = ids.values.to_numpy(zero_copy_only=False)
    # Position of every token within its row: masked where it is below the row's prompt length.
    position = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    labels_values = np.where(position < np.repeat(masked, lengths), np.int32(-100), values)
    labels = pa.ListArray.from_arrays(ids.offsets, pa.array(labels_values, type=pa.int32()))
    # A row keeps a label when its completion starts within the first max_length tokens.
    keep = masked < np.minimum(lengths, max_length)
    return _labelled(ids, labels, keep, max_length)


_TOKENIZERS = {
    "text": tokenize_text_batch,
    "alpaca": tokenize_prompt_completion_batch,
    "chat": tokenize_chat_batch,
}


def tokenize(
    ds: Any,
    data_format: str,
    tokenizer: Any,
    max_length: int,
    *,
    num_proc: int = 1,
    cache_file_name: str | None = None,
    what: str = "train",
) -> tuple[Any, int]:
    """The formatted rows of ``data_format`` as ``input_ids`` / ``labels`` (int32 lists, -100 = no
    loss), truncated to ``max_length``; returns them and how many rows truncation left without a
    label (dropped, as TRL drops them)."""
    before = len(ds)
    out = ds.with_format("arrow").map(
        _TOKENIZERS[data_format],
        batched=True,
        batch_size=1000,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=list(ds.column_names),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=cache_file_name,
        desc=f"Tokenizing {what} rows",
    )
    out = out.with_format(None)
    return out, before - len(out)
