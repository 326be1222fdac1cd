"""Training data: load (Hub or local files), format (text / alpaca / completion / chat), clean, split,
tokenize.

Formatting gives the rows TRL's own dataset types:

- ``text``   → a ``text`` column (language modelling on the whole text);
- ``alpaca`` → ``prompt`` / ``completion`` columns (the Alpaca prompt, and the response);
- ``completion`` → ``prompt`` / ``completion`` columns: ``promptField`` / ``completionField`` as they are;
- ``chat``   → a ``messages`` column, rendered with the chat template (``dataset.chatTemplate``, else the
  tokenizer's).

Cleaning drops rows whose training text is empty or blank and (``dataset.dedup``) exact duplicates of the
formatted text, and counts both. Every step is a ``datasets`` ``map``/``filter``/``select`` with
module-level functions, so the results are cached by fingerprint (a restarted Pod does not redo them).

:func:`tokenize` then turns those rows into ``input_ids`` / ``labels`` exactly as TRL 1.16's
``SFTTrainer._prepare_dataset`` does (EOS appended to text and completions, the chat template rendered
and tokenized without special tokens, the prompt masked with -100 up to where the tokenized prompt and
prompt+completion diverge, truncation to ``max_length`` keeping the start, rows left without a label
dropped), in batches of Arrow columns: :mod:`kubetune.trainer.prepare` caches the result. Which tokens
carry the loss is ``dataset.trainOn``: ``completion`` (the response; alpaca and completion data),
``assistant`` (the assistant turns of a chat, from the template's ``{% generation %}`` markers as TRL's
``assistant_only_loss``, else by role) or ``all``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import (
    DEFAULT_TRAIN_ON,
    TRAIN_ON_BY_FORMAT,
    DatasetPart,
    DatasetSource,
    FineTuneJobSpec,
    TrainOn,
)
from kubetune.contract import ENV_HF_TOKEN, is_commit
from kubetune.trainer.errors import DataError, hub_not_found
from kubetune.trainer.progress import write_json_once

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
_ENV_HF_ENDPOINT = "HF_ENDPOINT"  # huggingface_hub's: a mirror or a stand-in Hub


@dataclass
class DataStats:
    """What cleaning and mixing did, reported in the logs, metrics.json and the model card: the totals,
    and per source (``sources``, in ``dataset.sources`` order; one entry for a single dataset)."""

    rows_read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    kept: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    validation: dict[str, int] = field(default_factory=dict)
    """Cleaning counts of a separate validation split (``validation.split``)."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per source: name, format, train_on, rows_read, empty_dropped, duplicates_dropped, kept,
    train_rows (after weight / maxRows), validation_rows, weight, max_rows (and, once tokenized,
    train_tokens / train_loss_tokens)."""

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


def source_summary(source: dict[str, Any]) -> str:
    """One source's line of :class:`DataStats` ``sources``, for the log."""
    s = source
    return (
        f"{s['name']} ({s['format']}): {s['rows_read']} read, {s['empty_dropped']} empty, "
        f"{s['duplicates_dropped']} duplicates, {s['kept']} kept, {s['train_rows']} train "
        f"(weight {s['weight']}, maxRows {s['max_rows']}), {s['validation_rows']} validation"
    )


@dataclass
class SourceRows:
    """One source's formatted rows: what it trains on (held out, weighted and capped) and evaluates on."""

    part: DatasetPart
    train: Any  # datasets.Dataset
    eval: Any | None  # datasets.Dataset | None


@dataclass
class PreparedData:
    sources: list[SourceRows]
    stats: DataStats
    lineage: dict[str, Any] = field(default_factory=dict)
    """``{"datasets": [...]}``: per source, what was trained on (see :func:`resolve`)."""

    @property
    def train(self) -> Any:
        """All sources' training rows, concatenated (they must share a format; :mod:`prepare`
        tokenizes each source on its own instead)."""
        return _concatenate([s.train for s in self.sources])

    @property
    def eval(self) -> Any | None:
        parts = [s.eval for s in self.sources if s.eval is not None]
        return _concatenate(parts) if parts else None


