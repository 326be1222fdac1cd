"""The hardened loader, fed raw bytes as a hostile or careless user writes them.

Each bad input is rejected with `file:line: field.path: message`, the field named, the fix stated, no
traceback and no token in anything printed; the same through the real command line. The dict-level
table (values, types, formats) is tests/test_invalid.py; this one is about bytes, YAML and paths.
"""

from __future__ import annotations

import base64
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.api import kyaml, load
from kubetune.api.kyaml import Problem, json_key, resolve_plain
from kubetune.api.load import validate_bytes, validate_paths
from kubetune.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
B64_TOKEN = base64.b64encode(FAKE_TOKEN.encode()).decode()
SECRETS = (FAKE_TOKEN, B64_TOKEN, FAKE_TOKEN[3:])

BASE = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: hardening
spec:
  model:
    id: tiiuae/falcon-7b
  dataset:
    id: timdettmers/openassistant-guanaco
  training:
    learningRate: 2e-4
    maxSteps: 100
  output:
    hub:
      repoId: org/model
      token:
        secretKeyRef:
          name: hf-token
"""


def _with(**lines: str) -> str:
    """BASE with one line replaced (by its key, as written) or lines added after `after_<key>`."""
    out = []
    for line in BASE.splitlines(keepends=True):
        key = line.strip().split(":")[0]
        if key in lines:
            out.append(lines[key])
        else:
            out.append(line)
        if "after_" + key in lines:
            out.append(lines["after_" + key])
    return "".join(out)


def _laughs() -> str:
    """The classic: 10 strings, each level 9 aliases of the one before: 10^9 strings expanded."""
    text = 'lol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\n" + text


def _nested_blocks(levels: int) -> str:
    return _with(after_maxSteps="  samples:\n    prompts:\n    " + "- " * levels + "x\n")


def _list(*items: str) -> str:
    return "apiVersion: v1\nkind: List\nitems:\n" + "".join(items)


GOOD_ITEM = "".join(("- " if i == 0 else "  ") + line + "\n" for i, line in enumerate(BASE.splitlines()))
BAD_NAME = GOOD_ITEM.replace("name: hardening", "name: Bad_Name")
BAD_ITEM = GOOD_ITEM.replace("    maxSteps: 100\n", "    maxSteps: 100\n    trainig: 1\n")

# (id, the file's bytes, field path (or one of several), fragment of the message, line or None)
CASES: list[tuple[str, bytes, str | tuple[str, ...], str, int | None]] = [
    # -- aliases, nesting, size ---------------------------------------------------------------------
    ("billion-laughs", _laughs().encode(), "d[3]", "excessive aliasing", 6),
    ("self-alias", _with(spec="spec: &s\n  self: *s\n").encode(), "spec.self", "inside its own anchor", 6),
    (
        "undefined-alias",
        _with(maxSteps="    maxSteps: *steps\n").encode(),
        "spec.training.maxSteps",
        "define &steps",
        12,
    ),
    (
        "deep-flow-nesting",
        _with(after_maxSteps="  samples:\n    prompts: " + "[" * 10000 + "]" * 10000 + "\n").encode(),
        ("<yaml>", "spec.samples.prompts[0][0][0][0][0]…[0][0][0][0]"),
        "nested more than 100 levels",
        None,
    ),
    (
        "deep-block-nesting",
        _nested_blocks(150).encode(),
        "spec.samples.prompts[0][0][0][0][0]…[0][0][0][0]",
        "remove the extra nesting",
        None,
    ),
    (
        "over-3-mib-document",
        _with(after_maxSteps="  samples:\n    prompts: [" + "x" * (3 * 1024 * 1024 + 10) + "]\n").encode(),
        "spec.samples.prompts[0]",
        "--max-request-bytes 3145728",
        14,
    ),
    (
        "over-3-mib-through-aliases",
        _with(
            after_maxSteps="  samples:\n    prompts: [&p "
            + "x" * 200_000
            + ", "
            + ", ".join(["*p"] * 20)
            + "]\n"
        ).encode(),
        "spec.samples.prompts[15]",
        "more than the API server accepts in one request",
        14,
    ),
    # -- keys -----------------------------------------------------------------------------------------
    (
        "mapping-as-key",
        _with(after_name="  ? {a: 1}\n  : x\n").encode(),
        "metadata",
        "must be a string, not a mapping",
        5,
    ),
    (
        "list-as-key",
        _with(after_name="  [a, b]: x\n").encode(),
        "metadata",
        "must be a string, not a list",
        5,
    ),
    ("null-key", _with(after_name="  ~: x\n").encode(), "metadata", "cannot be null: quote it", 5),
    (
        "uint64-key",
        _with(after_name="  labels: {18446744073709551615: x}\n").encode(),
        "metadata.labels",
        "quote it",
        5,
    ),
    ("duplicate-top-level", _with(after_kind="kind: FineTuneJob\n").encode(), "kind", "first on line 2", 3),
    (
        "duplicate-nested",
        _with(after_maxSteps="    maxSteps: 200\n").encode(),
        "spec.training.maxSteps",
        "(first on line 12): kubectl would keep only the last",
        13,
    ),
    (
        "duplicate-after-resolution",
        _with(after_name="  labels:\n    '1': a\n    1: b\n").encode(),
        "metadata.labels.1",
        "remove one of them",
        7,
    ),
    (
        "bad-merge",
        _with(after_name="  <<: 5\n").encode(),
        "metadata",
        "needs a mapping or a list of mappings",
        5,
    ),
    # -- tags -------------------------------------------------------------------------------------
    (
        "tag-bool-maybe",
        _with(after_repoId="      private: !!bool maybe\n").encode(),
        "spec.output.hub.private",
        "a !!bool is true or false",
        16,
    ),
    (
        "tag-float-abc",
        _with(learningRate="    learningRate: !!float abc\n").encode(),
        "spec.training.learningRate",
        "a !!float is a number",
        11,
    ),
    (
        "tag-int-float",
        _with(maxSteps="    maxSteps: !!int 1.5\n").encode(),
        "spec.training.maxSteps",
        "a !!int is an integer",
        12,
    ),
    (
        "tag-null-value",
        _with(maxSteps="    maxSteps: !!null 5\n").encode(),
        "spec.training.maxSteps",
        "fix the value or remove the tag",
        12,
    ),
    (
        "tag-timestamp",
        _with(after_name="  annotations: {at: !!timestamp 2024-01-01}\n").encode(),
        "metadata.annotations.at",
        "has no timestamps",
        5,
    ),
    (
        "tag-python-object",
        _with(name="  name: !!python/object:os.system x\n").encode(),
        "metadata.name",
        "tag !!python/object:os.system is not supported",
        4,
    ),
    (
        "tag-custom",
        _with(name="  name: !custom x\n").encode(),
        "metadata.name",
        "kubectl drops the tag; remove it",
        4,
    ),
    (
        "tag-set",
        _with(after_name="  labels: !!set {a, b}\n").encode(),
        "metadata.labels",
        "!!set is not supported on a mapping",
        5,
    ),
    (
        "tag-omap",
        _with(after_maxSteps="  samples:\n    prompts: !!omap [a: 1]\n").encode(),
        "spec.samples.prompts",
        "!!omap is not supported on a list",
        14,
    ),
    (
        "tag-str-on-mapping",
        _with(training="  training: !!str\n").encode(),
        "spec.training",
        "!!str does not fit a mapping",
        10,
    ),
    (
        "tag-binary-bad-base64",
        _with(name="  name: !!binary not*base64\n").encode(),
        "metadata.name",
        "not valid base64",
        4,
    ),
    # -- encoding and bytes -------------------------------------------------------------------------
    (
        "latin-1",
        _with(after_name="  # caf\xe9\n").encode("latin-1"),
        "<file>",
        "not UTF-8 (found byte 0xe9 at line 5, column 8, 'é' in Latin-1)",
        5,
    ),
    (
        "utf-16-le-bom",
        BASE.encode("utf-16"),
        "<file>",
        "not UTF-8 (found a UTF-16 LE byte-order mark): save the file as UTF-8",
        1,
    ),
    (
        "utf-16-be-bom",
        b"\xfe\xff" + BASE.encode("utf-16-be"),
        "<file>",
        "found a UTF-16 BE byte-order mark",
        1,
    ),
    ("utf-16-no-bom", BASE.encode("utf-16-le"), "<file>", "UTF-16 without a byte-order mark?", 1),
    ("utf-32-bom", BASE.encode("utf-32"), "<file>", "found a UTF-32 LE byte-order mark", 1),
    (
        "nul-byte",
        _with(name="  name: hard\x00ening\n").encode(),
        "<yaml>",
        "NUL (U+0000) at line 4, column 13",
        4,
    ),
    ("terminal-escape", _with(name="  name: \x1b[2Jx\n").encode(), "<yaml>", "ESC (U+001B)", 4),
    # -- documents ------------------------------------------------------------------------------------
    ("empty-file", b"", "<file>", "no YAML document in this file", 0),
    ("only-comments", b"# nothing here\n---\n", "<file>", "it is empty, or only comments", 0),
    ("scalar-document", b"just a string\n", "<document>", "not a Kubernetes object: this is a string", 1),
    (
        "list-document",
        b"- apiVersion: kubetune.io/v1alpha1\n",
        "<document>",
        "this is a list; a FineTuneJob is a mapping",
        1,
    ),
    ("invalid-yaml", _with(name="  name: [unclosed\n").encode(), "<yaml>", "invalid YAML", None),
    ("tab-indentation", _with(name="\tname: x\n").encode(), "<yaml>", "fix the syntax at this line", 4),
    (
        "list-item-bad",
        _list(BAD_NAME, BAD_ITEM).encode(),
        "items[1].spec.trainig",
        "did you mean 'training'",
        34,
    ),
    ("list-item-scalar", _list("- 5\n").encode(), "items[0]", "not a Kubernetes object: this is a number", 4),
    (
        "list-items-not-list",
        b"apiVersion: v1\nkind: List\nitems: 5\n",
        "items",
        "must be a list, not a number",
        3,
    ),
    ("go-yaml-bool-for-string", _with(name="  name: yes\n").encode(), "metadata.name", "quote it", 4),
    # -- tokens ---------------------------------------------------------------------------------------
    (
        "token-as-key",
        _with(after_name=f"  labels: {{{FAKE_TOKEN}: x}}\n").encode(),
        "metadata.labels.hf_***",
        "store it in a Secret",
        5,
    ),
    (
        "token-in-binary",
        _with(after_name=f"  annotations: {{a: !!binary {B64_TOKEN}}}\n").encode(),
        "metadata.annotations.a",
        "looks like a Hugging Face token",
        5,
    ),
    (
        "token-base64-value",
        _with(after_name=f"  annotations: {{a: {B64_TOKEN}}}\n").encode(),
        "metadata.annotations.a",
        "looks like a Hugging Face token",
        5,
    ),
    (
        "token-unknown-field",
        _with(after_maxSteps=f"    {FAKE_TOKEN}: 1\n").encode(),
        "spec.training.hf_***",
        "never put a token in a spec",
        13,
    ),
    (
        "token-api-version",
        _with(apiVersion=f"apiVersion: {FAKE_TOKEN}\n").encode(),
        "apiVersion",
        "looks like a Hugging Face token",
        1,
    ),
    (
        "token-in-kind-of-other-object",
        _with(kind=f"kind: {FAKE_TOKEN}\n").encode(),
        "kind",
        "looks like a Hugging Face token",
        2,
    ),
    (
        "token-in-tag",
        _with(name=f"  name: !{FAKE_TOKEN} x\n").encode(),
        "metadata.name",
        "is not supported",
        4,
    ),
    (
        "token-as-alias",
        _with(name=f"  name: *{FAKE_TOKEN}\n").encode(),
        "metadata.name",
        "names no anchor",
        4,
    ),
    (
        "token-in-duplicate-key",
        _with(after_name=f"  labels: {{{FAKE_TOKEN}: a, {FAKE_TOKEN}: b}}\n").encode(),
        "metadata.labels.hf_***",
        "duplicate key",
        5,
    ),
    (
        "token-with-bad-tag",
        _with(after_name=f"  labels: {{a: !!int {FAKE_TOKEN}}}\n").encode(),
        "metadata.labels.a",
        "!!int does not fit",
        5,
    ),
]


def _no_leak(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text
    assert "Traceback" not in text and "internal error" not in text, text


@pytest.fixture(params=["libyaml", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The same answers from libyaml's parser and from PyYAML's own."""
    if request.param == "python":
        monkeypatch.setattr(kyaml, "PARSER", kyaml._PyParser)
    elif kyaml._libyaml_parser() is None:
        pytest.skip("PyYAML without libyaml")
    yield request.param


