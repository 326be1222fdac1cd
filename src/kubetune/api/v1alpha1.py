"""The FineTuneJob API, version v1alpha1.

These pydantic models are the single source of truth: the CRD (manifests/crd), the JSON schema for
editors (manifests/schema) and the reference in README.md are generated from them by
`kubetune.api.generate`, and a test fails when a generated file is stale.

Conventions:
- Field names are snake_case in Python and camelCase on the wire (aliases), like every Kubernetes API.
  Only the wire names are accepted in a document, as the API server accepts only those.
- `None` means "not set"; the description says what an unset field resolves to. A `null` in a
  document is the same as leaving the field out (the API server drops it too).
- Values are typed exactly as the CRD types them, so `kubetune validate` accepts what the API server
  accepts and nothing more: no quoted numbers, no `1` for a boolean, integers within int64, finite
  numbers. JSON has one number type: `5.0` is the integer 5 (kubectl sends it as `5`).
- Kubernetes value formats (quantities, label keys and values, names, paths) are `Format`s: one
  message, a Python check, and a CEL rule the generator puts in the CRD.
- Cross-field rules are `Rule`s: one message, a Python check and a CEL rule, declared together, so the
  API server, `kubetune validate` and the trainer agree.
- Defaults follow the classic Falcon/Guanaco QLoRA recipe (nf4, r=64, alpha=16, dropout 0.1,
  paged_adamw_32bit, max_grad_norm 0.3, warmup 3%, constant LR, group_by_length, gradient
  checkpointing, 500 steps, 512 tokens).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError, core_schema

from kubetune.contract import RESERVED_PATHS, Phase
from kubetune.redact import find_tokens

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# Hugging Face tokens. Anything that looks like one, anywhere in a spec (keys, bytes and base64
# included), is refused: tokens travel only through a Secret (secretKeyRef). kubetune.redact finds them.
INLINE_TOKEN_FIX = (
    "never put a token in a spec; store it in a Secret and reference it with "
    "spec.output.hub.token.secretKeyRef"
)
TOKEN_MESSAGE = "looks like a Hugging Face token: " + INLINE_TOKEN_FIX

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One CRD `x-kubernetes-validations` entry (checked by the API server)."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def cel_rules(model: type[BaseModel]) -> list[dict[str, str]]:
    """The CEL rules declared on one model (not its parents or fields)."""
    extra = model.model_config.get("json_schema_extra")
    rules = extra.get("cel") if isinstance(extra, dict) else None
    if not isinstance(rules, list):
        return []
    return [{str(k): str(v) for k, v in r.items()} for r in rules if isinstance(r, dict)]


def cel_string(text: str) -> str:
    """`text` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def on(rule: str, target: str) -> str:
    """A CEL rule written over `self`, applied to `target` instead (`self.metadata.name`, `k`...)."""
    return re.sub(r"\bself\b", target, rule)


def _error_at(loc: tuple[str | int, ...], message: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=loc, input=None
    )


# --------------------------------------------------------------------------------------------------
# Wire types: values as the API server types them
# --------------------------------------------------------------------------------------------------


def kind_of(value: Any) -> str:
    """A value's JSON kind, in words (for messages that must not echo the value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _looks_like_a_number(text: str) -> bool:
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


def _not_a_string(kind: str, value: str, unquoted: bool) -> ValueError:
    fix = ": remove the quotes" if unquoted else ""
    return ValueError(f"must be {kind}, not a string{fix}")


def _wire_int(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean (true/false)")
    if isinstance(value, float):
        # JSON has one number type: kubectl sends 5.0 as 5, and the API server takes it as an integer.
        if not math.isfinite(value):
            raise ValueError("must be an integer, not an infinity or NaN")
        if not value.is_integer():
            raise ValueError("must be a whole number (an integer), not a number with a fraction")
        value = int(value)
    if isinstance(value, str):
        raise _not_a_string("an integer", value, _looks_like_a_number(value))
    if not isinstance(value, int):
        raise ValueError(f"must be an integer, not {kind_of(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"must fit in 64 bits (int64): between {INT64_MIN} and {INT64_MAX}")
    return value


def _wire_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean (true/false)")
    if isinstance(value, str):
        raise _not_a_string("a number", value, _looks_like_a_number(value))
    if isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            raise ValueError("must be a finite number: this one is too large") from None
    if not isinstance(value, float):
        raise ValueError(f"must be a number, not {kind_of(value)}")
    if not math.isfinite(value):
        raise ValueError("must be a finite number, not an infinity or NaN (JSON has neither)")
    return value


def _wire_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        words = {"true", "false", "yes", "no", "on", "off", "y", "n"}
        raise _not_a_string("true or false", value, value.strip().lower() in words)
    raise ValueError(f"must be true or false, not {kind_of(value)}")


def _wire_str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):  # a !!binary scalar: kubectl sends it decoded, as text
        return bytes(value).decode("utf-8", errors="replace")
    raise ValueError(f"must be a string, not {kind_of(value)}: quote it")


WIRE_STR = BeforeValidator(_wire_str)
Int = Annotated[int, BeforeValidator(_wire_int)]
Number = Annotated[float, BeforeValidator(_wire_number)]
Bool = Annotated[bool, BeforeValidator(_wire_bool)]
Str = Annotated[str, WIRE_STR]


# --------------------------------------------------------------------------------------------------
# Formats: Kubernetes value formats, checked here and (as CEL) by the API server, with one message
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One rule of a format: a CEL expression over `self` (the string), its Python twin, a message."""

    rule: str
    message: str
    holds: Callable[[str], bool]


def matches(regex: str, message: str) -> Check:
    """A regex both engines read alike (RE2 in the API server, `re` here): anchored, ASCII classes."""
    compiled = re.compile(regex)
    return Check(f"self.matches({cel_string(regex)})", message, lambda v: compiled.fullmatch(v) is not None)


@dataclass(frozen=True)
class Format:
    """A string format: its length bounds (the CRD needs a maxLength to budget CEL) and its checks.

    Used as `Annotated[str, WIRE_STR, FORMAT]`. The generator turns the checks into CEL rules on the
    field's parent (where the API server does not echo the value in its error)."""

    name: str
    max_length: int
    checks: tuple[Check, ...] = ()
    min_length: int = 0
    pattern: str | None = None  # for editors (the JSON schema); the CRD states the rule in words

    def validate(self, value: str) -> str:
        if len(value) < self.min_length:
            raise ValueError("must not be empty")
        if len(value) > self.max_length:
            raise ValueError(f"must be at most {self.max_length} characters")
        for check in self.checks:
            if not check.holds(value):
                raise ValueError(check.message)
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonDict:
        out = dict(handler(schema))
        out["maxLength"] = self.max_length
        if self.min_length:
            out["minLength"] = self.min_length
        if self.pattern:
            out["pattern"] = self.pattern
        if self.checks:
            out["cel"] = [cel(c.rule, c.message) for c in self.checks]
        return out


def text(max_length: int, min_length: int = 1) -> Format:
    """Free text of bounded length (the generator adds the token rule to every string)."""
    return Format("text", max_length, min_length=min_length)


# dataset.chatTemplate: the templates kubetune ships (kubetune.trainer.templates).
BUILTIN_CHAT_TEMPLATES = ("chatml", "llama-2", "alpaca", "guanaco")

# Regexes of k8s.io/apimachinery/pkg/util/validation.
DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # RFC 1123 label
DNS_1035_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # RFC 1035 label: Service names
K8S_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # RFC 1123 subdomain
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A qualified name (label and annotation keys): an optional DNS subdomain prefix and '/', then a name
# of at most 63 characters. The prefix's 253 characters are a second check.
QUALIFIED_NAME_RE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# resource.Quantity's grammar: a signed decimal number, then a binary suffix (Ki…Ei), a decimal one
# (n u m k M G T P E) or an exponent (e3, E-2). Suffixes are case-sensitive.
QUANTITY_RE = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
# huggingface_hub.utils.validate_repo_id: `name` or `namespace/name`, each 1-96 of [A-Za-z0-9_.-],
# starting and ending with a word character; no '--' or '..'; not ending in '.git'.
_HUB_PART = r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID_RE = rf"^({_HUB_PART}/)?{_HUB_PART}$"

