"""Generated files are never stale: the CRD (and the chart's copy), the JSON schema, the README reference
and the Argo CD patch (kubetune.api.generate), and the RBAC rules and the chart's values schema
(kubetune_operator.generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api import generate
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_operator import generate as operator_generate

ROOT = Path(__file__).resolve().parent.parent


def _all_outputs() -> dict[Path, str]:
    return {**generate.outputs(ROOT), **operator_generate.outputs(ROOT)}


@pytest.mark.parametrize("path", list(_all_outputs()), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_file_is_current(path: Path) -> None:
    expected = _all_outputs()[path]
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `make generate`"
    assert path.read_text() == expected, f"{path.relative_to(ROOT)} is stale: run `make generate`"


def test_no_stale_copy_of_the_crd_is_left() -> None:
    """kustomize reads the CRD from manifests/crd (../crd); only the chart keeps a copy."""
    copies = {p for p in ROOT.glob("**/kubetune.io_finetunejobs.yaml") if ".git" not in p.parts}
    assert {p.relative_to(ROOT) for p in copies} == {generate.CRD_PATH, *generate.CRD_COPIES}


def _walk(node: object, path: str = ""):  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_crd_schema_is_structural() -> None:
    """What the API server demands of a structural schema: a type on every node, no refs, unions or
    defaults (defaults are applied by the models, so the stored object stays as the user wrote it)."""
    schema = generate.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def check(node: dict, where: str) -> None:
        assert "type" in node, f"{where} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "default", "title"} & set(node), where
        for name, child in node.get("properties", {}).items():
            check(child, f"{where}.{name}")
        if "items" in node:
            check(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            check(node["additionalProperties"], f"{where}{{}}")

    check(schema, "<root>")


def test_crd_documents_every_spec_field() -> None:
    """`kubectl explain finetunejob.spec` shows a description for every field that has a docstring."""
    spec = generate.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name in ("model", "dataset", "method", "training", "resources", "output", "samples", "runPolicy"):
        assert spec["properties"][name]["description"], name
    lr = spec["properties"]["training"]["properties"]["learningRate"]
    assert lr["type"] == "number" and lr["minimum"] == 0 and lr["exclusiveMinimum"] is True
    assert "Default: 0.0002." in lr["description"]


def test_crd_carries_the_cross_field_rules_and_columns() -> None:
    crd = generate.crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    wide = {c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")}
    assert [c for c in columns if c not in wide] == [
        "State",
        "Phase",
        "Progress",
        "Loss",
        "ETA",
        "Reason",
        "Age",
    ]
    assert "Restarts" in wide  # `kubectl get ftj -o wide`
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    messages = [
        rule["message"] for _, node in _walk(spec) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert any("qlora needs 4-bit" in m for m in messages)
    assert any("not both" in m for m in messages)
    assert any("exactly one of model.id" in m for m in messages)
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]


def test_json_schema_accepts_the_examples_keys(root: Path) -> None:
    """The editor schema names the same fields as the models (by alias)."""
    schema = json.loads((root / generate.SCHEMA_PATH).read_text())
    spec_def = schema["$defs"]["FineTuneJobSpec"]
    assert set(spec_def["properties"]) == {
        f.alias or n
        for n, f in FineTuneJob.model_fields["spec"].annotation.model_fields.items()  # type: ignore[union-attr]
    }
    assert spec_def["additionalProperties"] is False
    assert '"cel"' not in json.dumps(schema)


def test_committed_crd_parses(root: Path) -> None:
    crd = yaml.safe_load((root / generate.CRD_PATH).read_text())
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"


def test_every_integer_is_int64_and_no_bound_is_past_it() -> None:
    """The API server refuses integers past int64 (`format: int64` says so in its error); a bound of
    2^63-1 would not survive its float64 reading of the schema, so there is none."""
    schema = generate.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    integers = [(p, n) for p, n in _walk(schema) if n.get("type") == "integer"]
    assert integers and all(n.get("format") == "int64" for _, n in integers)
    assert all(abs(n.get(k, 0)) < 2**53 for _, n in integers for k in ("minimum", "maximum"))


def test_the_reference_lists_every_value_format() -> None:
    readme = (ROOT / generate.README_PATH).read_text()
    for name in ("metadata.name", "quantity", "label value", "Hub repository id", "mount path"):
        assert f"| {name} | must " in readme, name
