"""The generated CRD enforces what the models enforce, checked without a cluster.

The OpenAPI part is checked with jsonschema (Draft 4 has OpenAPI v3.0's boolean exclusive bounds;
unknown fields fail, as under kubectl's strict server-side field validation; `format: int64` is given
its bounds), the CEL rules with cel-python, given stand-ins for the Kubernetes CEL libraries the rules
use (quantity, strings, lists). The real API server runs these in the end-to-end tests
(tests/e2e/test_validate_agrees.py, and the operator's).
"""

from __future__ import annotations

import copy
import re
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from celpy import celtypes
from pydantic import BaseModel, ValidationError

from kubetune.api import v1alpha1 as api
from kubetune.api.generate import crd
from kubetune.api.v1alpha1 import INT64_MAX, INT64_MIN, QUANTITY_RE
from test_invalid import BASE, CASES

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
CEL = celpy.Environment()


class _Quantity:
    def __init__(self, text: str) -> None:
        m = re.fullmatch(QUANTITY_RE, text)
        self.value = Decimal(m.group(1)) * (-1 if text.startswith("-") else 1) if m else None


# Stand-ins for the Kubernetes CEL libraries (the API server has the real ones).
K8S_FUNCTIONS = {
    "isQuantity": lambda s: celtypes.BoolType(re.fullmatch(QUANTITY_RE, str(s)) is not None),
    "quantity": lambda s: _Quantity(str(s)),
    "isGreaterThan": lambda a, b: celtypes.BoolType(a.value is not None and a.value > b.value),
    "indexOf": lambda s, sub: celtypes.IntType(str(s).find(str(sub))),
    "lowerAscii": lambda s: celtypes.StringType(re.sub("[A-Z]+", lambda m: m.group().lower(), str(s))),
    "trim": lambda s: celtypes.StringType(str(s).strip()),
    "sum": lambda items: celtypes.IntType(sum(int(i) for i in items)),
}

# Rows of the invalid table that the API server rejects by other means, or only the models catch.
NOT_IN_CRD = {
    "wrong-api-version": "the API server serves only kubetune.io/v1alpha1",
    "namespace-with-dot": "the API server checks metadata.namespace itself (CEL sees only metadata.name)",
    "infinite-float": "kubectl refuses it before the API server: JSON has no infinity",
    "token-in-base64": "CEL cannot decode base64: `kubetune validate` and the operator find it",
    "token-in-metadata": "CEL sees only metadata.name of metadata: `kubetune validate` and the operator "
    "find it",
    "configmap-over-1mib": "the ConfigMap holds the spec with every default, as YAML: CEL cannot render "
    "it, so `kubetune validate` and the operator measure it",
}


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "properties" in node and node is not SCHEMA:
        node["additionalProperties"] = False
    for key, child in node.get("properties", {}).items():
        if key != "metadata":
            node["properties"][key] = _strict(child)
    if "items" in node:
        node["items"] = _strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"])
    if node.get("format") == "int64":  # the API server's int64 check, which Draft 4 leaves out
        node.setdefault("minimum", INT64_MIN)
        node.setdefault("maximum", INT64_MAX)
    return node


STRICT = _strict(SCHEMA)


def cel_failures(schema: dict[str, Any], obj: Any, path: str = "") -> list[tuple[str, str]]:
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]), functions=K8S_FUNCTIONS)
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            failures.append((path or "<root>", rule["message"]))
    if isinstance(obj, dict):
        for key, child in schema.get("properties", {}).items():
            if key in obj:
                failures += cel_failures(child, obj[key], f"{path}.{key}".lstrip("."))
        values = schema.get("additionalProperties")
        if isinstance(values, dict):
            for key, child in obj.items():
                failures += cel_failures(values, child, f"{path}.{key}")
    if isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            failures += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def crd_errors(obj: dict[str, Any]) -> list[str]:
    errors = [e.message for e in jsonschema.Draft4Validator(STRICT).iter_errors(obj)]
    if not errors:
        errors = [msg for _, msg in cel_failures(SCHEMA, obj)]
    return errors


