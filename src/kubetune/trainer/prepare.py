"""Data preparation as its own cached step: ``python -m kubetune.trainer.prepare --spec FILE``.

Load → format → clean/dedup → split → weight/cap, per source (:mod:`kubetune.trainer.data`) → tokenize
each source with its own format and ``trainOn``, truncated to ``training.maxSeqLength`` (batched
``Dataset.map`` over ``num_proc`` processes) → the sources concatenated and shuffled by seed → pack
(:func:`kubetune.trainer.packing.pack`) → an Arrow dataset (``save_to_disk``: ``train/``, ``eval/``,
``stats.json``) in ``<cache>/<key>/``, written to a temporary folder and renamed into place.

The key is a digest of everything the prepared rows depend on: each source (the Hub commit its revision
resolves to, which is what is loaded, or each file's sha256; offline, the raw rows' ``datasets``
fingerprint), the tokenizer
(its serialized vocabulary and rules, special tokens and chat template), ``spec.dataset``,
``training.maxSeqLength`` / ``packing`` / ``blockSize`` / ``seed``, the tokenizer libraries' versions and
:data:`PREP_FORMAT`. A changed input is a new key, so it is prepared again; an unchanged one is loaded.

Preparers of one key take turns through ``fcntl.flock`` on ``<cache>/<key>.lock``: several pods on a
ReadWriteMany workspace (flock works on NFSv4 and CephFS) or several local ranks do the work once, the
others wait on the lock, then load. In the cluster this runs as the Job's ``prepare`` init container,
and every training process only loads the result, before the process group exists (no rank waits
under an NCCL/gloo timeout).

The cache lives in ``$KUBETUNE_PREPARED_DIR`` when set, else ``$KUBETUNE_WORKDIR/.cache/kubetune/prepared``
(the workspace, in the cluster), else ``${XDG_CACHE_HOME:-~/.cache}/kubetune/prepared``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.contract import ENV_PREPARE_NUM_PROC as ENV_NUM_PROC
from kubetune.contract import ENV_PREPARED_DIR, ENV_RUN, ENV_WORKDIR, REASON_UNEXPECTED, Exit
from kubetune.trainer.errors import DataError, TrainerError
from kubetune.trainer.packing import pack

log = logging.getLogger("kubetune.trainer")

# Bump when what is written changes (columns, tokenization, stats.json): old entries are not reused.
PREP_FORMAT = 2  # 2: dataset mixes, per-source stats, loss-token counts, lineage {"datasets": [...]}
# Fewer rows than this per process and the pool's start-up costs more than it saves.
MIN_ROWS_PER_PROC = 2000
STATS_FILE = "stats.json"
DATASET_PIN = "datasets.json"  # in the run folder: the dataset commits every process of the run uses


def cache_root() -> Path:
    """Where prepared datasets live (see the module docstring)."""
    if os.environ.get(ENV_PREPARED_DIR):
        return Path(os.environ[ENV_PREPARED_DIR])
    if os.environ.get(ENV_WORKDIR):
        return Path(os.environ[ENV_WORKDIR]) / ".cache" / "kubetune" / "prepared"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune" / "prepared"


def cpu_count() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's
    ``resources.limits.cpu``, which the affinity does not show)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    return max(1, n)


def default_num_proc(rows: int, requested: int | None = None) -> int:
    """Tokenizing processes: ``requested`` (``--num-proc``), else ``$KUBETUNE_PREPARE_NUM_PROC``, else one
    per CPU with at least :data:`MIN_ROWS_PER_PROC` rows each; never more than there are rows."""
    if requested is None and os.environ.get(ENV_NUM_PROC):
        try:
            requested = int(os.environ[ENV_NUM_PROC])
        except ValueError:
            value = os.environ[ENV_NUM_PROC]
            raise DataError(f"${ENV_NUM_PROC} must be a whole number, got {value!r}") from None
    n = requested if requested is not None and requested > 0 else min(cpu_count(), rows // MIN_ROWS_PER_PROC)
    return max(1, min(n, rows))


# --------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of what tokenization depends on: the fast tokenizer's serialized ``tokenizer.json`` (or a
    slow one's vocabulary), the special tokens, the BOS/EOS switches and the chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(_canonical(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        _canonical(
            {
                "special": tokenizer.special_tokens_map,
                "added": sorted(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()),
                "add_bos": getattr(tokenizer, "add_bos_token", None),
                "add_eos": getattr(tokenizer, "add_eos_token", None),
                "chat_template": getattr(tokenizer, "chat_template", None),
            }
        ).encode()
    )
    return h.hexdigest()


def key_inputs(spec: FineTuneJobSpec, data_identity: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """Everything the prepared rows depend on (written to ``stats.json``, hashed into the key)."""
    from importlib import metadata

    libraries = {}
    for name in ("tokenizers", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            libraries[name] = metadata.version(name)
    t = spec.training
    return {
        "format": PREP_FORMAT,
        "data": data_identity,
        "tokenizer": tokenizer_digest(tokenizer),
        "dataset": spec.dataset.model_dump(mode="json", by_alias=True),
        # By name: packing's fields are another module's, and any value of theirs must change the key.
        "training": {
            name: getattr(t, name, None) for name in ("max_seq_length", "packing", "block_size", "seed")
        },
        "libraries": libraries,
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(inputs).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# Load or prepare
# --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The prepared (tokenized, truncated, packed) splits and how this process got them."""

    train: Any  # datasets.Dataset: input_ids, labels (and whatever packing adds)
    eval: Any | None
    stats: Any  # data.DataStats
    tokens: dict[str, int]  # {train,validation}_{tokens,loss_tokens,dropped_by_truncation,sequences}
    key: str
    path: Path
    lineage: dict[str, Any]  # {"datasets": [per source: {id, revision, split, commit} | {files}]}
    cache_hit: bool = True
    seconds: float = 0.0  # this process's time to get the data (waiting included)
    waited_seconds: float = 0.0  # of which spent waiting for another preparer
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json: the key and what this process did."""
        return {
            "key": self.key,
            "cache_hit": self.cache_hit,
            "seconds": round(self.seconds, 3),
            **self.tokens,
        }


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[float]:
    """Hold ``flock`` on ``lock_path``; yields the seconds spent waiting for it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        start = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            log.info("data: waiting for %s, which is preparing this dataset (%s)", holder, lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.monotonic() - start
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield waited
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _tokenizer_threads(num_proc: int) -> Iterator[None]:
    """Parallel over processes, not Rust threads: each tokenizing process uses one core (threads on
    top of processes oversubscribe the CPUs, and a fork after threads were used disables them with a
    warning)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _tokens(ds: Any) -> int:
    import pyarrow.compute as pc  # type: ignore[import-untyped]

    if ds is None or len(ds) == 0:
        return 0
    return int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())


def _identity(
    spec: FineTuneJobSpec, base_dir: Path, pin: Path | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[int, str], Any]]:
    """(what identifies each source's content for the key, the lineage, raw rows loaded for it): each
    Hub revision is resolved to its commit before anything is loaded (``data.resolve``)."""
    from kubetune.trainer import data as data_mod

    dataset = spec.dataset
    lineage = data_mod.resolve(dataset, base_dir, pin)
    identity: list[dict[str, Any]] = []
    raw: dict[tuple[int, str], Any] = {}
    v = dataset.validation
    for i, (part, entry) in enumerate(zip(dataset.parts(), lineage, strict=True)):
        if part.files is not None or entry.get("commit"):
            identity.append(entry)
            continue
        # Offline (or a mirror without the API): datasets' fingerprint of the rows it loaded.
        splits = [part.split] + ([v.split] if v is not None and v.split is not None else [])
        fingerprints = {}
        for split in splits:
            raw[(i, split)] = data_mod.load_raw(part, base_dir, split=split)
            fingerprints[split] = raw[(i, split)]._fingerprint
        identity.append({**entry, "fingerprints": fingerprints})
    return identity, lineage, raw


def _load(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    import datasets

    from kubetune.trainer.data import DataStats

    stats = json.loads((path / STATS_FILE).read_text(encoding="utf-8"))
    train = datasets.load_from_disk(str(path / "train"))
    evaluation = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    stats["data_stats"] = DataStats(**stats["data"])
    return train, evaluation, stats


def _warn_truncation(tokens: dict[str, int], rows: dict[str, int], max_len: int) -> None:
    for what in ("train", "validation"):
        dropped = tokens.get(f"{what}_dropped_by_truncation", 0)
        if dropped:
            log.warning(
                "%d of %d %s rows dropped: truncated to training.maxSeqLength (%d tokens), their prompt "
                "leaves no token to learn",
                dropped,
                rows[what],
                "training" if what == "train" else what,
                max_len,
            )


def _tokenize_split(
    what: str,
    pieces: list[tuple[int, Any, Any]],
    tokenizer: Any,
    max_len: int,
    num_proc: int | None,
    work: Path,
) -> tuple[Any, int, dict[str, Any]]:
    """Each source's rows of one split, ``(index, part, rows)``, tokenized with the source's format and
    ``trainOn``, then concatenated; returns them, the rows truncation dropped and the timings."""
    import datasets

    from kubetune.trainer import data as data_mod

    rows = sum(len(ds) for _, _, ds in pieces)
    # Per source: a small source of a big mix is not worth a process pool.
    per_source = [default_num_proc(len(ds), num_proc) for _, _, ds in pieces]
    procs = max(per_source)
    start = time.monotonic()
    out, dropped = [], 0
    with _tokenizer_threads(procs):
        for (i, part, ds), n_proc in zip(pieces, per_source, strict=True):
            tokenized, n = data_mod.tokenize(
                ds,
                part.format,
                tokenizer,
                max_len,
                train_on=part.effective_train_on(),
                num_proc=n_proc,
                cache_file_name=str(work / f"{what}-{i}-tokenized.arrow"),
                what=what,
            )
            out.append(tokenized)
            dropped += n
    seconds = time.monotonic() - start
    tokenized = out[0] if len(out) == 1 else datasets.concatenate_datasets(out)
    n_tokens = _tokens(tokenized)
    log.info(
        "data: tokenized %d %s rows (%d tokens) in %.1f s with %d process%s (%.0f tokens/s)",
        rows,
        what,
        n_tokens,
        seconds,
        procs,
        "" if procs == 1 else "es",
        n_tokens / seconds if seconds > 0 else 0.0,
    )
    return tokenized, dropped, {"num_proc": procs, "seconds": round(seconds, 3), "parts": out}


def _prepare_into(
    tmp: Path,
    spec: FineTuneJobSpec,
    base_dir: Path,
    tokenizer: Any,
    lineage: list[dict[str, Any]],
    raw: dict[tuple[int, str], Any],
    num_proc: int | None,
) -> tuple[dict[str, int], Any, dict[str, Any]]:
    """Prepare the splits into ``tmp`` (train/, eval/); returns token counts, stats and details."""
    from kubetune.trainer import data as data_mod

    max_len = spec.training.max_seq_length
    rows = data_mod.prepare(spec, base_dir, tokenizer, lineage=lineage, raw=raw)
    log.info("data: %s", rows.stats.summary())
    mixed = len(rows.sources) > 1
    if mixed:
        for source in rows.stats.sources:
            log.info("data: source %s", data_mod.source_summary(source))
    # A mix, or a source weighted/capped (repeated rows side by side), is shuffled once tokenized.
    shuffle = mixed or any(s.part.weight is not None or s.part.max_rows is not None for s in rows.sources)
    work = tmp / "work"
    work.mkdir(parents=True)
    tokens: dict[str, int] = {}
    details: dict[str, Any] = {}
    counts = {"train": rows.stats.train_rows, "validation": rows.stats.validation_rows}
    for what in ("train", "validation"):
        pieces: list[tuple[int, Any, Any]] = []
        for i, source_rows in enumerate(rows.sources):
            ds = source_rows.train if what == "train" else source_rows.eval
            if ds is not None:
                pieces.append((i, source_rows.part, ds))
        if not pieces:
            continue
        tokenized, dropped, timing = _tokenize_split(what, pieces, tokenizer, max_len, num_proc, work)
        if what == "train":
            for source, part_rows in zip(rows.stats.sources, timing["parts"], strict=True):
                source["train_tokens"] = _tokens(part_rows)
                source["train_loss_tokens"] = data_mod.loss_tokens(part_rows) if len(part_rows) else 0
        del timing["parts"]
        tokens[f"{what}_tokens"] = _tokens(tokenized)
        tokens[f"{what}_loss_tokens"] = data_mod.loss_tokens(tokenized) if len(tokenized) else 0
        tokens[f"{what}_dropped_by_truncation"] = dropped
        details[f"{what}_tokenize"] = timing
        n_rows = sum(len(p[2]) for p in pieces)
        if len(tokenized) == 0:
            raise DataError(
                f"dataset: all {n_rows} {'training' if what == 'train' else what} rows were dropped: "
                f"truncated to training.maxSeqLength ({max_len} tokens), none has a token left to learn "
                "(the prompt alone fills it); raise training.maxSeqLength"
            )
        if what == "train" and shuffle:
            tokenized = tokenized.shuffle(seed=spec.training.seed).flatten_indices(
                cache_file_name=str(work / "train-shuffled.arrow")
            )
        packed = pack(tokenized, spec)
        if len(packed) != len(tokenized):
            log.info(
                "data: packed %d rows into %d sequences (training.packing %s)",
                len(tokenized),
                len(packed),
                getattr(spec.training, "packing", None),
            )
        tokens[f"{what}_sequences"] = len(packed)
        packed.save_to_disk(str(tmp / ("train" if what == "train" else "eval")))
    _warn_truncation(tokens, counts, max_len)
    shutil.rmtree(work, ignore_errors=True)
    return tokens, rows.stats, details


def load_or_prepare(
    spec: FineTuneJobSpec,
    base_dir: Path,
    tokenizer: Any,
    *,
    num_proc: int | None = None,
    root: Path | None = None,
    run_folder: Path | None = None,
) -> Prepared:
    """The prepared data of ``spec``: loaded from the cache, or prepared (once, under the key's lock)
    and then loaded. With ``run_folder``, the Hub commits of its datasets are those the run's first
    process resolved (``<run>/datasets.json``)."""
    start = time.monotonic()
    rank = os.environ.get("RANK")
    who = f" (rank {rank})" if rank is not None else ""
    identity, lineage, raw = _identity(spec, base_dir, run_folder / DATASET_PIN if run_folder else None)
    inputs = key_inputs(spec, identity, tokenizer)
    key = cache_key(inputs)
    root = root or cache_root()
    path = root / key
    hit, waited = True, 0.0
    if not (path / STATS_FILE).is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainerError(
                f"cannot create the prepared-data cache {root} ({exc.strerror}); set ${ENV_PREPARED_DIR} "
                "to a writable folder"
            ) from None
        with _locked(root / f"{key}.lock") as waited:
            if not (path / STATS_FILE).is_file():  # nobody prepared it while this process waited
                hit = False
                for stale in root.glob(f".tmp-{key}-*"):  # left by a preparer that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = root / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"
                try:
                    tokens, stats, details = _prepare_into(
                        tmp, spec, base_dir, tokenizer, lineage, raw, num_proc
                    )
                    record = {
                        "key": key,
                        "inputs": inputs,
                        "lineage": {"datasets": lineage},
                        "data": stats.as_dict(),
                        "tokens": tokens,
                        "details": details,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    (tmp / STATS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
                    os.rename(tmp, path)  # atomic: a reader sees all of it or nothing
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    train, evaluation, stored = _load(path)
    seconds = time.monotonic() - start
    prepared = Prepared(
        train=train,
        eval=evaluation,
        stats=stored["data_stats"],
        tokens=stored["tokens"],
        key=key,
        path=path,
        lineage={"datasets": lineage},
        cache_hit=hit,
        seconds=seconds,
        waited_seconds=waited,
        details=stored.get("details", {}),
    )
    summary = f"{len(train)} train rows, {prepared.tokens.get('train_tokens', 0)} tokens"
    if hit:
        log.info("data: cache hit %s (%s) at %s%s, loaded in %.2f s", key, summary, path, who, seconds)
        if waited > 0.5:
            log.info("data: waited %.1f s for another process to prepare it", waited)
        _warn_truncation(
            prepared.tokens,
            {"train": prepared.stats.train_rows, "validation": prepared.stats.validation_rows},
            spec.training.max_seq_length,
        )
    else:
        log.info("data: prepared %s (%s) at %s%s in %.1f s", key, summary, path, who, seconds)
    return prepared


# --------------------------------------------------------------------------------------------------
# python -m kubetune.trainer.prepare
# --------------------------------------------------------------------------------------------------


def prepare_file(spec_path: str | Path, num_proc: int | None = None) -> Prepared:
    """Prepare the data of the FineTuneJob in ``spec_path`` (what ``kubetune prepare`` and the Job's
    ``prepare`` init container run)."""
    from kubetune.trainer import modeling
    from kubetune.trainer.spec import base_dir as spec_base_dir
    from kubetune.trainer.spec import load_job
    from kubetune.trainer.train import setup_logging

    spec_file = Path(spec_path)
    job = load_job(spec_file)
    setup_logging(True)
    base = spec_base_dir(spec_file)
    run_folder = None
    if os.environ.get(ENV_RUN):  # the Job's init container: pin the run's base model and data commits
        from kubetune.trainer import layout, lineage
        from kubetune.trainer.spec import resolve_output

        run_folder = layout.run_dir(resolve_output(job.spec, base, None), layout.run_name(job))
        lineage.resolve_for_run(job.spec, base, run_folder)
    tokenizer = modeling.load_tokenizer(job.spec, base)
    return load_or_prepare(job.spec, base, tokenizer, num_proc=num_proc, run_folder=run_folder)


def main(argv: list[str] | None = None) -> int:
    from kubetune.contract import ENV_SPEC, SPEC_PATH
    from kubetune.redact import install_process_redaction, redact
    from kubetune.trainer.termination import write_termination_log

    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer.prepare",
        description="Load, clean, tokenize and pack a FineTuneJob's data into the prepared-data cache.",
    )
    parser.add_argument(
        "--spec", default=os.environ.get(ENV_SPEC, SPEC_PATH), help=f"FineTuneJob YAML file (${ENV_SPEC})"
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help=f"tokenizing processes (default: ${ENV_NUM_PROC}, else one per CPU)",
    )
    args = parser.parse_args(argv)
    install_process_redaction("kubetune.trainer")
    try:
        prepare_file(args.spec, args.num_proc)
    except TrainerError as exc:
        message = redact(str(exc))
        print(f"kubetune: error: {message}", file=sys.stderr, flush=True)
        write_termination_log(exc.reason, message)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kubetune: interrupted while preparing the data", file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT; what was half-written is removed, the lock is released
    except Exception as exc:
        print(redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        write_termination_log(REASON_UNEXPECTED, f"{type(exc).__name__}: {exc}", overwrite=False)
        return int(Exit.ERROR)
    return int(Exit.OK)


if __name__ == "__main__":
    sys.exit(main())
