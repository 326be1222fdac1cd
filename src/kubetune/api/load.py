"""Read FineTuneJobs from YAML and turn validation errors into `file:line: field.path: message`.

Light on purpose (PyYAML + pydantic only): `kubetune validate` in CI must start fast.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    HUB_ID_RE,
    INLINE_TOKEN_FIX,
    K8S_NAME_RE,
    KIND,
    QUANTITY_RE,
    FineTuneJob,
    find_inline_tokens,
)

Loc = tuple[str | int, ...]


@dataclass
class Document:
    """One YAML document, with the line of every key and list item in it."""

    file: str
    index: int
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    start_line: int = 1

    def line_of(self, loc: Loc) -> int:
        """The line of `loc`, or of its closest written parent (a missing field has no line)."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return self.start_line


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            out[child] = key.start_mark.line + 1
            _index_lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*loc, i)] = item.start_mark.line + 1
            _index_lines(item, (*loc, i), out)


def parse_yaml(text: str, file: str = "<stdin>") -> Iterator[Document]:
    """Every non-empty document of a (multi-document) YAML text. Raises yaml.YAMLError."""
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[Loc, int] = {}
            _index_lines(node, (), lines)
            data = loader.construct_document(node)
            if data is not None:
                yield Document(file, index, data, lines, node.start_mark.line + 1)
            index += 1
    finally:
        loader.dispose()


def is_finetunejob(doc: Document) -> bool:
    """Documents of other kinds (Secrets, kustomizations…) may live beside jobs; they are skipped."""
    data = doc.data
    if not isinstance(data, dict):
        return False
    api_version = str(data.get("apiVersion", ""))
    return data.get("kind") == KIND or api_version.startswith(GROUP + "/")


# ---------------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------------


def _model_fields_at(loc: Loc) -> list[str] | None:
    """The wire names of the fields of the model at `loc` (None when it is not a model)."""
    current: Any = FineTuneJob
    for part in loc:
        current = _descend(current, part)
        if current is None:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return None


def _descend(annotation: Any, part: str | int) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is not None and origin is not list and origin is not dict:  # Optional / Union
        for arg in args:
            found = _descend(arg, part)
            if found is not None:
                return found
        return None
    if origin is list:
        return args[0] if isinstance(part, int) else None
    if origin is dict:
        return args[1]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, f in annotation.model_fields.items():
            if (f.alias or name) == part:
                return f.annotation
    return None


# Regexes explained in words, with the fix.
_PATTERNS = {
    K8S_NAME_RE: "must be a lowercase DNS name: a-z, 0-9, '-' and '.', starting and ending with a letter "
    "or digit",
    QUANTITY_RE: "must be a Kubernetes quantity, e.g. 8, 500m, 64Gi",
    HUB_ID_RE: "must be a Hub id such as org/name",
}


def _message(err: Any) -> str:
    kind, loc, msg = err["type"], err["loc"], err["msg"]
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern")
        return f"{_PATTERNS.get(pattern, msg)} (got {err.get('input')!r})"
    if kind == "extra_forbidden":
        fields = _model_fields_at(loc[:-1]) or []
        unknown = str(loc[-1])
        hint = difflib.get_close_matches(unknown, fields, n=1, cutoff=0.6)
        if not hint:
            lowered = {f.lower(): f for f in fields}
            hint = [lowered[k] for k in difflib.get_close_matches(unknown.lower(), list(lowered), n=1)]
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known fields: {', '.join(fields)}"
        return f"unknown field '{unknown}'{suggestion}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("value_error", "assertion_error"):
        return str(msg).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "literal_error":
        return f"{msg} (got {err.get('input')!r})"
    return str(msg)


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<document>"


def describe(error: ValidationError) -> list[str]:
    """`field.path: message` for each problem, without a file (the operator's view of a bad object)."""
    return [f"{_path(tuple(err['loc']))}: {_message(err)}" for err in error.errors()]


def problems_from_error(doc: Document, error: ValidationError) -> list[Problem]:
    problems = []
    for err in error.errors():
        loc = tuple(err["loc"])
        problems.append(Problem(doc.file, doc.line_of(loc), _path(loc), _message(err)))
    return problems


def validate_document(doc: Document) -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate one FineTuneJob document."""
    data = doc.data
    if not isinstance(data, dict):
        return None, [Problem(doc.file, doc.start_line, "<document>", "expected a mapping (a FineTuneJob)")]
    if data.get("apiVersion") != API_VERSION:
        return None, [
            Problem(
                doc.file,
                doc.line_of(("apiVersion",)),
                "apiVersion",
                f"expected {API_VERSION!r}, got {data.get('apiVersion')!r}",
            )
        ]
    leaked = find_inline_tokens(data)
    if leaked:
        return None, [
            Problem(
                doc.file, doc.line_of(loc), _path(loc), "looks like a Hugging Face token: " + INLINE_TOKEN_FIX
            )
            for loc in leaked
        ]
    try:
        return FineTuneJob.model_validate(data), []
    except ValidationError as e:
        return None, problems_from_error(doc, e)


@dataclass
class Result:
    jobs: list[tuple[Document, FineTuneJob]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0
    files: int = 0


def yaml_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml") and q.is_file())
        else:
            yield p


def validate_paths(paths: Iterable[str | Path]) -> Result:
    """Validate every FineTuneJob in the given files and folders (recursively, *.yaml / *.yml)."""
    result = Result()
    for path in yaml_files(paths):
        result.files += 1
        name = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            result.problems.append(Problem(name, 0, "<file>", f"cannot read: {e.strerror}"))
            continue
        try:
            docs = list(parse_yaml(text, name))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            result.problems.append(Problem(name, line, "<yaml>", f"invalid YAML: {getattr(e, 'problem', e)}"))
            continue
        for doc in docs:
            if not is_finetunejob(doc):
                result.skipped += 1
                continue
            job, problems = validate_document(doc)
            result.problems += problems
            if job is not None:
                result.jobs.append((doc, job))
    return result


def load_job(path: str | Path) -> FineTuneJob:
    """Exactly one valid FineTuneJob from a file; raises InvalidJob naming every problem."""
    result = validate_paths([path])
    if result.problems:
        raise InvalidJob(result.problems)
    if len(result.jobs) != 1:
        raise InvalidJob(
            [Problem(str(path), 0, "<file>", f"expected one FineTuneJob, found {len(result.jobs)}")]
        )
    return result.jobs[0][1]


class InvalidJob(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))
