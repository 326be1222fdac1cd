"""Where a model came from: the base model's exact commit (or its weights' digests), its licence, and
the run that trained it. Recorded in metrics.json, the model card and the FineTuneJob's status.

A Hub revision such as ``main`` moves; the commit it points at when the run starts is resolved once per
process through huggingface_hub, and :func:`pinned_revision` makes every load of the run (tokenizer,
config, weights, the merge) use that commit, so what the card names is what was trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kubetune.api.v1alpha1 import HUB_ID, FineTuneJob, FineTuneJobSpec
from kubetune.contract import ANNOTATION_SOURCE_COMMIT, ANNOTATION_SOURCE_REPO, ENV_HF_TOKEN, is_commit
from kubetune.redact import redact
from kubetune.trainer.errors import TrainerError, hub_not_found
from kubetune.trainer.progress import write_json_once

log = logging.getLogger("kubetune.trainer")

# Files whose bytes are the model: its weights (any format transformers or a converter loads) and the
# config that gives them their shape. Only the folder's top level, which is what from_pretrained reads.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
DIGESTED_NAMES = ("config.json",)
HUB_TIMEOUT_S = 20.0
HASH_THREADS = 8
# huggingface_hub's cache layout: <cache>/models--<owner>--<name>/snapshots/<commit>/
_CACHE_SNAPSHOT_RE = re.compile(r"^models--(?P<repo>.+)$")


@dataclass(frozen=True)
class ModelLineage:
    """The base model of a run, as exactly as it can be named."""

    id: str | None = None
    """The Hub id the spec names (``model.id``); None for a local folder."""
    revision: str | None = None
    """The revision the spec asks for (``model.revision``)."""
    commit: str | None = None
    """The commit that revision resolved to, or the commit of the Hub cache snapshot a local path is."""
    resolved_from: str | None = None
    """How ``commit`` was found: ``hub`` (asked the Hub), ``cache`` (the local Hub cache, offline) or
    ``path`` (the folder is a Hub cache snapshot)."""
    path: str | None = None
    """The local folder, as the spec writes it (``model.path``)."""
    base_model: str | None = None
    """The Hub id the card names as ``base_model``: ``model.id``, or for a folder ``model.sourceId``, the
    id of its Hub cache path or its config.json ``_name_or_path``."""
    base_model_from: str | None = None
    """Where ``base_model`` came from: ``model.id``, ``model.sourceId``, ``cache path`` or ``config.json``."""
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    files_sha256: dict[str, str] = field(default_factory=dict)
    """sha256 of each weight file and config.json: hashed here for a folder, the Hub's LFS digests for a
    Hub id (what the Hub serves at that commit)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _HubModel:
    commit: str | None
    resolved_from: str | None
    card: dict[str, Any]
    files_sha256: dict[str, str]


_lock = threading.Lock()
_hub_memo: dict[tuple[str, str, str], _HubModel] = {}
_folder_memo: dict[tuple[Any, ...], ModelLineage] = {}


def forget() -> None:
    """Drop what this process resolved (tests that start a different Hub on the same address)."""
    with _lock:
        _hub_memo.clear()
        _folder_memo.clear()


def _is_hub_id(value: Any) -> bool:
    if not isinstance(value, str) or "/" not in value:
        # A bare name ("gpt2") is a legacy Hub id but as often a folder name: not a safe guess.
        return False
    try:
        HUB_ID.validate(value)
    except ValueError:
        return False
    return True


def _endpoint() -> str:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _card_fields(card: Any) -> dict[str, Any]:
    data = card.to_dict() if hasattr(card, "to_dict") else card
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link", "base_model") if data.get(k)}


def _reason(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}".splitlines()[0])[:300]


def _from_hub(repo_id: str, revision: str) -> _HubModel:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=_endpoint(), token=os.environ.get(ENV_HF_TOKEN) or None)
    info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT_S)
    digests = {
        s.rfilename: s.lfs.sha256
        for s in info.siblings or []
        if s.lfs is not None and "/" not in s.rfilename and s.rfilename.endswith(WEIGHT_SUFFIXES)
    }
    commit = info.sha if is_commit(info.sha) else None
    return _HubModel(commit, "hub" if commit else None, _card_fields(info.card_data or {}), digests)


