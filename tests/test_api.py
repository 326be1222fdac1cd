"""The models themselves: recipe defaults, resolved values, and the checks the operator and trainer rely
on when they validate a spec without going through `kubetune validate`."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.api.v1alpha1 import (
    DNS_1035_RE,
    DNS_LABEL_RE,
    HUB_ID,
    INT64_MAX,
    JOB_NAME_MAX,
    MAX_NODES,
    FineTuneJob,
    FineTuneJobSpec,
)
from kubetune.contract import RESERVED_PATHS
from kubetune.render import render, render_job

MINIMAL: dict[str, Any] = {
    "model": {"id": "tiiuae/falcon-7b"},
    "dataset": {"id": "timdettmers/openassistant-guanaco"},
}


def test_defaults_are_the_guanaco_qlora_recipe() -> None:
    spec = FineTuneJobSpec.model_validate(MINIMAL)
    q = spec.method.effective_quantization()
    lora = spec.method.effective_lora()
    t = spec.training
    assert spec.method.type == "qlora"
    assert q is not None and (q.bits, q.quant_type) == (4, "nf4")
    assert lora is not None and (lora.r, lora.alpha, lora.dropout) == (64, 16, 0.1)
    assert lora.target_modules is None  # resolved per architecture by the trainer
    assert (t.optimizer, t.max_grad_norm, t.warmup_ratio, t.lr_scheduler) == (
        "paged_adamw_32bit",
        0.3,
        0.03,
        "constant",
    )
    assert t.group_by_length and t.gradient_checkpointing and t.upcast_norms
    assert (t.effective_max_steps(), t.max_seq_length, t.learning_rate) == (500, 512, 2e-4)


def test_epochs_replace_the_default_step_count() -> None:
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"epochs": 3}})
    assert spec.training.effective_max_steps() == -1


def test_lora_without_quantization_and_full_without_adapter() -> None:
    lora = FineTuneJobSpec.model_validate({**MINIMAL, "method": {"type": "lora"}}).method
    assert lora.effective_quantization() is None and lora.effective_lora() is not None
    full = FineTuneJobSpec.model_validate({**MINIMAL, "method": {"type": "full"}}).method
    assert full.effective_quantization() is None and full.effective_lora() is None


def test_block_size_turns_packing_on() -> None:
    t = FineTuneJobSpec.model_validate(
        {**MINIMAL, "training": {"maxSeqLength": 2048, "blockSize": 512}}
    ).training
    assert t.effective_packing() == "wrapped" and t.effective_block_size() == 512
    default = FineTuneJobSpec.model_validate(MINIMAL).training
    assert default.effective_block_size() == 512 and default.effective_packing() == "none"


def test_save_and_eval_steps_resolve() -> None:
    t = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"loggingSteps": 5}}).training
    assert (t.effective_save_steps(), t.effective_eval_steps()) == (50, 50)


def test_the_model_rejects_inline_tokens_itself() -> None:
    """The operator and the trainer validate with the model directly: the token check is in it."""
    token = "hf_" + "x" * 34
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t", "annotations": {"note": token}},
        "spec": MINIMAL,
    }
    with pytest.raises(ValidationError) as e:
        FineTuneJob.model_validate(doc)
    assert "metadata.annotations.note" in str(e.value)
    assert token not in str(e.value)


def test_only_wire_names_are_accepted() -> None:
    """The API server knows `maxSteps`, not `max_steps`: neither does a document here."""
    a = FineTuneJobSpec.model_validate({**MINIMAL, "training": {"maxSteps": 7}})
    assert a.training.max_steps == 7
    assert a.model_dump(by_alias=True)["training"]["maxSteps"] == 7
    with pytest.raises(ValidationError) as e:
        FineTuneJobSpec.model_validate({**MINIMAL, "training": {"max_steps": 7}})
    assert e.value.errors()[0]["type"] == "extra_forbidden"


def test_values_are_typed_as_the_api_server_types_them() -> None:
    def training(**values: Any) -> Any:
        return FineTuneJobSpec.model_validate({**MINIMAL, "training": values}).training

    # JSON has one number type: 5.0 is the integer 5 (kubectl sends it as 5), 2 is a fine float.
    assert training(maxSteps=5.0).max_steps == 5 and training(learningRate=1).learning_rate == 1.0
    assert training(maxSteps=INT64_MAX - 1).max_steps == INT64_MAX - 1
    for bad in ({"maxSteps": "5"}, {"maxSteps": True}, {"maxSteps": 5.5}, {"maxSteps": 2**63}):
        with pytest.raises(ValidationError):
            training(**bad)
    for bad in (
        {"learningRate": "0.1"},
        {"learningRate": math.nan},
        {"packing": "true"},
        {"packing": 1},
        {"packing": True},
    ):
        with pytest.raises(ValidationError):
            training(**bad)


def test_null_is_the_same_as_unset() -> None:
    """The API server drops a null field (and a null map entry) before it validates."""
    spec = FineTuneJobSpec.model_validate(
        {
            **MINIMAL,
            "training": {"maxSteps": None, "learningRate": None},
            "podMetadata": {"labels": {"a": None}},
        }
    )
    assert spec.training.max_steps is None and spec.training.learning_rate == 2e-4
    assert spec.pod_metadata.labels == {}


def _is_dns_label(name: str, rfc1035: bool = False) -> bool:
    return len(name) <= 63 and re.fullmatch(DNS_1035_RE if rfc1035 else DNS_LABEL_RE, name) is not None


def test_the_longest_name_still_names_every_derived_object() -> None:
    """A Job's Indexed pods get the hostname <job>-<index> (a DNS label); a multi-node run's Service is
    named like the Job and must be an RFC 1035 label."""
    doc: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": ("ab-" * JOB_NAME_MAX)[:JOB_NAME_MAX].rstrip("-"), "namespace": "ns"},
        "spec": {**MINIMAL, "resources": {"gpusPerNode": 8, "nodes": MAX_NODES}},
    }
    assert len(doc["metadata"]["name"]) == JOB_NAME_MAX
    objects = {o["kind"]: o for o in render(FineTuneJob.model_validate(doc))}
    job = objects["Job"]
    assert _is_dns_label(f"{job['metadata']['name']}-{job['spec']['completions'] - 1}")
    assert _is_dns_label(objects["Service"]["metadata"]["name"], rfc1035=True)
    assert job["spec"]["template"]["spec"]["subdomain"] == objects["Service"]["metadata"]["name"]
    doc["metadata"]["name"] += "c"
    with pytest.raises(ValidationError):
        FineTuneJob.model_validate(doc)


def test_reserved_paths_are_every_path_kubetune_mounts() -> None:
    """contract.RESERVED_PATHS is the one list of what storage.mountPath and output.path must avoid."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": MINIMAL,
        }
    )
    container = render_job(job)["spec"]["template"]["spec"]["containers"][0]
    ours = {m["mountPath"] for m in container["volumeMounts"]} - {job.spec.storage.mount_path}
    assert ours | {container["terminationMessagePath"]} == set(RESERVED_PATHS)


