"""A YAML reader that reads files as `kubectl apply` sends them, hardened against any input.

kubectl turns YAML into JSON with sigs.k8s.io/yaml, which resolves plain scalars with go-yaml v2's
rules, not PyYAML's; this reader does the same, over PyYAML's parser events (libyaml's when present),
so `kubetune validate` sees the values the API server will. See kubetune.api.load for the rules it
enforces (text, tags, structure, limits); every problem is a :class:`Problem`, never an exception.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml import events as ev

from kubetune.redact import contains_token, redact

Loc = tuple[str | int, ...]

# The API server refuses a request body over this (kube-apiserver --max-request-bytes, default 3 MiB);
# kubectl sends each object as one JSON request, aliases expanded.
MAX_REQUEST_BYTES = 3 * 1024 * 1024
# Ours, not the API server's: a bound on the time and memory one file may take.
MAX_FILE_BYTES = 16 * 1024 * 1024
# Far deeper than any FineTuneJob (about 8 levels), far below Python's recursion limit.
MAX_DEPTH = 100
# go-yaml v2's alias budget (decode.go, allowedAliasRatio): up to 99% of the decoded nodes may come
# from aliases in a small document, scaling down to 10% at 4,000,000 nodes.
_ALIAS_RATIO_LOW = 400_000
_ALIAS_RATIO_HIGH = 4_000_000

YAML_SUFFIXES = (".yaml", ".yml")
REPORT = "please report it at https://github.com/kubetune/kubetune/issues with the input (secrets removed)"

# ---------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------

# Characters that would break "one problem per line" or play tricks on a terminal: C0/C1 controls,
# DEL, line/paragraph separators, bidirectional overrides.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _clean(text: object) -> str:
    """``text`` redacted, on one line, without terminal control characters."""
    redacted = redact(str(text))
    return _UNPRINTABLE.sub(lambda m: _ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), redacted)


@dataclass(frozen=True)
class Problem:
    """One problem, always redacted: no field of a Problem can hold a token."""

    file: str
    line: int
    path: str
    message: str

    def __post_init__(self) -> None:
        for name in ("file", "path", "message"):
            object.__setattr__(self, name, _clean(getattr(self, name)))

    def __str__(self) -> str:
        return redact(f"{self.file}:{self.line}: {self.path}: {self.message}")


class Fatal(Exception):
    """A problem after which the rest of the file cannot be read."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def shown(value: Any, limit: int = 40) -> str:
    """A short, redacted rendering of a value for a message (redacted first, then shortened)."""
    text = redact(repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _part(part: str | int) -> str:
    if isinstance(part, int):
        return f"[{part}]"
    text = redact(part)
    return text if len(text) <= 64 else text[:63] + "…"


def field_path(loc: Loc) -> str:
    """``spec.training.epochs``, ``items[3].spec``; very deep paths keep their two ends."""
    parts = list(loc) if len(loc) <= 16 else [*loc[:8], "…", *loc[-4:]]
    out = ""
    for part in parts:
        text = _part(part)
        out += text if isinstance(part, int) or part == "…" or not out else "." + text
    return out or "<document>"


# ---------------------------------------------------------------------------------------------------
# Scalars, resolved as sigs.k8s.io/yaml (go-yaml v2, resolve.go) resolves them
# ---------------------------------------------------------------------------------------------------

_INT64 = (-(2**63), 2**63 - 1)
_WORDS: dict[str, tuple[str, Any]] = {
    **{w: ("bool", True) for w in ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")},
    **{
        w: ("bool", False)
        for w in ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")
    },
    **{w: ("null", None) for w in ("", "~", "null", "Null", "NULL")},
    **{w: ("float", math.nan) for w in (".nan", ".NaN", ".NAN")},
    **{w: ("float", math.inf) for w in (".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF")},
    **{w: ("float", -math.inf) for w in ("-.inf", "-.Inf", "-.INF")},
}
# go-yaml's first-character hint: only these can be anything but a string.
_HINTS = {"+": "S", "-": "S", ".": ".", **{c: "D" for c in "0123456789"}, **{c: "M" for c in "yYnNtTfFoO~"}}
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")
_DIGITS = {
    2: re.compile("[01]+"),
    8: re.compile("[0-7]+"),
    10: re.compile("[0-9]+"),
    16: re.compile("[0-9a-fA-F]+"),
}
_MAX_DIGITS = {2: 64, 8: 22, 10: 20, 16: 16}


def _go_uint(s: str) -> int | None:
    """Go's strconv.ParseUint(s, 0, 64): 0x / 0o / 0b prefixes, a leading 0 for octal."""
    if not s:
        return None
    base, digits = 10, s
    if s[0] == "0":
        prefix = s[1:2].lower()
        if len(s) >= 3 and prefix in ("b", "o", "x"):
            base, digits = {"b": 2, "o": 8, "x": 16}[prefix], s[2:]
        else:
            base, digits = 8, s[1:]
            if not digits:
                return 0
    if not _DIGITS[base].fullmatch(digits):
        return None
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS[base]:
        return None
    value = int(digits, base)
    return value if value < 2**64 else None


def _go_int(s: str) -> int | None:
    """Go's strconv.ParseInt(s, 0, 64)."""
    neg = s[:1] == "-"
    unsigned = _go_uint(s[1:] if s[:1] in ("+", "-") else s)
    if unsigned is None:
        return None
    value = -unsigned if neg else unsigned
    return value if _INT64[0] <= value <= _INT64[1] else None


def _finite(s: str) -> float | None:
    value = float(s)
    return None if math.isinf(value) else value  # Go: out of range is an error, so the text stays text


def resolve_plain(s: str) -> tuple[str, Any]:
    """A plain (unquoted, untagged) scalar as kubectl reads it: (``str``/``int``/``float``/``bool``/
    ``null``, value). Timestamps stay text, as go-yaml v2 keeps them for JSON."""
    hint = _HINTS.get(s[0]) if s else "N"
    if hint:
        if s in _WORDS:
            return _WORDS[s]
        if hint == "." and _DOT_FLOAT.fullmatch(s):
            value = _finite(s)
            if value is not None:
                return "float", value
        elif hint in ("D", "S"):
            plain = s.replace("_", "")
            as_int = _go_int(plain)
            if as_int is None:
                as_int = _go_uint(plain)
            if as_int is not None:
                return "int", as_int
            if _YAML_FLOAT.fullmatch(plain):
                value = _finite(plain)
                if value is not None:
                    return "float", value
    return "str", s


def _go_float32_g(value: float) -> str:
    """Go's strconv.FormatFloat(value, 'g', -1, 32), as sigs.k8s.io/yaml writes a float mapping key."""
    if math.isnan(value):
        return ".nan"
    try:
        single = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        single = math.inf if value > 0 else -math.inf
    if math.isinf(single):
        return ".inf" if single > 0 else "-.inf"
    if single == 0:
        return "-0" if math.copysign(1, single) < 0 else "0"
    for precision in range(9):  # the shortest digits that read back as the same float32
        text = f"{single:.{precision}e}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == single:
            break
    mantissa, exponent = text.split("e")
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "").rstrip("0") or "0"
    exp = int(exponent)
    if exp < -4 or exp >= 6:
        rest = f".{digits[1:]}" if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{rest}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    point = exp + 1
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def json_key(value: Any) -> str | None:
    """A resolved mapping key as sigs.k8s.io/yaml turns it into a JSON key (None: it refuses it)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if _INT64[0] <= value <= _INT64[1] else None  # a uint64 key is refused
    if isinstance(value, float):
        return _go_float32_g(value)
    return None


# ---------------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------------

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {"str", "int", "float", "bool", "null", "binary"}
_SUPPORTED = "!!str, !!int, !!float, !!bool, !!null, !!binary, !!map, !!seq"
_WHAT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "null": "null (~, null or nothing)",
}


def _short_tag(tag: str) -> str:
    text = "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag
    return text if len(text) <= 40 else text[:39] + "…"


class _TagError(Exception):
    pass


def _binary(text: str) -> str:
    """A ``!!binary`` scalar decoded as go-yaml decodes it (standard base64, line breaks ignored), then
    as the UTF-8 text JSON carries."""
    try:
        data = base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        raise _TagError("!!binary value is not valid base64: fix the value or remove the tag") from None
    return data.decode("utf-8", errors="replace")


def _tagged_scalar(tag: str, value: str) -> Any:
    """A scalar with an explicit tag, or _TagError saying why the tag does not fit."""
    if tag == "!" or tag == _CORE + "str":
        return value
    name = tag[len(_CORE) :] if tag.startswith(_CORE) else None
    if name == "binary":
        return _binary(value)
    if name in _WHAT:
        kind, resolved = resolve_plain(value)
        if kind == name:
            return resolved
        if name == "float" and kind == "int" and _INT64[0] <= resolved <= _INT64[1]:
            return float(resolved)
        raise _TagError(
            f"!!{name} does not fit {shown(value)}: a !!{name} is {_WHAT[name]}; "
            "fix the value or remove the tag"
        )
    if name == "timestamp":
        raise _TagError(
            "!!timestamp is not supported: JSON, and so the API server, has no timestamps (kubectl drops "
            "the tag); remove it and write the time as text"
        )
    raise _TagError(
        f"tag {_short_tag(tag)} is not supported: a Kubernetes object is JSON, and kubectl drops the tag; "
        f"remove it (supported: {_SUPPORTED})"
    )


# ---------------------------------------------------------------------------------------------------
# Composing documents from parser events (iteratively: no input can recurse)
# ---------------------------------------------------------------------------------------------------


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


# libyaml's parser when PyYAML has it: the same events, 15x faster. Tests set PARSER to the pure-Python
# one too, to check that both read the same.
def _libyaml_parser() -> Any:
    try:
        from yaml import cyaml
    except ImportError:  # PyYAML built without libyaml
        return None
    return getattr(cyaml, "CParser", None)


PARSER: Any = _libyaml_parser() or _PyParser


@dataclass
class Document:
    """One YAML document, with the line of every key and list item in it."""

    file: str
    index: int
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    start_line: int = 1
    # Problems found while reading it (duplicate keys, tags); its objects are then not validated.
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, loc: Loc) -> int:
        """The line of `loc`, or of its closest written parent (a missing field has no line)."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return self.start_line


@dataclass
class _Node:
    value: Any
    kind: str  # "scalar", "map" or "seq"
    nodes: int  # as expanded: what go-yaml's decoder counts
    size: int  # about its size as JSON, in bytes
    height: int
    merge: bool = False  # a `<<` merge key


_BAD = object()  # a key that could not be used: its value is read and dropped
_MERGE = object()


@dataclass
class _Frame:
    kind: str
    value: Any
    loc: Loc
    line: int
    anchor: str | None
    nodes: int = 1
    size: int = 2
    height: int = 0
    expect_key: bool = True
    key: Any = None
    key_line: int = 0
    explicit: dict[str, int] = field(default_factory=dict)


def _line(event: Any) -> int:
    mark = getattr(event, "start_mark", None)
    return mark.line + 1 if mark is not None else 0


def _scalar_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value) + 3
    return len(repr(value)) + 1


