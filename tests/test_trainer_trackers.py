"""training.reportTo: TensorBoard, MLflow (a file store) and W&B (offline) with the real trainer on a tiny
model, and what the trainer does with the trackers' credentials.

The runs are real trainer processes (``python -m kubetune.trainer``) as in a pod ($KUBETUNE_RUN set):
their environment holds the trackers' Secrets as the Job would give them, and their whole output, like
every file they write, is searched for those values afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")
pytest.importorskip("trl")

import tiny  # noqa: E402
from kubetune.api.v1alpha1 import FineTuneJob  # noqa: E402
from kubetune.contract import parse_progress, parse_termination_message  # noqa: E402
from kubetune.redact import SECRET_ENV  # noqa: E402
from kubetune.render import secret_refs  # noqa: E402
from kubetune.trainer import trackers  # noqa: E402
from kubetune.trainer.errors import SecretMissing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN = "t-0123abcd"  # $KUBETUNE_RUN, as the Job sets it
# What the Secrets hold: shaped like nothing redact knows by its shape, so only registration masks them.
PASSWORD = "mlflow-pw-Zq8vT3kLm2"
WANDB_KEY = "0f3c9a7be2d14c6f8a5b9e1d7c3a2f6b4e8d0c1a"
SECRETS = (PASSWORD, WANDB_KEY)
TRACKERS = {
    "reportTo": ["tensorboard", "mlflow", "wandb"],
    "trackers": {
        "mlflow": {"username": "ci", "password": {"secretKeyRef": {"name": "mlflow", "key": "password"}}},
        "wandb": {
            "project": "kt-tests",
            "mode": "offline",
            "apiKey": {"secretKeyRef": {"name": "wandb", "key": "apiKey"}},
        },
    },
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "llama", "llama")


@pytest.fixture
def environ() -> Iterator[None]:
    """trackers.sft_kwargs sets the trackers' environment in its process: put it back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def trainer_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A pod's environment: in the cluster, no Hub token, offline, a termination log to read, and
    nothing of the trackers but what a test gives it. HOME is not writable, as in the trainer image."""
    drop = ("HF_TOKEN", "KUBETUNE_RUN", *SECRET_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        KUBETUNE_RUN=RUN,
        KUBETUNE_TERMINATION_LOG=str(tmp_path / "termination-log"),
        HF_HUB_OFFLINE="1",
        HOME="/nonexistent",
        MPLCONFIGDIR=str(tmp_path / "mpl"),
    )
    return {**env, **extra}


def spec(tmp_path: Path, model: Path, **training: Any) -> Path:
    return tiny.write_job(
        tmp_path,
        model,
        training={"maxSteps": 4, "saveSteps": 4, "perDeviceBatchSize": 2, "loggingSteps": 1, **training},
        dataset={"validation": None},
        samples={"prompts": []},
    )


def train(job: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--spec", str(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=job.parent,
        timeout=900,
    )


def test_every_tracker_logs_the_run_into_its_run_folder_and_no_secret_anywhere(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = spec(tmp_path, model, **TRACKERS)
    proc = train(
        job,
        trainer_env(tmp_path, MLFLOW_TRACKING_PASSWORD=PASSWORD, WANDB_API_KEY=WANDB_KEY),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "out" / "runs" / RUN
    ids = json.loads((run / trackers.TRACKERS_FILE).read_text())

    # TensorBoard: event files on the workspace, with the loss of every logged step.
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        EventAccumulator,
    )

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in run.iterdir())
    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3, 4]

    # MLflow: a file store in the run folder, an experiment named after the FineTuneJob, one run named
    # after the kubetune run, with its metrics per step and the run's identity as tags.
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("t")
    assert experiment is not None
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == ids["mlflow"]["run_id"] and logged.info.run_name == RUN
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "loss")] == [1, 2, 3, 4]
    assert logged.data.tags["kubetune.run"] == RUN
    assert len(logged.data.tags["kubetune.spec-hash"]) == 64
    assert logged.data.params["run_name"] == RUN

    # W&B offline: the run written to <run>/wandb for a later `wandb sync`, under the id kept for restarts.
    wandb_id = ids["wandb"]["run_id"]
    [offline] = list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert b"train/loss" in (offline / f"run-{wandb_id}.wandb").read_bytes()  # its history records

    # The credentials reached the process, and nothing it wrote or said holds them.
    said = proc.stdout + proc.stderr
    assert "reporting to tensorboard" in said
    for secret in SECRETS:
        assert secret not in said
        for path in tmp_path.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path


def test_a_missing_tracker_secret_fails_fast_naming_the_field_and_the_secret(
    model: Path, tmp_path: Path
) -> None:
    job = spec(tmp_path, model, **TRACKERS)
    code = (
        "import sys\n"
        "from kubetune.trainer.__main__ import main\n"
        f"code = main(['--spec', {str(job)!r}])\n"
        "heavy = ('torch', 'transformers', 'mlflow', 'wandb')\n"
        "print('heavy:', sorted(m for m in heavy if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    # The W&B Secret is there, the MLflow one is not (optional: true, so the container started).
    env = trainer_env(tmp_path, WANDB_API_KEY=WANDB_KEY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "heavy: []" in proc.stdout
    reason, message = parse_termination_message((tmp_path / "termination-log").read_text()) or ("", "")
    assert reason == "SecretMissing"
    assert message.startswith("training.trackers.mlflow.password: the MLFLOW_TRACKING_PASSWORD environment")
    assert "spec.training.trackers.mlflow.password.secretKeyRef: Secret 'mlflow', key 'password'" in message
    assert "kubectl create secret generic mlflow -n <namespace> --from-literal=password=" in message
    report = parse_progress(proc.stdout)
    assert report is not None and report["state"] == "Failed"
    assert WANDB_KEY not in proc.stdout + proc.stderr + message


def _job(**training: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {
                "name": "demo",
                "namespace": "team-a",
                "uid": "3f1c2b7e-0000-4000-8000-000000000001",
                "annotations": {"kubetune.io/source-commit": "a" * 40},
            },
            "spec": {
                "model": {"id": "meta-llama/Llama-2-7b-hf"},
                "dataset": {"id": "timdettmers/openassistant-guanaco"},
                "training": training,
            },
        }
    )


def test_a_restart_logs_on_into_the_same_mlflow_and_wandb_runs(tmp_path: Path, environ: None) -> None:
    job = _job(reportTo=["mlflow", "wandb"], trackers={"wandb": {"mode": "offline"}})
    run = tmp_path / "runs" / "demo-0123abcd"
    first = trackers.sft_kwargs(job, run, is_main=True)
    assert first == {"report_to": ["mlflow", "wandb"], "run_name": "demo-0123abcd"}
    mlflow_id, wandb_id = os.environ["MLFLOW_RUN_ID"], os.environ["WANDB_RUN_ID"]
    assert os.environ["MLFLOW_TRACKING_URI"] == (run / "mlruns").resolve().as_uri()
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "demo" and os.environ["WANDB_PROJECT"] == "kubetune"
    assert os.environ["WANDB_DIR"] == str(run.resolve()) and os.environ["WANDB_MODE"] == "offline"

    # The replacement pod: the same runs, nothing new in the store.
    for name in ("MLFLOW_RUN_ID", "WANDB_RUN_ID"):
        del os.environ[name]
    trackers.sft_kwargs(job, run, is_main=True)
    assert (os.environ["MLFLOW_RUN_ID"], os.environ["WANDB_RUN_ID"]) == (mlflow_id, wandb_id)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("demo")
    assert experiment is not None
    [only] = client.search_runs([experiment.experiment_id])
    assert only.info.run_id == mlflow_id
    assert only.data.tags["kubetune.finetunejob"] == "team-a/demo"
    assert only.data.tags["kubetune.uid"] == "3f1c2b7e-0000-4000-8000-000000000001"
    assert only.data.tags["kubetune.source-commit"] == "a" * 40

    # Another run (a spec edit, or the folder deleted to train again): runs of its own.
    other = tmp_path / "runs" / "demo-89abcdef"
    trackers.sft_kwargs(job, other, is_main=True)
    assert os.environ["MLFLOW_RUN_ID"] != mlflow_id and os.environ["WANDB_RUN_ID"] != wandb_id

    # Other ranks only read the environment: they create nothing.
    os.environ.pop("MLFLOW_RUN_ID")
    trackers.sft_kwargs(job, tmp_path / "runs" / "demo-rank1", is_main=False)
    assert "MLFLOW_RUN_ID" not in os.environ and not (tmp_path / "runs" / "demo-rank1").exists()


def test_no_tracker_no_change() -> None:
    assert trackers.sft_kwargs(_job(), Path("/nonexistent"), is_main=True) == {}


def test_wandb_offline_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Online without apiKey, and a password in the MLflow URI, are the spec's own rules
    # (tests/test_crd_rules.py): they never reach the trainer.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    trackers.require_credentials(_job(reportTo=["wandb"], trackers={"wandb": {"mode": "offline"}}))


def test_tracker_secrets_are_read_only_for_trackers_reported_to(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {
        "mlflow": {"token": {"secretKeyRef": {"name": "mlflow", "key": "token"}}},
        "wandb": {"apiKey": {"secretKeyRef": {"name": "wandb"}}},
    }
    assert trackers.tracker_refs(_job(trackers=settings)) == []
    [ref] = trackers.tracker_refs(_job(reportTo=["mlflow"], trackers=settings))
    assert (ref.field, ref.env, ref.name, ref.key) == (
        "spec.training.trackers.mlflow.token",
        "MLFLOW_TRACKING_TOKEN",
        "mlflow",
        "token",
    )
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with pytest.raises(SecretMissing, match="Secret 'mlflow', key 'token', in namespace 'team-a'"):
        trackers.require_credentials(_job(reportTo=["mlflow"], trackers=settings))


def test_every_secret_the_pod_reads_is_masked_by_name() -> None:
    """redact masks $SECRET_ENV in every process that has them (the prepare container reads no spec
    credentials itself): each variable a Job fills from a Secret must be one."""
    settings = {
        "mlflow": {
            "password": {"secretKeyRef": {"name": "m"}},
            "token": {"secretKeyRef": {"name": "m", "key": "t"}},
        },
        "wandb": {"apiKey": {"secretKeyRef": {"name": "w"}}},
    }
    job = _job(reportTo=["tensorboard", "mlflow", "wandb"], trackers=settings)
    assert {r.env for r in secret_refs(job)} == {
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "WANDB_API_KEY",
    }
    assert {r.env for r in secret_refs(job)} <= set(SECRET_ENV)
