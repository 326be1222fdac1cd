"""Experiment trackers (``training.reportTo``): TensorBoard, MLflow and Weights & Biases.

transformers' own callbacks do the logging (``SFTConfig.report_to``); this module sets them up the way a
pod needs them:

- **TensorBoard** writes its event files to ``<run>/tensorboard``, on the workspace, so they outlive the
  pod (``tensorboard --logdir <output>/runs``).
- **MLflow** logs to ``training.trackers.mlflow.trackingUri``, or to a file store in ``<run>/mlruns``.
- **W&B** logs online, or with ``mode: offline`` to ``<run>/wandb`` for a later ``wandb sync``.

A run that restarts (preemption, a replaced pod) logs on into the same MLflow and W&B runs: their ids
are kept in ``<run>/trackers.json``. Credentials reach the process only as environment variables the
Job fills from Secrets (kubetune.render.secret_refs): :func:`require_credentials` says which Secret is
missing before anything heavy loads, and registers every value with kubetune.redact, so none reaches a
log line, the status or the card. Settings that are not secret (URIs, names, the mode) come from the
spec, as environment variables of this process.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.api.v1alpha1 import FineTuneJob, MlflowSpec, WandbSpec
from kubetune.contract import ANNOTATION_SOURCE_COMMIT, ANNOTATION_SOURCE_REPO
from kubetune.redact import add_secret, redact
from kubetune.render import SecretRef, secret_refs, spec_hash
from kubetune.trainer.errors import SecretMissing, TrainerError
from kubetune.trainer.progress import write_json_atomic

log = logging.getLogger("kubetune.trainer")

TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
WANDB_DIR = "wandb"  # wandb's own folder name under $WANDB_DIR (the run folder)
TRACKERS_FILE = "trackers.json"  # the MLflow and W&B run ids of this run, for restarts
DEFAULT_WANDB_PROJECT = "kubetune"
# The package each tracker's transformers callback needs (the trainer image has all three).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _mlflow(job: FineTuneJob) -> MlflowSpec:
    return job.spec.training.trackers.mlflow or MlflowSpec()


def _wandb(job: FineTuneJob) -> WandbSpec:
    return job.spec.training.trackers.wandb or WandbSpec()


def tracker_refs(job: FineTuneJob) -> list[SecretRef]:
    """The Secrets of the trackers in reportTo (the Hub token is kubetune.trainer.hub's)."""
    return [r for r in secret_refs(job) if r.field.startswith("spec.training.trackers.")]


def missing_secret_message(job: FineTuneJob, ref: SecretRef) -> str:
    ns = job.metadata.namespace
    field = ref.field.removeprefix("spec.")
    return (
        f"{field}: the {ref.env} environment variable is not set (or empty), so the run cannot log to "
        f"{field.split('.')[2]}. The trainer Pod reads it from the Secret named in {ref.field}.secretKeyRef: "
        f"Secret {ref.name!r}, key {ref.key!r}"
        + (f", in namespace {ns!r}" if ns else "")
        + f". Create it with `kubectl create secret generic {ref.name} -n {ns or '<namespace>'} "
        f"--from-literal={ref.key}=<your {ref.holds}>`, then re-run the job (locally: export {ref.env})."
    )


def require_credentials(job: FineTuneJob) -> None:
    """Fail fast, before anything heavy loads: a tracker whose package or Secret is missing (a tracker
    that could not log in at all, W&B online without a key, is the spec's own error). Registers every
    tracker credential as a secret (kubetune.redact)."""
    report_to = job.spec.training.report_to
    for tracker in report_to:
        if importlib.util.find_spec(PACKAGES[tracker]) is None:
            raise TrainerError(
                f"training.reportTo: {tracker} needs the {PACKAGES[tracker]!r} package, which this trainer "
                "image does not have: use the kubetune trainer image (it has all three trackers), or add it "
                "to yours"
            )
    for ref in tracker_refs(job):
        value = os.environ.get(ref.env, "").strip()
        if not value:
            raise SecretMissing(missing_secret_message(job, ref))
        add_secret(value)
    # A password in trackingUri and W&B online without apiKey are refused by the spec itself (CRD and
    # `kubetune validate`), so they never reach a pod.


def sft_kwargs(job: FineTuneJob, run_folder: Path, *, is_main: bool) -> dict[str, Any]:
    """``SFTConfig`` keyword arguments for ``training.reportTo``, and the environment the trackers'
    callbacks read (set in this process, on every rank; only the main process logs). Empty when the spec
    reports to no tracker (sft_config_kwargs' ``report_to: none`` stands)."""
    report_to = list(job.spec.training.report_to)
    if not report_to:
        return {}
    run_folder = run_folder.resolve()
    ids = _read_ids(run_folder)
    env: dict[str, str] = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_folder / TENSORBOARD_DIR)
    if "mlflow" in report_to:
        env.update(_mlflow_env(job, run_folder, ids, is_main=is_main))
    if "wandb" in report_to:
        env.update(_wandb_env(job, run_folder, ids))
    os.environ.update(env)
    if is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_folder / TRACKERS_FILE, ids)
        log.info("reporting to %s", ", ".join(_where(t, env) for t in report_to))
    # The run's name in each tracker: <FineTuneJob>-<spec hash>, as the run folder.
    return {"report_to": report_to, "run_name": run_folder.name}