class _Composer:
    """Builds one document's data from events, with the limits, tags and line index described above."""

    def __init__(self, file: str, index: int, start_line: int) -> None:
        self.doc = Document(file, index, None, {}, start_line)
        self.anchors: dict[str, _Node] = {}
        self.open_anchors: set[str] = set()
        self.stack: list[_Frame] = []
        self.root: _Node | None = None
        self.decoded = 0
        self.aliased = 0
        self.size = 0

    # -- problems ---------------------------------------------------------------------------------

    def _here(self) -> Loc:
        """The location the next value goes to."""
        if not self.stack:
            return ()
        top = self.stack[-1]
        if top.kind == "seq":
            return (*top.loc, len(top.value))
        if top.expect_key:
            return top.loc
        if top.key is _MERGE:
            return (*top.loc, "<<")
        return (*top.loc, top.key if isinstance(top.key, str) else "<key>")

    def soft(self, line: int, loc: Loc, message: str) -> None:
        self.doc.problems.append(Problem(self.doc.file, line, field_path(loc), message))

    def fatal(self, line: int, loc: Loc, message: str) -> Fatal:
        return Fatal(Problem(self.doc.file, line, field_path(loc), message))

    # -- budgets ----------------------------------------------------------------------------------

    def count(self, nodes: int, aliased: int, size: int, line: int) -> None:
        self.decoded += nodes
        self.aliased += aliased
        self.size += size
        if self.aliased > 100 and self.decoded > 1000:
            d = self.decoded
            if d <= _ALIAS_RATIO_LOW:
                allowed = 0.99
            elif d >= _ALIAS_RATIO_HIGH:
                allowed = 0.10
            else:
                allowed = 0.99 - 0.89 * (d - _ALIAS_RATIO_LOW) / (_ALIAS_RATIO_HIGH - _ALIAS_RATIO_LOW)
            if self.aliased / d > allowed:
                raise self.fatal(
                    line,
                    self._here(),
                    f"excessive aliasing: the aliases expand this document to over {d:,} values "
                    f'({self.aliased:,} of them from aliases); kubectl refuses it too ("document '
                    'contains excessive aliasing"): write the values out instead of nesting aliases',
                )
        if self.size > MAX_REQUEST_BYTES:
            raise self.fatal(
                line,
                self._here(),
                f"this document is over {MAX_REQUEST_BYTES // (1024 * 1024)} MiB as JSON (aliases "
                f"expanded), more than the API server accepts in one request (--max-request-bytes "
                f"{MAX_REQUEST_BYTES}): make it smaller",
            )

    # -- events -----------------------------------------------------------------------------------

    def feed(self, event: Any) -> None:
        if isinstance(event, ev.ScalarEvent):
            self.scalar(event)
        elif isinstance(event, ev.AliasEvent):
            self.alias(event)
        elif isinstance(event, ev.MappingStartEvent | ev.SequenceStartEvent):
            self.start(event)
        elif isinstance(event, ev.MappingEndEvent | ev.SequenceEndEvent):
            self.end()

    def scalar(self, event: Any) -> None:
        line, tag, text = _line(event), event.tag, event.value
        merge = False
        if tag is None and event.implicit[0]:  # plain (libyaml marks plain with style "", PyYAML None)
            _, value = resolve_plain(text)
            merge = text == "<<"  # go-yaml's isMerge: a plain << (or one tagged !!merge)
        elif tag is None:
            value = text
        elif tag == _CORE + "merge" and text == "<<":
            value, merge = text, True
        else:
            try:
                value = _tagged_scalar(tag, text)
            except _TagError as e:
                self.soft(line, self._here(), str(e))
                value = text
        size = _scalar_size(value)
        self.count(1, 0, size, line)
        node = _Node(value, "scalar", 1, size, 0, merge)
        if event.anchor is not None:
            self.anchors[event.anchor] = node
        self.emit(node, line)

    def alias(self, event: Any) -> None:
        line, name = _line(event), event.anchor
        if name in self.open_anchors:
            raise self.fatal(
                line,
                self._here(),
                f"alias *{shown(name)[1:-1]} is inside its own anchor: a value cannot contain itself "
                "(kubectl refuses it too); remove the alias",
            )
        target = self.anchors.get(name)
        if target is None:
            raise self.fatal(
                line,
                self._here(),
                f"alias *{shown(name)[1:-1]} names no anchor before it in this document: "
                f"define &{shown(name)[1:-1]} first",
            )
        if len(self.stack) + target.height > MAX_DEPTH:
            raise self._too_deep(line)
        self.count(1 + target.nodes, target.nodes, target.size, line)
        self.emit(_Node(target.value, target.kind, target.nodes + 1, target.size, target.height), line)

    def _too_deep(self, line: int) -> Fatal:
        return self.fatal(
            line,
            self._here(),
            f"nested more than {MAX_DEPTH} levels deep (a FineTuneJob is about 8): "
            "remove the extra nesting (unbalanced brackets?)",
        )

    def start(self, event: Any) -> None:
        line = _line(event)
        is_map = isinstance(event, ev.MappingStartEvent)
        if len(self.stack) >= MAX_DEPTH:
            raise self._too_deep(line)
        loc = self._here()
        top = self.stack[-1] if self.stack else None
        # A collection as a key (an error, once it is read): its insides are indexed under "<key>".
        inner = (*loc, "<key>") if top is not None and top.kind == "map" and top.expect_key else loc
        tag = event.tag
        if tag is not None and tag != "!" and tag != _CORE + ("map" if is_map else "seq"):
            what = "a mapping" if is_map else "a list"
            if tag in (_CORE + "map", _CORE + "seq") or tag[len(_CORE) :] in _SCALAR_TAGS:
                message = f"{_short_tag(tag)} does not fit {what}: remove the tag"
            else:
                message = (
                    f"tag {_short_tag(tag)} is not supported on {what}: a Kubernetes object is JSON, and "
                    f"kubectl drops the tag; remove it (supported: {_SUPPORTED})"
                )
            self.soft(line, loc, message)
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        self.stack.append(_Frame("map" if is_map else "seq", {} if is_map else [], inner, line, event.anchor))

    def end(self) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.open_anchors.discard(frame.anchor)
        self.count(1, 0, 2, frame.line)
        node = _Node(frame.value, frame.kind, frame.nodes, frame.size, frame.height + 1)
        if frame.anchor is not None:
            self.anchors[frame.anchor] = node
        self.emit(node, frame.line)

    def emit(self, node: _Node, line: int) -> None:
        """Put a finished value where it belongs: the root, a list, or a mapping's key or value."""
        if not self.stack:
            self.root = node
            self.doc.start_line = line
            return
        top = self.stack[-1]
        top.nodes += node.nodes
        top.size += node.size + 1
        top.height = max(top.height, node.height)
        if top.kind == "seq":
            self.doc.lines[(*top.loc, len(top.value))] = line
            top.value.append(node.value)
        elif top.expect_key:
            top.expect_key = False
            top.key_line = line
            top.key = self._key(top, node, line)
        else:
            top.expect_key = True
            key, top.key = top.key, None
            if key is _MERGE:
                self._merge(top, node, line)
            elif isinstance(key, str):
                first = top.explicit.get(key)
                if first is not None:
                    self.soft(
                        top.key_line,
                        (*top.loc, key),
                        f"duplicate key {shown(key)} (first on line {first}): kubectl would keep only "
                        "the last one; remove one of them",
                    )
                top.explicit[key] = top.key_line
                top.value[key] = node.value

    def _key(self, top: _Frame, node: _Node, line: int) -> Any:
        if node.kind != "scalar":
            what = "a mapping" if node.kind == "map" else "a list"
            self.soft(
                line,
                top.loc,
                f"a mapping key must be a string, not {what}: quote it, or fix the indentation "
                "(a '? ' or a '[' / '{' before ':')",
            )
            return _BAD
        if node.merge:
            return _MERGE
        key = json_key(node.value)
        if key is None:
            what = "null" if node.value is None else "a number too large for a key"
            self.soft(line, top.loc, f"a mapping key cannot be {what}: quote it, or remove it")
            return _BAD
        self.doc.lines[(*top.loc, key)] = line
        if contains_token(key):  # find_tokens names such a key by its redacted text
            self.doc.lines[(*top.loc, redact(key))] = line
        return key

    def _merge(self, top: _Frame, node: _Node, line: int) -> None:
        """go-yaml v2's merge: the merged keys are set in place (so they override the keys before `<<`
        and are overridden by those after it); in a list of mappings, earlier ones win."""
        if node.kind == "map":
            merged = [node.value]
        elif node.kind == "seq" and all(isinstance(m, dict) for m in node.value):
            merged = list(reversed(node.value))
        else:
            self.soft(
                line,
                top.loc,
                "<< (a merge key) needs a mapping or a list of mappings, e.g. <<: *defaults; "
                "fix the value or quote the key",
            )
            return
        for mapping in merged:
            for key, value in mapping.items():
                top.value[key] = value
                self.doc.lines[(*top.loc, key)] = line