def _concatenate(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    import datasets

    return datasets.concatenate_datasets(parts)


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


def format_completion_batch(
    batch: dict[str, list[Any]], prompt_field: str, completion_field: str
) -> dict[str, list[Any]]:
    """``format: completion``: a prompt column and a completion column, as they are (no template), to
    ``prompt`` / ``completion`` (tokenized as alpaca's are)."""
    prompts = [_as_str(v, f"dataset.promptField {prompt_field!r}") for v in batch[prompt_field]]
    where = f"dataset.completionField {completion_field!r}"
    completions = [_as_str(v, where) for v in batch[completion_field]]
    return {
        "prompt": prompts,
        "completion": completions,
        # No completion: nothing to learn (an empty prompt is allowed: the completion alone is learned).
        _EMPTY: [_blank(c) for c in completions],
        _KEY: [_hash(p + "\x00" + c) for p, c in zip(prompts, completions, strict=True)],
    }


def format_chat_batch(
    batch: dict[str, list[Any]], messages_field: str, tokenizer: Any, train_on: str = "all"
) -> dict[str, list[Any]]:
    """``format: chat``: the messages as ``{role, content}`` lists. A conversation with no text is
    empty, and so, when ``train_on`` is ``assistant``, is one without an assistant message that says
    something. The duplicate key is the rendered conversation."""
    messages = [normalize_messages(value, messages_field) for value in batch[messages_field]]
    if train_on == "assistant":
        empty = [
            not any(m["role"] == "assistant" and not _blank(m["content"]) for m in msgs) for msgs in messages
        ]
    else:
        empty = [all(_blank(m["content"]) for m in msgs) for msgs in messages]
    full = [msgs for msgs, e in zip(messages, empty, strict=True) if not e]
    rendered = iter(render_chats(tokenizer, full) if full else [])
    keys = [_hash("" if e else next(rendered)) for e in empty]
    return {"messages": messages, _EMPTY: empty, _KEY: keys}


def _not_empty(batch: dict[str, list[Any]]) -> list[bool]:
    return [not e for e in batch[_EMPTY]]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_files(files: list[str], base_dir: Path, where: str = "dataset.files") -> list[str]:
    out = []
    for f in files:
        p = Path(f)
        if not p.is_absolute():
            p = base_dir / p
        if not p.is_file():
            raise DataError(f"{where}: {f!r} not found (looked for {p})")
        out.append(str(p.resolve()))
    return out


def source_name(part: DatasetPart) -> str:
    """How logs, metrics and the card name a source: its Hub id, or its first file's name."""
    if part.id is not None:
        return part.id
    assert part.files is not None
    return Path(part.files[0]).name


def source_path(dataset: DatasetSource, index: int) -> str:
    """The spec path of a source's fields, for messages: ``dataset``, or ``dataset.sources[i]`` in a mix."""
    return "dataset" if dataset.sources is None else f"dataset.sources[{index}]"


def hub_commit(part: DatasetPart, where: str = "dataset") -> str | None:
    """The commit ``part.revision`` points to now, from the Hub API (``$HF_ENDPOINT``, ``$HF_TOKEN``),
    so that exactly this commit is loaded and recorded. A repository or revision the Hub says does not
    exist is a :class:`DataError`; no answer (offline, ``HF_HUB_OFFLINE``, a mirror without the API)
    is a warning and ``None``: the revision is then loaded as given."""
    from huggingface_hub import HfApi

    assert part.id is not None
    api = HfApi(endpoint=os.environ.get(_ENV_HF_ENDPOINT) or None, token=os.environ.get(ENV_HF_TOKEN) or None)
    try:
        sha = api.dataset_info(part.id, revision=part.revision).sha
    except Exception as exc:  # best effort: offline mirrors and HF_HUB_OFFLINE still train
        error = hub_not_found(
            exc, DataError, where=where, what="dataset", repo_id=part.id, revision=part.revision
        )
        if error is not None:
            raise error from None
        log.warning(
            "%s: could not resolve %s@%s to a commit (%s); loading the revision as given",
            where,
            part.id,
            part.revision,
            type(exc).__name__,
        )
        return None
    return str(sha) if sha else None


def file_digests(part: DatasetPart, base_dir: Path, where: str = "dataset") -> dict[str, str]:
    """sha256 of each of ``part.files``, keyed by the path as the spec writes it."""
    assert part.files is not None
    digests = {}
    for spec_path, path in zip(
        part.files, resolve_files(part.files, base_dir, f"{where}.files"), strict=True
    ):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[spec_path] = h.hexdigest()
    return digests


def resolve(dataset: DatasetSource, base_dir: Path, pin: Path | None = None) -> list[dict[str, Any]]:
    """What exactly each source is, before anything is loaded, in ``parts()`` order: for a Hub dataset
    ``{id, revision, split, commit}`` (the commit its revision resolves to, which :func:`load_raw` then
    loads; ``None`` when the Hub did not answer), for local files ``{files: {path: sha256}}``. This list
    is the data lineage (``{"datasets": [...]}`` in stats.json, metrics.json and the model card).

    ``pin`` (``<run>/datasets.json``): the Hub commits the run's first process resolved, which every
    other process and restart of the run then uses, so ranks never train on different commits of a
    branch that moved while they started. Files are hashed every time: their bytes are what counts."""
    pinned = _read_dataset_pin(pin)
    out: list[dict[str, Any]] = []
    for i, part in enumerate(dataset.parts()):
        if part.files is not None:
            out.append({"files": file_digests(part, base_dir, source_path(dataset, i))})
            continue
        entry = {"id": part.id, "revision": part.revision, "split": part.split}
        commit = pinned.get(_pin_key(entry))
        if commit is None:
            commit = hub_commit(part, source_path(dataset, i))
        out.append({**entry, "commit": commit})
    if pin is not None:
        resolved = {_pin_key(e): e["commit"] for e in out if e.get("commit")}
        if resolved.keys() - pinned.keys():
            try:
                write_json_once(pin, resolved)
            except (OSError, ValueError) as exc:  # a read-only output folder: this process only
                log.debug("could not write %s: %s", pin, exc)
    return out


def _pin_key(entry: dict[str, Any]) -> str:
    return f"{entry['id']}@{entry['revision']}"


def _read_dataset_pin(pin: Path | None) -> dict[str, str]:
    if pin is None:
        return {}
    try:
        data = json.loads(pin.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if is_commit(v)}


def load_raw(
    part: DatasetPart, base_dir: Path, split: str | None = None, *, commit: str | None = None
) -> Any:
    """The raw rows of a Hub split (``split``, else ``part.split``) at ``commit`` (else at
    ``part.revision``), or of the local files."""
    import datasets

    if part.files is not None:
        files = resolve_files(part.files, base_dir)
        builder = _FILE_BUILDERS[next(s for s in _FILE_BUILDERS if files[0].lower().endswith(s))]
        return datasets.load_dataset(builder, data_files=files, split="train")
    assert part.id is not None
    return datasets.load_dataset(
        part.id,
        revision=commit or part.revision,
        split=split or part.split,
        token=os.environ.get(ENV_HF_TOKEN) or None,
    )


def _require_columns(ds: Any, source: DatasetPart) -> None:
    columns = list(ds.column_names)
    if source.format == "text":
        needed = [("dataset.textField", source.text_field)]
    elif source.format == "chat":
        needed = [("dataset.messagesField", source.messages_field)]
    elif source.format == "completion":
        needed = [
            ("dataset.promptField", source.prompt_field),
            ("dataset.completionField", source.completion_field),
        ]
    else:
        needed = [("dataset.format alpaca", "instruction"), ("dataset.format alpaca", "output")]
    for where, column in needed:
        if column not in columns:
            raise DataError(f"{where}: column {column!r} not in dataset; columns are {columns}")


def format_and_clean(
    ds: Any, source: DatasetPart, tokenizer: Any, what: str = "train", seen: set[str] | None = None
) -> tuple[Any, DataStats]:
    """Format rows for TRL, drop empty ones and exact duplicates. Returns the rows and counts.

    ``seen``: the keys of the rows kept so far, shared by the sources of a mix (a row an earlier source
    has is a duplicate; this call adds its own). ``None``: duplicates within these rows, when
    ``source.dedup`` (a whole ``DatasetSource``) says so."""
    _require_columns(ds, source)
    if source.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "dataset.format chat needs a tokenizer with a chat template, and this model's tokenizer has "
            "none; set dataset.chatTemplate (a built-in: chatml, llama-2, alpaca, guanaco, or a Jinja "
            "template), or use dataset.format text, alpaca or completion"
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
    elif source.format == "completion":
        fields = {"prompt_field": source.prompt_field, "completion_field": source.completion_field}
        ds = ds.map(format_completion_batch, fn_kwargs=fields, **map_kwargs)
    else:
        import datasets

        # Typed: datasets infers a Json column from mixed raw messages (ShareGPT items, extra keys),
        # which Arrow batches would then hold as strings.
        message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
        typed = {"messages": datasets.List(message), _EMPTY: datasets.Value("bool")}
        features = datasets.Features({**typed, _KEY: datasets.Value("string")})
        ds = ds.map(
            format_chat_batch,
            fn_kwargs={
                "messages_field": source.messages_field,
                "tokenizer": tokenizer,
                "train_on": source.effective_train_on(),
            },
            features=features,
            **map_kwargs,
        )
    ds = ds.filter(_not_empty, batched=True, desc=f"Dropping empty {what} rows")
    stats.empty_dropped = stats.rows_read - len(ds)
    if seen is None and getattr(source, "dedup", False):
        seen = set()
    if seen is not None:
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


def mix_indices(n: int, weight: float | None, max_rows: int | None, rng: Any) -> list[int]:
    """The rows (of ``n``) a source puts into the mix: ``weight`` whole copies of every row plus a
    sample of the fractional part (at least one row in all), then at most ``max_rows`` of those, a
    sample; ``rng`` (a seeded numpy Generator) makes it reproducible. Sorted: the mix is shuffled later."""
    import numpy as np

    whole, frac = divmod(float(weight if weight is not None else 1), 1.0)
    idx = np.tile(np.arange(n), int(whole))
    extra = int(frac * n + 0.5)  # half up: 2.5 × 9 rows is 23
    if len(idx) + extra == 0 and n > 0:
        extra = 1  # a small weight on a small source still adds a row
    if extra:
        idx = np.concatenate([idx, rng.choice(n, size=extra, replace=False)])
    if max_rows is not None and len(idx) > max_rows:
        idx = idx[rng.choice(len(idx), size=max_rows, replace=False)]
    return sorted(int(i) for i in idx)


def _hold_out(train: Any, fraction: float, seed: int, where: str, mixed: bool) -> tuple[Any, Any | None]:
    """``fraction`` of a source's cleaned rows held out for evaluation (a seeded split)."""
    kept = len(train)
    n_eval = round(kept * fraction)
    if n_eval >= kept or (n_eval < 1 and not mixed):
        raise DataError(
            f"dataset.validation.fraction {fraction} of {kept} rows"
            + (f" of {where}" if mixed else "")
            + f" leaves {n_eval} validation rows; use a {'larger' if n_eval < 1 else 'smaller'} fraction "
            "or more data"
        )
    if n_eval < 1:  # a small source of a mix: its rows all train
        return train, None
    split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


def prepare(
    spec: FineTuneJobSpec,
    base_dir: Path,
    tokenizer: Any,
    *,
    lineage: list[dict[str, Any]] | None = None,
    raw: dict[tuple[int, str], Any] | None = None,
) -> PreparedData:
    """Load, format, clean and split each source of ``spec.dataset``, then weight and cap its training
    rows. ``lineage`` is :func:`resolve`'s answer when the caller has it already (each Hub source is
    loaded at the commit it names), ``raw`` the rows already loaded, by (source index, split).

    Dedup runs across the mix: a row that an earlier source (or earlier in the same source) has is
    dropped. The validation fraction is held out of each source before ``weight`` / ``maxRows``, so the
    evaluation rows are the same whatever the mix. Every sample is seeded by ``training.seed``. The
    rows are not tokenized (see :func:`tokenize`): each source keeps its own format."""
    import numpy as np

    dataset = spec.dataset
    parts = dataset.parts()
    mixed = dataset.sources is not None
    lineage = lineage if lineage is not None else resolve(dataset, base_dir)
    raw = raw or {}
    seed = spec.training.seed
    seen: set[str] | None = set() if dataset.dedup else None
    v = dataset.validation
    stats = DataStats()
    sources: list[SourceRows] = []
    for i, (part, entry) in enumerate(zip(parts, lineage, strict=True)):
        here = source_path(dataset, i)
        commit = entry.get("commit")
        try:
            rows = raw.get((i, part.split))
            if rows is None:
                rows = load_raw(part, base_dir, commit=commit)
            train, s = format_and_clean(rows, part, tokenizer, what="train", seen=seen)
        except DataError as exc:
            if not mixed:
                raise
            msg, name = str(exc), source_name(part)
            # The field's path in the mix: dataset.textField → dataset.sources[1].textField.
            raise DataError(
                f"{here}{msg[len('dataset') :]} (source {name})"
                if msg.startswith("dataset.")
                else f"{here} ({name}): {msg}"
            ) from None
        if s.kept == 0:
            what = "rows" if mixed else "training rows"
            raise DataError(f"{here}: no {what} left after cleaning ({s.summary()})")
        evaluation = None
        if v is not None and v.fraction is not None:
            train, evaluation = _hold_out(train, v.fraction, seed, here, mixed)
        elif v is not None and v.split is not None:  # one Hub dataset (the API's rule)
            rows_eval = raw.get((i, v.split))
            if rows_eval is None:
                rows_eval = load_raw(part, base_dir, split=v.split, commit=commit)
            evaluation, e = format_and_clean(
                rows_eval, part, tokenizer, what="validation", seen=set() if dataset.dedup else None
            )
            stats.validation = {
                k: getattr(e, k) for k in ("rows_read", "empty_dropped", "duplicates_dropped", "kept")
            }
            if e.kept == 0:
                raise DataError(f"dataset.validation.split {v.split!r}: no rows left after cleaning")
        if part.weight is not None or part.max_rows is not None:
            rng = np.random.default_rng([seed, i])
            train = train.select(mix_indices(len(train), part.weight, part.max_rows, rng))
        n_eval = len(evaluation) if evaluation is not None else 0
        for k in ("rows_read", "empty_dropped", "duplicates_dropped", "kept"):
            setattr(stats, k, getattr(stats, k) + getattr(s, k))
        stats.train_rows += len(train)
        stats.validation_rows += n_eval
        stats.sources.append(
            {
                "name": source_name(part),
                "format": part.format,
                "train_on": part.effective_train_on(),
                "rows_read": s.rows_read,
                "empty_dropped": s.empty_dropped,
                "duplicates_dropped": s.duplicates_dropped,
                "kept": s.kept,
                "train_rows": len(train),
                "validation_rows": n_eval,
                "weight": part.weight if part.weight is not None else 1,
                "max_rows": part.max_rows,
            }
        )
        sources.append(SourceRows(part=part, train=train, eval=evaluation))
    if v is not None and v.fraction is not None and stats.validation_rows == 0:
        raise DataError(
            f"dataset.validation.fraction {v.fraction} of {stats.kept} rows leaves 0 validation rows; "
            "use a larger fraction or more data"
        )
    return PreparedData(sources=sources, stats=stats, lineage={"datasets": lineage})


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


def _fast_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast tokenizer when calling it directly gives what
    ``tokenizer(texts)`` gives: the settings transformers would apply are its defaults (no truncation
    or padding, special tokens not split, no input/target mode). Else ``None``."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
        and not hasattr(tokenizer, "_switch_to_input_mode")
    ):
        return backend
    return None


