"""A table of invalid FineTuneJobs: each fails with a message that names the field and the fix,
at the line where that field is written."""

from __future__ import annotations

import copy
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
        "use .jsonl, .json, .csv or .parquet",
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
        "a Kubernetes quantity, e.g. 8, 500m, 64Gi (got 'lots')",
    ),
    (
        "block-over-max-length",
        _set("spec.training.blockSize", 4096),
        "spec.training",
        "blockSize cannot exceed",
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
    ("bad-name", _set("metadata.name", "My_Job"), "metadata.name", "must be a lowercase DNS name"),
    (
        "bad-hub-id",
        _set("spec.output.hub.repoId", "org/name/extra"),
        "spec.output.hub.repoId",
        "must be a Hub id such as org/name",
    ),
    (
        "wrong-api-version",
        _set("apiVersion", "kubetune.io/v1"),
        "apiVersion",
        "expected 'kubetune.io/v1alpha1'",
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
    if "required" in fragment:
        assert written[-2] + ":" in line, (problem, line)
    elif path.endswith("]"):
        assert line.lstrip().startswith("- "), (problem, line)
    else:
        assert line.lstrip().startswith(written[-1] + ":"), (problem, line)
    assert str(problem).startswith(f"{file}:{problem.line}: {path}: ")


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 15


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
