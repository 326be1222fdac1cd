"""Read FineTuneJobs from YAML as `kubectl apply` would send them, and turn every problem into
`file:line: field.path: message`.

Light on purpose (PyYAML + pydantic only): `kubetune validate` in CI must start fast. The YAML reading
itself (values as kubectl resolves them, tags, limits) is kubetune.api.kyaml; this module walks paths,
finds the objects and validates them.

The files it reads are written by anyone, so the loader is hardened; no input makes it raise, run away
or print a secret:

- **Text**: UTF-8 (a UTF-8 byte-order mark is fine). Anything else is ``not UTF-8 (found …)``, with
  what was found: a UTF-16/UTF-32 byte-order mark, a Latin-1 byte, NUL bytes between characters.
  Control characters (NUL…) are refused with their line, as YAML refuses them.
- **Values as kubectl sends them**: kubectl turns YAML into JSON with sigs.k8s.io/yaml, which resolves
  plain scalars with go-yaml v2's rules, not PyYAML's. So here too: ``2e-4`` is a number, ``y`` / ``n``
  / ``on`` / ``off`` are booleans, ``0o17`` and ``1_000`` are integers, ``1:30`` and ``2024-01-01`` stay
  text (JSON has no timestamps), an integer past 64 bits is a float, ``1e400`` stays text, mapping keys
  become strings (``1`` → ``"1"``, ``yes`` → ``"true"``), merge keys (``<<``) merge as go-yaml v2 does.
- **Tags**: only those that mean something in JSON: ``!!str``, ``!!int``, ``!!float``, ``!!bool``,
  ``!!null``, ``!!binary`` (decoded, as go-yaml decodes it), ``!!map``, ``!!seq``, and each only on a
  value it fits. kubectl silently drops any other tag (``!!timestamp``, ``!!set``, ``!foo``): the value
  the API server gets is then not what the file seems to say, so those are errors here.
- **Structure**: duplicate keys are errors (naming both lines); so are keys that are mappings, lists
  or null.
- **Limits**: a document larger, as JSON, than the 3 MiB the API server accepts in one request
  (kube-apiserver ``--max-request-bytes``, default 3145728); aliases that expand past go-yaml's own
  budget (its ``excessive aliasing`` ratio, so a billion-laughs file answers at once); an alias inside
  its own anchor; nesting deeper than 100 levels (a FineTuneJob is about 8 deep, and nothing here
  recurses per level anyway); files over 16 MiB (ours: a bound on time and memory).
- **Paths**: a missing path, an unreadable file or folder, a broken link, a folder without YAML and
  an empty file are each an error naming the path; nothing is skipped silently.
- **Lists**: the items of a ``v1 List`` (any ``kind: …List`` with ``items``) are validated one by one,
  each located as ``items[3].spec…``.
- **Secrets**: the token scan runs before anything can echo a value, and every message is redacted
  (:func:`kubetune.redact.redact`) where it is made, in :class:`Problem`.
- **No traceback**: an unexpected exception becomes a problem that says ``internal error … please
  report it``, for that file or object only.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from kubetune.api import v1alpha1 as api
from kubetune.api.kyaml import (
    MAX_FILE_BYTES,
    MAX_REQUEST_BYTES,
    REPORT,
    YAML_SUFFIXES,
    Document,
    Fatal,
    Loc,
    Problem,
    decode,
    field_path,
    parse_yaml,
    resolve_plain,
    shown,
)
from kubetune.api.v1alpha1 import API_VERSION, GROUP, KIND, TOKEN_MESSAGE, FineTuneJob
from kubetune.redact import find_tokens, redact

# ---------------------------------------------------------------------------------------------------
# Validation messages
# ---------------------------------------------------------------------------------------------------


def is_finetunejob(doc: Document | Any) -> bool:
    """Documents of other kinds (Secrets, kustomizations…) may live beside jobs; they are skipped."""
    data = doc.data if isinstance(doc, Document) else doc
    if not isinstance(data, dict):
        return False
    api_version = data.get("apiVersion", "")
    return data.get("kind") == KIND or (isinstance(api_version, str) and api_version.startswith(GROUP + "/"))


def _is_list(data: Any) -> bool:
    kind = data.get("kind") if isinstance(data, dict) else None
    return isinstance(kind, str) and kind.endswith("List") and "items" in data


def _model_fields_at(loc: Loc) -> list[str] | None:
    """The wire names of the fields of the model at `loc` (None when it is not a model)."""
    current: Any = FineTuneJob
    for part in loc:
        current = _descend(current, part)
        if current is None:
            return None
    model = _model_in(current)
    return None if model is None else [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: itself, or the model inside `Annotated[...]` / `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, dict):
        return None
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _descend(annotation: Any, part: str | int) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _descend(args[0], part)
    if origin is not None and origin is not list and origin is not dict:  # Optional / Union / Literal
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


def _type_hint(kind: str, value: Any) -> str:
    """What was found instead of the type wanted, and the fix."""
    got = api.kind_of(value)
    if isinstance(value, str) and kind in ("int_type", "float_type", "bool_type", "int_parsing"):
        resolved, _ = resolve_plain(value.strip())
        if resolved in ("int", "float", "bool"):
            return f" (got the string {shown(value)}: remove the quotes)"
    if kind == "string_type" and isinstance(value, int | float | bool):
        return f" (got {got} {shown(value)}: quote it)"
    if isinstance(value, list | dict):
        return f" (got {got})"
    return f" (got {got} {shown(value)})"


_TYPE_ERRORS = {
    "int_type",
    "int_parsing",
    "int_from_float",
    "float_type",
    "float_parsing",
    "bool_type",
    "bool_parsing",
    "string_type",
    "dict_type",
    "list_type",
    "model_type",
    "model_attributes_type",
    "finite_number",
}


def _message(err: Any) -> str:
    kind, loc, msg = err["type"], err["loc"], err["msg"]
    if kind == "extra_forbidden":
        fields = _model_fields_at(tuple(loc[:-1])) or []
        unknown = str(loc[-1])
        hint = difflib.get_close_matches(unknown, fields, n=1, cutoff=0.6)
        if not hint:
            lowered = {f.lower(): f for f in fields}
            hint = [lowered[k] for k in difflib.get_close_matches(unknown.lower(), list(lowered), n=1)]
        suggestion = (
            f"; did you mean '{hint[0]}'?"
            if hint
            else f"; known fields: {', '.join(fields)}"
            if fields
            else ""
        )
        return f"unknown field {shown(unknown, 66)}{suggestion}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("value_error", "assertion_error"):
        return str(msg).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "literal_error":
        return f"{msg} (got {shown(err.get('input'))})"
    if kind in _TYPE_ERRORS:
        return f"{msg}{_type_hint(kind, err.get('input'))}"
    return str(msg)


def describe(error: ValidationError, prefix: Loc = ()) -> list[str]:
    """`field.path: message` for each problem, without a file (the operator's view of a bad object)."""
    return [redact(f"{field_path((*prefix, *err['loc']))}: {_message(err)}") for err in error.errors()]


def problems_from_error(doc: Document, error: ValidationError, prefix: Loc = ()) -> list[Problem]:
    problems = []
    for err in error.errors():
        loc = (*prefix, *err["loc"])
        problems.append(Problem(doc.file, doc.line_of(loc), field_path(loc), _message(err)))
    return problems


def _internal(file: str, line: int, path: str, error: BaseException, what: str) -> Problem:
    # The exception's text may hold input: only its type is shown.
    return Problem(
        file, line, path, f"internal error ({type(error).__name__}) while checking {what}; {REPORT}"
    )


def validate_document(
    doc: Document, loc: Loc = (), data: Any = None, *, check_model: bool = True
) -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate one FineTuneJob: the document's root, or the object at `loc` (a List's item)."""
    data = doc.data if not loc and data is None else data
    if not isinstance(data, dict):
        return None, [
            Problem(doc.file, doc.line_of(loc), field_path(loc), "expected a mapping (a FineTuneJob)")
        ]
    # First, before anything can echo a value: a token anywhere, keys and bytes and base64 included.
    leaked = find_tokens(data, loc)
    if leaked:
        return None, [Problem(doc.file, doc.line_of(at), field_path(at), TOKEN_MESSAGE) for at in leaked]
    if not check_model:
        return None, []
    if data.get("apiVersion") != API_VERSION:
        at = (*loc, "apiVersion")
        return None, [
            Problem(
                doc.file,
                doc.line_of(at),
                field_path(at),
                f"expected {API_VERSION!r}, got {shown(data.get('apiVersion'))}: "
                f"set apiVersion: {API_VERSION}",
            )
        ]
    try:
        return FineTuneJob.model_validate(data), []
    except ValidationError as e:
        return None, problems_from_error(doc, e, loc)


def _objects(doc: Document, problems: list[Problem]) -> Iterator[tuple[Loc, Any]]:
    """The objects of a document: itself, or the items of a List (Lists in Lists too)."""
    todo: list[tuple[Loc, Any]] = [((), doc.data)]
    while todo:
        loc, data = todo.pop(0)
        if _is_list(data):
            items = data.get("items")
            if items is None:
                continue
            if not isinstance(items, list):
                at = (*loc, "items")
                problems.append(
                    Problem(
                        doc.file,
                        doc.line_of(at),
                        field_path(at),
                        f"a List's items must be a list, not {api.kind_of(items)}",
                    )
                )
                continue
            todo[0:0] = [((*loc, "items", i), item) for i, item in enumerate(items)]
        else:
            yield loc, data


# ---------------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------------


@dataclass
class Result:
    jobs: list[tuple[Document, FineTuneJob]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: int = 0
    files: int = 0


def _strerror(e: OSError) -> str:
    return (e.strerror or type(e).__name__).lower()


# Seams for the tests (root reads everything, so "permission denied" is simulated there).
_open_file = open
_scandir = os.scandir


def _walk(folder: Path, problems: list[Problem]) -> list[Path]:
    """Every *.yaml / *.yml file under `folder` (following links, each folder once), and a problem for
    each folder that cannot be read and each broken link."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    todo = [folder]
    while todo:
        current = todo.pop()
        try:
            st = current.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with _scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append(
                Problem(
                    str(current),
                    0,
                    "<file>",
                    f"cannot read folder: {_strerror(e)}: make it readable, or leave it out",
                )
            )
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    todo.append(path)
                elif entry.is_symlink() and not path.exists():
                    target = os.readlink(path)
                    problems.append(
                        Problem(
                            str(path),
                            0,
                            "<file>",
                            f"broken symbolic link (to {shown(target, 80)}): fix it or remove it",
                        )
                    )
                elif entry.name.endswith(YAML_SUFFIXES):
                    if entry.is_file():
                        found.append(path)
                    else:
                        problems.append(
                            Problem(
                                str(path),
                                0,
                                "<file>",
                                "not a regular file: remove it, or rename it so it does not end in .yaml",
                            )
                        )
            except OSError as e:
                problems.append(Problem(str(path), 0, "<file>", f"cannot read: {_strerror(e)}"))
    return sorted(found, key=str)