def encode(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``, for a fast tokenizer straight from its Rust backend's
    ``encode_batch_fast`` (no offsets: a quarter less work), which is what transformers' call does
    once its settings are applied (:func:`_fast_backend`), else through the call."""
    backend = _fast_backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    out = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)
    return list(out["input_ids"])


def encode_with_offsets(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[Any]]:
    """Token ids and each token's ``(start, end)`` characters in its text, without special tokens (as a
    rendered chat is tokenized): the offsets that transformers' ``return_assistant_tokens_mask`` uses."""
    backend = _fast_backend(tokenizer)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    try:
        out = tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True
        )
    except NotImplementedError:
        raise DataError(
            "dataset.trainOn assistant needs a fast tokenizer (one with character offsets, "
            "tokenizer.json); this model's is a slow one: use dataset.trainOn all"
        ) from None
    return list(out["input_ids"]), list(out["offset_mapping"])


def _with_eos(texts: list[str], eos: str | None) -> list[str]:
    # TRL's add_eos: only where the text does not end with the EOS token already.
    if not eos:
        return texts
    return [t if t.endswith(eos) else t + eos for t in texts]


def tokenize_text_batch(batch: Any, tokenizer: Any, max_length: int, train_on: str = "all") -> Any:
    """``text`` rows → every token is learned (labels == input_ids)."""
    texts = _with_eos(batch.column("text").to_pylist(), tokenizer.eos_token)
    ids = _int_lists(encode(tokenizer, texts))
    return _labelled(ids, ids, None, max_length)


