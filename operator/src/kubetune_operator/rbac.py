"""The operator's RBAC rules, written once: `make generate` (`python -m kubetune_operator.generate`) writes
them into the Helm chart (charts/kubetune/files/rbac-rules.yaml, which its templates render) and the
kustomize base and single-namespace overlay.

tests/test_chart.py maps every Kubernetes API call in this package to these rules (and fails on a rule no
call needs), and fails when a generated file differs from what `outputs()` returns.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.v1alpha1 import GROUP, PLURAL
from kubetune_operator.leader import LEASE_NAME

# The policy ConfigMap (kubetune.policy) is named after the Helm release (`<fullname>-policy`): the chart
# fills this in, the kustomize base uses its own fixed name.
POLICY_CONFIGMAP = "<policy ConfigMap>"
KUSTOMIZE_POLICY_CONFIGMAP = "kubetune-policy"
CHART_POLICY_CONFIGMAP = '{{ include "kubetune.policyConfigMap" . }}'


@dataclass(frozen=True)
class Rule:
    """One RBAC PolicyRule, and why the operator needs it (a comment in every generated file)."""

    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    names: tuple[str, ...] = ()

    def grants(self) -> set[tuple[str, str, str, str]]:
        """(group, resource, verb, resourceName) for each thing the rule allows ("" = any name)."""
        return {
            (self.group, r, v, n) for r in self.resources for v in self.verbs for n in self.names or ("",)
        }


# Where the operator reconciles: a ClusterRole, or (the chart's watchNamespace, the single-namespace overlay)
# a Role in the watched namespace. Every list is also a watch: the informers list, then watch from there.
OPERATOR: tuple[Rule, ...] = (
    Rule(
        GROUP,
        (PLURAL,),
        ("list", "watch"),
        "FineTuneJobs: the informer's list and watch (reconcile reads the cache, never the API server).",
    ),
    Rule(GROUP, (f"{PLURAL}/status",), ("patch",), "Their status, one merge patch per change."),
    Rule(
        "batch",
        ("jobs",),
        ("list", "watch", "create", "patch", "delete"),
        "The run's Job: watched, created, patched (suspend, deadline and TTL edits), deleted when the "
        "spec changes or the run is refused.",
    ),
    Rule("", ("pods",), ("list", "watch"), "The trainer pods (by our labels): phase, restarts, reasons."),
    Rule(
        "",
        ("pods/log",),
        ("get",),
        "The progress lines at the end of rank 0's trainer log (trainer pods have no API access).",
    ),
    Rule(
        "",
        ("configmaps", "services"),
        ("create", "delete"),
        "The run's spec ConfigMap and multi-node headless Service.",
    ),
    Rule(
        "",
        ("persistentvolumeclaims",),
        ("get", "list", "watch", "create", "patch", "delete"),
        "The per-FineTuneJob workspace claim: watched (the informer), created, patched (its owner "
        "reference follows storage.reclaimPolicy), deleted when the API server refuses the run.",
    ),
    Rule("", ("events",), ("create",), "One event per state transition of a FineTuneJob."),
    Rule(
        "",
        ("nodes",),
        ("list", "watch"),
        "The GPU nodes' labels (metadata only: nvidia.com/gpu.product and nvidia.com/gpu.memory), before a "
        "run is created: does it fit the memory of its GPU. Cluster-scoped: a Role (watchNamespace) "
        "cannot grant it, and the operator then falls back to its gpuType table.",
    ),
)

# The one rule the chart's secretPreCheck.enabled=false takes away (`--no-secret-precheck`).
SECRET_PRECHECK: tuple[Rule, ...] = (
    Rule(
        "",
        ("secrets",),
        ("get",),
        "Whether a FineTuneJob's Hub token Secret exists, before its run is created. The operator asks "
        "for metadata only (PartialObjectMetadata), but RBAC cannot tell that from a full read: the grant "
        "would allow reading Secret data. Without it (--no-secret-precheck), the trainer reports a "
        "missing Secret.",
    ),
)

# Leader election (`--leader-elect`), in the operator's own namespace.
LEADER_ELECTION: tuple[Rule, ...] = (
    Rule(
        "coordination.k8s.io",
        ("leases",),
        ("create",),
        "The Lease, the first time: `create` cannot be limited to a name (the object does not exist yet).",
    ),
    Rule(
        "coordination.k8s.io",
        ("leases",),
        ("get", "update"),
        "Read and renew that one Lease.",
        names=(LEASE_NAME,),
    ),
)

# The policy ConfigMap (`--policy-configmap`), in the operator's own namespace: a list and watch by name
# (a metadata.name field selector, which RBAC matches against resourceNames).
POLICY_READER: tuple[Rule, ...] = (
    Rule(
        "",
        ("configmaps",),
        ("list", "watch"),
        "The limits on FineTuneJobs, read before a run is created.",
        names=(POLICY_CONFIGMAP,),
    ),
)

ROLES: dict[str, tuple[Rule, ...]] = {
    "operator": OPERATOR,
    "secretPreCheck": SECRET_PRECHECK,
    "leaderElection": LEADER_ELECTION,
    "policyReader": POLICY_READER,
}


def grants(*rule_sets: tuple[Rule, ...]) -> set[tuple[str, str, str, str]]:
    return {g for rules in rule_sets for rule in rules for g in rule.grants()}


# ---------------------------------------------------------------------------------------------------
# Rendering: YAML written by hand (flow lists, a comment per rule), so the files read like the others
# ---------------------------------------------------------------------------------------------------

CHART_RULES_PATH = Path("charts/kubetune/files/rbac-rules.yaml")
BASE_RBAC_PATH = Path("manifests/base/rbac.yaml")
SINGLE_NAMESPACE_ROLE_PATH = Path("manifests/overlays/single-namespace/role.yaml")
SINGLE_NAMESPACE = "ml-team"
NAMESPACE = "kubetune-system"
SERVICE_ACCOUNT = "kubetune-operator"
GENERATED = "# Generated from operator/src/kubetune_operator/rbac.py by `make generate`: do not edit.\n"


def _comment(text: str, indent: str, width: int = 100) -> str:
    lines = textwrap.wrap(text, width - len(indent) - 2)
    return "".join(f"{indent}# {line}\n" for line in lines)


def _rules(rules: tuple[Rule, ...], indent: str, policy_configmap: str) -> str:
    out = []
    for rule in rules:
        names = [policy_configmap if n == POLICY_CONFIGMAP else n for n in rule.names]
        out.append(_comment(rule.why, indent))
        out.append(f"{indent}- apiGroups: {json.dumps([rule.group])}\n")
        out.append(f"{indent}  resources: {json.dumps(list(rule.resources))}\n")
        if names:
            # Single-quoted: the chart's name is a template action with double quotes in it.
            assert not any("'" in n for n in names), names
            quoted = ", ".join(f"'{n}'" for n in names)
            out.append(f"{indent}  resourceNames: [{quoted}]\n")
        out.append(f"{indent}  verbs: {json.dumps(list(rule.verbs))}\n")
    return "".join(out)


def chart_rules_yaml() -> str:
    """charts/kubetune/files/rbac-rules.yaml: the rules by role, read by "kubetune.rbacRules"."""
    head = GENERATED + (
        "# The operator's RBAC rules by role, rendered by the chart's templates (_helpers.tpl,\n"
        '# "kubetune.rbacRules": through `tpl`, which fills in the policy ConfigMap\'s name):\n'
        "# - operator: the ClusterRole (or, with watchNamespace, the Role there);\n"
        "# - secretPreCheck: added to it with secretPreCheck.enabled;\n"
        "# - leaderElection: the Role in the release namespace, with leaderElection.enabled;\n"
        "# - policyReader: the Role in the release namespace for the policy ConfigMap.\n"
    )
    body = "".join(f"{role}:\n{_rules(rules, '  ', CHART_POLICY_CONFIGMAP)}" for role, rules in ROLES.items())
    return head + body


def _meta(kind: str, name: str, namespace: str | None = None, part_of: bool = False) -> str:
    ns = f"  namespace: {namespace}\n" if namespace else ""
    extra = "    app.kubernetes.io/part-of: kubetune\n" if part_of else ""
    return (
        f"kind: {kind}\nmetadata:\n  name: {name}\n{ns}  labels:\n"
        "    app.kubernetes.io/name: kubetune\n    app.kubernetes.io/component: operator\n" + extra
    )


def _role(
    kind: str, name: str, rules: tuple[Rule, ...], namespace: str | None = None, part_of: bool = False
) -> str:
    return (
        "apiVersion: rbac.authorization.k8s.io/v1\n"
        + _meta(kind, name, namespace, part_of)
        + "rules:\n"
        + _rules(rules, "  ", KUSTOMIZE_POLICY_CONFIGMAP)
    )


def _binding(
    kind: str, name: str, role_kind: str, namespace: str | None = None, part_of: bool = False
) -> str:
    return (
        "apiVersion: rbac.authorization.k8s.io/v1\n"
        + _meta(kind, name, namespace, part_of)
        + "roleRef:\n  apiGroup: rbac.authorization.k8s.io\n"
        + f"  kind: {role_kind}\n  name: {name}\n"
        + f"subjects:\n  - kind: ServiceAccount\n    name: {SERVICE_ACCOUNT}\n    namespace: {NAMESPACE}\n"
    )


def base_rbac_yaml() -> str:
    """manifests/base/rbac.yaml: the ServiceAccount and every grant it has (namespace: kubetune-system,
    from the kustomization)."""
    head = GENERATED + _comment(
        "The operator's identity and permissions: exactly the API calls it makes (tests/test_chart.py "
        "maps each call in operator/src/kubetune_operator/ to a rule), the same rules as the Helm chart's. "
        "To go without the Secret pre-check, delete that rule with a patch and add --no-secret-precheck "
        "to the Deployment's args.",
        "",
    )
    docs = [
        "apiVersion: v1\n" + _meta("ServiceAccount", SERVICE_ACCOUNT),
        _role("ClusterRole", SERVICE_ACCOUNT, OPERATOR + SECRET_PRECHECK),
        _binding("ClusterRoleBinding", SERVICE_ACCOUNT, "ClusterRole"),
        "# Leader election (--leader-elect): one Lease, kubetune-operator, in the operator's own namespace.\n"
        + _role("Role", f"{SERVICE_ACCOUNT}-leader-election", LEADER_ELECTION),
        _binding("RoleBinding", f"{SERVICE_ACCOUNT}-leader-election", "Role"),
        "# The policy ConfigMap (policy.yaml, --policy-configmap): read by name only.\n"
        + _role("Role", f"{KUSTOMIZE_POLICY_CONFIGMAP}-reader", POLICY_READER),
        _binding("RoleBinding", f"{KUSTOMIZE_POLICY_CONFIGMAP}-reader", "Role"),
    ]
    return head + "---\n".join(docs)


def single_namespace_role_yaml() -> str:
    """The single-namespace overlay's Role: the base ClusterRole's rules, in ml-team only."""
    head = GENERATED + _comment(
        f"The operator's permissions in {SINGLE_NAMESPACE} only: the base ClusterRole's rules, as the Helm "
        "chart's Role with watchNamespace.",
        "",
    )
    ns = SINGLE_NAMESPACE
    return head + "---\n".join(
        [
            _role("Role", SERVICE_ACCOUNT, OPERATOR + SECRET_PRECHECK, ns, part_of=True),
            _binding("RoleBinding", SERVICE_ACCOUNT, "Role", ns, part_of=True),
        ]
    )


def outputs(root: Path) -> dict[Path, str]:
    """Every file generated from these rules, and the content it must have."""
    return {
        root / CHART_RULES_PATH: chart_rules_yaml(),
        root / BASE_RBAC_PATH: base_rbac_yaml(),
        root / SINGLE_NAMESPACE_ROLE_PATH: single_namespace_role_yaml(),
    }