def _read(path: Path | None, name: str, stdin: IO[bytes] | None) -> bytes:
    """The bytes of a file (None: standard input), at most MAX_FILE_BYTES of them."""
    too_big = Fatal(
        Problem(
            name,
            0,
            "<file>",
            f"over {MAX_FILE_BYTES // 1048576} MiB, the most kubetune validate reads from one file: split "
            f"it (the API server takes each object up to {MAX_REQUEST_BYTES // 1048576} MiB)",
        )
    )
    try:
        if path is None:
            data = (stdin if stdin is not None else sys.stdin.buffer).read(MAX_FILE_BYTES + 1)
        else:
            with _open_file(path, "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISREG(st.st_mode) and st.st_size > MAX_FILE_BYTES:
                    raise too_big
                data = f.read(MAX_FILE_BYTES + 1)  # a pipe or a device may hold more than it says
    except OSError as e:
        raise Fatal(
            Problem(name, 0, "<file>", f"cannot read: {_strerror(e)}: make it readable, or leave it out")
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise too_big
    return data


def _targets(paths: Iterable[str | Path], problems: list[Problem]) -> Iterator[Path | None]:
    """The files to read (None: standard input), with a problem for each path that gives none."""
    for given in paths:
        if str(given) == "-":
            yield None
            continue
        p = Path(given)
        try:
            if p.is_dir():
                before = len(problems)
                files = _walk(p, problems)
                if not files and len(problems) == before:
                    problems.append(
                        Problem(
                            str(p),
                            0,
                            "<file>",
                            "no .yaml or .yml file in this folder: pass the files, "
                            "or the folder that holds them",
                        )
                    )
                yield from files
            elif p.exists():
                yield p
            elif p.is_symlink():
                problems.append(
                    Problem(
                        str(p),
                        0,
                        "<file>",
                        f"broken symbolic link (to {shown(os.readlink(p), 80)}): fix it or remove it",
                    )
                )
            else:
                problems.append(Problem(str(p), 0, "<file>", "no such file or folder: check the path"))
        except OSError as e:
            problems.append(Problem(str(p), 0, "<file>", f"cannot read: {_strerror(e)}"))


def validate_bytes(data: bytes, name: str, result: Result | None = None) -> Result:
    """Validate every FineTuneJob in the bytes of one YAML file named `name`."""
    result = Result() if result is None else result
    documents = 0
    try:
        text = decode(data, name)
        docs = parse_yaml(text, name)
        for doc in docs:
            documents += 1
            _validate_doc(doc, result)
    except Fatal as e:
        result.problems.append(e.problem)
        return result
    except Exception as e:  # the last net: a problem, never a traceback
        result.problems.append(_internal(name, 0, "<file>", e, "this file"))
        return result
    if documents == 0:
        result.problems.append(
            Problem(
                name,
                0,
                "<file>",
                "no YAML document in this file (it is empty, or only comments): "
                "write a FineTuneJob in it, or remove it",
            )
        )
    return result


def _validate_doc(doc: Document, result: Result) -> None:
    result.problems += doc.problems
    if doc.data is None:
        return
    objects = list(_objects(doc, result.problems))
    for loc, data in objects:
        line, path = doc.line_of(loc), field_path(loc)
        if not isinstance(data, dict):
            result.problems.append(
                Problem(
                    doc.file,
                    line,
                    path,
                    f"not a Kubernetes object: this is {api.kind_of(data)}; a "
                    "FineTuneJob is a mapping with apiVersion, kind, metadata and spec",
                )
            )
            continue
        if not is_finetunejob(data):
            result.skipped += 1
            continue
        try:
            job, problems = validate_document(doc, loc, data, check_model=not doc.problems)
        except Exception as e:  # the last net, for this object only
            result.problems.append(_internal(doc.file, line, path, e, "this object"))
            continue
        result.problems += problems
        if job is not None:
            result.jobs.append((doc, job))


def yaml_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The YAML files the given files and folders name (problems with them are dropped: see
    :func:`validate_paths`)."""
    yield from (p for p in _targets(paths, []) if p is not None)


def validate_paths(paths: Iterable[str | Path], stdin: IO[bytes] | None = None) -> Result:
    """Validate every FineTuneJob in the given files and folders (recursively, *.yaml / *.yml);
    ``-`` reads standard input."""
    result = Result()
    for path in _targets(paths, result.problems):
        result.files += 1
        name = "<stdin>" if path is None else str(path)
        try:
            data = _read(path, name, stdin)
        except Fatal as e:
            result.problems.append(e.problem)
            continue
        validate_bytes(data, name, result)
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
