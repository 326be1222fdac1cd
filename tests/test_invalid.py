"""A table of invalid FineTuneJobs: each fails with a message that names the field and the fix,
at the line where that field is written."""

from __future__ import annotations

import base64
import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.load import validate_paths

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "table"},
    "spec": {
        "model": {"id": "tiiuae/falcon-7b"},
        "dataset": {"id": "timdettmers/openassistant-guanaco", "validation": {"split": "test"}},
        "method": {"type": "qlora", "lora": {"r": 64}, "quantization": {"bits": 4}},
        "training": {"learningRate": 2e-4, "maxSteps": 500, "saveSteps": 10, "evalSteps": 10},
        "resources": {"gpusPerNode": 1, "memory": "48Gi"},
        "output": {"hub": {"repoId": "org/model", "token": {"secretKeyRef": {"name": "hf-token"}}}},
        "samples": {"prompts": ["Hello"]},
    },
}

FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return apply


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[last]

    return apply


def _both(*fns: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        for fn in fns:
            fn(doc)

    return apply


def _mix(sources: list[dict[str, Any]], **top: Any) -> Callable[[dict[str, Any]], None]:
    """The base's dataset replaced by a mix of ``sources`` (with ``top`` fields on dataset itself)."""
    return _both(
        _drop("spec.dataset.id"),
        _set("spec.dataset.validation", {"fraction": 0.1}),
        _set("spec.dataset.sources", sources),
        *(_set(f"spec.dataset.{k}", v) for k, v in top.items()),
    )


# (id, mutation, reported field path, fragment of the message)
CASES = [
    (
        "typo-in-training",
        _set("spec.training.lerningRate", 1e-4),
        "spec.training.lerningRate",
        "did you mean 'learningRate'",
    ),
    ("typo-top-level", _set("spec.modle", {"id": "x/y"}), "spec.modle", "did you mean 'model'"),
    ("qlora-8bit", _set("spec.method.quantization.bits", 8), "spec.method", "qlora needs 4-bit"),
    ("full-with-quant", _set("spec.method.type", "full"), "spec.method", "need an adapter"),
    ("bits-16", _set("spec.method.quantization.bits", 16), "spec.method.quantization.bits", "4 or 8"),
    ("method-typo", _set("spec.method.type", "qlora2"), "spec.method.type", "'qlora', 'lora' or 'full'"),
    ("epochs-and-steps", _set("spec.training.epochs", 3), "spec.training", "not both"),
    ("model-id-and-path", _set("spec.model.path", "/models/x"), "spec.model", "exactly one of model.id"),
    ("model-neither", _drop("spec.model.id"), "spec.model", "exactly one of model.id"),
    ("model-missing", _drop("spec.model"), "spec.model", "required"),
    ("dataset-neither", _drop("spec.dataset.id"), "spec.dataset", "exactly one of dataset.id"),
    (
        "dataset-bad-file",
        _both(
            _drop("spec.dataset.id"),
            _drop("spec.dataset.validation"),
            _drop("spec.training.evalSteps"),
            _set("spec.dataset.files", ["train.txt"]),
        ),
        "spec.dataset.files",
        "use .jsonl, .json, .csv or .parquet files",
    ),
    (
        "validation-split-local",
        _both(_drop("spec.dataset.id"), _set("spec.dataset.files", ["a.jsonl"])),
        "spec.dataset",
        "use validation.fraction with local files",
    ),
    (
        "validation-fraction-1.5",
        _set("spec.dataset.validation", {"fraction": 1.5}),
        "spec.dataset.validation.fraction",
        "less than 1",
    ),
    (
        "inline-token-string",
        _set("spec.output.hub.token", "my-secret-value"),
        "spec.output.hub.token",
        "secretKeyRef",
    ),
    (
        "inline-hf-token-anywhere",
        _set("spec.samples.prompts", ["ok", FAKE_TOKEN]),
        "spec.samples.prompts[1]",
        "store it in a Secret",
    ),
    ("hub-without-token", _drop("spec.output.hub.token"), "spec.output.hub.token", "required"),
    ("lora-dropout-1", _set("spec.method.lora.dropout", 1.0), "spec.method.lora.dropout", "less than 1"),
    ("negative-lr", _set("spec.training.learningRate", -1), "spec.training.learningRate", "greater than 0"),
    (
        "early-stop-no-validation",
        _both(_drop("spec.dataset.validation"), _set("spec.training.earlyStoppingPatience", 3)),
        "spec",
        "set dataset.validation",
    ),
    (
        "early-stop-misaligned",
        _both(_set("spec.training.earlyStoppingPatience", 3), _set("spec.training.saveSteps", 15)),
        "spec.training",
        "multiple of training.evalSteps",
    ),
    (
        "push-merged-no-hub",
        _both(_drop("spec.output.hub"), _set("spec.output.pushMerged", True)),
        "spec.output",
        "pushMerged needs output.hub",
    ),
    (
        "gpu-type-no-gpus",
        _both(_set("spec.resources.gpusPerNode", 0), _set("spec.resources.gpuType", "H100")),
        "spec.resources",
        "set resources.gpusPerNode",
    ),
    (
        "multi-node-cpu",
        _both(_set("spec.resources.gpusPerNode", 0), _set("spec.resources.nodes", 2)),
        "spec.resources",
        "multi-node runs need GPUs",
    ),
    (
        "bad-quantity",
        _set("spec.resources.memory", "lots"),
        "spec.resources.memory",
        "must be a Kubernetes quantity such as 8, 500m, 64Gi",
    ),
    (
        "block-over-max-length",
        _set("spec.training.blockSize", 4096),
        "spec.training",
        "blockSize cannot exceed",
    ),
    (
        "packing-boolean",
        _set("spec.training.packing", True),
        "spec.training.packing",
        "packing is no longer true/false: set none (was false), wrapped (was true",
    ),
    (
        "block-size-with-bfd",
        _both(_set("spec.training.packing", "bfd"), _set("spec.training.blockSize", 256)),
        "spec.training",
        "blockSize is the length of wrapped blocks",
    ),
    (
        "storage-claim-and-ephemeral",
        _both(_set("spec.storage.claimName", "shared"), _set("spec.storage.ephemeral", True)),
        "spec.storage",
        "storage.ephemeral (an emptyDir), not both",
    ),
    (
        "storage-size-with-claim",
        _both(_set("spec.storage.claimName", "shared"), _set("spec.storage.size", "100Gi")),
        "spec.storage",
        "(the claim kubetune creates) or storage.claimName / storage.ephemeral, not both",
    ),
    (
        "storage-class-with-emptydir",
        _both(_set("spec.storage.ephemeral", True), _set("spec.storage.storageClassName", "fast")),
        "spec.storage",
        "(the claim kubetune creates) or storage.claimName / storage.ephemeral, not both",
    ),
    (
        "storage-bad-reclaim-policy",
        _set("spec.storage.reclaimPolicy", "Recycle"),
        "spec.storage.reclaimPolicy",
        "'Delete' or 'Retain'",
    ),
    ("bad-name", _set("metadata.name", "My_Job"), "metadata.name", "characters of a-z, 0-9 and '-'"),
    (
        "bad-hub-id",
        _set("spec.output.hub.repoId", "org/name/extra"),
        "spec.output.hub.repoId",
        "must be a Hub repository id, `name` or `owner/name` (the Hub's rules)",
    ),
    (
        "wrong-api-version",
        _set("apiVersion", "kubetune.io/v1"),
        "apiVersion",
        "expected 'kubetune.io/v1alpha1'",
    ),
    # Types: exactly the CRD's, so nothing passes here that `kubectl apply` refuses.
    ("quoted-int", _set("spec.training.maxSteps", "500"), "spec.training.maxSteps", "remove the quotes"),
    ("bool-for-int", _set("spec.training.maxSteps", True), "spec.training.maxSteps", "not a boolean"),
    ("fraction-for-int", _set("spec.training.maxSteps", 2.5), "spec.training.maxSteps", "whole number"),
    ("int-past-int64", _set("spec.training.maxSteps", 2**64), "spec.training.maxSteps", "64 bits (int64)"),
    ("quoted-float", _set("spec.training.learningRate", "0.0002"), "spec.training.learningRate", "quotes"),
    ("infinite-float", _set("spec.training.learningRate", math.inf), "spec.training.learningRate", "finite"),
    (
        "string-for-bool",
        _set("spec.model.trustRemoteCode", "no"),
        "spec.model.trustRemoteCode",
        "true or false",
    ),
    ("int-for-bool", _set("spec.dataset.dedup", 1), "spec.dataset.dedup", "true or false, not a number"),
    ("number-for-string", _set("spec.dataset.revision", 1234), "spec.dataset.revision", "quote it"),
    (
        "python-field-name",
        _set("spec.training.max_steps", 5),
        "spec.training.max_steps",
        "did you mean 'maxSteps'",
    ),
    (
        "backoff-past-int32",
        _set("spec.runPolicy.backoffLimit", 2**31),
        "spec.runPolicy.backoffLimit",
        "2147483647",
    ),
    ("seed-past-uint32", _set("spec.training.seed", 2**32), "spec.training.seed", "4294967295"),
    ("prompt-not-a-list", _set("spec.samples.prompts", "Hello"), "spec.samples.prompts", "list"),
    # Quantities: resource.Quantity's grammar, and positive.
    (
        "quantity-lowercase-suffix",
        _set("spec.resources.memory", "64mi"),
        "spec.resources.memory",
        "case-sensitive",
    ),
    (
        "quantity-negative",
        _set("spec.resources.memory", "-64Gi"),
        "spec.resources.memory",
        "greater than zero",
    ),
    ("quantity-unquoted", _set("spec.resources.cpu", 8), "spec.resources.cpu", "quote it"),
    ("storage-size-zero", _set("spec.storage.size", "0"), "spec.storage.size", "greater than zero"),
    (
        "quantity-with-space",
        _set("spec.resources.sharedMemory", "8 Gi"),
        "spec.resources.sharedMemory",
        "no spaces",
    ),
    # Labels, annotations, node selectors.
    (
        "label-key-bad",
        _set("spec.podMetadata.labels", {"bad key": "x"}),
        "spec.podMetadata.labels.bad key",
        "must be a qualified name",
    ),
    (
        "label-value-bad",
        _set("spec.podMetadata.labels", {"team": "a b"}),
        "spec.podMetadata.labels.team",
        "must be a label value",
    ),
    (
        "label-value-too-long",
        _set("spec.podMetadata.labels", {"team": "a" * 64}),
        "spec.podMetadata.labels.team",
        "at most 63 characters",
    ),
    (
        "too-many-labels",
        _set("spec.podMetadata.labels", {f"l{i}": "x" for i in range(65)}),
        "spec.podMetadata.labels",
        "at most 64 entries",
    ),
    (
        "node-selector-key-bad",
        _set("spec.resources.nodeSelector", {"gpu!": "a100"}),
        "spec.resources.nodeSelector.gpu!",
        "must be a qualified name",
    ),
    (
        "node-selector-value-bad",
        _set("spec.resources.nodeSelector", {"zone": "us east"}),
        "spec.resources.nodeSelector.zone",
        "must be a label value",
    ),
    (
        "annotation-key-bad-prefix",
        _set("spec.podMetadata.annotations", {"bad_prefix/x": "v"}),
        "spec.podMetadata.annotations.bad_prefix/x",
        "must be a qualified name",
    ),
    (
        "annotations-over-256k",
        _set("spec.podMetadata.annotations", {f"a{i}": "x" * 15000 for i in range(20)}),
        "spec.podMetadata.annotations",
        "at most 262144 bytes (256 KiB",
    ),
    (
        "annotation-value-over-32k",
        _set("spec.podMetadata.annotations", {"note": "x" * 32769}),
        "spec.podMetadata.annotations.note",
        "at most 32768 characters",
    ),
    # Tolerations: core/v1's rules.
    (
        "toleration-exists-with-value",
        _set("spec.resources.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
        "spec.resources.tolerations[0].value",
        "operator Exists matches any value",
    ),
    (
        "toleration-without-key",
        _set("spec.resources.tolerations", [{"operator": "Equal", "value": "v"}]),
        "spec.resources.tolerations[0]",
        "without a key must use operator Exists",
    ),
    (
        "toleration-seconds-not-noexecute",
        _set(
            "spec.resources.tolerations",
            [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}],
        ),
        "spec.resources.tolerations[0].tolerationSeconds",
        "set effect: NoExecute",
    ),
    (
        "toleration-bad-key",
        _set("spec.resources.tolerations", [{"key": "bad key", "operator": "Exists"}]),
        "spec.resources.tolerations[0].key",
        "must be a qualified name",
    ),
    (
        "toleration-bad-effect",
        _set("spec.resources.tolerations", [{"key": "k", "operator": "Exists", "effect": "NoRun"}]),
        "spec.resources.tolerations[0].effect",
        "'NoSchedule', 'PreferNoSchedule' or 'NoExecute'",
    ),
    # Names: what the Job, its pods' hostnames and the Service are made of.
    ("name-with-dot", _set("metadata.name", "my.job"), "metadata.name", "(no '.')"),
    ("name-too-long", _set("metadata.name", "a" * 51), "metadata.name", "at most 50 characters"),
    ("name-starts-with-digit", _set("metadata.name", "7b-tune"), "metadata.name", "starting with a letter"),
    ("namespace-with-dot", _set("metadata.namespace", "team.a"), "metadata.namespace", "no '.'"),
    (
        "queue-name-too-long",
        _set("spec.runPolicy.queueName", "q" * 64),
        "spec.runPolicy.queueName",
        "at most 63",
    ),
    (
        "queue-name-bad",
        _set("spec.runPolicy.queueName", "Gpu_Queue"),
        "spec.runPolicy.queueName",
        "LocalQueue",
    ),
    (
        "secret-name-bad",
        _set("spec.output.hub.token.secretKeyRef.name", "HF_TOKEN"),
        "spec.output.hub.token.secretKeyRef.name",
        "lowercase DNS name",
    ),
    (
        "secret-key-bad",
        _set("spec.output.hub.token.secretKeyRef.key", "a/b"),
        "spec.output.hub.token.secretKeyRef.key",
        "must be a Secret key",
    ),
    (
        "gpu-type-bad",
        _set("spec.resources.gpuType", "A100 80GB"),
        "spec.resources.gpuType",
        "nvidia.com/gpu.product",
    ),
    (
        "priority-class-bad",
        _set("spec.resources.priorityClassName", "High"),
        "spec.resources.priorityClassName",
        "lowercase DNS name",
    ),
    (
        "claim-name-bad",
        _set("spec.storage.claimName", "My Claim"),
        "spec.storage.claimName",
        "lowercase DNS name",
    ),
    ("image-whitespace", _set("spec.image", " ghcr.io/x/trainer "), "spec.image", "whitespace"),
    # Dataset mixes (dataset.sources), trainOn and chatTemplate.
    (
        "dataset-sources-and-id",
        _set("spec.dataset.sources", [{"id": "org/a"}]),
        "spec.dataset",
        "exactly one of dataset.id (a Hub dataset), dataset.files (local files) or dataset.sources",
    ),
    (
        "dataset-sources-field-on-top",
        _mix([{"id": "org/a"}], format="alpaca"),
        "spec.dataset",
        "set format, textField, messagesField, promptField, completionField, trainOn, weight, maxRows, "
        "revision, split on each source, not on dataset",
    ),
    (
        "dataset-sources-validation-split",
        _both(_drop("spec.dataset.id"), _set("spec.dataset.sources", [{"id": "org/a"}])),
        "spec.dataset",
        "use validation.fraction with local files or dataset.sources",
    ),
    ("dataset-sources-empty", _mix([]), "spec.dataset.sources", "at least 1 item"),
    (
        "dataset-sources-9",
        _mix([{"id": f"org/a{i}"} for i in range(9)]),
        "spec.dataset.sources",
        "at most 8",
    ),
    (
        "source-neither-id-nor-files",
        _mix([{"id": "org/a"}, {"format": "chat"}]),
        "spec.dataset.sources[1]",
        "exactly one of id (a Hub dataset) or files (local files)",
    ),
    (
        "source-files-of-two-types",
        _mix([{"files": ["a.jsonl", "b.csv"]}]),
        "spec.dataset.sources[0].files",
        "files of one type",
    ),
    (
        "source-train-on-unfit",
        _mix([{"id": "org/a", "format": "chat", "trainOn": "completion"}]),
        "spec.dataset.sources[0].trainOn",
        "chat on assistant or all",
    ),
    (
        "source-weight-zero",
        _mix([{"id": "org/a"}, {"id": "org/b", "weight": 0}]),
        "spec.dataset.sources[1].weight",
        "greater than 0",
    ),
    (
        "source-weight-over-100",
        _mix([{"id": "org/a", "weight": 101}]),
        "spec.dataset.sources[0].weight",
        "less than or equal to 100",
    ),
    (
        "source-max-rows-zero",
        _mix([{"id": "org/a", "maxRows": 0}]),
        "spec.dataset.sources[0].maxRows",
        "greater than or equal to 1",
    ),
    (
        "source-format-typo",
        _mix([{"id": "org/a", "format": "sharegpt"}]),
        "spec.dataset.sources[0].format",
        "'completion'",
    ),
    (
        "source-field-typo",
        _mix([{"id": "org/a", "wieght": 2}]),
        "spec.dataset.sources[0].wieght",
        "did you mean 'weight'",
    ),
    (
        "source-token-as-revision",
        _mix([{"id": "org/a", "revision": FAKE_TOKEN}]),
        "spec.dataset.sources[0].revision",
        "store it in a Secret",
    ),
    (
        "train-on-text-completion",
        _set("spec.dataset.trainOn", "completion"),
        "spec.dataset.trainOn",
        "text trains on all",
    ),
    (
        "train-on-typo",
        _set("spec.dataset.trainOn", "inputs"),
        "spec.dataset.trainOn",
        "'completion', 'assistant' or 'all'",
    ),
    (
        "chat-template-unknown-name",
        _set("spec.dataset.chatTemplate", "mistral"),
        "spec.dataset.chatTemplate",
        "built-in chat template (chatml",
    ),
    (
        "chat-template-empty",
        _set("spec.dataset.chatTemplate", ""),
        "spec.dataset.chatTemplate",
        "must not be empty",
    ),
    # Hub repository ids: the Hub's own rules.
    (
        "hub-id-double-dash",
        _set("spec.output.hub.repoId", "org/a--b"),
        "spec.output.hub.repoId",
        "no '--' or '..'",
    ),
    ("hub-id-double-dot", _set("spec.model.id", "org/a..b"), "spec.model.id", "no '--' or '..'"),
    ("hub-id-part-too-long", _set("spec.dataset.id", "org/" + "a" * 97), "spec.dataset.id", "1 to 96"),
    ("hub-id-dot-git", _set("spec.output.hub.repoId", "org/model.git"), "spec.output.hub.repoId", "'.git'"),
    ("hub-id-leading-dash", _set("spec.model.id", "-org/model"), "spec.model.id", "not starting or ending"),
    # Tokens: in values, keys, base64, metadata.
    (
        "token-in-label-value",
        _set("spec.podMetadata.labels", {"note": FAKE_TOKEN}),
        "spec.podMetadata.labels.note",
        "store it in a Secret",
    ),
    ("token-in-image", _set("spec.image", "ghcr.io/" + FAKE_TOKEN), "spec.image", "store it in a Secret"),
    (
        "token-as-key",
        _set("spec.podMetadata.annotations", {FAKE_TOKEN: "x"}),
        "spec.podMetadata.annotations.hf_***",
        "store it in a Secret",
    ),
    (
        "token-in-base64",
        _set("spec.samples.prompts", [base64.b64encode(FAKE_TOKEN.encode()).decode()]),
        "spec.samples.prompts[0]",
        "store it in a Secret",
    ),
    (
        "token-in-metadata",
        _set("metadata.annotations", {"note": FAKE_TOKEN}),
        "metadata.annotations.note",
        "store it in a Secret",
    ),
    # Paths kubetune mounts itself.
    (
        "mount-over-spec",
        _set("spec.storage.mountPath", "/etc/kubetune"),
        "spec.storage.mountPath",
        "mounts itself",
    ),
    (
        "mount-inside-shm",
        _set("spec.storage.mountPath", "/dev/shm/data"),
        "spec.storage.mountPath",
        "mounts itself",
    ),
    (
        "mount-hides-shm",
        _set("spec.storage.mountPath", "/dev"),
        "spec.storage.mountPath",
        "lie inside or hide",
    ),
    (
        "mount-relative",
        _set("spec.storage.mountPath", "workspace"),
        "spec.storage.mountPath",
        "an absolute path",
    ),
    ("mount-dot-dot", _set("spec.storage.mountPath", "/data/../etc"), "spec.storage.mountPath", "'..' parts"),
    (
        "output-in-spec-mount",
        _set("spec.output.path", "/etc/kubetune/out"),
        "spec.output.path",
        "mounts itself",
    ),
    (
        "output-dot-dot",
        _set("spec.output.path", "/workspace/../dev/shm"),
        "spec.output.path",
        "must be clean",
    ),
    # Sizes: what Kubernetes stores.
    (
        "configmap-over-1mib",
        _set("spec.samples.prompts", ["\u20ac" * 6000] * 32),
        "spec.samples.prompts",
        "over the 1 MiB Kubernetes allows a ConfigMap",
    ),
    (
        "prompt-too-long",
        _set("spec.samples.prompts", ["x" * 16385]),
        "spec.samples.prompts[0]",
        "at most 16384",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_spec_names_the_field(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], path: str, fragment: str
) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    text = yaml.safe_dump(doc, sort_keys=False)
    file = tmp_path / "job.yaml"
    file.write_text(text)

    result = validate_paths([file])

    assert not result.jobs
    assert [p.path for p in result.problems] == [path], result.problems
    problem = result.problems[0]
    assert fragment in problem.message, problem.message
    assert FAKE_TOKEN not in problem.message
    # The line is where the field (or, for a missing one, its parent) is written.
    lines = text.splitlines()
    written = [part for part in path.replace("[", ".[").split(".") if part and not part.startswith("[")]
    line = lines[problem.line - 1]
    key = line.lstrip().removeprefix("- ").strip("'\"")
    if "required" in fragment:
        assert written[-2] + ":" in line, (problem, line)
    elif path.endswith("]"):
        assert line.lstrip().startswith("- "), (problem, line)
    elif "***" in written[-1]:  # a key that holds a token is named by its redacted text
        assert key.startswith(written[-1].split("***")[0]), (problem, line)
    else:
        assert key.startswith(written[-1] + ":"), (problem, line)
    assert str(problem).startswith(f"{file}:{problem.line}: {path}: ")


def test_table_is_big_enough() -> None:
    """Issue 8 asks for at least 80 bad inputs: these value problems, and the loader's raw-bytes table
    (tests/test_load_hardening.py), each with its own id."""
    import test_load_hardening

    assert len({c[0] for c in CASES}) == len(CASES) >= 50
    assert len(CASES) + len(test_load_hardening.CASES) >= 80


def test_base_is_valid(tmp_path: Path) -> None:
    file = tmp_path / "job.yaml"
    file.write_text(yaml.safe_dump(BASE))
    result = validate_paths([file])
    assert result.problems == [] and len(result.jobs) == 1


def test_every_error_of_a_document_is_reported(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["training"]["lerningRate"] = 1
    doc["spec"]["method"]["lora"]["r"] = 0
    file = tmp_path / "job.yaml"
    file.write_text(yaml.safe_dump(doc))
    paths = {p.path for p in validate_paths([file]).problems}
    assert paths == {"spec.training.lerningRate", "spec.method.lora.r"}


def test_multi_document_files_and_other_kinds(tmp_path: Path) -> None:
    bad = copy.deepcopy(BASE)
    bad["metadata"]["name"] = "second"
    bad["spec"]["training"]["epochs"] = 1
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}}
    file = tmp_path / "jobs.yaml"
    file.write_text(yaml.safe_dump_all([BASE, secret, bad], sort_keys=False))
    result = validate_paths([tmp_path])
    assert len(result.jobs) == 1 and result.skipped == 1
    [problem] = result.problems
    assert problem.path == "spec.training"
    # The error points into the third document, not the first.
    assert problem.line > len(yaml.safe_dump(BASE, sort_keys=False).splitlines())


def test_invalid_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    file = tmp_path / "broken.yaml"
    file.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec: [unclosed\n")
    [problem] = validate_paths([file]).problems
    assert problem.path == "<yaml>" and problem.line >= 3 and "invalid YAML" in problem.message


# --------------------------------------------------------------------------------------------------
# "did you mean" / "known fields": the real fields of every nested model
# --------------------------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[tuple[tuple[int | str, ...], Any]]:
    """The models an annotation holds, each with the path step its container adds (a list item: 0, a
    dict value: a key): `X | None`, `Annotated[X, ...]`, `list[X]`, `dict[str, X]`."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [((), annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [((0, *step), m) for step, m in _models_in(args[0])]
    if origin is dict:
        return [(("key", *step), m) for step, m in _models_in(args[1])]
    if origin is typing.Annotated:
        return _models_in(args[0])
    return [found for arg in args for found in _models_in(arg)]


def _nested_models() -> list[tuple[tuple[int | str, ...], Any]]:
    """Every model under FineTuneJob's spec and metadata that refuses unknown fields, by the wire path to
    it (each model once)."""
    from kubetune.api.v1alpha1 import FineTuneJob

    out: list[tuple[tuple[int | str, ...], Any]] = []
    seen: set[Any] = set()

    def walk(model: Any, path: tuple[int | str, ...]) -> None:
        for name, f in model.model_fields.items():
            wire = f.alias or name
            if not path and wire not in ("spec", "metadata"):
                continue
            for step, inner in _models_in(f.annotation):
                if inner in seen:
                    continue
                seen.add(inner)
                here = (*path, wire, *step)
                if inner.model_config.get("extra") == "forbid":  # metadata takes any Kubernetes field
                    out.append((here, inner))
                walk(inner, here)

    walk(FineTuneJob, ())
    return out


def _dotted(path: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


NESTED = _nested_models()


def test_every_nested_model_is_walked() -> None:
    paths = {_dotted(p) for p, _ in NESTED}
    for optional in (
        "spec.method.lora",
        "spec.method.quantization",
        "spec.dataset.validation",
        "spec.output.hub",
    ):
        assert optional in paths
    assert len(NESTED) >= 20


@pytest.mark.parametrize(("path", "model"), NESTED, ids=[_dotted(p) for p, _ in NESTED])
def test_unknown_field_lists_the_real_fields(path: tuple[int | str, ...], model: Any) -> None:
    """An unknown field under any nested model (optional ones too: method.lora, method.quantization, ...)
    names that model's fields, by their wire names."""
    from kubetune.api.load import validate_bytes

    doc = copy.deepcopy(BASE)
    node: Any = doc
    for step, following in zip(path, (*path[1:], None), strict=True):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(step, int):
            while len(node) <= step:
                node.append(empty)
            node = node[step]
        else:
            if not isinstance(node.get(step), (dict, list)):
                node[step] = empty
            node = node[step]
    node["zzzq"] = 1
    problems = validate_bytes(yaml.safe_dump(doc, sort_keys=False).encode(), "job.yaml").problems
    where = _dotted((*path, "zzzq"))
    found = [p for p in problems if p.path == where]
    assert found, [str(p) for p in problems]
    fields = [f.alias or n for n, f in model.model_fields.items()]
    assert found[0].message == f"unknown field 'zzzq'; known fields: {', '.join(fields)}"


@pytest.mark.parametrize(
    ("path", "typo", "meant"),
    [
        ("spec.method.lora", "useDoRA", "useDora"),
        ("spec.method.lora", "modulesToSafe", "modulesToSave"),
        ("spec.method.quantization", "doubleQuantization", "doubleQuant"),
        ("spec.model", "attnImplementaton", "attnImplementation"),
        ("spec.training", "neftuneAlpha", "neftuneNoiseAlpha"),
    ],
)
def test_typos_under_optional_models_get_did_you_mean(path: str, typo: str, meant: str) -> None:
    from kubetune.api.load import validate_bytes

    doc = copy.deepcopy(BASE)
    node: Any = doc
    for part in path.split("."):
        node = node.setdefault(part, {})
    node[typo] = True
    [problem] = validate_bytes(yaml.safe_dump(doc, sort_keys=False).encode(), "job.yaml").problems
    assert (problem.path, problem.message) == (
        f"{path}.{typo}",
        f"unknown field '{typo}'; did you mean '{meant}'?",
    )