HUB_IDS = [
    "gpt2",
    "org/model",
    "my-org/falcon-7b.v2_final",
    "_under/_score_",
    "a" * 96,
    "o/" + "a" * 96,
    "a" * 97,
    "org/a--b",
    "org/a..b",
    "org/model.git",
    "-org/model",
    "org/model-",
    "org/.model",
    "org/name/extra",
    "org/",
    "/model",
    "org model",
    "café/model",
    "org/mödel",
    "",
]


@pytest.mark.parametrize("repo_id", HUB_IDS)
def test_hub_ids_follow_the_hubs_own_rules(repo_id: str) -> None:
    hub = pytest.importorskip("huggingface_hub.utils")
    try:
        hub.validate_repo_id(repo_id)
        hub_accepts = bool(repo_id)
    except hub.HFValidationError:
        hub_accepts = False
    try:
        HUB_ID.validate(repo_id)
        ours = True
    except ValueError:
        ours = False
    assert ours == hub_accepts


def test_status_and_metadata_keep_what_the_api_server_and_operator_write() -> None:
    obj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "t",
            "namespace": "ml",
            "uid": "1",
            "generation": 3,
            "resourceVersion": "42",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            "labels": {"app.kubernetes.io/name": "x"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 10000 + "}"},
        },
        "spec": MINIMAL,
        "status": {
            "state": "Running",
            "restarts": 0,
            "loss": "1.23",
            "someFutureField": {"any": ["thing"]},
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        },
    }
    job = FineTuneJob.model_validate(obj)
    assert job.status is not None and job.status.state == "Running"
    assert job.metadata.model_extra and job.metadata.model_extra["resourceVersion"] == "42"


def test_a_dataset_is_its_parts() -> None:
    """Trainer, planner and card read `dataset.parts()`: the one source, or each source of a mix."""
    one = FineTuneJobSpec.model_validate(
        {**MINIMAL, "dataset": {"files": ["a.jsonl"], "format": "alpaca", "maxRows": 10}}
    ).dataset
    [part] = one.parts()
    assert (part.files, part.format, part.max_rows, part.weight) == (["a.jsonl"], "alpaca", 10, None)
    assert part.effective_train_on() == "completion"
    mix = FineTuneJobSpec.model_validate(
        {
            **MINIMAL,
            "dataset": {
                "sources": [
                    {"id": "org/chat", "format": "chat", "split": "train_sft", "weight": 0.5},
                    {"files": ["b.csv"], "format": "completion", "trainOn": "all"},
                    {"id": "org/text", "revision": "v1"},
                ],
                "validation": {"fraction": 0.05},
            },
        }
    ).dataset
    parts = mix.parts()
    assert [(p.id, p.revision, p.split, p.format) for p in parts] == [
        ("org/chat", "main", "train_sft", "chat"),
        (None, "main", "train", "completion"),
        ("org/text", "v1", "train", "text"),
    ]
    assert [p.effective_train_on() for p in parts] == ["assistant", "all", "all"]
    assert [p.weight for p in parts] == [0.5, None, None]
    # The top of a mix holds no source of its own.
    assert (mix.id, mix.files) == (None, None)


def test_a_mix_round_trips_through_the_trainer_s_spec_file() -> None:
    """The spec file writes every default out, at the top of a mix too: it must validate again."""
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "mix"},
            "spec": {
                **MINIMAL,
                "dataset": {"sources": [{"id": "org/a"}, {"files": ["b.jsonl"], "weight": 2}]},
            },
        }
    )
    dumped = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["spec"]["dataset"]["format"] == "text"  # a default, written out
    again = FineTuneJob.model_validate(dumped)
    assert [p.model_dump() for p in again.spec.dataset.parts()] == [
        p.model_dump() for p in job.spec.dataset.parts()
    ]
