"""What a FineTuneJob may ask for in a shared cluster: one set of limits, enforced in two places.

The platform team writes the limits into one ConfigMap (the chart's `<release>-policy` in the release
namespace; the kustomize base's `kubetune-system/kubetune-policy`). Every value is a string; lists are
comma- or newline-separated; an empty or absent key sets no limit:

| Key | Limits |
|---|---|
| `allowedImagePrefixes` | `spec.image` must start with one of them (unset: the operator's default image) |
| `maxGPUsPerJob` | `resources.gpusPerNode` x `resources.nodes` |
| `allowedPriorityClasses` | `resources.priorityClassName` |
| `allowedTolerationKeys` | the key of each `resources.tolerations` item (one without a key never passes) |
| `allowedNodeSelectorKeys` | the keys of `resources.nodeSelector` |

Two enforcers read it:
- the API server, through the ValidatingAdmissionPolicy `limits` (`admission_policies()`: CEL, with the
  ConfigMap as the binding's parameter), and `author-access`, which refuses a FineTuneJob whose author may
  not `get` a Secret or claim it names (CEL's `authorizer`: only the API server knows who the author is);
- the operator, through `check(job, limits)`, before it creates a run (for clusters without the policy).

Each limit's Python check and CEL expression sit side by side here and share one message template, so
both say the same words. `python -m kubetune.policy` writes the policies into the Helm chart and the
kustomize base; tests/test_policy.py fails when those copies are stale.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import GROUP, PLURAL, FineTuneJob

IMAGES = "allowedImagePrefixes"
MAX_GPUS = "maxGPUsPerJob"
PRIORITY_CLASSES = "allowedPriorityClasses"
TOLERATION_KEYS = "allowedTolerationKeys"
NODE_SELECTOR_KEYS = "allowedNodeSelectorKeys"
KEYS = (IMAGES, MAX_GPUS, PRIORITY_CLASSES, TOLERATION_KEYS, NODE_SELECTOR_KEYS)
LIST_KEYS = (IMAGES, PRIORITY_CLASSES, TOLERATION_KEYS, NODE_SELECTOR_KEYS)
# A whole number that CEL's int() cannot overflow on.
WHOLE_NUMBER = "^[0-9]{1,9}$"

# Condition reasons of the operator's check (kubetune_operator.plan).
VIOLATION = "PolicyViolation"  # Failed: the spec asks for more than the limits allow
UNAVAILABLE = "PolicyUnavailable"  # Pending: the limits cannot be read, so no run starts


class PolicyError(ValueError):
    """The ConfigMap itself is wrong (an unknown key, a number that is not one)."""


# --------------------------------------------------------------------------------------------------
# Messages: one template, rendered by Python and by CEL
# --------------------------------------------------------------------------------------------------


def cel_string(text: str) -> str:
    """`text` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Message:
    """A message template (`str.format` fields) and, for the admission policy, the CEL expression of
    each field."""

    template: str
    cel: Mapping[str, str]

    def text(self, **values: object) -> str:
        return self.template.format(**values)

    def expression(self) -> str:
        """The CEL messageExpression that renders the same text."""
        parts: list[str] = []
        for literal, name, _, _ in string.Formatter().parse(self.template):
            if literal:
                parts.append(cel_string(literal))
            if name is not None:
                parts.append(f"({self.cel[name]})")
        return " + ".join(parts)


ASK = "ask your platform team to change {source}"
SOURCE = "variables.source"  # 'ConfigMap <namespace>/<name>', a variable of the limits policy


def _quoted(variable: str) -> str:
    """CEL: the strings of a list variable, joined as `a", "b` (the template adds the outer quotes)."""
    return f"variables.{variable}.join('\", \"')"


