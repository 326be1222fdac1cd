"""The workspace: two distributions, one lock, and the operator's dependencies that cannot reach torch.

- kubetune (the CLI, API models, renderer, policy, wire contract; the trainer behind its `trainer`
  extra) and kubetune-operator (operator/), one uv workspace;
- uv.lock pins every package of both, and is fresh (`uv lock --check`, against PyPI);
- walking uv.lock from kubetune-operator (no extras) never reaches torch or the rest of the ML stack:
  "no torch in the operator" is a property of the dependency graph, not a habit;
- the operator's code imports nothing of the trainer, and the core imports the operator nowhere but
  in the `kubetune operator` alias, lazily.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "bitsandbytes", "accelerate", "peft", "trl", "datasets", "tokenizers"}


def lock() -> dict[str, dict[str, Any]]:
    packages = tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    return {p["name"]: p for p in packages}


def closure(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every package `name` (with `extras`) pulls in, by uv.lock's resolution, markers ignored (a
    dependency on any platform counts)."""
    packages = lock()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(name, extras)]
    while todo:
        current, wanted = todo.pop()
        package = packages[current]
        deps = list(package.get("dependencies", []))
        for extra in wanted:
            deps += package.get("optional-dependencies", {}).get(extra, [])
        for dep in deps:
            key = (dep["name"], tuple(dep.get("extra", ())))
            if key not in seen:
                seen.add(key)
                todo.append(key)
    return {dep for dep, _ in seen}


def test_one_workspace_two_distributions() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    operator = tomllib.loads((ROOT / "operator" / "pyproject.toml").read_text())
    assert root["tool"]["uv"]["workspace"]["members"] == ["operator"]
    assert (root["project"]["name"], operator["project"]["name"]) == ("kubetune", "kubetune-operator")
    assert root["project"]["version"] == operator["project"]["version"]
    # The operator needs the core at exactly its own version: they are released together.
    assert f"kubetune=={root['project']['version']}" in operator["project"]["dependencies"]
    assert operator["tool"]["uv"]["sources"]["kubetune"] == {"workspace": True}


def test_the_operators_dependencies_cannot_reach_torch() -> None:
    reached = closure("kubetune-operator")
    assert {"kubetune", "kubernetes", "prometheus-client", "pydantic"} <= reached
    assert not reached & HEAVY, reached & HEAVY
    assert not any(name.startswith(("nvidia-", "cuda-")) for name in reached), sorted(reached)
    # ... while the trainer extra does reach it: the walk would see it.
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= closure("kubetune", ("trainer",))


def test_pydantic_is_pinned_to_the_version_that_generates_the_schema() -> None:
    """The CRD, the JSON schema and the reference are generated with pydantic; another version may
    word or order them differently, so the pin, the lock and the environment agree."""
    import pydantic

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if d.startswith("pydantic")]
    assert pin == f"pydantic=={lock()['pydantic']['version']}"
    assert pin == f"pydantic=={pydantic.VERSION}", "the venv is stale: make setup"


def _imports(folder: Path) -> dict[str, set[str]]:
    """Module-level and function-level imports of each file under `folder`."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_operator_imports_nothing_of_the_trainer() -> None:
    for path, names in _imports(ROOT / "operator" / "src" / "kubetune_operator").items():
        bad = {n for n in names if n.split(".")[0] in HEAVY or n.startswith("kubetune.trainer")}
        assert not bad, f"{path} imports {sorted(bad)}"


def test_the_core_never_imports_the_operator_but_lazily_in_its_alias() -> None:
    for path, names in _imports(ROOT / "src" / "kubetune").items():
        uses = {n for n in names if n.split(".")[0] == "kubetune_operator"}
        if path == "src/kubetune/cli.py":
            assert uses == {"kubetune_operator.cli"}
            tree = ast.parse((ROOT / path).read_text())
            top = [
                n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "kubetune_operator.cli"
            ]
            assert not top, "the alias imports the operator only when it runs"
        else:
            assert not uses, f"{path} imports {sorted(uses)}"


def test_the_operator_runs_from_its_own_entry_point() -> None:
    script = Path(sys.executable).with_name("kubetune-operator")
    assert script.exists(), "make setup installs both packages of the workspace"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=True)
    assert "--leader-elect" in out.stdout
    alias = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "operator", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert alias.stdout.replace("kubetune operator", "kubetune-operator") == out.stdout


def test_the_lock_is_fresh() -> None:
    """uv.lock matches both pyproject.toml files (`make lock` after editing a dependency)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (make setup installs it)")
    proc = subprocess.run(
        [uv, "lock", "--check", "--project", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    assert proc.returncode == 0, f"uv.lock is stale; run `make lock`\n{proc.stderr[-2000:]}"