def _template_error(exc: Exception) -> DataError:
    return DataError(
        f"dataset.chatTemplate: rendering a conversation failed: {type(exc).__name__}: {exc} "
        "(the template of dataset.chatTemplate, else the tokenizer's)"
    )


def render_chats(tokenizer: Any, conversations: list[Any], add_generation_prompt: bool = False) -> list[str]:
    """``conversations`` rendered with the tokenizer's chat template (not tokenized), in one call; a
    template error is a :class:`DataError` naming ``dataset.chatTemplate``."""
    import jinja2

    try:
        rendered = tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as exc:
        raise _template_error(exc) from None
    return list(rendered)


def tokenize_chat_batch(batch: Any, tokenizer: Any, max_length: int, train_on: str = "all") -> Any:
    """``messages`` rows → the chat template rendered, then tokenized without special tokens, as
    ``apply_chat_template(tokenize=True)`` does. ``train_on`` ``all``: every token is learned;
    ``assistant``: only the assistant's (:func:`assistant_spans`). No EOS is added (TRL adds none to
    conversations: the template writes the end-of-turn tokens)."""
    conversations = batch.column("messages").to_pylist()
    if train_on != "assistant":
        ids = _int_lists(encode(tokenizer, render_chats(tokenizer, conversations), add_special_tokens=False))
        return _labelled(ids, ids, None, max_length)
    import numpy as np
    import pyarrow as pa

    rendered, spans = assistant_spans(tokenizer, conversations)
    rows, offsets = encode_with_offsets(tokenizer, rendered)
    ids = _int_lists(rows)
    values = ids.values.to_numpy(zero_copy_only=False)
    learned = np.zeros(len(values), dtype=bool)
    first = np.full(len(rows), np.iinfo(np.int64).max, dtype=np.int64)
    base = ids.offsets.to_numpy()
    for r, (row_offsets, row_spans) in enumerate(zip(offsets, spans, strict=True)):
        if not row_offsets:
            continue
        where = np.asarray(row_offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(where), dtype=bool)
        # A token is the assistant's when it overlaps a span (transformers' rule, so a token that
        # straddles a span's edge is learned).
        for start, end in row_spans:
            mask |= (where[:, 0] < end) & (where[:, 1] > start)
        if not mask.any():
            raise DataError(
                "dataset.trainOn assistant: the chat template's {% generation %} markers mark no text of a "
                "conversation that has an assistant message; put {% generation %} … {% endgeneration %} "
                "around the assistant's content (and its end-of-turn token) in dataset.chatTemplate, or "
                "set dataset.trainOn: all"
            )
        learned[base[r] : base[r + 1]] = mask
        first[r] = int(np.argmax(mask))
    labels = pa.ListArray.from_arrays(
        ids.offsets, pa.array(np.where(learned, values, np.int32(-100)), type=pa.int32())
    )
    # A row keeps a label when its first learned token is within the first max_length tokens.
    return _labelled(ids, labels, first < max_length, max_length)