def _rules(node: dict[str, Any]) -> list[str]:
    out = [r["rule"] for r in node.get("x-kubernetes-validations", [])]
    for child in node.get("properties", {}).values():
        out += _rules(child)
    if "items" in node:
        out += _rules(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out += _rules(node["additionalProperties"])
    return out


def _nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, child in node.get("properties", {}).items():
        out += _nodes(child, f"{path}.{name}")
    if "items" in node:
        out += _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _nodes(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("rule", _rules(SCHEMA))
def test_every_cel_rule_compiles(rule: str) -> None:
    CEL.compile(rule)


@pytest.mark.parametrize("example", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_pass_the_crd(example: Path) -> None:
    assert crd_errors(yaml.safe_load(example.read_text())) == []


def test_base_of_the_table_passes_the_crd() -> None:
    assert crd_errors(copy.deepcopy(BASE)) == []


@pytest.mark.parametrize(
    ("case_id", "mutate", "fragment"),
    [(c[0], c[1], c[3]) for c in CASES if c[0] not in NOT_IN_CRD],
    ids=[c[0] for c in CASES if c[0] not in NOT_IN_CRD],
)
def test_invalid_specs_fail_the_crd_too(case_id: str, mutate: Any, fragment: str) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    errors = crd_errors(doc)
    assert errors, f"{case_id}: the CRD accepts what the models reject"


@pytest.mark.parametrize(
    ("case_id", "mutate", "fragment"),
    [(c[0], c[1], c[3]) for c in CASES if "exactly one" in c[3] or "not both" in c[3] or "needs" in c[3]],
    ids=[c[0] for c in CASES if "exactly one" in c[3] or "not both" in c[3] or "needs" in c[3]],
)
def test_cross_field_rules_say_the_same_in_cel(case_id: str, mutate: Any, fragment: str) -> None:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    messages = [msg for _, msg in cel_failures(SCHEMA, doc)]
    assert any(fragment in m for m in messages), (case_id, messages)


def test_resolved_storage_defaults_pass_the_crd() -> None:
    """The ConfigMap's spec has every default written out; the storage rule lets defaults through."""
    doc = copy.deepcopy(BASE)
    doc["spec"]["storage"] = {
        "claimName": "shared",
        "size": "50Gi",
        "ephemeral": False,
        "reclaimPolicy": "Delete",
    }
    assert crd_errors(doc) == []
    doc["spec"]["storage"]["size"] = "51Gi"
    assert any("not both" in e for e in crd_errors(doc))


def test_no_rule_sits_on_a_string() -> None:
    """The API server quotes a string's value in the error of a rule on that string (a token pasted in
    the wrong field would come back), not an object's, list's or map's: every rule sits on a parent."""
    strings = [p for p, n in _nodes(SCHEMA) if n["type"] == "string" and "x-kubernetes-validations" in n]
    assert strings == []


def test_every_free_text_field_and_map_key_is_checked_for_tokens() -> None:
    spec = SCHEMA["properties"]["spec"]
    token_rules = [
        r for _, n in _nodes(spec) for r in n.get("x-kubernetes-validations", []) if "hf_" in r["rule"]
    ]
    texts = [p for p, n in _nodes(spec) if n["type"] == "string" and "enum" not in n]
    maps = [p for p, n in _nodes(spec) if isinstance(n.get("additionalProperties"), dict)]
    assert len(token_rules) == len(texts) + len(maps)
    assert {"spec.samples.prompts": 1} and len(texts) > 30


@pytest.mark.parametrize(
    "value",
    ["64Gi", "500m", "8", "0.5Gi", "+1Gi", "1e3", "1E3", "1k", "1Ki", "1.", ".5", "100u", "1n", "1E"],
)
def test_quantities_the_grammar_takes(value: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"]["memory"] = value
    assert crd_errors(doc) == []


def test_every_string_and_list_and_map_is_bounded() -> None:
    """CEL rules are budgeted by the API server from maxLength, maxItems and maxProperties."""
    spec = SCHEMA["properties"]["spec"]
    unbounded = [
        p
        for p, n in _nodes(spec)
        if (n["type"] == "string" and "enum" not in n and "maxLength" not in n)
        or (n["type"] == "array" and "maxItems" not in n)
        or (isinstance(n.get("additionalProperties"), dict) and "maxProperties" not in n)
    ]
    assert unbounded == []


# ---------------------------------------------------------------------------------------------------
# Every cross-field rule (v1alpha1.Rule): the CRD's CEL and the models' check agree, word for word
# ---------------------------------------------------------------------------------------------------

SPEC = {"model": {"id": "org/base"}, "dataset": {"id": "org/data"}}
HUB = {"repoId": "org/out", "token": {"secretKeyRef": {"name": "hf"}}}

# For each rule, keyed by its model and a fragment of its message: documents of that model (as written,
# wire names) that pass it, and documents that fail it and nothing else.
RULE_SAMPLES: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    ("ModelSource", "exactly one of model.id"): (
        [{"id": "org/base"}, {"path": "/models/base"}],
        [{}, {"id": "org/base", "path": "/models/base"}],
    ),
    ("ModelSource", "model.sourceId names the Hub repository"): (
        [{"path": "/models/base", "sourceId": "org/base"}, {"id": "org/base"}],
        [{"id": "org/base", "sourceId": "org/base"}],
    ),
    ("ValidationSplit", "exactly one of validation.split"): (
        [{"split": "test"}, {"fraction": 0.1}],
        [{}, {"split": "test", "fraction": 0.1}],
    ),
    ("DatasetPart", "exactly one of id (a Hub dataset)"): (
        [{"id": "org/data"}, {"files": ["/data/a.jsonl"], "format": "alpaca"}],
        [{}, {"format": "chat"}, {"id": "org/data", "files": ["/data/a.jsonl"]}],
    ),
    ("DatasetPart", "files of one type"): (
        [{"files": ["/data/a.jsonl", "/data/b.json"]}, {"files": ["/data/a.CSV"]}],
        [{"files": ["/data/a.jsonl", "/data/b.csv"]}, {"files": ["/data/a.txt"]}],
    ),
    ("DatasetPart", "trainOn must suit the format"): (
        [
            {"id": "org/data"},
            {"id": "org/data", "trainOn": "all"},
            {"id": "org/data", "format": "chat", "trainOn": "assistant"},
            {"id": "org/data", "format": "chat", "trainOn": "all"},
            {"id": "org/data", "format": "alpaca", "trainOn": "all"},
            {"files": ["/data/a.jsonl"], "format": "completion", "trainOn": "completion", "weight": 2},
        ],
        [
            {"id": "org/data", "trainOn": "completion"},
            {"id": "org/data", "format": "text", "trainOn": "assistant"},
            {"id": "org/data", "format": "chat", "trainOn": "completion"},
            {"id": "org/data", "format": "alpaca", "trainOn": "assistant"},
            {"files": ["/data/a.jsonl"], "format": "completion", "trainOn": "assistant"},
        ],
    ),
    ("DatasetSource", "exactly one of dataset.id"): (
        [{"id": "org/data"}, {"files": ["/data/a.jsonl"]}, {"sources": [{"id": "org/data"}]}],
        [
            {},
            {"id": "org/data", "files": ["/data/a.jsonl"]},
            {"id": "org/data", "sources": [{"id": "org/other"}]},
            {"files": ["/data/a.jsonl"], "sources": [{"id": "org/other"}]},
        ],
    ),
    ("DatasetSource", "with dataset.sources, set format"): (
        [
            {"sources": [{"id": "org/chat", "format": "chat"}, {"files": ["/d/a.jsonl"], "weight": 0.5}]},
            # The trainer's spec file writes every default out: defaults at the top change nothing.
            {
                "sources": [{"id": "org/data", "maxRows": 100}],
                "format": "text",
                "textField": "text",
                "messagesField": "messages",
                "promptField": "prompt",
                "completionField": "completion",
                "revision": "main",
                "split": "train",
                "dedup": False,
                "validation": {"fraction": 0.1},
                "chatTemplate": "chatml",
            },
            {"id": "org/data", "format": "chat", "weight": 2},
        ],
        [
            {"sources": [{"id": "org/data"}], "format": "alpaca"},
            {"sources": [{"id": "org/data"}], "textField": "body"},
            {"sources": [{"id": "org/data"}], "trainOn": "all"},
            {"sources": [{"id": "org/data"}], "weight": 2},
            {"sources": [{"id": "org/data"}], "maxRows": 10},
            {"sources": [{"id": "org/data"}], "revision": "v1"},
            {"sources": [{"id": "org/data"}], "split": "test"},
        ],
    ),
    ("DatasetSource", "files of one type"): (
        [{"files": ["/data/a.jsonl", "/data/b.json"]}, {"files": ["/data/a.CSV"]}],
        [{"files": ["/data/a.jsonl", "/data/b.csv"]}, {"files": ["/data/a.txt"]}],
    ),
    ("DatasetSource", "validation.split needs a Hub dataset"): (
        [
            {"id": "org/data", "validation": {"split": "test"}},
            {"files": ["/data/a.jsonl"], "validation": {"fraction": 0.1}},
        ],
        [
            {"files": ["/data/a.jsonl"], "validation": {"split": "test"}},
            {"sources": [{"id": "org/data"}], "validation": {"split": "test"}},
        ],
    ),
    ("DatasetSource", "trainOn must suit the format"): (
        [
            {"id": "org/data", "format": "chat", "trainOn": "assistant"},
            {"files": ["/data/a.jsonl"], "format": "alpaca", "trainOn": "all"},
            {"id": "org/data", "format": "completion"},
        ],
        [
            {"id": "org/data", "format": "chat", "trainOn": "completion"},
            {"id": "org/data", "trainOn": "assistant"},
            {"files": ["/data/a.jsonl"], "format": "completion", "trainOn": "assistant"},
        ],
    ),
    ("MethodSpec", "qlora needs 4-bit"): (
        [{}, {"quantization": {"bits": 4}}, {"type": "lora", "quantization": {"bits": 8}}],
        [{"quantization": {"bits": 8}}, {"type": "qlora", "quantization": {"bits": 8}}],
    ),
    ("MethodSpec", "full fine-tuning"): (
        [{"type": "full"}, {"type": "lora", "lora": {"r": 8}}],
        [
            {"type": "full", "quantization": {"bits": 4}},
            {"type": "full", "quantization": {"bits": 8}},
            {"type": "full", "quantization": {}},
            {"type": "full", "lora": {"r": 8}},
        ],
    ),
    ("TrainingSpec", "epochs or training.maxSteps"): (
        [{}, {"epochs": 1}, {"maxSteps": 10}],
        [{"epochs": 1, "maxSteps": 10}],
    ),
    ("TrainingSpec", "blockSize cannot exceed"): (
        [{"blockSize": 512}, {"blockSize": 1024, "maxSeqLength": 1024}],
        [{"blockSize": 1024}, {"blockSize": 256, "maxSeqLength": 128}],
    ),
    ("TrainingSpec", "blockSize is the length of wrapped blocks"): (
        [{"blockSize": 256}, {"blockSize": 256, "packing": "wrapped"}, {"packing": "bfd"}],
        [{"blockSize": 256, "packing": "bfd"}, {"blockSize": 256, "packing": "none"}],
    ),
    ("TrainingSpec", "saveSteps must be a multiple"): (
        [
            {"earlyStoppingPatience": 2, "saveSteps": 100, "evalSteps": 50},
            {"saveSteps": 30, "evalSteps": 20},
            {"earlyStoppingPatience": 2, "evalSteps": 30},
        ],
        [{"earlyStoppingPatience": 2, "saveSteps": 30, "evalSteps": 20}],
    ),
    ("TrainingSpec", "reportTo wandb needs"): (
        [
            {},
            {"reportTo": ["tensorboard", "mlflow"]},
            {"reportTo": ["wandb"], "trackers": {"wandb": {"mode": "offline"}}},
            {"reportTo": ["wandb"], "trackers": {"wandb": {"apiKey": {"secretKeyRef": {"name": "wandb"}}}}},
        ],
        [
            {"reportTo": ["wandb"]},
            {"reportTo": ["wandb"], "trackers": {"wandb": {"project": "p"}}},
            {"reportTo": ["wandb"], "trackers": {"wandb": {"mode": "online"}}},
        ],
    ),
    ("MlflowSpec", "trackingUri must not hold a password"): (
        [{}, {"trackingUri": "https://mlflow.example.com"}, {"trackingUri": "http://user@mlflow:5000"}],
        [{"trackingUri": "https://bob:secret@mlflow.example.com"}, {"trackingUri": "http://:pw@host"}],
    ),
    ("Toleration", "without a key must use operator Exists"): (
        [{"key": "team"}, {"operator": "Exists"}],
        [{}, {"key": "", "operator": "Equal"}],
    ),
    ("Toleration", "Exists matches any value"): (
        [
            {"key": "team", "operator": "Exists"},
            {"key": "team", "value": "a"},
            {"operator": "Exists", "value": ""},
        ],
        [{"key": "team", "operator": "Exists", "value": "a"}],
    ),
    ("Toleration", "tolerationSeconds applies only"): (
        [{"key": "team", "effect": "NoExecute", "tolerationSeconds": 10}],
        [
            {"key": "team", "tolerationSeconds": 10},
            {"key": "team", "effect": "NoSchedule", "tolerationSeconds": 0},
        ],
    ),
    ("ResourcesSpec", "gpuType needs GPUs"): (
        [{"gpuType": "NVIDIA-A100"}, {"gpuType": "NVIDIA-A100", "gpusPerNode": 2}, {"gpusPerNode": 0}],
        [{"gpuType": "NVIDIA-A100", "gpusPerNode": 0}],
    ),
    ("ResourcesSpec", "multi-node runs need GPUs"): (
        [{"nodes": 2}, {"nodes": 1, "gpusPerNode": 0}],
        [{"nodes": 2, "gpusPerNode": 0}],
    ),
    ("OutputSpec", "pushMerged needs output.hub"): (
        [{"pushMerged": False}, {"pushMerged": True, "hub": HUB}],
        [{"pushMerged": True}],
    ),
    ("StorageSpec", "(an existing claim) or storage.ephemeral"): (
        [{"claimName": "shared"}, {"ephemeral": True}, {"claimName": "shared", "ephemeral": False}],
        [{"claimName": "shared", "ephemeral": True}],
    ),
    ("StorageSpec", "set storage.size and storage.storageClassName"): (
        [{"size": "10Gi", "storageClassName": "fast"}, {"claimName": "shared", "size": "50Gi"}],
        [{"claimName": "shared", "size": "10Gi"}, {"ephemeral": True, "storageClassName": "fast"}],
    ),
    ("FineTuneJobSpec", "earlyStoppingPatience needs evaluation data"): (
        [
            SPEC,
            {
                **SPEC,
                "dataset": {"id": "org/data", "validation": {"fraction": 0.1}},
                "training": {"earlyStoppingPatience": 2},
            },
        ],
        [{**SPEC, "training": {"earlyStoppingPatience": 2}}],
    ),
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def model_nodes() -> dict[type[BaseModel], dict[str, Any]]:
    """Each model of the spec and its node in the generated CRD schema."""
    out: dict[type[BaseModel], dict[str, Any]] = {}
    todo: list[tuple[type[BaseModel], dict[str, Any]]] = [(api.FineTuneJobSpec, SCHEMA["properties"]["spec"])]
    while todo:
        model, node = todo.pop()
        out[model] = node
        for name, field in model.model_fields.items():
            for child in _models_in(field.annotation):
                sub = node["properties"][field.alias or name]
                todo.append((child, sub["items"] if sub["type"] == "array" else sub))
    return out


def all_rules() -> list[tuple[type[BaseModel], api.Rule]]:
    models = [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, api._Model) and m.RULES]
    return [(m, r) for m in models for r in m.RULES]


def _samples(model: type[BaseModel], rule: api.Rule) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    keys = [k for k in RULE_SAMPLES if k[0] == model.__name__ and k[1] in rule.message]
    assert len(keys) == 1, f"{model.__name__}: {rule.message!r} has {len(keys)} entries in RULE_SAMPLES"
    return RULE_SAMPLES[keys[0]]


def _python_errors(model: type[BaseModel], doc: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    try:
        model.model_validate(copy.deepcopy(doc))
    except ValidationError as e:
        return [(tuple(err["loc"]), err["msg"].removeprefix("Value error, ")) for err in e.errors()]
    return []


def test_every_rule_has_samples_and_every_sample_a_rule() -> None:
    rules = all_rules()
    assert len(rules) == len(RULE_SAMPLES) >= 19
    for model, rule in rules:
        passing, failing = _samples(model, rule)
        assert passing and failing, rule.message
    # A rule two models share (a dataset source's, on DatasetPart and DatasetSource) is one rule.
    messages = list({id(r): r.message for _, r in rules}.values())
    assert len(set(messages)) == len(messages), "two rules say the same: a message must name its rule"


@pytest.mark.parametrize(("model", "rule"), all_rules(), ids=lambda x: getattr(x, "__name__", None))
def test_rule_cel_and_python_agree(model: type[BaseModel], rule: api.Rule) -> None:
    """The CRD's rule is the declared one, and on every sample the API server's CEL and the models'
    check give the same verdict and the same message (nothing else fails)."""
    node = model_nodes()[model]
    [entry] = [r for r in node.get("x-kubernetes-validations", []) if r["message"] == rule.message]
    assert entry["rule"] == rule.cel
    assert entry.get("fieldPath") == (f".{rule.field}" if rule.field else None)
    program = CEL.program(CEL.compile(rule.cel), functions=K8S_FUNCTIONS)
    passing, failing = _samples(model, rule)
    for doc in passing:
        assert bool(program.evaluate({"self": celpy.json_to_cel(doc)})), ("CEL refuses", doc)
        assert cel_failures(node, doc) == [], doc
        assert _python_errors(model, doc) == [], doc
        assert rule.holds(model.model_validate(copy.deepcopy(doc)))
    for doc in failing:
        assert not bool(program.evaluate({"self": celpy.json_to_cel(doc)})), ("CEL takes", doc)
        assert [msg for _, msg in cel_failures(node, doc)] == [rule.message], doc
        loc = (rule.field,) if rule.field else ()
        assert _python_errors(model, doc) == [(loc, rule.message)], doc
