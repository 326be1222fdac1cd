"""Generate the CRD, the editor JSON schema and the Markdown reference from the pydantic models.

Everything here is a pure function of ``kubetune.api.v1alpha1``. ``write_all()`` (``make generate``)
writes the files; tests/test_generated.py fails when a committed copy differs from what these return.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune import __version__
from kubetune.api import v1alpha1 as api
from kubetune.redact import TOKEN_RE

# The token pattern of kubetune.redact, which RE2 (the API server's regex engine) reads alike.
TOKEN_PATTERN = TOKEN_RE.pattern

CRD_PATH = Path("manifests/crd/kubetune.io_finetunejobs.yaml")
# A byte-identical copy where Helm can load it (a chart reads no file outside its folder). kustomize
# needs none: manifests/base lists ../crd, a kustomization of its own.
CRD_COPIES = (Path("charts/kubetune/files/crds/kubetune.io_finetunejobs.yaml"),)
SCHEMA_PATH = Path("manifests/schema/finetunejob.schema.json")
README_PATH = Path("README.md")
# Argo CD's health check: gitops/argocd/health.lua, and the argocd-cm patch generated around it.
HEALTH_LUA_PATH = Path("gitops/argocd/health.lua")
ARGOCD_CM_PATH = Path("gitops/argocd/argocd-cm-patch.yaml")
ARGOCD_CM_KEY = f"  resource.customizations.health.{api.GROUP}_{api.KIND}: |\n"
REFERENCE_BEGIN = "<!-- BEGIN GENERATED: FineTuneJob reference (make generate) -->"
REFERENCE_END = "<!-- END GENERATED: FineTuneJob reference -->"

# Keys of pydantic's JSON schema that a structural Kubernetes schema does not take.
_DROP = {"title", "default", "cel", "additionalProperties", "$defs"}


# Bounds pydantic leaves under its own names where a validator wraps the type (`Int | None`).
_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _standard(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            _BOUNDS.get(k, k) if k in _BOUNDS and "type" in node else k: _standard(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_standard(v) for v in node]
    return node


def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema: dict[str, Any] = _standard(model.model_json_schema(by_alias=True, mode="validation"))
    return schema


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every ``$ref``: Kubernetes schemas must be self-contained."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _default_note(default: Any) -> str:
    if default is None or default == [] or default == {}:
        return ""
    return f" Default: {json.dumps(default)}."


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Turn one (resolved) pydantic JSON-schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    # Optional[X] is anyOf [X, null]: unset fields are simply omitted on the wire.
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions other than Optional[X] cannot be structural: {options}")
        node = {**options[0], **node, "cel": [*options[0].get("cel", []), *node.get("cel", [])]}
    out: dict[str, Any] = {}
    description = node.get("description", "")
    if "default" in node:
        description = (description + _default_note(node["default"])).strip()
    if description:
        out["description"] = " ".join(description.split())
    if "const" in node:
        node.setdefault("enum", [node["const"]])
    typ = node.get("type")
    if typ is None and "enum" in node:
        typ = {bool: "boolean", int: "integer", float: "number", str: "string"}[type(node["enum"][0])]
    if typ is None:
        raise ValueError(f"schema node without a type: {node}")
    out["type"] = typ
    if typ == "integer":
        out["format"] = "int64"  # the models bound every integer to int64, as the API server does
    keys = ("enum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties", "minimum", "maximum")
    for key in keys:
        if key in node:
            out[key] = node[key]
    if typ == "string" and "enum" in node and "maxLength" not in out:
        # The API server budgets CEL by maxLength, not by enum: unbounded, a rule comparing this string
        # is costed as if it could be megabytes long.
        out["maxLength"] = max(len(v) for v in node["enum"])
    # A format with CEL rules says what is wrong in words; a bare pattern would only quote the regex.
    if "pattern" in node and not node.get("cel"):
        out["pattern"] = node["pattern"]
    # JSON Schema 2020-12 writes exclusive bounds as numbers; OpenAPI v3.0 as booleans.
    for key, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            out[plain] = node[key]
            out[key] = True
    if typ == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {k: _structural(v) for k, v in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _structural(node["additionalProperties"])
    if typ == "array":
        out["items"] = _structural(node["items"])
    if node.get("cel"):
        out["x-kubernetes-validations"] = copy.deepcopy(node["cel"])
    return out


def _is_text(node: dict[str, Any]) -> bool:
    return node.get("type") == "string" and "enum" not in node


def _add_token_rules(node: dict[str, Any]) -> None:
    """The token rule on every free-text string of the spec, and on the keys of every map in it."""
    rules = node.setdefault("x-kubernetes-validations", [])
    if _is_text(node):
        rules.insert(
            0, {"rule": f"!self.matches({api.cel_string(TOKEN_PATTERN)})", "message": api.TOKEN_MESSAGE}
        )
    values = node.get("additionalProperties")
    if isinstance(values, dict):
        rules.insert(
            0,
            {
                "rule": f"self.all(k, !k.matches({api.cel_string(TOKEN_PATTERN)}))",
                "message": "a key " + api.TOKEN_MESSAGE,
            },
        )
        _add_token_rules(values)
    for child in node.get("properties", {}).values():
        _add_token_rules(child)
    if "items" in node:
        _add_token_rules(node["items"])
    if not rules:
        del node["x-kubernetes-validations"]


def _parenthesized(rule: str) -> str:
    return f"({rule})"


def _lift(node: dict[str, Any]) -> None:
    """Move the CEL rules of string nodes to the node that holds them (an object, list or map).

    The API server quotes a string's value in the error of a rule on that string, but not the value of
    an object, list or map: a token pasted in the wrong field must not come back in an error. A rule
    lifted to an object keeps its field in `fieldPath`."""
    for child in node.get("properties", {}).values():
        _lift(child)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _lift(node[key])
    lifted: list[dict[str, Any]] = []
    for name, child in node.get("properties", {}).items():
        if child.get("type") == "string" and child.get("x-kubernetes-validations"):
            for r in child.pop("x-kubernetes-validations"):
                rule = api.on(r["rule"], f"self.{name}")
                lifted.append(
                    {**r, "rule": f"!has(self.{name}) || {_parenthesized(rule)}", "fieldPath": f".{name}"}
                )
    for key, var, target in (("items", "item", "item"), ("additionalProperties", "key", "self[key]")):
        child = node.get(key)
        if (
            isinstance(child, dict)
            and child.get("type") == "string"
            and child.get("x-kubernetes-validations")
        ):
            for r in child.pop("x-kubernetes-validations"):
                lifted.append({**r, "rule": f"self.all({var}, {_parenthesized(api.on(r['rule'], target))})"})
    if lifted:
        node["x-kubernetes-validations"] = [*node.get("x-kubernetes-validations", []), *lifted]


def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the FineTuneJob CRD."""
    raw = _json_schema(api.FineTuneJob)
    resolved = _resolve(raw, raw.get("$defs", {}))
    spec = _structural(resolved["properties"]["spec"])
    _add_token_rules(spec)
    _lift(spec)
    status = _structural(resolved["properties"]["status"])
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return {
        "description": " ".join((api.FineTuneJob.__doc__ or "").split()),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": copy.deepcopy(resolved["cel"]),
    }


PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Loss", "type": "string", "jsonPath": ".status.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.id", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/version": __version__},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": crd_schema()},
                }
            ],
        },
    }


def _strip_cel(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_cel(v) for k, v in node.items() if k != "cel"}
    if isinstance(node, list):
        return [_strip_cel(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """JSON schema for editors (yaml-language-server, VS Code, JetBrains)."""
    schema = _strip_cel(_json_schema(api.FineTuneJob))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://kubetune.io/schemas/{api.VERSION}/finetunejob.json",
        **schema,
    }


# ---------------------------------------------------------------------------------------------------
# Markdown reference
# ---------------------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """A short type name for the docs, and the nested model to document (if any)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        name, model = _unwrap(args[0])
        formats = [m for m in annotation.__metadata__ if isinstance(m, api.Format) and m.name != "text"]
        return (f"{name} ({formats[0].name})" if formats else name), model
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        return _unwrap(non_null[0]) if len(non_null) == 1 else (" | ".join(map(str, non_null)), None)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args), None
    if origin is list:
        name, model = _unwrap(args[0])
        return f"list of {name}", model
    if origin is dict:
        return "map of string", None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})", annotation
    plain = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return plain.get(annotation, getattr(annotation, "__name__", str(annotation))), None


def reference_markdown() -> str:
    """The FineTuneJob field reference, in the order a reader meets the fields."""
    out: list[str] = []
    seen: set[type[BaseModel]] = set()
    used: dict[str, api.Format] = {}
    queue: list[type[BaseModel]] = [api.FineTuneJobSpec]
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        out.append(f"#### {model.__name__}\n")
        out.append(" ".join((model.__doc__ or "").split()) + "\n")
        out.append("| Field | Type | Default | Description |")
        out.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            alias = field.alias or name
            type_name, nested = _unwrap(field.annotation)
            formats = [m for m in field.metadata if isinstance(m, api.Format) and m.name != "text"]
            if formats:
                type_name = f"{type_name} ({formats[0].name})"
                used.setdefault(formats[0].name, formats[0])
            if nested is not None:
                queue.append(nested)
            if field.is_required():
                default = "required"
            elif field.default_factory is not None or field.default is None:
                default = ""
            else:
                default = f"`{json.dumps(field.default)}`"
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            out.append(f"| `{alias}` | {type_name} | {default} | {desc} |")
        out.append("")
        rules = api.cel_rules(model)
        if rules:
            out.append("Rules: " + "; ".join(r["message"] for r in rules) + ".\n")
    out.append("#### Value formats\n")
    out.append(
        "Checked by `kubetune validate` and, through the CRD's CEL rules, by the API server; every "
        "string of the spec is also checked for tokens. Label keys (`podMetadata.labels`, "
        f"`resources.nodeSelector`) and annotation keys are qualified names: {api.QUALIFIED_NAME_MESSAGE}.\n"
    )
    out.append("| Format | Rule | Longest |")
    out.append("|---|---|---|")
    table = {"metadata.name": api.JOB_NAME, **dict(sorted({**_formats_in_use(), **used}.items()))}
    for name, fmt in table.items():
        words = "; ".join(c.message for c in fmt.checks).replace("|", "\\|")
        longest = api.JOB_NAME_MAX if fmt is api.JOB_NAME else fmt.max_length
        out.append(f"| {name} | {words} | {longest} |")
    return "\n".join(out).rstrip() + "\n"