def _prefix_error(index: int, conversation: list[dict[str, str]]) -> DataError:
    roles = ", ".join(m["role"] for m in conversation[: index + 2])
    return DataError(
        "dataset.trainOn assistant: the chat template has no {% generation %} markers, so the assistant "
        "turns are found by role, which needs the template to render the start of a conversation as the "
        f"start of the whole conversation; this one renders message {index + 1} ({roles}, …) differently "
        "once more messages follow. Set dataset.chatTemplate to a built-in (chatml, llama-2, alpaca, "
        "guanaco), add {% generation %} … {% endgeneration %} around the assistant's text in the "
        "template, or set dataset.trainOn: all"
    )


def assistant_spans(
    tokenizer: Any, conversations: list[list[dict[str, str]]]
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Each conversation rendered whole, and the ``(start, end)`` characters of what its assistant
    wrote: from the template's ``{% generation %}`` markers where it has them (exactly what TRL's
    ``assistant_only_loss`` learns), else by role: message ``i`` of the assistant runs from the end of
    ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``,
    so its end-of-turn tokens are learned and the generation prompt is not. Rendering by role is
    checked: each rendering must be a prefix of the next, else the template's turns cannot be found
    (a :class:`DataError` saying what to do)."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    from kubetune.trainer.templates import has_generation_markers

    template = tokenizer.get_chat_template()
    if has_generation_markers(template):
        try:
            rendered, indices = render_jinja_template(
                conversations=conversations,
                chat_template=template,
                return_assistant_tokens_mask=True,
                **tokenizer.special_tokens_map,
            )
        except jinja2.TemplateError as exc:
            raise _template_error(exc) from None
        return list(rendered), [[(int(a), int(b)) for a, b in row] for row in indices]
    whole = render_chats(tokenizer, conversations)
    turns = [
        (c, i) for c, conv in enumerate(conversations) for i, m in enumerate(conv) if m["role"] == "assistant"
    ]
    # Two batched renderings per assistant message: up to its generation prompt, and through it (the
    # whole conversation when it is the last message).
    last = [i + 1 == len(conversations[c]) for c, i in turns]
    opened = [conversations[c][:i] for c, i in turns if i > 0]
    closed = [conversations[c][: i + 1] for (c, i), done in zip(turns, last, strict=True) if not done]
    opened_text = iter(render_chats(tokenizer, opened, add_generation_prompt=True) if opened else [])
    closed_text = iter(render_chats(tokenizer, closed) if closed else [])
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for (c, i), done in zip(turns, last, strict=True):
        before = next(opened_text) if i > 0 else _opening(tokenizer)
        through = whole[c] if done else next(closed_text)
        end_before = spans[c][-1][1] if spans[c] else 0
        if not (through.startswith(before) and whole[c].startswith(through) and len(before) >= end_before):
            raise _prefix_error(i, conversations[c])
        spans[c].append((len(before), len(through)))
    return whole, spans