UNKNOWN_KEYS = Message(
    '{source}: unknown key(s) "{unknown}" (the keys are {keys}); no FineTuneJob passes until your '
    "platform team fixes {source}",
    {"source": SOURCE, "unknown": _quoted("unknownKeys"), "keys": cel_string(", ".join(KEYS))},
)
BAD_MAX_GPUS = Message(
    '{source}: maxGPUsPerJob "{value}" is not a whole number; no FineTuneJob passes until your platform '
    "team fixes {source}",
    {"source": SOURCE, "value": f"variables.{MAX_GPUS}"},
)
IMAGE = Message(
    'spec.image: "{image}" is not allowed: images must start with one of {allowed} (allowedImagePrefixes '
    "in {source}); use such an image, or leave spec.image unset for the default trainer image, or " + ASK,
    {"image": "object.spec.image", "allowed": f"variables.{IMAGES}.join(', ')", "source": SOURCE},
)
GPUS = Message(
    "spec.resources: {gpus} GPUs (gpusPerNode {per_node} x nodes {nodes}) is more than the {limit} one "
    "FineTuneJob may use (maxGPUsPerJob in {source}); use fewer, or " + ASK,
    {
        "gpus": "string(variables.gpusPerNode * variables.nodes)",
        "per_node": "string(variables.gpusPerNode)",
        "nodes": "string(variables.nodes)",
        "limit": f"variables.{MAX_GPUS}",
        "source": SOURCE,
    },
)
PRIORITY = Message(
    'spec.resources.priorityClassName: "{name}" is not allowed: use one of {allowed} '
    "(allowedPriorityClasses in {source}), or leave it unset, or " + ASK,
    {
        "name": "object.spec.resources.priorityClassName",
        "allowed": f"variables.{PRIORITY_CLASSES}.join(', ')",
        "source": SOURCE,
    },
)
TOLERATIONS = Message(
    'spec.resources.tolerations: key(s) "{keys}" not allowed: the allowed keys are {allowed} '
    "(allowedTolerationKeys in {source}), and a toleration without a key (it tolerates every taint) is "
    "never allowed; remove them, or " + ASK,
    {
        "keys": _quoted("badTolerationKeys"),
        "allowed": f"variables.{TOLERATION_KEYS}.join(', ')",
        "source": SOURCE,
    },
)
NODE_SELECTOR = Message(
    'spec.resources.nodeSelector: key(s) "{keys}" not allowed: the allowed keys are {allowed} '
    "(allowedNodeSelectorKeys in {source}); remove them, or " + ASK,
    {
        "keys": _quoted("badNodeSelectorKeys"),
        "allowed": f"variables.{NODE_SELECTOR_KEYS}.join(', ')",
        "source": SOURCE,
    },
)


def missing_message(source: str) -> str:
    return (
        f"{source}, which holds the limits on FineTuneJobs, does not exist: no run starts until your "
        "platform team creates it (`helm upgrade` restores the chart's)"
    )


def unreadable_message(source: str, why: str) -> str:
    return (
        f"the operator cannot read {source}, which holds the limits on FineTuneJobs ({why}); no run starts "
        "until it can (the chart grants list and watch on it)"
    )


# --------------------------------------------------------------------------------------------------
# The limits, and the operator's check
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The limits of one policy ConfigMap; empty means no limit."""

    source: str = "the policy ConfigMap"  # "ConfigMap <namespace>/<name>", for messages
    allowed_image_prefixes: tuple[str, ...] = ()
    max_gpus_per_job: int | None = None
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_toleration_keys: tuple[str, ...] = ()
    allowed_node_selector_keys: tuple[str, ...] = ()


def split_list(text: str) -> tuple[str, ...]:
    """A comma- or newline-separated value, as CEL's `replace`/`split`/`trim` read it."""
    return tuple(s.strip() for s in text.replace("\n", ",").split(",") if s.strip())


