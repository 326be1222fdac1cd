"""Pushing the result to a Hugging Face Hub repository (one commit)."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob, HubOutput
from kubetune.contract import ENV_HF_TOKEN
from kubetune.redact import add_secret, redact
from kubetune.trainer.card import check_no_secrets
from kubetune.trainer.errors import SecretMissing, TrainerError

log = logging.getLogger("kubetune.trainer")

ATTEMPTS = 3
RETRY_WAIT_SECONDS = 5.0  # exponential back-off base between attempts
# Files kubetune writes itself, checked once more for tokens before they leave the Pod.
WRITTEN_BY_KUBETUNE = {"README.md", "metrics.json", "samples.json"}


def resolve_token(*, local: bool) -> str | None:
    """The Hugging Face token: ``$HF_TOKEN`` (from the Job's Secret), or, in a local run, the one
    ``huggingface_hub`` knows (``hf auth login``). ``None`` when there is none.

    The token is registered as a secret as soon as it is read: from then on no log line, error,
    termination message or card of this process can hold it, whatever its shape (kubetune.redact)."""
    token = os.environ.get(ENV_HF_TOKEN, "").strip()
    add_secret(token)
    if not token and local:
        from huggingface_hub import get_token

        token = (get_token() or "").strip()
        add_secret(token)
    return token or None


def missing_token_message(job: FineTuneJob) -> str:
    """What to do when ``output.hub`` is set and there is no token: the Secret to create, and how."""
    assert job.spec.output.hub is not None
    ref = job.spec.output.hub.token.secret_key_ref
    ns = job.metadata.namespace
    return (
        f"output.hub.token: the {ENV_HF_TOKEN} environment variable is not set (or empty), so nothing can "
        f"be pushed to {job.spec.output.hub.repo_id}. The trainer Pod reads it from the Secret named in "
        f"spec.output.hub.token.secretKeyRef: Secret {ref.name!r}, key {ref.key!r}"
        + (f", in namespace {ns!r}" if ns else "")
        + f". Create it with `kubectl create secret generic {ref.name} -n {ns or '<namespace>'} "
        f"--from-literal={ref.key}=<your Hugging Face write token>`, then re-run the job "
        f"(locally: export {ENV_HF_TOKEN}, or `hf auth login`)."
    )


def require_token(job: FineTuneJob, *, local: bool) -> str | None:
    """Fail fast (before anything heavy is loaded) when the job pushes to the Hub without a token."""
    if job.spec.output.hub is None:
        return None
    token = resolve_token(local=local)
    if token is None:
        raise SecretMissing(missing_token_message(job))
    return token


def hub_token() -> str:
    token = resolve_token(local=False)
    if token is None:
        raise SecretMissing(
            f"output.hub.token: the {ENV_HF_TOKEN} environment variable is not set; the trainer Pod reads it "
            "from the Secret named in output.hub.token.secretKeyRef (locally: export HF_TOKEN)"
        )
    return token


def _files(folder: Path, prefix: str = "") -> list[tuple[str, Path]]:
    return sorted(
        (prefix + p.relative_to(folder).as_posix(), p)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# Suffixes of files that are pickles (torch.save, joblib, pickle): loading one runs whatever code it holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_PICKLE_PROTOCOLS = range(2, 6)


def is_pickle(path: Path) -> bool:
    """Whether ``path`` is (or holds) a pickle: by its suffix, a pickle's first bytes (PROTO opcode),
    or a zip archive with a ``.pkl`` member (torch.save's format, whatever the file is called)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (its first byte may be
    # 0x80 and its second 2 to 5, as a pickle's are).
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size:
        return False
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return True
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def plan_upload(
    *, root_folder: Path | None, extra_files: list[Path], merged_folder: Path | None
) -> list[tuple[str, Path]]:
    """``(path in repo, local file)`` pairs: the adapter (or full model) at the root, the card, its loss
    curve, metrics and samples next to it, and the merged model (with its own card) under ``merged/``.

    Refuses pickles (``training_args.bin``, ``pytorch_model.bin``, ...): whoever loads the pushed model
    would run the code in them. kubetune writes weights as safetensors and nothing else as a pickle."""
    plan: dict[str, Path] = {}
    if root_folder is not None:
        plan.update(_files(root_folder))
    for f in extra_files:
        if f.is_file():
            plan[f.name] = f
    if merged_folder is not None:
        plan.update(_files(merged_folder, "merged/"))
    pickles = sorted(name for name, local in plan.items() if is_pickle(local))
    if pickles:
        raise TrainerError(
            f"output.hub: refusing to push {', '.join(pickles)}: pickle files run code when they are "
            "loaded, and kubetune pushes none (weights go as safetensors). They were found in the folders "
            f"to push ({', '.join(str(p) for p in (root_folder, merged_folder) if p is not None)}): remove "
            "them; the next start pushes without training"
        )
    return sorted(plan.items())


def _transient(exc: BaseException) -> bool:
    """Worth another try: rate limits, server errors, dropped connections. Not 4xx: they need a person."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status is None or status == 429 or status >= 500
    return isinstance(exc, (ConnectionError, TimeoutError))


def _http_summary(exc: BaseException) -> str:
    """The status, the first line of the error and the Hub's own message, redacted: a Hub (or a proxy)
    may echo the request's Authorization header in its error body."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = redact(str(exc)).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    server = " ".join(redact(str(getattr(exc, "server_message", None) or "")).split())
    if server and server not in first:
        first = f"{first} (the Hub says: {server[:300]})"
    return f"HTTP {status}: {first}" if status is not None else first


def push(
    hub: HubOutput, files: list[tuple[str, Path]], *, commit_message: str, token: str | None = None
) -> str:
    """Create the repository (and branch) when missing and commit `files`; returns the commit URL.

    Every step is idempotent (exist_ok; one commit of whole files), so a transient failure retries all."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_exponential

    for path_in_repo, local in files:
        if path_in_repo.rsplit("/", 1)[-1] in WRITTEN_BY_KUBETUNE:  # the merged model's card too
            check_no_secrets(local.read_text(encoding="utf-8", errors="replace"), what=path_in_repo)
    token = token or hub_token()
    add_secret(token)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    retrying = Retrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential(multiplier=RETRY_WAIT_SECONDS, max=60),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                repo = api.create_repo(hub.repo_id, private=hub.private, repo_type="model", exist_ok=True)
                if hub.revision != "main":
                    api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
                ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files]
                info: Any = api.create_commit(
                    hub.repo_id, operations=ops, commit_message=commit_message, revision=hub.revision
                )
    except HfHubHTTPError as exc:
        if _transient(exc):
            raise  # still failing after the retries: an unexpected error, which the Job retries
        status = getattr(exc.response, "status_code", None)
        hint = (
            "check that the token in the Secret of output.hub.token.secretKeyRef has write access to that "
            "repository (or its organization)"
            if status in (401, 403)
            else "check output.hub.repoId and output.hub.revision"
        )
        raise TrainerError(
            f"output.hub: the Hub refused the push to {hub.repo_id} (revision {hub.revision}): "
            f"{_http_summary(exc)}. To fix: {hint}. The trained run is kept: the next start pushes again "
            "without training"
        ) from exc
    log.info("pushed %d files to %s (revision %s)", len(files), repo, hub.revision)
    return str(info.commit_url)
