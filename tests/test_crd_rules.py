"""The generated CRD enforces what the models enforce, checked without a cluster.

The OpenAPI part is checked with jsonschema (Draft 4 has OpenAPI v3.0's boolean exclusive bounds;
unknown fields fail, as under kubectl's strict server-side field validation), the CEL rules with
cel-python. The real API server runs these in the end-to-end tests of the operator.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from kubetune.api.generate import crd
from test_invalid import BASE, CASES

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
CEL = celpy.Environment()

# Rows of the invalid table that the API server rejects by other means, or only the models catch.
NOT_IN_CRD = {
    "wrong-api-version": "the API server serves only kubetune.io/v1alpha1",
    "bad-name": "the API server validates metadata.name itself",
    "inline-hf-token-anywhere": "a regex over every string is the models' job (operator and trainer)",
    "dataset-bad-file": "file types are checked by the models",
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
    return node


STRICT = _strict(SCHEMA)


def cel_failures(schema: dict[str, Any], obj: Any, path: str = "") -> list[tuple[str, str]]:
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            failures.append((path or "<root>", rule["message"]))
    if isinstance(obj, dict):
        for key, child in schema.get("properties", {}).items():
            if key in obj:
                failures += cel_failures(child, obj[key], f"{path}.{key}".lstrip("."))
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