def load(data: Mapping[str, str] | None, source: str) -> Limits:
    """The limits in a ConfigMap's `data`; PolicyError when the ConfigMap is wrong."""
    data = data or {}
    unknown = sorted(k for k in data if k not in KEYS)
    if unknown:
        raise PolicyError(
            UNKNOWN_KEYS.text(source=source, unknown='", "'.join(unknown), keys=", ".join(KEYS))
        )
    max_gpus = str(data.get(MAX_GPUS, "")).strip()
    if max_gpus and not re.fullmatch(WHOLE_NUMBER, max_gpus):
        raise PolicyError(BAD_MAX_GPUS.text(source=source, value=max_gpus))

    def listed(key: str) -> tuple[str, ...]:
        return split_list(str(data.get(key, "")))

    return Limits(
        source=source,
        allowed_image_prefixes=listed(IMAGES),
        max_gpus_per_job=int(max_gpus) if max_gpus else None,
        allowed_priority_classes=listed(PRIORITY_CLASSES),
        allowed_toleration_keys=listed(TOLERATION_KEYS),
        allowed_node_selector_keys=listed(NODE_SELECTOR_KEYS),
    )


def check(job: FineTuneJob, limits: Limits) -> list[str]:
    """What in the spec the limits do not allow, one message per limit (empty: nothing)."""
    spec, res, source = job.spec, job.spec.resources, limits.source
    out: list[str] = []
    prefixes = limits.allowed_image_prefixes
    if prefixes and spec.image is not None and not any(spec.image.startswith(p) for p in prefixes):
        out.append(IMAGE.text(image=spec.image, allowed=", ".join(prefixes), source=source))
    gpus = res.gpus_per_node * res.nodes
    if limits.max_gpus_per_job is not None and gpus > limits.max_gpus_per_job:
        out.append(
            GPUS.text(
                gpus=gpus,
                per_node=res.gpus_per_node,
                nodes=res.nodes,
                limit=limits.max_gpus_per_job,
                source=source,
            )
        )
    classes = limits.allowed_priority_classes
    if classes and res.priority_class_name is not None and res.priority_class_name not in classes:
        out.append(PRIORITY.text(name=res.priority_class_name, allowed=", ".join(classes), source=source))
    keys = limits.allowed_toleration_keys
    bad = [t.key or "" for t in res.tolerations if (t.key or "") not in keys]
    if keys and bad:
        out.append(TOLERATIONS.text(keys='", "'.join(bad), allowed=", ".join(keys), source=source))
    keys = limits.allowed_node_selector_keys
    bad = [k for k in res.node_selector if k not in keys]
    if keys and bad:
        out.append(NODE_SELECTOR.text(keys='", "'.join(bad), allowed=", ".join(keys), source=source))
    return out


# --------------------------------------------------------------------------------------------------
# The admission policies (CEL), for the API server
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """An object a FineTuneJob names, which its author must be allowed to `get`: its pods would use it."""

    field: str  # the spec field that names it
    value: str  # CEL: its name, '' when unset
    resource: str  # core/v1 resource
    message: Message


ACCESS_FIELDS = {"user": "request.userInfo.username", "namespace": "request.namespace"}


def _secret(field: str, variable: str) -> Reference:
    """The Secret of a `secretKeyRef` at `field` (`spec.a.b.secretKeyRef.name`), held in `variable`."""
    path = ".?".join(field.split(".")[1:])  # CEL's optional chain: '' when any part is unset
    return Reference(
        field,
        f"object.spec.?{path}.orValue('')",
        "secrets",
        Message(
            field + ': you ({user}) may not get Secret "{name}" in namespace {namespace}, so your '
            "FineTuneJob may not use it either: its trainer would read it. Ask your namespace admin for get "
            "on Secret {name}, or use a Secret you can read",
            {**ACCESS_FIELDS, "name": f"variables.{variable}"},
        ),
    )