def _from_cache(repo_id: str, revision: str) -> _HubModel | None:
    """What the local Hub cache holds for ``repo_id`` at ``revision`` (offline clusters with a
    pre-filled cache): the snapshot's commit and its README.md front matter."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    if not is_commit(snapshot.name):
        return None
    return _HubModel(snapshot.name, "cache", _front_matter(snapshot), {})


def _hub_model(repo_id: str, revision: str) -> _HubModel:
    key = (_endpoint(), repo_id, revision)
    with _lock:
        if key in _hub_memo:
            return _hub_memo[key]
        try:
            found = _from_hub(repo_id, revision)
        except Exception as exc:  # best effort: offline mirrors and HF_HUB_OFFLINE still train
            error = hub_not_found(
                exc, TrainerError, where="model", what="model", repo_id=repo_id, revision=revision
            )
            if error is not None:
                raise error from None
            cached = _from_cache(repo_id, revision)
            if cached is not None:
                log.warning(
                    "could not ask the Hub which commit %s revision %r is (%s); using the local Hub "
                    "cache's commit %s",
                    repo_id,
                    revision,
                    _reason(exc),
                    cached.commit,
                )
                found = cached
            else:
                log.warning(
                    "could not resolve %s revision %r to a commit (%s): loading the revision as given; "
                    "the card and status record no base model commit",
                    repo_id,
                    revision,
                    _reason(exc),
                )
                found = _HubModel(None, None, {}, {})
        _hub_memo[key] = found
        return found


def pinned_revision(spec: FineTuneJobSpec) -> str | None:
    """The revision every load of the base model uses: the commit ``model.revision`` resolved to (once
    per process), else ``model.revision`` itself; None for a local folder."""
    m = spec.model
    if m.id is None:
        return None
    return _hub_model(m.id, m.revision).commit or m.revision


def model_folder(spec: FineTuneJobSpec, base_dir: Path) -> Path:
    """``model.path`` as a folder (relative to the spec file's folder)."""
    assert spec.model.path is not None
    p = Path(spec.model.path)
    if not p.is_absolute():
        p = base_dir / p
    if not p.is_dir():
        raise TrainerError(f"model.path: {spec.model.path!r} is not a folder (looked for {p})")
    return p.resolve()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digested_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name in DIGESTED_NAMES)
    )


def _front_matter(folder: Path) -> dict[str, Any]:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import metadata_load

    try:
        return _card_fields(metadata_load(readme) or {})
    except Exception as exc:  # a card the Hub would refuse still trains
        log.warning("ignoring the front matter of %s: %s", readme, _reason(exc))
        return {}


def _name_or_path(folder: Path) -> str | None:
    import json

    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if _is_hub_id(value) else None


def _cache_snapshot(folder: Path) -> tuple[str, str] | None:
    """``(repo id, commit)`` when ``folder`` is ``.../models--owner--name/snapshots/<commit>``."""
    if folder.parent.name != "snapshots" or not is_commit(folder.name):
        return None
    m = _CACHE_SNAPSHOT_RE.match(folder.parent.parent.name)
    repo = m.group("repo").replace("--", "/") if m else None
    return (repo, folder.name) if repo is not None and _is_hub_id(repo) else None


def _folder_lineage(spec: FineTuneJobSpec, base_dir: Path) -> ModelLineage:
    folder = model_folder(spec, base_dir)
    files = _digested_files(folder)
    key = (str(folder), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    with _lock:
        if key in _folder_memo:
            return _folder_memo[key]
    size = sum(p.stat().st_size for p in files)
    if size > 1 << 30:
        log.info(
            "hashing the base model's weights (%d files, %.1f GiB) for the lineage", len(files), size / 2**30
        )
    # Shards in parallel: hashlib lets go of the GIL, and a 70B model is some thirty files.
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(files)))) as pool:
        digests = dict(zip((p.name for p in files), pool.map(sha256_file, files), strict=True))
    front = _front_matter(folder)
    snapshot = _cache_snapshot(folder)
    # What the folder IS. Not its README's base_model: a copy of repository X carries X's card, whose
    # base_model is X's parent, not X.
    base, base_from = None, None
    if spec.model.source_id is not None:
        base, base_from = spec.model.source_id, "model.sourceId"
    elif snapshot is not None:
        base, base_from = snapshot[0], "cache path"
    elif (from_config := _name_or_path(folder)) is not None:
        base, base_from = from_config, "config.json"
    found = ModelLineage(
        commit=snapshot[1] if snapshot else None,
        resolved_from="path" if snapshot else None,
        path=spec.model.path,
        base_model=base,
        base_model_from=base_from,
        license=front.get("license"),
        license_name=front.get("license_name"),
        license_link=front.get("license_link"),
        files_sha256=digests,
    )
    with _lock:
        _folder_memo[key] = found
    return found