SUBDOMAIN_MESSAGE = (
    "must be a lowercase DNS name (RFC 1123 subdomain): a-z, 0-9, '-' and '.', starting and ending "
    "with a letter or digit"
)
DNS_SUBDOMAIN = Format(
    "DNS subdomain", 253, (matches(K8S_NAME_RE, SUBDOMAIN_MESSAGE),), min_length=1, pattern=K8S_NAME_RE
)
DNS_LABEL = Format(
    "DNS label",
    63,
    (
        matches(
            DNS_LABEL_RE,
            "must be a lowercase DNS label (RFC 1123): a-z, 0-9 and '-', starting and ending with a letter "
            "or digit, no '.'",
        ),
    ),
    min_length=1,
    pattern=DNS_LABEL_RE,
)

# render.run_name names a run `<name>-<first 8 hex of the spec hash>`; its Indexed Job gives each pod the
# hostname `<run>-<index>`, which must be a DNS label (at most 63), and a multi-node run's headless
# Service (named like the run) must be an RFC 1035 label (a letter first). So a FineTuneJob's name is an
# RFC 1035 label short enough for the largest index.
MAX_NODES = 128
RUN_HASH_LENGTH = 8
JOB_NAME_MAX = 63 - len("-") - RUN_HASH_LENGTH - len(f"-{MAX_NODES - 1}")  # 50
JOB_NAME_MESSAGE = (
    f"must be at most {JOB_NAME_MAX} characters of a-z, 0-9 and '-', starting with a letter and ending "
    "with a letter or digit (no '.'): the run's Job and Service (<name>-<hash>) and its pods' hostnames "
    "(<name>-<hash>-<index>) are made from it and must be DNS labels"
)
_JOB_NAME_RE = re.compile(DNS_1035_RE)
JOB_NAME = Format(
    "job name",
    253,  # the API server's own bound for metadata.name; the check says 50
    (
        Check(
            f"size(self) <= {JOB_NAME_MAX} && self.matches({cel_string(DNS_1035_RE)})",
            JOB_NAME_MESSAGE,
            lambda v: len(v) <= JOB_NAME_MAX and _JOB_NAME_RE.fullmatch(v) is not None,
        ),
    ),
    min_length=1,
    pattern=DNS_1035_RE,
)

_QUALIFIED = re.compile(QUALIFIED_NAME_RE)


def _is_qualified_name(key: str) -> bool:
    return _QUALIFIED.fullmatch(key) is not None and key.find("/") <= 253


_QUALIFIED_RULE = f"self.matches({cel_string(QUALIFIED_NAME_RE)}) && self.indexOf('/') <= 253"
QUALIFIED_NAME_MESSAGE = (
    "must be a qualified name, `name` or `prefix/name`: the name at most 63 letters, digits, '-', '_' "
    "and '.', starting and ending with a letter or digit; the prefix a lowercase DNS subdomain of at "
    "most 253 characters, e.g. example.com/team"
)
LABEL_KEY = Format(
    "label key", 253 + 1 + 63, (Check(_QUALIFIED_RULE, QUALIFIED_NAME_MESSAGE, _is_qualified_name),)
)
# Kubernetes checks an annotation key lowercased (ValidateAnnotations).
ANNOTATION_KEY = Format(
    "annotation key",
    253 + 1 + 63,
    (
        Check(
            on(_QUALIFIED_RULE, "self.lowerAscii()"),
            QUALIFIED_NAME_MESSAGE,
            lambda k: _is_qualified_name(k.lower()),
        ),
    ),
)
LABEL_VALUE_MESSAGE = (
    "must be a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a "
    "letter or digit (or empty)"
)
LABEL_VALUE = Format(
    "label value", 63, (matches(LABEL_VALUE_RE, LABEL_VALUE_MESSAGE),), pattern=LABEL_VALUE_RE
)


def _positive_quantity(value: str) -> bool:
    m = re.fullmatch(QUANTITY_RE, value)
    return m is not None and not value.startswith("-") and Decimal(m.group(1)) > 0


QUANTITY = Format(
    "quantity",
    63,
    (
        Check(
            "isQuantity(self)",
            "must be a Kubernetes quantity such as 8, 500m, 64Gi or 1.5Ti: a number, then a binary "
            "suffix (Ki Mi Gi Ti Pi Ei), a decimal one (m k M G T P E) or an exponent (e3); suffixes are "
            "case-sensitive and there are no spaces",
            lambda v: re.fullmatch(QUANTITY_RE, v) is not None,
        ),
        Check(
            "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))",
            "must be greater than zero",
            _positive_quantity,
        ),
    ),
    min_length=1,
    pattern=QUANTITY_RE,
)

_HUB_ID = re.compile(HUB_ID_RE)
HUB_ID_MESSAGE = (
    "must be a Hub repository id, `name` or `owner/name` (the Hub's rules): each part 1 to 96 letters, "
    "digits, '-', '_' or '.', not starting or ending with '-' or '.'; no '--' or '..'; not ending in "
    "'.git'"
)
HUB_ID = Format(
    "Hub repository id",
    96 + 1 + 96,
    (
        Check(
            f"self.matches({cel_string(HUB_ID_RE)}) && !self.contains('--') && !self.contains('..') "
            "&& !self.endsWith('.git')",
            HUB_ID_MESSAGE,
            lambda v: (
                _HUB_ID.fullmatch(v) is not None
                and "--" not in v
                and ".." not in v
                and not v.endswith(".git")
            ),
        ),
    ),
    min_length=1,
)