# Every Secret a spec can name, whether or not its run reads it (a tracker's Secret while the tracker is
# not in training.reportTo): naming a Secret is what the author must be allowed to do.
_SECRETS = (
    ("spec.output.hub.token.secretKeyRef.name", "hubTokenSecret"),
    ("spec.training.trackers.mlflow.password.secretKeyRef.name", "mlflowPasswordSecret"),
    ("spec.training.trackers.mlflow.token.secretKeyRef.name", "mlflowTokenSecret"),
    ("spec.training.trackers.wandb.apiKey.secretKeyRef.name", "wandbApiKeySecret"),
)
REFERENCES = (
    *(_secret(field, variable) for field, variable in _SECRETS),
    Reference(
        "spec.storage.claimName",
        "object.spec.?storage.?claimName.orValue('')",
        "persistentvolumeclaims",
        Message(
            'spec.storage.claimName: you ({user}) may not get PersistentVolumeClaim "{name}" in namespace '
            "{namespace}, so your FineTuneJob may not mount it either: its trainer would read and write it. "
            "Ask your namespace admin for get on it, or leave spec.storage.claimName unset",
            {**ACCESS_FIELDS, "name": "variables.claimName"},
        ),
    ),
)
_REFERENCE_VARIABLES = (*(variable for _, variable in _SECRETS), "claimName")

MATCH_CONSTRAINTS = {
    "resourceRules": [
        {
            "apiGroups": [GROUP],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": [PLURAL],
        }
    ]
}
# Only a new spec can start a run: metadata-only updates (labels, finalizers while deleting) always pass,
# also after the limits were tightened. Status updates go to the status subresource, never matched.
SPEC_CHANGED = {
    "name": "spec-changed",
    "expression": "request.operation == 'CREATE' || !has(oldObject.spec) || oldObject.spec != object.spec",
}


def _list_variable(key: str) -> dict[str, str]:
    return {
        "name": key,
        "expression": f"params.?data[?'{key}'].orValue('').replace('\\n', ',').split(',')"
        ".map(s, s.trim()).filter(s, s != '')",
    }


