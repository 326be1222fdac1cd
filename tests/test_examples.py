"""Every shipped example validates, and renders to exactly its golden file.

Regenerate the golden files after an intended change with `make generate` (UPDATE_GOLDEN=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.api.load import load_job
from kubetune.render import render, to_yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))
GOLDEN = ROOT / "tests" / "golden"
# What the operator knows and `kubetune render` does not: the namespace and the owner's uid.
NAMESPACE = "ml-team"
UID = "7b3c1d2e-0000-4000-8000-000000000001"


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"falcon-7b-guanaco-qlora.yaml", "llama-2-7b-autotrain.yaml", "bloom-lora.yaml"} <= names
    assert "tiny-local.yaml" in names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_renders_to_golden(example: Path) -> None:
    job = load_job(example)
    job.metadata.namespace = NAMESPACE
    job.metadata.uid = UID
    rendered = to_yaml(render(job))
    golden = GOLDEN / f"{example.stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"no golden file for {example.name}: run `make generate`"
    assert rendered == golden.read_text(), f"{golden.name} differs: review, then `make generate`"


def test_no_golden_file_without_an_example() -> None:
    assert {p.stem for p in GOLDEN.glob("*.yaml")} == {p.stem for p in EXAMPLES}