def test_table_covers_the_classes() -> None:
    """At least 35 raw-bytes cases; with tests/test_invalid.py's table they pass the issue's 80."""
    assert len(CASES) >= 35
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("data", "path", "fragment", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_bytes_are_refused_clearly(
    tmp_path: Path, parser: str, data: bytes, path: str | tuple[str, ...], fragment: str, line: int | None
) -> None:
    file = tmp_path / "job.yaml"
    file.write_bytes(data)

    result = validate_paths([file])

    assert not result.jobs
    paths = (path,) if isinstance(path, str) else path
    matching = [p for p in result.problems if p.path in paths and fragment in p.message]
    assert matching, "\n".join(map(str, result.problems))
    problem = matching[0]
    if line is not None:
        assert problem.line == line, problem
    for p in result.problems:
        text = str(p)
        assert text.startswith(f"{file}:{p.line}: {p.path}: "), text
        assert "\n" not in text and "\x1b" not in text, text
        _no_leak(text)


@pytest.mark.parametrize(("data", "path", "fragment"), [c[1:4] for c in CASES], ids=[c[0] for c in CASES])
def test_the_command_line_says_the_same(
    tmp_path: Path, data: bytes, path: str | tuple[str, ...], fragment: str
) -> None:
    file = tmp_path / "job.yaml"
    file.write_bytes(data)
    result = CliRunner().invoke(main, ["validate", str(file)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stdout.splitlines()
    assert lines and all(re.match(rf"{re.escape(str(file))}:\d+: \S", line) for line in lines), lines
    assert any(fragment in line for line in lines), lines
    assert re.fullmatch(r"\d+ error\(s\) in 1 file\(s\)\n", result.stderr), result.stderr
    _no_leak(result.output)


@pytest.mark.parametrize(
    "case", ["billion-laughs", "deep-flow-nesting", "token-as-key", "utf-16-le-bom", "token-api-version"]
)
def test_the_installed_command(tmp_path: Path, case: str) -> None:
    """The real `kubetune validate`, in a process of its own: the 9 GB billion-laughs file answers."""
    data = next(c[1] for c in CASES if c[0] == case)
    file = tmp_path / "job.yaml"
    file.write_bytes(data)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("kubetune")), "validate", str(file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{file}:") and "error(s) in 1 file(s)" in proc.stderr
    _no_leak(proc.stdout + proc.stderr)


# ---------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------


def _problems(*paths: str | Path) -> list[Problem]:
    result = validate_paths(list(paths))
    for p in result.problems:
        assert str(p).startswith(f"{p.file}:{p.line}: {p.path}: ")
        _no_leak(str(p))
    return result.problems


def test_missing_path_is_named(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path / "nope.yaml")
    assert str(problem) == f"{tmp_path / 'nope.yaml'}:0: <file>: no such file or folder: check the path"


def test_dangling_link_in_a_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(BASE)
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing.yaml")
    result = validate_paths([tmp_path])
    assert len(result.jobs) == 1
    [problem] = result.problems
    assert problem.file == str(tmp_path / "gone.yaml") and "broken symbolic link" in problem.message
    assert "fix it or remove it" in problem.message


def test_a_dangling_link_given_directly(tmp_path: Path) -> None:
    (tmp_path / "link.yaml").symlink_to(tmp_path / "missing.yaml")
    [problem] = _problems(tmp_path / "link.yaml")
    assert "broken symbolic link" in problem.message


def test_folder_without_yaml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    [problem] = _problems(tmp_path)
    assert problem.file == str(tmp_path) and "no .yaml or .yml file in this folder" in problem.message


def _deny(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Permission denied for `denied`: for real when not root; simulated through the loader's seams
    when root (root reads everything)."""
    if os.geteuid() != 0:
        denied.chmod(0)
        return

    def open_file(path: Path, mode: str = "r") -> object:
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode)

    def scandir(path: Path) -> object:
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return os.scandir(path)

    monkeypatch.setattr(load, "_open_file", open_file)
    monkeypatch.setattr(load, "_scandir", scandir)


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok.yaml").write_text(BASE)
    secret = tmp_path / "secret.yaml"
    secret.write_text(BASE)
    _deny(monkeypatch, secret)
    try:
        result = validate_paths([tmp_path])
    finally:
        secret.chmod(0o644)
    assert len(result.jobs) == 1
    [problem] = result.problems
    assert (
        str(problem)
        == f"{secret}:0: <file>: cannot read: permission denied: make it readable, or leave it out"
    )


def test_unreadable_subfolder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok.yaml").write_text(BASE)
    locked = tmp_path / "team"
    locked.mkdir()
    (locked / "job.yaml").write_text(BASE)
    _deny(monkeypatch, locked)
    try:
        result = validate_paths([tmp_path])
    finally:
        locked.chmod(0o755)
    assert len(result.jobs) == 1
    [problem] = result.problems
    assert problem.file == str(locked) and "cannot read folder: permission denied" in problem.message


def test_unreadable_paths_through_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text(BASE)
    _deny(monkeypatch, secret)
    try:
        result = CliRunner().invoke(main, ["validate", str(tmp_path), str(tmp_path / "nope")])
    finally:
        secret.chmod(0o644)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{secret}:0: <file>: cannot read: permission denied: make it readable, or leave it out",
        f"{tmp_path / 'nope'}:0: <file>: no such file or folder: check the path",
    ]
    assert result.stderr == "2 error(s) in 1 file(s)\n"


def test_a_fifo_named_yaml_in_a_folder(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")
    [problem] = _problems(tmp_path)
    assert problem.file == str(tmp_path / "pipe.yaml") and "not a regular file" in problem.message


def test_links_to_folders_are_followed_once(tmp_path: Path) -> None:
    team = tmp_path / "team"
    team.mkdir()
    (team / "job.yaml").write_text(BASE)
    (team / "loop").symlink_to(tmp_path)
    result = validate_paths([tmp_path])
    assert len(result.jobs) == 1 and result.problems == []


def test_a_file_over_16_mib(tmp_path: Path) -> None:
    file = tmp_path / "huge.yaml"
    with file.open("wb") as f:
        f.truncate(kyaml.MAX_FILE_BYTES + 1)
    [problem] = _problems(file)
    assert problem.path == "<file>" and "over 16 MiB" in problem.message and "split it" in problem.message


def test_standard_input() -> None:
    result = CliRunner().invoke(main, ["validate", "-"], input=BASE.encode())
    assert result.exit_code == 0 and "1 FineTuneJob(s) valid" in result.stdout
    result = CliRunner().invoke(main, ["validate", "-"], input=_with(kind=f"kind: {FAKE_TOKEN}\n").encode())
    assert result.exit_code == 1 and result.stdout.startswith(
        "<stdin>:2: kind: looks like a Hugging Face token"
    )
    _no_leak(result.output)


# ---------------------------------------------------------------------------------------------------
# Values as kubectl sends them
# ---------------------------------------------------------------------------------------------------

GO_YAML = [
    ("2e-4", 2e-4),
    ("1.0e-4", 1e-4),
    ("y", True),
    ("Yes", True),
    ("on", True),
    ("n", False),
    ("OFF", False),
    ("~", None),
    ("", None),
    ("Null", None),
    ("0o17", 15),
    ("017", 15),
    ("08", 8.0),
    ("0x1F", 31),
    ("-0b101", -5),
    ("+12", 12),
    ("1_000", 1000),
    ("1:30", "1:30"),  # PyYAML: 90 (base 60)
    ("2024-01-01", "2024-01-01"),  # PyYAML: a date
    ("2024-01-01T10:00:00Z", "2024-01-01T10:00:00Z"),
    ("9223372036854775807", 2**63 - 1),
    ("18446744073709551615", 2**64 - 1),
    ("99999999999999999999", 1e20),
    ("1e400", "1e400"),
    ("9" * 5000, "9" * 5000),
    (".5", 0.5),
    ("1.", 1.0),
    (".inf", math.inf),
    ("-.Inf", -math.inf),
    ("0x", "0x"),
    ("nULL", "nULL"),
    ("<<", "<<"),
    ("=", "="),  # PyYAML: a "value" tag
]


@pytest.mark.parametrize(("text", "value"), GO_YAML, ids=[t[0][:20] or "empty" for t in GO_YAML])
def test_plain_scalars_resolve_as_in_go_yaml_v2(text: str, value: object) -> None:
    _, resolved = resolve_plain(text)
    assert resolved == value and type(resolved) is type(value)


def test_nan_resolves_to_nan() -> None:
    _, value = resolve_plain(".nan")
    assert isinstance(value, float) and math.isnan(value)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (1, "1"),
        (True, "true"),
        (1.5, "1.5"),
        (1e6, "1e+06"),
        (123456.0, "123456"),
        (1e-5, "1e-05"),
        (0.1, "0.1"),
        (3.0, "3"),
        (math.inf, ".inf"),
        (2**64 - 1, None),
        (None, None),
        ("x", "x"),
    ],
)
def test_mapping_keys_become_json_strings_as_in_sigs_k8s_io_yaml(key: object, text: str | None) -> None:
    assert json_key(key) == text


def _data(text: str) -> object:
    [doc] = load.parse_yaml(text, "t.yaml")
    assert doc.problems == []
    return doc.data


def test_merge_keys_merge_as_in_go_yaml_v2() -> None:
    text = "d: &d {a: 1, b: 1}\nx: {a: 0, <<: *d, b: 2}\nz: {<<: [{a: 3}, *d]}\n'<<': quoted\n"
    assert _data(text) == {
        "d": {"a": 1, "b": 1},
        "x": {"a": 1, "b": 2},
        "z": {"a": 3, "b": 1},
        "<<": "quoted",
    }


def test_keys_resolve_before_they_become_strings() -> None:
    assert _data("y: 1\n1: 2\n1.5: 3\nnull-ish: 4\n") == {"true": 1, "1": 2, "1.5": 3, "null-ish": 4}


def test_explicit_core_tags_that_fit() -> None:
    text = (
        "a: !!str 1\nb: !!int '7'\nc: !!float 1\nd: !!bool yes\ne: !!null ~\nf: !!binary aGk=\n"
        "g: !!map {}\nh: !!seq []\ni: ! 5\n"
    )
    assert _data(text) == {
        "a": "1",
        "b": 7,
        "c": 1.0,
        "d": True,
        "e": None,
        "f": "hi",
        "g": {},
        "h": [],
        "i": "5",
    }


def test_a_job_written_with_kubectl_isms_is_valid(tmp_path: Path) -> None:
    """What kubectl accepts here is accepted too: 2e-4, anchors, merge keys, a UTF-8 BOM, CRLF."""
    text = _with(
        training="  training: &t\n",
        after_repoId="      private: yes\n",
    ).replace("learningRate: 2e-4", "learningRate: 2e-4")
    text += "  samples:\n    prompts: &p [hello]\n    maxNewTokens: 0x40\n"
    file = tmp_path / "job.yaml"
    file.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    result = validate_paths([file])
    assert result.problems == [] and len(result.jobs) == 1
    job = result.jobs[0][1]
    assert job.spec.training.learning_rate == 2e-4 and job.spec.output.hub is not None
    assert job.spec.output.hub.private is True and job.spec.samples.max_new_tokens == 64


@pytest.mark.parametrize("example", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_both_parsers_read_the_examples_the_same(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = example.read_text()
    fast = [d.data for d in load.parse_yaml(text)]
    monkeypatch.setattr(kyaml, "PARSER", kyaml._PyParser)
    assert [d.data for d in load.parse_yaml(text)] == fast
    # And, for these plain files, what PyYAML itself reads (numbers written with a dot).
    assert fast == [d for d in yaml.safe_load_all(text) if d is not None]


# ---------------------------------------------------------------------------------------------------
# Secrets and crashes
# ---------------------------------------------------------------------------------------------------


def test_a_problem_cannot_hold_a_token() -> None:
    problem = Problem(
        f"dir/{FAKE_TOKEN}.yaml", 3, f"spec.{FAKE_TOKEN}", f"got {FAKE_TOKEN!r} and {B64_TOKEN}"
    )
    for text in (str(problem), problem.file, problem.path, problem.message):
        _no_leak(text)
    assert "hf_***" in str(problem)


def test_messages_are_one_line_without_control_characters() -> None:
    problem = Problem("a.yaml", 1, "spec.a\nb", "x\x1b[2Jy\u202ez")
    assert str(problem) == "a.yaml:1: spec.a\\nb: x\\u001b[2Jy\\u202ez"


def test_an_unexpected_exception_is_a_problem_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(data: object) -> object:
        raise TypeError(f"unexpected {FAKE_TOKEN}")

    monkeypatch.setattr(load.FineTuneJob, "model_validate", boom)
    file = tmp_path / "job.yaml"
    file.write_text(BASE)
    result = CliRunner().invoke(main, ["validate", str(file)])
    assert result.exit_code == 1
    assert result.stdout == (
        f"{file}:1: <document>: internal error (TypeError) while checking this object; {load.REPORT}\n"
    )
    assert FAKE_TOKEN not in result.output


def test_the_command_line_never_shows_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(paths: object) -> object:
        raise RuntimeError(FAKE_TOKEN)

    monkeypatch.setattr(load, "validate_paths", boom)
    result = CliRunner().invoke(main, ["validate", "jobs"])
    assert result.exit_code == 2
    assert result.stderr == f"kubetune: internal error (RuntimeError); {load.REPORT}\n"


def test_summary_after_a_yaml_error_is_on_its_own_line(tmp_path: Path) -> None:
    """The bug: a YAML error's message ran over two lines, so the summary seemed glued to it."""
    file = tmp_path / "bad.yaml"
    file.write_bytes(b"a: b\x00\n")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("kubetune")), "validate", str(file)],
        capture_output=True,
        timeout=60,
    )
    both = subprocess.run(
        f"'{Path(sys.executable).with_name('kubetune')}' validate '{file}' 2>&1",
        shell=True,
        capture_output=True,
        timeout=60,
    ).stdout.decode()
    assert proc.stdout.decode().count("\n") == 1
    assert both.splitlines()[-1] == "1 error(s) in 1 file(s)"
    assert both.splitlines()[0].startswith(
        f"{file}:1: <yaml>: invalid YAML: NUL (U+0000) at line 1, column 5"
    )


def test_validate_bytes_needs_no_file() -> None:
    result = validate_bytes(BASE.encode(), "mem.yaml")
    assert result.problems == [] and len(result.jobs) == 1