def admission_policies() -> dict[str, dict[str, Any]]:
    """The specs of the two ValidatingAdmissionPolicies, by name suffix (`<prefix>-<suffix>`)."""
    access = {
        "failurePolicy": "Fail",
        "matchConstraints": MATCH_CONSTRAINTS,
        "matchConditions": [SPEC_CHANGED],
        "variables": [
            {"name": var, "expression": ref.value}
            for var, ref in zip(_REFERENCE_VARIABLES, REFERENCES, strict=True)
        ],
        "validations": [
            {
                "expression": f"variables.{var} == '' || authorizer.group('').resource('{ref.resource}')"
                f".namespace(request.namespace).name(variables.{var}).check('get').allowed()",
                "messageExpression": ref.message.expression(),
                "reason": "Forbidden",
            }
            for var, ref in zip(_REFERENCE_VARIABLES, REFERENCES, strict=True)
        ],
    }
    known = ", ".join(f"'{k}'" for k in KEYS)
    limits = {
        "failurePolicy": "Fail",
        "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
        "matchConstraints": MATCH_CONSTRAINTS,
        "matchConditions": [SPEC_CHANGED],
        "variables": [
            {
                "name": "source",
                "expression": "'ConfigMap ' + params.metadata.namespace + '/' + params.metadata.name",
            },
            {
                "name": "unknownKeys",
                "expression": f"has(params.data) ? params.data.filter(k, !(k in [{known}])) : []",
            },
            *[_list_variable(k) for k in LIST_KEYS],
            {"name": MAX_GPUS, "expression": f"params.?data[?'{MAX_GPUS}'].orValue('').trim()"},
            {"name": "gpusPerNode", "expression": "object.spec.?resources.?gpusPerNode.orValue(1)"},
            {"name": "nodes", "expression": "object.spec.?resources.?nodes.orValue(1)"},
            {
                "name": "badTolerationKeys",
                "expression": "object.spec.?resources.?tolerations.orValue([]).map(t, t.?key.orValue(''))"
                f".filter(k, !(k in variables.{TOLERATION_KEYS}))",
            },
            {
                "name": "badNodeSelectorKeys",
                "expression": "has(object.spec.resources) && has(object.spec.resources.nodeSelector) ? "
                f"object.spec.resources.nodeSelector.filter(k, !(k in variables.{NODE_SELECTOR_KEYS})) : []",
            },
        ],
        "validations": [
            {
                "expression": "size(variables.unknownKeys) == 0",
                "messageExpression": UNKNOWN_KEYS.expression(),
                "reason": "Forbidden",
            },
            {
                "expression": f"variables.{MAX_GPUS} == '' || variables.{MAX_GPUS}.matches('{WHOLE_NUMBER}')",
                "messageExpression": BAD_MAX_GPUS.expression(),
                "reason": "Forbidden",
            },
            {
                "expression": f"!has(object.spec.image) || size(variables.{IMAGES}) == 0 || "
                f"variables.{IMAGES}.exists(p, object.spec.image.startsWith(p))",
                "messageExpression": IMAGE.expression(),
                "reason": "Forbidden",
            },
            {
                "expression": f"variables.{MAX_GPUS} == '' || "
                f"!variables.{MAX_GPUS}.matches('{WHOLE_NUMBER}') || "
                f"variables.gpusPerNode * variables.nodes <= int(variables.{MAX_GPUS})",
                "messageExpression": GPUS.expression(),
                "reason": "Forbidden",
            },
            {
                "expression": "!has(object.spec.resources) || "
                "!has(object.spec.resources.priorityClassName) || "
                f"size(variables.{PRIORITY_CLASSES}) == 0 || "
                f"object.spec.resources.priorityClassName in variables.{PRIORITY_CLASSES}",
                "messageExpression": PRIORITY.expression(),
                "reason": "Forbidden",
            },
            {
                "expression": f"size(variables.{TOLERATION_KEYS}) == 0 || "
                "size(variables.badTolerationKeys) == 0",
                "messageExpression": TOLERATIONS.expression(),
                "reason": "Forbidden",
            },
            {
                "expression": f"size(variables.{NODE_SELECTOR_KEYS}) == 0 || "
                "size(variables.badNodeSelectorKeys) == 0",
                "messageExpression": NODE_SELECTOR.expression(),
                "reason": "Forbidden",
            },
        ],
    }
    return {"author-access": access, "limits": limits}


# --------------------------------------------------------------------------------------------------
# The copies in the Helm chart and the kustomize base (python -m kubetune.policy writes them)
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
CHART_FILE = Path("charts/kubetune/files/admission-policies.yaml")
BASE_FILE = Path("manifests/base/admission-policy.yaml")
BASE_NAMESPACE, BASE_CONFIGMAP = "kubetune-system", "kubetune-policy"
_HEADER = "# Generated by `python -m kubetune.policy` from src/kubetune/policy.py: do not edit.\n"


def _dump(docs: list[Any]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if len(value) > 80 else None  # CEL on lines of its own, as written
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return _HEADER + "---\n".join(yaml.dump(d, Dumper=Dumper, sort_keys=False, width=100) for d in docs)


def generated() -> dict[Path, str]:
    """The generated files (relative to the repository root) and their contents."""
    policies = admission_policies()
    labels = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "admission-policy"}
    base: list[Any] = []
    for suffix, spec in policies.items():
        name = f"kubetune-{suffix}"
        base.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name, "labels": labels},
                "spec": spec,
            }
        )
        binding: dict[str, Any] = {"policyName": name, "validationActions": ["Deny"]}
        if "paramKind" in spec:
            binding["paramRef"] = {
                "name": BASE_CONFIGMAP,
                "namespace": BASE_NAMESPACE,
                "parameterNotFoundAction": "Deny",
            }
        base.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name, "labels": labels},
                "spec": binding,
            }
        )
    return {CHART_FILE: _dump([policies]), BASE_FILE: _dump(base)}


def main() -> None:
    for path, text in generated().items():
        (ROOT / path).write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