def _formats_in_use() -> dict[str, api.Format]:
    """The named formats the spec's fields use (inside Optional, lists and maps too)."""
    found: dict[str, api.Format] = {}

    def visit(annotation: Any) -> None:
        if typing.get_origin(annotation) is typing.Annotated:
            for m in annotation.__metadata__:
                if isinstance(m, api.Format) and m.name != "text":
                    found.setdefault(m.name, m)
        for arg in typing.get_args(annotation):
            visit(arg)

    todo: list[type[BaseModel]] = [api.FineTuneJobSpec]
    seen: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            visit(field.annotation)
            for m in field.metadata:
                if isinstance(m, api.Format) and m.name != "text":
                    found.setdefault(m.name, m)
            for arg in [field.annotation, *typing.get_args(field.annotation)]:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
                for inner in typing.get_args(arg):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        todo.append(inner)
    return found


def render_crd_yaml() -> str:
    header = "# Generated from src/kubetune/api/v1alpha1.py by `make generate`. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def render_schema_json() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def splice_reference(readme: str) -> str:
    """README.md with its generated reference section replaced."""
    begin, end = readme.index(REFERENCE_BEGIN), readme.index(REFERENCE_END)
    return readme[: begin + len(REFERENCE_BEGIN)] + "\n\n" + reference_markdown() + "\n" + readme[end:]


ARGOCD_CM_HEAD = """\
# Generated from gitops/argocd/health.lua by `make generate` (python -m kubetune.api.generate): do not
# edit; edit health.lua instead (tests/test_generated.py fails when this file is stale).
#
# Installs health.lua as Argo CD's health check for FineTuneJobs: the script below is that file,
# verbatim. Merge it into the existing argocd-cm, for example:
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file gitops/argocd/argocd-cm-patch.yaml
# or list it under `patches:` of the kustomization that installs Argo CD (Helm chart: configs.cm).
# Argo CD picks up argocd-cm changes without a restart. To try the script on a real object first:
#   kubectl get ftj my-job -o yaml > ftj.yaml
#   argocd admin settings resource-overrides health ftj.yaml \\
#     --argocd-cm-path gitops/argocd/argocd-cm-patch.yaml
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
  # Argo CD >= 3.0 tracks resources by annotation (argocd.argoproj.io/tracking-id) by default. On 2.x,
  # consider `application.resourceTrackingMethod: annotation` too: the trainer Job, ConfigMap and Service
  # of a FineTuneJob carry `app.kubernetes.io/instance: <FineTuneJob name>`, the label that label tracking
  # reads, so a FineTuneJob named like an Argo CD Application would show its children in that app.
"""


def render_argocd_cm(script: str) -> str:
    """gitops/argocd/argocd-cm-patch.yaml, whole: the argocd-cm patch carrying `script` (health.lua)
    verbatim, as a YAML block scalar indented by 4 (the file's last key)."""
    body = "".join(f"    {line}" if line.strip() else "\n" for line in script.splitlines(True))
    return ARGOCD_CM_HEAD + ARGOCD_CM_KEY + body


def outputs(root: Path) -> dict[Path, str]:
    """Every generated file and the content it must have."""
    crd_yaml = render_crd_yaml()
    return {
        root / CRD_PATH: crd_yaml,
        **{root / copy: crd_yaml for copy in CRD_COPIES},
        root / SCHEMA_PATH: render_schema_json(),
        root / README_PATH: splice_reference((root / README_PATH).read_text()),
        root / ARGOCD_CM_PATH: render_argocd_cm((root / HEALTH_LUA_PATH).read_text()),
    }


def write_all(root: Path) -> list[Path]:
    return write_files(outputs(root))


def write_files(files: dict[Path, str]) -> list[Path]:
    """Write each file whose content differs; the ones written."""
    changed = []
    for path, content in files.items():
        if not path.exists() or path.read_text() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in write_all(Path.cwd()):
        print(f"wrote {p}")