def _events(parser: Any) -> Iterator[Any]:
    while parser.check_event():
        yield parser.get_event()


def parse_yaml(text: str, file: str = "<stdin>") -> Iterator[Document]:
    """Every non-empty document of a (multi-document) YAML text, as kubectl would read it.

    Problems that spoil a document but not the file (duplicate keys, tags) are on ``Document.problems``;
    one that ends the file (invalid YAML, limits) raises :class:`Fatal` after the documents before it."""
    parser = PARSER(text)
    try:
        index = 0
        composer: _Composer | None = None
        for event in _events(parser):
            if isinstance(event, ev.DocumentStartEvent):
                composer = _Composer(file, index, _line(event))
            elif isinstance(event, ev.DocumentEndEvent):
                root = composer.root if composer is not None else None
                if (
                    composer is not None
                    and root is not None
                    and (root.value is not None or composer.doc.problems)
                ):
                    composer.doc.data = root.value
                    yield composer.doc
                composer, index = None, index + 1
            elif composer is not None:
                composer.feed(event)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = str(e.problem or e.context or "not YAML")
        context = f" ({e.context})" if e.context and e.problem else ""
        if "nesting depth" in problem or "max depth" in problem:  # libyaml's own bound (1000), reached first
            problem, context = f"nested more than {MAX_DEPTH} levels deep (unbalanced brackets?)", ""
        raise Fatal(
            Problem(
                file,
                line,
                "<yaml>",
                f"invalid YAML: {problem}{context}: fix the syntax at this line (indentation, or quote a "
                "value that holds ': ', ' #' or starts with a special character)",
            )
        ) from None
    except yaml.YAMLError as e:
        raise Fatal(Problem(file, 0, "<yaml>", f"invalid YAML: {type(e).__name__}")) from None
    finally:
        dispose = getattr(parser, "dispose", None)
        if dispose is not None:
            dispose()