def _where(tracker: str, env: dict[str, str]) -> str:
    where = {
        "tensorboard": env.get("TENSORBOARD_LOGGING_DIR", ""),
        "mlflow": redact(env.get("MLFLOW_TRACKING_URI", "")),
        "wandb": f"{env.get('WANDB_MODE')} project {env.get('WANDB_PROJECT')}",
    }[tracker]
    return f"{tracker} ({where})"


def _read_ids(run_folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_folder / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------


def _mlflow_env(job: FineTuneJob, run_folder: Path, ids: dict[str, Any], *, is_main: bool) -> dict[str, str]:
    spec = _mlflow(job)
    uri = spec.tracking_uri or (run_folder / MLRUNS_DIR).as_uri()
    experiment = spec.experiment or job.metadata.name
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    if urlsplit(uri).scheme in ("", "file"):
        # MLflow 3 refuses a file store unless asked for one; a file store on the workspace is the point.
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if spec.username:
        env["MLFLOW_TRACKING_USERNAME"] = spec.username
    if is_main:
        os.environ.update(env)  # the client below reads them (the credentials are in the env already)
        env["MLFLOW_RUN_ID"] = _mlflow_run(job, run_folder, ids, uri, experiment)
    return env


def _mlflow_run(job: FineTuneJob, run_folder: Path, ids: dict[str, Any], uri: str, experiment: str) -> str:
    """The id of this run's MLflow run: the one a previous start created (its id in trackers.json),
    else a new one, tagged with the FineTuneJob, the spec hash and the GitOps source. transformers'
    MLflowCallback attaches to it through $MLFLOW_RUN_ID."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # The process-wide tracking URI wins over the environment: set it, in case this process set another.
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    known = ids.get("mlflow") if isinstance(ids.get("mlflow"), dict) else None
    try:
        if known and known.get("tracking_uri") == uri and known.get("experiment") == experiment:
            try:
                return str(client.get_run(str(known["run_id"])).info.run_id)
            except MlflowException:
                log.warning("MLflow run %s is gone; starting a new one", known.get("run_id"))
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_folder.name, tags=_tags(job, run_folder.name))
    except MlflowException as e:
        text = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:500]
        where = (
            "training.trackers.mlflow.trackingUri" if _mlflow(job).tracking_uri else "the MLflow file store"
        )
        if e.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise TrainerError(
                f"MLflow at {redact(uri)} refused the run's credentials ({text}): check "
                "training.trackers.mlflow.username and the Secrets of training.trackers.mlflow.password / "
                ".token"
            ) from None
        raise RuntimeError(f"cannot create the MLflow run at {redact(uri)} ({where}): {text}") from None
    ids["mlflow"] = {"tracking_uri": uri, "experiment": experiment, "run_id": run.info.run_id}
    return str(run.info.run_id)


def _tags(job: FineTuneJob, run: str) -> dict[str, str]:
    meta = job.metadata
    tags = {
        "kubetune.run": run,
        "kubetune.spec-hash": spec_hash(job),
        "kubetune.finetunejob": f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name,
    }
    if meta.uid:
        tags["kubetune.uid"] = meta.uid
    for key, tag in (
        (ANNOTATION_SOURCE_COMMIT, "kubetune.source-commit"),
        (ANNOTATION_SOURCE_REPO, "kubetune.source-repo"),
    ):
        if meta.annotations.get(key):
            tags[tag] = meta.annotations[key]
    return tags


# --------------------------------------------------------------------------------------------------
# Weights & Biases
# --------------------------------------------------------------------------------------------------


def _wandb_env(job: FineTuneJob, run_folder: Path, ids: dict[str, Any]) -> dict[str, str]:
    spec = _wandb(job)
    run_id = ids.get("wandb", {}).get("run_id") if isinstance(ids.get("wandb"), dict) else None
    if not isinstance(run_id, str) or not run_id.isalnum():
        run_id = secrets.token_hex(
            8
        )  # not derived from the name: a run folder deleted to retrain is a new run
        ids["wandb"] = {"run_id": run_id}
    own = run_folder / WANDB_DIR
    env = {
        "WANDB_MODE": spec.mode,
        "WANDB_PROJECT": spec.project or DEFAULT_WANDB_PROJECT,
        "WANDB_DIR": str(run_folder),  # wandb writes into $WANDB_DIR/wandb
        "WANDB_RUN_ID": run_id,
        "WANDB_RESUME": "allow",  # a restart logs on into the same run
        # A pod's HOME is read-only: wandb's config, cache and staging go to the run folder too.
        "WANDB_CONFIG_DIR": str(own / ".config"),
        "WANDB_CACHE_DIR": str(own / ".cache"),
        "WANDB_DATA_DIR": str(own / ".data"),
    }
    if spec.entity:
        env["WANDB_ENTITY"] = spec.entity
    if spec.base_url:
        env["WANDB_BASE_URL"] = spec.base_url
    return env
