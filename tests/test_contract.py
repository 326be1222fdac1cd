"""kubetune.contract is the one place that spells the wire contract: labels, annotations, the KUBETUNE_*
environment, mount paths. The renderer, launcher, trainer, CLI and operator import it; a copy of one of
its strings in their code (docstrings and comments may name them) fails here, so copies cannot creep
back and drift."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune import contract

ROOT = Path(__file__).resolve().parent.parent
# The code on either side of the contract (the API models are the API, with its own defaults).
SCANNED = [
    ROOT / "src/kubetune/cli.py",
    ROOT / "src/kubetune/render.py",
    ROOT / "src/kubetune/launch.py",
    ROOT / "src/kubetune/policy.py",
    ROOT / "src/kubetune/trainer",
    ROOT / "operator/src/kubetune_operator",
]
# No string in that code may contain one of these ...
FRAGMENTS = (
    "kubetune.io/",
    "KUBETUNE_",
    contract.SPEC_MOUNT,
    contract.WORKSPACE_MOUNT,
    contract.LABEL_MANAGED_BY,
    contract.TERMINATION_LOG,
    contract.SHM_MOUNT,
    "kueue.x-k8s.io/",
    contract.ANNOTATION_COMPLETION_INDEX,
)
# ... or be one of these.
WHOLE = (contract.ENV_HF_TOKEN, contract.ENV_COMPLETION_INDEX)


def sources() -> Iterator[Path]:
    for path in SCANNED:
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions, and of the string right after
    an assignment (the attribute docstrings of the API models and dataclasses)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
                continue
            if i == 0 or isinstance(body[i - 1], (ast.Assign, ast.AnnAssign)):
                out.add(id(stmt.value))
    return out


def copies(path: Path) -> list[str]:
    """`path:line: 'string'` for every string in the code of `path` that copies the contract."""
    tree = ast.parse(path.read_text(), str(path))
    skip = docstrings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        text = node.value
        if any(f in text for f in FRAGMENTS) or text in WHOLE:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            found.append((node.lineno, f"{where}:{node.lineno}: {text!r}"))
    return [hit for _, hit in sorted(found)]


def test_the_wire_contract_is_spelled_only_in_kubetune_contract() -> None:
    scanned = list(sources())
    assert len(scanned) > 20 and all(p.is_file() for p in scanned)  # the trees moved: fix SCANNED
    found = [hit for path in scanned for hit in copies(path)]
    assert not found, "import these from kubetune.contract instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("code", "hits"),
    [
        ('ENV = "KUBETUNE_SPEC"', 1),
        ('def f() -> str:\n    return f"{x}/etc/kubetune/job.yaml"', 1),  # inside an f-string
        ('labels = {"app.kubernetes.io/managed-by": "kubetune"}', 1),
        ('token = env.get("HF_TOKEN")', 1),
        ('"""Mounted at /etc/kubetune; reads $KUBETUNE_SPEC."""\nx = 1', 0),  # a docstring
        ('def f() -> None:\n    """Sets KUBETUNE_RUN."""', 0),
        ("x = 1  # KUBETUNE_RUN, /workspace", 0),  # a comment
        ('x: int = 1\n"""The /workspace folder."""', 0),  # an attribute docstring
        ('msg = "the HF_TOKEN variable is not set"', 0),  # a sentence that names it
    ],
)
def test_the_scan_finds_copies_in_code_not_in_prose(tmp_path: Path, code: str, hits: int) -> None:
    path = tmp_path / "code.py"
    path.write_text(code + "\n")
    assert len(copies(path)) == hits, copies(path)


def test_every_environment_variable_is_named_once() -> None:
    envs = {k: v for k, v in vars(contract).items() if k.startswith("ENV_") and isinstance(v, str)}
    assert len(set(envs.values())) == len(envs)
    ours = {k for k, v in envs.items() if v.startswith("KUBETUNE_")}
    assert set(envs) - ours == {"ENV_HF_TOKEN", "ENV_COMPLETION_INDEX"}  # Hugging Face's, Kubernetes'