SECRET_KEY_RE = r"^[-._a-zA-Z0-9]+$"
SECRET_KEY = Format(
    "Secret key",
    253,
    (
        Check(
            f"self.matches({cel_string(SECRET_KEY_RE)}) && self != '.' && !self.startsWith('..')",
            "must be a Secret key: letters, digits, '-', '_' and '.', not '.' and not starting with '..'",
            lambda v: re.fullmatch(SECRET_KEY_RE, v) is not None and v != "." and not v.startswith(".."),
        ),
    ),
    min_length=1,
)
QUEUE_NAME = Format(
    "queue name",
    63,  # also the value of the kueue.x-k8s.io/queue-name label
    (
        matches(
            K8S_NAME_RE,
            "must be the name of a Kueue LocalQueue: a lowercase DNS name (a-z, 0-9, '-' and '.', "
            "starting and ending with a letter or digit) of at most 63 characters, as it is also a label "
            "value",
        ),
    ),
    min_length=1,
)
GPU_TYPE = Format(
    "GPU product",
    63,
    (
        matches(
            LABEL_VALUE_RE,
            "must be a label value, as it is matched against the node label nvidia.com/gpu.product: "
            "letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        ),
    ),
    min_length=1,
)
IMAGE = Format(
    "image",
    4096,
    (
        Check(
            "self.trim() == self",
            "must be a container image reference without leading or trailing whitespace",
            lambda v: v == v.strip(),
        ),
    ),
    min_length=1,
)

_RESERVED_CEL = "[" + ", ".join(cel_string(p) for p in RESERVED_PATHS) + "]"
_RESERVED_WORDS = ", ".join(RESERVED_PATHS)
_CLEAN_ABSOLUTE_RE = r"^(/[^/]+)+/?$"
_DOT_PART_RE = r"(^|/)\.\.?(/|$)"
_CLEAN_RULE = f"self.matches({cel_string(_CLEAN_ABSOLUTE_RE)}) && !self.matches({cel_string(_DOT_PART_RE)})"


def _clean_absolute(path: str) -> bool:
    return re.fullmatch(_CLEAN_ABSOLUTE_RE, path) is not None and re.search(_DOT_PART_RE, path) is None


def _inside(path: str, root: str) -> bool:
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")


MOUNT_PATH = Format(
    "mount path",
    4096,
    (
        Check(
            _CLEAN_RULE,
            "must be an absolute path such as /workspace, without '.' or '..' parts or '//'",
            _clean_absolute,
        ),
        Check(
            f"!{_RESERVED_CEL}.exists(r, self == r || self.startsWith(r + '/') "
            "|| r.startsWith(self.endsWith('/') ? self : self + '/'))",
            f"must not be, lie inside or hide a path kubetune mounts itself ({_RESERVED_WORDS}): "
            "use another folder, e.g. /workspace",
            lambda v: not any(_inside(v, r) or _inside(r, v) for r in RESERVED_PATHS),
        ),
    ),
    min_length=1,
)
OUTPUT_PATH = Format(
    "output path",
    4096,
    (
        Check(
            f"!self.startsWith('/') || ({_CLEAN_RULE})",
            "an absolute output.path must be clean: no '.' or '..' parts or '//' (e.g. /workspace/output)",
            lambda v: not v.startswith("/") or _clean_absolute(v),
        ),
        Check(
            f"!self.startsWith('/') || !{_RESERVED_CEL}.exists(r, self == r || self.startsWith(r + '/'))",
            f"must not be or lie inside a path kubetune mounts itself ({_RESERVED_WORDS}): the trainer "
            "cannot keep its results there; use e.g. /workspace/output",
            lambda v: not v.startswith("/") or not any(_inside(v, r) for r in RESERVED_PATHS),
        ),
    ),
    min_length=1,
)

# The API server's limit on all annotations of one object (ValidateAnnotationsSize), in bytes.
ANNOTATIONS_MAX_BYTES = 256 * 1024
# Per value, so that the CRD's CEL rules (which read every value) fit the API server's cost budget.
ANNOTATION_VALUE_MAX = 32768


@dataclass(frozen=True)
class MapFormat:
    """A map of strings whose keys have a format (labels, annotations, nodeSelector): entries whose
    value is null are dropped (as the API server drops them), and each bad key is reported at itself."""

    key: Format
    max_properties: int | None = None
    max_total_bytes: int | None = None

    def _before(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: v for k, v in value.items() if v is not None}

    def validate(self, value: dict[str, str]) -> dict[str, str]:
        if self.max_properties is not None and len(value) > self.max_properties:
            raise ValueError(f"must have at most {self.max_properties} entries")
        errors = []
        for k in value:
            try:
                self.key.validate(k)
            except ValueError as e:
                errors.append(_error_at((k,), f"the key {e}"))
        if errors:
            raise ValidationError.from_exception_data(self.key.name, errors)
        if self.max_total_bytes is not None:
            total = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
            if total > self.max_total_bytes:
                raise ValueError(
                    f"keys and values must total at most {self.max_total_bytes} bytes (256 KiB, the API "
                    f"server's limit for annotations); these are {total}"
                )
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(
            self._before, core_schema.no_info_after_validator_function(self.validate, handler(source))
        )

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonDict:
        out = dict(handler(schema))
        if self.max_properties is not None:
            out["maxProperties"] = self.max_properties
        rules = [cel(f"self.all(k, {on(c.rule, 'k')})", f"every key {c.message}") for c in self.key.checks]
        if self.max_total_bytes is not None:
            rules.append(
                cel(
                    f"self.map(k, size(bytes(k)) + size(bytes(self[k]))).sum() <= {self.max_total_bytes}",
                    f"keys and values must total at most {self.max_total_bytes} bytes (256 KiB, the API "
                    "server's limit for annotations)",
                )
            )
        if rules:
            out["cel"] = rules
        return out


_TEMPLATE_RULE = (
    "self in " + repr(list(BUILTIN_CHAT_TEMPLATES)) + " || self.contains('{{') || self.contains('{%')"
)
CHAT_TEMPLATE = Format(
    "chat template",
    65536,
    (
        Check(
            _TEMPLATE_RULE,
            "must be a built-in chat template (" + ", ".join(BUILTIN_CHAT_TEMPLATES) + ") or a Jinja "
            "template (with {{ ... }} or {% ... %})",
            lambda v: v in BUILTIN_CHAT_TEMPLATES or "{{" in v or "{%" in v,
        ),
    ),
    min_length=1,
)

# The string types of the API.
Name = Annotated[str, WIRE_STR, DNS_SUBDOMAIN]
Quantity = Annotated[str, WIRE_STR, QUANTITY]
HubId = Annotated[str, WIRE_STR, HUB_ID]
Revision = Annotated[str, WIRE_STR, text(200)]
Path = Annotated[str, WIRE_STR, text(4096)]
Identifier = Annotated[str, WIRE_STR, text(256)]  # column, split and module names
Prompt = Annotated[str, WIRE_STR, text(16384)]
LabelValue = Annotated[str, WIRE_STR, LABEL_VALUE]
AnnotationValue = Annotated[str, WIRE_STR, text(ANNOTATION_VALUE_MAX, 0)]
# Maps in the spec are bounded (the CRD's CEL rules read each entry); metadata's are the API server's.
SpecLabels = Annotated[dict[str, LabelValue], MapFormat(LABEL_KEY, 64)]
SpecAnnotations = Annotated[dict[str, AnnotationValue], MapFormat(ANNOTATION_KEY, 64, ANNOTATIONS_MAX_BYTES)]
MetaLabels = Annotated[dict[str, LabelValue], MapFormat(LABEL_KEY)]
MetaAnnotations = Annotated[dict[str, Str], MapFormat(ANNOTATION_KEY, None, ANNOTATIONS_MAX_BYTES)]


# --------------------------------------------------------------------------------------------------
# Rules across fields
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule across the fields of one model, declared once: the API server checks `cel` (which sees
    only what was written, so it spells out the defaults), the models check `holds` (which sees the
    defaults resolved), and both say `message`. With `field`, the problem is reported at that field.
    tests/test_crd_rules.py runs both on passing and failing samples of every rule: same verdict, same
    message."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field: str | None = None  # the wire name


def with_rules(*rules: Rule) -> ConfigDict:
    return ConfigDict(
        json_schema_extra={"cel": [cel(r.cel, r.message, f".{r.field}" if r.field else None) for r in rules]}
    )


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields are errors, values validated on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        # A document has the wire names only: the API server knows no `max_steps`.
        validate_by_alias=True,
        validate_by_name=False,
        extra="forbid",
        strict=True,
        validate_assignment=True,
        use_attribute_docstrings=True,
        # Error text must never echo a value back: it could be a token pasted in the wrong field.
        hide_input_in_errors=True,
    )

    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # The API server drops a null field before it validates; so do we: a field whose default is not
        # None takes its default (or is missing). Assignment passes every field too, under its Python name.
        if not isinstance(data, dict) or None not in data.values():
            return data
        fields = cls.model_fields.items()
        declared = {f.alias or n for n, f in fields} | {n for n, _ in fields}
        may_be_none = {k for n, f in fields if f.default is None for k in (f.alias or n, n)}
        return {k: v for k, v in data.items() if v is not None or k in may_be_none or k not in declared}

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).RULES:
            if not rule.holds(self):
                if rule.field:
                    raise ValidationError.from_exception_data(
                        type(self).__name__, [_error_at((rule.field,), rule.message)]
                    )
                raise ValueError(rule.message)
        return self


# --------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------


class SecretKeySelector(_Model):
    """A key of a Secret in the FineTuneJob's namespace (the shape of a Pod's `secretKeyRef`)."""

    name: Name
    """Name of the Secret."""
    key: Annotated[str, WIRE_STR, SECRET_KEY] = "token"
    """Key inside the Secret that holds the value."""