def _opening(tokenizer: Any) -> str:
    """What a template writes before a conversation's first message when that is the assistant's
    (its generation prompt for no messages), or nothing when it cannot render an empty conversation."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[[]],
            chat_template=tokenizer.get_chat_template(),
            add_generation_prompt=True,
            **tokenizer.special_tokens_map,
        )
    except Exception:  # templates that read messages[0] unconditionally
        return ""
    return str(rendered[0])


def _warn_if_stop_untrained(tokenizer: Any) -> None:
    """Warn when the template's assistant turns end without a special token to learn (Falcon's plain
    ``User:``/``Falcon:`` turns, say): the model then never learns to stop. TRL warns the same way."""
    probe = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    rendered, spans = assistant_spans(tokenizer, [probe])
    if not spans[0]:
        return  # markers that mark nothing: tokenizing says so
    (start, end), text = spans[0][0], rendered[0]
    ids, offsets = encode_with_offsets(tokenizer, [text])
    learned = [t for t, (a, b) in zip(ids[0], offsets[0], strict=True) if a < end and b > start]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    last = next((t for t in reversed(learned) if tokenizer.decode([t]).strip()), None)
    if last is None or last not in special:
        log.warning(
            "dataset.trainOn assistant: the chat template ends an assistant turn with %r, not with an "
            "end-of-turn token (such as EOS %r), so the model may not learn to stop; a built-in "
            "dataset.chatTemplate (chatml, llama-2, alpaca, guanaco) ends each turn with one",
            text[start:end][-20:],
            tokenizer.eos_token,
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:  # the usual case, compared in C
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompt_completion_batch(
    batch: Any, tokenizer: Any, max_length: int, train_on: str = "completion"
) -> Any:
    """``prompt`` / ``completion`` rows (alpaca, completion) → ``train_on`` ``completion``: the loss on
    the completion only: the prompt and prompt+completion are tokenized apart, and the tokens they
    share (TRL's ``common_prefix_length``) get label -100. ``all``: every token of prompt+completion is
    learned (TRL's ``completion_only_loss=False``)."""
    import numpy as np
    import pyarrow as pa

    prompts = batch.column("prompt").to_pylist()
    completions = _with_eos(batch.column("completion").to_pylist(), tokenizer.eos_token)
    full_ids = encode(tokenizer, [p + c for p, c in zip(prompts, completions, strict=True)])
    if train_on == "all":
        ids = _int_lists(full_ids)
        return _labelled(ids, ids, None, max_length)
    prompt_ids = encode(tokenizer, prompts)
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
    "completion": tokenize_prompt_completion_batch,
    "chat": tokenize_chat_batch,
}


def tokenize(
    ds: Any,
    data_format: str,
    tokenizer: Any,
    max_length: int,
    *,
    train_on: TrainOn | None = None,
    num_proc: int = 1,
    cache_file_name: str | None = None,
    what: str = "train",
) -> tuple[Any, int]:
    """The formatted rows of ``data_format`` as ``input_ids`` / ``labels`` (int32 lists, -100 = no
    loss), truncated to ``max_length``, the loss on the tokens ``train_on`` names (``None``: the
    format's default, ``DEFAULT_TRAIN_ON``); returns them and how many rows truncation left without
    a label (dropped, as TRL drops them)."""
    train_on = train_on or DEFAULT_TRAIN_ON[data_format]
    if train_on not in TRAIN_ON_BY_FORMAT[data_format]:
        raise DataError(
            f"dataset.trainOn {train_on} does not suit format {data_format}; it can train on "
            + " or ".join(TRAIN_ON_BY_FORMAT[data_format])
        )
    if data_format == "chat" and train_on == "assistant" and len(ds):
        _warn_if_stop_untrained(tokenizer)
    before = len(ds)
    out = ds.with_format("arrow").map(
        _TOKENIZERS[data_format],
        batched=True,
        batch_size=1000,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "train_on": train_on},
        remove_columns=list(ds.column_names),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=cache_file_name,
        desc=f"Tokenizing {what} rows",
    )
    out = out.with_format(None)
    return out, before - len(out)


def loss_tokens(ds: Any) -> int:
    """How many tokens of tokenized (or packed) rows carry the loss: labels other than -100."""
    import pyarrow.compute as pc

    if ds is None or len(ds) == 0:
        return 0
    labels = ds.with_format("arrow")[:]["labels"] if ds._indices is not None else ds.data.column("labels")
    return int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0)