# ---------------------------------------------------------------------------------------------------
# Bytes to text
# ---------------------------------------------------------------------------------------------------

_BOMS = (
    (b"\x00\x00\xfe\xff", "a UTF-32 BE byte-order mark"),
    (b"\xff\xfe\x00\x00", "a UTF-32 LE byte-order mark"),
    (b"\xfe\xff", "a UTF-16 BE byte-order mark"),
    (b"\xff\xfe", "a UTF-16 LE byte-order mark"),
)
_NOT_UTF8_FIX = "save the file as UTF-8 (e.g. iconv -t UTF-8)"
# What YAML (libyaml, go-yaml, PyYAML alike) refuses in a stream.
_NON_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_CONTROL_NAMES = {0: "NUL", 0x1B: "ESC", 0x7F: "DEL", 0xFFFE: "a non-character", 0xFFFF: "a non-character"}


def _line_col(data: bytes | str, offset: int) -> tuple[int, int]:
    newline = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    column = offset - (data.rfind(newline, 0, offset) + 1) + 1  # type: ignore[arg-type]
    return line, column


def _looks_utf16(data: bytes) -> bool:
    head = data[:512]
    if len(head) < 4:
        return False
    even, odd = head[0::2].count(0), head[1::2].count(0)
    # ASCII in UTF-16: every other byte is NUL (and the others are not).
    return max(even, odd) >= 0.4 * len(head) and min(even, odd) == 0