class SecretSource(_Model):
    """Where a secret value comes from. Only a Secret reference is accepted: never the value itself."""

    secret_key_ref: SecretKeySelector
    """The Secret and key that hold the value."""

    @model_validator(mode="before")
    @classmethod
    def _a_reference_not_a_value(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError(
                "a secret cannot be written inline; store it in a Secret and set "
                "secretKeyRef: {name: <secret>, key: <key>}"
            )
        return data


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


class ModelSource(_Model):
    """The base model: a Hub repository at a pinned revision, or a path inside the container."""

    RULES = (
        Rule(
            "has(self.id) != has(self.path)",
            "set exactly one of model.id (a Hub repository) or model.path (a local folder)",
            lambda m: (m.id is None) != (m.path is None),
        ),
        Rule(
            "!has(self.sourceId) || has(self.path)",
            "model.sourceId names the Hub repository a model.path folder is a copy of: set model.path, or "
            "drop model.sourceId (model.id is the repository itself)",
            lambda m: m.source_id is None or m.path is not None,
        ),
    )
    model_config = with_rules(*RULES)

    id: HubId | None = None
    """Hub repository id, e.g. `meta-llama/Llama-2-7b-hf`."""
    revision: Revision = "main"
    """Hub revision (branch, tag or commit) of `id`. Pin a commit for reproducible runs."""
    path: Path | None = None
    """A local folder (or a folder on a mounted volume) holding the model, instead of `id`."""
    source_id: HubId | None = None
    """For `path`: the Hub repository the folder is a copy of (a model mirrored onto a volume), named
    as the model card's `base_model`. Unset: the repository of a Hub cache snapshot folder, or the
    `_name_or_path` of its config.json when that is a Hub id; else the card names no `base_model` (its
    lineage still has the sha256 of every weight file)."""
    trust_remote_code: Bool = False
    """Run Python code shipped in the model repository. Off by default: it runs unreviewed code."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = None
    """Attention kernel. `flash_attention_2` needs a GPU and the flash-attn package in the image (the
    trainer says so before loading anything when it is missing). Unset: `sdpa`, or what
    `training.packing: bfd` needs for this model family."""


DatasetFormat = Literal["text", "alpaca", "chat", "completion"]
TrainOn = Literal["completion", "assistant", "all"]
# What `trainOn` unset means, per format: the loss on what the model should learn to write.
DEFAULT_TRAIN_ON: dict[str, TrainOn] = {
    "text": "all",
    "alpaca": "completion",
    "completion": "completion",
    "chat": "assistant",
}
# `trainOn` values each format can honour.
TRAIN_ON_BY_FORMAT: dict[str, tuple[TrainOn, ...]] = {
    "text": ("all",),
    "alpaca": ("completion", "all"),
    "completion": ("completion", "all"),
    "chat": ("assistant", "all"),
}
# The API server budgets each CEL rule by its worst case: a source's file-type rule runs over every file
# of every source, so sources x files per source stays near a single source's 256 files.
MAX_DATASET_SOURCES = 8
MAX_SOURCE_FILES = 64


class ValidationSplit(_Model):
    """Held-out data for evaluation: a named split of the dataset, or a fraction of the training rows."""

    RULES = (
        Rule(
            "has(self.split) != has(self.fraction)",
            "set exactly one of validation.split or validation.fraction",
            lambda m: (m.split is None) != (m.fraction is None),
        ),
    )
    model_config = with_rules(*RULES)

    split: Identifier | None = None
    """Name of a split of the Hub dataset, e.g. `test`."""
    fraction: Number | None = Field(default=None, gt=0, lt=1)
    """Fraction of the cleaned training rows held out for evaluation, e.g. `0.05`."""


DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _file_kind(path: str) -> str | None:
    lower = path.lower()
    for suffix, kind in DATA_FILE_TYPES.items():
        if lower.endswith(suffix):
            return kind
    return None


def _one_file_type(files: list[str] | None) -> bool:
    if files is None:
        return True
    kinds = {_file_kind(f) for f in files}
    return None not in kinds and len(kinds) <= 1


def _all_end_with(*suffixes: str) -> str:
    return "self.files.all(f, " + " || ".join(f"f.lowerAscii().endsWith('{s}')" for s in suffixes) + ")"


def _train_on_fits(fmt: str | None, train_on: str | None) -> bool:
    return train_on is None or train_on in TRAIN_ON_BY_FORMAT[fmt or "text"]


_TRAIN_ON_RULE = Rule(
    "!has(self.trainOn) || "
    + " || ".join(
        f"((has(self.format) ? self.format : 'text') == '{fmt}' && self.trainOn in {list(values)!r})"
        for fmt, values in TRAIN_ON_BY_FORMAT.items()
    ),
    "trainOn must suit the format: text trains on all; alpaca and completion on completion or all; "
    "chat on assistant or all",
    lambda m: _train_on_fits(m.format, m.train_on),
    field="trainOn",
)
_FILES_RULE = Rule(
    "!has(self.files) || "
    + " || ".join(
        _all_end_with(*[s for s, k in DATA_FILE_TYPES.items() if k == kind])
        for kind in dict.fromkeys(DATA_FILE_TYPES.values())
    ),
    "dataset.files must be files of one type: use .jsonl, .json, .csv or .parquet files, not a mix",
    lambda m: _one_file_type(m.files),
    field="files",
)


class DatasetPart(_Model):
    """One source of training rows: a Hub dataset at a pinned revision, or local jsonl/csv/parquet
    files, with its own format and fields. A dataset is one source, or a mix of them (`sources`)."""

    RULES: ClassVar[tuple[Rule, ...]] = (  # DatasetSource, its subclass, has rules of its own too
        Rule(
            "has(self.id) != has(self.files)",
            "set exactly one of id (a Hub dataset) or files (local files)",
            lambda m: (m.id is None) != (m.files is None),
        ),
        _FILES_RULE,
        _TRAIN_ON_RULE,
    )
    model_config = with_rules(*RULES)

    id: HubId | None = None
    """Hub dataset id, e.g. `timdettmers/openassistant-guanaco`. The revision is resolved to its commit
    before loading, and that commit is what is trained on (and recorded in the model card)."""
    revision: Revision = "main"
    """Hub revision (branch, tag or commit) of `id`."""
    split: Identifier = "train"
    """Split of the Hub dataset to train on."""
    files: list[Path] | None = Field(default=None, min_length=1, max_length=MAX_SOURCE_FILES)
    """Local data files, all of one type: `.jsonl`/`.json`, `.csv` or `.parquet` (at most 64 per source of
    a mix, 256 for a dataset of one source)."""
    format: DatasetFormat = "text"
    """How rows become training text. `text`: one column of ready text (`textField`).
    `alpaca`: `instruction`/`input`/`output` columns in the Alpaca prompt.
    `completion`: a prompt column (`promptField`) and a completion column (`completionField`).
    `chat`: a list of `{role, content}` messages (`messagesField`) rendered with the chat template
    (`dataset.chatTemplate`, else the tokenizer's)."""
    text_field: Identifier = "text"
    """Column with the training text, for `format: text`."""
    messages_field: Identifier = "messages"
    """Column with the chat messages, for `format: chat`."""
    prompt_field: Identifier = "prompt"
    """Column with the prompt, for `format: completion`."""
    completion_field: Identifier = "completion"
    """Column with the completion, for `format: completion`."""
    train_on: TrainOn | None = None
    """Which tokens carry the loss. `completion`: the response only (alpaca, completion). `assistant`:
    the assistant turns only (chat; from the template's `{% generation %}` markers, else by role).
    `all`: every token, prompts and user turns included. Unset: `completion` for alpaca and
    completion data, `assistant` for chat, `all` for text."""
    weight: Number | None = Field(default=None, gt=0, le=100)
    """How much of this source goes into the mix, as a multiple of its cleaned rows: `0.5` samples half
    of them, `2` takes every row twice (seeded by `training.seed`). Unset: 1."""
    max_rows: Int | None = Field(default=None, ge=1)
    """At most this many of its cleaned rows (a seeded sample), after `weight`."""

    def effective_train_on(self) -> TrainOn:
        return self.train_on or DEFAULT_TRAIN_ON[self.format]


# The fields of a source, which a mix sets per source: (wire name, Python name, default). Written at the
# top of a mix with their default they change nothing (the trainer's spec file has every default).
_PER_SOURCE: tuple[tuple[str, str, Any], ...] = (
    ("format", "format", "text"),
    ("textField", "text_field", "text"),
    ("messagesField", "messages_field", "messages"),
    ("promptField", "prompt_field", "prompt"),
    ("completionField", "completion_field", "completion"),
    ("trainOn", "train_on", None),
    ("weight", "weight", None),
    ("maxRows", "max_rows", None),
    ("revision", "revision", "main"),
    ("split", "split", "train"),
)


class DatasetSource(DatasetPart):
    """The training data: one source (a Hub dataset or local files, with the fields of a source
    here), or a mix of several (`sources`), cleaned and deduplicated together."""

    RULES = (
        Rule(
            "[has(self.id), has(self.files), has(self.sources)].filter(x, x).size() == 1",
            "set exactly one of dataset.id (a Hub dataset), dataset.files (local files) or "
            "dataset.sources (a mix)",
            lambda m: [m.id is not None, m.files is not None, m.sources is not None].count(True) == 1,
        ),
        Rule(
            "!has(self.sources) || !("
            + " || ".join(
                f"(has(self.{wire}) && self.{wire} != {default!r})"
                if default is not None
                else f"has(self.{wire})"
                for wire, _, default in _PER_SOURCE
            )
            + ")",
            "with dataset.sources, set "
            + ", ".join(wire for wire, _, _ in _PER_SOURCE)
            + " on each source, not on dataset",
            lambda m: (
                m.sources is None
                or all(
                    getattr(m, name) == (default if default is not None else None)
                    for _, name, default in _PER_SOURCE
                )
            ),
        ),
        _FILES_RULE,
        _TRAIN_ON_RULE,
        Rule(
            "!has(self.validation) || !has(self.validation.split) || has(self.id)",
            "validation.split needs a Hub dataset (dataset.id); use validation.fraction with local files "
            "or dataset.sources",
            lambda m: m.validation is None or m.validation.split is None or m.id is not None,
        ),
    )
    model_config = with_rules(*RULES)

    files: list[Path] | None = Field(default=None, min_length=1, max_length=256)
    """Local data files, all of one type: `.jsonl`/`.json`, `.csv` or `.parquet`."""
    sources: list[DatasetPart] | None = Field(default=None, min_length=1, max_length=MAX_DATASET_SOURCES)
    """A mix of sources, each with its own format, fields, split, `weight` and `maxRows`, instead of
    `id`/`files`. Empty and duplicate rows are dropped across the mix (first source first), the rows
    are shuffled together by `training.seed`, and the counts of each source go into metrics.json and
    the model card."""
    validation: ValidationSplit | None = None
    """Evaluation data. Unset: no evaluation."""
    dedup: Bool = True
    """Drop exact duplicate rows (after dropping empty ones) before training."""
    chat_template: Annotated[str, WIRE_STR, CHAT_TEMPLATE] | None = None
    """The chat template to train and chat with: a built-in (`chatml`, `llama-2`, `alpaca`, `guanaco`
    for `### Human: / ### Assistant:`) or an inline Jinja template. It is saved with the tokenizer, so
    the pushed model chats the way it was trained. Unset: the tokenizer's own."""

    def parts(self) -> list[DatasetPart]:
        """The sources of the rows: `sources`, or this dataset as its one source."""
        if self.sources is not None:
            return list(self.sources)
        fields = {name: getattr(self, name) for name in DatasetPart.model_fields}
        return [DatasetPart.model_construct(_fields_set=self.model_fields_set & set(fields), **fields)]


# --------------------------------------------------------------------------------------------------
# Method: LoRA / QLoRA / full
# --------------------------------------------------------------------------------------------------


class LoraSpec(_Model):
    """LoRA adapter settings (PEFT)."""

    r: Int = Field(default=64, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: Int = Field(default=16, ge=1)
    """Scaling numerator: the update is scaled by `alpha / r`."""
    dropout: Number = Field(default=0.1, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[Identifier] | None = Field(default=None, min_length=1, max_length=64)
    """Module names to adapt. Unset: chosen per architecture (Llama: q/k/v/o/gate/up/down projections;
    Falcon and BLOOM: query_key_value, dense, dense_h_to_4h, dense_4h_to_h). `[all-linear]` adapts
    every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    modules_to_save: list[Identifier] | None = Field(default=None, min_length=1, max_length=32)
    """Modules trained in full and saved with the adapter, e.g. `[embed_tokens, lm_head]` when new
    tokens are added (a chat template's). Each is a full trainable copy: `kubetune plan` counts it."""
    use_dora: Bool = False
    """DoRA: weight-decomposed LoRA (a learned magnitude per output feature), closer to full fine-tuning
    at small ranks; slower per step."""
    rs_lora: Bool = False
    """Rank-stabilized LoRA: scale the update by `alpha / sqrt(r)` instead of `alpha / r`, which keeps
    high ranks learning."""


class QuantizationSpec(_Model):
    """Load the frozen base weights quantized through bitsandbytes."""

    bits: Literal[4, 8] = 4
    """4 (QLoRA) or 8. One value, so 4- and 8-bit can never be asked for together."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: Bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bit per weight)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Data type of the 4-bit matmuls. `float32` on CPUs without bf16."""


class MethodSpec(_Model):
    """How the model is tuned."""

    RULES = (
        Rule(
            # type and bits default to qlora and 4, and CEL sees only what was written.
            "(has(self.type) && self.type != 'qlora') || !has(self.quantization) "
            "|| !has(self.quantization.bits) || self.quantization.bits == 4",
            "qlora needs 4-bit quantization: set method.quantization.bits to 4, or use method.type lora",
            lambda m: m.type != "qlora" or m.quantization is None or m.quantization.bits == 4,
        ),
        Rule(
            "!has(self.type) || self.type != 'full' || (!has(self.quantization) && !has(self.lora))",
            "full fine-tuning trains every weight and 4/8-bit weights need an adapter: remove "
            "method.quantization and method.lora, or use method.type qlora/lora",
            lambda m: m.type != "full" or (m.quantization is None and m.lora is None),
        ),
    )
    model_config = with_rules(*RULES)

    type: Literal["qlora", "lora", "full"] = "qlora"
    """`qlora`: 4-bit base + LoRA. `lora`: LoRA on a bf16/fp16 base (optionally 8-bit).
    `full`: every weight is trained, no adapter."""
    lora: LoraSpec | None = None
    """Adapter settings, for `qlora` and `lora`. Unset: the recipe defaults."""
    quantization: QuantizationSpec | None = None
    """Base-weight quantization. Unset: 4-bit nf4 for `qlora`, none otherwise."""

    @property
    def uses_adapter(self) -> bool:
        return self.type != "full"

    def effective_lora(self) -> LoraSpec | None:
        if not self.uses_adapter:
            return None
        return self.lora or LoraSpec()

    def effective_quantization(self) -> QuantizationSpec | None:
        if self.quantization is not None:
            return self.quantization
        return QuantizationSpec() if self.type == "qlora" else None


# --------------------------------------------------------------------------------------------------
# Training hyper-parameters
# --------------------------------------------------------------------------------------------------

Optimizer = Literal[
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adafactor",
    "sgd",
]
Scheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]

DEFAULT_MAX_STEPS = 500
DEFAULT_MAX_SEQ_LENGTH = 512

Packing = Literal["none", "wrapped", "bfd"]
# bench/packing.py: with groupByLength, padded batches already compute 0.99+ real tokens, and `none`
# keeps the Guanaco recipe's rows per step; README "Packing" gives the numbers.
DEFAULT_PACKING: Packing = "none"


def _wire_packing(value: Any) -> Any:
    # `packing` was a boolean before bfd: an old file gets what the words became, not a bare enum error.
    if isinstance(value, bool):
        raise ValueError(
            "packing is no longer true/false: set none (was false), wrapped (was true: rows concatenated "
            "and cut into blockSize blocks) or bfd (whole rows packed, no attention across them)"
        )
    return value


Tracker = Literal["tensorboard", "mlflow", "wandb"]
TrackerText = Annotated[str, WIRE_STR, text(2048)]


_URL_PASSWORD_RE = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@"
_URL_PASSWORD = re.compile(_URL_PASSWORD_RE)


class MlflowSpec(_Model):
    """MLflow settings (`training.reportTo: [mlflow]`)."""

    RULES = (
        Rule(
            f"!has(self.trackingUri) || !self.trackingUri.matches({cel_string(_URL_PASSWORD_RE)})",
            "training.trackers.mlflow.trackingUri must not hold a password (it would sit in the spec and "
            "the trainer's ConfigMap): set training.trackers.mlflow.username and .password (a Secret)",
            lambda m: m.tracking_uri is None or _URL_PASSWORD.match(m.tracking_uri) is None,
            field="trackingUri",
        ),
    )
    model_config = with_rules(*RULES)

    tracking_uri: TrackerText | None = None
    """`MLFLOW_TRACKING_URI`, e.g. `http://mlflow.mlflow:5000`. Unset: a file store in the run folder
    (`<run>/mlruns`, on the workspace)."""
    experiment: TrackerText | None = None
    """`MLFLOW_EXPERIMENT_NAME`. Unset: the FineTuneJob's name."""
    username: TrackerText | None = None
    """`MLFLOW_TRACKING_USERNAME`, for a server with basic authentication."""
    password: SecretSource | None = None
    """`MLFLOW_TRACKING_PASSWORD`, only as a Secret reference."""
    token: SecretSource | None = None
    """`MLFLOW_TRACKING_TOKEN` (a bearer token), only as a Secret reference."""


class WandbSpec(_Model):
    """Weights & Biases settings (`training.reportTo: [wandb]`)."""

    project: TrackerText | None = None
    """`WANDB_PROJECT`. Unset: `kubetune`."""
    entity: TrackerText | None = None
    """`WANDB_ENTITY`: the team or user. Unset: the API key's default."""
    base_url: TrackerText | None = None
    """`WANDB_BASE_URL`, for a self-hosted W&B server."""
    mode: Literal["online", "offline"] = "online"
    """`offline` writes the run to the run folder (`<run>/wandb`) for a later `wandb sync`, with no
    network and no key."""
    api_key: SecretSource | None = None
    """`WANDB_API_KEY`, only as a Secret reference. Needed for `mode: online`."""


class TrackersSpec(_Model):
    """Experiment tracker settings. Credentials come only from Secrets (`secretKeyRef`), like the Hub
    token, and never reach the spec, the logs or the model card."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None


class TrainingSpec(_Model):
    """Optimisation hyper-parameters (passed to TRL's SFTTrainer)."""

    RULES = (
        Rule(
            "!(has(self.epochs) && has(self.maxSteps))",
            "set training.epochs or training.maxSteps, not both",
            lambda t: t.epochs is None or t.max_steps is None,
        ),
        Rule(
            "!has(self.blockSize) "
            f"|| self.blockSize <= (has(self.maxSeqLength) ? self.maxSeqLength : {DEFAULT_MAX_SEQ_LENGTH})",
            "training.blockSize cannot exceed training.maxSeqLength",
            lambda t: t.block_size is None or t.block_size <= t.max_seq_length,
        ),
        Rule(
            "!has(self.blockSize) || !has(self.packing) || self.packing == 'wrapped'",
            "training.blockSize is the length of wrapped blocks: set training.packing to wrapped or drop "
            "training.blockSize",
            lambda t: t.block_size is None or t.packing in (None, "wrapped"),
        ),
        Rule(
            "!has(self.reportTo) || !('wandb' in self.reportTo) || (has(self.trackers) "
            "&& has(self.trackers.wandb) && ((has(self.trackers.wandb.mode) && self.trackers.wandb.mode == "
            "'offline') || has(self.trackers.wandb.apiKey)))",
            "reportTo wandb needs training.trackers.wandb.apiKey (a Secret with your W&B API key), or "
            "training.trackers.wandb.mode offline",
            lambda t: (
                "wandb" not in t.report_to
                or (
                    t.trackers.wandb is not None
                    and (t.trackers.wandb.mode == "offline" or t.trackers.wandb.api_key is not None)
                )
            ),
        ),
        Rule(
            "!has(self.earlyStoppingPatience) || !has(self.saveSteps) || !has(self.evalSteps) "
            "|| self.saveSteps % self.evalSteps == 0",
            "early stopping keeps the best checkpoint, so training.saveSteps must be a multiple of "
            "training.evalSteps",
            lambda t: (
                t.early_stopping_patience is None
                or t.save_steps is None
                or t.eval_steps is None
                or t.save_steps % t.eval_steps == 0
            ),
        ),
    )
    model_config = with_rules(*RULES)

    learning_rate: Number = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    epochs: Number | None = Field(default=None, gt=0)
    """Passes over the training data. Set this or `maxSteps`."""
    max_steps: Int | None = Field(default=None, ge=1)
    """Optimizer steps. Unset and no `epochs`: 500 (the Guanaco recipe)."""
    per_device_batch_size: Int = Field(default=4, ge=1)
    """Sequences per GPU per forward pass."""
    gradient_accumulation_steps: Int = Field(default=4, ge=1)
    """Forward passes per optimizer step. Global batch = batch size x accumulation x GPUs."""
    max_seq_length: Int = Field(default=DEFAULT_MAX_SEQ_LENGTH, ge=16, le=131072)
    """Longest tokenized sequence; longer rows are truncated."""
    packing: Annotated[Packing, BeforeValidator(_wire_packing)] | None = None
    """How rows fill the training sequences. `none`: one row per sequence, padded per batch (see
    `groupByLength`). `wrapped`: rows are concatenated and cut into `blockSize`-token blocks
    (AutoTrain's packing); rows share an attention window, so tokens attend across row boundaries.
    `bfd`: best-fit-decreasing packs whole rows into sequences of at most `maxSeqLength` tokens,
    padding-free with per-row positions, so no token attends across rows (flash-attention varlen or
    SDPA with a block mask; padded per row for models that cannot, such as BLOOM). Unset: `wrapped`
    when `blockSize` is set, else `none`."""
    block_size: Int | None = Field(default=None, ge=16, le=131072)
    """Length of the `wrapped` blocks (AutoTrain's `block_size`). Setting it without `packing` means
    `wrapped`; rows are first truncated to `maxSeqLength` (AutoTrain's `model_max_length`). Unset:
    `maxSeqLength`."""
    optimizer: Optimizer = "paged_adamw_32bit"
    """Optimizer. `paged_*` optimizers page their state to CPU memory under pressure."""
    lr_scheduler: Scheduler = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Number = Field(default=0.03, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up."""
    max_grad_norm: Number = Field(default=0.3, gt=0)
    """Gradient clipping threshold."""
    weight_decay: Number = Field(default=0.001, ge=0)
    """Decoupled weight decay."""
    group_by_length: Bool = True
    """Batch rows of similar length together (less padding, faster)."""
    gradient_checkpointing: Bool = True
    """Recompute activations in the backward pass: much less memory, ~30% slower."""
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """`auto`: bf16 on GPUs that support it, else fp16 on GPU, none on CPU."""
    upcast_norms: Bool = True
    """Keep normalization layers in float32 (as in the QLoRA recipe) for stable training."""
    seed: Int = Field(default=42, ge=0, le=2**32 - 1)
    """Random seed for data order, dropout and initialisation (NumPy takes at most 2^32 - 1)."""
    logging_steps: Int = Field(default=10, ge=1)
    """Log loss and learning rate every N steps."""
    save_steps: Int | None = Field(default=None, ge=1)
    """Checkpoint every N steps (resume after preemption restarts from the last one). Unset: 10 x
    `loggingSteps`, at most 100."""
    save_total_limit: Int = Field(default=2, ge=1)
    """Checkpoints kept on disk."""
    eval_steps: Int | None = Field(default=None, ge=1)
    """Evaluate every N steps. Unset: at each checkpoint."""
    early_stopping_patience: Int | None = Field(default=None, ge=1)
    """Stop when the validation loss has not improved for N evaluations. Needs `dataset.validation`."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Multi-GPU strategy through accelerate: `ddp` replicates the model, `fsdp` shards it."""
    neftune_noise_alpha: Number | None = Field(default=None, gt=0, le=100)
    """NEFTune: add uniform noise of this scale to the input embeddings while training (`5` in the
    paper), which often helps instruction tuning. Unset: off."""
    report_to: list[Tracker] = Field(default_factory=list, max_length=3)
    """Experiment trackers to log to: `tensorboard` (event files in the run folder, on the workspace),
    `mlflow`, `wandb`. Their settings and credentials are in `training.trackers`. Empty: none."""
    trackers: TrackersSpec = Field(default_factory=lambda: TrackersSpec())
    """Settings of the experiment trackers in `reportTo`."""

    def effective_max_steps(self) -> int:
        """-1 means "run `epochs` epochs" (the transformers convention)."""
        if self.max_steps is not None:
            return self.max_steps
        return -1 if self.epochs is not None else DEFAULT_MAX_STEPS

    def effective_packing(self) -> Packing:
        """`packing`, resolved: unset means `wrapped` with a `blockSize` (AutoTrain), else the default."""
        if self.packing is not None:
            return self.packing
        return "wrapped" if self.block_size is not None else DEFAULT_PACKING

    def effective_block_size(self) -> int:
        """Tokens per training sequence: per `wrapped` block, per `bfd` bin, per row at most."""
        return self.block_size or self.max_seq_length

    def effective_save_steps(self) -> int:
        return self.save_steps or min(100, 10 * self.logging_steps)

    def effective_eval_steps(self) -> int:
        return self.eval_steps or self.effective_save_steps()


# --------------------------------------------------------------------------------------------------
# Resources and scheduling
# --------------------------------------------------------------------------------------------------

TOLERATION_KEY = Format(
    "toleration key",
    253 + 1 + 63,
    (
        Check(
            f"self == '' || ({_QUALIFIED_RULE})",
            QUALIFIED_NAME_MESSAGE,
            lambda v: v == "" or _is_qualified_name(v),
        ),
    ),
)


class Toleration(_Model):
    """A Pod toleration (same fields and rules as core/v1 Toleration)."""

    RULES = (
        Rule(
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "a toleration without a key must use operator Exists (it then tolerates every taint): set "
            "key, or operator: Exists",
            lambda t: bool(t.key) or t.operator == "Exists",
        ),
        Rule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "operator Exists matches any value: remove value, or use operator: Equal",
            lambda t: t.operator != "Exists" or not t.value,
            field="value",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds applies only to effect NoExecute: set effect: NoExecute, or remove "
            "tolerationSeconds",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            field="tolerationSeconds",
        ),
    )
    model_config = with_rules(*RULES)

    key: Annotated[str, WIRE_STR, TOLERATION_KEY] | None = None
    """Taint key to tolerate. Empty (with operator Exists): every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """`Equal` (the default): the taint's value must be `value`. `Exists`: any value."""
    value: LabelValue | None = None
    """Taint value to match, for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match. Empty: every effect."""
    toleration_seconds: Int | None = None
    """For effect NoExecute: how long the pod stays bound after the taint appears."""


class ResourcesSpec(_Model):
    """Compute for each trainer Pod (one Pod per node)."""

    RULES = (
        Rule(
            "!has(self.gpuType) || !has(self.gpusPerNode) || self.gpusPerNode > 0",
            "resources.gpuType needs GPUs: set resources.gpusPerNode to 1 or more",
            lambda r: r.gpu_type is None or r.gpus_per_node > 0,
        ),
        Rule(
            "!has(self.nodes) || self.nodes == 1 || !has(self.gpusPerNode) || self.gpusPerNode > 0",
            "multi-node runs need GPUs: set resources.gpusPerNode to 1 or more, or resources.nodes to 1",
            lambda r: r.nodes == 1 or r.gpus_per_node > 0,
        ),
    )
    model_config = with_rules(*RULES)

    gpus_per_node: Int = Field(default=1, ge=0, le=16)
    """`nvidia.com/gpu` requested by each Pod; one training process per GPU. 0 trains on CPU."""
    nodes: Int = Field(default=1, ge=1, le=MAX_NODES)
    """Pods (nodes) in the run. More than one runs multi-node through an Indexed Job."""
    gpu_type: Annotated[str, WIRE_STR, GPU_TYPE] | None = None
    """Required GPU product, matched against the node label `nvidia.com/gpu.product`
    (e.g. `NVIDIA-A100-SXM4-80GB`)."""
    cpu: Quantity | None = None
    """CPU request (and limit) per Pod, e.g. `"8"` (quoted: a quantity is a string)."""
    memory: Quantity | None = None
    """Memory request (and limit) per Pod, e.g. `64Gi`."""
    shared_memory: Quantity = "8Gi"
    """Size of `/dev/shm` (data loader workers and NCCL need more than the container default)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Extra tolerations. The `nvidia.com/gpu` taint is always tolerated when GPUs are requested."""
    node_selector: SpecLabels = Field(default_factory=dict)
    """Extra node labels the Pods must land on (label keys and values)."""
    priority_class_name: Name | None = None
    """PriorityClass of the Pods."""


# --------------------------------------------------------------------------------------------------
# Output, samples, run policy
# --------------------------------------------------------------------------------------------------


class HubOutput(_Model):
    """Push the result to a Hugging Face Hub repository."""

    repo_id: HubId
    """Target repository, e.g. `my-org/falcon-7b-guanaco`. Created when missing."""
    private: Bool = True
    """Create the repository as private."""
    revision: Revision = "main"
    """Branch to push to (created when missing)."""
    token: SecretSource
    """The Hugging Face token with write access, only as a Secret reference. It is also used to
    download gated base models and datasets."""


class OutputSpec(_Model):
    """Where the result goes. The adapter, tokenizer (with chat template), model card, metrics and
    samples are always written to `path`; `hub` also pushes them."""

    RULES = (
        Rule(
            "!has(self.pushMerged) || !self.pushMerged || has(self.hub)",
            "output.pushMerged needs output.hub",
            lambda o: not o.push_merged or o.hub is not None,
        ),
    )
    model_config = with_rules(*RULES)

    path: Annotated[str, WIRE_STR, OUTPUT_PATH] = "/workspace/output"
    """Output folder inside the trainer container, on the workspace volume by default (a relative
    path starts at `storage.mountPath`). Each run writes into a folder of its own,
    `<path>/runs/<run name>` (`status.outputPath`), checkpoints included."""
    hub: HubOutput | None = None
    """Also push to the Hub."""
    push_adapter: Bool = True
    """Push the LoRA adapter (ignored for `method.type: full`, which pushes the full model)."""
    push_merged: Bool = False
    """Kept for older files: `merged: true` with `output.hub`, and it needs `output.hub`."""
    merged: Bool = False
    """Also merge the adapter into the (unquantized) base weights and save the merged model, with its
    own model card, in `<run folder>/merged/`; with `output.hub` it is pushed under `merged/` in the
    same repository. Ignored for `method.type: full`."""

    @property
    def wants_merged(self) -> bool:
        return self.merged or self.push_merged


class SamplesSpec(_Model):
    """Text generated by the tuned model after training, saved with the results and the model card."""

    prompts: list[Prompt] = Field(default_factory=list, max_length=32)
    """Prompts to complete. Empty: no samples."""
    max_new_tokens: Int = Field(default=64, ge=1, le=4096)
    top_k: Int = Field(default=50, ge=0)
    top_p: Number = Field(default=0.9, gt=0, le=1)
    temperature: Number = Field(default=1.0, gt=0)


DEFAULT_STORAGE_SIZE = "50Gi"


class StorageSpec(_Model):
    """The workspace volume, mounted at `mountPath` in every trainer Pod. It holds the model and
    data caches (`HF_HOME`), checkpoints and each run's output folder, so a replaced Pod resumes
    from its last checkpoint without downloading anything again. By default kubetune creates a
    PersistentVolumeClaim `<name>-workspace` for the FineTuneJob (ReadWriteOnce; ReadWriteMany when
    `resources.nodes` > 1)."""

    RULES = (
        Rule(
            "!has(self.claimName) || !has(self.ephemeral) || !self.ephemeral",
            "set storage.claimName (an existing claim) or storage.ephemeral (an emptyDir), not both",
            lambda s: s.claim_name is None or not s.ephemeral,
        ),
        Rule(
            "(!has(self.claimName) && (!has(self.ephemeral) || !self.ephemeral)) "
            f"|| ((!has(self.size) || self.size == '{DEFAULT_STORAGE_SIZE}') "
            "&& !has(self.storageClassName))",
            "set storage.size and storage.storageClassName (the claim kubetune creates) or "
            "storage.claimName / storage.ephemeral, not both",
            lambda s: s.creates_claim or (s.size == DEFAULT_STORAGE_SIZE and s.storage_class_name is None),
        ),
    )
    model_config = with_rules(*RULES)

    claim_name: Name | None = None
    """An existing PersistentVolumeClaim to mount instead of the one kubetune creates; kubetune
    creates nothing and never deletes it."""
    mount_path: Annotated[str, WIRE_STR, MOUNT_PATH] = "/workspace"
    """Where the volume is mounted (not over a path kubetune mounts itself)."""
    size: Quantity = DEFAULT_STORAGE_SIZE
    """Size of the claim kubetune creates: room for the base model, the data, checkpoints and
    outputs."""
    storage_class_name: Name | None = None
    """StorageClass of the claim kubetune creates. Unset: the cluster's default StorageClass."""
    ephemeral: Bool = False
    """An emptyDir instead of a claim: nothing is kept, and a replaced Pod (after a preemption)
    starts from scratch and downloads everything again."""
    reclaim_policy: Literal["Delete", "Retain"] = "Delete"
    """What happens to the claim kubetune creates when the FineTuneJob is deleted. `Delete`: it is
    owned by the FineTuneJob and deleted with it. `Retain`: it is kept (no owner reference), and a
    FineTuneJob of the same name uses it again."""

    @property
    def creates_claim(self) -> bool:
        """kubetune creates (and owns, unless Retain) the workspace claim."""
        return self.claim_name is None and not self.ephemeral


class RunPolicy(_Model):
    """Job-level policy, with batch/v1 Job names (and their bounds)."""

    suspend: Bool = False
    """Pause the run (the Job's Pods are deleted; the run continues from its last checkpoint when
    resumed). Ignored with `queueName`: Kueue then owns the Job's `suspend`."""
    backoff_limit: Int = Field(default=3, ge=0, le=INT32_MAX)
    """Pod failures before the run is Failed. Preemptions (`DisruptionTarget`) do not count."""
    active_deadline_seconds: Int | None = Field(default=None, ge=1)
    """Wall-clock limit of the run."""
    ttl_seconds_after_finished: Int | None = Field(default=None, ge=0, le=INT32_MAX)
    """Delete the finished Job after this long (the FineTuneJob and its status stay)."""
    queue_name: Annotated[str, WIRE_STR, QUEUE_NAME] | None = None
    """Kueue LocalQueue. The Job is created suspended, with the queue label, and Kueue admits it
    (state `Queued` until then)."""


class PodMetadata(_Model):
    """Extra labels and annotations for the trainer Pods (e.g. `cluster-autoscaler.kubernetes.io/
    safe-to-evict: "false"`, or a service mesh opt-out). kubetune's own labels win on a clash."""

    labels: SpecLabels = Field(default_factory=dict)
    """Label keys and values, at most 64."""
    annotations: SpecAnnotations = Field(default_factory=dict)
    """At most 64, each value at most 32 KiB, 256 KiB in all (the API server's limit)."""


class FineTuneJobSpec(_Model):
    """Desired state of a FineTuneJob."""

    RULES = (
        Rule(
            "!has(self.training) || !has(self.training.earlyStoppingPatience) "
            "|| has(self.dataset.validation)",
            "training.earlyStoppingPatience needs evaluation data: set dataset.validation",
            lambda s: s.training.early_stopping_patience is None or s.dataset.validation is not None,
        ),
    )
    model_config = with_rules(*RULES)

    model: ModelSource
    """The base model."""
    dataset: DatasetSource
    """The training data."""
    method: MethodSpec = Field(default_factory=MethodSpec)
    """QLoRA (default), LoRA or full fine-tuning."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Hyper-parameters."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """GPUs, nodes and scheduling."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """The working volume (checkpoints, caches, output)."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the result goes."""
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    """Generations recorded after training."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Suspend, retries, deadlines, clean-up, queueing."""
    image: Annotated[str, WIRE_STR, IMAGE] | None = None
    """Trainer image. Unset: the image matching the operator's version."""
    pod_metadata: PodMetadata = Field(default_factory=PodMetadata)
    """Extra labels and annotations for the trainer Pods."""
    # kubetune.render.spec_hash, computed once: the operator asks for it many times a pass, and a spec
    # is never changed once validated (not a field: no schema, no dump, no comparison sees it).
    _digest: str | None = PrivateAttr(default=None)


# --------------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------------

State = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]


class Condition(_Model):
    """A standard Kubernetes condition."""

    model_config = ConfigDict(extra="allow")

    type: Str
    status: Literal["True", "False", "Unknown"]
    reason: Str | None = None
    message: Str | None = None
    last_transition_time: Str | None = None
    observed_generation: Int | None = None


class FineTuneJobStatus(_Model):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")

    state: State | None = None
    """Pending, Queued (Kueue holds the Job), Running, Suspended, Succeeded or Failed."""
    phase: Phase | None = None
    """What the trainer is doing, as it last reported: Loading, Training, Evaluating, Saving,
    Pushing, Succeeded, Failed or Preempted."""
    reason: Str | None = None
    """The reason of the condition that explains the state, e.g. `Unschedulable`, `SecretMissing`,
    `OOMKilled`, `Preempted`."""
    progress: Str | None = None
    """Training progress, e.g. `37%`."""
    loss: Str | None = None
    """Latest training loss."""
    eta: Str | None = None
    """Estimated time left, e.g. `1h12m`."""
    tokens_per_second: Int | None = None
    """Non-padding tokens trained per second (all GPUs of the run), as the trainer last reported."""
    step: Int | None = None
    total_steps: Int | None = None
    restarts: Int | None = None
    """Trainer Pods restarted (preemptions and failures); each one resumes from the last checkpoint."""
    preemptions: Int | None = None
    """Of the restarts, those after a preemption or eviction (not failures: they use up no retries)."""
    job_name: Str | None = None
    """The batch/v1 Job of the current run."""
    spec_hash: Str | None = None
    """Hash of the spec the current run was started from."""
    workspace_claim: Str | None = None
    """The PersistentVolumeClaim mounted as the workspace (none with `storage.ephemeral`)."""
    output_path: Str | None = None
    """Where the current run writes its results: `<output.path>/runs/<run name>`."""
    base_model_commit: Str | None = None
    """The Hub commit `model.revision` resolved to, which the run trained on (as the trainer reported)."""
    hub_commit_url: Str | None = None
    """The Hub commit of the run's push (`output.hub`), as the trainer reported it."""
    observed_generation: Int | None = None
    start_time: Str | None = None
    completion_time: Str | None = None
    conditions: list[Condition] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The resource
# --------------------------------------------------------------------------------------------------


class ObjectMeta(_Model):
    """The parts of metadata kubetune reads, checked as the API server checks them; the rest is kept as
    it is."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, WIRE_STR, JOB_NAME]
    namespace: Annotated[str, WIRE_STR, DNS_LABEL] | None = None
    uid: Str | None = None
    generation: Int | None = None
    labels: MetaLabels = Field(default_factory=dict)
    annotations: MetaAnnotations = Field(default_factory=dict)


def _size_path(data: Any, loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], int]:
    """The field that takes most of `data` (as JSON): descend while one child holds most of it."""
    size = len(json.dumps(data))
    while isinstance(data, dict) and data:
        sizes = {k: len(json.dumps(v)) for k, v in data.items()}
        key = max(sizes, key=lambda k: sizes[k])
        if sizes[key] * 2 < size:
            break
        data, size, loc = data[key], sizes[key], (*loc, key)
    return loc, size


class FineTuneJob(_Model):
    """Fine-tune a causal language model (QLoRA, LoRA or full) and publish the result."""

    # Only metadata.name (and generateName) are visible to CEL at the root; the API server checks the
    # rest of metadata itself.
    model_config = ConfigDict(
        json_schema_extra={
            "cel": [
                cel(on(c.rule, "self.metadata.name"), "metadata.name " + c.message) for c in JOB_NAME.checks
            ]
        }
    )

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_tokens(cls, data: Any) -> Any:
        leaked = find_tokens(data)
        if leaked:
            # Checked before anything else, and the message names where, never what.
            raise ValueError(
                "inline Hugging Face token at "
                + ", ".join(".".join(map(str, loc)) for loc in leaked)
                + ": "
                + INLINE_TOKEN_FIX
            )
        return data

    @model_validator(mode="after")
    def _fits_in_a_configmap(self) -> FineTuneJob:
        from kubetune.render import CONFIGMAP_MAX_BYTES, configmap_bytes  # render imports this module

        size = configmap_bytes(self)
        if size <= CONFIGMAP_MAX_BYTES:
            return self
        spec = self.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        loc, part = _size_path(spec, ("spec",))
        message = (
            f"makes the trainer's ConfigMap (the spec with every default) {size / 1048576:.2f} MiB, over "
            f"the 1 MiB Kubernetes allows a ConfigMap; this field is about {part // 1024} KiB of it: "
            "make it smaller"
        )
        raise ValidationError.from_exception_data("FineTuneJob", [_error_at(loc, message)])
