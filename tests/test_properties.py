"""Property tests: random mutations of the shipped examples never crash `kubetune validate`, never
get a token past it or out of it, and always get an answer in bounded time.

Mutations of the text (byte flips, inserted / deleted / swapped lines, values swapped for odd scalars:
tokens plain, base64 and !!binary, quoted numbers, aliases, tags, huge numbers, unicode, deep nesting)
and of the parsed structure (subtrees replaced, keys added, token-valued or token-named ones too, Lists).

Profiles (HYPOTHESIS_PROFILE): "ci" (the default: short and derandomized, part of every `pytest` run)
and "long" (`make fuzz`: FUZZ_EXAMPLES examples per test, random, its database in .hypothesis/).
The count of mutations run, crashes and leaks is written to .hypothesis/fuzz-summary.txt and shown at
the end of the run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import string
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from kubetune.api.load import Result, validate_bytes, validate_paths
from kubetune.cli import main
from kubetune.redact import contains_token, find_tokens

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = Path(os.environ.get("FUZZ_SUMMARY", ROOT / ".hypothesis" / "fuzz-summary.txt"))

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
# The deadline is the bound on one answer (a loaded 2-core CI machine included), not a benchmark.
settings.register_profile(
    "ci",
    max_examples=500,
    deadline=timedelta(seconds=10),
    derandomize=True,
    database=None,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    deadline=timedelta(seconds=10),
    database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples")),
    suppress_health_check=_HEALTH,
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SEEDS = {p.name: p.read_bytes() for p in sorted((ROOT / "jobs").glob("*.yaml"))}
STATS: Counter[str] = Counter()

# ---------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------

ALNUM = string.ascii_letters + string.digits
tokens = st.builds(
    lambda prefix, body: prefix + body,
    st.sampled_from(["hf_", "api_org_"]),
    st.text(alphabet=ALNUM, min_size=20, max_size=40),
)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


token_scalars = st.one_of(
    tokens,
    tokens.map(lambda t: json.dumps(t)),
    tokens.map(lambda t: f"'{t}'"),
    tokens.map(_b64),
    tokens.map(lambda t: "!!binary " + _b64(t)),
    tokens.map(lambda t: "!!binary " + _b64("x" + t + "\x00\xff")),
    tokens.map(lambda t: _b64(_b64(t))),
    tokens.map(lambda t: f"https://user:{t}@example.com/x"),
    tokens.map(lambda t: f"Bearer {t}"),
    tokens.map(lambda t: f"!{t} x"),
    tokens.map(lambda t: f"*{t}"),
    tokens.map(lambda t: f"{{{t}: 1}}"),
)
numbers = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: f'"{n}"'),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "9" * 30,
            "9" * 5000,
            "1e400",
            "-1e400",
            ".inf",
            "-.inf",
            ".nan",
            "0x" + "f" * 20,
            "0o777",
            "0b101",
            "08",
            "1_000",
            "1:30",
            "2e-4",
            "'2e-4'",
            "9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "2024-01-01",
            "2024-01-01T00:00:00Z",
        ]
    ),
)
words = st.sampled_from(["y", "n", "yes", "no", "on", "off", "True", "~", "null", "", "''", '""', "<<", "="])
tags = st.sampled_from(
    [
        "!!bool maybe",
        "!!float abc",
        "!!int 1.5",
        "!!null x",
        "!!timestamp 2024-01-01",
        "!foo x",
        "!!python/object:os.system x",
        "!!python/object/apply:os.system [echo]",
        "!!set {a, b}",
        "!!omap [a: 1]",
        "!!binary aGVsbG8=",
        "!!binary not*base64",
        "!!str 5",
        "!!map {}",
        "!!seq []",
        "! 5",
        "!<tag:yaml.org,2002:str> x",
        "!!merge <<",
    ]
)
aliases = st.sampled_from(["*a", "&a x", "&a [*a]", "&a {b: *a}", "*undefined", "{<<: *a}", "{<<: 5}", "&a"])
nesting = st.integers(min_value=1, max_value=400).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "[" * n, "- " * n + "x"])
)
unicode = st.one_of(
    st.text(max_size=30),
    st.text(max_size=30).map(json.dumps),
    st.sampled_from(["\ufeff", "\u202e", "\x1b[2J", "\x00", "\t", "\r", "\u2028", "é", "😀", "\ud7ff"]),
)
syntax = st.sampled_from(
    ["- ", ": ", "#", "|", ">", "---", "...", "%YAML 1.1", "? ", "[", "{", "'", '"', "\\"]
)
odd_scalars = st.one_of(token_scalars, numbers, words, tags, aliases, nesting, unicode, syntax)
odd_bytes = st.one_of(
    odd_scalars.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=16),
    st.sampled_from([b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf", b"\xe9", b"\x00", b"\xc3", b"\n"]),
)

FIELD_NAMES = [
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "model",
    "dataset",
    "training",
    "method",
    "output",
    "hub",
    "token",
    "secretKeyRef",
    "labels",
    "annotations",
    "items",
    "<<",
    "learningRate",
    "epochs",
    "maxSteps",
]
keys = st.one_of(st.sampled_from(FIELD_NAMES), tokens, st.text(max_size=12), tokens.map(_b64))
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=20),
        tokens,
        tokens.map(_b64),
    ),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)


def _splice(data: bytes, at: int, remove: int, insert: bytes) -> bytes:
    return data[:at] + insert + data[at + remove :]


@st.composite
def text_mutations(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A shipped example with 1-4 text mutations."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = SEEDS[name]
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        lines = data.split(b"\n")
        op = draw(
            st.sampled_from(["flip", "insert", "delete", "line", "drop", "dup", "value", "swap", "cut"])
        )
        at = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        row = draw(st.integers(min_value=0, max_value=max(len(lines) - 1, 0)))
        if op == "flip" and data:
            data = _splice(data, at, 1, bytes([draw(st.integers(min_value=0, max_value=255))]))
        elif op == "insert":
            data = _splice(data, at, 0, draw(odd_bytes))
        elif op == "delete":
            data = _splice(data, at, draw(st.integers(min_value=1, max_value=40)), b"")
        elif op == "line":
            indent = b" " * draw(st.sampled_from([0, 2, 4, 6, 8]))
            key = draw(keys).encode("utf-8", "surrogatepass")
            lines.insert(row, indent + key + b": " + draw(odd_bytes))
            data = b"\n".join(lines)
        elif op == "drop" and lines:
            del lines[row]
            data = b"\n".join(lines)
        elif op == "dup" and lines:
            lines.insert(row, lines[row])
            data = b"\n".join(lines)
        elif op == "value":
            valued = [i for i, line in enumerate(lines) if b": " in line]
            if valued:
                i = draw(st.sampled_from(valued))
                head = lines[i].split(b": ", 1)[0]
                lines[i] = head + b": " + draw(odd_scalars).encode("utf-8", "surrogatepass")
                data = b"\n".join(lines)
        elif op == "swap" and len(lines) > 1:
            other = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[row], lines[other] = lines[other], lines[row]
            data = b"\n".join(lines)
        elif op == "cut":
            data = data[:at]
    return data, [name]


def _paths(node: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield loc
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*loc, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*loc, i))


def _get(node: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        node = node[part]
    return node


@st.composite
def structure_mutations(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A shipped example, parsed, with 1-3 subtrees replaced, keys added or dropped, or put in a List."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    doc: Any = yaml.safe_load(SEEDS[name])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["replace", "add", "drop", "list"]))
        loc = draw(st.sampled_from(list(_paths(doc))))
        if op == "replace":
            if loc:
                _get(doc, loc[:-1])[loc[-1]] = draw(json_values)
            else:
                doc = draw(json_values)
        elif op == "add":
            target = _get(doc, loc)
            if isinstance(target, dict):
                target[draw(keys)] = draw(json_values)
            elif isinstance(target, list):
                target.append(draw(json_values))
        elif op == "drop" and loc:
            parent = _get(doc, loc[:-1])
            del parent[loc[-1]]
        elif op == "list":
            doc = {"apiVersion": "v1", "kind": "List", "items": [doc, draw(json_values)]}
    if draw(st.booleans()):
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), sort_keys=draw(st.booleans()))
    else:
        text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass"), [name]


mutations = st.one_of(text_mutations(), structure_mutations())

# ---------------------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------------------

PROBLEM_LINE = re.compile(r"(?P<file>.+?):(?P<line>\d+): (?P<path>.+?): (?P<message>.+)")


def _check_output(text: str) -> None:
    """Nothing printed holds a token (plain, base64, bytes), a traceback or a crash."""
    if "Traceback" in text or "internal error" in text:
        STATS["crashes"] += 1
        raise AssertionError(f"crash: {text[-2000:]}")
    for line in text.splitlines():
        if contains_token(line):
            STATS["leaks"] += 1
            raise AssertionError(f"leak: {line}")


def _check_result(result: Result, name: str) -> None:
    for problem in result.problems:
        text = str(problem)
        assert PROBLEM_LINE.fullmatch(text) and text.startswith(f"{problem.file}:"), text
        assert problem.file == name or problem.file.startswith(name), text
        _check_output(text)
    for _, job in result.jobs:
        # What passes carries no token anywhere (unknown metadata kept as it is included).
        dumped = job.model_dump(mode="json", by_alias=True)
        if find_tokens(dumped) or contains_token(json.dumps(dumped)):
            STATS["leaks"] += 1
            raise AssertionError(f"a token got through in {name}")


def _validate(data: bytes, name: str = "mutant.yaml") -> Result:
    STATS["mutations"] += 1
    try:
        result = validate_bytes(data, name)
    except BaseException:
        STATS["crashes"] += 1
        raise
    STATS["problems"] += len(result.problems)
    STATS["valid jobs"] += len(result.jobs)
    return result


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    summary = (
        f"fuzz ({os.environ.get('HYPOTHESIS_PROFILE', 'ci')} profile): {STATS['mutations']} mutations, "
        f"{STATS['crashes']} crashes, {STATS['leaks']} leaks "
        f"({STATS['problems']} problems reported, {STATS['valid jobs']} mutated jobs still valid)"
    )
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(summary + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown with or without -s
            reporter.write_line("\n" + summary)


@settings(PROFILE)
@given(text_mutations())
def test_text_mutations_never_crash_or_leak(mutant: tuple[bytes, list[str]]) -> None:
    data, _ = mutant
    _check_result(_validate(data), "mutant.yaml")


@settings(PROFILE)
@given(structure_mutations())
def test_structure_mutations_never_crash_or_leak(mutant: tuple[bytes, list[str]]) -> None:
    data, _ = mutant
    _check_result(_validate(data), "mutant.yaml")


@settings(PROFILE)
@given(st.lists(odd_bytes, min_size=1, max_size=12))
def test_odd_fragments_alone_never_crash_or_leak(parts: list[bytes]) -> None:
    _check_result(_validate(b"\n".join(parts)), "mutant.yaml")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(PROFILE, max_examples=max(PROFILE.max_examples // 5, 20))
@given(mutations)
def test_the_command_line_never_crashes_or_leaks(folder: Path, mutant: tuple[bytes, list[str]]) -> None:
    """Through `kubetune validate` itself: problems one per line, a summary, exit 1 (or 0 and ok)."""
    data, _ = mutant
    file = folder / "mutant.yaml"
    file.write_bytes(data)
    STATS["mutations"] += 1
    result = CliRunner().invoke(main, ["validate", str(file)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    _check_output(result.output)
    lines = result.stdout.splitlines()
    if result.exit_code == 0:
        assert lines[-1].startswith("ok: ") and result.stderr == ""
    else:
        assert result.exit_code == 1, result.output
        assert all(line.startswith(f"{file}:") for line in lines), lines
        assert re.fullmatch(r"(\d+ error\(s\)|no FineTuneJob found) in 1 file\(s\)\n", result.stderr)


@settings(PROFILE, max_examples=max(PROFILE.max_examples // 10, 10))
@given(mutations, mutations)
def test_a_folder_of_mutants(
    folder: Path, first: tuple[bytes, list[str]], second: tuple[bytes, list[str]]
) -> None:
    """validate_paths over a folder: each file answers for itself, none hides another's problems."""
    where = folder / "many"
    where.mkdir(exist_ok=True)
    (where / "a.yaml").write_bytes(first[0])
    (where / "b.yaml").write_bytes(second[0])
    STATS["mutations"] += 2
    result = validate_paths([where])
    assert result.files == 2
    _check_result(result, str(where))
    alone = validate_bytes(first[0], str(where / "a.yaml")).problems
    assert [p for p in result.problems if p.file == str(where / "a.yaml")] == alone