def resolve_model(spec: FineTuneJobSpec, base_dir: Path) -> ModelLineage:
    """The base model's lineage. Call it before anything loads: it pins the commit the loads use.

    A Hub that cannot be asked leaves ``commit`` None (with a warning) and the run loads the revision
    as given; a repository or revision the Hub says does not exist, or a missing local folder, is a
    :class:`TrainerError`, as loading it would be."""
    m = spec.model
    if m.id is None:
        return _folder_lineage(spec, base_dir)
    hub = _hub_model(m.id, m.revision)
    return ModelLineage(
        id=m.id,
        revision=m.revision,
        commit=hub.commit,
        resolved_from=hub.resolved_from,
        base_model=m.id,
        base_model_from="model.id",
        license=hub.card.get("license"),
        license_name=hub.card.get("license_name"),
        license_link=hub.card.get("license_link"),
        files_sha256=dict(hub.files_sha256),
    )


RUN_PIN = "base-model.json"  # in the run folder: the base model every process and restart of the run uses


def resolve_for_run(spec: FineTuneJobSpec, base_dir: Path, run_folder: Path) -> ModelLineage:
    """:func:`resolve_model`, once per run rather than once per process.

    The first process of a run (the prepare init container, else the first rank) resolves the revision,
    hashes local weights and writes ``<run>/base-model.json``; every other process, on any node, and every
    restart of the run after a preemption reads it and pins that commit. So all ranks load the same
    weights even when the branch moves while they start, a resumed run continues on the commit its
    checkpoints were trained from, and a 70B folder is hashed once, not once per rank and restart."""
    pin = run_folder / RUN_PIN
    found = _read_pin(pin, spec)
    if found is None:
        found = resolve_model(spec, base_dir)
        try:
            write_json_once(pin, found.as_dict())
            found = _read_pin(pin, spec) or found  # another process may have been first: use its
        except (OSError, ValueError) as exc:  # a read-only output folder (a local `kubetune prepare`)
            log.debug("could not write %s: %s", pin, exc)
    if spec.model.id is not None:
        hub = _HubModel(found.commit, found.resolved_from, _card_of(found), dict(found.files_sha256))
        with _lock:
            _hub_memo[(_endpoint(), spec.model.id, spec.model.revision)] = hub
    return found


def _card_of(found: ModelLineage) -> dict[str, Any]:
    card = {"license": found.license, "license_name": found.license_name, "license_link": found.license_link}
    return {k: v for k, v in card.items() if v}


def _read_pin(pin: Path, spec: FineTuneJobSpec) -> ModelLineage | None:
    """The run's pinned base model, when the file is there, whole, and names this spec's model."""
    try:
        data = json.loads(pin.read_text(encoding="utf-8"))
        found = ModelLineage(**{k: v for k, v in data.items() if k in ModelLineage.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None
    if (found.id, found.revision, found.path) != (
        spec.model.id,
        spec.model.id and spec.model.revision,
        spec.model.path,
    ):
        return None
    if found.commit is not None and not is_commit(found.commit):
        return None
    return found


def _public_url(value: str) -> str:
    """A repository URL without credentials (``https://user:token@host/...`` → ``https://host/...``)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return redact(value)
    if parts.username is None and parts.password is None:
        return redact(value)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return redact(urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)))


def _annotation(job: FineTuneJob, key: str) -> str | None:
    value = (job.metadata.annotations or {}).get(key)
    value = value.strip() if isinstance(value, str) else None
    return value or None


def run_info(job: FineTuneJob, run_name: str) -> dict[str, Any]:
    """The run behind a model: its name, spec hash, the FineTuneJob (namespace, name, UID) and the GitOps
    source the FineTuneJob was applied from (the ``kubetune.io/source-commit`` / ``source-repo``
    annotations Argo CD or a pipeline sets; see the README)."""
    from kubetune.render import spec_hash

    repo = _annotation(job, ANNOTATION_SOURCE_REPO)
    commit = _annotation(job, ANNOTATION_SOURCE_COMMIT)
    return {
        "run": run_name,
        "spec_hash": spec_hash(job),
        "name": job.metadata.name,
        "namespace": job.metadata.namespace,
        "uid": job.metadata.uid,
        "source_commit": redact(commit) if commit else None,
        "source_repo": _public_url(repo) if repo else None,
    }