def decode(data: bytes, file: str) -> str:
    """The text of a YAML file, or Fatal saying what was found instead of UTF-8."""
    for bom, what in _BOMS:
        if data.startswith(bom):
            raise Fatal(Problem(file, 1, "<file>", f"not UTF-8 (found {what}): {_NOT_UTF8_FIX}"))
    if _looks_utf16(data):
        raise Fatal(
            Problem(
                file,
                1,
                "<file>",
                f"not UTF-8 (found NUL bytes between the characters: UTF-16 without a byte-order mark?): "
                f"{_NOT_UTF8_FIX}",
            )
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        byte = data[e.start]
        line, column = _line_col(data, e.start)
        latin1 = f", {chr(byte)!r} in Latin-1" if byte >= 0xA0 else ""
        raise Fatal(
            Problem(
                file,
                line,
                "<file>",
                f"not UTF-8 (found byte 0x{byte:02x} at line {line}, column {column}{latin1}): "
                f"{_NOT_UTF8_FIX}",
            )
        ) from None
    bad = _NON_PRINTABLE.search(text)
    if bad is not None:
        code = ord(bad.group())
        line, column = _line_col(text, bad.start())
        name = _CONTROL_NAMES.get(code, "a control character")
        raise Fatal(
            Problem(
                file,
                line,
                "<yaml>",
                f"invalid YAML: {name} (U+{code:04X}) at line {line}, column {column}: YAML allows no "
                "control characters; remove it (is this a binary file?)",
            )
        )
    return text
