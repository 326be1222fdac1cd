"""Write what the chart and the kustomize manifests take from this package (`make generate`): the RBAC
rules (rbac.py) and the chart's values schema (values.py). tests/test_chart.py fails when one is stale."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.generate import write_files
from kubetune_operator import rbac, values


def outputs(root: Path) -> dict[Path, str]:
    """Every generated file and the content it must have."""
    return {**rbac.outputs(root), root / values.SCHEMA_PATH: values.render_values_schema()}


def write_all(root: Path) -> list[Path]:
    return write_files(outputs(root))


if __name__ == "__main__":
    for p in write_all(Path.cwd()):
        print(f"wrote {p}")
